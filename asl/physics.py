"""ASL signal models (the single source of truth for every simulated or fitted signal) and the CRLB.

Units: times in ms, CBF in ml/100g/min, f = CBF / 6000 in ml/g/s, signals ΔM in units of M0.

All functions take torch tensors (any shape ``...``) and return ``(..., n_pld)`` or ``(..., n_channels)``;
physical parameters may be Python floats or tensors broadcastable to the CBF tensor (one value per
voxel or per phantom), so domain-randomized physics and the "oracle" least-squares fit use the same code.
Every model is differentiable (torch.where between branches). ``*_np`` wrappers accept numpy.

Models
- PCASL, single compartment with blood T1 only (Buxton et al. MRM 1998 general kinetic model as used by
  MULTIVERSE, Xu et al. MRM 2025):
    PLD < ATT − τ:        ΔM = 0
    ATT − τ ≤ PLD < ATT:  ΔM = (2 α1 f / λ)(T1b/1000)[exp(−ATT/T1b) − exp(−(τ+PLD)/T1b)]
    PLD ≥ ATT:            ΔM = (2 α1 f / λ)(T1b/1000) exp(−PLD/T1b)(1 − exp(−τ/T1b))
- PCASL, full Buxton (1998) model with tissue relaxation (FSL BASIL, ASLDRO), t = τ + PLD,
  T1' = 1/(1/T1t + f/λ), q(x) = 1 − exp(−x/T1'):
    t < ATT: 0;  ATT ≤ t < ATT+τ: 2α f' T1' e^(−ATT/T1b) q(t−ATT);
    t ≥ ATT+τ: 2α f' T1' e^(−ATT/T1b) e^(−(t−τ−ATT)/T1') q(τ)
- VSASL (MULTIVERSE "spatially defined bolus"): ΔM = (2 α2 f / λ)(min(PLD, ATT)/1000) exp(−PLD/T1b)

Effective labeling efficiencies include background suppression: α1 = α_PCASL·α_BS1^n_bs_pcasl,
α2 = α_VSASL·α_BS1^n_bs_vsasl (4 and 3 pulses in the original).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from common.config import ConfigError

# Nominal physics of the original system (production_v2); the ``physics:`` section of every config.
PHYSICS_DEFAULTS = {
    "modes": ["pcasl", "vsasl"],  # acquired labeling schemes, in channel order: pcasl, vsasl or both
    "plds_ms": [500.0, 1000.0, 1500.0, 2000.0, 2500.0, 3000.0],  # post-labeling delays (same list per mode)
    "pcasl_model": "blood_t1",  # blood_t1 (MULTIVERSE) | buxton_full (with tissue T1, as FSL BASIL)
    "t1_blood_ms": 1650.0,  # arterial blood T1 at 3 T
    "t1_tissue_ms": 1330.0,  # tissue T1 (GM, 3 T); used by buxton_full only
    "tau_ms": 1800.0,  # PCASL labeling duration
    "alpha_pcasl": 0.85,  # PCASL labeling efficiency
    "alpha_vsasl": 0.56,  # VSASL labeling efficiency
    "alpha_bs1": 0.95,  # efficiency of one background-suppression inversion pulse (centre of its randomization)
    "n_bs_pcasl": 4,  # BS pulses in the PCASL sequence
    "n_bs_vsasl": 3,  # BS pulses in the VSASL sequence
    "lambda_blood": 0.9,  # blood-brain partition coefficient (ml/g)
}
# Parameters that may vary per voxel/phantom (domain randomization, oracle fits).
VARIABLE_PARAMS = ("t1_blood_ms", "tau_ms", "alpha_pcasl", "alpha_vsasl", "alpha_bs1", "m0_scale", "pld_offset_ms",
                   "t1_tissue_ms")  # t1_tissue_ms per voxel: a T1 map from GM/WM partial volumes (buxton_full)
MODES = ("pcasl", "vsasl")
PCASL_MODELS = ("blood_t1", "buxton_full")


def check_physics(physics: Mapping) -> None:
    """Raise ConfigError (a ValueError: one line from run_cli) naming the field when the physics section cannot
    describe an acquisition."""
    modes = list(physics["modes"])
    if not modes or any(m not in MODES for m in modes) or len(set(modes)) != len(modes):
        raise ConfigError(f"physics.modes must be a non-empty subset of {list(MODES)}, got {modes}")
    plds = list(physics["plds_ms"])
    if not plds or any(not np.isfinite(p) or p < 0 for p in plds):
        raise ConfigError(f"physics.plds_ms must be non-negative numbers, got {plds}")
    if physics["pcasl_model"] not in PCASL_MODELS:
        raise ConfigError(f"physics.pcasl_model must be one of {PCASL_MODELS}, got {physics['pcasl_model']!r}")
    for key in ("t1_blood_ms", "t1_tissue_ms", "tau_ms", "lambda_blood"):
        if not float(physics[key]) > 0:
            raise ConfigError(f"physics.{key} must be > 0, got {physics[key]}")


def n_channels(physics: Mapping) -> int:
    return len(physics["modes"]) * len(physics["plds_ms"])


def channel_names(physics: Mapping) -> list[str]:
    return [f"{m.upper()}_PLD{int(round(p))}" for m in physics["modes"] for p in physics["plds_ms"]]


def _xp(x):
    """The array library of ``x``: torch for tensors, numpy otherwise (the equations use only operations
    both provide, so numpy callers such as the per-voxel scipy fit avoid torch's per-call overhead)."""
    return torch if isinstance(x, torch.Tensor) else np


def _param(name: str, physics: Mapping, params: Mapping | None, like):
    """A physical parameter as a scalar array, or an array with a trailing PLD axis (broadcast over PLDs)."""
    if params is not None and params.get(name) is not None:
        value = params[name]
        if _xp(like) is torch:
            return torch.as_tensor(value, dtype=like.dtype, device=like.device)[..., None]
        return np.asarray(value, dtype=np.float64)[..., None]
    default = {"m0_scale": 1.0, "pld_offset_ms": 0.0}.get(name)
    value = default if default is not None else float(physics[name])
    if _xp(like) is torch:
        return torch.tensor(value, dtype=like.dtype, device=like.device)
    return np.float64(value)


def _plds(physics: Mapping, params: Mapping | None, like):
    """The PLDs (ms) with a trailing measurement axis: the physics' list, or a per-voxel list ``params["plds_ms"]``
    (..., n) when voxels of several protocols are fitted together (asl.fitting.fit_batched_protocols)."""
    if params is not None and params.get("plds_ms") is not None:
        xp = _xp(like)
        plds = (torch.as_tensor(params["plds_ms"], dtype=like.dtype, device=like.device) if xp is torch
                else np.asarray(params["plds_ms"], dtype=np.float64))
        return plds + _param("pld_offset_ms", physics, params, like)
    if _xp(like) is torch:
        plds = torch.as_tensor(list(physics["plds_ms"]), dtype=like.dtype, device=like.device)
    else:
        plds = np.asarray(list(physics["plds_ms"]), dtype=np.float64)
    return plds + _param("pld_offset_ms", physics, params, like)


def pcasl_blood_t1(cbf, att_ms, plds_ms, t1b_ms, tau_ms, alpha_eff, lambda_blood):
    """PCASL ΔM/M0 with blood T1 only; cbf, att (...,) and plds (..., n) or (n,) → (..., n)."""
    xp = _xp(cbf)
    f = cbf[..., None] / 6000.0
    att = att_ms[..., None]
    scale = 2.0 * alpha_eff * f / lambda_blood * (t1b_ms / 1000.0)
    transit = scale * (xp.exp(-att / t1b_ms) - xp.exp(-(tau_ms + plds_ms) / t1b_ms))
    arrived = scale * xp.exp(-plds_ms / t1b_ms) * (1.0 - xp.exp(-tau_ms / t1b_ms))
    zero = 0.0 * transit
    return xp.where(plds_ms < att - tau_ms, zero, xp.where(plds_ms < att, transit, arrived))


def pcasl_buxton_full(cbf, att_ms, plds_ms, t1b_ms, tau_ms, alpha_eff, lambda_blood, t1t_ms):
    """Full Buxton (1998) PCASL model with tissue relaxation; t = τ + PLD. Shapes as pcasl_blood_t1."""
    xp = _xp(cbf)
    f_prime = cbf[..., None] / 6000.0 / lambda_blood  # s^-1
    att = att_ms[..., None]
    t1_app_ms = 1.0 / (1.0 / t1t_ms + f_prime / 1000.0)
    t = tau_ms + plds_ms
    amp = 2.0 * alpha_eff * f_prime * (t1_app_ms / 1000.0) * xp.exp(-att / t1b_ms)
    elapsed = xp.where(t > att, t - att, 0.0 * att)
    during = amp * (1.0 - xp.exp(-elapsed / t1_app_ms))
    after = amp * xp.exp(-(t - tau_ms - att) / t1_app_ms) * (1.0 - xp.exp(-tau_ms / t1_app_ms))
    zero = 0.0 * during
    return xp.where(t < att, zero, xp.where(t < att + tau_ms, during, after))


def pcasl_buxton_full_jac(cbf, att_ms, plds_ms, t1b_ms, tau_ms, alpha_eff, lambda_blood, t1t_ms):
    """(signal, ∂/∂CBF, ∂/∂ATT) of :func:`pcasl_buxton_full` in closed form (shapes as pcasl_blood_t1).

    With k = f'/1000 (ms⁻¹), c = ∂k/∂CBF = 1/(6·10⁶ λ), T1' = 1/(1/T1t + k), E = exp(−ATT/T1b),
    amp = 2α E k T1' (so ∂amp/∂CBF = 2α E c T1'²/T1t and ∂T1'/∂CBF = −c T1'²):
      during (x = t − ATT): S = amp (1 − e^(−x/T1')); ∂S/∂CBF = ∂amp·q + amp c x e^(−x/T1');
                            ∂S/∂ATT = −S/T1b − amp e^(−x/T1')/T1'
      after (y = t − τ − ATT): S = amp e^(−y/T1') (1 − e^(−τ/T1'));
                            ∂S/∂CBF = ∂amp·D·Q − amp c D (y Q − τ e^(−τ/T1')); ∂S/∂ATT = S (1/T1' − 1/T1b)
    """
    xp = _xp(cbf)
    c = 1.0 / (6.0e6 * lambda_blood)
    k = cbf[..., None] * c
    att = att_ms[..., None]
    t1a = 1.0 / (1.0 / t1t_ms + k)
    e_att = xp.exp(-att / t1b_ms)
    amp = 2.0 * alpha_eff * e_att * k * t1a
    damp = 2.0 * alpha_eff * e_att * c * t1a * t1a / t1t_ms
    t = tau_ms + plds_ms
    x = xp.where(t > att, t - att, 0.0 * att)
    ex = xp.exp(-x / t1a)
    s_during = amp * (1.0 - ex)
    dc_during = damp * (1.0 - ex) + amp * c * x * ex
    da_during = -s_during / t1b_ms - amp * ex / t1a
    y = t - tau_ms - att
    d = xp.exp(-y / t1a)
    e_tau = xp.exp(-tau_ms / t1a)
    q = 1.0 - e_tau
    s_after = amp * d * q
    dc_after = damp * d * q - amp * c * d * (y * q - tau_ms * e_tau)
    da_after = s_after * (1.0 / t1a - 1.0 / t1b_ms)
    before = t < att
    during = t < att + tau_ms
    zero = 0.0 * s_during
    pick = lambda a, b: xp.where(before, zero, xp.where(during, a, b))  # noqa: E731
    return pick(s_during, s_after), pick(dc_during, dc_after), pick(da_during, da_after)


def pcasl_buxton_full_grid_products(att_grid_ms, plds_ms, t1b_ms, tau_ms, alpha_eff, lambda_blood, t1t_ms, signals):
    """⟨u, y⟩ and ⟨u, u⟩ (both (N, G)) of the unit-CBF signal u of :func:`pcasl_buxton_full` on an ATT grid (G,),
    PLDs (C,), per-voxel tissue T1 ``t1t_ms`` (N,) and signals y (N, C): the least-squares grid initialization's
    sums, without forming u on (N, G, C). The model is separable: with T1' per voxel (CBF = 1),
    e^(−(t − ATT)/T1') = e^(−t/T1') e^(ATT/T1') and e^(−(t − τ − ATT)/T1') = e^(−(t − τ)/T1') e^(ATT/T1'), so
    u = a (1 − E_t g) while the bolus arrives (−τ < ATT − t ≤ 0) and u = a g (1 − e^(−τ/T1')) P_t after it, with
    a = 2α k T1' e^(−ATT/T1b), g = e^(ATT/T1'), E_t = e^(−t/T1'), P_t = e^(−(t − τ)/T1'); the sums over t become
    matrix products with the (G, C) branch masks. Same values as the direct sums to rounding. Scalars t1b_ms,
    tau_ms, alpha_eff, lambda_blood; torch tensors."""
    k = 1.0 / 6000.0 / lambda_blood / 1000.0  # f'/1000 at CBF 1, ms⁻¹
    t1a = (1.0 / (1.0 / t1t_ms + k))[:, None]  # (N, 1)
    att = att_grid_ms[None, :]  # (1, G)
    t = tau_ms + plds_ms  # (C,)
    phase = att[0][:, None] - t[None, :]  # (G, C): > 0 before the bolus arrives
    during = ((phase <= 0) & (phase > -tau_ms)).to(signals.dtype)
    after = (phase <= -tau_ms).to(signals.dtype)
    grow = torch.exp(att / t1a)  # (N, G)
    amp = 2.0 * alpha_eff * k * t1a * torch.exp(-att / t1b_ms)  # (N, G)
    amp_after = amp * grow * (1.0 - torch.exp(-tau_ms / t1a))
    e_t = torch.exp(-t / t1a)  # (N, C)
    p_t = torch.exp(-(t - tau_ms) / t1a)
    num = amp * (signals @ during.T - grow * ((e_t * signals) @ during.T)) + amp_after * ((p_t * signals) @ after.T)
    den = (amp * amp * (during.sum(1) - 2.0 * grow * (e_t @ during.T) + grow * grow * ((e_t * e_t) @ during.T))
           + amp_after * amp_after * ((p_t * p_t) @ after.T))
    return num, den


def vsasl_multiverse(cbf, att_ms, plds_ms, t1b_ms, alpha_eff, lambda_blood):
    """VSASL ΔM/M0 (MULTIVERSE): (2 α2 f/λ)(min(PLD, ATT)/1000) exp(−PLD/T1b)."""
    xp = _xp(cbf)
    f = cbf[..., None] / 6000.0
    att = att_ms[..., None]
    return 2.0 * alpha_eff * f / lambda_blood * (xp.minimum(plds_ms, att) / 1000.0) * xp.exp(-plds_ms / t1b_ms)


def pcasl_blood_t1_datt(cbf, att_ms, plds_ms, t1b_ms, tau_ms, alpha_eff, lambda_blood):
    """∂/∂ATT of :func:`pcasl_blood_t1`: −(2α1 f/λ)(T1b/1000)/T1b·exp(−ATT/T1b) in the transit branch, else 0."""
    xp = _xp(cbf)
    f = cbf[..., None] / 6000.0
    att = att_ms[..., None]
    scale = 2.0 * alpha_eff * f / lambda_blood * (t1b_ms / 1000.0)
    transit = -scale / t1b_ms * xp.exp(-att / t1b_ms) + 0.0 * plds_ms
    inside = (plds_ms >= att - tau_ms) & (plds_ms < att)
    return xp.where(inside, transit, 0.0 * transit)


def vsasl_multiverse_datt(cbf, att_ms, plds_ms, t1b_ms, alpha_eff, lambda_blood):
    """∂/∂ATT of :func:`vsasl_multiverse`: (2α2 f/λ)/1000·exp(−PLD/T1b) while ATT < PLD, else 0."""
    xp = _xp(cbf)
    f = cbf[..., None] / 6000.0
    att = att_ms[..., None]
    slope = 2.0 * alpha_eff * f / lambda_blood / 1000.0 * xp.exp(-plds_ms / t1b_ms) + 0.0 * att
    return xp.where(att < plds_ms, slope, 0.0 * slope)


def _curves(cbf, att_ms, physics: Mapping, params: Mapping | None, d_att: bool = False):
    """Per-mode signals (or their ATT derivatives) concatenated over channels, times the M0 scale."""
    xp = _xp(cbf)
    plds = _plds(physics, params, cbf)
    t1b = _param("t1_blood_ms", physics, params, cbf)
    lam = float(physics["lambda_blood"])
    bs1 = _param("alpha_bs1", physics, params, cbf)
    out = []
    for mode in physics["modes"]:
        if mode == "pcasl":
            alpha = _param("alpha_pcasl", physics, params, cbf) * bs1 ** int(physics["n_bs_pcasl"])
            tau = _param("tau_ms", physics, params, cbf)
            if physics["pcasl_model"] == "buxton_full":
                if d_att:
                    raise ValueError("no closed-form ATT derivative for buxton_full (use finite differences)")
                out.append(pcasl_buxton_full(cbf, att_ms, plds, t1b, tau, alpha, lam,
                                             _param("t1_tissue_ms", physics, params, cbf)))
            else:
                fn = pcasl_blood_t1_datt if d_att else pcasl_blood_t1
                out.append(fn(cbf, att_ms, plds, t1b, tau, alpha, lam))
        elif mode == "vsasl":
            alpha = _param("alpha_vsasl", physics, params, cbf) * bs1 ** int(physics["n_bs_vsasl"])
            fn = vsasl_multiverse_datt if d_att else vsasl_multiverse
            out.append(fn(cbf, att_ms, plds, t1b, alpha, lam))
        else:
            raise ValueError(f"physics.modes: unknown mode {mode!r} (use {list(MODES)})")
    joined = torch.cat(out, dim=-1) if xp is torch else np.concatenate(np.broadcast_arrays(*out), axis=-1)
    return joined * _param("m0_scale", physics, params, cbf)


def _as_arrays(cbf, att_ms):
    if isinstance(cbf, torch.Tensor):
        return cbf, torch.as_tensor(att_ms, dtype=cbf.dtype, device=cbf.device)
    return np.asarray(cbf, dtype=np.float64), np.asarray(att_ms, dtype=np.float64)


def signal_curves(cbf, att_ms, physics: Mapping, params: Mapping | None = None):
    """Noise-free ΔM/M0 for every channel [PCASL(PLD1..N), VSASL(PLD1..N)] (modes in config order).

    Args:
        cbf, att_ms: tensors (or numpy arrays: then the result is numpy float64) of the same shape ``(...,)``.
        physics: the ``physics`` config section (nominal values, modes, PLDs, PCASL model).
        params: optional per-voxel/per-phantom overrides (arrays broadcastable to ``cbf``) of
            t1_blood_ms, tau_ms, alpha_pcasl, alpha_vsasl, alpha_bs1, plus m0_scale (multiplies the
            signal: M0 calibration error), pld_offset_ms (added to every PLD: slice timing) and t1_tissue_ms
            (a per-voxel tissue T1 map for buxton_full, e.g. from GM/WM partial volumes).
    Returns:
        ``(..., n_modes·n_plds)``.
    """
    cbf, att_ms = _as_arrays(cbf, att_ms)
    return _curves(cbf, att_ms, physics, params)


def signal_curves_np(cbf, att_ms, physics: Mapping, params: Mapping | None = None) -> np.ndarray:
    """numpy (float64) front of :func:`signal_curves`."""
    return signal_curves(np.asarray(cbf, dtype=np.float64), np.asarray(att_ms, dtype=np.float64), physics,
                         None if params is None else {k: np.asarray(v, dtype=np.float64) for k, v in params.items()})


def signal_jacobian(cbf, att_ms, physics: Mapping, params: Mapping | None = None):
    """(signal, ∂signal/∂(CBF, ATT)): shapes (..., C) and (..., C, 2).

    Closed form for every model: blood-T1 PCASL and VSASL are linear in CBF (∂S/∂CBF = S(CBF=1)); the full
    Buxton model's derivatives are :func:`pcasl_buxton_full_jac` (tested against finite differences).
    """
    cbf, att_ms = _as_arrays(cbf, att_ms)
    xp = _xp(cbf)
    if "pcasl" in physics["modes"] and physics["pcasl_model"] == "buxton_full":
        sigs, d_cbfs, d_atts = [], [], []
        for mode in physics["modes"]:
            one = {**physics, "modes": [mode]}
            if mode == "pcasl":
                plds = _plds(physics, params, cbf)
                alpha = _param("alpha_pcasl", physics, params, cbf) * _param("alpha_bs1", physics, params, cbf) ** int(
                    physics["n_bs_pcasl"])
                s_, dc_, da_ = pcasl_buxton_full_jac(
                    cbf, att_ms, plds, _param("t1_blood_ms", physics, params, cbf), _param("tau_ms", physics, params, cbf),
                    alpha, float(physics["lambda_blood"]), _param("t1_tissue_ms", physics, params, cbf))
                scale = _param("m0_scale", physics, params, cbf)
                sigs.append(s_ * scale)
                d_cbfs.append(dc_ * scale)
                d_atts.append(da_ * scale)
            else:
                unit = _curves(0.0 * cbf + 1.0, att_ms, one, params)
                sigs.append(unit * cbf[..., None])
                d_cbfs.append(unit)
                d_atts.append(_curves(cbf, att_ms, one, params, d_att=True))
        cat = (lambda parts: torch.cat(parts, dim=-1)) if xp is torch else (  # noqa: E731
            lambda parts: np.concatenate(np.broadcast_arrays(*parts), axis=-1))
        sig, d_cbf, d_att = cat(sigs), cat(d_cbfs), cat(d_atts)
    else:
        d_cbf = _curves(0.0 * cbf + 1.0, att_ms, physics, params)
        sig = d_cbf * cbf[..., None]
        d_att = _curves(cbf, att_ms, physics, params, d_att=True)
    jac = torch.stack([d_cbf, d_att], dim=-1) if xp is torch else np.stack([d_cbf, d_att], axis=-1)
    return sig, jac


def crlb(cbf, att_ms, physics: Mapping, sigma, params: Mapping | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Cramér-Rao lower bounds (variances) of CBF and ATT for i.i.d. Gaussian noise of std ``sigma``.

    Fisher information I = JᵀJ / σ² with J the (C × 2) Jacobian of the signal model; CRLB = diag(I⁻¹).
    A voxel whose signal does not depend on ATT (e.g. every PLD before the bolus) has singular I: +inf.
    Returns (var_cbf in (ml/100g/min)², var_att in ms²).
    """
    cbf = torch.as_tensor(cbf, dtype=torch.float64)
    att_ms = torch.as_tensor(att_ms, dtype=torch.float64)
    _, jac = signal_jacobian(cbf, att_ms, physics, params)
    return crlb_from_jacobian(jac, sigma)


def crlb_from_jacobian(jac, sigma) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`crlb` from a Jacobian already at hand ((..., C, 2) in ml/100g/min and ms, e.g. the one the batched fit
    ends with: asl.fitting.fit_batched "jacobian")."""
    jac = torch.as_tensor(jac, dtype=torch.float64)
    sigma = torch.as_tensor(sigma, dtype=torch.float64)
    fisher = jac.transpose(-1, -2) @ jac / (sigma**2)[..., None, None]
    a, b, d = fisher[..., 0, 0], fisher[..., 0, 1], fisher[..., 1, 1]
    det = a * d - b * b
    ok = det > 1e-12 * (a * d).clamp_min(1e-300)
    inf = torch.full_like(det, float("inf"))
    var_cbf = torch.where(ok, d / torch.where(ok, det, torch.ones_like(det)), inf)
    var_att = torch.where(ok, a / torch.where(ok, det, torch.ones_like(det)), inf)
    return var_cbf, var_att


# ----------------------------------------------------------------------------------- SNR definition
REFERENCE_GM = {"cbf": 60.0, "att_ms": 1300.0}


def reference_signal(physics: Mapping) -> float:
    """S_ref: the mean over all acquired channels of the noise-free ΔM/M0 of a reference grey-matter voxel
    (CBF 60 ml/100g/min, ATT 1300 ms) under the NOMINAL physics of ``physics``.

    THE SNR DEFINITION (used everywhere in asl/): noise std σ = S_ref / SNR, the same σ in every channel,
    applied to the final (averaged) ΔM/M0 images. Network inputs are ΔM/M0 divided by S_ref, so a GM
    voxel reads ≈ 1 and the input noise std is 1/SNR.
    """
    sig = signal_curves(torch.tensor([REFERENCE_GM["cbf"]], dtype=torch.float64),
                        torch.tensor([REFERENCE_GM["att_ms"]], dtype=torch.float64), physics)
    return float(sig.mean())


def noise_sigma(snr, physics: Mapping):
    """σ = S_ref / SNR (see :func:`reference_signal`); works for floats, numpy arrays and tensors."""
    return reference_signal(physics) / snr
