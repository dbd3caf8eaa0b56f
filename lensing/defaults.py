"""The complete ``lensing`` configuration, shared by every lensing script.

One YAML file (configs/lensing/*.yaml) drives the whole pipeline (simulate / convert / split → train →
validate → benchmark), and every script checks EVERY section against this one schema (common.config): a
typo such as ``validate.thresholdz`` is an error naming the closest valid key in whichever script reads
the file, not only in the script that uses the section. Each script's ``DEFAULTS`` is
:func:`lensing_defaults` and it reads only the sections it needs (named in its docstring).
"""

from __future__ import annotations

import copy

from common.runtime import RUNTIME_DEFAULTS
from lensing.metrics import DOMAIN_SHIFT_AUROC, STRATIFY_QUANTITIES
from lensing.splits import DEFAULT_FACTORS

LENSING_DEFAULTS = {
    "seed": 0,  # simulation, split and training seed (ensemble member i uses seed + i)
    # ------------------------------------------------ simulated data sets (preprocess_lensing.py simulate)
    "simulate": {
        "surveys": ["euclid_vis"],  # presets of lensing/surveys.py: euclid_vis hsc hst_acs sdss kids
        "n_per_survey": [1000],  # cutouts per survey: one number for all, or one per survey
        "n_pix": 64,  # cutout size (pixels)
        "supersampling": 1,  # sub-pixels per pixel side when rendering
        "band_mode": "all",  # all | reference (each survey's reference band only, to mix band sets)
        "storage": "npy",  # npy | fits | tiff16
        "dtype": "float32",  # float32 | float64 rendering precision
        "renderer": "torch",  # torch | lenstronomy (held-out sets by an independent simulator: sim:external)
        "compile": False,  # torch.compile the fused renderer (needs a C++ compiler on CPU; 1-90 s per scene layout and PSF radius, cached)
        "batch_size": 256,  # scenes rendered per batch
        "truth_grid": 160,  # grid points per axis for Einstein area / image counting
        "seeing_scatter": 0.0,  # per-image PSF FWHM = preset x exp(N(0, this)) (0 = the preset's FWHM)
        "depth_scatter_mag": 0.0,  # per-image depth shift ~ U(-this, +this) mag (exposure x 10^(0.8 dm))
        "pixel_scale_scatter": 0.0,  # per render batch pixel scale = preset x exp(U(-this, +this)) (0 = the preset's)
        "artefact_fraction": 0.0,  # share of all images with cosmic rays / a satellite trail (artefacts.py)
        "population": {  # scene distribution (lensing/population.py)
            "lens_fraction": 0.5,
            "nonlens_neighbour_fraction": 0.5,
            "lens_neighbour_fraction": 0.3,
            "theta_E_range_arcsec": [0.5, 2.0],
            "theta_E_max_fov_fraction": None,  # null: U(theta_E_range_arcsec); a number caps theta_E at this x half
            # the cutout width, with a WARNING naming the range actually drawn
            "lens_mag_range": [19.0, 22.5],
            "source_mag_range": [21.5, 25.0],
            "neighbour_mag_range": [21.0, 25.0],
            "source_offset_max": 0.9,
            "shear_sigma": 0.03,
            "confuser_fraction": 0.0,  # of non-lenses, the share with a ring / spiral arms / close pair / edge-on
            # disc (population.py); 0 draws nothing extra, so earlier data sets are reproduced
            "source_knots_max": 0,  # extra lensed components per source: star-forming knots, a second disc
            "los_companions_max": 0,  # unlensed line-of-sight galaxies anywhere in the cutout
        },
    },
    # ------------------------------------------------------ real cutouts (preprocess_lensing.py convert)
    "convert": {
        "format": "galaxiesml",  # galaxiesml (HDF5) | folder (FITS/TIFF/NPY cutouts + CSV)
        "input": "",  # HDF5 file or folder (also --input)
        "catalog_name": "catalog.csv",  # folder format: the CSV inside the input folder
        "bands": [],  # galaxiesml: subset of g r i z y (empty = all five)
        "label": -1,  # label for rows without one: -1 unknown (pretraining), 0 negatives, 1 lenses
        "label_source": "obs:other",  # folder format: provenance for rows without label_source
        "label_confidence": 1.0,
        "survey": "hst_acs",  # folder format: survey for rows without a 'survey' column
        "max_rows": 0,  # galaxiesml: convert only the first N (0 = all)
        "target_psf_fwhm": None,  # arcsec; match every cutout to this PSF (null = no matching)
        "psf_regularization": 1.0e-4,  # Fourier-ratio regularization λ (fraction of max |S|^2)
        "storage": "npy",
    },
    # ------------------------------------------------- stratified splits (preprocess_lensing.py, all commands)
    "split": {
        "fractions": {"train": 0.7, "val": 0.15, "test": 0.15},
        "factors": list(DEFAULT_FACTORS),  # up to 7 of: label survey redshift magnitude seeing psf_fwhm pixel_scale
        "min_stratum_size": 0,  # 0 = the number of splits
        "enabled": True,  # simulate/convert: split right away
    },
    # --------------------------------------------------------- the data set read by train / validate
    "data": {
        "dir": "",  # data set folder (catalog.csv); --data overrides
        "train_split": "train",
        "val_split": "val",
        "surveys": [],  # train/validate on these surveys only (empty = all)
        "clip_sigma": 250.0,  # noise-normalized inputs clipped at ±this (DeepLens)
        "stretch": "linear",  # linear (DeepLens) | asinh (compresses the bright lens galaxy)
        "residual_channel": False,  # + per band the input minus its azimuthal-median (round) model (data.py)
        "preload": True,  # read all cutouts into memory once
        "image_size": 0,  # model input size in px (0 = the first training cutout's); validation uses the model's
        "size_policy": "crop_pad",  # cutouts of another size: crop_pad (centre crop / pad, zero-weight pad) | error
        # | native (fed as they are: the network takes any size; one batch needs one size)
        "on_missing_files": "error",  # error | drop (rows whose files are missing, with a log line)
    },
    # ---------------------------------------------------------------------- the model (lensing/models.py)
    "model": {
        "name": "deeplens",  # deeplens (classifier) | deeplens_params (+ bounded lens-parameter head)
        "widths": [16, 32, 64],  # channels per ResNet stage
        "blocks_per_stage": [1, 1, 1],
        "dropout": 0.0,  # > 0 enables MC dropout at validation
        "stem_kernel": 7,
        "head_hidden": 128,  # deeplens_params only
    },
    # --------------------------------------------------------------------------- training (train_lensing.py)
    "train": {
        "epochs": 10,
        "batch_size": 64,
        "lr": 1.0e-3,  # AdamW; cosine annealing to 0 over the epochs
        "weight_decay": 1.0e-4,
        "grad_clip": 5.0,
        "hard_negative_weight": 0.0,  # + this x BCE of the batch's highest-scoring non-lenses (0 = plain BCE)
        "hard_negative_fraction": 0.25,  # the share of each batch's non-lenses counted as hard (highest logits)
        "augment": True,  # random flips and 90° rotations
        "max_steps_per_epoch": 0,  # 0 = full epochs
        "val_batch_size": 256,
        "plot_curves": True,  # training-curve figures at the end
    },
    "physics": {  # physics-informed loss (lensing/physics_loss.py)
        "weight": 0.0,  # weight of the gated chi2 term (0 = off)
        "warmup_epochs": 3,  # curriculum min(1, epoch / warmup_epochs)
        "gate": "probability",  # probability (detached sigmoid) | label
        "supersampling": 1,  # rendering sub-pixels for the chi2 model
        "param_supervision_weight": 0.0,  # MSE on the simulated lens-mass truth (true_* columns), lenses only
    },
    "ensemble": {
        "n_members": 1,  # > 1: members trained one after another (seeds seed + i) into member_<i>/
    },
    # ----------------------------------------------------------------------- validation (validate_lensing.py)
    "validate": {
        "split": "test",  # rows of this split (null/"" = all rows)
        "surveys": [],  # only these surveys (empty = all)
        "batch_size": 256,
        "mc_dropout_samples": 0,  # > 0: MC dropout passes per member (model needs dropout > 0)
        "stratify": list(STRATIFY_QUANTITIES),  # truth columns for the stratified curves
        "n_thresholds": 10,  # thresholds per curve (percentiles of the lenses' quantity)
        "domain_shift_auroc": DOMAIN_SHIFT_AUROC,  # per-survey AUROC below this logs a domain-shift warning
        "grid_size": 16,  # cutouts in each figure grid
        "calibration_bins": 10,
        "baseline": True,  # also score the non-learned azimuthal-residual baseline
        "bootstrap": 200,  # stratified paired bootstrap resamples for 95 % CIs of model, baseline and difference (0 = off)
        "combine_with_baseline": "off",  # off | fit | apply: logistic stack of (network logit, baseline) (combine.py);
        # fit: on the validation split of the training data (validate.split = data.val_split), written beside the
        # checkpoint; apply: read from beside the checkpoint and reported as a third row
        "figures": True,  # ROC, stratified curves, cutout grids, reliability diagram
    },
    # ------------------------------------- large validation sets rendered on the fly (validate_stream_lensing.py)
    "stream": {  # scenes drawn from the simulate section, per survey; only the scores are kept
        "n_nonlenses": 100000,  # non-lenses per survey (TPR0/TPR10 are false-positive counts: many negatives)
        "n_lenses": 2000,  # lenses per survey
        "chunk": 1000,  # scenes rendered and scored at a time (memory: chunk x bands x n_pix^2 floats, a few)
    },
    # -------------------------------------------------------------------- benchmarks (benchmark_lensing.py)
    "benchmark": {
        "n_pix": [64, 101],  # image sizes
        "supersampling": [1],  # supersampling factors (3 is ~40-170 images/s in lenstronomy)
        "pixel_scale_arcsec": 0.1,
        "psf_fwhm_arcsec": 0.18,  # Bologna space set
        "torch_batch": 256,  # scenes per torch render call
        "torch_repeats": 3,  # timed torch calls (after one warm-up)
        "lenstronomy_images": 100,  # scenes rendered (one by one) by lenstronomy, also the accuracy sample
        "threads": [1, 0],  # torch intra-op threads to time (0 = torch's default)
        "compile": False,  # also time the torch.compile'd fused renderer (needs a C++ compiler; compile time reported)
        "compile_threads": 1,  # torch threads for the compiled renderer (0 = torch's default)
        "rounds": 3,  # interleaved timing rounds (lenstronomy, then each torch variant); medians reported
        "train_image_size": 64,
        "train_batch": 32,
        "train_steps": 5,
        "model_widths": [16, 32, 64],
        "validate_summary": "",  # optional path of a validate summary.json to print its Bologna metrics
    },
    "runtime": dict(RUNTIME_DEFAULTS),  # num_workers, amp, torch_threads (1 on a shared CPU), cooling pauses
}


def lensing_defaults() -> dict:
    """A fresh deep copy (scripts must not share mutable defaults)."""
    return copy.deepcopy(LENSING_DEFAULTS)
