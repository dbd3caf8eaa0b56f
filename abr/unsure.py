"""When the model's threshold for an ear should not be trusted alone: the ``unsure`` rules shared by
predict_abr.py (no labels) and validate_abr.py (which also reports how many wrong ears they catch).

The model's ±1.96 σ interval is calibrated only on ears like its training ears (abr/README.md: its coverage
fell from 94 % to 49 % on shifted synthetic ears while σ stayed put), so the rules also look at the classical
estimate and at how far the input lies from what the model was trained on. Every level here is in the
model's reference (abr/levels.py); the rules do not change under a constant level offset.

The σ reported (:func:`reported_threshold_sd`) is the model's σ times the scale fitted on the validation ears
after training (σ scaling, Laves et al. 2020, MIDL, "Well-calibrated regression uncertainty in medical imaging
with deep learning": the maximum-likelihood factor for a Gaussian, sqrt(mean((error / σ)²))), and for an ear
flagged unsure it is widened by the model-classical disagreement: σ² = (scale · σ_model)² + (model −
classical)², so the ±1.96 σ interval of an ear the model should not be trusted on reaches past the classical
estimate (the censor value when the classical finds no response). The disagreement term is a rule, not fitted:
on validation ears (in distribution) the likelihood gives it no weight, and out of distribution is where it is
needed (abr/README.md measures both).
"""

from __future__ import annotations

import math

import numpy as np

from common.metrics import sigma_scale


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


def fit_threshold_sd_scale(abs_error_db: np.ndarray, sd_db: np.ndarray, bounds=(0.25, 10.0)) -> float:
    """Maximum-likelihood scale of the model's threshold σ on labelled ears (σ scaling, common.metrics.sigma_scale)
    over ears with a finite error, clipped to ``bounds``; 1 without any."""
    scale, n = sigma_scale(abs_error_db, np.square(np.asarray(sd_db, np.float64)))
    return float(np.clip(scale, *bounds)) if n else 1.0


def checkpoint_sd_scale(ckpt: dict) -> tuple[float, str]:
    """The threshold σ scale stored with a checkpoint by abr.train_abr and where it came from (1 for a
    checkpoint without one: trained before it existed, or without validation)."""
    stored = (ckpt.get("extra") or {}).get("threshold_sd_scale")
    if stored is None:
        return 1.0, "none stored with the checkpoint (1)"
    return float(stored["scale"]), f"fitted on {stored['n_val_ears']} val ears"


def reported_threshold_sd(sd_model_db, scale: float, threshold_db, classical_db, unsure, widen: bool = True):
    """The threshold σ (dB) to report: ``scale`` · σ_model, and for ``unsure`` ears with ``widen``
    sqrt((scale · σ_model)² + (threshold − classical)²) (see the module docstring). Elementwise."""
    scaled = scale * np.asarray(sd_model_db, np.float64)
    gap = np.asarray(threshold_db, np.float64) - np.asarray(classical_db, np.float64)
    gap = np.where(np.isfinite(gap) & np.asarray(unsure, bool) & bool(widen), gap, 0.0)
    return np.sqrt(scaled ** 2 + gap ** 2)
