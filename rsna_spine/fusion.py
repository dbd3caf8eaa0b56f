"""Sagittal + axial fusion for the spinal canal and subarticular grades (issue 14, item 6).

Top solutions of the competition read both grades from both views: the canal is seen along its length on
the sagittal T2 stack and in cross-section on the axial T2 slice at the disc; the lateral recess is seen
in cross-section on the axial slice and along its course on a parasagittal T2 slice. Here each graded
target of these two groups gets a *second view*: its centre (the primary view's point, in patient mm) is
projected into the other series, and the N slices around the nearest slice plane are cropped there
(:class:`rsna_spine.stage_datasets.CropDataset`). The classifier encodes both crops with the same
per-slice CNN → GRU → attention-MIL encoder and concatenates the two pooled features (plus a
"second view present" flag) before the head (:class:`rsna_spine.models.SpineClassifier`,
``second_view=True``). A target whose second view is missing (no such series, or no slice within the
tolerance of :func:`rsna_spine.stacks.slice_tolerance_mm`) is graded from its primary view alone, with
zeros in place of the second view's features and the flag 0; such fallbacks are counted with their reason.
Training drops the second view at random (``train.second_view_dropout``) so the model learns that case.
"""

from __future__ import annotations

from collections import Counter

import numpy as np

from rsna_spine.constants import GROUP_OF_CONDITION
from rsna_spine.data import StackStore
from common.slice_geometry import nearest_slice
from rsna_spine.stacks import slice_tolerance_mm

SECOND_VIEW_OF_GROUP = {"spinal": "axial_t2", "subarticular": "sag_t2"}  # the series a second view comes from


def second_view_center(store: StackStore, item: dict, max_distance_mm: float = 0.0) -> tuple[dict | None, str]:
    """(centre of the second view, "") or (None, reason) for one stage-2 item.

    The item's centre (its stack's (k, j, i)) is mapped to patient mm, then to the nearest slice plane of
    every stack of the other series (exact per-slice positions): the nearest one within tolerance whose
    image contains the point wins. The centre is {"series_id", "stack_index", "kji", "distance_mm"}."""
    key = SECOND_VIEW_OF_GROUP.get(GROUP_OF_CONDITION[item["condition"]])
    if key is None:
        return None, "group not fused"
    primary = store.get(item["study_id"], item["series_id"], item["stack_index"])
    point = primary.voxel_to_patient(np.asarray(item["kji"], dtype=np.float64))[0]
    stacks = store.stacks_of(item["study_id"], key)
    if not stacks:
        return None, f"no {key} series"
    best, nearest = None, float("inf")
    for stack in stacks:
        k, distance, inside = nearest_slice(stack, point)
        if inside:
            nearest = min(nearest, distance)
        if inside and distance <= slice_tolerance_mm(stack, max_distance_mm) and (best is None or distance < best[2]):
            best = (stack, k, distance)
    if best is None:
        if not np.isfinite(nearest):
            return None, f"point outside every {key} image"
        return None, f"nearest {key} slice beyond tolerance"
    stack, k, distance = best
    kji = stack.patient_to_voxel(point)[0]
    return {"series_id": int(stack.series_id), "stack_index": int(stack.stack_index),
            "kji": (float(k), float(kji[1]), float(kji[2])), "distance_mm": float(distance)}, ""


def attach_second_views(items: list[dict], store: StackStore, max_distance_mm: float = 0.0) -> dict:
    """Set ``item["second_view"]`` (a centre or None) on every item, in place; returns the counts
    {"fused": n, "primary_only": n, "reasons": {reason: n}} over the items of the fused groups."""
    reasons: Counter = Counter()
    fused = 0
    for item in items:
        if GROUP_OF_CONDITION[item["condition"]] not in SECOND_VIEW_OF_GROUP:
            item["second_view"] = None
            continue
        center, reason = second_view_center(store, item, max_distance_mm)
        item["second_view"] = center
        if center is None:
            reasons[reason] += 1
        else:
            fused += 1
    return {"fused": fused, "primary_only": int(sum(reasons.values())), "reasons": dict(reasons)}


def uses_second_view(ckpt: dict) -> bool:
    """Whether a classifier checkpoint was trained with the second view."""
    return bool(ckpt["model"]["kwargs"].get("second_view", False))


def attach_for_ensemble(items: list[dict], store: StackStore, classifiers: list, logger=None) -> dict | None:
    """:func:`attach_second_views` on ``items`` (in place) when a classifier of the ensemble ([(model, ckpt)])
    uses the second view (tolerance: the one it was trained with); its counts, logged, or None."""
    fused = [ckpt for _, ckpt in classifiers if uses_second_view(ckpt)]
    if not fused:
        return None
    tolerance = float(fused[0]["preprocessing"].get("second_view_max_distance_mm", 0.0))
    counts = attach_second_views(items, store, tolerance)
    if logger is not None:
        logger(f"sagittal + axial fusion: second view for {counts['fused']} spinal / subarticular targets, "
               f"{counts['primary_only']} graded from the primary view alone {counts['reasons']}")
    return counts
