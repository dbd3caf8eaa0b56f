"""From stage-2 probabilities to a complete ``submission.csv``, shared by predict_rsna.py and
predict_kaggle_rsna.py: class priors for whatever the model could not grade, the fitted temperatures of
the model folder, and the optional scoring against a Kaggle solution file.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from common.errors import InputError
from rsna_spine.calibration import TEMPERATURES_FILE, load_temperatures, temper_probabilities
from rsna_spine.constants import CONDITIONS, LEVELS, SUBMISSION_COLUMNS, row_id
from rsna_spine.metric import (
    ParticipantVisibleError,
    prior_probabilities,
    prior_submission,
    score_details,
    submission_frame,
)


def studies_to_submit(tasks: list[dict], root: Path, split: str) -> list[int]:
    """Study ids with series to decode, plus those only listed in ``sample_submission.csv`` (they still get
    rows, from class priors); an error naming the series list when there is none."""
    studies = {t["study_id"] for t in tasks}
    sample = root / "sample_submission.csv"
    if sample.is_file():
        studies |= {int(str(r).split("_")[0]) for r in pd.read_csv(sample)["row_id"]}
    if not studies:
        raise InputError("no study listed", root / f"{split}_series_descriptions.csv")
    return sorted(studies)


def mean_priors(classifiers: list) -> dict:
    """Class priors averaged over the ensemble's training folds (stored in each classifier checkpoint)."""
    keys = classifiers[0][1]["preprocessing"]["priors"].keys()
    return {k: np.mean([ckpt["preprocessing"]["priors"][k] for _, ckpt in classifiers], axis=0).tolist() for k in keys}


def find_temperatures_file(setting: str | None, model_path: str | Path) -> Path | None:
    """The temperatures file ``predict.temperatures`` names: "auto" → ``temperatures.json`` in the model
    folder (``model_path`` itself, or the folder of a checkpoint file) when it exists, else None;
    "none" / "" → None; anything else is a path that must exist."""
    text = "" if setting is None else str(setting).strip()
    if text.lower() in ("", "none"):
        return None
    if text.lower() == "auto":
        folder = Path(model_path) if Path(model_path).is_dir() else Path(model_path).parent
        candidate = folder / TEMPERATURES_FILE
        return candidate if candidate.is_file() else None
    path = Path(text)
    if not path.is_file():
        raise InputError("predict.temperatures: file not found (use auto, none or the temperatures.json of a "
                         "validate_rsna.py run)", path)
    return path


def resolve_temperatures(setting: str | None, model_path: str | Path, logger=print) -> tuple[dict, str | None]:
    """({group: T}, file) to apply, ({}, None) when none; logs which file was used or that none was."""
    path = find_temperatures_file(setting, model_path)
    if path is None:
        logger(f"temperatures: none applied (predict.temperatures={setting!r}; no {TEMPERATURES_FILE} used)")
        return {}, None
    temperatures = load_temperatures(path)
    logger(f"temperatures from {path}: { {g: round(t, 3) for g, t in temperatures.items()} } (q ∝ p^(1/T))")
    return temperatures, path.as_posix()


def build_submission(studies, items: list[dict], probs: np.ndarray, priors: dict,
                     temperatures: dict | None = None) -> tuple[pd.DataFrame, int]:
    """(submission frame with 25 rows per study, number of rows from class priors).

    ``items`` / ``probs``: the graded (study, condition, level) and their metric-weighted probabilities
    (NaN rows: no model answered). The model rows are tempered with ``temperatures`` ({group: T}); rows
    without a model answer get the training class prior (the metric-optimal constant, not tempered)."""
    probs = np.asarray(probs, dtype=np.float64).reshape(-1, 3)
    if temperatures:
        probs = temper_probabilities(probs, [it["condition"] for it in items], temperatures)
    predicted = {row_id(it["study_id"], it["condition"], it["level"]): p for it, p in zip(items, probs)
                 if np.all(np.isfinite(p))}
    row_ids, rows, n_prior = [], [], 0
    for study in studies:
        for condition in CONDITIONS:
            for level in LEVELS:
                rid = row_id(study, condition, level)
                p = predicted.get(rid)
                if p is None:
                    p, n_prior = prior_probabilities(condition, level, priors), n_prior + 1
                row_ids.append(rid)
                rows.append(p)
    return submission_frame(row_ids, np.asarray(rows)), n_prior


def score_submission(solution_path: Path, submission: pd.DataFrame, priors: dict, logger=print,
                     untempered: pd.DataFrame | None = None) -> dict:
    """The official metric (normalized mode, and the published code's own mode where defined) of
    ``submission`` against a Kaggle solution file, with the class-prior baseline; with ``untempered``
    (the same submission before temperature scaling) its score too, so the effect of the temperatures shows."""
    solution = pd.read_csv(solution_path)
    scored = score_details(solution.copy(), submission.copy(), "row_id", 1.0, mode="normalized")
    baseline = score_details(solution.copy(), prior_submission(submission["row_id"], priors), "row_id", 1.0,
                             mode="normalized")
    out: dict = {"official": scored, "prior_baseline": baseline}
    try:  # the published code's own behaviour (raises on a set without any severe spinal study)
        out["official_mode_score"] = score_details(solution.copy(), submission.copy(), "row_id", 1.0)["score"]
    except ParticipantVisibleError as exc:
        out["official_mode_score"] = None
        logger(f"official-mode score not defined: {exc}")
    logger(f"official score on {solution_path}: {scored['score']:.4f} vs class-prior baseline "
           f"{baseline['score']:.4f} (margin {baseline['score'] - scored['score']:+.4f})")
    headline = {"test_official_score": scored["score"], "test_class_prior_baseline": baseline["score"],
                "test_margin_vs_prior": baseline["score"] - scored["score"]}
    if untempered is not None:
        before = score_details(solution.copy(), untempered.copy(), "row_id", 1.0, mode="normalized")
        out["official_untempered"] = before
        headline["test_official_score_untempered"] = before["score"]
        logger(f"  without the temperatures: {before['score']:.4f} (spinal {before.get('spinal', float('nan')):.4f}, "
               f"any severe {before.get('any_severe_spinal', float('nan')):.4f}); with: spinal "
               f"{scored.get('spinal', float('nan')):.4f}, any severe {scored.get('any_severe_spinal', float('nan')):.4f}")
    out["headline"] = headline
    return out


def rows_sum_to_one(submission: pd.DataFrame) -> bool:
    return bool(np.allclose(submission[list(SUBMISSION_COLUMNS)].sum(axis=1), 1.0))
