"""Least-squares inputs of protocol-conditioned networks (``protocol_net.ls_inputs``).

The network is given the voxel-wise least-squares estimate and its Cramér-Rao bound and blends them with its
own estimate. Training (asl.protocol_data.simulate_batch), validation and prediction
(asl.protocol_data.predict_volume, used by predict_asl.py and protocol_eval.py) all build these inputs with
:func:`ls_input_channels`, so a checkpoint sees at prediction exactly what it was trained on:

- the fit: asl.fitting.fit_batched (the batched Levenberg-Marquardt predict_asl.py runs) with the fit settings
  recorded in the checkpoint (``preprocessing.fit``), the protocol's NOMINAL physics (what a sidecar states),
  the full Buxton PCASL model and the voxel tissue T1 w·T1_GM + (1 − w)·T1_WM from the GM weight input w
  (1331 / 832 ms, Wansapura et al. JMRI 1999; w = 1 without partial-volume maps), on brain-mask voxels;
- the noise: σ² = Σ cost / (N (C − 2)) pooled over the N fitted voxels that did not fail (converged, finite,
  not at a bound), C measurements (the residual-variance estimator of nonlinear least squares);
- the bound: asl.physics.crlb_from_jacobian (Fisher information JᵀJ/σ² of the fitted signal model at the
  estimate, from the Jacobian the fit ends with).

Channels (LS_CHANNELS, per voxel): LS CBF / 50 (ml/100g/min), (LS ATT − 1500 ms) / 1000 ms, ln CRLB variance of
CBF ((ml/100g/min)²), ln CRLB variance of ATT (ms²), valid (1 where the fit did not fail and both bounds are
finite). Invalid voxels (outside the mask, failed fits, fewer than 3 measurements: σ not estimable) carry
0, 0, LN_VAR_INVALID, LN_VAR_INVALID, 0.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import torch

from asl.brain_volume import T1_GM_MS, T1_WM_MS
from asl.fitting import fit_batched
from asl.physics import crlb_from_jacobian

LS_CHANNELS = 5
LN_VAR_INVALID = 30.0  # ln variance of an unusable LS estimate (e^30: no weight in an inverse-variance blend)
LN_VAR_RANGE = (-10.0, LN_VAR_INVALID)


def nominal_physics(arrays: Mapping) -> dict:
    """asl.physics dictionary of ONE protocol's padded arrays (asl.protocol.protocol_arrays, numpy or tensors
    without a batch axis): modes in measurement order, the PLD list of the first mode, effective labeling
    efficiencies (background suppression already folded in, so n_bs = 0), full Buxton PCASL model."""
    a = {k: np.asarray(v.detach().cpu() if isinstance(v, torch.Tensor) else v, dtype=np.float64)
         for k, v in arrays.items()}
    valid = a["valid"] > 0.5
    kinds = a["is_vsasl"][valid] > 0.5
    plds = a["pld_ms"][valid]
    modes = list(dict.fromkeys("vsasl" if k else "pcasl" for k in kinds))
    first = plds[kinds == (modes[0] == "vsasl")]
    return {"modes": modes, "plds_ms": [float(p) for p in first], "pcasl_model": "buxton_full",
            "t1_blood_ms": float(a["t1_blood_ms"]), "t1_tissue_ms": T1_GM_MS, "tau_ms": float(a["tau_ms"]),
            "alpha_pcasl": float(a["alpha_eff_pcasl"]), "alpha_vsasl": float(a["alpha_eff_vsasl"]),
            "alpha_bs1": 1.0, "n_bs_pcasl": 0, "n_bs_vsasl": 0, "lambda_blood": float(a["lambda_blood"])}


def tissue_t1_from_gm_weight(gm_weight):
    """Voxel tissue T1 (ms) from the GM weight w = GM/(GM + WM): w·T1_GM + (1 − w)·T1_WM."""
    return gm_weight * T1_GM_MS + (1 - gm_weight) * T1_WM_MS


def ls_input_channels(signals: np.ndarray, gm_weight: np.ndarray, physics: Mapping, fit_cfg: Mapping,
                      device="cpu", fit: Mapping | None = None) -> tuple[np.ndarray, dict]:
    """signals (N, C) ΔM/M0 of the brain voxels of one acquisition (C valid measurements, the order of
    ``physics``), gm_weight (N,) → the (N, LS_CHANNELS) float32 channels of the module docstring and
    {"sigma": pooled σ (ΔM/M0) or None, "n_fitted": N}. ``fit``: the fit_batched result of this very problem
    when the caller has it already (predict_asl.py fits LS once for its maps and the network), else it is fitted."""
    n, c = signals.shape
    out = np.zeros((n, LS_CHANNELS), np.float32)
    out[:, 2:4] = LN_VAR_INVALID
    if n == 0:
        return out, {"sigma": None, "n_fitted": 0}
    if c <= 2 and fit is None:  # σ is not estimable: the channels stay invalid whatever the fit gives
        return out, {"sigma": None, "n_fitted": 0}
    if fit is None:
        t1 = tissue_t1_from_gm_weight(np.asarray(gm_weight, np.float64))
        res = fit_batched(np.asarray(signals, np.float64), physics, {"t1_tissue_ms": t1}, fit_cfg, device=device)
    elif len(fit["cbf"]) != n:
        raise ValueError(f"the LS fit given covers {len(fit['cbf'])} voxels, the signals {n}")
    else:
        res = fit
    ok = ~res["failed"]
    if c <= 2 or not ok.any():
        return out, {"sigma": None, "n_fitted": n}
    sigma = float(np.sqrt(res["cost"][ok].sum() / (ok.sum() * (c - 2))))
    var_c, var_a = crlb_from_jacobian(res["jacobian"], torch.full((n,), max(sigma, 1e-12), dtype=torch.float64))
    var_c, var_a = var_c.numpy(), var_a.numpy()
    good = ok & np.isfinite(var_c) & np.isfinite(var_a) & (var_c > 0) & (var_a > 0)
    out[good, 0] = res["cbf"][good] / 50.0
    out[good, 1] = (res["att"][good] - 1500.0) / 1000.0
    out[good, 2] = np.clip(np.log(var_c[good]), *LN_VAR_RANGE)
    out[good, 3] = np.clip(np.log(var_a[good]), *LN_VAR_RANGE)
    out[good, 4] = 1.0
    return out, {"sigma": sigma, "n_fitted": n}
