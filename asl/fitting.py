"""Voxel-wise least-squares fitting of CBF and ATT: a batched torch Levenberg-Marquardt (all voxels at once)
and the per-voxel scipy.optimize.least_squares reference. Both minimize Σ_c (model_c(CBF, ATT) − y_c)²
with the model of :mod:`asl.physics` under box bounds (CBF 0-200 ml/100g/min, ATT 100-4000 ms).

Initialization (shared by both): a grid over ATT with the CBF that minimizes the cost in closed form for
each ATT (the signal is linear in CBF for the blood-T1 PCASL and VSASL models: CBF* = ⟨s₁, y⟩/⟨s₁, s₁⟩
with s₁ the signal at CBF 1), clipped to the bounds: the profile optimum on the grid, i.e. a finer version of
the original's coarse-then-fine CBF × ATT grid.

Per-voxel status: ``converged`` (the LM step stopped improving the cost within tolerance), ``at_bound`` (an
estimate sits on a bound), ``finite``; ``failed`` = not converged, not finite, or at a bound.
"""

from __future__ import annotations

import time
from collections.abc import Mapping

import numpy as np
import torch

from asl.physics import signal_curves, signal_jacobian

FIT_DEFAULTS = {
    "cbf_bounds": [0.0, 200.0],  # ml/100g/min
    "att_bounds_ms": [100.0, 4000.0],
    "att_grid_points": 40,  # ATT grid for the initialization (closed-form CBF per grid point)
    "max_iter": 100,  # LM iterations (batched fit)
    "ftol": 1.0e-10,  # stop when the relative cost decrease of an accepted step is below this
    "xtol": 1.0e-8,  # ... or the step (in units of 100 ml/100g/min and 1000 ms) is below this
    "chunk_voxels": 65536,  # voxels per batch in the batched fit (memory bound)
    "dtype": "float64",  # float64 agrees with scipy to < 0.1 ml/100g/min; float32 is faster on GPUs
    "cpu_threads": 1,  # torch threads for the fit on CPU (0 = unchanged): its small element-wise ops are
    # dispatch-bound, and OpenMP fan-out made them 10-30× slower on a loaded 2-core machine (measured)
}
_UNITS = (100.0, 1000.0)  # parameter scaling for conditioning: CBF/100, ATT/1000


def _select(params: Mapping | None, idx) -> dict | None:
    if params is None:
        return None
    return {k: (v[idx] if isinstance(v, torch.Tensor) and v.ndim > 0 else v) for k, v in params.items()}


def _to_params(params: Mapping | None, n: int, dtype, device) -> dict | None:
    if params is None:
        return None
    out = {}
    for key, value in params.items():
        t = torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value)
        t = t.to(device=device, dtype=dtype)
        out[key] = t.expand(n).contiguous() if t.ndim == 0 else t.reshape(n)
    return out


@torch.no_grad()
def grid_init(signals: torch.Tensor, physics: Mapping, params: Mapping | None = None,
              cfg: Mapping = FIT_DEFAULTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (CBF, ATT) on the ATT grid with the closed-form CBF per grid value. signals (N, C)."""
    n = signals.shape[0]
    att_lo, att_hi = cfg["att_bounds_ms"]
    cbf_lo, cbf_hi = cfg["cbf_bounds"]
    grid = torch.linspace(att_lo, att_hi, int(cfg["att_grid_points"]), dtype=signals.dtype, device=signals.device)
    g = grid.numel()
    if params is None:  # nominal physics: one (G, C) table of unit-CBF signals serves every voxel
        unit = signal_curves(torch.ones_like(grid), grid, physics)
        num = signals @ unit.T  # (N, G)
        den = (unit * unit).sum(-1)[None, :].clamp_min(1e-30)
    else:
        p = {k: v[:, None].expand(n, g) for k, v in params.items()}
        unit = signal_curves(torch.ones((n, g), dtype=signals.dtype, device=signals.device),
                             grid[None, :].expand(n, g), physics, p)  # (N, G, C)
        num = (unit * signals[:, None, :]).sum(-1)
        den = (unit * unit).sum(-1).clamp_min(1e-30)
    cbf = (num / den).clamp(cbf_lo, cbf_hi)
    # ||c·u − y||² = c²⟨u,u⟩ − 2c⟨u,y⟩ + ⟨y,y⟩ (the ⟨y,y⟩ term is the same for every grid point).
    cost = cbf * cbf * den - 2 * cbf * num
    best = cost.argmin(dim=1)
    return cbf.gather(1, best[:, None])[:, 0], grid[best]


def _lm_chunk(y: torch.Tensor, physics: Mapping, params: Mapping | None, cfg: Mapping) -> dict:
    lower = torch.tensor([cfg["cbf_bounds"][0] / _UNITS[0], cfg["att_bounds_ms"][0] / _UNITS[1]], dtype=y.dtype,
                         device=y.device)
    upper = torch.tensor([cfg["cbf_bounds"][1] / _UNITS[0], cfg["att_bounds_ms"][1] / _UNITS[1]], dtype=y.dtype,
                         device=y.device)
    units = torch.tensor(_UNITS, dtype=y.dtype, device=y.device)
    cbf0, att0 = grid_init(y, physics, params, cfg)
    theta = torch.stack([cbf0, att0], dim=-1) / units
    n = y.shape[0]

    def residual(th, idx):
        return signal_curves(th[:, 0] * units[0], th[:, 1] * units[1], physics, _select(params, idx)) - y[idx]

    all_idx = torch.arange(n, device=y.device)
    cost = (residual(theta, all_idx) ** 2).sum(-1)
    mu = torch.full((n,), 1e-3, dtype=y.dtype, device=y.device)
    converged = torch.zeros(n, dtype=torch.bool, device=y.device)
    n_iter = torch.zeros(n, dtype=torch.int64, device=y.device)
    eye_eps = 1e-12
    for _ in range(int(cfg["max_iter"])):
        idx = (~converged).nonzero().flatten()
        if idx.numel() == 0:
            break
        th = theta[idx]
        sig, jac = signal_jacobian(th[:, 0] * units[0], th[:, 1] * units[1], physics, _select(params, idx))
        r = sig - y[idx]
        jac = jac * units  # d/dθ in scaled units
        g = (jac * r[..., None]).sum(-2)  # (n, 2)
        h = jac.transpose(-1, -2) @ jac  # (n, 2, 2)
        m = mu[idx]
        a = h[:, 0, 0] * (1 + m) + eye_eps
        d = h[:, 1, 1] * (1 + m) + eye_eps
        b = h[:, 0, 1]
        det = a * d - b * b
        step = -torch.stack([d * g[:, 0] - b * g[:, 1], a * g[:, 1] - b * g[:, 0]], dim=-1) / det[:, None]
        new = torch.minimum(torch.maximum(th + step, lower), upper)
        new_cost = (residual(new, idx) ** 2).sum(-1)
        old_cost = cost[idx]
        accept = new_cost < old_cost
        moved = (new - th).abs().max(dim=-1).values
        small_gain = accept & ((old_cost - new_cost) <= float(cfg["ftol"]) * old_cost)
        small_step = moved <= float(cfg["xtol"]) * (1 + th.abs().max(dim=-1).values)
        done = (accept & (small_gain | small_step)) | (old_cost <= 1e-30)
        theta[idx] = torch.where(accept[:, None], new, th)
        cost[idx] = torch.where(accept, new_cost, old_cost)
        mu[idx] = torch.where(accept, (m * 0.3).clamp_min(1e-12), (m * 10.0).clamp_max(1e12))
        # A voxel whose damping has exploded without improvement sits at a (boundary) minimum.
        done = done | (~accept & (mu[idx] >= 1e12))
        converged[idx] = done
        n_iter[idx] += 1
    est = theta * units
    return {"cbf": est[:, 0], "att": est[:, 1], "cost": cost, "converged": converged, "n_iter": n_iter}


def fit_batched(signals, physics: Mapping, params: Mapping | None = None, cfg: Mapping | None = None,
                device: str | torch.device = "cpu") -> dict:
    """Fit every voxel at once. signals (N, C) ΔM/M0; params: per-voxel physics (N,) arrays or scalars
    (the oracle fit passes the true physics; None = nominal). Returns numpy arrays cbf, att, cost,
    converged, at_bound, failed, n_iter and the wall time in seconds."""
    cfg = {**FIT_DEFAULTS, **(cfg or {})}
    dtype = torch.float64 if cfg["dtype"] == "float64" else torch.float32
    y = torch.as_tensor(np.asarray(signals) if not isinstance(signals, torch.Tensor) else signals)
    y = y.to(device=device, dtype=dtype)
    if y.ndim != 2:
        raise ValueError(f"signals must be (n_voxels, n_channels), got shape {tuple(y.shape)}")
    n = y.shape[0]
    p = _to_params(params, n, dtype, y.device)
    threads = torch.get_num_threads()
    if y.device.type == "cpu" and int(cfg["cpu_threads"]) > 0:
        torch.set_num_threads(int(cfg["cpu_threads"]))
    try:
        start = time.perf_counter()
        parts = []
        chunk = int(cfg["chunk_voxels"])
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            parts.append(_lm_chunk(y[sl], physics, _select(p, sl), cfg))
        if y.device.type == "cuda":
            torch.cuda.synchronize(y.device)
        elapsed = time.perf_counter() - start
    finally:
        torch.set_num_threads(threads)
    out = {k: torch.cat([q[k] for q in parts]).cpu().numpy() if parts else np.zeros(0) for k in
           ("cbf", "att", "cost", "converged", "n_iter")}
    out.update(_status(out["cbf"], out["att"], out["converged"].astype(bool), cfg))
    out["seconds"] = elapsed
    return out


def _status(cbf: np.ndarray, att: np.ndarray, converged: np.ndarray, cfg: Mapping) -> dict:
    lo_c, hi_c = cfg["cbf_bounds"]
    lo_a, hi_a = cfg["att_bounds_ms"]
    tol_c, tol_a = 1e-6 * (hi_c - lo_c), 1e-6 * (hi_a - lo_a)
    at_bound = ((cbf <= lo_c + tol_c) | (cbf >= hi_c - tol_c) | (att <= lo_a + tol_a) | (att >= hi_a - tol_a))
    finite = np.isfinite(cbf) & np.isfinite(att)
    return {"converged": converged, "at_bound": at_bound, "finite": finite,
            "failed": ~converged | ~finite | at_bound}


def fit_scipy(signals, physics: Mapping, params: Mapping | None = None, cfg: Mapping | None = None,
              init: tuple[np.ndarray, np.ndarray] | None = None, ftol: float = 1e-8, xtol: float = 1e-8) -> dict:
    """Per-voxel reference: scipy.optimize.least_squares (TRF, 2-point Jacobian, bounds), one voxel at a
    time, from the same grid initialization as :func:`fit_batched` (or ``init``). Same outputs."""
    from scipy.optimize import least_squares

    cfg = {**FIT_DEFAULTS, **(cfg or {})}
    y = np.asarray(signals, dtype=np.float64)
    n = y.shape[0]
    p = None if params is None else {k: np.broadcast_to(np.asarray(v, dtype=np.float64), (n,)) for k, v in params.items()}
    start = time.perf_counter()
    if init is None:
        tp = None if p is None else {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in p.items()}
        c0, a0 = grid_init(torch.from_numpy(y), physics, tp, cfg)
        init = (c0.numpy(), a0.numpy())
    lower = np.array([cfg["cbf_bounds"][0], cfg["att_bounds_ms"][0]]) / _UNITS
    upper = np.array([cfg["cbf_bounds"][1], cfg["att_bounds_ms"][1]]) / _UNITS
    cbf, att = np.empty(n), np.empty(n)
    cost, converged, n_iter = np.empty(n), np.zeros(n, dtype=bool), np.zeros(n, dtype=np.int64)
    for i in range(n):
        pi = None if p is None else {k: v[i:i + 1] for k, v in p.items()}
        yi = y[i]

        def fun(th, pi=pi, yi=yi):
            return signal_curves(np.array([th[0] * _UNITS[0]]), np.array([th[1] * _UNITS[1]]), physics, pi)[0] - yi

        x0 = np.clip(np.array([init[0][i], init[1][i]]) / _UNITS, lower, upper)
        x0 = np.minimum(np.maximum(x0, lower + 1e-9), upper - 1e-9)  # TRF needs a strictly feasible start
        res = least_squares(fun, x0, bounds=(lower, upper), method="trf", ftol=ftol, xtol=xtol)
        cbf[i], att[i] = res.x * _UNITS
        cost[i], converged[i], n_iter[i] = 2 * res.cost, res.status > 0, res.nfev
    out = {"cbf": cbf, "att": att, "cost": cost, "n_iter": n_iter, "seconds": time.perf_counter() - start}
    out.update(_status(cbf, att, converged, cfg))
    return out
