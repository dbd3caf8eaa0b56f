"""The vmat pipeline's complete configuration, shared by every vmat script.

One schema for the domain (like asl/defaults.py and abr/defaults.py): every configs/vmat/*.yaml is read
against :data:`VMAT_DEFAULTS` by common.config, so a typo in any section, read by any script, is an error
naming the valid keys. Each script reads only its sections:

- ``python -m vmat.phantom``: ``phantom`` (synthetic DICOM-RT patients), ``seed``
- ``preprocess_vmat.py``: ``preprocess``
- ``train_vmat.py``: ``data input patch augment model loss constraints train val runtime``, ``seed``; its
  validation also ``gamma dvh`` (the settings validate_vmat.py scores with)
- ``predict_vmat.py``: ``inference``, ``seed``
- ``validate_vmat.py``: ``gamma dvh constraints figures`` (+ ``inference`` with ``--checkpoint``), ``seed``
- ``benchmark_vmat.py``: ``benchmark``, ``seed``
"""

from __future__ import annotations

import copy

from common.runtime import RUNTIME_DEFAULTS
from vmat.data import INPUT_DEFAULTS
from vmat.dvh import DEFAULT_CONSTRAINTS, DVH_DEFAULTS
from vmat.evaluation import GAMMA_DEFAULTS
from vmat.inference import INFERENCE_DEFAULTS
from vmat.losses import LOSS_DEFAULTS

# Synthetic patients (vmat/phantom.py); configs/vmat/phantom*.yaml set this section.
PHANTOM_DEFAULTS = {
    "n_cases": 8,  # number of patients
    "case_prefix": "synth",  # folders <prefix>_<NNN>
    "structure_map": "configs/vmat/structure_map.json",  # ROI spellings are drawn from here
    "ct": {
        "shape_zyx": [48, 64, 64],  # slices, rows, columns
        "spacing_zyx_mm": [5.0, 6.0, 6.0],  # slice gap, row spacing (y), column spacing (x): non-square allowed
        "rescale_slope": 1.0,  # stored = (HU - intercept) / slope
        "rescale_intercept": -1024.0,
        "noise_hu": 10.0,  # Gaussian noise inside the body
    },
    "dose_grid": {
        "spacing_zyx_mm": [4.0, 5.0, 5.0],  # RTDOSE voxel size, deliberately not the CT's
        "margin_mm": 10.0,  # beyond the body's bounding box in x and y
    },
    "plan": {
        "prescription_gy": 70.0,  # PTV70, TargetPrescriptionDose of the first dose reference
        "low_dose_gy": 56.0,  # PTV56
        "n_fractions": 28,
        "n_arcs": [1, 3],  # drawn uniformly in [min, max] per case
        "beams_per_arc": 18,  # static beams sampling each arc
        "penumbra_mm": [3.0, 5.0],
        "oar_sparing": [0.3, 0.7],  # fluence reduction of low-dose rays crossing rectum/bladder
        "scatter_fraction": 0.12,
        "scatter_sigma_mm": 15.0,
        "attenuation_per_mm": 0.0045,
    },
    "bowel_probability": 0.8,  # the bowel bag is optional in the protocol; absent in some cases
    "contour_resolution_mm": 0.25,  # tracing grid of organ contours (traced polygons lie <= half of it inside)
    "body_contour_resolution_mm": 1.0,  # the body outline is large; a coarser grid keeps it fast
    "distractor_rois": ["Couch_Surface", "z_PTV70_ring", "PTV70_eval", "Rectum_PRV5", "Marker_1"],
}

# Raw DICOM-RT / OpenKBP cases -> NPZ (preprocess_vmat.py); configs/vmat/preprocess*.yaml set this section.
PREPROCESS_DEFAULTS = {
    "format": "dicom",  # dicom | openkbp (the --format option overrides)
    "structures": {
        "map_file": "configs/vmat/structure_map.json",  # canonical -> variants (JSON)
        "channels": None,  # mask/SDF channel order; null = the format's default list
        "required": ["PTV70", "PTV56", "Prostate", "Rectum", "Bladder", "Femur_L", "Femur_R"],  # else skipped
        "body": "Body",  # canonical ROI used as possible-dose mask (else a CT threshold)
        "extra_names": {},  # free-form {canonical: [ROI spellings]} added to map_file (e.g. a clinic's TG-263 names)
    },
    "site": "prostate",  # label of the structure template (configs/vmat/site_*.yaml set channels/required/targets)
    "target_doses_gy": {},  # {target: Gy}; targets not listed take their dose from the name (PTV56 -> 56 Gy)
    "prescription": {"fallback_gy": 70.0},  # used with a warning when no RTPLAN prescription is found
    "dose": {
        "interpolation": "linear",  # RTDOSE -> CT grid: linear | bspline
        "min_coverage": 0.98,  # a structure with less of its volume inside the RTDOSE grid is flagged (manifest)
    },
    "ct": {
        "slice_gaps": "error",  # missing / uneven CT slices: error (case skipped, gap named) | interpolate (recorded)
        "gap_tolerance_mm": 0.1,  # a slice further than this from the uniform grid of the median spacing is a gap
    },
    "body_threshold_hu": -500.0,  # possible-dose mask from the CT when no body ROI exists
    "sdf": {"clip_mm": 50.0},  # SDF = clip(signed distance, ±clip) / clip
    "grid": {
        "resample_spacing_mm": None,  # [z, y, x] mm to resample every case to; null keeps the CT grid
        "crop_shape": None,  # [z, y, x] voxels around the PTV centroid (padded with air / 0 Gy); null = no crop
    },
    "sanity": {
        "enforce": True,  # skip cases that fail a check (else only record it)
        "ptv_mean_tolerance": 0.15,  # |mean dose in the top target - its dose| / its dose
        "min_d95_fraction": 0.80,  # D95 of the top target below this fraction of its dose is absurd
    },
    "num_workers": 1,  # parallel case processes (spawn); 0/1 = in this process
}

VMAT_DEFAULTS = {
    "seed": 0,
    # ------------------------------------------------------------- training (train_vmat.py)
    "data": {
        "train_dir": None,  # folder of <case>.npz (the --data option overrides)
        "val_dir": None,  # separate validation folder; null = split val_fraction off train_dir
        "val_fraction": 0.2,
        "max_val_cases": 0,  # 0 = all validation cases
        "cache_mb": 4096,  # training cases kept decoded in memory, per process (each loader worker has its own)
    },
    "input": dict(INPUT_DEFAULTS),  # see vmat/data.py
    "patch": {
        "size": [64, 64, 64],  # z, y, x voxels (divisible by 2^poolings)
        "per_case_per_epoch": 8,  # patches drawn from each training case per epoch
        "high_dose_fraction": 0.5,  # share of patches centred on dose >= threshold x Rx
        "high_dose_threshold": 0.1,
    },
    "augment": {
        "flip_lr": 0.5,  # probability of a left-right flip (patient axis, L/R channels swapped)
        "rotate_deg": 5.0,  # uniform axial rotation in +-deg
        "shift_vox": 4,  # random shift of the patch centre
        "ct_scale": 0.05,  # CT intensity jitter: x (1 +- s) ...
        "ct_shift": 0.03,  # ... + u(-t, t) on the /1000-scaled HU
    },
    "model": {
        "type": "unet",  # unet | cascade | diffusion
        "channels": [48, 96, 192, 384, 384],  # per level; len - 1 poolings (seed: 48/96/192/384, 4 poolings)
        "refine_channels": None,  # cascade: stage-2 widths (null = channels)
        "groups": 8,  # GroupNorm groups
        "blocks_per_level": 1,
        "dropout": 0.0,
        "film": True,  # FiLM conditioning on prescription / structure presence / target ratios
        "residual_over_atlas": False,  # unet: output = atlas input channel + correction (needs input.atlas_channel)
        "diffusion_steps": 1000,  # diffusion: training timesteps T
        "prediction": "v",  # diffusion: eps | v | x0
        "schedule": "cosine",
        "dose_scale_max": 1.2,  # diffusion: dose / Rx in [0, this] is mapped to [-1, 1]
        "sampling_steps": 10,  # diffusion: DDIM steps at validation/inference
    },
    "loss": dict(LOSS_DEFAULTS),  # see vmat/losses.py
    "constraints": [dict(c) for c in DEFAULT_CONSTRAINTS],  # used by the DVH-aware loss
    "train": {
        "epochs": 100,
        "batch_size": 2,
        "lr": 1e-4,
        "weight_decay": 1e-4,
        "grad_clip": 1.0,
        "ema_decay": 0.999,  # 0 disables EMA
        "channels_last": True,  # channels_last_3d tensors: 5-15x faster Conv3d backward on CPU (oneDNN)
    },
    "val": {
        "every_epochs": 1,
        "gamma_subset": 5000,  # random voxels for the validation gamma (0 = skip gamma); settings: the gamma section
        "best_metric": "val_mae_body_gy",  # val_ + a validate_vmat overall name (val_gamma_3_3_pass_pct ...) | train_loss
        "best_mode": "min",  # min | max
        "inference": {**INFERENCE_DEFAULTS, "tta_flip": False, "diffusion_samples": 1},
    },
    "runtime": dict(RUNTIME_DEFAULTS),
    # ----------------------------------------- prediction (predict_vmat.py, validate_vmat.py --checkpoint)
    "inference": dict(INFERENCE_DEFAULTS),  # see vmat/inference.py
    # ------------------------------------------------------------- scoring (validate_vmat.py)
    "gamma": dict(GAMMA_DEFAULTS),  # see vmat/evaluation.py
    "dvh": copy.deepcopy(DVH_DEFAULTS),  # DVH sampling and reported V_xGy (vmat/dvh.py); also training validation
    "figures": {"n_cases": 3},  # cases that get dose/DVH/gamma figures
    # -------------------------------------------------------------------- data preparation
    "preprocess": copy.deepcopy(PREPROCESS_DEFAULTS),
    "phantom": copy.deepcopy(PHANTOM_DEFAULTS),
    # ---------------------------------------------------------- benchmarks (benchmark_vmat.py)
    "benchmark": {
        "gamma": {
            "enabled": True,
            "criteria": [[3.0, 3.0, False], [2.0, 2.0, True]],  # [dose %, distance mm, local] each timed
            "lower_percent_cutoff": 10.0,
            "max_gamma": 2.0,
            "interp_fraction": 10,  # the same for both implementations
            "shift_mm": [1.5, 2.0, -1.5],  # perturbation of the evaluated dose: a shift (z, y, x) ...
            "scale": 0.97,  # ... a global scale ...
            "noise_gy": 1.0,  # ... and Gaussian noise where the dose exceeds 1 % of its maximum
            "cpu_threads": 1,  # torch threads of vmat.gamma on a CPU (pymedphys' numba loop runs on one)
            "synthetic": False,  # also time a synthetic patient's dose when --data is given
            "synthetic_grid_mm": None,  # its RTDOSE grid (z, y, x), e.g. [2.5, 2.5, 2.5]; null: the phantom's
        },
        "preprocess": {"enabled": True, "n_cases": 3},
        "throughput": {
            "enabled": True,
            "model_config": "configs/vmat/smoke.yaml",  # training config whose model is measured
            "patch_sizes": [[32, 32, 32], [48, 48, 48]],
            "batch_size": 2,
            "steps": 3,  # timed steps per size (after one warm-up step)
        },
    },
}


def defaults() -> dict:
    """A fresh copy of the complete vmat configuration."""
    return copy.deepcopy(VMAT_DEFAULTS)
