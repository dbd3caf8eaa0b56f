"""Stacks by geometry: a series split into stacks, a level assigned to a slice with its distance in mm, and
the choice among several series of one description.

Built on :mod:`common.dicom_series` (``group_slices``, ``sort_slices``), adding what the real competition
data needs (issue 14; notes/rsna_spine.md "pitfalls"):

- **Orientation is never guessed.** ``common.dicom_series.orientation`` returns an axial identity when
  ImageOrientationPatient is absent; here a slice without a valid ImageOrientationPatient or
  ImagePositionPatient is either skipped with a log line naming the file (``missing="skip"``, default,
  counted) or the series fails (``missing="error"``).
- **Position continuity.** Slices of one orientation and image size are sorted along the normal and cut
  wherever a gap exceeds ``gap_factor`` × the median gap: two parallel axial blocks (upper and lower
  discs) become two stacks, so a point between them is not "inside" either.
- **Level → slice with a distance.** :func:`nearest_slice` measures the distance from a patient point to
  the nearest slice *plane* in mm from each slice's own ImagePositionPatient (uneven gaps stay exact);
  :func:`assign_level_slice` accepts it only within a tolerance and otherwise says why (the caller falls
  back to class priors and counts it).
- **Several series of one description** (e.g. two Sagittal T2/STIR): :func:`choose_stack` ranks by
  coverage of the levels first, then quality — see :func:`stack_rank` for the rule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom

from common.dicom_series import DicomSeriesError, group_slices, sort_slices

log = logging.getLogger(__name__)

MISSING_POLICIES = ("skip", "error")
# what a sagittal stack must cover to hold every level point: a left-right slab wide enough for both
# foramina (about ±25 mm around the canal) and a head-feet field from L1/L2 to L5/S1 with margin
SAGITTAL_SLAB_MM = 50.0
SAGITTAL_FOV_MM = 160.0


@dataclass
class StackSplit:
    """One stack of a series: indices into the datasets (sorted along the normal) and positions (mm)."""

    indices: list[int]
    along_mm: np.ndarray


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


def split_stacks(datasets: Sequence[pydicom.Dataset], sources: Sequence[str | Path], gap_factor: float = 2.5,
                 angle_tol_deg: float = 1.0, missing: str = "skip",
                 logger: Callable[[str], None] = log.warning) -> tuple[list[StackSplit], dict]:
    """Split the slices of one series into stacks by orientation, image size and position continuity.

    Returns (stacks largest first, counts {"slices", "skipped_geometry", "gap_splits"}). A slice without
    a valid ImageOrientationPatient / ImagePositionPatient is skipped with a log line (``missing="skip"``)
    or raises DicomSeriesError naming the file and field (``missing="error"``). Within one orientation and
    size, slices are sorted along the normal and a new stack starts after any gap > ``gap_factor`` × the
    median gap (uneven gaps below that stay one stack; their exact positions are kept).
    """
    if missing not in MISSING_POLICIES:
        raise ValueError(f"missing must be one of {MISSING_POLICIES}, got {missing!r}")
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
    for group in group_slices([datasets[i] for i in keep], angle_tol_deg=angle_tol_deg):
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


def instance_number(ds: pydicom.Dataset, path: str | Path, logger: Callable[[str], None] = log.warning) -> int:
    """InstanceNumber from the header; else from the file name (Kaggle names files ``{instance}.dcm``) with
    a logged warning; else −1 with a logged warning (labels on that slice cannot be matched)."""
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


# ------------------------------------------------------------------------------------- level -> slice
def nearest_slice(stack, point_mm: np.ndarray) -> tuple[int, float, bool]:
    """(k of the nearest slice plane, its distance in mm, whether the point projects inside the image).

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


def slice_tolerance_mm(stack, max_distance_mm: float = 0.0) -> float:
    """The accepted level-to-slice distance: ``max_distance_mm`` when > 0, else the stack's median slice
    spacing (a point inside a stack is at most half a gap from a slice; this also accepts half a gap
    beyond either end)."""
    return float(max_distance_mm) if max_distance_mm > 0 else float(abs(stack.spacing_mm[0]))


def assign_level_slice(stacks: Sequence, point_mm: np.ndarray, max_distance_mm: float = 0.0) -> dict:
    """The slice of ``stacks`` (any series) for a level point: nearest plane within tolerance, in-plane inside.

    Returns {"stack", "k", "distance_mm", "ok", "reason"}; ties within 0.5 mm go to the finer pixels, then
    the lower series id. When nothing qualifies, ``ok`` is False, ``stack`` / ``k`` / ``distance_mm`` describe
    the nearest slice seen (or None) and ``reason`` says why.
    """
    candidates, nearest = [], None
    for stack in stacks:
        k, dist, inside = nearest_slice(stack, point_mm)
        if inside and (nearest is None or dist < nearest[2]):
            nearest = (stack, k, dist)
        tol = slice_tolerance_mm(stack, max_distance_mm)
        if inside and dist <= tol:
            candidates.append((round(dist / 0.5), stack.spacing_mm[1] * stack.spacing_mm[2], stack.series_id,
                               stack.stack_index, stack, k, dist))
    if candidates:
        *_, stack, k, dist = min(candidates, key=lambda c: c[:4])
        return {"stack": stack, "k": k, "distance_mm": dist, "ok": True, "reason": ""}
    if not stacks:
        return {"stack": None, "k": None, "distance_mm": float("nan"), "ok": False, "reason": "no axial stack"}
    if nearest is None:
        return {"stack": None, "k": None, "distance_mm": float("nan"), "ok": False,
                "reason": "the level point projects outside every axial image"}
    tol = slice_tolerance_mm(nearest[0], max_distance_mm)
    return {"stack": nearest[0], "k": nearest[1], "distance_mm": nearest[2], "ok": False,
            "reason": f"nearest axial slice is {nearest[2]:.1f} mm away (tolerance {tol:.1f} mm)"}


# ------------------------------------------------------------------------------ several series of a kind
def stack_rank(stack) -> tuple:
    """Sort key (larger is better) of a sagittal stack among several series of one description.

    Rule: (1) coverage of the levels = min(left-right slab / 50 mm, 1) + min(head-feet field / 160 mm, 1),
    rounded to 0.01 (the slab must reach both foramina, the field L1/L2 to L5/S1); (2) quality = finer
    in-plane pixels (smaller pixel area); (3) more slices; (4) the lower series id (deterministic).
    """
    n_k, rows, _ = stack.shape
    ds, dr, dc = (abs(float(v)) for v in stack.spacing_mm)
    along = stack.slice_origins_mm @ stack.normal
    slab = float(along.max() - along.min()) + ds  # each slice covers about one gap
    coverage = min(slab / SAGITTAL_SLAB_MM, 1.0) + min(rows * dr / SAGITTAL_FOV_MM, 1.0)
    return (round(coverage, 2), -round(dr * dc, 4), n_k, -int(stack.series_id))


def choose_stack(stacks: Sequence, logger: Callable[[str], None] | None = None):
    """The stack to localize on among several (series of one description, stacks of one series), by
    :func:`stack_rank`; None when there is none. Logs the choice when there was one to make."""
    if not stacks:
        return None
    best = max(stacks, key=stack_rank)
    if logger is not None and len(stacks) > 1:
        logger(f"study {best.study_id} {best.series_key}: {len(stacks)} candidate stacks; chose series "
               f"{best.series_id} stack {best.stack_index} (coverage, then pixel size: {stack_rank(best)[:2]})")
    return best
