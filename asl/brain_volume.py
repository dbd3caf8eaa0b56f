"""3D brain subjects at the matrix size of real scans, for training and held-out evaluation of
protocol-conditioned networks (asl/protocol_net.py).

A subject is a slab of an ellipsoidal brain on a (64, 64, 24) grid of 3.5 × 3.5 × 4 mm voxels (config
``brain:``), deterministic from a seed:
- anatomy: warped ellipsoid, cortical GM ribbon folded by a 3D field, sulcal CSF, WM, ventricles, deep GM;
  hard labels on a 2× finer grid averaged down to the voxel grid, so GM/WM/CSF partial-volume fractions are
  real voxel fractions;
- tissue T1 per tissue (3 T, Wansapura et al. JMRI 1999: GM 1331 ms, WM 832 ms), the voxel's T1 is the
  GM/WM-fraction-weighted mean (CSF carries no perfusion signal); the same T1 map enters the signal and the
  least-squares reference fit, so the fit is correctly specified;
- per-tissue CBF/ATT means drawn per subject, smooth 3D multiplicative CBF fields, ATT gradients along two
  axes plus a deep-WM delay that grows with distance from the cortex (border zones), per-voxel jitter;
- lesions (tumour rim/core, stroke core/penumbra) as 3D blobs with the ranges of ``phantom:``;
- macrovascular signal (no vascular crushing, drawn per subject): arterial blood volume aBV along a few
  vessel paths near the brain surface and the Sylvian region, arterial arrival aATT shorter than tissue ATT.
  PCASL arterial component (Chappell et al. MRM 2010, BASIL's macrovascular model without dispersion):
  ΔM_art/M0 = 2 α aBV exp(−aATT/T1b) / λ while aATT ≤ τ + PLD < aATT + τ, else 0 (the bolus is still in the
  artery at readout only for PLD < aATT). It is a nuisance: the truth CBF/ATT are the tissue values.

Voxel truth: CBF = Σ_t f_t CBF_t (t ∈ GM, WM), ATT = flow-weighted Σ_t f_t CBF_t ATT_t / CBF; the tissue
signal is the single-compartment full Buxton model at these values and the voxel T1 (asl.physics).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
from scipy import ndimage

from asl.simulate import LABELS

T1_GM_MS, T1_WM_MS = 1331.0, 832.0  # 3 T tissue T1 (Wansapura et al. JMRI 1999)

BRAIN_DEFAULTS = {
    "shape": [64, 64, 24],  # voxels (x, y, z) of a whole subject
    "voxel_mm": [3.5, 3.5, 4.0],
    "semi_axes_mm": [[62.0, 72.0], [76.0, 88.0], [52.0, 62.0]],  # brain ellipsoid semi-axes (x, y, z) ranges
    "cortex_thickness_mm": [9.0, 14.0],  # GM ribbon thickness range (folded ± 40 %)
    "gm_cbf": [40.0, 75.0],  # per-subject tissue means (ml/100g/min)
    "wm_cbf": [15.0, 30.0],
    "gm_att_ms": [800.0, 1500.0],
    "wm_att_ms": [1100.0, 1900.0],
    "deep_wm_delay_ms": [0.0, 600.0],  # extra WM ATT at the deepest WM (border zones)
    "att_gradient_ms": 250.0,  # ± along a random in-plane direction and along z
    "cbf_field_rel": 0.2,  # ± smooth multiplicative CBF variation
    "field_sigma_mm": 20.0,  # smoothness of the random fields
    "pixel_jitter_rel": 0.03,
    "t1_tissue_jitter_rel": 0.05,  # per-subject jitter of both tissue T1 values
    "p_macrovascular": 0.5,  # share of subjects without vascular crushing (arterial signal present)
    "abv_max": [0.005, 0.02],  # peak arterial blood volume fraction in vessel voxels
    "aatt_ms": [400.0, 900.0],  # arterial arrival time of the macrovascular bolus
    "n_vessels": [3, 6],
}


def _u(rng: np.random.Generator, lo_hi) -> float:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return float(rng.uniform(lo, hi)) if hi > lo else lo


def _field(rng: np.random.Generator, shape, sigma_vox) -> np.ndarray:
    """Zero-mean smooth random field scaled to max |·| = 1."""
    f = ndimage.gaussian_filter(rng.standard_normal(shape), sigma_vox, mode="reflect")
    return f / max(float(np.abs(f).max()), 1e-12)


def _coords(voxel_mm, centre_mm, ranges, factor: int):
    """Voxel-centre coordinates in mm (relative to the brain centre) of the voxel index ranges
    ``ranges`` = ((x0, x1), (y0, y1), (z0, z1)) on a grid refined ``factor``× in every direction."""
    axes = [(np.arange(lo * factor, hi * factor) + 0.5) / factor * v - c
            for (lo, hi), v, c in zip(ranges, voxel_mm, centre_mm)]
    return np.meshgrid(*axes, indexing="ij")


def _downsample(a: np.ndarray, factor: int) -> np.ndarray:
    x, y, z = (s // factor for s in a.shape)
    return a.reshape(x, factor, y, factor, z, factor).mean(axis=(1, 3, 5))


def generate_brain(seed: int, cfg: Mapping, phantom_cfg: Mapping, z_slices: tuple[int, int] | None = None,
                   xy_crop: tuple[int, int, int] | None = None) -> dict:
    """One subject (or the slices ``z_slices`` = [z0, z1) of it, optionally only the in-plane square
    ``xy_crop`` = (x0, y0, size)) as float32 maps of shape (X, Y, Z).

    Returns cbf (ml/100g/min), att_ms, t1_tissue_ms, gm, wm, csf (fractions), mask (bool), label (LABELS:
    dominant tissue, pathology where a lesion dominates), abv (arterial blood volume fraction), aatt_ms.
    The anatomy and its parameters depend on the seed alone; the random fields of a slab are drawn for the
    slab (a slab is statistically, not voxel-wise, identical to the same slices of the whole subject).
    """
    rng = np.random.default_rng(seed)
    shape = [int(s) for s in cfg["shape"]]
    vox = [float(v) for v in cfg["voxel_mm"]]
    z0, z1 = z_slices if z_slices is not None else (0, shape[2])
    x0, y0, size = xy_crop if xy_crop is not None else (0, 0, None)
    ranges = ((x0, x0 + size if size else shape[0]), (y0, y0 + size if size else shape[1]), (z0, z1))
    semi = np.array([_u(rng, r) for r in cfg["semi_axes_mm"]])
    centre = np.array([s * v / 2 for s, v in zip(shape, vox)]) + rng.normal(0, 3.0, 3) * np.array([1, 1, 0.5])
    centre[2] += rng.uniform(-0.2, 0.2) * semi[2]  # the slab covers a random part of the brain in z
    thickness = _u(rng, cfg["cortex_thickness_mm"])
    nuclei = [(side * rng.uniform(0.22, 0.32), rng.normal(0, 0.04), rng.uniform(-0.15, 0.05), rng.uniform(0.12, 0.17))
              for side in (-1, 1)]
    ventricles = [(side * rng.uniform(0.05, 0.1), rng.uniform(-0.05, 0.1), rng.uniform(0.0, 0.15),
                   rng.uniform(0.06, 0.12), rng.uniform(0.25, 0.4), rng.uniform(0.15, 0.25)) for side in (-1, 1)]
    field_seed = int(rng.integers(2**31))
    tissue_seed = int(rng.integers(2**31))

    # Anatomy on the 2× grid.
    f = 2
    xx, yy, zz = _coords(vox, centre, ranges, f)
    frng = np.random.default_rng(field_seed)
    fine_shape = xx.shape
    sigma_fine = [8.0 / (v / f) for v in vox]  # ~8 mm folding scale
    fold = _field(frng, fine_shape, sigma_fine)
    warp = _field(frng, fine_shape, [30.0 / (v / f) for v in vox])
    r = np.sqrt((xx / semi[0]) ** 2 + (yy / semi[1]) ** 2 + (zz / semi[2]) ** 2) * (1 + 0.04 * warp)
    depth_mm = (1.0 - r) * semi.mean()  # approximate distance from the brain surface
    brain = r < 1.0
    ribbon = thickness * (1 + 0.4 * fold)
    hard = np.where(brain, LABELS["wm"], LABELS["background"])
    hard[brain & (depth_mm < ribbon)] = LABELS["gm"]
    hard[brain & (depth_mm < 4.0) & (fold < -0.2)] = LABELS["csf"]  # sulcal CSF
    for nx_, ny_, nz_, rad in nuclei:
        d = ((xx / semi[0] - nx_) ** 2 + (yy / semi[1] - ny_) ** 2 + (zz / semi[2] - nz_) ** 2) / rad**2
        hard[brain & (d < 1.0)] = LABELS["gm"]
    for vx_, vy_, vz_, ax_, ay_, az_ in ventricles:
        d = ((xx / semi[0] - vx_) / ax_) ** 2 + ((yy / semi[1] - vy_) / ay_) ** 2 + ((zz / semi[2] - vz_) / az_) ** 2
        hard[brain & (d < 1.0)] = LABELS["csf"]
    gm, wm, csf = (_downsample((hard == lab).astype(np.float64), f) for lab in (1, 2, 3))
    depth = _downsample(np.where(brain, depth_mm, 0.0), f)
    mask = (gm + wm + csf) >= 0.5
    frac_sum = np.maximum(gm + wm + csf, 1e-12)
    gm, wm, csf = (np.where(mask, a / frac_sum, 0.0) for a in (gm, wm, csf))
    xs, ys, zs = (_downsample(a, f) for a in (xx, yy, zz))

    # Tissue parameters.
    trng = np.random.default_rng(tissue_seed)
    sig = [float(cfg["field_sigma_mm"]) / v for v in vox]
    vshape = gm.shape
    jitter = float(cfg["pixel_jitter_rel"])
    direction = trng.uniform(0, 2 * math.pi)
    gradient = (np.cos(direction) * xs / semi[0] + np.sin(direction) * ys / semi[1])
    z_grad = trng.uniform(-1, 1) * zs / semi[2]
    global_scale = _u(trng, phantom_cfg["cbf_global_scale"])
    cbf_t, att_t = {}, {}
    for name in ("gm", "wm"):
        mean = _u(trng, cfg[f"{name}_cbf"]) * global_scale
        cbf_t[name] = np.clip(mean * (1 + float(cfg["cbf_field_rel"]) * _field(trng, vshape, sig))
                              * (1 + jitter * trng.standard_normal(vshape)), 0, None)
        att = (_u(trng, cfg[f"{name}_att_ms"]) + float(cfg["att_gradient_ms"]) * (gradient + z_grad) / 2
               + 100.0 * _field(trng, vshape, sig) + 30.0 * trng.standard_normal(vshape))
        if name == "wm":
            deep = np.clip((depth - thickness) / max(semi.mean() * 0.5, 1e-6), 0, 1)
            att = att + _u(trng, cfg["deep_wm_delay_ms"]) * deep
        att_t[name] = att
    t1_scale = 1 + float(cfg["t1_tissue_jitter_rel"]) * trng.uniform(-1, 1)

    # Lesions (3D blobs, values from the phantom section), replacing GM and WM values.
    centre_idx = np.argwhere(mask)
    lesion_weight = np.zeros(vshape)
    for kind in ("tumor", "stroke"):
        if trng.uniform() >= float(phantom_cfg[f"p_{kind}"]) or len(centre_idx) == 0:
            continue
        c = centre_idx[trng.integers(len(centre_idx))]
        radius_mm = _u(trng, phantom_cfg["lesion_radius_frac"]) * shape[0] * vox[0] * 0.8
        grid = np.meshgrid(*[np.arange(n) * v for n, v in zip(vshape, vox)], indexing="ij")
        rr = np.sqrt(sum((g - ci * v) ** 2 for g, ci, v in zip(grid, c, vox))) / radius_mm
        rr = rr * (1 + 0.15 * _field(trng, vshape, [6.0 / v for v in vox]))
        weight = np.clip((1.15 - rr) / 0.3, 0, 1) * mask
        if kind == "tumor":
            rim, core = _u(trng, phantom_cfg["tumor_rim_cbf"]), _u(trng, phantom_cfg["tumor_core_cbf"])
            les_cbf = core + (rim - core) * np.clip((rr - 0.3) / 0.4, 0, 1)
            les_att = np.full(vshape, _u(trng, phantom_cfg["tumor_att_ms"]))
        else:
            core_w = np.clip((0.6 - rr) / 0.2, 0, 1)
            les_cbf = (core_w * _u(trng, phantom_cfg["stroke_core_cbf"])
                       + (1 - core_w) * _u(trng, phantom_cfg["stroke_penumbra_cbf"]))
            les_att = (core_w * _u(trng, phantom_cfg["stroke_core_att_ms"])
                       + (1 - core_w) * _u(trng, phantom_cfg["stroke_penumbra_att_ms"]))
        for name in ("gm", "wm"):
            cbf_t[name] = cbf_t[name] * (1 - weight) + les_cbf * weight
            att_t[name] = att_t[name] * (1 - weight) + les_att * weight
        lesion_weight = np.maximum(lesion_weight, weight)

    flow_gm, flow_wm = gm * cbf_t["gm"], wm * cbf_t["wm"]
    cbf = flow_gm + flow_wm
    att = np.where(cbf > 1e-6, (flow_gm * att_t["gm"] + flow_wm * att_t["wm"]) / np.maximum(cbf, 1e-6),
                   np.where(gm >= wm, att_t["gm"], att_t["wm"]))
    tissue = gm + wm
    t1 = np.where(tissue > 1e-6, (gm * T1_GM_MS + wm * T1_WM_MS) / np.maximum(tissue, 1e-6), T1_GM_MS) * t1_scale
    abv, aatt = _vessels(trng, cfg, xs, ys, zs, semi, mask)
    label = np.where(mask, np.argmax(np.stack([gm, wm, csf]), axis=0) + 1, 0)
    label[(lesion_weight > 0.5) & mask] = LABELS["pathology"]
    as32 = lambda a, outside=0.0: np.where(mask, a, outside).astype(np.float32)  # noqa: E731
    return {"cbf": as32(np.clip(cbf, 0, 200)), "att": as32(np.clip(att, 300, 3900)),
            "t1_tissue_ms": as32(t1, T1_GM_MS),  # finite outside the brain (the signal model divides by it)
            "gm": as32(gm), "wm": as32(wm), "csf": as32(csf), "mask": mask, "label": label.astype(np.int64),
            "abv": as32(abv), "aatt_ms": as32(aatt)}


def _vessels(rng: np.random.Generator, cfg: Mapping, xs, ys, zs, semi, mask) -> tuple[np.ndarray, np.ndarray]:
    """Arterial blood volume along a few smooth paths near the surface (r ≈ 0.85) and in the Sylvian region
    (lateral, r ≈ 0.6); zero for subjects with vascular crushing (drawn with p = 1 − p_macrovascular)."""
    abv = np.zeros(xs.shape)
    aatt = np.zeros(xs.shape)
    if rng.uniform() >= float(cfg["p_macrovascular"]):
        return abv, aatt
    n = int(rng.integers(int(cfg["n_vessels"][0]), int(cfg["n_vessels"][1]) + 1))
    peak, arrival = _u(rng, cfg["abv_max"]), _u(rng, cfg["aatt_ms"])
    theta = np.arctan2(ys / semi[1], xs / semi[0])
    r = np.sqrt((xs / semi[0]) ** 2 + (ys / semi[1]) ** 2 + (zs / semi[2]) ** 2)
    for _ in range(n):
        radius = rng.choice([0.85, 0.6]) + rng.normal(0, 0.03)
        phase, freq, amp = rng.uniform(0, 2 * math.pi), rng.uniform(1, 3), rng.uniform(0.1, 0.3)
        z_path = amp * np.sin(freq * theta + phase)  # the path winds in z around the brain
        theta0, width = rng.uniform(-math.pi, math.pi), rng.uniform(0.6, 1.5)  # angular extent
        along = np.exp(-0.5 * (np.angle(np.exp(1j * (theta - theta0))) / width) ** 2)
        dist = np.sqrt(((r - radius) * semi.mean() / 2.5) ** 2 + ((zs / semi[2] - z_path) * semi[2] / 2.5) ** 2)
        abv = np.maximum(abv, peak * along * np.exp(-0.5 * dist**2))
    abv = np.where(mask & (abv > 0.1 * peak), abv, 0.0)
    aatt = np.where(abv > 0, arrival * (1 + 0.1 * rng.standard_normal(xs.shape)), 0.0)
    return abv, aatt
