"""When the model's threshold for an ear should not be trusted alone: the ``unsure`` rules shared by
predict_abr.py (no labels) and validate_abr.py (which also reports how many wrong ears they catch).

The model's ±1.96 σ interval is calibrated only on ears like its training ears (abr/README.md: its coverage
falls from 94 % to 49 % on shifted synthetic ears while σ stays put), so the rules also look at the classical
estimate and at how far the input lies from what the model was trained on. Every level here is in the
model's reference (abr/levels.py); the rules do not change under a constant level offset.
"""

from __future__ import annotations

import math

import numpy as np


def outside_training(levels_db: np.ndarray, static_raw: np.ndarray, ckpt_meta: dict, max_z: float) -> list[str]:
    """Reasons an ear lies outside what the model was trained on: levels beyond the training levels by more
    than one step, or a median recording RMS (µV, log10) more than ``max_z`` training standard deviations from
    the training mean (another species, electrode type or unit)."""
    reasons = []
    trained = ckpt_meta.get("intensity_levels_db") or []
    step = float(ckpt_meta.get("intensity_step_db", 10.0))
    if trained and (levels_db.min() < min(trained) - step or levels_db.max() > max(trained) + step):
        reasons.append(f"levels outside the trained {min(trained):g}-{max(trained):g} dB")
    names = list(ckpt_meta.get("static_features", []))
    if "log10_scale_uv" in names:
        k = names.index("log10_scale_uv")
        z = (np.median(static_raw[:, k]) - ckpt_meta["static_mean"][k]) / ckpt_meta["static_std"][k]
        if abs(z) > max_z:
            reasons.append(f"recording RMS {z:+.1f} SD from training")
    return reasons


def unsure_reasons(threshold_db: float, sd_db: float, outlier_prob: float, classical_db: float,
                   classical_censoring: str, levels_db: np.ndarray, step_db: float, static_raw: np.ndarray,
                   ckpt_meta: dict, predict_cfg: dict, converted_from: str | None = None) -> list[str]:
    """The reasons (empty = sure) for one ear. ``classical_db`` is ignored when ``classical_censoring`` is
    ">" (no response at any level); ``converted_from`` names the input's reference when its levels were
    converted to the model's. Thresholds from ``predict_cfg``: unsure_sd_db, unsure_outlier_prob,
    unsure_disagreement_db, unsure_input_z."""
    reasons = []
    if sd_db > predict_cfg["unsure_sd_db"]:
        reasons.append(f"sd>{predict_cfg['unsure_sd_db']:g}dB")
    if outlier_prob > predict_cfg["unsure_outlier_prob"]:
        reasons.append("likely outlier")
    if threshold_db < levels_db.min() - step_db or threshold_db > levels_db.max() + step_db:
        reasons.append("outside tested levels")
    no_response = classical_censoring == ">"
    if not no_response and math.isfinite(classical_db) and \
            abs(threshold_db - classical_db) > predict_cfg["unsure_disagreement_db"]:
        reasons.append("model and classical disagree")
    if no_response and threshold_db <= levels_db.max():
        reasons.append("classical finds no response")
    reasons += outside_training(levels_db, static_raw, ckpt_meta, predict_cfg["unsure_input_z"])
    if converted_from:
        reasons.append(f"levels converted from {converted_from} (the model never saw this stimulus)")
    return reasons
