"""Multi-task losses of the ABR model (seed 003's weights and curriculum, with proper masking).

Every regression term is masked: peak latency/amplitude only where the wave exists (and the label is
known), the denoising term only where a clean trace exists, the threshold only where it is known. The
masked losses of common.losses return a graph-connected zero on an empty mask, never NaN.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from common.config import ConfigError
from common.losses import (
    UncertaintyWeighting,
    curriculum_weights,
    focal_loss,
    gaussian_nll,
    masked_huber,
    masked_mean,
    masked_mse,
    weighted_cross_entropy,
)

LOSS_NAMES = ("signal", "peak_exist", "peak_latency", "peak_amplitude", "classification", "threshold")
LOSS_KINDS = {"signal": "regression", "peak_exist": "classification", "peak_latency": "regression",
              "peak_amplitude": "regression", "classification": "classification", "threshold": "regression"}
THRESHOLD_UNIT_DB = 10.0  # threshold losses are computed in units of 10 dB


def loss_weights(loss_cfg: Mapping, epoch: float) -> dict[str, float]:
    """Weights at (fractional, 1-based) ``epoch``: constants from loss.weights, replaced per loss by a
    piecewise-linear curriculum from loss.curriculum where one is given."""
    schedules = {name: loss_cfg["weights"][name] for name in LOSS_NAMES}
    for name, points in (loss_cfg.get("curriculum") or {}).items():
        if name not in LOSS_NAMES:
            raise ConfigError(f"loss.curriculum: unknown loss '{name}' (known: {', '.join(LOSS_NAMES)})")
        schedules[name] = points
    return curriculum_weights(schedules, epoch)


def task_losses(out: Mapping[str, torch.Tensor], batch: Mapping[str, torch.Tensor], loss_cfg: Mapping,
                class_weights: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Unweighted losses of every task for one batch of ears."""
    level = batch["level_mask"]
    exist = batch["exist"]
    known = batch["exist_known"] & level[..., None]
    losses = {}
    losses["peak_exist"] = masked_mean(
        F.binary_cross_entropy_with_logits(out["exist_logit"].float(), exist.float(), reduction="none"), known)
    present = exist & known
    amp_mask = batch["amp_known"] & present
    if loss_cfg["regression"] == "nll":
        losses["peak_latency"] = gaussian_nll(out["latency_ms"].float(), out["latency_logvar"].float(),
                                              batch["latency_ms"], present)
        losses["peak_amplitude"] = gaussian_nll(out["amp_rel"].float(), out["amp_logvar"].float(),
                                                batch["amp_rel"], amp_mask)
    elif loss_cfg["regression"] == "huber":
        delta = float(loss_cfg["huber_delta"])
        losses["peak_latency"] = masked_huber(out["latency_ms"].float(), batch["latency_ms"], present, delta)
        losses["peak_amplitude"] = masked_huber(out["amp_rel"].float(), batch["amp_rel"], amp_mask, delta)
    else:
        raise ConfigError(f"loss.regression must be nll or huber, got {loss_cfg['regression']!r}")
    clean_mask = (batch["has_clean"] & level)[..., None]
    losses["signal"] = masked_mse(out["denoised"].float(), batch["clean"], clean_mask)

    target = batch["class_idx"]
    if loss_cfg["classification"] == "focal":
        losses["classification"] = focal_loss(out["class_logits"].float(), target, gamma=float(loss_cfg["focal_gamma"]),
                                              alpha=class_weights)
    elif loss_cfg["classification"] == "weighted_ce":
        losses["classification"] = weighted_cross_entropy(out["class_logits"].float(), target, class_weights)
    else:
        raise ConfigError(f"loss.classification must be focal or weighted_ce, got {loss_cfg['classification']!r}")

    thr_known = batch["threshold_known"]
    true = batch["threshold_db"] / THRESHOLD_UNIT_DB
    final = out["threshold_db"].float() / THRESHOLD_UNIT_DB
    delta = float(loss_cfg["huber_delta"])
    threshold = masked_huber(final, true, thr_known, delta)
    threshold = threshold + float(loss_cfg["threshold_aux_weight"]) * (
        masked_huber(out["threshold_local_db"].float() / THRESHOLD_UNIT_DB, true, thr_known, delta)
        + masked_huber(out["threshold_global_db"].float() / THRESHOLD_UNIT_DB, true, thr_known, delta))
    threshold = threshold + float(loss_cfg["threshold_nll_weight"]) * gaussian_nll(
        final.detach(), out["threshold_logvar"].float(), true, thr_known)
    outlier_target = ((final.detach() - true).abs() * THRESHOLD_UNIT_DB > 10.0).float()
    threshold = threshold + float(loss_cfg["outlier_weight"]) * masked_mean(
        F.binary_cross_entropy_with_logits(out["outlier_logit"].float(), outlier_target, reduction="none"), thr_known)
    losses["threshold"] = threshold
    return losses


def combine_losses(losses: Mapping[str, torch.Tensor], weights: Mapping[str, float],
                   uncertainty: UncertaintyWeighting | None = None) -> torch.Tensor:
    """Σ w_i·L_i, or with learned uncertainty weighting Kendall's sum over the tasks whose curriculum
    weight is currently > 0 (the curriculum still switches tasks on and off)."""
    if uncertainty is not None:
        active = {name: loss * min(weights[name], 1.0) for name, loss in losses.items() if weights[name] > 0}
        if active:
            return uncertainty(active)
    total = None
    for name, loss in losses.items():
        term = weights[name] * loss
        total = term if total is None else total + term
    return total
