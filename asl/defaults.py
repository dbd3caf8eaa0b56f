"""The complete ``asl`` configuration schema and defaults, shared by every asl script.

One schema for all scripts, so one YAML (e.g. configs/asl/production_v2.yaml) drives preprocessing,
training, validation, prediction and benchmarking; unknown keys are errors (common.config).
Sections ``physics``, ``phantom``, ``randomization`` and ``fit`` are documented where they are defined
(asl/physics.py, asl/simulate.py, asl/fitting.py).
"""

from __future__ import annotations

import copy

from asl.brain_volume import BRAIN_DEFAULTS
from asl.fitting import FIT_DEFAULTS
from asl.physics import PHYSICS_DEFAULTS
from asl.protocol import PROTOCOL_DEFAULTS
from asl.protocol_data import PROTOCOL_NET_DEFAULTS
from asl.simulate import PHANTOM_DEFAULTS, RANDOMIZATION_DEFAULTS
from common.runtime import RUNTIME_DEFAULTS

DEFAULTS = {
    "seed": 0,  # base seed (training stream, ensemble member i uses seed + i)
    "physics": dict(PHYSICS_DEFAULTS),  # nominal acquisition physics (LS "nominal" uses these too)
    "phantom": dict(PHANTOM_DEFAULTS),  # phantom generator
    "randomization": dict(RANDOMIZATION_DEFAULTS),  # per-phantom physics draw that reaches the signals
    "noise": {
        "kind": "gaussian",  # gaussian | rician; σ = S_ref / SNR (asl.physics.reference_signal)
        "train_snr_range": [2.0, 20.0],  # training SNR, log-uniform per phantom
        "train_snr_values": [],  # if non-empty: SNR drawn uniformly from this list instead (exp 19)
        "eval_snrs": [3.0, 5.0, 10.0, 20.0],  # SNRs of the saved test set (validation reports each)
        "val_snrs": [3.0, 10.0],  # SNRs of the saved validation set (model selection during training)
    },
    "data": {
        "dir": "data/asl/phantoms",  # where preprocess writes val.npz / test.npz (and synthetic subjects)
        "n_val": 16,  # validation phantoms (model selection)
        "n_test": 32,  # held-out test phantoms (validate_asl / benchmark_asl)
        "val_seed": 1_000_001,  # seeds of the fixed sets (disjoint from the training stream)
        "test_seed": 2_000_002,
        "synthetic_subject": True,  # also write a synthetic BIDS subject + per-PLD layout for predict tests
        "synthetic_slices": 3,  # slices (phantoms) in the synthetic subject
        "synthetic_snr": 8.0,  # SNR of the synthetic subject's averaged ΔM
        "synthetic_repeats": 2,  # label/control pairs per PLD in the synthetic BIDS series
    },
    "model": {
        "target": "asl.models.AmplitudeAwareSpatialASLNet",  # SpatialASLNet | AmplitudeAwareSpatialASLNet | DualEncoderSpatialASLNet
        "features": [32, 64, 128, 256],  # U-Net widths per level (5 levels for 128² patches, exp 15)
        "n_groups": 8,  # GroupNorm groups
        "dropout": 0.1,  # channel dropout in conv blocks (also MC dropout, exp 17)
        "normalization_mode": "global_scale",  # global_scale (keeps amplitude) | per_curve
        "use_log_var": True,  # log-variance heads (aleatoric uncertainty)
        "separate_decoders": False,  # exp 10
        "att_conditioning": False,  # exp 11
        "multi_scale_factors": [1],  # exp 16: e.g. [1, 2]
        "fusion": "attention",  # attention | mean (multi-scale)
        "denoise_head": False,  # exp 20 (needed for train.pretrain_denoise_epochs)
        "use_film_at_bottleneck": True,  # AmplitudeAware / DualEncoder flags
        "use_film_at_decoder": True,
        "use_amplitude_output_modulation": True,
        "amplitude_hidden": 64,  # width of the amplitude MLP
        "physics_features": True,  # append per-voxel closed-form grid estimates (nominal physics) to the input
        "cbf_kernel_size": 5,  # > 0: CBF = learned per-pixel k×k filter of the grid CBF estimate × gain (0: direct head)
    },
    "train": {
        "epochs": 30,  # main-task epochs (after any denoising pre-training)
        "steps_per_epoch": 200,  # optimizer steps per epoch (new phantoms every step)
        "batch_size": 32,  # phantoms per step and rank
        "lr": 1.0e-4,
        "weight_decay": 1.0e-4,
        "grad_clip": 1.0,
        "warmup_steps": 100,  # linear LR warm-up, then cosine decay to 1 % of lr
        "loss": "l1",  # l1 | l2 | huber | nll (point loss on z-scored targets over the brain mask)
        "huber_delta": 1.0,
        "cbf_weight": 1.0,
        "att_weight": 1.0,
        "variance_weight": 0.1,  # weight of the Gaussian NLL that trains the log-variance heads
        "dc_weight": 0.0,  # data-consistency: |physics(pred)/S_ref − input| over the mask, nominal physics
        "loss_weighting": "fixed",  # fixed | inverse_validation_loss | uncertainty (exp 12)
        "curriculum_epochs": 0,  # ramp SNR floor (from the top of the range) and randomization width over N epochs
        "n_ensembles": 3,  # members trained one after another (seed + i)
        "pretrain_denoise_epochs": 0,  # exp 20: epochs of denoising pre-training before the main task
        "target_stats_phantoms": 64,  # training phantoms used for the CBF/ATT z-score statistics
        "val_max_phantoms": 0,  # 0 = whole validation set each epoch
        # train_protocol_asl.py: σ scale (Laves et al. 2020) fitted after training on the validation slabs, each
        # with this many noise draws at SNRs log-uniform in protocol_net.snr_range (the training mix); 0 = none
        "calibration_draws": 4,
    },
    "finetune": {
        "enabled": False,  # exp 14: self-supervised fine-tuning on preprocessed in-vivo data
        "data": "",  # .npz written by preprocess_asl.py --invivo (or a BIDS / per-PLD folder)
        "epochs": 5,
        "lr": 1.0e-5,
        "batch_size": 4,  # slices per step
        "anchor_weight": 1.0,  # keeps predictions near the pre-fine-tuning model (z units, L1)
    },
    "fit": dict(FIT_DEFAULTS),  # least-squares baseline
    # Protocol-conditioned networks (train_protocol_asl.py; asl/protocol_net.py): 3D brain subjects
    # (asl/brain_volume.py), randomized protocols (asl/protocol.py), model and data settings (asl/protocol_data.py).
    "brain": dict(BRAIN_DEFAULTS),
    "protocol": dict(PROTOCOL_DEFAULTS),
    "protocol_net": dict(PROTOCOL_NET_DEFAULTS),
    "brain_test": {  # held-out evaluation of protocol-conditioned networks by validate_asl.py
        "seed": 7_000_007,  # subject seeds of a family the training stream (seed, index) never produces
        "n_subjects": 4,  # whole subjects (brain.shape)
        "snrs": [3.0, 5.0, 10.0],
        "protocols": [  # fixed protocols (nominal = true physics: the reference LS is correctly configured)
            {"name": "pcasl_5pld", "modes": ["pcasl"], "plds_ms": [500.0, 1000.0, 1500.0, 2000.0, 2500.0],
             "tau_ms": 1800.0, "t1_blood_ms": 1650.0, "alpha_pcasl": 0.85, "alpha_vsasl": 0.56,
             "n_bs_pcasl": 0, "n_bs_vsasl": 0, "alpha_bs1": 0.95, "lambda_blood": 0.9},
        ],
        "n_bootstrap": 2000,  # resamples of subjects for the 95 % confidence intervals
    },
    "validate": {
        "max_phantoms": 0,  # 0 = all test phantoms
        "mc_dropout_samples": 0,  # > 0: MC-dropout uncertainty (exp 17)
        "mc_dropout_rate": None,  # dropout p at test time (null = the training rate)
        "linearity_k": [0.5, 0.75, 1.0, 1.5, 2.0],  # amplitude scale factors
        "linearity_snr": 10.0,  # noise level (σ fixed) for the linearity test
        "figure_snr": 3.0,  # SNR shown in map figures
        "scatter_points": 4000,  # points per scatter / Bland-Altman plot
        "error_quantile": 0.9,  # uncertainty AUROC: detect voxels above this error quantile (exp 18)
    },
    "predict": {
        "mask_threshold": 0.2,  # brain mask: M0 > threshold × 99th percentile of M0
        "ls": True,  # with --checkpoint and no --method: also fit LS maps (--method both); false: --method nn
        "m0_scale": 1.0,  # multiply M0 by this (e.g. a different receiver gain)
        "m0_value": 0.0,  # M0 for data with M0Type Absent (> 0: used as a uniform M0; 0: refuse such data)
        "fix_label_control_swap": False,  # a detected label/control swap: false = refuse, true = flip and record
        "fit_model": "buxton_full",  # PCASL model LS fits to data (buxton_full as FSL BASIL; blood_t1 as MULTIVERSE)
        "pvc": False,  # two-compartment GM/WM partial-volume correction (asl/pvc.py; needs GM/WM maps): ls_pvc_* maps
        "pvc_kernel": 5,  # in-plane kernel (voxels) of the local linear regression
        "tissue_t1_from_pv": True,  # LS with GM/WM maps: tissue T1 per voxel from them (buxton_full; else one T1)
        "crlb": True,  # CRLB uncertainty maps of the fit (ls_cbf_std, ls_att_std; σ from the fit residuals)
        "qc_figure": True,  # figures/qc.png: M0, ΔM/M0, maps, uncertainty, mean curve and fit
    },
    "benchmark": {
        "snr": 5.0,  # test-set SNR used
        "max_phantoms": 0,  # 0 = all test phantoms (batched LS, network)
        "n_scipy_voxels": 400,  # voxels for scipy (per-voxel time extrapolated by the measured rate)
        "repeats": 3,  # timing repeats of every method (best of; the scipy fit too)
        "threads": 1,  # torch CPU threads for all three methods (scipy is single-threaded); 0 = unchanged
    },
    "runtime": {**RUNTIME_DEFAULTS,
                "torch_threads": 0},  # torch intra-op threads on CPU (0 = torch's default); 1 was 4-5× faster
    # per training step than 2 on the shared, loaded 2-core development machine (measured)
}


def defaults() -> dict:
    return copy.deepcopy(DEFAULTS)
