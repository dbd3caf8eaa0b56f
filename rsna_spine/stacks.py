"""Stacks by geometry: a series split into stacks, a level assigned to a slice with its distance in mm, and
the choice among several series of one description.

The geometry itself lives in :mod:`common.slice_geometry` (callers import it from there): orientation is never
guessed (a slice without a valid ImageOrientationPatient / ImagePositionPatient is skipped with a log line,
``missing="skip"``, default and counted, or fails the series, ``missing="error"``); ``split_stacks`` cuts a
series wherever a gap exceeds ``gap_factor`` × the median gap, so two parallel axial blocks (upper and lower
discs) become two stacks; ``nearest_slice`` measures the distance from a patient point to the nearest slice
*plane* in mm from each slice's own ImagePositionPatient; ``instance_number`` falls back to the file name.
What the competition data adds (issue 14; notes/rsna_spine.md "pitfalls"):

- **Level → slice with a distance.** :func:`assign_level_slice` accepts the nearest slice only within a
  tolerance and otherwise says why (the caller falls back to class priors and counts it).
- **Several series of one description** (e.g. two Sagittal T2/STIR): :func:`choose_stack` ranks by
  coverage of the levels first, then quality — see :func:`stack_rank` for the rule.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence

import numpy as np

from common.slice_geometry import nearest_slice

log = logging.getLogger(__name__)

# what a sagittal stack must cover to hold every level point: a left-right slab wide enough for both
# foramina (about ±25 mm around the canal) and a head-feet field from L1/L2 to L5/S1 with margin
SAGITTAL_SLAB_MM = 50.0
SAGITTAL_FOV_MM = 160.0


# ------------------------------------------------------------------------------------- level -> slice
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
