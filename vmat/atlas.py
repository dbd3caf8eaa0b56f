"""The "mean dose atlas" baseline: a prescription-conformal dose from the structure masks alone.

Inside each target the dose is that target's prescription; outside, it falls off with the distance to
the target as the training plans do on average: with d_t the distance (mm) from a voxel to target t and
D_t its dose, the prediction is max_t D_t · g(d_t), where g is the mean of dose / D_t* over training
voxels binned by the distance to their nearest target t*. Zero outside the body. A model that cannot
beat this has learned nothing beyond "dose falls off with distance from the PTV".
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence

import numpy as np
from scipy import ndimage

BIN_MM = 2.0
MAX_MM = 200.0


def _target_distances(masks: np.ndarray, names: Sequence[str], target_doses: Mapping[str, float], spacing_mm):
    out = {}
    for name, dose in target_doses.items():
        if name in names and np.asarray(masks[list(names).index(name)]).any():
            mask = np.asarray(masks[list(names).index(name)], bool)
            out[name] = (float(dose), mask, ndimage.distance_transform_edt(~mask, sampling=spacing_mm))
    return out


def fit_atlas(cases: Iterable[Mapping], target_doses: Mapping[str, float]) -> dict:
    """Fit g(d) on cases with ``dose``, ``masks``, ``structure_names``, ``spacing_mm``, ``possible_dose_mask``
    (and ``dose_valid_mask``: only voxels with a known reference dose count).

    ``cases`` may be a generator: one case is held at a time (169 OpenKBP cases do not fit in memory at once).
    """
    edges = np.arange(0.0, MAX_MM + BIN_MM, BIN_MM)
    sums = np.zeros(len(edges) - 1)
    counts = np.zeros(len(edges) - 1)
    n_cases = 0
    for case in cases:
        n_cases += 1
        targets = _target_distances(case["masks"], case["structure_names"], target_doses, case["spacing_mm"])
        if not targets:
            continue
        body = np.asarray(case["possible_dose_mask"], bool)
        if "dose_valid_mask" in case:  # voxels outside the RTDOSE grid have no dose to learn from
            body = body & np.asarray(case["dose_valid_mask"], bool)
        stack = np.stack([t[2] for t in targets.values()])
        nearest = np.argmin(stack, axis=0)
        dist = np.min(stack, axis=0)
        level = np.asarray([t[0] for t in targets.values()])[nearest]
        outside = body & (dist > 0)
        ratio = np.asarray(case["dose"])[outside] / level[outside]
        bins = np.clip((dist[outside] / BIN_MM).astype(int), 0, len(sums) - 1)
        sums += np.bincount(bins, ratio, minlength=len(sums))
        counts += np.bincount(bins, minlength=len(sums))
    profile = np.where(counts > 0, sums / np.maximum(counts, 1), np.nan)
    # Bins never seen (far away) take the last seen value; an atlas fitted on nothing is an error.
    if np.all(np.isnan(profile)):
        raise ValueError("atlas: no training voxels outside a target (are there cases with dose and targets?)")
    last = np.nan
    for i in range(len(profile)):
        last = profile[i] if np.isfinite(profile[i]) else last
        profile[i] = last if np.isfinite(last) else 1.0
    return {"bin_mm": BIN_MM, "profile": [float(v) for v in profile], "target_doses_gy": dict(target_doses),
            "n_cases": n_cases}


def predict_atlas(atlas: Mapping, masks: np.ndarray, names: Sequence[str], spacing_mm, body: np.ndarray) -> np.ndarray:
    """Atlas dose (Gy) for one case."""
    profile = np.asarray(atlas["profile"], dtype=np.float64)
    targets = _target_distances(masks, names, atlas["target_doses_gy"], spacing_mm)
    out = np.zeros(np.asarray(body).shape, dtype=np.float64)
    for dose, mask, dist in targets.values():
        bins = np.clip((dist / float(atlas["bin_mm"])).astype(int), 0, len(profile) - 1)
        falloff = np.where(mask, 1.0, profile[bins])
        out = np.maximum(out, dose * falloff)
    return (out * np.asarray(body, bool)).astype(np.float32)
