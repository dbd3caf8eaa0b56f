"""Dose-volume histograms and the metrics read from them, plus clinical constraint checks.

Sampling (:class:`StructureSamples`): a structure is a set of dose sample points, each with a volume:
- "contour" (the default where the case carries its RTSTRUCT polygons, :func:`contour_samples`): each
  contour is the cross-section of a slab one CT slice thick centred on its plane; the slab is sampled on
  an in-plane lattice of at most ``sample_mm`` (each CT pixel split into ceil(pixel / sample_mm) per
  axis; a point belongs to the structure by the even-odd rule of its polygons on that plane) and at
  ceil(slice / sample_mm) depths; the dose is interpolated trilinearly at each point.
  End-capping (what the structure is beyond its first and last contour):
  ``end_cap="half_slice"`` (default) lets the first and last contour stand for half a slice beyond their
  plane, as every other contour does (volume = Σ area × slice thickness, the convention of dicompyler-core's
  dvhcalc, which weights every plane's area by the full plane spacing, and of SlicerRT's end-capping,
  which closes the surface half a spacing beyond the end contours); the dose is sampled in that half slab;
  ``end_cap="half_slice_plane_dose"``: the same volume, but the outer half slabs take the dose of their end
  plane (dicompyler-core reads the dose only on the contour planes); ``end_cap="none"`` stops the
  structure at its end planes (the outer half slabs are left out: smaller volumes);
- "voxel": the CT voxels of the mask, each its voxel volume (the only choice for OpenKBP masks).
Points where the reference dose is unknown (outside the RTDOSE grid: the NPZ ``dose_valid_mask``) are
left out, so the metrics describe the covered part of the structure (its covered fraction is reported).
Which copy of the reference dose is sampled (``reference_dose``): ``rtdose`` (default) reads the RTDOSE on
its own grid, as clinical DVH tools do, where the case carries it (NPZ ``rtdose_gy``); ``ct_grid`` reads the
copy resampled onto the CT grid. Interpolating that copy again smooths the dose a second time: at the steep
edge of a target it lowered PTV70 D99 by 0.6-0.7 Gy (synthetic patients, vmat/README.md). A
predicted dose lives on the CT grid and is always read there; its errors are therefore measured against
the reference read there too (vmat.evaluation: ``diff_*``, ``refgrid_gap_*``).

Definitions over samples with volumes w_i (sorted by dose, descending):
- cumulative DVH V(d) = volume with dose ≥ d / total volume;
- D_x% = the dose that the hottest x % of the volume receives at least: the dose of the first sample at
  which the cumulative volume reaches x % (with equal volumes: position ceil(x/100 · N), 1-based).
  D100% = minimum, D→0% = maximum;
- D_xcc = the same with x cc of volume (the whole structure if it is smaller);
- ICRU Report 83 (2010) maxima, each named for what it is: ``D0.03cc`` (near-point maximum, the hottest
  0.03 cc), ``D2%`` (ICRU 83's near-maximum) and ``Dmax_point`` (the maximum over the sample points:
  depends on one point and on the sampling). There is no bare "Dmax" (the old one was D0.1cc);
- V_xGy = percentage of the volume with dose ≥ x Gy;
- homogeneity index HI = (D2% − D98%) / D50% (ICRU Report 83, 2010);
- conformity: RTOG CI = PIV / TV (Shaw et al. 1993) and Paddick CI = TV_PIV² / (TV · PIV) (Paddick 2000),
  with PIV the body volume receiving ≥ the target's dose and TV_PIV the part of the target inside it.

Constraint table entries: ``{"structure": "Rectum", "metric": "V50Gy", "op": "<", "value": 50, "unit": "%"}``;
``unit`` "%" (of volume, for V metrics), "Gy", or "%Rx" (of the structure's own target dose for targets,
else of the prescription). Defaults: QUANTEC (Michalski et al. 2010; Viswanathan et al. 2010) and RTOG 0415
prostate limits, as listed in notes/vmat.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_CONSTRAINTS = [
    {"structure": "Rectum", "metric": "V50Gy", "op": "<", "value": 50.0, "unit": "%"},
    {"structure": "Rectum", "metric": "V60Gy", "op": "<", "value": 35.0, "unit": "%"},
    {"structure": "Rectum", "metric": "V65Gy", "op": "<", "value": 25.0, "unit": "%"},
    {"structure": "Rectum", "metric": "V70Gy", "op": "<", "value": 20.0, "unit": "%"},
    {"structure": "Rectum", "metric": "V75Gy", "op": "<", "value": 15.0, "unit": "%"},
    {"structure": "Bladder", "metric": "V65Gy", "op": "<", "value": 50.0, "unit": "%"},
    {"structure": "Bladder", "metric": "V70Gy", "op": "<", "value": 35.0, "unit": "%"},
    {"structure": "Bladder", "metric": "V75Gy", "op": "<", "value": 25.0, "unit": "%"},
    {"structure": "Bladder", "metric": "V80Gy", "op": "<", "value": 15.0, "unit": "%"},
    {"structure": "Femur_L", "metric": "V50Gy", "op": "<", "value": 10.0, "unit": "%"},
    {"structure": "Femur_R", "metric": "V50Gy", "op": "<", "value": 10.0, "unit": "%"},
    {"structure": "PTV70", "metric": "D95%", "op": ">=", "value": 95.0, "unit": "%Rx"},
    {"structure": "PTV70", "metric": "D2%", "op": "<", "value": 107.0, "unit": "%Rx"},
    {"structure": "PTV56", "metric": "D95%", "op": ">=", "value": 95.0, "unit": "%Rx"},
]

_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def _doses(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).ravel()


def _weighted_dose_at_volume(d: np.ndarray, w: np.ndarray, volume: float) -> float:
    """Minimum dose of the hottest ``volume`` (same unit as ``w``) of the samples."""
    order = np.argsort(-d, kind="stable")
    cum = np.cumsum(w[order])
    i = int(np.searchsorted(cum, min(volume, cum[-1]) * (1 - 1e-12), side="left"))
    return float(d[order][min(i, len(d) - 1)])


def cumulative_dvh(doses_in_structure, bin_width_gy: float = 0.1, max_dose_gy: float | None = None):
    """(dose bin edges d_i, V(d_i) in %) with V(d) = % of voxels receiving ≥ d."""
    d = np.sort(_doses(doses_in_structure))
    top = float(max_dose_gy if max_dose_gy is not None else (d.max() if d.size else 0.0))
    edges = np.arange(0.0, top + bin_width_gy, bin_width_gy)
    if d.size == 0:
        return edges, np.zeros_like(edges)
    at_least = d.size - np.searchsorted(d, edges, side="left")
    return edges, 100.0 * at_least / d.size


def dose_at_volume_percent(doses_in_structure, percent: float, weights=None) -> float:
    """D_x%: minimum dose of the hottest ``percent`` % of the volume (NaN for an empty structure)."""
    if weights is not None:
        d, w = _doses(doses_in_structure), _doses(weights)
        return _weighted_dose_at_volume(d, w, percent / 100.0 * w.sum()) if d.size else float("nan")
    d = np.sort(_doses(doses_in_structure))[::-1]
    if d.size == 0:
        return float("nan")
    n = min(max(int(math.ceil(percent / 100.0 * d.size - 1e-9)), 1), d.size)
    return float(d[n - 1])


def dose_at_volume_cc(doses_in_structure, volume_cc: float, voxel_cc: float, weights=None) -> float:
    """D_xcc: minimum dose of the hottest ``volume_cc`` (at least one voxel; the whole structure if smaller).
    With ``weights`` (cc per sample) ``voxel_cc`` is unused."""
    if weights is not None:
        d, w = _doses(doses_in_structure), _doses(weights)
        return _weighted_dose_at_volume(d, w, volume_cc) if d.size else float("nan")
    d = np.sort(_doses(doses_in_structure))[::-1]
    if d.size == 0:
        return float("nan")
    n = min(max(int(math.ceil(volume_cc / voxel_cc - 1e-9)), 1), d.size)
    return float(d[n - 1])


def volume_at_dose_percent(doses_in_structure, dose_gy: float, weights=None) -> float:
    """V_xGy in % of the structure volume (NaN for an empty structure)."""
    d = _doses(doses_in_structure)
    if not d.size:
        return float("nan")
    if weights is not None and np.ptp(_doses(weights)) > 0:
        w = _doses(weights)
        return float(100.0 * w[d >= dose_gy].sum() / w.sum())
    return float(100.0 * np.mean(d >= dose_gy))  # equal volumes: a count (exact percentages)


def homogeneity_index(doses_in_target, weights=None) -> float:
    """(D2% − D98%) / D50% (ICRU 83)."""
    d50 = dose_at_volume_percent(doses_in_target, 50, weights)
    return (dose_at_volume_percent(doses_in_target, 2, weights)
            - dose_at_volume_percent(doses_in_target, 98, weights)) / d50 if d50 and np.isfinite(d50) else float("nan")


def conformity_indices(dose: np.ndarray, target: np.ndarray, body: np.ndarray, reference_gy: float) -> dict:
    """RTOG CI = PIV/TV and Paddick CI = TV_PIV²/(TV·PIV), in voxels (volume units cancel)."""
    target = np.asarray(target, bool)
    piv_mask = (np.asarray(dose) >= reference_gy) & np.asarray(body, bool)
    tv, piv = float(target.sum()), float(piv_mask.sum())
    tv_piv = float((piv_mask & target).sum())
    return {"ci_rtog": piv / tv if tv else float("nan"),
            "ci_paddick": tv_piv**2 / (tv * piv) if tv and piv else float("nan")}


END_CAPS = ("half_slice", "half_slice_plane_dose", "none")
REFERENCE_DOSES = ("rtdose", "ct_grid")

_METRIC = re.compile(r"^(?:(?P<v>V)(?P<vx>\d+(?:\.\d+)?)Gy|(?P<d>D)(?P<dx>\d+(?:\.\d+)?)(?P<du>%|cc)|"
                     r"(?P<name>Dmean|Dmin|Dmax_point))$")

DVH_DEFAULTS = {
    "method": "contour",  # contour: sub-voxel samples of the RTSTRUCT polygons where the case has them | voxel
    "sample_mm": 1.0,  # largest spacing of the sub-voxel sample lattice (in-plane and in depth)
    "end_cap": "half_slice",  # half_slice | half_slice_plane_dose | none (see the module docstring)
    "reference_dose": "rtdose",  # rtdose (the RTDOSE's own grid where the case has it) | ct_grid
    "v_gy": [20.0, 30.0, 40.0, 50.0, 60.0, 65.0, 70.0, 75.0],  # V_xGy reported for every OAR
}


def metric_value(doses_in_structure, metric: str, voxel_cc: float, weights=None) -> float:
    """Evaluate "V50Gy" (%), "D95%" / "D0.03cc" (Gy), "Dmean", "Dmin", "Dmax_point" (the maximum sample).
    ``weights``: volume (cc) of each sample; without them every sample is one voxel of ``voxel_cc``.
    ``doses_in_structure`` may be a :class:`SampledDVH` (sub-voxel samples with their spreads)."""
    if isinstance(doses_in_structure, SampledDVH):
        return _dvh_metric(doses_in_structure, metric)
    match = _METRIC.match(metric)
    if not match:
        hint = (" ('Dmax' is ambiguous: use D0.03cc (ICRU 83 near-point maximum), D2% or Dmax_point)"
                if metric == "Dmax" else "")
        raise ValueError(f"unknown DVH metric {metric!r}: use VxGy, Dx%, Dxcc, Dmean, Dmin or Dmax_point{hint}")
    d = _doses(doses_in_structure)
    if d.size == 0:
        return float("nan")
    if match.group("v"):
        return volume_at_dose_percent(d, float(match.group("vx")), weights)
    if match.group("d"):
        x = float(match.group("dx"))
        return dose_at_volume_percent(d, x, weights) if match.group("du") == "%" else \
            dose_at_volume_cc(d, x, voxel_cc, weights)
    name = match.group("name")
    if name == "Dmean":
        return float(np.average(d, weights=weights))
    if name == "Dmin":
        return float(d.min())
    return float(d.max())


def _dvh_metric(dvh: SampledDVH, metric: str) -> float:
    match = _METRIC.match(metric)
    if not match:
        return metric_value(np.zeros(0), metric, 1.0)  # raises the explanatory error
    if not dvh.d.size:
        return float("nan")
    if match.group("v"):
        return dvh.volume_percent_at_least(float(match.group("vx")))
    if match.group("d"):
        x = float(match.group("dx"))
        return dvh.dose_at_percent(x) if match.group("du") == "%" else dvh.dose_at_volume(x)
    name = match.group("name")
    if name == "Dmean":
        return float(np.average(dvh.d, weights=dvh.w))
    return float(dvh.d.min() if name == "Dmin" else dvh.d.max())


# ------------------------------------------------------------------------------------------ sampling
class SampledDVH:
    """Cumulative DVH of samples with doses ``d``, volumes ``w`` and optional in-sample dose spreads ``a``.

    Without spreads (voxel counting) every sample is a point mass and the metrics are the exact discrete
    definitions above. With spreads, the dose inside sample i is taken as uniform on [d_i − a_i, d_i + a_i]
    (exact for a dose gradient along one axis of the sample's box, a_i = |Δd|/2 over the box); the DVH is
    then piecewise linear, accumulated on ``bin_gy`` bins (positions within one bin), so quantiles do
    not stick to the discrete levels of a sampling lattice lying across a gradient."""

    def __init__(self, d, w, a=None, bin_gy: float = 0.005):
        self.d, self.w = _doses(d), _doses(w)
        self.total = float(self.w.sum())
        self.a = None if a is None or not np.any(np.asarray(a) > 0) else np.clip(_doses(a), 0, None)
        if self.a is None or not self.d.size:
            return
        lo = float((self.d - self.a).min())
        hi = float((self.d + self.a).max())
        n = int(math.ceil((hi - lo) / bin_gy)) + 2
        i0 = np.clip(((self.d - self.a - lo) / bin_gy).astype(np.int64), 0, n - 1)
        i1 = np.clip(((self.d + self.a - lo) / bin_gy).astype(np.int64), 0, n - 1)
        count = i1 - i0
        spread = count > 0
        per_bin = self.w[spread] / count[spread]
        diff = (np.bincount(i0[spread], per_bin, minlength=n + 1) - np.bincount(i1[spread], per_bin, minlength=n + 1))
        mass = np.cumsum(diff)[:n] + np.bincount(i0[~spread], self.w[~spread], minlength=n)[:n]
        self.lo, self.bin, self.mass = lo, bin_gy, np.clip(mass, 0, None)
        self.at_least = np.cumsum(self.mass[::-1])[::-1]  # volume with dose >= bin start

    def dose_at_volume(self, volume: float) -> float:
        if not self.d.size:
            return float("nan")
        if self.a is None:
            return _weighted_dose_at_volume(self.d, self.w, volume)
        volume = min(max(volume, 0.0), self.total)
        j = int(np.searchsorted(-self.at_least, -volume, side="right")) - 1  # last bin start with >= volume
        j = max(j, 0)
        inside = self.mass[j]
        frac = (self.at_least[j] - volume) / inside if inside > 0 else 0.0
        return float(self.lo + (j + min(max(frac, 0.0), 1.0)) * self.bin)

    def dose_at_percent(self, percent: float) -> float:
        if self.a is None:
            return dose_at_volume_percent(self.d, percent, None if np.ptp(self.w) == 0 else self.w)
        return self.dose_at_volume(percent / 100.0 * self.total)

    def volume_percent_at_least(self, dose_gy: float) -> float:
        if not self.d.size:
            return float("nan")
        if self.a is None:
            return volume_at_dose_percent(self.d, dose_gy, self.w)
        return 100.0 * self.volume_at_least(dose_gy) / self.total

    def curve(self, edges_gy) -> np.ndarray:
        """Cumulative DVH: % of the volume receiving at least each dose of ``edges_gy``."""
        edges = np.asarray(edges_gy, np.float64)
        if not self.d.size:
            return np.full(edges.shape, np.nan)
        if self.a is None:
            order = np.argsort(self.d)
            above = np.concatenate([np.cumsum(self.w[order][::-1])[::-1], [0.0]])  # volume with d >= d_sorted[i]
            return 100.0 * above[np.searchsorted(self.d[order], edges, side="left")] / self.total
        return np.array([100.0 * self.volume_at_least(float(e)) / self.total for e in edges])

    def volume_at_least(self, dose_gy: float) -> float:
        if self.a is None:
            return float(self.w[self.d >= dose_gy].sum())
        x = (dose_gy - self.lo) / self.bin
        if x <= 0:
            return self.total
        j = int(x)
        if j >= len(self.mass):
            return 0.0
        return float(self.at_least[j] - self.mass[j] * (x - j))


class StructureSamples:
    """Dose sample points of one structure: fractional voxel indices (K, 3) (z, y, x) and volumes (cc)."""

    def __init__(self, coords: np.ndarray, weights_cc: np.ndarray, method: str, exact_voxels: bool = False,
                 half_box: np.ndarray | None = None, grid: tuple | None = None):
        self.coords = np.asarray(coords, np.float64).reshape(-1, 3)
        self.weights = np.asarray(weights_cc, np.float64).ravel()
        self.method = method
        self.exact_voxels = exact_voxels  # integer voxel centres: index, no interpolation
        self.half_box = None if half_box is None else np.asarray(half_box, np.float64).reshape(-1, 3)
        # (origin (z, y, x) mm, spacing (z, y, x) mm) of the grid the coordinates index: needed to read a dose
        # stored on another grid (dvh(dose, dose_grid))
        self.grid = None if grid is None else tuple(np.asarray(g, np.float64) for g in grid)

    def _on(self, dose_grid: tuple | None) -> tuple[np.ndarray, np.ndarray | None, bool]:
        """(coordinates, half boxes, exact) as indices of ``dose_grid`` (None: the samples' own grid)."""
        if dose_grid is None:
            return self.coords, self.half_box, self.exact_voxels
        if self.grid is None:
            raise ValueError("these DVH samples do not know their grid's origin and spacing: pass the dose on "
                             "their own grid")
        origin, spacing = (np.asarray(g, np.float64) for g in dose_grid)
        scale = self.grid[1] / spacing
        coords = (self.grid[0] + self.coords * self.grid[1] - origin) / spacing
        half = None if self.half_box is None else self.half_box * scale
        if half is None and not self.exact_voxels:
            return coords, None, False
        if half is None:  # voxel samples read on another grid: the voxel's box, interpolated
            half = np.tile(0.5 * scale, (len(coords), 1))
        return coords, half, False

    def dvh(self, dose: np.ndarray, dose_grid: tuple | None = None) -> SampledDVH:
        """The sampled DVH of ``dose``; sub-voxel samples carry their in-box dose spread: half the change
        of the trilinear dose between the box's faces along each axis, combined in quadrature
        (contour_samples keeps only points whose box faces read known dose). ``dose_grid``: (origin
        (z, y, x) mm, spacing (z, y, x) mm) when ``dose`` is on another grid than the samples' (the
        reference dose on its RTDOSE grid, see :func:`reference_dose`)."""
        coords, half_box, exact = self._on(dose_grid)
        d = self._read(dose, coords, exact)
        if half_box is None or not len(d):
            return SampledDVH(d, self.weights)
        from scipy import ndimage

        dose = np.asarray(dose, np.float64)
        squares = np.zeros(len(d))
        for axis in range(3):  # trilinear dose at the two faces of the box (inside the known dose, see below)
            step = np.zeros((1, 3))
            step[0, axis] = 1.0
            up = ndimage.map_coordinates(dose, (coords + half_box * step).T, order=1, mode="nearest")
            down = ndimage.map_coordinates(dose, (coords - half_box * step).T, order=1, mode="nearest")
            squares += (0.5 * (up - down)) ** 2
        return SampledDVH(d, self.weights, np.sqrt(squares))

    @property
    def volume_cc(self) -> float:
        return float(self.weights.sum())

    def doses(self, dose: np.ndarray, dose_grid: tuple | None = None) -> np.ndarray:
        coords, _, exact = self._on(dose_grid)
        return self._read(dose, coords, exact)

    @staticmethod
    def _read(dose: np.ndarray, coords: np.ndarray, exact: bool) -> np.ndarray:
        """The dose at ``coords`` (indices of ``dose``): indexed at exact voxel centres, else trilinear."""
        dose = np.asarray(dose)
        if exact:
            k, j, i = coords.astype(np.int64).T
            return dose[k, j, i].astype(np.float64)
        from scipy import ndimage

        return ndimage.map_coordinates(np.asarray(dose, np.float64), coords.T, order=1, mode="nearest")


def voxel_samples(mask: np.ndarray, spacing_mm, valid: np.ndarray | None = None,
                  origin_zyx_mm=None) -> StructureSamples:
    mask = np.asarray(mask, bool) if valid is None else np.asarray(mask, bool) & np.asarray(valid, bool)
    coords = np.argwhere(mask)
    grid = None if origin_zyx_mm is None else (origin_zyx_mm, spacing_mm)
    return StructureSamples(coords, np.full(len(coords), float(np.prod(spacing_mm)) / 1000.0), "voxel", True,
                            grid=grid)


def contour_samples(polygons, origin_zyx_mm, spacing_mm, shape_zyx, sample_mm: float = 1.0,
                    end_cap: str = "half_slice", valid: np.ndarray | None = None) -> StructureSamples:
    """Sub-voxel samples of a structure from its planar polygons [(z mm, (N, 2) xy mm)] (see module doc).

    The grid (``origin_zyx_mm``, ``spacing_mm``, ``shape_zyx``) is the dose's (canonical, axis-aligned);
    the slab thickness is its slice spacing. Points outside the grid or where ``valid`` is False (or
    whose trilinear neighbourhood touches such a voxel) are left out."""
    from scipy import ndimage

    from vmat.geometry import rasterize_slice_polygons

    if end_cap not in END_CAPS:
        raise ValueError(f"end_cap must be one of {', '.join(END_CAPS)}, got {end_cap!r}")
    oz, oy, ox = (float(v) for v in origin_zyx_mm)
    dz, dy, dx = (float(v) for v in spacing_mm)
    sy, sx, sz = (max(1, int(math.ceil(v / sample_mm - 1e-9))) for v in (dy, dx, dz))
    hy, hx = dy / sy, dx / sx
    planes: dict[float, list] = {}
    for z, xy in polygons:
        planes.setdefault(round(float(z), 3), []).append(np.asarray(xy, np.float64))
    zs = sorted(planes)
    coords, weights, halves = [], [], []
    for n, z in enumerate(zs):
        lo, hi = z - dz / 2, z + dz / 2
        if end_cap == "none" and len(zs) > 1:
            lo = z if n == 0 else lo
            hi = z if n == len(zs) - 1 else hi
        depth = hi - lo
        n_depth = max(1, int(math.ceil(depth / dz * sz - 1e-9)))
        z_pts = lo + (np.arange(n_depth) + 0.5) * depth / n_depth
        allxy = np.concatenate(planes[z])
        # lattice of sub-pixel centres aligned with the CT pixels: x = ox + (i - 0.5) dx + (m + 0.5) hx
        x0 = ox - dx / 2 + hx / 2
        y0 = oy - dy / 2 + hy / 2
        c_lo = int(np.floor((allxy[:, 0].min() - x0) / hx)) - 1
        c_hi = int(np.ceil((allxy[:, 0].max() - x0) / hx)) + 1
        r_lo = int(np.floor((allxy[:, 1].min() - y0) / hy)) - 1
        r_hi = int(np.ceil((allxy[:, 1].max() - y0) / hy)) + 1
        shape = (r_hi - r_lo + 1, c_hi - c_lo + 1)
        polys = [((xy[:, 0] - x0) / hx - c_lo, (xy[:, 1] - y0) / hy - r_lo) for xy in planes[z]]
        inside = rasterize_slice_polygons(polys, shape)
        rr, cc = np.nonzero(inside)
        if not rr.size:
            continue
        y = y0 + (rr + r_lo) * hy
        x = x0 + (cc + c_lo) * hx
        for zp in z_pts:
            half_z = depth / n_depth / dz / 2
            if end_cap == "half_slice_plane_dose" and (zp < zs[0] or zp > zs[-1]):
                zp, half_z = z, 0.0  # an end plane's dose stands for its outer half slab
            coords.append(np.c_[np.full(len(y), (zp - oz) / dz), (y - oy) / dy, (x - ox) / dx])
            weights.append(np.full(len(y), hx * hy * depth / n_depth / 1000.0))
            halves.append(np.tile([half_z, hy / dy / 2, hx / dx / 2], (len(y), 1)))
    grid = ((oz, oy, ox), (dz, dy, dx))
    if not coords:
        return StructureSamples(np.zeros((0, 3)), np.zeros(0), "contour", grid=grid)
    coords, weights, halves = np.concatenate(coords), np.concatenate(weights), np.concatenate(halves)
    shape = np.asarray(shape_zyx)
    keep = np.all((coords >= -0.5) & (coords <= shape - 0.5), axis=1)
    if valid is not None:  # the point and the faces of its box (the spread) must read known dose only
        valid = np.asarray(valid, np.float64)
        for offset in [np.zeros(3)] + [sign * halves * np.eye(3)[axis] for axis in range(3) for sign in (1, -1)]:
            known = ndimage.map_coordinates(valid, (coords + offset).T, order=1, mode="nearest")
            keep &= known >= 1.0 - 1e-9
    return StructureSamples(coords[keep], weights[keep], "contour", half_box=halves[keep], grid=grid)


def case_samples(case: Mapping, cfg: Mapping = DVH_DEFAULTS) -> dict:
    """{structure: StructureSamples} of the present structures of a loaded case (vmat.case_io.load_case):
    contour samples where the case carries the structure's polygons and ``cfg["method"]`` is contour,
    else voxels; both restricted to the known dose (``dose_valid_mask``)."""
    from vmat.case_io import unpack_contours

    names = list(case["structure_names"])
    spacing = tuple(float(v) for v in case["spacing_mm"])
    valid = np.asarray(case.get("dose_valid_mask", np.ones(np.shape(case["ct"]))), bool)
    polygons = unpack_contours(case) if cfg["method"] == "contour" else {}
    out = {}
    for c, name in enumerate(names):
        mask = np.asarray(case["masks"][c], bool)
        if not mask.any():
            continue
        if c in polygons:
            out[name] = contour_samples(polygons[c], case["origin_mm"], spacing, mask.shape,
                                        float(cfg["sample_mm"]), cfg["end_cap"], valid)
        else:
            out[name] = voxel_samples(mask, spacing, valid, case["origin_mm"])
    return out


def reference_dose(case: Mapping, cfg: Mapping = DVH_DEFAULTS) -> tuple[np.ndarray, tuple | None]:
    """(reference dose, its grid) for DVHs: the RTDOSE on its own grid ((origin, spacing) (z, y, x) mm) when
    ``cfg["reference_dose"]`` is rtdose and the case carries it (NPZ ``rtdose_gy``), else (the CT-grid copy,
    None)."""
    choice = cfg.get("reference_dose", "rtdose")
    if choice not in REFERENCE_DOSES:
        raise ValueError(f"dvh.reference_dose must be one of {', '.join(REFERENCE_DOSES)}, got {choice!r}")
    if choice == "rtdose" and "rtdose_gy" in case:
        return (np.asarray(case["rtdose_gy"], np.float64),
                (np.asarray(case["rtdose_origin_mm"], np.float64), np.asarray(case["rtdose_spacing_mm"], np.float64)))
    return np.asarray(case["dose"], np.float64), None


def dose_dvhs(samples: Mapping, dose: np.ndarray, dose_grid: tuple | None = None) -> dict:
    """{structure: SampledDVH} of one dose, to share between structure_metrics and check_constraints.
    ``dose_grid``: the dose's (origin, spacing) when it is not on the samples' grid (:func:`reference_dose`)."""
    return {name: smp.dvh(dose, dose_grid) for name, smp in samples.items() if len(smp.weights)}


def structure_metrics(dose: np.ndarray, masks: np.ndarray, names: Sequence[str], target_doses: Mapping[str, float],
                      spacing_mm: Sequence[float], body: np.ndarray | None = None,
                      extra_metrics: Sequence[tuple[str, str]] = (), samples: Mapping | None = None,
                      valid: np.ndarray | None = None, v_gy: Sequence[float] = (), dvhs: Mapping | None = None) -> dict:
    """{structure: {metric: value}} for present structures.

    Targets: D99/D98/D95/D50/D2%, Dmean, D0.03cc, Dmax_point, V95%Rx, HI (ICRU 83) and, with ``body``,
    RTOG and Paddick CI; OARs: Dmean, D95%, D2%, D0.03cc, Dmax_point, V_xGy for x in ``v_gy``; plus
    ``extra_metrics`` [(structure, metric)]. ``samples`` ({name: StructureSamples}, :func:`case_samples`)
    give sub-voxel DVHs; without them voxels of ``masks`` (within ``valid``) are counted. ``dvhs``: their
    SampledDVHs of this ``dose`` when already computed (:func:`dose_dvhs`)."""
    voxel_cc = float(np.prod(spacing_mm)) / 1000.0
    dose = np.asarray(dose)
    valid = np.ones(dose.shape, bool) if valid is None else np.asarray(valid, bool)
    if samples is None:
        samples = {n: voxel_samples(masks[c], spacing_mm, valid) for c, n in enumerate(names)
                   if np.asarray(masks[c]).any()}
    out: dict = {}
    for name in names:
        smp = samples.get(name)
        if smp is None or not len(smp.weights):
            continue
        dvh = dvhs[name] if dvhs is not None and name in dvhs else smp.dvh(dose)
        row = {"volume_cc": smp.volume_cc, "Dmean": float(np.average(dvh.d, weights=dvh.w)),
               "D0.03cc": dvh.dose_at_volume(0.03), "Dmax_point": float(dvh.d.max())}
        if name in target_doses:
            ref = float(target_doses[name])
            row.update({f"D{x:g}%": dvh.dose_at_percent(x) for x in (99, 98, 95, 50, 2)})
            row["V95%Rx"] = dvh.volume_percent_at_least(0.95 * ref)
            row["HI"] = (row["D2%"] - row["D98%"]) / row["D50%"] if row["D50%"] else float("nan")
            if body is not None:
                piv_mask = (dose >= ref) & np.asarray(body, bool) & valid
                piv = float(piv_mask.sum()) * voxel_cc
                tv, tv_piv = dvh.total, dvh.volume_at_least(ref)
                row.update({"ci_rtog": piv / tv if tv else float("nan"),
                            "ci_paddick": tv_piv**2 / (tv * piv) if tv and piv else float("nan")})
        else:
            row.update({"D95%": dvh.dose_at_percent(95), "D2%": dvh.dose_at_percent(2)})
            row.update({f"V{x:g}Gy": dvh.volume_percent_at_least(float(x)) for x in v_gy})
        out[name] = row
    for name, metric in extra_metrics:
        if name in out and name in samples:
            dvh = dvhs[name] if dvhs is not None and name in dvhs else samples[name].dvh(dose)
            out[name][metric] = metric_value(dvh, metric, voxel_cc)
    return out


def check_constraints(dose: np.ndarray, masks: np.ndarray, names: Sequence[str], constraints: Sequence[Mapping],
                      target_doses: Mapping[str, float], prescription_gy: float, spacing_mm: Sequence[float],
                      samples: Mapping | None = None, valid: np.ndarray | None = None,
                      dvhs: Mapping | None = None) -> list[dict]:
    """One row per applicable constraint: structure, metric, value, limit (in the metric's unit), passed.
    ``samples`` / ``valid`` as in :func:`structure_metrics`."""
    voxel_cc = float(np.prod(spacing_mm)) / 1000.0
    rows = []
    for i, rule in enumerate(constraints):
        for key in ("structure", "metric", "op", "value"):
            if key not in rule:
                raise ValueError(f"constraint #{i} {dict(rule)} lacks '{key}'")
        if rule["op"] not in _OPS:
            raise ValueError(f"constraint #{i}: op must be one of {sorted(_OPS)}, got {rule['op']!r}")
        name = rule["structure"]
        if name not in names or not np.asarray(masks[list(names).index(name)]).any():
            continue
        if samples is not None and name in samples:
            smp = samples[name]
        else:
            smp = voxel_samples(masks[list(names).index(name)], spacing_mm, valid)
        if not len(smp.weights):
            continue
        dvh = dvhs[name] if dvhs is not None and name in dvhs else smp.dvh(dose)
        value = metric_value(dvh, rule["metric"], voxel_cc)
        unit = rule.get("unit", "%" if rule["metric"].startswith("V") else "Gy")
        limit = float(rule["value"])
        if unit == "%Rx":
            limit = limit / 100.0 * float(target_doses.get(name, prescription_gy))
        rows.append({"structure": name, "metric": rule["metric"], "op": rule["op"], "value": value, "limit": limit,
                     "unit": "%" if unit == "%" else "Gy", "passed": bool(_OPS[rule["op"]](value, limit))})
    return rows
