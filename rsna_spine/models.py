"""Stage 1 (localizer) and stage 2 (the v9 classifier) of the two-stage lumbar spine grader.

Stage 1, :class:`HeatmapLocalizer`: a small anisotropic 3D U-Net (in-plane pooling only, as for thick-slice
MR) with coordinate input channels; one heatmap channel per point (e.g. the five spinal-canal levels on
the sagittal T2 stack, ten foramina on the sagittal T1). Trained with a spatial-softmax cross-entropy
against Gaussian targets; decoded by a soft-argmax around the peak (:func:`decode_heatmaps`), giving the
slice and the in-plane coordinate. With ``slice_kernel=1`` and one input slice it is a 2D keypoint net
(the axial subarticular points on the slice chosen by projecting the sagittal level point).

Stage 2, :class:`SpineClassifier` (seed v9): a per-slice CNN (torchvision EfficientNet-V2-S, or a tiny
EfficientNet-V2-style stack for smoke runs) → bidirectional GRU over slices → attention-MIL pooling
(Ilse et al. 2018: Linear → tanh → Linear → softmax over slices) → concat level and condition
embeddings → LayerNorm, Dropout, Linear, GELU, Linear → 3 logits. Returns the attention weights.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from common.checkpoint import register_model
from common.errors import InputError

log = logging.getLogger(__name__)


# ----------------------------------------------------------------------------------------- backbones
def _tiny_efficientnet_v2(channels: Sequence[int]) -> tuple[nn.Module, int]:
    """EfficientNet-V2-style features from torchvision's own blocks: Fused-MBConv stages of ``channels``
    (stride 2 after the first), a 1×1 head to 2·channels[-1]. For CPU smoke runs only."""
    from torchvision.models.efficientnet import EfficientNet, FusedMBConvConfig

    channels = [int(c) for c in channels]
    setting = [FusedMBConvConfig(1, 3, 1, channels[0], channels[0], 1)]
    for cin, cout in zip(channels[:-1], channels[1:]):
        setting.append(FusedMBConvConfig(2, 3, 2, cin, cout, 1))
    last = 2 * channels[-1]
    net = EfficientNet(setting, dropout=0.0, stochastic_depth_prob=0.0, last_channel=last)
    return net.features, last


def build_backbone(name: str, weights: str | None = None, tiny_channels: Sequence[int] = (8, 16, 32, 64)):
    """(features module mapping (B, 3, H, W) → (B, C, h, w), C).

    ``weights``: None / "" → random init; "imagenet" → torchvision's IMAGENET1K_V1 weights (from the local
    torch hub cache, downloaded only if the network allows); a file path → a torchvision state dict.
    """
    import torchvision

    if name == "efficientnet_v2_tiny":
        if weights:
            raise ValueError("efficientnet_v2_tiny has no pretrained weights; set backbone_weights to ''")
        return _tiny_efficientnet_v2(tiny_channels)
    if name != "efficientnet_v2_s":
        raise ValueError(f"unknown backbone '{name}': use efficientnet_v2_s or efficientnet_v2_tiny")
    model = torchvision.models.efficientnet_v2_s(weights=None)
    if weights:
        if weights == "imagenet":
            enum = torchvision.models.EfficientNet_V2_S_Weights.IMAGENET1K_V1
            try:
                state = enum.get_state_dict(progress=False, check_hash=True)
            except Exception as exc:  # offline, proxy, corrupt cache ...
                raise RuntimeError(
                    "backbone_weights='imagenet': cannot load torchvision EfficientNet_V2_S IMAGENET1K_V1 "
                    f"({type(exc).__name__}: {exc}). Offline, download {enum.url} elsewhere and set "
                    "model.backbone_weights to the file path, or '' for random init.") from exc
        else:
            path = Path(weights)
            if not path.is_file():
                raise FileNotFoundError(f"backbone_weights: file not found: {path}")
            try:
                state = torch.load(path, map_location="cpu", weights_only=True)
            except Exception as exc:  # truncated file, pickle of objects, not a torch file ...
                raise InputError(f"model.backbone_weights: not a readable torchvision state dict "
                                 f"({type(exc).__name__})", path) from exc
            state = state.get("state_dict", state) if isinstance(state, dict) else state
        # torchvision ImageNet weights (or a file of them) for the backbone only, not a warm start of this
        # model: every tensor of the features must be there with its shape, else nothing is loaded
        features = {k[len("features."):]: v for k, v in state.items() if k.startswith("features.")}
        if not features:
            raise InputError("model.backbone_weights: no 'features.*' keys of a torchvision EfficientNet", weights)
        expected = model.features.state_dict()
        missing = [k for k in expected if k not in features]
        unexpected = [k for k in features if k not in expected]
        misshaped = [k for k in expected if k in features and features[k].shape != expected[k].shape]
        if missing or unexpected or misshaped:
            raise InputError(f"model.backbone_weights: {len(expected) - len(missing) - len(misshaped)} of "
                             f"{len(expected)} tensors fit efficientnet_v2_s (missing {missing[:3]}, unexpected "
                             f"{unexpected[:3]}, shape mismatch {misshaped[:3]}); nothing loaded", weights)
        model.features.load_state_dict(features, strict=True)
    return model.features, 1280


# ---------------------------------------------------------------------------------------- stage 2
class AttentionMIL(nn.Module):
    """Attention pooling over instances (Ilse, Tomczak & Welling 2018): a = softmax(w·tanh(V h))."""

    def __init__(self, feature_dim: int, hidden_dim: int):
        super().__init__()
        self.attention = nn.Sequential(nn.Linear(feature_dim, hidden_dim), nn.Tanh(), nn.Linear(hidden_dim, 1))

    def forward(self, features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, F) → pooled (B, F), weights (B, N) summing to 1 over N."""
        weights = torch.softmax(self.attention(features).squeeze(-1).float(), dim=1)
        pooled = (features * weights.unsqueeze(-1).to(features.dtype)).sum(dim=1)
        return pooled, weights


@register_model
class SpineClassifier(nn.Module):
    """v9: per-slice CNN → BiGRU → attention-MIL → [level, condition] embeddings → MLP → 3 logits.

    forward(images (B, N, 3, H, W), level (B,), condition (B,)) → {"logits": (B, 3), "attention": (B, N)}.

    ``second_view=True`` (sagittal + axial fusion, :mod:`rsna_spine.fusion`): forward also takes
    ``second_images`` (B, N, 3, H, W) and ``second_present`` (B,) in {0, 1}; the second crop goes through the
    same encoder (CNN → GRU → attention-MIL) and its pooled features, zeroed where absent, are concatenated
    with the primary ones and the present flag before the head. The attention returned is the primary view's.
    """

    def __init__(self, backbone: str = "efficientnet_v2_s", backbone_weights: str | None = None,
                 tiny_channels: Sequence[int] = (8, 16, 32, 64), gru_hidden: int = 512, gru_layers: int = 2,
                 gru_dropout: float = 0.3, attention_hidden: int = 256, level_dim: int = 256,
                 condition_dim: int = 64, n_levels: int = 5, n_conditions: int = 5, head_hidden: int = 512,
                 dropout: float = 0.35, n_classes: int = 3, bias_init: Sequence[float] | None = None,
                 second_view: bool = False):
        super().__init__()
        self.second_view = bool(second_view)
        self.backbone, feat_dim = build_backbone(backbone, backbone_weights, tiny_channels)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.gru = nn.GRU(feat_dim, gru_hidden, num_layers=gru_layers, batch_first=True, bidirectional=True,
                          dropout=gru_dropout if gru_layers > 1 else 0.0)
        self.mil = AttentionMIL(2 * gru_hidden, attention_hidden)
        self.level_embedding = nn.Embedding(n_levels, level_dim)
        self.condition_embedding = nn.Embedding(n_conditions, condition_dim)
        width = 2 * gru_hidden + level_dim + condition_dim
        if self.second_view:  # the second view's pooled features and its present flag
            width += 2 * gru_hidden + 1
        self.head = nn.Sequential(nn.LayerNorm(width), nn.Dropout(dropout), nn.Linear(width, head_hidden),
                                  nn.GELU(), nn.Linear(head_hidden, n_classes))
        if bias_init is not None:
            # logits bias = log of the intended initial probabilities (e.g. the class prior); note
            # softmax([2.0, −2.5, −3.0]) = [0.982, 0.011, 0.007], not the prior the seed's comment claimed
            with torch.no_grad():
                self.head[-1].bias.copy_(torch.as_tensor(list(bias_init), dtype=torch.float32))

    def backbone_parameters(self):
        return self.backbone.parameters()

    def head_parameters(self):
        ids = {id(p) for p in self.backbone.parameters()}
        return [p for p in self.parameters() if id(p) not in ids]

    def encode(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, N, 3, H, W) → pooled features (B, 2·gru_hidden), attention over the N slices (B, N)."""
        b, n = images.shape[:2]
        feats = self.pool(self.backbone(images.flatten(0, 1))).flatten(1).view(b, n, -1)
        if feats.is_cuda:  # cuDNN wants the weights in one block; after a state dict is swapped in they may not be
            self.gru.flatten_parameters()
        seq, _ = self.gru(feats)
        return self.mil(seq)

    def forward(self, images: torch.Tensor, level: torch.Tensor, condition: torch.Tensor,
                second_images: torch.Tensor | None = None, second_present: torch.Tensor | None = None) -> dict:
        pooled, attention = self.encode(images)
        parts = [pooled]
        if self.second_view:
            present = (torch.zeros(len(pooled), device=pooled.device) if second_present is None or
                       second_images is None else second_present.to(pooled.device).float())
            second = torch.zeros_like(pooled)
            chosen = present > 0.5
            if bool(chosen.any()):  # encode only the samples that have a second view
                second_pooled, _ = self.encode(second_images[chosen])
                second = second.index_put((chosen.nonzero(as_tuple=True)[0],), second_pooled.to(second.dtype))
            parts += [second, present[:, None].to(pooled.dtype)]
        x = torch.cat([*parts, self.level_embedding(level).to(pooled.dtype),
                       self.condition_embedding(condition).to(pooled.dtype)], dim=1)
        return {"logits": self.head(x), "attention": attention}


# ---------------------------------------------------------------------------------------- stage 1
def _conv(cin: int, cout: int, slice_kernel: int, stride: int = 1) -> nn.Sequential:
    k = (slice_kernel, 3, 3)
    return nn.Sequential(nn.Conv3d(cin, cout, k, stride=(1, stride, stride), padding=(slice_kernel // 2, 1, 1),
                                   bias=False),
                         nn.BatchNorm3d(cout), nn.ReLU(inplace=True))


def coordinate_grid(shape: Sequence[int], device=None, dtype=torch.float32) -> torch.Tensor:
    """(3, D, H, W) normalized coordinates in [−1, 1] (CoordConv, Liu et al. 2018): position matters here
    (left vs right foramen, which level)."""
    axes = [torch.linspace(-1, 1, int(s), device=device, dtype=dtype) if s > 1 else
            torch.zeros(1, device=device, dtype=dtype) for s in shape]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"))


@register_model
class HeatmapLocalizer(nn.Module):
    """Anisotropic U-Net: (B, 1, D, H, W) → heatmap logits (B, P, D, ⌈H/2⌉, ⌈W/2⌉).

    A stride-2 stem, then ``len(channels) − 1`` in-plane poolings with in-plane (1×3×3) convolutions
    (slices are never pooled: thick-slice MR), a bottleneck whose convolutions also mix neighbouring
    slices (``slice_kernel``; which slice holds the foramen is a 3D question) and sees the whole spine
    (which level is which needs context), and a decoder with skip connections back to the stem
    resolution. Coordinate channels are concatenated to the input.
    """

    def __init__(self, n_points: int, channels: Sequence[int] = (8, 16, 32), slice_kernel: int = 3,
                 in_channels: int = 1):
        super().__init__()
        channels = [int(c) for c in channels]
        self.n_points = int(n_points)
        self.stem = nn.Sequential(_conv(in_channels + 3, channels[0], 1, stride=2), _conv(channels[0], channels[0], 1))
        self.down = nn.ModuleList()
        for cin, cout in zip(channels[:-2], channels[1:-1]):
            self.down.append(nn.Sequential(_conv(cin, cout, 1), _conv(cout, cout, 1)))
        self.bottleneck = nn.Sequential(_conv(channels[-2], channels[-1], slice_kernel),
                                        _conv(channels[-1], channels[-1], slice_kernel))
        self.up = nn.ModuleList()
        width = channels[-1]
        for skip in channels[:-1][::-1]:
            self.up.append(_conv(width + skip, skip, 1))
            width = skip
        self.head = nn.Conv3d(width, self.n_points, 1)

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        b = volume.shape[0]
        coords = coordinate_grid(volume.shape[2:], volume.device, volume.dtype).expand(b, -1, -1, -1, -1)
        x = self.stem(torch.cat([volume, coords], dim=1))
        skips = [x]
        for block in self.down:
            x = block(F.max_pool3d(x, (1, 2, 2), ceil_mode=True))
            skips.append(x)
        x = self.bottleneck(F.max_pool3d(x, (1, 2, 2), ceil_mode=True))
        for block, skip in zip(self.up, skips[::-1]):
            x = F.interpolate(x, size=skip.shape[2:], mode="trilinear", align_corners=False)
            x = block(torch.cat([x, skip], dim=1))
        return self.head(x)


def heatmap_targets(coords: torch.Tensor, shape: Sequence[int], sigma: Sequence[float]) -> torch.Tensor:
    """Normalized 3D Gaussians (B, P, D, H, W) centred at ``coords`` (B, P, 3) in output-grid voxels."""
    grid = [torch.arange(int(s), device=coords.device, dtype=torch.float32) for s in shape]
    out = 1.0
    for axis in range(3):
        g = grid[axis].view(*([1, 1] + [1] * axis + [-1] + [1] * (2 - axis)))
        c = coords[..., axis].view(coords.shape[0], coords.shape[1], 1, 1, 1)
        out = out * torch.exp(-0.5 * ((g - c) / float(sigma[axis])) ** 2)
    return out / out.flatten(2).sum(-1).clamp_min(1e-12).view(*out.shape[:2], 1, 1, 1)


def heatmap_loss(logits: torch.Tensor, coords: torch.Tensor, mask: torch.Tensor, sigma: Sequence[float],
                 coord_weight: float = 0.1) -> torch.Tensor:
    """Cross-entropy between the spatial softmax of each channel and its Gaussian target, plus
    ``coord_weight`` × the L1 distance (output voxels) between the softmax expectation and the target
    (DSNT, Nibali et al. 2018: a gradient towards the point from anywhere, which speeds early training).
    Averaged over the points present (``mask``); a graph-connected 0 when none is."""
    logp = torch.log_softmax(logits.float().flatten(2), dim=-1)
    target = heatmap_targets(coords, logits.shape[2:], sigma).flatten(2)
    per_point = -(target * logp).sum(-1)
    if coord_weight:
        prob = logp.exp().view(logits.shape)
        expected = []
        for axis in range(3):
            dims = [d for d in range(2, 5) if d != axis + 2]
            marginal = prob.sum(dim=dims)
            grid = torch.arange(marginal.shape[-1], device=logits.device, dtype=marginal.dtype)
            expected.append((marginal * grid).sum(-1))
        per_point = per_point + coord_weight * (torch.stack(expected, dim=-1) - coords).abs().sum(-1)
    mask = mask.to(per_point.dtype)
    return (per_point * mask).sum() / mask.sum().clamp_min(1.0) + 0.0 * logits.sum()


@torch.no_grad()
def decode_heatmaps(logits: torch.Tensor, window: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, P, D, H, W) → coordinates (B, P, 3) in output voxels and peak confidence (B, P).

    Soft-argmax restricted to a (2·window+1)³ box around the arg-max: sub-voxel, and immune to a second
    mode elsewhere (the other side's foramen) that a global soft-argmax would average in.
    """
    b, p, d, h, w = logits.shape
    prob = torch.softmax(logits.float().flatten(2), dim=-1).view(b, p, d, h, w)
    flat = prob.flatten(2).argmax(-1)
    peak = torch.stack([flat // (h * w), (flat // w) % h, flat % w], dim=-1)
    coords = torch.zeros(b, p, 3, dtype=torch.float32, device=logits.device)
    conf = torch.zeros(b, p, dtype=torch.float32, device=logits.device)
    for bi in range(b):
        for pi in range(p):
            lo = [max(int(peak[bi, pi, a]) - window, 0) for a in range(3)]
            hi = [min(int(peak[bi, pi, a]) + window + 1, s) for a, s in enumerate((d, h, w))]
            box = prob[bi, pi, lo[0]:hi[0], lo[1]:hi[1], lo[2]:hi[2]]
            total = box.sum().clamp_min(1e-12)
            grids = torch.meshgrid(*[torch.arange(lo[a], hi[a], dtype=torch.float32, device=logits.device)
                                     for a in range(3)], indexing="ij")
            coords[bi, pi] = torch.stack([(g * box).sum() / total for g in grids])
            conf[bi, pi] = total
    return coords, conf
