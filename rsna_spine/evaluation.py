"""Scores computed over a whole evaluation set: the official metric and the class-level diagnostics of a
grader, and stage-1 localization errors. Used by training (per epoch), validation and the benchmark."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import pandas as pd

from common.metrics import classification_metrics
from rsna_spine.constants import GROUP_OF_CONDITION, GROUPS, SUBMISSION_COLUMNS, row_id
from rsna_spine.metric import (
    class_priors,
    prior_submission,
    score_details,
    solution_from_labels,
    submission_frame,
)


def prediction_table(items: Sequence[Mapping], probs: np.ndarray) -> pd.DataFrame:
    """study_id, condition, level, label, row_id, normal_mild, moderate, severe (one row per item)."""
    frame = pd.DataFrame({"study_id": [int(it["study_id"]) for it in items],
                          "condition": [it["condition"] for it in items],
                          "level": [it["level"] for it in items],
                          "label": [int(it.get("label", -1)) for it in items]})
    frame["row_id"] = [row_id(s, c, lv) for s, c, lv in zip(frame["study_id"], frame["condition"], frame["level"])]
    for j, name in enumerate(SUBMISSION_COLUMNS):
        frame[name] = np.asarray(probs, dtype=np.float64).reshape(-1, 3)[:, j]
    return frame


def grading_report(table: pd.DataFrame, any_severe_scalar: float = 1.0) -> dict:
    """Official score (overall and per group) and diagnostics of a prediction table with labels.

    ``table``: study_id, condition, level, label (0/1/2, rows with −1 are ignored), the three probability
    columns (already re-weighted for the metric). Returns official {...}, per_group {group: classification
    metrics}, balanced_accuracy, per_class_recall, minority_recall (min recall of moderate / severe among
    those present), prediction_counts, confusion, n.
    """
    table = table[table["label"] >= 0].reset_index(drop=True)
    if table.empty:
        return {"official": {"score": float("nan")}, "n": 0}
    solution = solution_from_labels(table)
    official = score_details(solution, submission_frame(table["row_id"], table[list(SUBMISSION_COLUMNS)].to_numpy()),
                             "row_id", any_severe_scalar, mode="normalized")
    probs = table[list(SUBMISSION_COLUMNS)].to_numpy(dtype=np.float64)
    overall = classification_metrics(table["label"].to_numpy(), probs, labels=[0, 1, 2],
                                     class_names=list(SUBMISSION_COLUMNS))
    per_group = {}
    for group in GROUPS:
        sel = table["condition"].map(GROUP_OF_CONDITION).to_numpy() == group
        if sel.any():
            per_group[group] = classification_metrics(table.loc[sel, "label"].to_numpy(), probs[sel],
                                                      labels=[0, 1, 2], class_names=list(SUBMISSION_COLUMNS))
    recall = {name: overall["per_class"][name]["recall"] for name in SUBMISSION_COLUMNS}
    present = [name for name in ("moderate", "severe") if overall["per_class"][name]["support"] > 0]
    minority = min((recall[n] for n in present), default=float("nan"))
    counts = np.bincount(probs.argmax(axis=1), minlength=3)
    return {"official": official, "balanced_accuracy": overall["balanced_accuracy"], "per_class_recall": recall,
            "minority_recall": minority, "prediction_counts": dict(zip(SUBMISSION_COLUMNS, counts.tolist())),
            "confusion": overall["confusion"], "ece": overall["ece"], "log_loss_unweighted": overall["log_loss"],
            "per_group": per_group, "n": int(len(table))}


def prior_baseline(train_labels: pd.DataFrame, table: pd.DataFrame, any_severe_scalar: float = 1.0) -> dict:
    """The class-prior baseline on the rows of ``table``: each row predicts the training prior of its
    condition and level, re-weighted to the metric optimum q ∝ w·p (the best constant under the metric)."""
    table = table[table["label"] >= 0].reset_index(drop=True)
    priors = class_priors(train_labels, by="condition_level")
    sub = prior_submission(table["row_id"], priors, metric_optimal=True)
    return score_details(solution_from_labels(table), sub, "row_id", any_severe_scalar, mode="normalized")


def localization_errors(centers: pd.DataFrame, labels: pd.DataFrame) -> pd.DataFrame:
    """Per located point: 3D distance to the label point (mm), in-plane distance (mm) and slice error
    (slices, when both points are on the same stack)."""
    truth = labels[labels["k"].notna()][["study_id", "condition", "level", "series_id", "stack_index", "k", "j", "i",
                                         "x_mm", "y_mm", "z_mm"]]
    merged = centers.merge(truth, on=["study_id", "condition", "level"], suffixes=("", "_gt"), how="inner")
    if merged.empty:
        return pd.DataFrame(columns=["study_id", "condition", "level", "group", "distance_mm", "slice_error"])
    d = merged[["x_mm", "y_mm", "z_mm"]].to_numpy(float) - merged[["x_mm_gt", "y_mm_gt", "z_mm_gt"]].to_numpy(float)
    same = (merged["series_id"].astype(np.int64) == merged["series_id_gt"].astype(np.int64)) & (
        merged["stack_index"].astype(int) == merged["stack_index_gt"].astype(int))
    return pd.DataFrame({
        "study_id": merged["study_id"], "condition": merged["condition"], "level": merged["level"],
        "group": merged["condition"].map(GROUP_OF_CONDITION),
        "distance_mm": np.linalg.norm(d, axis=1),
        "slice_error": np.where(same, np.abs(merged["k"].to_numpy(float) - merged["k_gt"].to_numpy(float)), np.nan),
    })


def summarize_localization(errors: pd.DataFrame) -> dict:
    out = {}
    for group in GROUPS:
        sel = errors[errors["group"] == group]
        if len(sel):
            out[group] = {"median_mm": float(sel["distance_mm"].median()), "mean_mm": float(sel["distance_mm"].mean()),
                          "within_10mm": float((sel["distance_mm"] <= 10).mean()),
                          "mean_slice_error": float(np.nanmean(sel["slice_error"])) if sel["slice_error"].notna().any()
                          else float("nan"), "n": int(len(sel))}
    return out
