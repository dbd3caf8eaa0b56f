"""A plan-like dose for synthetic patients: coplanar arcs of a simple pencil-beam-like kernel.

Each arc is a set of static coplanar beams (gantry angles, IEC 61217: gantry 0° irradiates from anterior
toward posterior; for a head-first supine patient the source sits at (x, y) = (SAD·sin θ, −SAD·cos θ)).
For each beam:

- the aperture is the beam's-eye-view projection of the target (s lateral, z longitudinal) on a 2 mm
  fluence grid, opened by a margin and blurred with a Gaussian of σ = penumbra (the beam penumbra);
- a second, lower-weighted aperture covers the part of PTV56 outside PTV70's projection; where its
  rays cross the rectum or bladder their fluence is reduced by the sparing factor (partial OAR sparing,
  the way inverse planning modulates fluence for rays through an OAR);
- the primary dose along each ray is F(s, z) · exp(−μ·d) · (1 − exp(−d/d_buildup)) with d the depth
  below the (elliptic) body surface: exponential attenuation and a skin build-up region;
- a scatter term, the primary dose blurred by a broad Gaussian (σ ≈ 15 mm, ~12 %), adds the low-dose
  bath and softens the falloff.

The two components' weights are solved so that PTV70 and the PTV56-only volume get their prescriptions
on average, and the plan is then normalized so that D95 of PTV70 equals the prescription (the common
clinical normalization). It is a kernel model, not a Monte Carlo calculation: good enough that DVHs,
isodoses and gamma are meaningful, which is all the synthetic data is for.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage


@dataclass
class PlanParams:
    gantry_angles_deg: np.ndarray
    penumbra_mm: float = 4.0
    aperture_margin_mm: float = 4.0
    attenuation_per_mm: float = 0.0045
    buildup_mm: float = 8.0
    scatter_fraction: float = 0.12
    scatter_sigma_mm: float = 15.0
    oar_sparing: float = 0.5
    fluence_grid_mm: float = 2.0


def arcs_to_angles(arcs: list[tuple[float, float]], beams_per_arc: int) -> np.ndarray:
    """Gantry angles (degrees) sampling each (start, stop) arc; clockwise arcs increase the angle."""
    angles = []
    for start, stop in arcs:
        span = (stop - start) % 360 or 360.0
        angles.append((start + np.linspace(0, span, beams_per_arc, endpoint=False) + span / beams_per_arc / 2) % 360)
    return np.concatenate(angles) if angles else np.zeros(0)


def _entry_depth(s, z, t, theta, iso_xy, body_center_xy, body_axes_xy):
    """Depth (mm) of points below the elliptic body surface along the beam direction.

    The ray through lateral offset s is r(τ) = iso + s·v + τ·u (u beam direction, v lateral axis); the
    entry point is the smaller root τ_in of the ellipse equation, and depth = t − τ_in.
    """
    ux, uy = -np.sin(theta), np.cos(theta)
    vx, vy = np.cos(theta), np.sin(theta)
    px = iso_xy[0] + s * vx - body_center_xy[0]
    py = iso_xy[1] + s * vy - body_center_xy[1]
    ax, ay = body_axes_xy
    a = (ux / ax) ** 2 + (uy / ay) ** 2
    b = 2 * (px * ux / ax**2 + py * uy / ay**2)
    c = (px / ax) ** 2 + (py / ay) ** 2 - 1
    disc = b * b - 4 * a * c
    tau_in = np.where(disc >= 0, (-b - np.sqrt(np.clip(disc, 0, None))) / (2 * a), np.inf)
    return t - tau_in


def _project(mask: np.ndarray, s: np.ndarray, z: np.ndarray, s_edges: np.ndarray, z_edges: np.ndarray) -> np.ndarray:
    """Beam's-eye-view footprint: 2D histogram of the (s, z) positions of the voxels in ``mask``."""
    if not mask.any():
        return np.zeros((len(s_edges) - 1, len(z_edges) - 1))
    hist, _, _ = np.histogram2d(s[mask], z[mask], bins=[s_edges, z_edges])
    return (hist > 0).astype(np.float64)


def compute_dose(x: np.ndarray, y: np.ndarray, z: np.ndarray, masks: dict, body, isocenter_xyz, params: PlanParams,
                 spacing_zyx: tuple[float, float, float], prescription_gy: float = 70.0,
                 low_dose_gy: float = 56.0) -> np.ndarray:
    """Dose (Gy) on the grid points (x, y, z) (3D arrays of one regular grid, (z, y, x) order).

    ``masks`` holds bool arrays on the same grid: "PTV70", "PTV56" (optional), "Rectum", "Bladder",
    "Body". Returns a float32 array, 0 outside the body.
    """
    g = params.fluence_grid_mm
    body_mask = masks["Body"]
    ptv70 = masks["PTV70"] & body_mask
    ptv56 = masks.get("PTV56")
    low_only = (ptv56 & body_mask & ~ptv70) if ptv56 is not None else np.zeros_like(ptv70)
    oars = (masks.get("Rectum", np.zeros_like(ptv70)) | masks.get("Bladder", np.zeros_like(ptv70))) & body_mask
    iso = np.asarray(isocenter_xyz, dtype=np.float64)
    extent = float(np.max(np.abs([x.min() - iso[0], x.max() - iso[0], y.min() - iso[1], y.max() - iso[1]]))) * 1.5
    s_edges = np.arange(-extent, extent + g, g)
    z_edges = np.arange(z.min() - g, z.max() + 2 * g, g)
    margin_px = params.aperture_margin_mm / g
    sigma_px = params.penumbra_mm / g
    open_struct = ndimage.generate_binary_structure(2, 1)
    dose_high = np.zeros(x.shape, dtype=np.float64)
    dose_low = np.zeros(x.shape, dtype=np.float64)
    inside = np.where(body_mask)
    xb, yb, zb = x[inside] - iso[0], y[inside] - iso[1], z[inside]
    for theta_deg in params.gantry_angles_deg:
        theta = np.deg2rad(theta_deg)
        ux, uy = -np.sin(theta), np.cos(theta)
        vx, vy = np.cos(theta), np.sin(theta)
        s_all = (x - iso[0]) * vx + (y - iso[1]) * vy
        a70 = _project(ptv70, s_all, z, s_edges, z_edges)
        a56 = _project(low_only, s_all, z, s_edges, z_edges)
        a_oar = _project(oars & ~ptv70, s_all, z, s_edges, z_edges)
        iterations = max(int(round(margin_px)), 1)
        a70 = ndimage.binary_dilation(ndimage.binary_closing(a70, open_struct, 2), open_struct, iterations)
        a56 = ndimage.binary_dilation(ndimage.binary_closing(a56, open_struct, 2), open_struct, iterations) & ~a70
        fluence_high = ndimage.gaussian_filter(a70.astype(np.float64), sigma_px)
        fluence_low = ndimage.gaussian_filter(a56 * (1.0 - params.oar_sparing * (a_oar > 0)), sigma_px)
        s = xb * vx + yb * vy
        t = xb * ux + yb * uy
        coords = np.vstack([(s - s_edges[0]) / g - 0.5, (zb - z_edges[0]) / g - 0.5])
        depth = np.clip(_entry_depth(s, zb, t, theta, iso[:2], body.center_xy, body.semi_axes_xy), 0, None)
        depth_factor = np.exp(-params.attenuation_per_mm * depth) * (1 - np.exp(-depth / params.buildup_mm))
        dose_high[inside] += ndimage.map_coordinates(fluence_high, coords, order=1, mode="constant") * depth_factor
        dose_low[inside] += ndimage.map_coordinates(fluence_low, coords, order=1, mode="constant") * depth_factor
    sigma_vox = [params.scatter_sigma_mm / s for s in spacing_zyx]
    components = []
    for primary in (dose_high, dose_low):
        components.append((primary + params.scatter_fraction * ndimage.gaussian_filter(primary, sigma_vox)) * body_mask)
    high, low = components
    if low_only.any() and low[low_only].mean() > 0:
        # Mean dose in PTV70 and in PTV56-only: [m70_h m70_l; m56_h m56_l] · [a b] = [Rx70, Rx56].
        matrix = np.array([[high[ptv70].mean(), low[ptv70].mean()], [high[low_only].mean(), low[low_only].mean()]])
        weights = np.linalg.lstsq(matrix, np.array([prescription_gy, low_dose_gy]), rcond=None)[0]
        weights = np.clip(weights, 0.0, None)
    else:
        weights = np.array([prescription_gy / max(high[ptv70].mean(), 1e-9), 0.0])
    dose = weights[0] * high + weights[1] * low
    d95 = np.percentile(dose[ptv70], 5) if ptv70.any() else dose.max()
    if d95 > 0:
        dose *= prescription_gy / d95
    return dose.astype(np.float32)
