"""Bologna Lens Challenge metrics (Metcalf et al. 2019, A&A 625, A119), built on common.metrics.

- ``auroc``: area under the ROC curve.
- ``tpr0``: the highest true-positive rate reached before a single false positive (over all thresholds).
- ``tpr10``: the highest TPR with fewer than ten false positives.
  Both are false-positive COUNTS (common.metrics.tpr_at_fp_count with 0 and 9), so they depend on the
  number of non-lenses; a lens tied in score with a non-lens cannot be counted without that non-lens.
  The original system computed "TPR@FPR=0.1" (a rate) under the Bologna name, ~500× looser on 100k cutouts.
- ``tpr_at_fpr_rate_0.1`` / ``_0.01`` / ``_0.001``: rate-based TPR at a false-positive RATE ≤ x — a
  different, clearly named metric.
Stratified results (Metcalf et al. section 5, fig. 6-8) drop the lenses below a threshold of a truth
quantity (Einstein area, flux contrast, lensed pixel count) and keep ALL non-lenses.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence

import numpy as np

from common.metrics import expected_calibration_error, reliability_curve, roc_auc, tpr_at_fp_count, tpr_at_fpr

FPR_RATES = (1e-1, 1e-2, 1e-3)
DOMAIN_SHIFT_AUROC = 0.85
STRATIFY_QUANTITIES = ("einstein_area_arcsec2", "flux_contrast", "lensed_pixels_above_1sigma")


def rate_metric_name(rate: float) -> str:
    return f"tpr_at_fpr_rate_{rate:g}"


def _labelled(y_true, score) -> tuple[np.ndarray, np.ndarray]:
    y = np.asarray(y_true, dtype=np.float64).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    if y.shape != s.shape:
        raise ValueError(f"labels and scores differ in size: {y.shape} vs {s.shape}")
    keep = (y == 0) | (y == 1)  # label -1 (unknown) is not evaluated
    if np.isnan(s[keep]).any():
        raise ValueError("scores contain NaN")
    return y[keep].astype(int), s[keep]


def bologna_metrics(y_true, score) -> dict:
    """AUROC, TPR0, TPR10 (false-positive counts), rate-based TPR@FPR, and the counts behind them."""
    y, s = _labelled(y_true, score)
    n_pos, n_neg = int(y.sum()), int((1 - y).sum())
    out = {"n_lenses": n_pos, "n_nonlenses": n_neg,
           "auroc": roc_auc(y, s) if n_pos and n_neg else math.nan,
           "tpr0": tpr_at_fp_count(y, s, 0) if n_pos else math.nan,
           "tpr10": tpr_at_fp_count(y, s, 9) if n_pos else math.nan}
    for rate in FPR_RATES:
        out[rate_metric_name(rate)] = tpr_at_fpr(y, s, rate) if n_pos and n_neg else math.nan
    return out


def stratified_curve(y_true, score, quantity, thresholds: Sequence[float] | None = None,
                     metric_fn: Callable = bologna_metrics) -> list[dict]:
    """Metrics when only lenses with ``quantity >= threshold`` are kept (all non-lenses always kept).

    ``thresholds`` default to the 0, 10, …, 90th percentiles of the lenses' quantity.
    """
    y, s = _labelled(y_true, score)
    q_all = np.asarray(quantity, dtype=np.float64).ravel()
    labelled = np.isin(np.asarray(y_true, dtype=np.float64).ravel(), (0, 1))
    q = q_all[labelled]
    lens_q = q[(y == 1) & np.isfinite(q)]
    if thresholds is None:
        thresholds = np.unique(np.percentile(lens_q, np.arange(0, 100, 10))) if lens_q.size else []
    rows = []
    for threshold in thresholds:
        keep = (y == 0) | ((y == 1) & np.isfinite(q) & (q >= threshold))
        row = {"threshold": float(threshold)}
        row.update(metric_fn(y[keep], s[keep]))
        rows.append(row)
    return rows


def per_survey_metrics(y_true, score, surveys, log: Callable[[str], None] | None = None,
                       threshold: float = DOMAIN_SHIFT_AUROC, trained_surveys=None) -> dict:
    """Bologna metrics per survey; a survey the model was NOT trained on (not in ``trained_surveys``; all
    surveys when it is None) whose AUROC is below ``threshold`` gets ``domain_shift_warning`` and a log line
    (the cross-survey check the original only planned). A low AUROC on a survey trained on is not a domain
    shift: it gets ``low_auroc_in_training_survey`` and its own log line."""
    surveys = np.asarray(surveys).astype(str).ravel()
    y_all = np.asarray(y_true, dtype=np.float64).ravel()
    s_all = np.asarray(score, dtype=np.float64).ravel()
    trained = None if trained_surveys is None else {str(name) for name in trained_surveys}
    out = {}
    for name in sorted(set(surveys)):
        sel = surveys == name
        metrics = bologna_metrics(y_all[sel], s_all[sel])
        auroc = metrics["auroc"]
        low = bool(math.isfinite(auroc) and auroc < threshold)
        seen = trained is not None and name in trained
        metrics["trained_on"] = seen
        metrics["domain_shift_warning"] = low and not seen
        metrics["low_auroc_in_training_survey"] = low and seen
        if log is not None and metrics["domain_shift_warning"]:
            log(f"WARNING: possible domain shift for survey '{name}' (not trained on): AUROC {auroc:.3f} < {threshold}")
        elif log is not None and low:
            log(f"[lensing] survey '{name}' was trained on and scores AUROC {auroc:.3f} < {threshold} "
                "(not a domain shift: the model is weak on its own survey)")
        out[name] = metrics
    return out


def bootstrap_comparison(y_true, score, baseline_score, n_boot: int = 200, seed: int = 0,
                         level: float = 0.95) -> dict:
    """Percentile bootstrap CIs of AUROC, TPR0 and TPR10 for a model, a baseline and their paired difference.

    Resampling is stratified by class (lenses and non-lenses each drawn with replacement, their counts
    kept), because TPR0/TPR10 are defined by false-positive COUNTS; both scores are evaluated on the same
    resample (paired). Returns {metric: {"model": [lo, hi], "baseline": [lo, hi], "difference": [lo, hi],
    "difference_point": model − baseline on the full set}} and ``n_boot``, ``level``."""
    y, s = _labelled(y_true, score)
    _, b = _labelled(y_true, baseline_score)
    pos, neg = np.where(y == 1)[0], np.where(y == 0)[0]
    if not (pos.size and neg.size) or n_boot <= 0:
        return {"n_boot": 0, "level": level}
    rng = np.random.default_rng(seed)
    fns = {"auroc": roc_auc, "tpr0": lambda yy, ss: tpr_at_fp_count(yy, ss, 0),
           "tpr10": lambda yy, ss: tpr_at_fp_count(yy, ss, 9)}
    draws = {name: np.empty((n_boot, 2)) for name in fns}
    for i in range(n_boot):
        idx = np.concatenate([rng.choice(pos, pos.size), rng.choice(neg, neg.size)])
        for name, fn in fns.items():
            draws[name][i] = fn(y[idx], s[idx]), fn(y[idx], b[idx])
    q = [100 * (1 - level) / 2, 100 * (1 + level) / 2]
    out: dict = {"n_boot": int(n_boot), "level": level}
    for name, fn in fns.items():
        d = draws[name]
        out[name] = {"model": np.percentile(d[:, 0], q).tolist(), "baseline": np.percentile(d[:, 1], q).tolist(),
                     "difference": np.percentile(d[:, 0] - d[:, 1], q).tolist(),
                     "difference_point": float(fn(y, s) - fn(y, b))}
    return out


def calibration(y_true, probability, n_bins: int = 10) -> dict:
    """Expected calibration error and the reliability curve of the lens probability (labelled rows)."""
    y, p = _labelled(y_true, probability)
    if y.size == 0:
        return {"ece": math.nan, "reliability": None}
    return {"ece": expected_calibration_error(p, y, n_bins=n_bins),
            "reliability": reliability_curve(p, y, n_bins=n_bins),
            "brier": float(np.mean((p - y) ** 2))}


def roc_curve_counts(y_true, score) -> dict:
    """ROC points as false-positive counts and true-positive rates (for plots with both axes)."""
    from sklearn.metrics import roc_curve

    y, s = _labelled(y_true, score)
    fpr, tpr, _ = roc_curve(y, s)
    n_neg = int((1 - y).sum())
    return {"fpr": fpr, "tpr": tpr, "fp_count": np.round(fpr * n_neg).astype(int)}
