"""Lens finders: a DeepLens-style pre-activated ResNet, optionally with a bounded lens-parameter head.

CMU DeepLens (Lanusse et al. 2018, MNRAS 473, 3895; the Bologna challenge's best space entry): a
residual network of pre-activation units (He et al. 2016, "Identity mappings in deep residual networks":
BN → ELU → conv, twice, plus the identity or a strided 1×1 projection), ELU activations, global average
pooling and one logit. Widths, blocks per stage, bands and input size are configurable.

``LensParameterResNet`` adds a head predicting the lens model used by the physics-informed loss, each
output squashed into its physical range by a sigmoid: low + (high − low)·σ(z) (bounded, so the simulator
never sees a negative Einstein radius or |e| ≥ 1). Both models return a dict: ``logit`` [B] and, for the
parameter model, ``params`` [B, P] in physical units plus ``params_unit`` [B, P] in [0, 1].
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F
from common.checkpoint import register_model


def parameter_spec(n_bands: int) -> list[tuple[str, float, float]]:
    """(name, low, high) of every predicted parameter; lens mass first (the supervised ``true_*`` order).

    Surface brightnesses are log10 of the Sérsic amp at R_sersic in units of the band's background σ per
    pixel (so they are independent of the survey's zero point).
    """
    spec = [("theta_E", 0.05, 3.0), ("lens_e1", -0.5, 0.5), ("lens_e2", -0.5, 0.5), ("lens_center_x", -0.6, 0.6),
            ("lens_center_y", -0.6, 0.6), ("gamma1", -0.2, 0.2), ("gamma2", -0.2, 0.2),
            ("source_R_sersic", 0.03, 1.0), ("source_n_sersic", 0.5, 4.0), ("source_e1", -0.5, 0.5),
            ("source_e2", -0.5, 0.5), ("source_center_x", -2.0, 2.0), ("source_center_y", -2.0, 2.0),
            ("light_R_sersic", 0.05, 3.0), ("light_n_sersic", 0.5, 8.0), ("light_e1", -0.5, 0.5),
            ("light_e2", -0.5, 0.5), ("light_center_x", -0.6, 0.6), ("light_center_y", -0.6, 0.6)]
    spec += [(f"source_log10_sb_{b}", -2.0, 3.0) for b in range(n_bands)]
    spec += [(f"light_log10_sb_{b}", -2.0, 4.0) for b in range(n_bands)]
    return spec


class PreActBlock(nn.Module):
    """BN-ELU-conv3×3-BN-ELU-conv3×3 with an identity (or strided 1×1) shortcut taken after the first
    activation when the shape changes (He et al. 2016, fig. 4e)."""

    def __init__(self, in_ch: int, out_ch: int, stride: int = 1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_ch)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_ch)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1, bias=False)
        self.shortcut = None
        if stride != 1 or in_ch != out_ch:
            self.shortcut = nn.Conv2d(in_ch, out_ch, 1, stride=stride, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        pre = F.elu(self.bn1(x))
        skip = x if self.shortcut is None else self.shortcut(pre)
        out = self.conv1(pre)
        out = self.conv2(F.elu(self.bn2(out)))
        return out + skip


@register_model
class DeepLensResNet(nn.Module):
    """Pre-activated ResNet lens classifier (CMU DeepLens style).

    Args:
        in_bands: input channels (bands); a different count at run time is an error naming both.
        image_size: the cutout size (pixels) the model was trained on; recorded, not enforced: the network
            (convolutions + global average pooling) takes any H×W ≥ 1, and the data loader's crop/pad policy
            (``data.size_policy``) decides what reaches it.
        widths: channels per stage; every stage after the first halves the resolution.
        blocks_per_stage: residual blocks per stage.
        dropout: dropout before the logit (> 0 enables MC dropout).
        stem_kernel: kernel of the first convolution (DeepLens uses 7).
    """

    def __init__(self, in_bands: int = 1, image_size: int = 64, widths: list[int] | tuple[int, ...] = (16, 32, 64),
                 blocks_per_stage: list[int] | tuple[int, ...] = (1, 1, 1), dropout: float = 0.0,
                 stem_kernel: int = 7):
        super().__init__()
        if len(widths) != len(blocks_per_stage):
            raise ValueError(f"widths {list(widths)} and blocks_per_stage {list(blocks_per_stage)} differ in length")
        self.in_bands, self.image_size = int(in_bands), int(image_size)
        self.stem = nn.Conv2d(in_bands, widths[0], stem_kernel, padding=stem_kernel // 2, bias=False)
        blocks: list[nn.Module] = []
        channels = widths[0]
        for stage, (width, n_blocks) in enumerate(zip(widths, blocks_per_stage)):
            for i in range(n_blocks):
                stride = 2 if (stage > 0 and i == 0) else 1
                blocks.append(PreActBlock(channels, width, stride))
                channels = width
        self.blocks = nn.Sequential(*blocks)
        self.final_bn = nn.BatchNorm2d(channels)
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Linear(channels, 1)
        self.n_features = channels

    def check_input(self, x: torch.Tensor) -> None:
        if x.ndim != 4 or x.shape[1] != self.in_bands:
            raise ValueError(f"model expects input [B, {self.in_bands}, H, W], got {list(x.shape)}")

    def features(self, x: torch.Tensor) -> torch.Tensor:
        self.check_input(x)
        h = self.blocks(self.stem(x))
        h = F.elu(self.final_bn(h))
        return h.mean(dim=(-2, -1))

    def forward(self, x: torch.Tensor) -> dict:
        return {"logit": self.classifier(self.dropout(self.features(x))).squeeze(-1)}


@register_model
class LensParameterResNet(DeepLensResNet):
    """DeepLens ResNet + a bounded lens-model regression head (for the physics-informed loss)."""

    def __init__(self, in_bands: int = 1, image_size: int = 64, widths=(16, 32, 64), blocks_per_stage=(1, 1, 1),
                 dropout: float = 0.0, stem_kernel: int = 7, head_hidden: int = 128):
        super().__init__(in_bands, image_size, widths, blocks_per_stage, dropout, stem_kernel)
        spec = parameter_spec(in_bands)
        self.param_names = [name for name, _, _ in spec]
        self.register_buffer("param_low", torch.tensor([lo for _, lo, _ in spec]), persistent=False)
        self.register_buffer("param_high", torch.tensor([hi for _, _, hi in spec]), persistent=False)
        self.param_head = nn.Sequential(nn.Linear(self.n_features, head_hidden), nn.ELU(),
                                        nn.Linear(head_hidden, len(spec)))

    def forward(self, x: torch.Tensor) -> dict:
        h = self.features(x)
        unit = torch.sigmoid(self.param_head(h).float())
        params = self.param_low + (self.param_high - self.param_low) * unit
        return {"logit": self.classifier(self.dropout(h)).squeeze(-1), "params": params, "params_unit": unit}
