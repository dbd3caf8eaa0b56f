"""The complete configuration of the rsna_spine scripts (one YAML drives preprocess, train, validate,
predict and benchmark; every script uses this DEFAULTS dict, so an unknown key is an error anywhere).

Defaults are the production two-stage setting (EfficientNet-V2-S classifier, v9 hyper-parameters with the
metric's class weights); configs/rsna_spine/*.yaml override them (smoke.yaml: tiny, CPU, seconds).
"""

from __future__ import annotations

import copy


from common.runtime import RUNTIME_DEFAULTS
from rsna_spine.synthetic import SYNTHETIC_DEFAULTS

DEFAULTS = {
    "seed": 42,
    "paths": {
        "data_root": "data/rsna_spine/kaggle",  # the competition layout (train.csv, train_images/, ...)
        "cache_dir": "data/rsna_spine/cache",  # decoded stacks + tables written by preprocess_rsna.py
        "train_dir": None,  # validate/predict/benchmark: run folder of train_rsna.py (null: latest of this config)
        "validate_dir": None,  # benchmark: run folder of validate_rsna.py (null: latest of this config)
    },
    # embedded synthetic Kaggle-layout dataset, written to paths.data_root when enabled and train.csv is absent
    "synthetic": {"enabled": False, **copy.deepcopy(SYNTHETIC_DEFAULTS)},
    "preprocess": {
        "workers": 0,  # decoding processes (spawned); 0 = automatic (in-process below ~200 series)
        "splits": ["train"],  # which Kaggle splits to decode into the cache (test is decoded by predict)
        "percentiles": [1.0, 99.5],  # per-stack intensity percentiles stored for percentile scaling
        "n_folds": 5,  # StratifiedGroupKFold by study
        "fold_seed": 42,
        "overwrite": False,  # re-decode stacks already in the cache
        "stack_gap_factor": 2.5,  # a gap > this x the median slice gap starts a new stack (parallel blocks)
        "missing_geometry": "skip",  # slice without ImageOrientation/PositionPatient: skip (logged) | error
    },
    "cache": {
        # decoded stacks one process keeps in memory (least recently used evicted first); every DataLoader
        # worker holds its own, so a training job uses about (1 + train workers) x this
        "memory_mb": 1024.0,
    },
    "intensity": {
        "mode": "percentile",  # percentile (per stack, default) | window (fixed WC/WW, the v9 setting)
        "window_center": 50.0,  # window mode only (v9: WC 50 / WW 350, a CT soft-tissue window)
        "window_width": 350.0,
        "clahe": False,  # CLAHE on each crop slice (v9: on)
        "clahe_clip": 2.0,
        "clahe_tiles": 8,
    },
    "localizer": {
        "grid_sagittal": [16, 64, 64],  # (slices, rows, cols) the sagittal stacks are resampled to
        "grid_axial": [64, 64],  # (rows, cols) of the axial slice for the subarticular points
        "channels": [8, 16, 32],  # U-Net widths (stem, pooled levels..., bottleneck)
        "sigma_vox": [1.0, 1.5, 1.5],  # Gaussian target width in output voxels (slice, row, col)
        "decode_window": 2,  # soft-argmax half-window around the peak (output voxels)
        "axial_max_distance_mm": 0.0,  # level point to nearest axial slice plane; farther -> class priors
        # (0 = automatic: the axial stack's median slice spacing)
        "coord_weight": 0.1,  # weight of the DSNT coordinate (L1) term added to the heatmap cross-entropy
        "epochs": 30,
        "batch_size": 4,
        "lr": 2.0e-3,
        "weight_decay": 1.0e-4,
        "grad_clip": 1.0,
        "augment": True,  # left-right flips (with point swaps), intensity gamma/scale, in-plane shifts
        "series": ["sag_t2", "sag_t1", "axial_t2"],  # which localizers to train
    },
    "model": {
        "backbone": "efficientnet_v2_s",  # efficientnet_v2_s | efficientnet_v2_tiny (smoke runs)
        "backbone_weights": "",  # "" random init | "imagenet" (torchvision cache) | path to a .pth file
        "tiny_channels": [8, 16, 32, 64],  # efficientnet_v2_tiny stage widths
        "gru_hidden": 512,
        "gru_layers": 2,
        "gru_dropout": 0.3,
        "attention_hidden": 256,
        "level_dim": 256,
        "condition_dim": 64,
        "head_hidden": 512,
        "dropout": 0.35,
        "bias_init": None,  # null: log of the loss-optimal constant (w·prior); or a list of 3 logits
        # sagittal + axial fusion for the spinal and subarticular grades (rsna_spine/fusion.py): each such
        # target also gets the crop of the other series at the same patient point, encoded by the same
        # encoder and concatenated before the head; falls back to the primary view where there is none
        "second_view": False,
    },
    "crop": {
        "num_slices": 7,  # N slices around the slice of interest
        "img_size": 256,  # output H = W (pixels)
        "crop_mm": {"spinal": 48.0, "foraminal": 40.0, "subarticular": 40.0},  # square side per group
    },
    "train": {
        "stages": ["localizer", "classifier"],  # which stages train_rsna.py trains
        "train_folds": [0],  # folds to train (each validated on its held-out fold)
        "split_by_group": False,  # one classifier for all 25 targets, or one per condition group
        "epochs": 25,
        "batch_size": 12,
        "lr": 1.0e-4,  # head, GRU, attention, embeddings
        "backbone_lr": 1.0e-5,
        "weight_decay": 0.03,
        "warmup_epochs": 2,
        "min_lr_ratio": 0.01,  # cosine floor as a fraction of each group's lr
        "grad_clip": 1.0,
        "class_weights": [1.0, 2.0, 4.0],  # weighted CE; the metric's own weights by default
        "swa": {"enabled": True, "start_epoch": 18, "lr": 5.0e-6, "anneal_epochs": 1},
        "min_minority_recall": 0.2,  # dead-class gate: best checkpoint only if moderate & severe recall >= this
        "select_metric": "official",  # official (lower is better) | balanced_accuracy
        "patience": 12,  # stop after this many epochs without a better gated checkpoint (0 = never)
        "jitter_slices": 1,  # stage-1-like jitter of the slice of interest (uniform ± slices)
        "jitter_mm": 3.0,  # ... and of the in-plane centre (Gaussian sd per axis, mm)
        "rotation_deg": 10.0,  # random in-plane rotation (uniform ± degrees)
        "flip_prob": 0.5,  # left-right flip with the condition mirrored
        "second_view_dropout": 0.2,  # model.second_view: share of training samples whose second view is hidden
        "val_centers": "stage1",  # validation crops centred by stage 1 (as at test time) | gt
        "max_steps_per_epoch": 0,  # 0 = whole epoch (tests use a few steps)
    },
    "predict": {
        "tta_flip": True,  # average with the left-right flipped input (condition outputs swapped back)
        "checkpoint": "best",  # best | swa | last
        "batch_size": 16,
        "workers": 0,  # processes decoding the test series (0 = automatic)
        "keep_cache": False,  # keep the decoded test stacks (<run>/test_cache) after writing the submission
        # per-group temperatures (validate_rsna.py's temperatures.json) applied to the model's probabilities:
        # auto = <model folder>/temperatures.json when that file exists | none | a path to such a file
        "temperatures": "auto",
    },
    "kaggle": {  # predict_kaggle_rsna.py: the offline notebook entry
        "n_studies_estimate": 1500,  # test studies the run time is extrapolated to (per-study times measured)
        "time_limit_h": 9.0,  # the competition's notebook run-time limit, for the within / over line
    },
    "validate": {
        "n_example_studies": 3,  # studies shown in the attention / crop figures
    },
    "benchmark": {
        "n_series": 40,  # series decoded for the decode-throughput measurement
        "n_samples": 64,  # stage-2 samples timed from the cache and from DICOM
        "decode_workers": [1, 2],  # worker counts whose decode throughput is measured
        "real_size": {  # caching and sampling at real slice sizes (synthetic series; [] sizes = skip)
            "sizes": [256, 384, 640],  # px (rows = columns)
            "syntaxes": ["explicit", "jpeg2000"],  # uncompressed and JPEG 2000 lossless
            "n_slices": 15,
            "n_samples": 16,  # crops timed per source (disk cache, memory, DICOM); also the measured epoch
            "loader_workers": [],  # DataLoader workers of the measured epochs ([] = runtime.num_workers)
        },
    },
    "runtime": {**RUNTIME_DEFAULTS, "torch_threads": 0},  # torch_threads: 0 = torch default; 1 on busy CPUs
}
