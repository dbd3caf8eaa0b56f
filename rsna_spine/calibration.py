"""Temperature scaling of out-of-fold predictions, fitted on the official metric (issue 14, item 6).

One temperature per condition group, q ∝ p^(1/T) (the logits divided by T, for probabilities already
re-weighted to the metric), chosen on a grid to minimize the official score of the whole table, so the
spinal temperature also sees the any-severe term it drives. Coordinate descent over the groups (the
any-severe term couples only the spinal rows; two sweeps suffice). :func:`cross_fitted` measures the gain
honestly: studies split in two halves, temperatures fitted on one half are scored on the other.
validate_rsna.py writes the result to ``temperatures.json``; the prediction scripts read it back with
:func:`load_temperatures` and apply it to the model's rows with :func:`temper_probabilities`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import InputError
from rsna_spine.constants import GROUP_OF_CONDITION, GROUPS, METRIC_CLASS_WEIGHTS, SUBMISSION_COLUMNS
from rsna_spine.metric import score_details, solution_from_labels, submission_frame

TEMPERATURE_GRID = np.exp(np.linspace(np.log(0.4), np.log(4.0), 47))
TEMPERATURES_FILE = "temperatures.json"  # written by validate_rsna.py; read by the prediction scripts


def apply_temperature(probs: np.ndarray, temperature: float) -> np.ndarray:
    """q ∝ p^(1/T) per row (T = 1: unchanged; T > 1 softer, T < 1 sharper); rows sum to 1."""
    logp = np.log(np.clip(np.asarray(probs, dtype=np.float64), 1e-12, None)) / float(temperature)
    logp -= logp.max(axis=1, keepdims=True)
    q = np.exp(logp)
    return q / q.sum(axis=1, keepdims=True)


def model_rows(table: pd.DataFrame) -> np.ndarray:
    """Rows the model graded: those a ``source`` column does not mark "prior". Only these are tempered, in
    the fit as at prediction (class-prior rows stand for a missing model output and stay as they are)."""
    if "source" not in table.columns:
        return np.ones(len(table), dtype=bool)
    return (table["source"] != "prior").to_numpy()


def apply_temperatures(table: pd.DataFrame, temperatures: dict) -> pd.DataFrame:
    """A copy of a prediction table (condition + the three probability columns) with each group's model
    rows tempered (see :func:`model_rows`)."""
    out = table.copy()
    cols = list(SUBMISSION_COLUMNS)
    groups = out["condition"].map(GROUP_OF_CONDITION).to_numpy()
    graded = model_rows(out)
    for group, temperature in temperatures.items():
        sel = (groups == group) & graded
        if sel.any():
            out.loc[sel, cols] = apply_temperature(out.loc[sel, cols].to_numpy(), temperature)
    return out


def table_score(table: pd.DataFrame) -> float:
    """Official score (normalized mode) of a prediction table with labels (rows with label < 0 ignored)."""
    table = table[table["label"] >= 0].reset_index(drop=True)
    sub = submission_frame(table["row_id"], table[list(SUBMISSION_COLUMNS)].to_numpy())
    return score_details(solution_from_labels(table), sub, "row_id", 1.0, mode="normalized")["score"]


class _Scorer:
    """The official score (normalized mode) of one labelled table for many temperature sets, vectorized
    (the same numbers as :func:`table_score`, tested; ~1000x faster than building Kaggle tables each time)."""

    def __init__(self, table: pd.DataFrame):
        table = table[table["label"] >= 0].reset_index(drop=True)
        self.probs = table[list(SUBMISSION_COLUMNS)].to_numpy(dtype=np.float64)
        self.probs = self.probs / self.probs.sum(axis=1, keepdims=True)
        self.label = table["label"].to_numpy().astype(int)
        self.weight = np.asarray(METRIC_CLASS_WEIGHTS, dtype=np.float64)[self.label]
        self.group = table["condition"].map(GROUP_OF_CONDITION).to_numpy()
        self.graded = model_rows(table)
        spinal = self.group == "spinal"
        self.spinal = np.flatnonzero(spinal)
        self.study_codes, studies = pd.factorize(table.loc[spinal, "study_id"])
        self.n_studies = len(studies)

    def __call__(self, temperatures: dict) -> float:
        probs = self.probs.copy()
        for group, temperature in temperatures.items():
            sel = (self.group == group) & self.graded
            if sel.any() and temperature != 1.0:
                probs[sel] = apply_temperature(probs[sel], temperature)
        eps = np.finfo(np.float64).eps
        clipped = np.clip(probs, eps, 1 - eps)
        row_loss = -np.log(clipped[np.arange(len(probs)), self.label])
        losses = [np.average(row_loss[self.group == g], weights=self.weight[self.group == g])
                  for g in GROUPS if (self.group == g).any()]
        if self.spinal.size:
            label = np.zeros(self.n_studies)
            weight = np.zeros(self.n_studies)
            pred = np.zeros(self.n_studies)
            np.maximum.at(label, self.study_codes, (self.label[self.spinal] == 2).astype(float))
            np.maximum.at(weight, self.study_codes, self.weight[self.spinal])
            np.maximum.at(pred, self.study_codes, probs[self.spinal, 2])
            pred = np.clip(pred, eps, 1 - eps)
            losses.append(np.average(-(label * np.log(pred) + (1 - label) * np.log(1 - pred)), weights=weight))
        return float(np.mean(losses))


def fit_temperatures(table: pd.DataFrame, grid=TEMPERATURE_GRID, sweeps: int = 2) -> dict:
    """{group: T} minimizing the official score of ``table`` (coordinate descent over the groups)."""
    temperatures = {g: 1.0 for g in GROUPS}
    present = set(table["condition"].map(GROUP_OF_CONDITION))
    scorer = _Scorer(table)
    for _ in range(sweeps):
        for group in GROUPS:
            if group not in present:
                continue
            scores = [scorer({**temperatures, group: float(t)}) for t in grid]
            temperatures[group] = float(grid[int(np.argmin(scores))])
    return temperatures


def cross_fitted(table: pd.DataFrame, seed: int = 0) -> dict:
    """Honest effect of temperature scaling: studies split in two halves; each half is tempered with the
    temperatures fitted on the other. Returns {uncalibrated, cross_fitted, temperatures_fold_a/b,
    temperatures_all} (temperatures_all: fitted on the whole table, the ones to ship)."""
    table = table[table["label"] >= 0].reset_index(drop=True)
    studies = np.array(sorted(table["study_id"].unique()))
    if len(studies) < 4:  # too few to split: nothing honest to report
        return {"uncalibrated": table_score(table) if len(table) else float("nan"), "cross_fitted": float("nan"),
                "temperatures_fold_a": {}, "temperatures_fold_b": {},
                "temperatures_all": fit_temperatures(table) if len(table) else {}}
    rng = np.random.default_rng(seed)
    half = set(rng.permutation(studies)[: len(studies) // 2].tolist())
    in_a = table["study_id"].isin(half).to_numpy()
    t_a, t_b = fit_temperatures(table[in_a]), fit_temperatures(table[~in_a])
    tempered = pd.concat([apply_temperatures(table[in_a], t_b), apply_temperatures(table[~in_a], t_a)])
    return {"uncalibrated": table_score(table), "cross_fitted": table_score(tempered),
            "temperatures_fold_a": t_a, "temperatures_fold_b": t_b, "temperatures_all": fit_temperatures(table)}


def load_temperatures(path: str | Path) -> dict:
    """{group: T} of a ``temperatures.json`` written by validate_rsna.py (its ``temperatures_all``: fitted on
    every out-of-fold row), or of a plain {group: T} file. Every T must be a finite number > 0 and every
    group one of the metric's; anything else is an InputError naming the file and the field."""
    path = Path(path)
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc.msg}, line {exc.lineno})", path) from exc
    if not isinstance(content, dict):
        raise InputError("expected a JSON object {group: temperature}", path)
    field = "temperatures_all" if "temperatures_all" in content else None
    temperatures = content[field] if field else content
    where = f"field '{field}'" if field else "the top level"
    prefix = f"{field}." if field else ""
    if not isinstance(temperatures, dict) or not temperatures:
        raise InputError(f"{where}: expected a non-empty object {{group: temperature}}", path)
    out = {}
    for group, value in temperatures.items():
        if group not in GROUPS:
            raise InputError(f"field '{prefix}{group}': unknown condition group (expected one of {list(GROUPS)})",
                             path)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not np.isfinite(value) or value <= 0:
            raise InputError(f"field '{prefix}{group}': temperature must be a finite number > 0, got {value!r}", path)
        out[group] = float(value)
    return out


def temper_probabilities(probs: np.ndarray, conditions: Sequence[str], temperatures: dict) -> np.ndarray:
    """Rows of ``probs`` (n, 3) tempered by the temperature of their condition's group (q ∝ p^(1/T));
    groups without a temperature and rows that are not finite (no model output) are left as they are."""
    out = np.array(probs, dtype=np.float64, copy=True)
    groups = np.array([GROUP_OF_CONDITION[c] for c in conditions])
    finite = np.isfinite(out).all(axis=1)
    for group, temperature in temperatures.items():
        sel = (groups == group) & finite
        if sel.any():
            out[sel] = apply_temperature(out[sel], temperature)
    return out
