"""Acquisition protocols as data: randomized protocols for training, their signals, and the range a
protocol-conditioned network covers.

A protocol is a padded set of M_MAX measurements (one per labeling mode and PLD) plus per-subject physics,
as tensors with a leading batch axis:
- ``pld_ms`` (B, M), ``is_vsasl`` (B, M) 0/1, ``valid`` (B, M) 0/1 (padding = 0);
- ``tau_ms`` (B,) PCASL labeling duration, ``t1_blood_ms`` (B,), ``alpha_eff_pcasl`` / ``alpha_eff_vsasl`` (B,)
  effective labeling efficiencies α·α_BS1^n (background-suppression pulses included), ``lambda_blood`` (B,).
Signals (ΔM/M0) follow asl.physics: PCASL the full Buxton (1998) model with a per-voxel tissue T1, VSASL the
MULTIVERSE model; plus the PCASL macrovascular component of asl.brain_volume. The input scale of a protocol
is its S_ref (the project's SNR definition, asl.physics.reference_signal): the mean over its measurements of
the nominal signal of a GM voxel (CBF 60, ATT 1300 ms, tissue T1 1331 ms).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from asl.brain_volume import T1_GM_MS
from asl.physics import REFERENCE_GM, pcasl_buxton_full, vsasl_multiverse

M_MAX = 16  # at most 8 PLDs × 2 modes

PROTOCOL_DEFAULTS = {
    "mode_sets": [["pcasl"], ["vsasl"], ["pcasl", "vsasl"]],  # drawn uniformly per training subject
    "n_plds": [1, 8],  # PLDs per mode (inclusive range)
    "pld_range_ms": [200.0, 3500.0],  # every PLD lies in this range
    "tau_ms": [1200.0, 2200.0],  # PCASL labeling duration range
    "t1_blood_ms": [1350.0, 2100.0],  # nominal blood T1 range (1.5 T to 7 T; asl.acquisition.blood_t1_for_field)
    "alpha_pcasl": [0.75, 0.95],  # nominal labeling efficiencies (the sidecar's LabelingEfficiency)
    "alpha_vsasl": [0.45, 0.65],
    "bs_pulses_pcasl": [0, 2, 4],  # background-suppression pulse counts drawn (0 = no BS)
    "bs_pulses_vsasl": [0, 3],
    "alpha_bs1": 0.95,  # nominal efficiency per BS pulse
    "true_physics_rel": 0.05,  # the subject's true α_eff, T1b and τ differ from the nominal ones by ± this
    "lambda_blood": 0.9,
}


def draw_protocol(rng: np.random.Generator, cfg: Mapping) -> dict:
    """One random protocol (numpy, unbatched): nominal values (what a sidecar states) and the subject's true
    ones (``true_*``: nominal × (1 ± true_physics_rel))."""
    modes = list(cfg["mode_sets"][int(rng.integers(len(cfg["mode_sets"])))])
    n = int(rng.integers(int(cfg["n_plds"][0]), int(cfg["n_plds"][1]) + 1))
    lo, hi = (float(v) for v in cfg["pld_range_ms"])
    if rng.uniform() < 0.5 and n > 1:  # evenly spaced between two random ends
        a, b = np.sort(rng.uniform(lo, hi, 2))
        plds = np.linspace(a, b, n)
    else:
        plds = np.sort(rng.uniform(lo, hi, n))
    nominal = {"tau_ms": float(rng.uniform(*cfg["tau_ms"])), "t1_blood_ms": float(rng.uniform(*cfg["t1_blood_ms"]))}
    bs1 = float(cfg["alpha_bs1"])
    for mode in ("pcasl", "vsasl"):
        n_bs = int(rng.choice(cfg[f"bs_pulses_{mode}"]))
        nominal[f"alpha_eff_{mode}"] = float(rng.uniform(*cfg[f"alpha_{mode}"])) * bs1**n_bs
        nominal[f"n_bs_{mode}"] = n_bs
    rel = float(cfg["true_physics_rel"])
    true = {k: nominal[k] * (1 + rng.uniform(-rel, rel)) for k in ("tau_ms", "t1_blood_ms", "alpha_eff_pcasl",
                                                                    "alpha_eff_vsasl")}
    return {"modes": modes, "plds_ms": [float(p) for p in plds], **nominal, **{f"true_{k}": v for k, v in true.items()},
            "lambda_blood": float(cfg["lambda_blood"])}


def protocol_arrays(protocol: Mapping, true: bool = False) -> dict:
    """The padded measurement set of one protocol as float32 numpy arrays (see the module docstring);
    ``true``: the subject's true physics instead of the nominal one."""
    plds = np.zeros(M_MAX, np.float32)
    is_vs = np.zeros(M_MAX, np.float32)
    valid = np.zeros(M_MAX, np.float32)
    i = 0
    for mode in protocol["modes"]:
        for pld in protocol["plds_ms"]:
            if i >= M_MAX:
                raise ValueError(f"more than {M_MAX} measurements ({len(protocol['modes'])} modes × "
                                 f"{len(protocol['plds_ms'])} PLDs)")
            plds[i], is_vs[i], valid[i] = pld, float(mode == "vsasl"), 1.0
            i += 1
    pre = "true_" if true else ""
    return {"pld_ms": plds, "is_vsasl": is_vs, "valid": valid,
            **{k: np.float32(protocol[pre + k]) for k in ("tau_ms", "t1_blood_ms", "alpha_eff_pcasl", "alpha_eff_vsasl")},
            "lambda_blood": np.float32(protocol["lambda_blood"])}


def _b(value: torch.Tensor, ndim: int) -> torch.Tensor:
    """A (B,) or (B, M) tensor reshaped to broadcast against (B, *spatial[ndim], M)."""
    if value.ndim == 1:
        return value.reshape(value.shape[0], *([1] * (ndim + 1)))
    return value.reshape(value.shape[0], *([1] * ndim), value.shape[1])


def protocol_signals(cbf: torch.Tensor, att_ms: torch.Tensor, t1_tissue_ms: torch.Tensor | float, proto: Mapping,
                     abv: torch.Tensor | None = None, aatt_ms: torch.Tensor | None = None) -> torch.Tensor:
    """ΔM/M0 of maps (B, *S) under batched protocols → (B, M_MAX, *S), zero at padded measurements.

    PCASL: asl.physics.pcasl_buxton_full with the voxel tissue T1 (plus the macrovascular term when ``abv``
    is given); VSASL: asl.physics.vsasl_multiverse.
    """
    nd = cbf.ndim - 1
    pld = _b(proto["pld_ms"].to(cbf), nd)
    tau, t1b = _b(proto["tau_ms"].to(cbf), nd), _b(proto["t1_blood_ms"].to(cbf), nd)
    lam = _b(proto["lambda_blood"].to(cbf), nd)
    a_pc, a_vs = _b(proto["alpha_eff_pcasl"].to(cbf), nd), _b(proto["alpha_eff_vsasl"].to(cbf), nd)
    t1t = torch.as_tensor(t1_tissue_ms, dtype=cbf.dtype, device=cbf.device)
    t1t = t1t[..., None] if t1t.ndim else t1t
    pc = pcasl_buxton_full(cbf, att_ms, pld, t1b, tau, a_pc, lam, t1t)
    if abv is not None:
        t = tau + pld
        aatt = aatt_ms[..., None]
        bolus = (t >= aatt) & (t < aatt + tau)
        pc = pc + torch.where(bolus, 2.0 * a_pc * abv[..., None] * torch.exp(-aatt / t1b) / lam, 0.0 * pc)
    vs = vsasl_multiverse(cbf, att_ms, pld, t1b, a_vs, lam)
    is_vs, valid = _b(proto["is_vsasl"].to(cbf), nd), _b(proto["valid"].to(cbf), nd)
    out = (pc * (1 - is_vs) + vs * is_vs) * valid
    return out.movedim(-1, 1)


def reference_scale(proto: Mapping) -> torch.Tensor:
    """S_ref per protocol (B,): mean over valid measurements of the nominal reference GM signal."""
    b = proto["pld_ms"].shape[0]
    cbf = torch.full((b,), REFERENCE_GM["cbf"], dtype=torch.float64, device=proto["pld_ms"].device)
    att = torch.full_like(cbf, REFERENCE_GM["att_ms"])
    p64 = {k: v.double() for k, v in proto.items()}
    sig = protocol_signals(cbf, att, T1_GM_MS, p64)  # (B, M)
    return (sig.sum(1) / p64["valid"].sum(1).clamp_min(1)).to(proto["pld_ms"].dtype)


def protocol_range(cfg: Mapping) -> dict:
    """What a network trained on ``cfg`` protocols covers (stored in its checkpoint)."""
    return {"mode_sets": [sorted(m) for m in cfg["mode_sets"]], "n_plds": [int(v) for v in cfg["n_plds"]],
            "pld_range_ms": [float(v) for v in cfg["pld_range_ms"]], "tau_ms": [float(v) for v in cfg["tau_ms"]],
            "t1_blood_ms": [float(v) for v in cfg["t1_blood_ms"]]}


def protocol_coverage(physics: Mapping, covered: Mapping) -> list[str]:
    """Why data acquired with ``physics`` (asl.acquisition.data_physics) lie outside a protocol-conditioned
    network's training range ``covered`` (:func:`protocol_range`); empty when they do not."""
    problems = []
    modes = sorted(physics["modes"])
    if modes not in [sorted(m) for m in covered["mode_sets"]]:
        problems.append(f"labeling modes {[m.upper() for m in modes]} not among the trained mode sets "
                        f"{[[m.upper() for m in s] for s in covered['mode_sets']]}")
    n = len(physics["plds_ms"])
    if not covered["n_plds"][0] <= n <= covered["n_plds"][1]:
        problems.append(f"{n} PLDs outside the trained {covered['n_plds'][0]}-{covered['n_plds'][1]}")
    lo, hi = covered["pld_range_ms"]
    outside = [p for p in physics["plds_ms"] if not lo - 1e-6 <= float(p) <= hi + 1e-6]
    if outside:
        problems.append(f"PLDs {outside} ms outside the trained range [{lo:g}, {hi:g}] ms")
    if "pcasl" in physics["modes"]:
        lo, hi = covered["tau_ms"]
        if not lo - 1e-6 <= float(physics["tau_ms"]) <= hi + 1e-6:
            problems.append(f"labeling duration {physics['tau_ms']:g} ms outside the trained range [{lo:g}, {hi:g}] ms")
    lo, hi = covered["t1_blood_ms"]
    if not lo - 1e-6 <= float(physics["t1_blood_ms"]) <= hi + 1e-6:
        problems.append(f"blood T1 {physics['t1_blood_ms']:g} ms outside the trained range [{lo:g}, {hi:g}] ms")
    if "pcasl" in physics["modes"] and physics.get("pcasl_model", "buxton_full") != "buxton_full":
        problems.append(f"PCASL model {physics['pcasl_model']!r}: the network was trained with 'buxton_full'")
    return problems


def protocol_from_physics(physics: Mapping) -> dict:
    """The nominal protocol (draw_protocol's keys) of data physics (asl.acquisition.data_physics)."""
    bs1 = float(physics["alpha_bs1"])
    out = {"modes": list(physics["modes"]), "plds_ms": [float(p) for p in physics["plds_ms"]],
           "tau_ms": float(physics["tau_ms"]), "t1_blood_ms": float(physics["t1_blood_ms"]),
           "lambda_blood": float(physics["lambda_blood"])}
    for mode in ("pcasl", "vsasl"):
        out[f"alpha_eff_{mode}"] = float(physics[f"alpha_{mode}"]) * bs1 ** int(physics[f"n_bs_{mode}"])
    return out
