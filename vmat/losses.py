"""Dose-prediction losses. Predictions and targets are dose / Rx, shape (B, 1, z, y, x).

- voxel L1 / MSE, optionally inside the possible-dose (body) mask (common.losses masked losses);
- :class:`GradientLoss3D` — L1 between 3×3×3 Sobel gradient fields (edges and falloffs; seed weight 0.1);
- :class:`VGGPerceptualLoss2D` — frozen ImageNet VGG16 relu1_2/relu2_2/relu3_3 features on every k-th
  axial slice (seed weight 0.001). It needs the ImageNet weights: a local file or torchvision's cache /
  download. Without them it raises; it never runs on random features;
- :class:`DVHAwareLoss` — |DVH metric(pred) − DVH metric(ref)| for targets (D_x by exact sort-based
  quantiles) and OARs (sigmoid-soft V_x and mean dose), plus hinge penalties on constraint violations
  from the constraint table (limits in Gy are divided by the case's Rx);
- :class:`StructureWeightedMSE` — weights 2.0 in targets, 1.5 within ±band_mm of OAR surfaces (the SDF
  channels are rescaled to mm first: the original compared a scaled SDF with a mm threshold), 0.5
  elsewhere in the body;
- :class:`AsymmetricPTVLoss` — squared error in targets with underdose weighted more than overdose;
- :class:`DoseLoss` — the configured sum, optionally with Kendall uncertainty weighting (common.losses).
  Every term leaves out voxels where the reference dose is unknown (``batch["valid"]``, the NPZ's
  ``dose_valid_mask``: outside the RTDOSE grid), so they never teach the model "0 Gy".
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.losses import UncertaintyWeighting, masked_l1, masked_mean, masked_mse

LOSS_DEFAULTS = {
    "base": "l1",  # l1 | mse: voxel loss on dose / Rx
    "in_possible_dose_mask": True,  # voxel loss only inside the body (possible-dose mask)
    "base_weight": 1.0,
    "gradient_weight": 0.0,  # GradientLoss3D (seed: 0.1)
    "vgg_weight": 0.0,  # VGGPerceptualLoss2D (seed: 0.001); needs ImageNet weights
    "vgg_weights_path": None,  # local VGG16 state dict; else torchvision's cache / download
    "vgg_slice_stride": 8,
    "dvh_weight": 0.0,  # DVHAwareLoss
    "dvh_percentiles": [95.0, 98.0, 2.0],  # target D_x% matched to the reference
    "dvh_penalty_weight": 1.0,  # weight of constraint-violation hinges inside DVHAwareLoss
    "dvh_softness_rx": 0.02,  # sigmoid width for soft V_x, as a fraction of Rx
    "structure_weighted": False,  # replace the base voxel loss by StructureWeightedMSE
    "sw_ptv_weight": 2.0,
    "sw_oar_boundary_weight": 1.5,
    "sw_elsewhere_weight": 0.5,
    "sw_boundary_mm": 5.0,  # +-band around OAR surfaces, in mm
    "asymmetric_ptv_weight": 0.0,  # AsymmetricPTVLoss
    "asym_under_weight": 3.0,
    "asym_over_weight": 1.0,
    "uncertainty_weighting": False,  # learn the term weights (Kendall et al. 2018)
}


# --------------------------------------------------------------------------------------------- gradient
def sobel_kernels(device=None, dtype=torch.float32) -> torch.Tensor:
    """(3, 1, 3, 3, 3) Sobel kernels for d/dz, d/dy, d/dx, normalized so a ramp of slope a gives a:
    central difference [−1, 0, 1]/2 along the axis, smoothing [1, 2, 1]/4 along the two others."""
    diff = torch.tensor([-1.0, 0.0, 1.0], dtype=dtype, device=device) / 2
    smooth = torch.tensor([1.0, 2.0, 1.0], dtype=dtype, device=device) / 4
    kz = diff[:, None, None] * smooth[None, :, None] * smooth[None, None, :]
    ky = smooth[:, None, None] * diff[None, :, None] * smooth[None, None, :]
    kx = smooth[:, None, None] * smooth[None, :, None] * diff[None, None, :]
    return torch.stack([kz, ky, kx])[:, None]


def sobel_gradient(volume: torch.Tensor) -> torch.Tensor:
    """(B, 1, z, y, x) → (B, 3, z−2, y−2, x−2) gradient per voxel (valid convolution, no padding edge)."""
    return F.conv3d(volume, sobel_kernels(volume.device, volume.dtype))


class GradientLoss3D(nn.Module):
    """mean |∇pred − ∇target| over the three Sobel components (inside ``mask`` when given)."""

    def forward(self, pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        diff = (sobel_gradient(pred) - sobel_gradient(target)).abs()
        if mask is not None:
            mask = mask[:, :, 1:-1, 1:-1, 1:-1].expand_as(diff)
        return masked_mean(diff, mask)


# -------------------------------------------------------------------------------------------------- VGG
class VGGPerceptualLoss2D(nn.Module):
    """L1 between frozen VGG16 features (relu1_2, relu2_2, relu3_3) of every ``slice_stride``-th axial slice.

    Doses / Rx are mapped to [0, 1] (÷ ``dose_max``), repeated to RGB and ImageNet-normalized.
    ``weights_path``: a state dict of torchvision's vgg16 (full, or its ``features`` up to relu3_3). Without
    a path, torchvision's ImageNet weights are taken from its cache or downloaded; if neither works this
    raises a RuntimeError that says so (no silent random features).
    """

    LAYERS = (3, 8, 15)  # indices of relu1_2, relu2_2, relu3_3 in vgg16.features

    def __init__(self, weights_path: str | Path | None = None, slice_stride: int = 8, dose_max: float = 1.2,
                 allow_download: bool = True):
        super().__init__()
        state = self._load_state(weights_path, allow_download)
        features = vgg16_features_to_relu3_3()
        own = {k[len("features."):] if k.startswith("features.") else k: v for k, v in state.items()}
        own = {k: v for k, v in own.items() if k in features.state_dict()}
        missing = set(features.state_dict()) - set(own)
        if missing:
            raise RuntimeError(f"VGG16 weights {weights_path or 'from torchvision'} lack {sorted(missing)}")
        features.load_state_dict(own)
        for p in features.parameters():
            p.requires_grad_(False)
        self.features = features.eval()
        self.slice_stride = int(slice_stride)
        self.dose_max = float(dose_max)
        self.register_buffer("mean", torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1), persistent=False)

    @staticmethod
    def _load_state(weights_path, allow_download: bool) -> dict:
        if weights_path is not None:
            path = Path(weights_path)
            if not path.is_file():
                raise RuntimeError(f"VGG16 weights file not found: {path}")
            return torch.load(path, map_location="cpu", weights_only=True)
        from torchvision.models import VGG16_Weights

        try:
            return VGG16_Weights.IMAGENET1K_V1.get_state_dict(progress=False, check_hash=False) if allow_download \
                else _cached_vgg_state()
        except Exception as exc:
            raise RuntimeError(
                "VGGPerceptualLoss2D needs ImageNet VGG16 weights: none in torchvision's cache and the download "
                f"failed ({type(exc).__name__}: {str(exc)[:200]}). Set loss.vgg_weights_path to a local "
                "vgg16 state dict or set loss.vgg_weight: 0 (random VGG features would be meaningless).") from exc

    def train(self, mode: bool = True):
        super().train(mode)
        self.features.eval()  # frozen
        return self

    def _feats(self, image: torch.Tensor) -> list[torch.Tensor]:
        x = (image.clamp(0, self.dose_max) / self.dose_max).repeat(1, 3, 1, 1)
        x = (x - self.mean) / self.std
        out = []
        for i, layer in enumerate(self.features):
            x = layer(x)
            if i in self.LAYERS:
                out.append(x)
        return out

    def forward(self, pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        idx = torch.arange(0, pred.shape[2], self.slice_stride, device=pred.device)
        p = pred.index_select(2, idx).transpose(1, 2).flatten(0, 1)  # (B·n, 1, y, x)
        t = target.index_select(2, idx).transpose(1, 2).flatten(0, 1)
        return sum(F.l1_loss(a, b) for a, b in zip(self._feats(p), self._feats(t)))


def vgg16_features_to_relu3_3() -> nn.Sequential:
    """torchvision's vgg16().features[:16] (same layer indices and parameter names), built without the
    138 M-parameter classifier."""
    layers: list[nn.Module] = []
    width = 3
    for item in (64, 64, "M", 128, 128, "M", 256, 256, 256):
        if item == "M":
            layers.append(nn.MaxPool2d(2, 2))
        else:
            layers += [nn.Conv2d(width, item, 3, padding=1), nn.ReLU(inplace=False)]
            width = item
    return nn.Sequential(*layers)


def _cached_vgg_state() -> dict:
    from torch.hub import get_dir

    path = Path(get_dir()) / "checkpoints" / "vgg16-397923af.pth"
    if not path.is_file():
        raise FileNotFoundError(f"{path} not present")
    return torch.load(path, map_location="cpu", weights_only=True)


# -------------------------------------------------------------------------------------------------- DVH
def soft_volume_at(dose: torch.Tensor, threshold: float, softness: float) -> torch.Tensor:
    """Differentiable V_x: mean over voxels of sigmoid((dose − x) / softness) (fraction, not %)."""
    return torch.sigmoid((dose - threshold) / softness).mean()


def dose_at_percent(dose: torch.Tensor, percent: float) -> torch.Tensor:
    """D_x%: the (100 − x) % quantile of the voxel doses (sort-based; gradient reaches those voxels)."""
    return torch.quantile(dose, 1.0 - percent / 100.0)


_VGY = re.compile(r"^V(\d+(?:\.\d+)?)Gy$")


class DVHAwareLoss(nn.Module):
    """Mean over samples and structures of DVH-metric errors (relative to Rx) plus constraint hinges.

    Args:
        structure_names: mask channel order; ``target_doses_gy``: which are targets (and their doses);
        constraints: table of vmat.dvh (V_xGy "<" limits on OARs become hinge penalties);
        percentiles: target D_x% matched to the reference.
    """

    def __init__(self, structure_names: Sequence[str], target_doses_gy: Mapping[str, float],
                 constraints: Sequence[Mapping] = (), percentiles: Sequence[float] = (95.0, 98.0, 2.0),
                 softness: float = 0.02, penalty_weight: float = 1.0, min_voxels: int = 10):
        super().__init__()
        self.names = list(structure_names)
        self.targets = {n: float(d) for n, d in target_doses_gy.items() if n in self.names}
        self.percentiles = [float(p) for p in percentiles]
        self.softness = float(softness)
        self.penalty_weight = float(penalty_weight)
        self.min_voxels = int(min_voxels)
        self.oar_limits: dict[str, list[tuple[float, float]]] = {}
        for rule in constraints:
            match = _VGY.match(str(rule.get("metric", "")))
            if match and rule.get("op") in ("<", "<=") and rule["structure"] in self.names \
                    and rule["structure"] not in self.targets:
                self.oar_limits.setdefault(rule["structure"], []).append((float(match.group(1)), float(rule["value"]) / 100))

    def forward(self, pred: torch.Tensor, target: torch.Tensor, masks: torch.Tensor, rx_gy: torch.Tensor) -> torch.Tensor:
        terms = []
        for b in range(pred.shape[0]):
            rx = float(rx_gy[b])
            for c, name in enumerate(self.names):
                m = masks[b, c] > 0.5
                if int(m.sum()) < self.min_voxels:
                    continue
                p, t = pred[b, 0][m], target[b, 0][m]
                if name in self.targets:
                    for q in self.percentiles:
                        terms.append((dose_at_percent(p, q) - dose_at_percent(t, q)).abs())
                    terms.append((p.mean() - t.mean()).abs())
                else:
                    terms.append((p.mean() - t.mean()).abs())
                    for dose_gy, limit in self.oar_limits.get(name, []):
                        x = dose_gy / rx
                        v_pred = soft_volume_at(p, x, self.softness)
                        terms.append((v_pred - soft_volume_at(t, x, self.softness)).abs())
                        terms.append(self.penalty_weight * F.relu(v_pred - limit))
        if not terms:
            return pred.sum() * 0.0  # connected to the graph (DDP/AMP see every parameter)
        return torch.stack(terms).mean()


# ---------------------------------------------------------------------------------- weighted / asymmetric
class StructureWeightedMSE(nn.Module):
    """Weighted MSE: ``ptv_weight`` in targets, ``oar_boundary_weight`` where |SDF| ≤ ``boundary_mm`` of
    any OAR, ``elsewhere_weight`` in the rest of the body (weights normalized by their sum)."""

    def __init__(self, structure_names: Sequence[str], target_names: Sequence[str], sdf_clip_mm: float,
                 ptv_weight: float = 2.0, oar_boundary_weight: float = 1.5, elsewhere_weight: float = 0.5,
                 boundary_mm: float = 5.0):
        super().__init__()
        self.target_idx = [i for i, n in enumerate(structure_names) if n in set(target_names)]
        self.oar_idx = [i for i, n in enumerate(structure_names) if n not in set(target_names)]
        self.sdf_clip_mm = float(sdf_clip_mm)
        self.weights = (float(ptv_weight), float(oar_boundary_weight), float(elsewhere_weight))
        self.boundary_mm = float(boundary_mm)

    def weight_map(self, masks: torch.Tensor, sdf_scaled: torch.Tensor, body: torch.Tensor) -> torch.Tensor:
        ptv_w, oar_w, rest_w = self.weights
        weights = body * rest_w
        if self.oar_idx:
            sdf_mm = sdf_scaled[:, self.oar_idx] * self.sdf_clip_mm  # scaled SDF → mm before comparing with mm
            present = masks[:, self.oar_idx].flatten(2).amax(2)[:, :, None, None, None] > 0
            near = ((sdf_mm.abs() <= self.boundary_mm) & present).any(dim=1, keepdim=True)
            weights = torch.where(near & (body > 0), torch.full_like(weights, oar_w), weights)
        if self.target_idx:
            inside = (masks[:, self.target_idx] > 0.5).any(dim=1, keepdim=True)
            weights = torch.where(inside, torch.full_like(weights, ptv_w), weights)
        return weights

    def forward(self, pred, target, masks, sdf_scaled, body) -> torch.Tensor:
        return masked_mean((pred - target) ** 2, self.weight_map(masks, sdf_scaled, body))


class AsymmetricPTVLoss(nn.Module):
    """Mean over target voxels of w·(pred − target)², w = ``under_weight`` where pred < target."""

    def __init__(self, target_idx: Sequence[int], under_weight: float = 3.0, over_weight: float = 1.0):
        super().__init__()
        self.target_idx = list(target_idx)
        self.under, self.over = float(under_weight), float(over_weight)

    def forward(self, pred, target, masks) -> torch.Tensor:
        if not self.target_idx:
            return pred.sum() * 0.0
        inside = (masks[:, self.target_idx] > 0.5).any(dim=1, keepdim=True)
        err = pred - target
        w = torch.where(err < 0, torch.full_like(err, self.under), torch.full_like(err, self.over))
        return masked_mean(w * err**2, inside)


# ------------------------------------------------------------------------------------------- combination
class DoseLoss(nn.Module):
    """The configured loss terms; ``forward(pred, batch)`` → (total, {term: value})."""

    def __init__(self, cfg: Mapping, spec: Mapping, constraints: Sequence[Mapping] = ()):
        super().__init__()
        self.cfg = dict(cfg)
        names = spec["structure_names"]
        targets = spec["target_doses_gy"]
        self.n_struct = len(names)
        self.terms: dict[str, float] = {}
        if cfg["structure_weighted"]:
            self.sw = StructureWeightedMSE(names, list(targets), spec["sdf_clip_mm"], cfg["sw_ptv_weight"],
                                           cfg["sw_oar_boundary_weight"], cfg["sw_elsewhere_weight"], cfg["sw_boundary_mm"])
        self.terms["base"] = float(cfg["base_weight"])
        if cfg["gradient_weight"] > 0:
            self.gradient = GradientLoss3D()
            self.terms["gradient"] = float(cfg["gradient_weight"])
        if cfg["vgg_weight"] > 0:
            self.vgg = VGGPerceptualLoss2D(cfg["vgg_weights_path"], int(cfg["vgg_slice_stride"]))
            self.terms["vgg"] = float(cfg["vgg_weight"])
        if cfg["dvh_weight"] > 0:
            self.dvh = DVHAwareLoss(names, targets, constraints, cfg["dvh_percentiles"], cfg["dvh_softness_rx"],
                                    cfg["dvh_penalty_weight"])
            self.terms["dvh"] = float(cfg["dvh_weight"])
        if cfg["asymmetric_ptv_weight"] > 0:
            self.asym = AsymmetricPTVLoss([i for i, n in enumerate(names) if n in targets], cfg["asym_under_weight"],
                                          cfg["asym_over_weight"])
            self.terms["asymmetric_ptv"] = float(cfg["asymmetric_ptv_weight"])
        self.weighting = UncertaintyWeighting({k: "regression" for k in self.terms}) \
            if cfg["uncertainty_weighting"] else None

    def forward(self, pred: torch.Tensor, batch: Mapping) -> tuple[torch.Tensor, dict]:
        target, body, masks = batch["target"], batch["body"], batch["masks"]
        # Voxels outside the reference RTDOSE grid have no reference dose (NPZ dose_valid_mask): no term sees them.
        known = batch.get("valid")
        if known is not None:
            body = body * known
            masks = masks * known
        mask = body if self.cfg["in_possible_dose_mask"] else known
        values = {}
        if self.cfg["structure_weighted"]:
            values["base"] = self.sw(pred, target, masks, batch["input"][:, 1:1 + self.n_struct], body)
        elif self.cfg["base"] == "mse":
            values["base"] = masked_mse(pred, target, mask)
        else:
            values["base"] = masked_l1(pred, target, mask)
        if "gradient" in self.terms:
            values["gradient"] = self.gradient(pred, target, mask)
        if "vgg" in self.terms:
            values["vgg"] = self.vgg(pred, target)
        if "dvh" in self.terms:
            values["dvh"] = self.dvh(pred, target, masks, batch["rx_gy"])
        if "asymmetric_ptv" in self.terms:
            values["asymmetric_ptv"] = self.asym(pred, target, masks)
        if self.weighting is not None:
            total = self.weighting(values)
        else:
            total = sum(self.terms[k] * v for k, v in values.items())
        return total, {k: float(v.detach()) for k, v in values.items()}
