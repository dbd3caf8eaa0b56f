"""The complete ``__domain__`` configuration schema, shared by every __domain__ script (common/README.md §2)."""

from __future__ import annotations

import copy

from common.runtime import RUNTIME_DEFAULTS

_DEFAULTS = {
    "seed": 0,
    "data": {
        "dir": None,  # folder written by preprocess___domain__.py (None: make a synthetic set in memory)
        "n_train": 512,  # synthetic training samples
        "n_val": 128,  # synthetic validation samples
        "n_features": 8,
        "noise_std": 0.1,
    },
    "model": {"hidden": [64, 64]},
    "train": {"epochs": 10, "batch_size": 32, "lr": 1e-2, "weight_decay": 1e-4, "grad_clip": 1.0},
    "runtime": dict(RUNTIME_DEFAULTS),
}


def defaults() -> dict:
    return copy.deepcopy(_DEFAULTS)
