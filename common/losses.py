"""Loss functions shared by the domains: weighted CE, focal, masked Gaussian NLL / L1 / Huber / MSE,
Kendall uncertainty weighting, and piecewise-linear curriculum schedules.

Masked losses average over the voxels/samples where ``mask`` is true. When the mask is empty they return
a zero that is still connected to the graph (so DDP and AMP see every parameter), never NaN.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def masked_mean(values: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean of ``values`` over ``mask`` (bool or weights, broadcast to values' shape).

    Values outside the mask never contribute, even when NaN; an empty mask gives a graph-connected 0.
    """
    if mask is None:
        return values.mean()
    weights = mask.to(values.dtype).expand_as(values)
    inside = torch.where(weights > 0, values, torch.zeros_like(values))
    return (inside * weights).sum() / weights.sum().clamp_min(torch.finfo(values.dtype).tiny)


def masked_l1(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return masked_mean((pred - target).abs(), mask)


def masked_mse(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    return masked_mean((pred - target) ** 2, mask)


def masked_huber(pred: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None,
                 delta: float = 1.0) -> torch.Tensor:
    """Huber: 0.5 e² for |e| ≤ δ, δ(|e| − 0.5δ) beyond (torch.nn.functional.huber_loss)."""
    return masked_mean(F.huber_loss(pred, target, reduction="none", delta=delta), mask)


def gaussian_nll(mean: torch.Tensor, log_var: torch.Tensor, target: torch.Tensor,
                 mask: torch.Tensor | None = None, full: bool = False,
                 log_var_range: tuple[float, float] = (-20.0, 20.0)) -> torch.Tensor:
    """Heteroscedastic Gaussian negative log-likelihood, 0.5·[log σ² + (y − μ)²/σ²] (+ 0.5·log 2π if full).

    ``log_var`` is clamped to ``log_var_range`` for numerical safety (Kendall & Gal 2017).
    """
    log_var = log_var.clamp(*log_var_range)
    nll = 0.5 * (log_var + (target - mean) ** 2 * torch.exp(-log_var))
    if full:
        nll = nll + 0.5 * math.log(2 * math.pi)
    return masked_mean(nll, mask)


def weighted_cross_entropy(logits: torch.Tensor, target: torch.Tensor,
                           class_weights: Sequence[float] | torch.Tensor | None = None,
                           ignore_index: int = -100, label_smoothing: float = 0.0) -> torch.Tensor:
    """Cross-entropy with per-class weights; the mean is Σ w_y·CE / Σ w_y over non-ignored samples
    (torch's convention, which is also sklearn's weighted log loss)."""
    weight = None
    if class_weights is not None:
        weight = torch.as_tensor(class_weights, dtype=logits.dtype, device=logits.device)
    valid = target != ignore_index
    if not bool(valid.any()):
        return (logits * 0.0).sum()
    return F.cross_entropy(logits, target, weight=weight, ignore_index=ignore_index,
                           label_smoothing=label_smoothing)


def focal_loss(logits: torch.Tensor, target: torch.Tensor, gamma: float = 2.0,
               alpha: Sequence[float] | torch.Tensor | None = None, ignore_index: int = -100,
               reduction: str = "mean") -> torch.Tensor:
    """Multi-class focal loss (Lin et al. 2017): −α_y (1 − p_y)^γ log p_y.

    ``alpha``: optional per-class weights; with ``reduction="mean"`` the sum is divided by Σ α_y (as
    weighted CE), so gamma = 0 reproduces :func:`weighted_cross_entropy`.
    """
    valid = target != ignore_index
    if not bool(valid.any()):
        return (logits * 0.0).sum()
    logits, target = logits[valid], target[valid]
    log_p = F.log_softmax(logits.float(), dim=-1).gather(1, target[:, None]).squeeze(1)
    p = log_p.exp()
    loss = -((1.0 - p) ** gamma) * log_p
    weights = torch.ones_like(loss)
    if alpha is not None:
        weights = torch.as_tensor(alpha, dtype=loss.dtype, device=loss.device)[target]
    loss = loss * weights
    if reduction == "none":
        return loss
    if reduction == "sum":
        return loss.sum()
    return loss.sum() / weights.sum()


class UncertaintyWeighting(nn.Module):
    """Learned task weighting of Kendall, Gal & Cipolla (CVPR 2018).

    With s_i = log σ_i² (learned, init 0): regression terms contribute 0.5·exp(−s_i)·L_i + 0.5·s_i,
    classification terms exp(−s_i)·L_i + 0.5·s_i. ``kinds`` maps each task name to its kind.
    """

    def __init__(self, kinds: Mapping[str, str]):
        super().__init__()
        for name, kind in kinds.items():
            if kind not in ("regression", "classification"):
                raise ValueError(f"task '{name}': kind must be 'regression' or 'classification', got {kind!r}")
        self.kinds = dict(kinds)
        self.log_vars = nn.ParameterDict({name: nn.Parameter(torch.zeros(())) for name in kinds})

    def forward(self, losses: Mapping[str, torch.Tensor]) -> torch.Tensor:
        total = None
        for name, loss in losses.items():
            if name not in self.log_vars:
                raise KeyError(f"no uncertainty weight for task '{name}' (known: {sorted(self.log_vars)})")
            s = self.log_vars[name]
            scale = 0.5 if self.kinds[name] == "regression" else 1.0
            term = scale * torch.exp(-s) * loss + 0.5 * s
            total = term if total is None else total + term
        if total is None:
            raise ValueError("no losses given")
        return total

    def weights(self) -> dict[str, float]:
        """Effective multipliers exp(−s)·scale, for logging."""
        return {n: float((0.5 if self.kinds[n] == "regression" else 1.0) * torch.exp(-s.detach()))
                for n, s in self.log_vars.items()}


class PiecewiseLinear:
    """A value that moves linearly between (epoch, value) points and is constant outside them.

    ``PiecewiseLinear([(0, 0.0), (20, 0.0), (50, 1.0)])(35) == 0.5``.
    """

    def __init__(self, points: Sequence[Sequence[float]] | float):
        if isinstance(points, (int, float)):
            points = [(0, float(points))]
        pts = sorted((float(x), float(y)) for x, y in points)
        if not pts:
            raise ValueError("a schedule needs at least one (epoch, value) point")
        self.x = np.array([p[0] for p in pts])
        self.y = np.array([p[1] for p in pts])

    def __call__(self, epoch: float) -> float:
        return float(np.interp(float(epoch), self.x, self.y))


def curriculum_weights(schedules: Mapping[str, Sequence[Sequence[float]] | float], epoch: float) -> dict[str, float]:
    """Evaluate a table ``{loss name: [[epoch, weight], ...] or constant}`` at ``epoch``."""
    return {name: PiecewiseLinear(points)(epoch) for name, points in schedules.items()}
