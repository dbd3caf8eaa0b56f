"""Voxel geometry for DICOM-RT: polygon rasterization, signed distance fields, resampling between grids.

Array convention of the whole vmat package (after preprocessing): volumes are indexed ``(z, y, x)`` =
(slice, row, column) on an axis-aligned grid whose axes increase along the DICOM patient axes
+z (superior), +y (posterior) and +x (the patient's LEFT). So ``array[..., i]`` with larger ``i`` lies
further to the patient's left, and a left-right flip is a flip of the last axis.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from scipy import ndimage


# ------------------------------------------------------------------------------------ rasterization
def polygon_mask(cols: np.ndarray, rows: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """Fill one closed polygon given by vertex coordinates in pixel units (column i, row j).

    A pixel belongs to the polygon when its centre is inside by the even-odd (crossing-number) rule,
    evaluated row by row (scanline). Crossings use half-open edges (y1 <= y < y2), so a vertex on a
    scanline is counted once, and a centre exactly on a vertical edge belongs to the pixel right of the
    edge's crossing point only if the crossing lies strictly left of it: polygons whose edges sit on
    half-pixel positions (the usual case for contours drawn around pixel borders) give exact areas.

    Args:
        cols, rows: vertex coordinates (floats), the polygon is closed implicitly.
        shape: (n_rows, n_cols) of the output.
    Returns:
        bool array of ``shape``.
    """
    cols = np.asarray(cols, dtype=np.float64).ravel()
    rows = np.asarray(rows, dtype=np.float64).ravel()
    out = np.zeros(shape, dtype=bool)
    if cols.size < 3:
        return out
    x1, y1 = cols, rows
    x2, y2 = np.roll(cols, -1), np.roll(rows, -1)
    keep = y1 != y2  # horizontal edges never cross a scanline
    x1, y1, x2, y2 = x1[keep], y1[keep], x2[keep], y2[keep]
    if x1.size == 0:
        return out
    row_lo = max(int(np.ceil(rows.min())), 0)
    row_hi = min(int(np.floor(rows.max())), shape[0] - 1)
    col_index = np.arange(shape[1], dtype=np.float64)
    ylo, yhi = np.minimum(y1, y2), np.maximum(y1, y2)
    slope = (x2 - x1) / (y2 - y1)
    for r in range(row_lo, row_hi + 1):
        crossing = (ylo <= r) & (r < yhi)
        if not crossing.any():
            continue
        xs = np.sort(x1[crossing] + (r - y1[crossing]) * slope[crossing])
        counts = np.searchsorted(xs, col_index, side="left")  # crossings strictly left of each centre
        out[r] = (counts % 2) == 1
    return out


def rasterize_slice_polygons(polygons: Sequence[tuple[np.ndarray, np.ndarray]], shape: tuple[int, int]) -> np.ndarray:
    """Combine several polygons of one ROI on one slice by XOR: a polygon inside another is a hole
    (DICOM PS3.3 C.8.8.6: contours of one ROI on a plane are combined by the even-odd rule)."""
    out = np.zeros(shape, dtype=bool)
    for cols, rows in polygons:
        out ^= polygon_mask(cols, rows, shape)
    return out


def world_to_voxel(points_xyz: np.ndarray, origin_mm: np.ndarray, spacing_zyx: Sequence[float],
                   row_dir: np.ndarray, col_dir: np.ndarray, normal: np.ndarray) -> np.ndarray:
    """(N, 3) patient mm → (N, 3) fractional (k slice, j row, i column) on a grid with any orientation.

    ``row_dir`` is the direction of increasing column index (DICOM IOP first triplet), ``col_dir`` that
    of increasing row index; spacings are per axis (non-square pixels allowed).
    """
    rel = np.asarray(points_xyz, dtype=np.float64) - np.asarray(origin_mm, dtype=np.float64)
    ds, dr, dc = (float(s) for s in spacing_zyx)
    return np.stack([rel @ normal / ds, rel @ col_dir / dr, rel @ row_dir / dc], axis=1)


# --------------------------------------------------------------------------------------------- SDF
def signed_distance_mm(mask: np.ndarray, spacing_mm: Sequence[float]) -> np.ndarray:
    """Signed Euclidean distance in mm (negative inside, positive outside) using the real voxel spacing.

    Distances are between voxel centres (scipy ``distance_transform_edt`` with ``sampling``), so the
    first voxel outside is +Δ and the last inside is −Δ. An empty mask has no distance: returns NaN
    everywhere (callers decide the fill, see :func:`scaled_sdf`).
    """
    mask = np.asarray(mask, dtype=bool)
    spacing = tuple(float(s) for s in spacing_mm)
    if not mask.any():
        return np.full(mask.shape, np.nan, dtype=np.float32)
    outside = ndimage.distance_transform_edt(~mask, sampling=spacing)
    if mask.all():
        inside = np.full(mask.shape, np.inf)
    else:
        inside = ndimage.distance_transform_edt(mask, sampling=spacing)
    return (outside - inside).astype(np.float32)


def scaled_sdf(mask: np.ndarray, spacing_mm: Sequence[float], clip_mm: float = 50.0) -> np.ndarray:
    """SDF clipped to ±``clip_mm`` and divided by it: values in [−1, 1], −1 deep inside.

    An absent structure is 0 everywhere, not +1: +1 would claim "far from a structure that exists"
    (the original's first fill value), while 0 carries no position; the per-structure presence flag
    travels separately (``structure_present`` in the NPZ, and the model's conditioning vector).
    """
    sdf = signed_distance_mm(mask, spacing_mm)
    if np.isnan(sdf).all():
        return np.zeros(mask.shape, dtype=np.float32)
    return (np.clip(sdf, -clip_mm, clip_mm) / float(clip_mm)).astype(np.float32)


# ------------------------------------------------------------------------------------------ resampling
def resample_to_grid(values: np.ndarray, src_origin_xyz, src_spacing_zyx, dst_origin_xyz, dst_spacing_zyx,
                     dst_shape_zyx, interpolation: str = "linear", default: float = 0.0,
                     src_direction: np.ndarray | None = None, dst_direction: np.ndarray | None = None) -> np.ndarray:
    """Resample a (z, y, x) volume onto another grid with SimpleITK (physical-space mapping).

    Args:
        src_origin_xyz / dst_origin_xyz: patient position (x, y, z) of voxel (0, 0, 0), mm.
        *_spacing_zyx: voxel size per array axis (z, y, x), mm.
        interpolation: "linear", "bspline" (3rd order), "nearest".
        default: value outside the source grid (0 Gy for dose).
        *_direction: 3×3 matrices whose columns are the x/y/z index axes in patient space (identity for
            the canonical axis-aligned grid).
    """
    import SimpleITK as sitk

    methods = {"linear": sitk.sitkLinear, "bspline": sitk.sitkBSpline, "nearest": sitk.sitkNearestNeighbor}
    if interpolation not in methods:
        raise ValueError(f"interpolation must be one of {sorted(methods)}, got {interpolation!r}")
    src = sitk.GetImageFromArray(np.ascontiguousarray(values, dtype=np.float32))
    src.SetOrigin(tuple(float(v) for v in src_origin_xyz))
    src.SetSpacing(tuple(float(v) for v in reversed(list(src_spacing_zyx))))
    src.SetDirection(tuple(np.asarray(src_direction if src_direction is not None else np.eye(3), dtype=float).ravel()))
    ref = sitk.Image([int(v) for v in reversed(list(dst_shape_zyx))], sitk.sitkFloat32)
    ref.SetOrigin(tuple(float(v) for v in dst_origin_xyz))
    ref.SetSpacing(tuple(float(v) for v in reversed(list(dst_spacing_zyx))))
    ref.SetDirection(tuple(np.asarray(dst_direction if dst_direction is not None else np.eye(3), dtype=float).ravel()))
    out = sitk.Resample(src, ref, sitk.Transform(), methods[interpolation], float(default), sitk.sitkFloat32)
    return sitk.GetArrayFromImage(out)


def grid_bounds_xyz(origin_xyz, spacing_zyx, shape_zyx) -> tuple[np.ndarray, np.ndarray]:
    """(min, max) patient coordinates of the voxel centres of an axis-aligned canonical grid."""
    origin = np.asarray(origin_xyz, dtype=np.float64)
    extent = (np.asarray(shape_zyx[::-1], dtype=np.float64) - 1) * np.asarray(spacing_zyx[::-1], dtype=np.float64)
    return origin, origin + extent


def overlap_fraction(a_bounds, b_bounds) -> float:
    """Fraction of box ``a``'s volume that lies inside box ``b`` (boxes as (min xyz, max xyz))."""
    lo = np.maximum(a_bounds[0], b_bounds[0])
    hi = np.minimum(a_bounds[1], b_bounds[1])
    inter = np.prod(np.clip(hi - lo, 0, None))
    vol = np.prod(np.clip(a_bounds[1] - a_bounds[0], 1e-9, None))
    return float(inter / vol)
