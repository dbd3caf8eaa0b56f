"""Two-compartment GM/WM partial-volume correction by local linear regression (Asllani, Borogovac & Brown,
MRM 2008;60:1362-1371), then a least-squares fit of each compartment with its own tissue T1.

Within an n×n in-plane kernel around each voxel, every brain voxel i of the kernel is modelled as
ΔM_i = P_GM,i·ΔM_GM + P_WM,i·ΔM_WM (one GM and one WM signal per kernel and channel; CSF carries none), solved
by least squares; the centre voxel gets its kernel's GM and WM signals. The 2×2 normal equations use box sums of
P_GM², P_GM·P_WM, P_WM², P_GM·y and P_WM·y, so all voxels are solved at once. A small ridge (``ridge`` × trace)
keeps kernels with one tissue only solvable (their other compartment is then ≈ 0 and is not reported:
``*_ok`` needs ≥ ``min_fraction`` mean fraction of that tissue in the kernel).
"""

from __future__ import annotations

import numpy as np
from scipy import ndimage

PVC_DEFAULTS = {"kernel": 5, "ridge": 1e-3, "min_fraction": 0.1}


def _box_sum(a: np.ndarray, k: int) -> np.ndarray:
    """Sum over an in-plane k×k window (zero outside the image) for (X, Y, Z[, C]) arrays."""
    size = (k, k) + (1,) * (a.ndim - 2)
    return ndimage.uniform_filter(a, size=size, mode="constant", cval=0.0) * (k * k)


def linear_regression_pvc(signals: np.ndarray, gm: np.ndarray, wm: np.ndarray, mask: np.ndarray,
                          kernel: int = 5, ridge: float = 1e-3, min_fraction: float = 0.1) -> dict:
    """signals (X, Y, Z, C), gm/wm fractions and mask (X, Y, Z) → gm_signals, wm_signals (X, Y, Z, C) and
    gm_ok, wm_ok (X, Y, Z) bool (inside the mask with enough of that tissue in the kernel)."""
    if kernel < 3 or kernel % 2 == 0:
        raise ValueError(f"PVC kernel must be odd and ≥ 3, got {kernel}")
    m = mask.astype(np.float64)
    pg, pw = gm * m, wm * m
    y = np.where(mask[..., None], signals, 0.0)
    a, b, d = _box_sum(pg * pg, kernel), _box_sum(pg * pw, kernel), _box_sum(pw * pw, kernel)
    lam = ridge * (a + d)
    a, d = a + lam, d + lam
    u, v = _box_sum(pg[..., None] * y, kernel), _box_sum(pw[..., None] * y, kernel)
    det = np.maximum(a * d - b * b, 1e-30)[..., None]
    gm_sig = (d[..., None] * u - b[..., None] * v) / det
    wm_sig = (a[..., None] * v - b[..., None] * u) / det
    count = np.maximum(_box_sum(m, kernel), 1.0)
    return {"gm_signals": gm_sig, "wm_signals": wm_sig,
            "gm_ok": mask & (_box_sum(pg, kernel) / count >= min_fraction),
            "wm_ok": mask & (_box_sum(pw, kernel) / count >= min_fraction)}
