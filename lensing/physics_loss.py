"""Physics-informed loss: predicted lens model → differentiable simulator → χ² against the observed image.

For each cutout the parameter head predicts an SIE + shear mass, a Sérsic source and a Sérsic lens light
(:func:`lensing.models.parameter_spec`). They are rendered at the cutout's pixel scale with its per-band
Gaussian PSF, and compared with the image through its variance map:

    χ²_red = Σ_pixels (image − model)² / variance / N_valid      (masked pixels have variance = +inf)
    L_phys = w · min(1, epoch / warmup_epochs) · mean_batch(g · χ²_red)

with the gate g = sigmoid(logit).detach() ("probability": the classifier decides where the lens model is
asked to explain the image, without the physics term pushing the classifier) or g = [label == 1]
("label"). The original system only planned this loss, with a version that returned 0 whenever something
raised; here a non-finite χ² raises FloatingPointError naming the offending samples.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lensing.psf import GaussianPSF
from lensing.simulator import render

N_MASS_PARAMS = 7  # theta_E, e1, e2, center_x, center_y, gamma1, gamma2 (the catalogue's true_* columns)


def params_from_prediction(params: torch.Tensor, noise_sigma: torch.Tensor, pixel_scale: torch.Tensor) -> dict:
    """Physical prediction [B, 19 + 2C] → simulator parameter dict.

    amp = 10^(log10_sb) · σ_band / Δ² (surface brightness at R_sersic whose pixel value is 10^v σ).
    """
    b, c = noise_sigma.shape
    p = params
    expected = 19 + 2 * c
    if p.shape != (b, expected):
        raise ValueError(f"predicted parameters must be [B, {expected}] for {c} band(s), got {list(p.shape)}")
    per_pixel_area = noise_sigma / pixel_scale.reshape(-1, 1) ** 2
    src_amp = torch.pow(10.0, p[:, 19:19 + c]) * per_pixel_area
    light_amp = torch.pow(10.0, p[:, 19 + c:19 + 2 * c]) * per_pixel_area
    return {
        "lens": {"theta_E": p[:, 0], "e1": p[:, 1], "e2": p[:, 2], "center_x": p[:, 3], "center_y": p[:, 4]},
        "shear": {"gamma1": p[:, 5], "gamma2": p[:, 6]},
        "source": {"amp": src_amp, "R_sersic": p[:, 7], "n_sersic": p[:, 8], "e1": p[:, 9], "e2": p[:, 10],
                   "center_x": p[:, 11], "center_y": p[:, 12]},
        "lens_light": {"amp": light_amp, "R_sersic": p[:, 13], "n_sersic": p[:, 14], "e1": p[:, 15],
                       "e2": p[:, 16], "center_x": p[:, 17], "center_y": p[:, 18]},
    }


def reduced_chi2(model: torch.Tensor, image: torch.Tensor, variance: torch.Tensor) -> torch.Tensor:
    """Σ (image − model)²/variance over finite-variance pixels, divided by their number → [B]."""
    valid = torch.isfinite(variance) & (variance > 0)
    weight = torch.where(valid, 1.0 / torch.where(valid, variance, torch.ones_like(variance)),
                         torch.zeros_like(variance))
    residual2 = (image - model) ** 2 * weight
    n_valid = valid.flatten(1).sum(dim=1).clamp(min=1)
    return residual2.flatten(1).sum(dim=1) / n_valid


def render_prediction(params: torch.Tensor, batch: Mapping, supersampling: int = 1) -> torch.Tensor:
    """Render predicted parameters for a batch (float32, outside autocast)."""
    image = batch["image"]
    sim = params_from_prediction(params.float(), batch["noise_sigma"].float(), batch["pixel_scale"].float())
    psf = GaussianPSF(batch["psf_fwhm"].float())
    return render(sim, image.shape[-1], batch["pixel_scale"].float(), psf, supersampling=supersampling)


class PhysicsInformedLoss:
    """Callable physics term (see the module docstring). ``weight`` 0 turns it off."""

    def __init__(self, weight: float = 0.0, warmup_epochs: int = 0, gate: str = "probability",
                 supersampling: int = 1, param_supervision_weight: float = 0.0):
        if gate not in ("probability", "label"):
            raise ValueError(f"physics.gate must be 'probability' or 'label', got {gate!r}")
        self.weight = float(weight)
        self.warmup_epochs = int(warmup_epochs)
        self.gate = gate
        self.supersampling = int(supersampling)
        self.param_supervision_weight = float(param_supervision_weight)

    @property
    def active(self) -> bool:
        return self.weight > 0 or self.param_supervision_weight > 0

    def curriculum(self, epoch: float) -> float:
        """min(1, epoch / warmup_epochs); 1 when there is no warm-up."""
        return 1.0 if self.warmup_epochs <= 0 else min(1.0, float(epoch) / self.warmup_epochs)

    def gate_weights(self, logit: torch.Tensor, label: torch.Tensor) -> torch.Tensor:
        if self.gate == "probability":
            return torch.sigmoid(logit.detach().float())
        return (label == 1).float()

    def __call__(self, outputs: Mapping, batch: Mapping, epoch: float) -> tuple[torch.Tensor, dict]:
        """Returns (loss, stats) with stats {physics_chi2 (gated mean χ²_red), param_loss, physics_weight}."""
        if "params" not in outputs:
            raise KeyError("the physics-informed loss needs a model with a parameter head "
                           "(lensing.models.LensParameterResNet)")
        params = outputs["params"]
        device = params.device
        total = params.new_zeros(())
        stats: dict = {"physics_weight": self.weight * self.curriculum(epoch)}
        if self.weight > 0:
            with torch.autocast(device_type=device.type, enabled=False):
                model = render_prediction(params, batch, self.supersampling)
                chi2 = reduced_chi2(model, batch["image"].float(), batch["variance"].float())
            bad = ~torch.isfinite(chi2)
            if bool(bad.any()):
                rows = torch.nonzero(bad).flatten().tolist()[:5]
                raise FloatingPointError(
                    f"physics loss: non-finite chi2 for batch rows {rows} (dataset indices "
                    f"{batch['index'][rows].tolist() if 'index' in batch else '?'}); predicted parameters "
                    f"{params[rows[0]].detach().cpu().tolist()}")
            gate = self.gate_weights(outputs["logit"], batch["label"].to(device))
            total = total + stats["physics_weight"] * (gate * chi2).mean()
            stats["physics_chi2"] = float((gate * chi2.detach()).sum() / gate.sum().clamp(min=1e-6))
        if self.param_supervision_weight > 0 and "true_params" in batch:
            stats["param_loss"] = 0.0
            truth = batch["true_params"].to(device).float()
            label = batch["label"].to(device)
            unit = outputs["params_unit"][:, :N_MASS_PARAMS]
            low, high = (params.new_tensor(v) for v in _mass_bounds())
            target = ((truth - low) / (high - low)).clamp(0, 1)  # truth in the head's [0, 1] units
            rows = (label == 1) & torch.isfinite(truth).all(dim=1)
            if bool(rows.any()):
                param_loss = ((unit[rows] - target[rows]) ** 2).mean()
                total = total + self.param_supervision_weight * param_loss
                stats["param_loss"] = float(param_loss.detach())
            else:  # no simulated lens in this batch: keep the head in the graph (DDP expects every parameter)
                total = total + 0.0 * unit.sum()
        return total, stats


def _mass_bounds() -> tuple[list[float], list[float]]:
    from lensing.models import parameter_spec

    spec = parameter_spec(1)[:N_MASS_PARAMS]
    return [lo for _, lo, _ in spec], [hi for _, _, hi in spec]
