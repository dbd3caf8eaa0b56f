"""Metrics computed over a whole evaluation set (never averaged over batches).

Regression: MAE, RMSE, bias, R², Pearson r, Bland-Altman, ICC(2,1)/ICC(3,1), win rate.
Classification: per-class recall/precision, balanced accuracy, macro F1, confusion matrix, log loss, ECE.
Ranking: ROC AUC, TPR at a false-positive *rate*, TPR at a false-positive *count*.
Uncertainty: the σ-scaling factor of predicted variances.
scikit-learn is used where it does the job; the tests check the rest against it or by hand.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn import metrics as skm


def _flat_finite(pred, true, valid=None) -> tuple[np.ndarray, np.ndarray]:
    pred = np.asarray(pred, dtype=np.float64).ravel()
    true = np.asarray(true, dtype=np.float64).ravel()
    if pred.shape != true.shape:
        raise ValueError(f"prediction and truth differ in size: {pred.shape} vs {true.shape}")
    keep = np.isfinite(pred) & np.isfinite(true)
    if valid is not None:
        keep &= np.asarray(valid, dtype=bool).ravel()
    return pred[keep], true[keep]


# ------------------------------------------------------------------------------------------ uncertainty
def sigma_scale(error, variance) -> tuple[float, int]:
    """σ scaling (Laves et al. 2020, MIDL, "Well-calibrated regression uncertainty in medical imaging with deep
    learning"): the maximum-likelihood factor s of the Gaussian N(estimate, (s·σ)²) given errors (estimate − true)
    and predicted variances σ², s² = mean(error² / σ²), over entries where both are finite and σ² > 0.
    Returns (s, number of entries used); (1, 0) without any."""
    e, v = np.asarray(error, np.float64).ravel(), np.asarray(variance, np.float64).ravel()
    ok = np.isfinite(e) & np.isfinite(v) & (v > 0)
    if not ok.any():
        return 1.0, 0
    return float(np.sqrt(np.mean(e[ok] ** 2 / v[ok]))), int(ok.sum())


# ------------------------------------------------------------------------------------------ regression
def regression_metrics(pred, true, valid=None) -> dict:
    """Over all finite (and ``valid``) pairs:

    mae = mean|p − t|; rmse = √mean(p − t)²; bias = mean(p − t);
    r2 = 1 − Σ(t − p)² / Σ(t − t̄)² (coefficient of determination over the whole set);
    pearson_r = correlation of p and t; n = pairs used.
    """
    p, t = _flat_finite(pred, true, valid)
    n = p.size
    if n == 0:
        return {"mae": float("nan"), "rmse": float("nan"), "bias": float("nan"), "r2": float("nan"),
                "pearson_r": float("nan"), "n": 0}
    err = p - t
    ss_tot = float(np.sum((t - t.mean()) ** 2))
    r2 = 1.0 - float(np.sum(err**2)) / ss_tot if ss_tot > 0 else float("nan")
    if n > 1 and p.std() > 0 and t.std() > 0:
        pearson = float(np.corrcoef(p, t)[0, 1])
    else:
        pearson = float("nan")
    return {"mae": float(np.mean(np.abs(err))), "rmse": float(np.sqrt(np.mean(err**2))),
            "bias": float(np.mean(err)), "r2": r2, "pearson_r": pearson, "n": int(n)}


def bland_altman(a, b, valid=None) -> dict:
    """Bland & Altman (1986): differences d = a − b; bias = mean d; limits of agreement bias ± 1.96·SD(d)
    (SD with n − 1)."""
    x, y = _flat_finite(a, b, valid)
    diff = x - y
    if diff.size < 2:
        return {"bias": float("nan"), "sd": float("nan"), "loa_low": float("nan"), "loa_high": float("nan"),
                "n": int(diff.size)}
    bias, sd = float(diff.mean()), float(diff.std(ddof=1))
    return {"bias": bias, "sd": sd, "loa_low": bias - 1.96 * sd, "loa_high": bias + 1.96 * sd, "n": int(diff.size)}


def icc(ratings, kind: str = "2,1") -> float:
    """Intraclass correlation of an (n subjects × k raters) table, Shrout & Fleiss (1979).

    Two-way ANOVA mean squares: MSR (rows), MSC (columns), MSE (residual).
    ICC(2,1), absolute agreement, random raters: (MSR − MSE) / (MSR + (k−1)MSE + k(MSC − MSE)/n).
    ICC(3,1), consistency, fixed raters:         (MSR − MSE) / (MSR + (k−1)MSE).
    Rows containing a non-finite value are dropped. A systematic offset between raters lowers ICC(2,1)
    but not ICC(3,1).
    """
    table = np.asarray(ratings, dtype=np.float64)
    if table.ndim != 2 or table.shape[1] < 2:
        raise ValueError(f"ICC needs an (n subjects, k >= 2 raters) table, got shape {table.shape}")
    table = table[np.all(np.isfinite(table), axis=1)]
    n, k = table.shape
    if n < 2:
        return float("nan")
    grand = table.mean()
    ss_rows = k * np.sum((table.mean(axis=1) - grand) ** 2)
    ss_cols = n * np.sum((table.mean(axis=0) - grand) ** 2)
    ss_total = np.sum((table - grand) ** 2)
    ss_err = ss_total - ss_rows - ss_cols
    msr = ss_rows / (n - 1)
    msc = ss_cols / (k - 1)
    mse = ss_err / ((n - 1) * (k - 1))
    if kind == "2,1":
        denom = msr + (k - 1) * mse + k * (msc - mse) / n
    elif kind == "3,1":
        denom = msr + (k - 1) * mse
    else:
        raise ValueError(f"ICC kind must be '2,1' or '3,1', got {kind!r}")
    return float((msr - mse) / denom) if denom != 0 else float("nan")


def win_rate(pred_a, pred_b, true, valid=None) -> dict:
    """Share of samples where estimator A is strictly closer to the truth than B: |a − t| < |b − t|.

    Counted over samples where both are finite (and ``valid``); ties are reported separately.
    """
    a = np.asarray(pred_a, dtype=np.float64).ravel()
    b = np.asarray(pred_b, dtype=np.float64).ravel()
    t = np.asarray(true, dtype=np.float64).ravel()
    keep = np.isfinite(a) & np.isfinite(b) & np.isfinite(t)
    if valid is not None:
        keep &= np.asarray(valid, dtype=bool).ravel()
    ea, eb = np.abs(a[keep] - t[keep]), np.abs(b[keep] - t[keep])
    n = int(keep.sum())
    if n == 0:
        return {"win_rate": float("nan"), "tie_rate": float("nan"), "n": 0}
    return {"win_rate": float(np.mean(ea < eb)), "tie_rate": float(np.mean(ea == eb)), "n": n}


# -------------------------------------------------------------------------------------- classification
def expected_calibration_error(probs, y_true, n_bins: int = 15) -> float:
    """Top-label ECE (Guo et al. 2017): Σ_b (|b|/N)·|accuracy(b) − confidence(b)| over equal-width bins
    of the maximum probability."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true).ravel()
    if probs.ndim == 1:  # binary: probability of class 1
        probs = np.stack([1 - probs, probs], axis=1)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    ece = 0.0
    for b in range(n_bins):
        in_bin = bins == b
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return float(ece)


def reliability_curve(probs, y_true, n_bins: int = 10) -> dict:
    """Per-bin mean confidence, accuracy and count of the top label (for reliability diagrams)."""
    probs = np.asarray(probs, dtype=np.float64)
    y_true = np.asarray(y_true).ravel()
    if probs.ndim == 1:
        probs = np.stack([1 - probs, probs], axis=1)
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y_true).astype(np.float64)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    bins = np.clip(np.digitize(confidence, edges[1:-1], right=True), 0, n_bins - 1)
    conf, acc, count = [], [], []
    for b in range(n_bins):
        sel = bins == b
        count.append(int(sel.sum()))
        conf.append(float(confidence[sel].mean()) if sel.any() else float("nan"))
        acc.append(float(correct[sel].mean()) if sel.any() else float("nan"))
    return {"bin_edges": edges.tolist(), "confidence": conf, "accuracy": acc, "count": count}


def classification_metrics(y_true, probs=None, y_pred=None, labels: Sequence[int] | None = None,
                           class_names: Sequence[str] | None = None, sample_weight=None) -> dict:
    """Metrics of a multi-class classifier. Give ``probs`` (N × C) or hard ``y_pred``.

    Returns per_class {recall, precision, f1, support}, balanced_accuracy (mean per-class recall over
    classes present in the truth), macro_f1, accuracy, confusion (rows = truth, columns = prediction),
    and with probs also log_loss (probabilities renormalized per row) and ece.
    """
    y_true = np.asarray(y_true).ravel()
    if probs is not None:
        probs = np.asarray(probs, dtype=np.float64)
        if probs.ndim == 1:
            probs = np.stack([1 - probs, probs], axis=1)
        y_pred = probs.argmax(axis=1)
    if y_pred is None:
        raise ValueError("give probs or y_pred")
    y_pred = np.asarray(y_pred).ravel()
    if labels is None:
        n_classes = probs.shape[1] if probs is not None else int(max(y_true.max(), y_pred.max())) + 1
        labels = list(range(n_classes))
    labels = list(labels)
    names = list(class_names) if class_names is not None else [str(c) for c in labels]
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        y_true, y_pred, labels=labels, zero_division=0, sample_weight=sample_weight)
    present = support > 0
    out = {
        "accuracy": float(skm.accuracy_score(y_true, y_pred, sample_weight=sample_weight)),
        "balanced_accuracy": float(np.mean(recall[present])) if present.any() else float("nan"),
        "macro_f1": float(np.mean(f1[present])) if present.any() else float("nan"),
        "per_class": {name: {"recall": float(r), "precision": float(p), "f1": float(f), "support": int(s)}
                      for name, r, p, f, s in zip(names, recall, precision, f1, support)},
        "confusion": skm.confusion_matrix(y_true, y_pred, labels=labels).tolist(),
        "n": int(y_true.size),
    }
    if probs is not None:
        norm = probs / np.clip(probs.sum(axis=1, keepdims=True), 1e-15, None)
        out["log_loss"] = float(skm.log_loss(y_true, np.clip(norm, 1e-15, 1.0), labels=labels,
                                             sample_weight=sample_weight))
        out["ece"] = expected_calibration_error(norm, y_true)
    return out


# ---------------------------------------------------------------------------------------------- ranking
def roc_auc(y_true, score) -> float:
    """Area under the ROC curve (sklearn); NaN when only one class is present."""
    y_true = np.asarray(y_true).ravel()
    if np.unique(y_true).size < 2:
        return float("nan")
    return float(skm.roc_auc_score(y_true, np.asarray(score, dtype=np.float64).ravel()))


def _roc_points(y_true, score):
    """Cumulative (false positives, true positives) at each distinct threshold, highest first.

    A sample counts as positive when score ≥ threshold, so tied scores enter together.
    """
    y = np.asarray(y_true).ravel().astype(bool)
    s = np.asarray(score, dtype=np.float64).ravel()
    if np.isnan(s).any():
        raise ValueError("scores contain NaN")
    order = np.argsort(-s, kind="mergesort")
    s, y = s[order], y[order]
    last_of_tie = np.r_[np.diff(s) != 0, True]
    tp = np.cumsum(y)[last_of_tie]
    fp = np.cumsum(~y)[last_of_tie]
    return fp, tp, int(y.sum()), int((~y).sum())


def tpr_at_fp_count(y_true, score, max_false_positives: int) -> float:
    """Highest TPR over thresholds at which at most ``max_false_positives`` negatives score ≥ threshold.

    Metcalf et al. (2019) Bologna Lens Challenge: TPR0 = ``tpr_at_fp_count(y, s, 0)`` (no false positive
    at all), TPR10 = ``tpr_at_fp_count(y, s, 9)`` ("fewer than ten"). A lens tied in score with a
    non-lens cannot be counted without counting that non-lens. These are COUNTS, not rates.
    """
    fp, tp, n_pos, _ = _roc_points(y_true, score)
    if n_pos == 0:
        return float("nan")
    ok = fp <= max_false_positives
    return float(tp[ok].max() / n_pos) if ok.any() else 0.0


def tpr_at_fpr(y_true, score, max_fpr: float) -> float:
    """Highest TPR over thresholds whose false-positive RATE is ≤ ``max_fpr`` (rate-based, not Bologna)."""
    fp, tp, n_pos, n_neg = _roc_points(y_true, score)
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    ok = fp / n_neg <= max_fpr
    return float(tp[ok].max() / n_pos) if ok.any() else 0.0
