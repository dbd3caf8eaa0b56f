"""The ABR pipeline's complete configuration, shared by every abr script.

One YAML file (configs/abr/*.yaml) drives the whole pipeline, so the sampling grid, the label ranges
and the class list cannot drift between preprocessing, training and validation. Each script's
``DEFAULTS`` is a copy of :data:`ABR_DEFAULTS`; a script reads only the sections it needs (named in its
docstring), and every key is checked by common.config (a typo is an error naming the valid keys).
"""

from __future__ import annotations

import copy

from abr.data import DEFAULT_COLUMNS
from abr.readers import ARRAY_KEYS
from abr.synthetic import SYNTHETIC_DEFAULTS
from common.runtime import RUNTIME_DEFAULTS

ABR_DEFAULTS = {
    "seed": 0,
    # ---------------------------------------------------------------- the clinical table (abr/data.py)
    "data": {
        "table": None,  # the recordings (any data.format); null = generate synthetic data (section below)
        "format": "auto",  # auto | clinical | long | arrays (.npz/.npy/.mat) | abra (TDT BioSigRZ CSV); abr/readers.py
        "units": "uV",  # V | mV | uV | nV: unit of the samples (and amplitude columns); converted to µV
        "amplitude_check": "error",  # error | convert | off: median RMS outside 0.003-30 µV = another unit
        "signal_polarity": "vertex_positive",  # vertex_negative: the export shows vertex-negative up (inverted);
        # unknown: used as exported, the classical wave V search finds the sign per ear (abr/classical.py)
        "level_reference": "dB nHL",  # dB nHL | SPL | peSPL | SL | HL of the input's levels; outputs are given in it
        "level_offset_db": 0.0,  # added to the input's levels to reach the model's reference (dB nHL click)
        "converted_level_reference": None,  # the reference after level_offset_db (e.g. dB nHL); abr/levels.py
        "array_keys": dict(ARRAY_KEYS),  # .npz/.mat array names, e.g. {signals: abr, intensity_db: levels, sampling_rate_hz: fs}
        "array_levels_db": [],  # levels of a bare .npy (one ear, rows = levels)
        "abra_sampling_rate_hz": 24414.0625,  # ABRA/TDT CSV (RZ6: 244 samples ≈ 10 ms)
        "sheet": None,  # Excel sheet name or index (null = first)
        "encoding": "auto",  # CSV text encoding; auto = UTF-8 (with/without BOM), else cp1254
        "sampling_rate_hz": 30000.0,  # of the table's samples (Eclipse ABR15 export: 30 kHz)
        "window_ms": 15.0,  # recording window; sample count must match fs × window (± tolerance)
        "sample_count_tolerance": 0.05,  # relative; Eclipse exports ~467 samples for a nominal 15 ms
        "pre_stimulus_ms": 0.0,  # time before the click at sample 1
        "age_unit": "years",  # years | months | days
        "nan_samples": "error",  # error | drop (rows with empty/NaN samples)
        "keep_polarities": [],  # e.g. [Alternating]; empty = keep all (the original kept alternating)
        "max_rejected_fraction": 0.5,  # drop recordings with rejected / (rejected + accepted) sweeps above this
        "max_sweeps_rejected": None,  # absolute limit (exports without an accepted-sweeps column); null = off
        "missing_peak_means_absent": True,  # empty latency = wave absent (clinical exports leave it blank)
        "columns": dict(DEFAULT_COLUMNS),  # config key -> column name; null = the table has no such column
        "cache_dir": None,  # preprocessed cache folder (--data DIR sets it); null = data/abr/<config name>
    },
    # ------------------------------------------------------- synthetic recordings (abr/synthetic.py)
    "synthetic": copy.deepcopy(SYNTHETIC_DEFAULTS),
    # --------------------------------------------------------------- preprocessing (preprocess_abr.py)
    "preprocess": {
        "model_rate_hz": 10000.0,  # the model's grid (150 samples per 15 ms); ABR content is < 3 kHz
        "filter_hz": [100.0, 3000.0],  # analysis band-pass (null = none); both edges or null
        "filter_order": 2,  # Butterworth order (zero-phase: no latency shift)
        "split": [0.7, 0.15, 0.15],  # train / val / test share of PATIENTS (stratified by class); [0, 0, 1] = all test
        "required_splits": [],  # splits that must get patients, e.g. [train, val] (abr/splits.py; else empty is logged)
        "threshold_censor_db": None,  # value for "no response"; null = highest level in the table + step
        "model_window_ms": None,  # model grid window; null = the data's own; other windows are cropped / zero-padded
        "unknown_metadata_fraction": 0.1,  # training ears whose age and rate are marked unknown (the "unknown" input)
        "short_window_fraction": 0.1,  # training ears cut to a shorter window, zero-padded (10 ms TDT/ABRA) ...
        "short_window_ms": [8.0, 12.0],  # ... at a window drawn from this range (ms after the stimulus)
    },
    # ----------------------------------------------------------------- the multi-task model (models.py)
    "model": {
        "channels": 32,  # high-resolution convolution width
        "width": 64,  # transformer / embedding width
        "transformer_layers": 2,
        "heads": 4,
        "series_layers": 1,  # transformer layers across the levels of one ear (threshold, class)
        "dropout": 0.1,
        "scales": [1, 3, 5, 7],  # multi-scale kernel sizes of the peak head (seed 003)
        "latency_range_ms": {"I": [0.5, 6.0], "III": [2.0, 9.5], "V": [3.5, 14.0]},  # must cover the data
        "amplitude_range_rel": [-1.0, 9.0],  # amplitude / recording RMS; must cover the data (many sweeps: low RMS)
        "threshold_range_db": [0.0, 120.0],  # bounded threshold output
        "weights": None,  # optional project checkpoint (file or run folder) to warm-start from (no downloads)
        "weights_min_fraction": 0.9,  # refuse model.weights when fewer of the model's tensors fit (another model)
    },
    # ----------------------------------------------------------------------- losses (abr/objectives.py)
    "loss": {
        # seed 003 final weights; each may instead be a curriculum [[epoch, weight], ...] (linear between)
        "weights": {"signal": 0.8, "peak_exist": 1.2, "peak_latency": 2.5, "peak_amplitude": 2.5,
                    "classification": 2.0, "threshold": 3.0},
        "curriculum": {},  # loss name -> [[epoch, weight], ...]; overrides weights for that loss
        "regression": "nll",  # nll (Gaussian, learned σ) | huber  — peak latency/amplitude
        "huber_delta": 1.0,  # in units of 10 dB (threshold) / ms / relative amplitude
        "classification": "focal",  # focal | weighted_ce
        "focal_gamma": 2.0,
        "class_weighting": "inverse_sqrt",  # none | inverse | inverse_sqrt (of train class frequency)
        "dynamic_class_weights": False,  # after each epoch scale class weights by (1.5 − val recall)
        "threshold_aux_weight": 0.5,  # local-path (per-level detection) Huber, relative
        "threshold_nll_weight": 0.1,  # Gaussian NLL of the threshold uncertainty, relative
        "outlier_weight": 0.1,  # BCE of the outlier probability (|error| > 10 dB), relative
        "uncertainty_weighting": False,  # learn task weights (Kendall et al. 2018) instead of fixed ones
    },
    # ---------------------------------------------------------------------------- training (train_abr.py)
    "train": {
        "epochs": 100,
        "batch_size": 32,  # ears (intensity series) per batch
        "lr": 1e-3,
        "weight_decay": 1e-4,
        "grad_clip": 0.5,  # seed 003: aggressive clipping
        "restart_epochs": 20,  # CosineAnnealingWarmRestarts T_0
        "restart_mult": 2,  # T_mult
        "min_lr": 1e-5,
        "balanced_sampling": False,  # draw ears with probability ∝ 1 / class frequency
        "temperature_scaling": True,  # fit the class temperature on validation after training
        "max_steps_per_epoch": 0,  # 0 = full epoch (smoke runs cap it)
        "validation": True,  # false: train on the train + val ears, no validation, keep the last epoch (small labs;
        # no class temperature / threshold σ scale fitted); preprocess.split [1, 0, 0] puts every ear in train
        "polarity_inversion_prob": 0.5,  # share of training ears shown inverted each step (labels unchanged): the
        # display sign differs between labs and is not in the file, so the model should not depend on it
    },
    "runtime": dict(RUNTIME_DEFAULTS),  # num_workers, amp, torch_threads (1 on a shared CPU), cooling pauses
    # ----------------------------------------------------------------------- validation (validate_abr.py)
    "validate": {
        "split": "test",  # train | val | test
        "batch_size": 64,
        "figure_ears": 4,  # waveform stacks drawn
        "calibration_bins": 10,
    },
    # ------------------------------------------------------------------- classical baseline (classical.py)
    "classical": {
        "window_ms": [1.0, 12.0],  # correlation window
        "max_lag_ms": 0.5,  # cross-correlation lag allowed between neighbouring levels
        "criterion_grid": [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8],  # chosen on the validation split
        "criterion": None,  # fixed criterion instead of fitting one
        "v_window_80db_ms": [5.0, 7.8],  # wave V search window at 80 dB nHL ...
        "v_window_slope_ms_per_10db": 0.45,  # ... moved later by this per 10 dB below 80
        "wave_v_polarity": "declared",  # declared: wave V up as read (data.signal_polarity) | auto: sign found per
        # ear (steepest fall after wave V; abr/classical.py:wave_v_sign); data.signal_polarity unknown implies auto
    },
    # --------------------------------------------------------- diffusion generator (train_diffusion_abr.py)
    "diffusion": {
        "target": "recorded",  # recorded (works for real data) | clean (synthetic only)
        "channels": [32, 64, 64],  # U-Net widths per resolution
        "cond_dim": 128,
        "num_steps": 1000,
        "schedule": "cosine",
        "prediction": "v",
        "p_uncond": 0.1,  # conditioning dropped this often (classifier-free guidance)
        "ema_decay": 0.999,
        "epochs": 200,
        "batch_size": 128,  # recordings
        "lr": 2e-4,
        "weight_decay": 0.0,
        "grad_clip": 1.0,
        "max_steps_per_epoch": 0,
        "sampling_steps": 60,  # DDIM steps
        "guidance_scale": 1.5,
        "clip_x0": 3.0,  # |x̂0| clamp during sampling, in units of the data scale
        "eval_samples": 256,  # generated for the quality metrics after training
    },
    # -------------------------------------------------------------------------- sampling (generate_abr.py)
    "generate": {
        "classes": ["NORMAL", "SNIK", "ITIK", "TOTAL", "NOROPATI"],
        "intensities_db": [20.0, 40.0, 60.0, 80.0],
        "age_years": 1.0,
        "rate_per_s": 21.1,
        "n_per_condition": 4,
        "sampling_steps": 60,
        "guidance_scale": 1.5,
        "compare_split": "test",  # real recordings the quality metrics compare against
    },
    # ---------------------------------------------------------------------- new recordings (predict_abr.py)
    "predict": {
        "batch_size": 64,
        "polarity_tta": True,  # predict_abr and validate_abr: average the model over each recording and its
        # inverse (× −1), so no output depends on the recording's sign; twice the model time. See README
        "figure_ears": 50,  # one figure per ear, up to this many
        "overrides": None,  # manual override CSV; null = <output-dir>/overrides.csv when it exists
        "classical_criterion": 0.5,  # used when classical.criterion is null (no validation split to fit it on)
        "unsure_sd_db": 10.0,  # flag an ear whose threshold σ exceeds this ...
        "unsure_outlier_prob": 0.5,  # ... or whose outlier probability exceeds this ...
        "unsure_disagreement_db": 20.0,  # ... or where model and classical differ by more than this ...
        "unsure_input_z": 3.0,  # ... or whose median recording RMS lies this many training SDs away (also: levels
        # beyond the trained range, levels converted from another reference, a window not seen in training)
        "widen_unsure_sd": True,  # σ of an unsure ear also holds the model-classical gap (abr/unsure.py)
    },
    # --------------------------------------------------------------------------- targets (benchmark_abr.py)
    "benchmark": {
        "threshold_within_10db": 0.90,  # the project's bar (issue 16 sets it for real ears); here on synthetic ears
        "latency_mae_ms": 0.2,
        "macro_f1_margin": 0.2,  # over the class-prior baseline
        "timing_repeats": 3,
    },
}


def abr_defaults() -> dict:
    """A fresh deep copy (scripts must not share mutable defaults)."""
    return copy.deepcopy(ABR_DEFAULTS)

