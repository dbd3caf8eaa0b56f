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

from asl.physics import _param, _plds, pcasl_buxton_full_grid_products, signal_curves, signal_jacobian
from common.runtime import cpu_threads

FIT_DEFAULTS = {
    "cbf_bounds": [0.0, 200.0],  # ml/100g/min
    "att_bounds_ms": [100.0, 4000.0],
    "att_grid_points": 40,  # ATT grid for the initialization (closed-form CBF per grid point)
    "max_iter": 100,  # LM iterations (batched fit)
    "ftol": 1.0e-10,  # stop when the relative cost decrease of an accepted step is below this
    "xtol": 1.0e-8,  # ... or the step (in units of 100 ml/100g/min and 1000 ms) is below this
    "chunk_voxels": 65536,  # voxels per batch in the batched fit (memory bound)
    "lm_block_voxels": 8192,  # voxels per block of the first LM iterations on CPU (cache-sized; same result)
    "grid_block_voxels": 2048,  # voxels per block of the grid initialization on CPU (cache-sized; same result)
    "dtype": "float64",  # float64 agrees with scipy to < 0.1 ml/100g/min; float32 is faster on GPUs
    "cpu_threads": 1,  # torch threads for the fit on CPU (0 = unchanged): its small element-wise ops are
    # dispatch-bound, and OpenMP fan-out made them 10-30× slower on a loaded 2-core machine (measured)
}
# Settings that change only how the work is split, never a voxel's result (tests/asl: bit-identical estimates).
SPEED_ONLY_FIT_KEYS = ("chunk_voxels", "grid_block_voxels", "lm_block_voxels", "cpu_threads")
_UNITS = (100.0, 1000.0)  # parameter scaling for conditioning: CBF/100, ATT/1000
# Per-voxel parameters with a measurement axis: a PLD list per voxel and a weight per measurement (0 for the padding
# of a shorter protocol), used to fit voxels of several protocols in one batch (fit_batched_protocols).
PER_VOXEL_VECTORS = ("plds_ms", "channel_weight")


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
        if key in PER_VOXEL_VECTORS:  # (N, C) or (N, P): one row per voxel
            out[key] = t.reshape(n, -1)
        else:
            out[key] = t.expand(n).contiguous() if t.ndim == 0 else t.reshape(n)
    return out


def _grid_products(grid: torch.Tensor, physics: Mapping, params: Mapping, signals: torch.Tensor):
    """⟨u, y⟩ and ⟨u, u⟩ (N, G) of each voxel's unit-CBF signal u on the ATT grid. When the only per-voxel parameter
    is the tissue T1 of the full Buxton PCASL model (predict with GM/WM maps, asl.ls_inputs), the PCASL sums come
    in closed form (asl.physics.pcasl_buxton_full_grid_products) and the VSASL part, independent of tissue T1, from
    one table for the grid; otherwise the model is evaluated on (N, G) points."""
    n, g = signals.shape[0], grid.numel()
    if set(params) == {"t1_tissue_ms"} and physics["pcasl_model"] == "buxton_full":
        num = torch.zeros((n, g), dtype=signals.dtype, device=signals.device)
        den = torch.zeros_like(num)
        first = 0
        for mode in physics["modes"]:
            y = signals[:, first:first + len(physics["plds_ms"])]
            first += len(physics["plds_ms"])
            if mode == "pcasl":
                alpha = float(physics["alpha_pcasl"]) * float(physics["alpha_bs1"]) ** int(physics["n_bs_pcasl"])
                plds = torch.as_tensor(list(physics["plds_ms"]), dtype=signals.dtype, device=signals.device)
                nm, dn = pcasl_buxton_full_grid_products(grid, plds, float(physics["t1_blood_ms"]),
                                                         float(physics["tau_ms"]), alpha,
                                                         float(physics["lambda_blood"]), params["t1_tissue_ms"], y)
            else:
                unit = signal_curves(torch.ones_like(grid), grid, {**physics, "modes": [mode]})  # (G, C)
                nm, dn = y @ unit.T, (unit * unit).sum(-1)[None, :]
            num, den = num + nm, den + dn
        return num, den
    p = {k: v[:, None].expand(n, g, *v.shape[1:]) for k, v in params.items() if k != "channel_weight"}
    unit = signal_curves(torch.ones((n, g), dtype=signals.dtype, device=signals.device), grid[None, :].expand(n, g),
                         physics, p)  # (N, G, C)
    if params.get("channel_weight") is not None:
        unit = unit * params["channel_weight"][:, None, :]
    return (unit * signals[:, None, :]).sum(-1), (unit * unit).sum(-1)


@torch.inference_mode()
def grid_init(signals: torch.Tensor, physics: Mapping, params: Mapping | None = None,
              cfg: Mapping = FIT_DEFAULTS) -> tuple[torch.Tensor, torch.Tensor]:
    """Best (CBF, ATT) on the ATT grid with the closed-form CBF per grid value. signals (N, C).

    Computed in blocks of ``grid_block_voxels`` voxels: every step is per voxel (row), so the result does not depend
    on the block size, and (block, G) intermediates stay in the CPU cache instead of being allocated afresh at
    (N, G) for each of the ~30 operations (which made the grid most of the fit's time on 28 k voxels)."""
    att_lo, att_hi = cfg["att_bounds_ms"]
    grid = torch.linspace(att_lo, att_hi, int(cfg["att_grid_points"]), dtype=signals.dtype, device=signals.device)
    unit = None
    if params is None:  # nominal physics: one (G, C) table of unit-CBF signals serves every voxel
        unit = signal_curves(torch.ones_like(grid), grid, physics)
    n = signals.shape[0]
    block = int(cfg.get("grid_block_voxels", FIT_DEFAULTS["grid_block_voxels"])) if signals.device.type == "cpu" else 0
    block = block if block > 0 else max(n, 1)
    if n <= block:
        return _grid_block(signals, physics, params, cfg, grid, unit)
    # Blocks of equal size (no small remainder: a matrix product of a few rows may take another BLAS path).
    edges = [round(i * n / -(-n // block)) for i in range(-(-n // block) + 1)]
    parts = [_grid_block(signals[a:b], physics, _select(params, slice(a, b)), cfg, grid, unit)
             for a, b in zip(edges[:-1], edges[1:])]
    return torch.cat([q[0] for q in parts]), torch.cat([q[1] for q in parts])


def _grid_block(signals: torch.Tensor, physics: Mapping, params: Mapping | None, cfg: Mapping, grid: torch.Tensor,
                unit: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    cbf_lo, cbf_hi = cfg["cbf_bounds"]
    if unit is not None:
        num = signals @ unit.T  # (N, G)
        den = (unit * unit).sum(-1)[None, :].clamp_min(1e-30)
    else:
        num, den = _grid_products(grid, physics, params, signals)
        den = den.clamp_min(1e-30)
    cbf = (num / den).clamp(cbf_lo, cbf_hi)
    # ||c·u − y||² = c²⟨u,u⟩ − 2c⟨u,y⟩ + ⟨y,y⟩ (the ⟨y,y⟩ term is the same for every grid point).
    cost = cbf * cbf * den - 2 * cbf * num
    # The first grid point within rounding (1e-9 of the cost scale) of the least cost: where the cost is flat in ATT
    # (short ATTs when every PLD is after the bolus), the exact argmin would depend on the summation order.
    tol = 1e-9 * cost.abs().amax(dim=1, keepdim=True)
    index = torch.arange(grid.numel(), device=grid.device).expand_as(cost)
    best = torch.where(cost <= cost.amin(dim=1, keepdim=True) + tol, index, grid.numel()).amin(dim=1)
    return cbf.gather(1, best[:, None])[:, 0], grid[best]


def _nominal_jacobian(physics: Mapping, like: torch.Tensor):
    """signal_jacobian for nominal physics (no per-voxel parameters) and the blood-T1 PCASL / VSASL models, with
    every term that depends on neither CBF nor ATT computed once per fit instead of at every iteration. The remaining
    operations are those of asl.physics (pcasl_blood_t1, vsasl_multiverse and their ATT derivatives) in the same
    order on the same values, so the result is the same to the bit (tests/asl/test_asl_simulate_fitting.py). None
    for any other model (the full Buxton model's terms depend on CBF through T1')."""
    if physics["pcasl_model"] != "blood_t1" and "pcasl" in physics["modes"]:
        return None
    plds = _plds(physics, None, like)
    t1b = _param("t1_blood_ms", physics, None, like)
    lam = float(physics["lambda_blood"])
    bs1 = _param("alpha_bs1", physics, None, like)
    f_unit = like.new_ones(()) / 6000.0
    modes = []
    for mode in physics["modes"]:
        if mode == "pcasl":
            alpha = _param("alpha_pcasl", physics, None, like) * bs1 ** int(physics["n_bs_pcasl"])
            tau = _param("tau_ms", physics, None, like)
            scale_unit = 2.0 * alpha * f_unit / lam * (t1b / 1000.0)
            modes.append(("pcasl", alpha, tau, scale_unit, torch.exp(-(tau + plds) / t1b),
                          scale_unit * torch.exp(-plds / t1b) * (1.0 - torch.exp(-tau / t1b))))
        else:
            alpha = _param("alpha_vsasl", physics, None, like) * bs1 ** int(physics["n_bs_vsasl"])
            modes.append(("vsasl", alpha, None, 2.0 * alpha * f_unit / lam, torch.exp(-plds / t1b), None))
    m0_scale = float(_param("m0_scale", physics, None, like))
    n_pld = plds.numel()
    zero = like.new_zeros(())

    def jacobian(cbf: torch.Tensor, att_ms: torch.Tensor, scale_jac: tuple[float, float] = (1.0, 1.0)):
        """(signal, Jacobian × scale_jac): the modes' columns are written into one buffer each (no concatenation
        copies) and the Jacobian is scaled as it is stored (the same products as jac * scale afterwards)."""
        f = cbf[..., None] / 6000.0
        att = att_ms[..., None]
        e_att = None
        shape = (cbf.shape[0], n_pld * len(modes))
        d_cbf, d_att = (torch.empty(shape, dtype=cbf.dtype, device=cbf.device) for _ in range(2))
        for i, (mode, alpha, tau, scale_unit, e_a, e_b) in enumerate(modes):
            cols = slice(i * n_pld, (i + 1) * n_pld)
            if mode == "pcasl":  # asl.physics.pcasl_blood_t1 at CBF 1 and pcasl_blood_t1_datt
                e_att = torch.exp(-att / t1b) if e_att is None else e_att
                transit = scale_unit * (e_att - e_a)
                before = plds < att - tau  # the bolus has not arrived; the branch masks are computed once
                arriving = plds < att
                torch.where(before, zero, torch.where(arriving, transit, e_b), out=d_cbf[:, cols])
                scale = 2.0 * alpha * f / lam * (t1b / 1000.0)
                torch.where(arriving & ~before, -scale / t1b * e_att, zero, out=d_att[:, cols])
            else:  # asl.physics.vsasl_multiverse at CBF 1 and vsasl_multiverse_datt
                torch.mul(scale_unit * (torch.minimum(plds, att) / 1000.0), e_a, out=d_cbf[:, cols])
                torch.where(att < plds, 2.0 * alpha * f / lam / 1000.0 * e_a, zero, out=d_att[:, cols])
        if m0_scale != 1.0:
            d_cbf, d_att = d_cbf * m0_scale, d_att * m0_scale
        jac = torch.empty((*shape, 2), dtype=cbf.dtype, device=cbf.device)
        torch.mul(d_cbf, scale_jac[0], out=jac[..., 0])
        torch.mul(d_att, scale_jac[1], out=jac[..., 1])
        return d_cbf * cbf[..., None], jac

    return jacobian


class _LMState:
    """Per-voxel state of the voxels still iterating (act: their positions in the chunk). Every update of the
    Levenberg-Marquardt loop is per voxel, so sets of voxels may be iterated apart and joined (see _lm_chunk)."""

    KEYS = ("act", "th", "c", "r", "jac", "m", "it", "y")

    def __init__(self, **values):
        self.__dict__.update(values)

    def take(self, index: torch.Tensor) -> _LMState:
        return _LMState(p=_select(self.p, index), **{k: getattr(self, k).index_select(0, index) for k in self.KEYS})

    @staticmethod
    def join(states: list[_LMState]) -> _LMState:
        params = None if states[0].p is None else {
            k: (torch.cat([st.p[k] for st in states]) if isinstance(v, torch.Tensor) and v.ndim > 0 else v)
            for k, v in states[0].p.items()}
        return _LMState(p=params, **{k: torch.cat([getattr(st, k) for st in states]) for k in _LMState.KEYS})


@torch.inference_mode()
def _lm_chunk(y: torch.Tensor, physics: Mapping, params: Mapping | None, cfg: Mapping) -> dict:
    lower = torch.tensor([cfg["cbf_bounds"][0] / _UNITS[0], cfg["att_bounds_ms"][0] / _UNITS[1]], dtype=y.dtype,
                         device=y.device)
    upper = torch.tensor([cfg["cbf_bounds"][1] / _UNITS[0], cfg["att_bounds_ms"][1] / _UNITS[1]], dtype=y.dtype,
                         device=y.device)
    units = torch.tensor(_UNITS, dtype=y.dtype, device=y.device)
    max_iter, ftol, xtol = int(cfg["max_iter"]), float(cfg["ftol"]), float(cfg["xtol"])
    cbf0, att0 = grid_init(y, physics, params, cfg)
    theta = torch.stack([cbf0, att0], dim=-1) / units
    n = y.shape[0]

    nominal = _nominal_jacobian(physics, y) if params is None else None

    def evaluate(th, y_, p_):  # residuals and Jacobian (scaled units) at th; the Jacobian of an accepted step is reused
        if nominal is not None:  # Jacobian scaled as it is stored: the same products as jac * units
            sig, jac = nominal(th[:, 0] * _UNITS[0], th[:, 1] * _UNITS[1], _UNITS)
            return sig - y_, jac
        sig, jac = signal_jacobian(th[:, 0] * _UNITS[0], th[:, 1] * _UNITS[1], physics, p_)
        if p_ is not None and p_.get("channel_weight") is not None:  # padded measurements: no residual, no gradient
            weight = p_["channel_weight"]
            return (sig - y_) * weight, jac * (units * weight[..., None])
        return sig - y_, jac * units

    # A voxel's result is set aside when it stops (converged, or max_iter iterations: not converged) and all are
    # written back at the end; the Jacobian at the estimate is kept for the Cramér-Rao bound (fit_batched: "jacobian").
    stopped = []

    def retire(st: _LMState, index: torch.Tensor, ok: bool) -> None:
        stopped.append((st.act.index_select(0, index), st.th.index_select(0, index), st.c.index_select(0, index),
                        st.it.index_select(0, index), st.jac.index_select(0, index),
                        torch.full((index.numel(),), ok, dtype=torch.bool, device=y.device)))

    def start(index: torch.Tensor) -> _LMState:
        th, y_a, p_a = theta.index_select(0, index), y.index_select(0, index), _select(params, index)
        r, jac = evaluate(th, y_a, p_a)
        return _LMState(act=index, th=th, c=(r**2).sum(-1), r=r, jac=jac, y=y_a, p=p_a,
                        m=torch.full((index.numel(),), 1e-3, dtype=y.dtype, device=y.device),
                        it=torch.zeros(index.numel(), dtype=torch.int64, device=y.device))

    eye_eps = 1e-12

    def iterate(st: _LMState, min_active: int) -> _LMState:
        """LM passes over ``st`` until fewer than ``min_active`` voxels are still iterating; the rest is returned."""
        while st.act.numel() >= max(min_active, 1):
            th, c, r, jac, m = st.th, st.c, st.r, st.jac, st.m
            # Gradient Jᵀr and the three entries of JᵀJ as element-wise sums over the measurements (a batched
            # 2×2 matrix product of (n, C, 2) costs ~2.7× more at thousands of voxels: measured).
            j_cbf, j_att = jac[..., 0], jac[..., 1]
            g_cbf, g_att = (j_cbf * r).sum(-1), (j_att * r).sum(-1)
            h_cc, h_ca, h_aa = (j_cbf * j_cbf).sum(-1), (j_cbf * j_att).sum(-1), (j_att * j_att).sum(-1)
            one_m = 1 + m
            a = h_cc * one_m + eye_eps
            d = h_aa * one_m + eye_eps
            det = a * d - h_ca * h_ca
            step = -torch.stack([d * g_cbf - h_ca * g_att, a * g_att - h_ca * g_cbf], dim=-1) / det[:, None]
            new = torch.minimum(torch.maximum(th + step, lower), upper)
            new_r, new_jac = evaluate(new, st.y, st.p)
            new_cost = (new_r**2).sum(-1)
            accept = new_cost < c
            rejected = ~accept
            s_ = new - th
            moved = s_.abs().max(dim=-1).values
            ftol_c = ftol * c
            small_gain = accept & ((c - new_cost) <= ftol_c)
            small_step = moved <= xtol * (1 + th.abs().max(dim=-1).values)
            # A rejected step whose linear model predicts a relative decrease ≤ ftol: no step can gain more than the
            # tolerance (the predicted-reduction test of MINPACK's LM; Moré 1978), instead of raising the damping
            # until it explodes. Cost = ‖r‖², so the model's decrease for the step s is −(2 gᵀs + sᵀ H s).
            s_c, s_a = s_[:, 0], s_[:, 1]
            predicted = -(2 * (g_cbf * s_c + g_att * s_a) + (h_cc * s_c * s_c + 2 * h_ca * s_c * s_a + h_aa * s_a * s_a))
            flat = rejected & (predicted >= 0) & (predicted <= ftol_c)
            # small_step also ends a rejected step: the damping has shrunk the step below xtol without a decrease
            # (the step-bound test of MINPACK's LM), typically on a kink of the model in ATT.
            done = (accept & small_gain) | small_step | flat | (c <= 1e-30)
            st.th = torch.where(accept[:, None], new, th)
            st.c = torch.where(accept, new_cost, c)
            st.r = torch.where(accept[:, None], new_r, r)
            st.jac = torch.where(accept[:, None, None], new_jac, jac)
            st.m = torch.where(accept, (m * 0.3).clamp_min(1e-12), (m * 10.0).clamp_max(1e12))
            # A voxel whose damping has exploded without improvement sits at a (boundary) minimum.
            done = done | (rejected & (st.m >= 1e12))
            st.it = st.it + 1
            exhausted = ~done & (st.it >= max_iter)  # not converged within max_iter
            stop = done | exhausted
            if bool(stop.any()):  # positions computed once; index_select (a boolean mask would search each time)
                retire(st, done.nonzero()[:, 0], True)
                if bool(exhausted.any()):
                    retire(st, exhausted.nonzero()[:, 0], False)
                st = st.take((~stop).nonzero()[:, 0])
        return st

    # The first passes, where most voxels still iterate, run on cache-sized blocks of voxels (fresh (N, C)
    # allocations at every operation made them memory-bound); the voxels left in every block are then joined, so the
    # long tail of a few slow voxels costs one pass per iteration, not one per block. Each voxel's iterations are the
    # same either way (every update is per voxel).
    block = int(cfg.get("lm_block_voxels", FIT_DEFAULTS["lm_block_voxels"])) if y.device.type == "cpu" else 0
    if max_iter <= 0:
        retire(start(torch.arange(n, device=y.device)), torch.arange(n, device=y.device), False)
    elif block <= 0 or n <= block:
        iterate(start(torch.arange(n, device=y.device)), 1)
    else:
        edges = [round(i * n / -(-n // block)) for i in range(-(-n // block) + 1)]  # blocks of equal size
        left = [iterate(start(torch.arange(a, b, device=y.device)), (b - a) // 2) for a, b in zip(edges[:-1], edges[1:])]
        iterate(_LMState.join(left), 1)
    pos, th, c, it, jac, ok = (torch.cat(parts) for parts in zip(*stopped))
    theta[pos] = th
    cost, converged, n_iter = torch.empty_like(c), torch.empty_like(ok), torch.empty_like(it)
    jac_out = torch.empty_like(jac)
    cost[pos], converged[pos], n_iter[pos], jac_out[pos] = c, ok, it, jac
    est = theta * units
    return {"cbf": est[:, 0], "att": est[:, 1], "cost": cost, "converged": converged, "n_iter": n_iter,
            "jacobian": jac_out / units}


def fit_batched(signals, physics: Mapping, params: Mapping | None = None, cfg: Mapping | None = None,
                device: str | torch.device = "cpu") -> dict:
    """Fit every voxel at once. signals (N, C) ΔM/M0; params: per-voxel physics (N,) arrays or scalars
    (the oracle fit passes the true physics; None = nominal). Returns numpy arrays cbf, att, cost,
    converged, at_bound, failed, n_iter, jacobian ((N, C, 2): ∂signal/∂(CBF, ATT) at the estimate, for
    asl.physics.crlb_from_jacobian) and the wall time in seconds."""
    cfg = {**FIT_DEFAULTS, **(cfg or {})}
    dtype = torch.float64 if cfg["dtype"] == "float64" else torch.float32
    y = torch.as_tensor(np.asarray(signals) if not isinstance(signals, torch.Tensor) else signals)
    y = y.to(device=device, dtype=dtype)
    if y.ndim != 2:
        raise ValueError(f"signals must be (n_voxels, n_channels), got shape {tuple(y.shape)}")
    n = y.shape[0]
    p = _to_params(params, n, dtype, y.device)
    with cpu_threads(int(cfg["cpu_threads"]) or None, y.device):  # 0: the process setting
        start = time.perf_counter()
        parts = []
        chunk = int(cfg["chunk_voxels"])
        for s in range(0, n, chunk):
            sl = slice(s, min(n, s + chunk))
            parts.append(_lm_chunk(y[sl], physics, _select(p, sl), cfg))
        if y.device.type == "cuda":
            torch.cuda.synchronize(y.device)
        elapsed = time.perf_counter() - start
    out = {k: torch.cat([q[k] for q in parts]).cpu().numpy() if parts else np.zeros(0) for k in
           ("cbf", "att", "cost", "converged", "n_iter")}
    out["jacobian"] = (torch.cat([q["jacobian"] for q in parts]).cpu().numpy() if parts
                       else np.zeros((0, y.shape[1], 2)))
    out.update(_status(out["cbf"], out["att"], out["converged"].astype(bool), cfg))
    out["seconds"] = elapsed
    return out


# Physics entries a voxel may take from its own protocol in fit_batched_protocols; the others must agree.
_PROTOCOL_SCALARS = ("t1_blood_ms", "tau_ms", "alpha_pcasl", "alpha_vsasl", "alpha_bs1")


def protocol_fit_group(physics: Mapping) -> tuple:
    """What voxel sets fitted together by fit_batched_protocols must share."""
    return (tuple(physics["modes"]), physics["pcasl_model"], int(physics.get("n_bs_pcasl", 0)),
            int(physics.get("n_bs_vsasl", 0)), float(physics["lambda_blood"]))


def fit_batched_protocols(signal_sets, physics_list, params_list=None, cfg: Mapping | None = None,
                          device: str | torch.device = "cpu") -> list[dict]:
    """fit_batched of several voxel sets, each acquired with its own protocol, in ONE batched fit: set i has
    signals (N_i, n_modes·P_i) in the measurement order of physics_list[i] and per-voxel params_list[i] (or None).
    The protocols may differ in PLD list, labeling duration, efficiencies and blood T1 but must share the modes,
    the PCASL model, the background-suppression pulse counts and λ. Each set is padded to the longest PLD list with
    measurements of weight 0 (no residual, no Jacobian row), so each voxel minimizes the same cost as in a fit of
    its set alone (tests/asl: equal to fit_batched per set to rounding). Used where many short protocol-specific
    fits would each pay the loop's per-iteration overhead (training batches of random protocols, on GPUs above
    all). Returns one fit_batched-style dict per set (jacobian over the set's own measurements; seconds: the
    shared fit's)."""
    sets = [np.asarray(x.detach().cpu() if isinstance(x, torch.Tensor) else x, np.float64) for x in signal_sets]
    params_list = list(params_list) if params_list is not None else [None] * len(sets)
    if not (len(sets) == len(physics_list) == len(params_list)):
        raise ValueError(f"{len(sets)} signal sets, {len(physics_list)} physics, {len(params_list)} params")
    if not sets:
        return []
    groups = {protocol_fit_group(ph) for ph in physics_list}
    if len(groups) > 1:
        raise ValueError(f"fit_batched_protocols needs one set of modes/model/BS pulses/λ, got {sorted(groups)}")
    base = physics_list[0]
    n_modes = len(base["modes"])
    p_max = max(len(ph["plds_ms"]) for ph in physics_list)
    keys = set().union(*(set(p or {}) for p in params_list))
    # The protocol values the model reads become per-voxel parameters (alpha_vsasl etc. only where the base has them).
    scalar_keys = [k for k in _PROTOCOL_SCALARS if k in base]
    missing = sorted({k for ph in physics_list for k in scalar_keys if k not in ph})
    if missing:
        raise ValueError(f"fit_batched_protocols: physics {missing} given for some protocols but not for all")
    rows, weights, plds, scalars, extra, columns = [], [], [], {k: [] for k in scalar_keys}, {k: [] for k in keys}, []
    for x, ph, par in zip(sets, physics_list, params_list):
        n_i, p_i = x.shape[0], len(ph["plds_ms"])
        if x.ndim != 2 or x.shape[1] != n_modes * p_i:
            raise ValueError(f"signals of shape {x.shape} do not match {n_modes} mode(s) x {p_i} PLDs")
        cols = np.concatenate([m * p_max + np.arange(p_i) for m in range(n_modes)])
        padded = np.zeros((n_i, n_modes * p_max))
        padded[:, cols] = x
        weight = np.zeros(n_modes * p_max)
        weight[cols] = 1.0
        pld_row = np.full(p_max, float(ph["plds_ms"][-1]))  # padding: any finite PLD (its weight is 0)
        pld_row[:p_i] = ph["plds_ms"]
        rows.append(padded)
        weights.append(np.broadcast_to(weight, padded.shape))
        plds.append(np.broadcast_to(pld_row, (n_i, p_max)))
        for key in scalar_keys:
            scalars[key].append(np.full(n_i, float(ph[key])))
        for key in keys:
            if par is None or par.get(key) is None:
                raise ValueError(f"params {key!r} given for some voxel sets but not for all")
            extra[key].append(np.broadcast_to(np.asarray(par[key], np.float64), (n_i,)))
        columns.append(cols)
    params = {"plds_ms": np.concatenate(plds), "channel_weight": np.concatenate(weights),
              **{k: np.concatenate(v) for k, v in scalars.items()},
              **{k: np.concatenate(v) for k, v in extra.items()}}
    fit = fit_batched(np.concatenate(rows), base, params, cfg, device=device)
    out, start = [], 0
    for x, cols in zip(sets, columns):
        sl = slice(start, start + x.shape[0])
        start += x.shape[0]
        one = {k: (v[sl] if isinstance(v, np.ndarray) and v.ndim >= 1 else v) for k, v in fit.items()}
        one["jacobian"] = fit["jacobian"][sl][:, cols]
        out.append(one)
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
