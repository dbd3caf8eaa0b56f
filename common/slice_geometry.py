"""Slice geometry of DICOM image series: orientation and position read, never guessed; stacks split by
orientation, image size and position continuity; uneven or missing slices found (and interpolated only on
request); gantry tilt detected; a patient point mapped to its nearest slice with the distance in mm.

Used by :mod:`common.dicom_series` (volumes), vmat (CT, RTDOSE) and rsna_spine (MR stacks). Conventions
(DICOM PS3.3 C.7.6.2.1.1): ImageOrientationPatient holds the row cosine (direction of increasing column
index) then the column cosine; the slice normal is their cross product; a slice's position along the
normal is ImagePositionPatient · normal.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from common.errors import InputError

log = logging.getLogger(__name__)

MISSING_GEOMETRY_POLICIES = ("skip", "error")


class DicomSeriesError(InputError):
    """A series that cannot be turned into a volume; the message names the file(s) and the field."""


class UnevenSlicesError(DicomSeriesError):
    """Missing or uneven slices in a stack; ``gaps_mm`` lists them as [(position_lo, position_hi)] in mm."""

    def __init__(self, message: str, gaps_mm: list[tuple[float, float]], step_mm: float):
        super().__init__(message)
        self.gaps_mm, self.step_mm = gaps_mm, step_mm


# ------------------------------------------------------------------------------------------- one slice
def geometry_problem(ds: pydicom.Dataset) -> str | None:
    """The missing or invalid geometry field of one slice header, or None when it has all it needs."""
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return "missing field ImageOrientationPatient"
    try:
        rc = np.asarray([float(v) for v in iop], dtype=np.float64).reshape(2, 3)
    except (TypeError, ValueError):
        return "unreadable ImageOrientationPatient"
    if np.linalg.norm(np.cross(rc[0], rc[1])) < 0.5:
        return "degenerate ImageOrientationPatient (row and column cosines not orthogonal)"
    ipp = getattr(ds, "ImagePositionPatient", None)
    if ipp is None or len(ipp) != 3:
        return "missing field ImagePositionPatient"
    return None


def orientation(ds: pydicom.Dataset, source: str | Path = "") -> np.ndarray:
    """ImageOrientationPatient as a (2, 3) array (row cosine, column cosine).

    A missing, unreadable or degenerate ImageOrientationPatient raises DicomSeriesError naming the file:
    an orientation is never guessed (an axial default silently mislabels sagittal or coronal images)."""
    iop = getattr(ds, "ImageOrientationPatient", None)
    where = f"{source}: " if source else ""
    if iop is None or len(iop) != 6:
        raise DicomSeriesError(f"{where}missing field ImageOrientationPatient (orientation is not guessed)")
    try:
        rc = np.asarray([float(v) for v in iop], dtype=np.float64).reshape(2, 3)
    except (TypeError, ValueError) as exc:
        raise DicomSeriesError(f"{where}unreadable ImageOrientationPatient {list(iop)}") from exc
    if np.linalg.norm(np.cross(rc[0], rc[1])) < 0.5:
        raise DicomSeriesError(f"{where}degenerate ImageOrientationPatient {list(iop)} "
                               "(row and column cosines not orthogonal)")
    return rc


def slice_normal(iop: np.ndarray) -> np.ndarray:
    """Unit normal = row cosine × column cosine."""
    normal = np.cross(iop[0], iop[1])
    return normal / np.linalg.norm(normal)


def position(ds: pydicom.Dataset) -> np.ndarray | None:
    """ImagePositionPatient (mm) or None when absent."""
    ipp = getattr(ds, "ImagePositionPatient", None)
    return None if ipp is None or len(ipp) != 3 else np.asarray([float(v) for v in ipp], dtype=np.float64)


def pixel_spacing(ds: pydicom.Dataset, source: str | Path = "") -> tuple[float, float]:
    """(row spacing Δr, column spacing Δc) in mm."""
    spacing = getattr(ds, "PixelSpacing", None)
    if spacing is None or len(spacing) != 2:
        raise DicomSeriesError(f"{source}: missing field PixelSpacing")
    return float(spacing[0]), float(spacing[1])


def instance_number(ds: pydicom.Dataset, path: str | Path, logger: Callable[[str], None] = log.warning) -> int:
    """InstanceNumber from the header; else from the file name (Kaggle and many exports name files
    ``{instance}.dcm``) with a logged warning; else −1 with a logged warning (nothing can be matched to it)."""
    value = getattr(ds, "InstanceNumber", None)
    if value not in (None, ""):
        try:
            return int(value)
        except (TypeError, ValueError):
            pass
    stem = Path(path).stem
    if stem.isdigit():
        logger(f"{path}: header lacks InstanceNumber; taken from the file name ({int(stem)})")
        return int(stem)
    logger(f"{path}: header lacks InstanceNumber and the file name is not a number; its labels cannot be matched")
    return -1


# ------------------------------------------------------------------------------------ several slices
def sort_slices(datasets: Sequence[pydicom.Dataset], sources: Sequence[str | Path] | None = None) -> tuple[list[int], np.ndarray]:
    """Order of ``datasets`` along the slice normal, and each slice's position on it (mm), ascending.

    Falls back to SliceLocation, then InstanceNumber, with a logged warning, when ImagePositionPatient
    is missing on any slice. The orientation itself is required (see :func:`orientation`).
    """
    if not datasets:
        return [], np.zeros(0)
    sources = list(sources) if sources is not None else [""] * len(datasets)
    normal = slice_normal(orientation(datasets[0], sources[0]))
    positions = [position(ds) for ds in datasets]
    if all(p is not None for p in positions):
        along = np.array([float(np.dot(p, normal)) for p in positions])
    elif all(getattr(ds, "SliceLocation", None) is not None for ds in datasets):
        log.warning("%s: ImagePositionPatient missing; sorting by SliceLocation", sources[0])
        along = np.array([float(ds.SliceLocation) for ds in datasets])
    else:
        log.warning("%s: ImagePositionPatient and SliceLocation missing; sorting by InstanceNumber", sources[0])
        along = np.array([float(getattr(ds, "InstanceNumber", i) or i) for i, ds in enumerate(datasets)])
    order = [int(i) for i in np.argsort(along, kind="stable")]
    return order, along[order]


def group_slices(datasets: Sequence[pydicom.Dataset], angle_tol_deg: float = 1.0,
                 sources: Sequence[str | Path] | None = None) -> list[list[int]]:
    """Split a series into groups of the same orientation and image size (several axial stacks, scouts,
    mixed sizes). Returns lists of indices into ``datasets``, largest group first."""
    sources = list(sources) if sources is not None else [""] * len(datasets)
    groups: list[tuple[np.ndarray, tuple, list[int]]] = []
    cos_tol = np.cos(np.deg2rad(angle_tol_deg))
    for index, ds in enumerate(datasets):
        normal = slice_normal(orientation(ds, sources[index]))
        size = (int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0)))
        for ref_normal, ref_size, members in groups:
            if ref_size == size and abs(float(np.dot(ref_normal, normal))) >= cos_tol:
                members.append(index)
                break
        else:
            groups.append((normal, size, [index]))
    return [members for _, _, members in sorted(groups, key=lambda g: -len(g[2]))]


def uneven_gaps(along_mm: np.ndarray, tolerance_mm: float = 0.1) -> list[tuple[float, float]]:
    """Gaps of a sorted stack that break a uniform spacing: [(position_lo, position_hi)] in mm, empty if
    uniform. The spacing is the median gap; a gap differing from it by more than ``tolerance_mm`` (an
    absolute tolerance: a missing slice, an uneven gap, a shifted position) is listed."""
    along_mm = np.asarray(along_mm, float)
    if len(along_mm) < 3:
        return []
    gaps = np.diff(along_mm)
    step = float(np.median(gaps))
    return [(float(along_mm[k]), float(along_mm[k + 1])) for k, g in enumerate(gaps) if abs(g - step) > tolerance_mm]


def describe_gaps(gaps_mm: Sequence[tuple[float, float]], limit: int = 5) -> str:
    """'6.00 mm between -12.00 and -6.00, ...' for the first ``limit`` gaps, then 'and N more'."""
    listed = ", ".join(f"{hi - lo:.2f} mm between {lo:.2f} and {hi:.2f}" for lo, hi in gaps_mm[:limit])
    return listed + (f" and {len(gaps_mm) - limit} more" if len(gaps_mm) > limit else "")


def interpolate_slices(array: np.ndarray, along_mm: np.ndarray, step_mm: float) -> tuple[np.ndarray, np.ndarray, list[int]]:
    """Linear interpolation along axis 0 onto a uniform grid of ``step_mm`` from the first slice.
    Returns (array, new positions in mm, indices of slices that are not an original slice)."""
    along_mm = np.asarray(along_mm, float)
    n = int(round((along_mm[-1] - along_mm[0]) / step_mm)) + 1
    uniform = along_mm[0] + np.arange(n) * step_mm
    idx = np.clip(np.searchsorted(along_mm, uniform, side="right") - 1, 0, len(along_mm) - 2)
    w = np.clip((uniform - along_mm[idx]) / (along_mm[idx + 1] - along_mm[idx]), 0.0, 1.0)
    out = array[idx] * (1 - w)[:, None, None] + array[idx + 1] * w[:, None, None]
    original = np.min(np.abs(uniform[:, None] - along_mm[None, :]), axis=1) < 1e-3 * step_mm
    return out.astype(np.float32), uniform, [int(k) for k in np.flatnonzero(~original)]


def sideways_shift_mm(slice_origins_mm: np.ndarray, normal: np.ndarray) -> float:
    """Largest slice-to-slice move of ImagePositionPatient across the image plane (mm): 0 for a straight
    stack, > 0 for a gantry-tilted (sheared) one, whatever GantryDetectorTilt says."""
    origins = np.asarray(slice_origins_mm, float)
    if len(origins) < 2:
        return 0.0
    steps = np.diff(origins, axis=0)
    sideways = steps - np.outer(steps @ normal, normal)
    return float(np.linalg.norm(sideways, axis=1).max())


@dataclass
class StackSplit:
    """One stack of a series: indices into the datasets (sorted along the normal) and positions (mm)."""

    indices: list[int]
    along_mm: np.ndarray


def split_stacks(datasets: Sequence[pydicom.Dataset], sources: Sequence[str | Path], gap_factor: float = 2.5,
                 angle_tol_deg: float = 1.0, missing: str = "skip",
                 logger: Callable[[str], None] = log.warning) -> tuple[list[StackSplit], dict]:
    """Split the slices of one series into stacks by orientation, image size and position continuity.

    Returns (stacks largest first, counts {"slices", "skipped_geometry", "gap_splits"}). A slice without
    a valid ImageOrientationPatient / ImagePositionPatient is skipped with a log line (``missing="skip"``)
    or raises DicomSeriesError naming the file and field (``missing="error"``). Within one orientation and
    size, slices are sorted along the normal and a new stack starts after any gap > ``gap_factor`` × the
    median gap: two parallel axial blocks become two stacks, so a point between them is inside neither.
    """
    if missing not in MISSING_GEOMETRY_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_GEOMETRY_POLICIES}, got {missing!r}")
    keep = []
    for index, (ds, source) in enumerate(zip(datasets, sources)):
        problem = geometry_problem(ds)
        if problem is None:
            keep.append(index)
        elif missing == "error":
            raise DicomSeriesError(f"{source}: {problem} (orientation and position are not guessed)")
        else:
            logger(f"skipping {source}: {problem} (orientation and position are not guessed)")
    counts = {"slices": len(datasets), "skipped_geometry": len(datasets) - len(keep), "gap_splits": 0}
    splits: list[StackSplit] = []
    kept_sources = [sources[i] for i in keep]
    for group in group_slices([datasets[i] for i in keep], angle_tol_deg=angle_tol_deg, sources=kept_sources):
        members = [keep[i] for i in group]
        order, along = sort_slices([datasets[i] for i in members], [sources[i] for i in members])
        ordered = [members[i] for i in order]
        gaps = np.diff(along)
        real = gaps[gaps > 1e-3]  # duplicates (same position) are the caller's business
        cuts = []
        if real.size >= 2:
            median = float(np.median(real))
            cuts = [int(c) + 1 for c in np.flatnonzero(gaps > gap_factor * median)]
            for c in cuts:
                logger(f"{sources[ordered[c]]}: gap of {gaps[c - 1]:.1f} mm > {gap_factor:g} x the median "
                       f"{median:.2f} mm: a new stack starts here")
        counts["gap_splits"] += len(cuts)
        for lo, hi in zip([0, *cuts], [*cuts, len(ordered)]):
            splits.append(StackSplit(indices=ordered[lo:hi], along_mm=np.asarray(along[lo:hi], dtype=np.float64)))
    splits.sort(key=lambda s: -len(s.indices))
    return splits, counts


def nearest_slice(stack, point_mm: np.ndarray) -> tuple[int, float, bool]:
    """(k of the nearest slice plane, its distance in mm, whether the point projects inside the image).

    ``stack`` is anything with ``slice_origins_mm`` (K, 3), ``normal``, ``row_dir``, ``col_dir``,
    ``spacing_mm`` (Δs, Δr, Δc) and ``shape`` (K, rows, columns), e.g. :class:`common.dicom_series.Volume`.
    Distances use each slice's own position along the normal (exact with uneven gaps)."""
    point_mm = np.asarray(point_mm, dtype=np.float64).reshape(3)
    along = stack.slice_origins_mm @ stack.normal
    distances = np.abs(point_mm @ stack.normal - along)
    k = int(np.argmin(distances))
    rel = point_mm - stack.slice_origins_mm[k]
    j = rel @ stack.col_dir / stack.spacing_mm[1]
    i = rel @ stack.row_dir / stack.spacing_mm[2]
    rows, cols = stack.shape[1], stack.shape[2]
    return k, float(distances[k]), bool(-0.5 <= j <= rows - 0.5 and -0.5 <= i <= cols - 0.5)
