"""The official RSNA 2024 lumbar spine metric (both its edge-case behaviours), plus helpers.

Kaggle metric "rsna-lumbar-metric" (the competition's evaluation page and its published source):

1. Sample weight by true class: normal_mild 1, moderate 2, severe 4.
2. For each condition group (spinal: 5 rows per study; foraminal: 10; subarticular: 10) the weighted
   multi-class log loss ``sklearn.metrics.log_loss(y_true_onehot, y_pred, sample_weight)``.
3. ``any_severe_spinal`` per study: label = any spinal level severe; prediction = the largest severe
   probability over the study's spinal rows; weight = the largest sample weight of those rows; binary
   weighted log loss.
4. Score = weighted mean of the four losses (weights 1, 1, 1, ``any_severe_scalar``). Lower is better.

Two modes (``mode=``), because the published code leaves the edge cases to scikit-learn:

``"official"`` (default) reproduces what the published code computes under the scikit-learn of the
competition (``log_loss`` of scikit-learn 1.2: clip every probability to [eps, 1 − eps], eps = the
float64 machine epsilon by default, *then* divide each row by its sum), re-implemented here in numpy so
the result does not depend on the installed scikit-learn (≥ 1.5 rejects rows that do not sum to 1):
- unnormalized rows are clipped before they are normalized, so a row with values above 1 is *not* the
  same as its normalized version ([2, 10, 0.5] scores as [0.4, 0.4, 0.2]);
- an all-zero row scores as uniform (every value clipped to eps), an exact zero on the true class as
  −log(eps / row sum) ≈ 36.04;
- ``any_severe_spinal`` takes the *raw* ``severe`` column (max over the study's spinal rows, clipped to
  [eps, 1 − eps]), not the normalized one;
- a set where every study has the same any-severe label (e.g. no severe spinal row) raises, as
  scikit-learn's ``log_loss`` does without ``labels=`` (``ParticipantVisibleError`` saying so).

``"normalized"`` is the project's deliberate deviation, used for its own validation: rows are normalized
to sum 1 first (an all-zero row is an error: no probability can be read from it), the any_severe term sees
the normalized severe probability, and it is scored with ``labels=[0, 1]`` so a fold without a severe
study still gets a score. On the pipeline's own submissions (rows sum to 1, no row of zeros) both modes
agree to 1e-12 whenever both any-severe labels occur (tested).

In both modes: rows are matched by row id, not position; solution rows without a truth (all-NaN or
all-zero one-hot) are not scored (notes/rsna_spine.md); a solution row missing from the submission is an
error naming it; extra submission rows are ignored; a condition group with no scored row is left out of
the mean (reported as NaN) instead of raising.

Under this loss the best prediction for a case with class probabilities p is q ∝ w·p (w = the sample
weights): training with weighted cross-entropy [1, 2, 4] targets it directly, and a model trained with
other weights w' is re-calibrated by q ∝ p'·w/w' (:func:`reweight_probabilities`).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd
import sklearn.metrics

from common.errors import InputError
from rsna_spine.constants import (
    CONDITIONS,
    GROUP_OF_CONDITION,
    GROUPS,
    LEVELS,
    METRIC_CLASS_WEIGHTS,
    SUBMISSION_COLUMNS,
    parse_row_id,
    row_id,
)

TARGET_LEVELS = list(SUBMISSION_COLUMNS)


class ParticipantVisibleError(InputError):
    """A submission the metric cannot score (the Kaggle metric's error type); says which rows/columns.
    An InputError (a ValueError), so scripts report it as one line."""


def get_condition(full_location: str) -> str:
    """'spinal' / 'foraminal' / 'subarticular' from a row id or location (as the official metric)."""
    for condition in GROUPS:
        if condition in full_location:
            return condition
    raise ValueError(f"condition not found in {full_location}")


def _check_columns(frame: pd.DataFrame, name: str, row_id_column_name: str) -> None:
    missing = [c for c in [row_id_column_name, *TARGET_LEVELS] if c not in frame.columns]
    if missing:
        raise ParticipantVisibleError(f"{name} lacks column(s) {missing}; it has {list(frame.columns)}")


def normalize_rows(values: np.ndarray, source: str = "submission") -> np.ndarray:
    """Rows divided by their sum; a row summing to 0 is an error (no probability can be read from it)."""
    values = np.asarray(values, dtype=np.float64)
    sums = values.sum(axis=1, keepdims=True)
    if np.any(sums <= 0):
        bad = int(np.argmax(sums.ravel() <= 0))
        raise ParticipantVisibleError(f"{source}: row {bad} sums to 0, cannot be normalized")
    return values / sums


METRIC_MODES = ("official", "normalized")
FLOAT64_EPS = float(np.finfo(np.float64).eps)  # scikit-learn 1.2's eps="auto" for float64 predictions


def official_log_loss(onehot: np.ndarray, pred: np.ndarray, sample_weight: np.ndarray | None = None,
                      eps: float = FLOAT64_EPS) -> float:
    """Weighted multi-class log loss exactly as scikit-learn 1.2's ``log_loss`` computes it for one-hot
    truth: clip to [eps, 1 − eps], divide each row by its sum, −Σ y log p, weighted mean over rows.
    ``pred`` of shape (n,) is a binary positive-class probability (expanded to [1 − p, p] after clipping)."""
    pred = np.clip(np.asarray(pred, dtype=np.float64), eps, 1.0 - eps)
    if pred.ndim == 1:
        pred = np.stack([1.0 - pred, pred], axis=1)
    onehot = np.asarray(onehot, dtype=np.float64)
    if onehot.ndim == 1:
        onehot = np.stack([1.0 - onehot, onehot], axis=1)
    pred = pred / pred.sum(axis=1, keepdims=True)
    loss = -(onehot * np.log(pred)).sum(axis=1)
    return float(np.average(loss, weights=sample_weight))


def score_details(solution: pd.DataFrame, submission: pd.DataFrame, row_id_column_name: str = "row_id",
                  any_severe_scalar: float = 1.0, mode: str = "official", eps: float = FLOAT64_EPS) -> dict:
    """Every term of the metric: {spinal, foraminal, subarticular, any_severe_spinal, score, n_rows, mode}.

    ``mode``: "official" (the published code's behaviour on every edge case) or "normalized" (the
    project's deviation: rows normalized first); see the module docstring. ``eps``: the clipping of the
    official mode (scikit-learn 1.2 default: float64 machine epsilon; older versions used 1e-15)."""
    if mode not in METRIC_MODES:
        raise ValueError(f"metric mode must be one of {METRIC_MODES}, got {mode!r}")
    _check_columns(solution, "solution", row_id_column_name)
    _check_columns(submission, "submission", row_id_column_name)
    sub_values = submission[TARGET_LEVELS]
    if not all(pd.api.types.is_numeric_dtype(sub_values[c]) for c in TARGET_LEVELS):
        raise ParticipantVisibleError("All submission values must be numeric")
    if not np.isfinite(sub_values.to_numpy(dtype=np.float64)).all():
        raise ParticipantVisibleError("All submission values must be finite")
    if (sub_values.to_numpy(dtype=np.float64) < 0).any():
        raise ParticipantVisibleError("All predictions must be at least zero")
    if submission[row_id_column_name].duplicated().any():
        dup = submission.loc[submission[row_id_column_name].duplicated(), row_id_column_name].iloc[0]
        raise ParticipantVisibleError(f"submission has duplicate {row_id_column_name} '{dup}'")

    sol = solution.copy()
    truth = sol[TARGET_LEVELS].to_numpy(dtype=np.float64)
    scored = np.isfinite(truth).all(axis=1) & (np.nan_to_num(truth).sum(axis=1) > 0)
    sol = sol.loc[scored].reset_index(drop=True)
    if (sol[TARGET_LEVELS].to_numpy() < 0).any():
        raise ParticipantVisibleError("All labels must be at least zero")
    if "sample_weight" not in sol.columns:  # Kaggle's solution carries it; derive it from the truth
        sol["sample_weight"] = sol[TARGET_LEVELS].to_numpy() @ np.asarray(METRIC_CLASS_WEIGHTS)
    if sol.empty:
        raise ParticipantVisibleError("solution has no row with a truth to score")

    sub = submission.set_index(row_id_column_name)
    missing = sol.loc[~sol[row_id_column_name].isin(sub.index), row_id_column_name]
    if len(missing):
        raise ParticipantVisibleError(f"submission lacks {len(missing)} row(s) of the solution, e.g. "
                                      f"'{missing.iloc[0]}'")
    raw = sub.loc[sol[row_id_column_name], TARGET_LEVELS].to_numpy(dtype=np.float64)
    pred = raw if mode == "official" else normalize_rows(raw)
    sol["study_id"] = sol[row_id_column_name].map(lambda x: str(x).split("_")[0])
    sol["condition"] = sol[row_id_column_name].map(get_condition)
    onehot = sol[TARGET_LEVELS].to_numpy(dtype=np.float64)
    weight = sol["sample_weight"].to_numpy(dtype=np.float64)

    out: dict = {}
    losses, weights = [], []
    for condition in GROUPS:
        idx = np.flatnonzero(sol["condition"].to_numpy() == condition)
        if idx.size == 0:
            out[condition] = float("nan")
            continue
        if mode == "official":
            loss = official_log_loss(onehot[idx], pred[idx], weight[idx], eps)
        else:
            loss = sklearn.metrics.log_loss(onehot[idx], pred[idx], sample_weight=weight[idx])
        out[condition] = float(loss)
        losses.append(loss)
        weights.append(1.0)
    spinal = np.flatnonzero(sol["condition"].to_numpy() == "spinal")
    if spinal.size:
        frame = pd.DataFrame({"study_id": sol.loc[spinal, "study_id"].to_numpy(), "label": onehot[spinal, 2],
                              "weight": weight[spinal], "pred": pred[spinal, 2]})
        per_study = frame.groupby("study_id").agg(label=("label", "max"), weight=("weight", "max"),
                                                  pred=("pred", "max"))
        labels = per_study["label"].to_numpy()
        if mode == "official":
            if np.unique(labels).size < 2:
                raise ParticipantVisibleError(
                    f"any_severe_spinal: every study has label {labels[0]:g} (no severe spinal row, or only "
                    "severe ones); the official code raises here (scikit-learn: y_true contains only one "
                    "label); mode='normalized' scores it with labels=[0, 1]")
            any_loss = official_log_loss(labels, per_study["pred"].to_numpy(), per_study["weight"].to_numpy(), eps)
        else:
            any_loss = sklearn.metrics.log_loss(labels, per_study["pred"].to_numpy(),
                                                sample_weight=per_study["weight"].to_numpy(), labels=[0, 1])
        out["any_severe_spinal"] = float(any_loss)
        losses.append(any_loss)
        weights.append(float(any_severe_scalar))
    else:
        out["any_severe_spinal"] = float("nan")
    out["score"] = float(np.average(losses, weights=weights))
    out["n_rows"] = int(len(sol))
    out["mode"] = mode
    return out


def score(solution: pd.DataFrame, submission: pd.DataFrame, row_id_column_name: str,
          any_severe_scalar: float, mode: str = "official") -> float:
    """The Kaggle signature: the official score of ``submission`` against ``solution`` (lower is better).

    ``solution``: row_id, normal_mild, moderate, severe (one-hot truth), optional sample_weight.
    ``submission``: row_id, normal_mild, moderate, severe (probabilities; see ``mode`` in the module
    docstring for how unnormalized rows are treated). Rows are matched by row id, not by position.
    """
    return score_details(solution, submission, row_id_column_name, any_severe_scalar, mode)["score"]


# --------------------------------------------------------------------------------------------- helpers
def solution_from_labels(labels: pd.DataFrame) -> pd.DataFrame:
    """Kaggle solution table from a long table with columns study_id, condition, level, label (0/1/2 or
    NaN/-1 for no truth). Rows without a truth keep NaN one-hot values (and are not scored)."""
    label = pd.to_numeric(labels["label"], errors="coerce").to_numpy(dtype=np.float64)
    label[label < 0] = np.nan
    onehot = np.full((len(labels), 3), np.nan)
    ok = np.isfinite(label)
    onehot[ok] = np.eye(3)[label[ok].astype(int)]
    out = pd.DataFrame({"row_id": [row_id(s, c, lv) for s, c, lv in
                                   zip(labels["study_id"], labels["condition"], labels["level"])]})
    for j, name in enumerate(TARGET_LEVELS):
        out[name] = onehot[:, j]
    out["sample_weight"] = np.where(ok, np.nan_to_num(onehot) @ np.asarray(METRIC_CLASS_WEIGHTS), np.nan)
    return out


def submission_frame(row_ids: Sequence[str], probs: np.ndarray) -> pd.DataFrame:
    """row_id + the three probability columns (rows normalized)."""
    probs = normalize_rows(np.asarray(probs, dtype=np.float64))
    frame = pd.DataFrame({"row_id": list(row_ids)})
    for j, name in enumerate(TARGET_LEVELS):
        frame[name] = probs[:, j]
    return frame


def reweight_probabilities(probs: np.ndarray, train_weights: Sequence[float],
                           metric_weights: Sequence[float] = METRIC_CLASS_WEIGHTS) -> np.ndarray:
    """Re-calibrate probabilities of a model trained with class weights ``train_weights`` for the metric.

    A weighted-CE minimizer outputs p' ∝ w'·p; the metric's optimum is q ∝ w·p, so q ∝ p'·w/w'.
    Identity when the weights are proportional.
    """
    ratio = np.asarray(metric_weights, dtype=np.float64) / np.asarray(train_weights, dtype=np.float64)
    return normalize_rows(np.asarray(probs, dtype=np.float64) * ratio, "probabilities")


def class_priors(labels: pd.DataFrame, by: str = "condition_level", smoothing: float = 1.0) -> dict:
    """Empirical class frequencies from a long label table (study_id, condition, level, label).

    ``by``: "condition_level" (one prior per row type), "condition" or "group". Laplace ``smoothing``
    keeps every class possible. Returns {key: [p0, p1, p2]} with keys "condition|level", "condition" or
    "group".
    """
    frame = labels.copy()
    frame["label"] = pd.to_numeric(frame["label"], errors="coerce")
    frame = frame[frame["label"].isin([0, 1, 2])]
    if by == "condition_level":
        keys = frame["condition"] + "|" + frame["level"]
        all_keys = [f"{c}|{lv}" for c in CONDITIONS for lv in LEVELS]
    elif by == "condition":
        keys, all_keys = frame["condition"], list(CONDITIONS)
    elif by == "group":
        keys, all_keys = frame["condition"].map(GROUP_OF_CONDITION), list(GROUPS)
    else:
        raise ValueError(f"class_priors: by must be condition_level, condition or group, got {by!r}")
    out = {}
    for key in all_keys:
        counts = np.bincount(frame.loc[keys == key, "label"].astype(int), minlength=3).astype(np.float64)
        counts += smoothing
        out[key] = (counts / counts.sum()).tolist()
    return out


def prior_probabilities(condition: str, level: str, priors: Mapping, metric_optimal: bool = True) -> np.ndarray:
    """The class-prior baseline for one row: the prior p, or the metric-optimal constant q ∝ w·p."""
    for key in (f"{condition}|{level}", condition, GROUP_OF_CONDITION[condition]):
        if key in priors:
            p = np.asarray(priors[key], dtype=np.float64)
            break
    else:
        raise KeyError(f"no prior for {condition} {level}; keys: {sorted(priors)[:5]}...")
    if metric_optimal:
        p = p * np.asarray(METRIC_CLASS_WEIGHTS)
    return p / p.sum()


def prior_submission(row_ids: Sequence[str], priors: Mapping, metric_optimal: bool = True) -> pd.DataFrame:
    """A submission that predicts the class prior of each row's condition (and level)."""
    probs = []
    for rid in row_ids:
        _, condition, level = parse_row_id(rid)
        probs.append(prior_probabilities(condition, level, priors, metric_optimal))
    return submission_frame(row_ids, np.asarray(probs).reshape(-1, 3))
