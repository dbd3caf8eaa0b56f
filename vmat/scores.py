"""The OpenKBP competition scores, exactly as its evaluation code computes them
(Babier et al., Med Phys 2021; ababier/open-kbp provided_code/dose_evaluation_class.py).

- Dose score of one patient: Σ over the whole grid |reference − prediction| / Σ possible_dose_mask
  (the numerator is not restricted to the mask); the benchmark's dose score is the mean over patients.
- DVH score: the mean absolute difference over all patients and all (metric, structure) pairs that
  exist: OARs D_0.1cc and mean dose; targets D99, D95 and D1. Percentiles are numpy's linear ones:
  D99 = percentile 1, D95 = percentile 5, D1 = percentile 99, and D_0.1cc = percentile
  100 − n/N·100 with n = max(1, round(100 mm³ / voxel volume)) voxels in 0.1 cc.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

OPENKBP_OARS = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx", "Mandible")
OPENKBP_TARGETS = ("PTV56", "PTV63", "PTV70")


def openkbp_dose_score(reference: np.ndarray, prediction: np.ndarray, possible_dose_mask: np.ndarray) -> float:
    """Σ|ref − pred| over the grid / number of possible-dose voxels, for one patient."""
    n = float(np.sum(possible_dose_mask))
    if n == 0:
        raise ValueError("possible_dose_mask is empty: the OpenKBP dose score is undefined")
    return float(np.sum(np.abs(np.asarray(reference, np.float64) - np.asarray(prediction, np.float64))) / n)


def openkbp_dvh_metrics(dose: np.ndarray, masks: np.ndarray, names: Sequence[str], voxel_dims_mm: Sequence[float],
                        oars: Sequence[str] = OPENKBP_OARS, targets: Sequence[str] = OPENKBP_TARGETS) -> dict:
    """{(metric, structure): value} for the structures present in ``masks`` (channel order ``names``)."""
    voxel_mm3 = float(np.prod(voxel_dims_mm))
    voxels_in_tenth_cc = max(1.0, float(np.round(100.0 / voxel_mm3)))
    out = {}
    for c, name in enumerate(names):
        mask = np.asarray(masks[c], bool)
        if not mask.any():
            continue
        roi_dose = np.asarray(dose, np.float64)[mask]
        if name in oars:
            out[("D_0.1_cc", name)] = float(np.percentile(roi_dose, 100 - voxels_in_tenth_cc / roi_dose.size * 100))
            out[("mean", name)] = float(roi_dose.mean())
        elif name in targets:
            out[("D_99", name)] = float(np.percentile(roi_dose, 1))
            out[("D_95", name)] = float(np.percentile(roi_dose, 5))
            out[("D_1", name)] = float(np.percentile(roi_dose, 99))
    return out


def openkbp_scores(cases: Sequence[Mapping]) -> dict:
    """Benchmark scores over patients. Each case: reference, prediction, possible_dose_mask, masks, names,
    voxel_dims_mm. Returns {"dose_score", "dvh_score", "per_case_dose_score", "n_dvh_terms"}."""
    if not cases:
        raise ValueError("no cases to score")
    dose_scores, dvh_diffs = [], []
    for case in cases:
        dose_scores.append(openkbp_dose_score(case["reference"], case["prediction"], case["possible_dose_mask"]))
        ref = openkbp_dvh_metrics(case["reference"], case["masks"], case["names"], case["voxel_dims_mm"])
        pred = openkbp_dvh_metrics(case["prediction"], case["masks"], case["names"], case["voxel_dims_mm"])
        dvh_diffs += [abs(ref[key] - pred[key]) for key in ref]
    return {"dose_score": float(np.mean(dose_scores)),
            "dvh_score": float(np.nanmean(dvh_diffs)) if dvh_diffs else float("nan"),
            "per_case_dose_score": dose_scores, "n_dvh_terms": len(dvh_diffs)}
