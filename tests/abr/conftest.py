"""Shared fixtures of the ABR tests: a tiny pipeline configuration and a small synthetic table."""

from __future__ import annotations

import copy

import pytest
import yaml

TINY = {
    "seed": 3,
    "runtime": {"torch_threads": 1},
    "synthetic": {"n_patients": 16, "intensity_steps_db": [], "intensity_step_db": 20.0,  # 6 levels: fast
                  "class_probs": {"NORMAL": 0.5, "SNIK": 0.2, "ITIK": 0.15, "TOTAL": 0.1, "NOROPATI": 0.05}},
    "preprocess": {"model_rate_hz": 5000.0},
    "model": {"channels": 8, "width": 16, "transformer_layers": 1, "heads": 2, "series_layers": 1},
    "train": {"epochs": 2, "batch_size": 8, "max_steps_per_epoch": 2, "restart_epochs": 2, "restart_mult": 1},
    "validate": {"batch_size": 32, "figure_ears": 2},
    "diffusion": {"channels": [8, 16], "cond_dim": 16, "epochs": 1, "batch_size": 32, "max_steps_per_epoch": 2,
                  "num_steps": 50, "sampling_steps": 2, "eval_samples": 12},
    "generate": {"classes": ["NORMAL", "SNIK"], "intensities_db": [40.0, 80.0], "n_per_condition": 2,
                 "sampling_steps": 2},
    "benchmark": {"timing_repeats": 1},
}


@pytest.fixture(scope="session")
def tiny_config(tmp_path_factory):
    path = tmp_path_factory.mktemp("abr_cfg") / "tiny.yaml"
    path.write_text(yaml.safe_dump(copy.deepcopy(TINY), allow_unicode=True), encoding="utf-8")
    return path


@pytest.fixture(scope="session")
def tiny_cache(tiny_config, tmp_path_factory):
    """A preprocessed cache of the tiny synthetic cohort (built once per session)."""
    from abr.preprocess_abr import main

    out = tmp_path_factory.mktemp("abr_data")
    main(["--config", str(tiny_config), "--output-dir", str(out)])
    return out


@pytest.fixture(scope="session")
def trained(tiny_config, tiny_cache, tmp_path_factory):
    """A tiny multi-task model trained on the tiny cache (once per session): (run folder, summary)."""
    from abr import train_abr

    out = tmp_path_factory.mktemp("abr_train")
    summary = train_abr.main(["--config", str(tiny_config), "--data", str(tiny_cache), "--output-dir", str(out)])
    return out, summary


@pytest.fixture(scope="session", autouse=True)
def one_torch_thread():
    """The tests' tensors are tiny: one thread avoids OpenMP spin-waiting on a shared 2-core CPU."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
