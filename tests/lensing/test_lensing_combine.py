"""The logistic stack of network and baseline (lensing/combine.py): fitted on the validation split only,
stored beside the checkpoint, and applied by validate_lensing.py exactly as the module computes it."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from common.config import ConfigError
from common.errors import InputError
from lensing import train_lensing, validate_lensing, validate_stream_lensing
from lensing.combine import STACK_FILE, apply_stack, fit_stack
from lensing.metrics import roc_auc

SMOKE = "configs/lensing/smoke.yaml"


def test_stack_uses_both_scores():
    rng = np.random.default_rng(0)
    y = np.repeat([0, 1], 400)
    a = y + rng.normal(0, 1, y.size)  # two independent noisy views of the label
    b = np.expm1(np.clip(2 + y + rng.normal(0, 1, y.size), 0, None))  # positive, heavy-tailed like the baseline
    stack = fit_stack(y, a, b)
    assert all(w > 0 for w in stack["weights"]) and stack["n_fit"] == 800
    assert roc_auc(y, apply_stack(stack, a, b)) > max(roc_auc(y, a), roc_auc(y, b)) + 0.03


def test_validate_fits_on_val_only_and_applies_the_stored_stack(dataset, tmp_path):
    folder, _ = dataset
    run = tmp_path / "run"
    train_lensing.main(["--config", SMOKE, "--data", str(folder), "--output-dir", str(run),
                        "--set", "train.max_steps_per_epoch=2"])
    common = ["--config", SMOKE, "--checkpoint", str(run), "--data", str(folder), "--set", "validate.figures=false",
              "--set", "validate.bootstrap=20"]
    with pytest.raises(ConfigError, match="validation split only"):  # the test split is never fitted on
        validate_lensing.main([*common, "--output-dir", str(tmp_path / "bad"),
                               "--set", "validate.combine_with_baseline=fit"])
    with pytest.raises(InputError, match="no fitted stack"):
        validate_lensing.main([*common, "--output-dir", str(tmp_path / "none"),
                               "--set", "validate.combine_with_baseline=apply"])
    fit = validate_lensing.main([*common, "--output-dir", str(tmp_path / "fit"), "--set", "validate.split=val",
                                 "--set", "validate.combine_with_baseline=fit"])
    stored = json.loads((run / STACK_FILE).read_text(encoding="utf-8"))
    assert stored["fitted_on"]["split"] == "val" and stored["checkpoints"][0]["file"] == "checkpoint_best.pt"
    val_scores = pd.read_csv(tmp_path / "fit" / "scores.csv")
    assert set(val_scores["split"]) == {"val"} and stored["n_fit"] == len(val_scores)
    refit = fit_stack(val_scores["label"], val_scores["logit"], val_scores["baseline_score"])
    assert np.allclose(refit["weights"], stored["weights"]) and fit["combined_logistic_stack"]["in_sample"]

    applied = validate_lensing.main([*common, "--output-dir", str(tmp_path / "apply"),
                                     "--set", "validate.combine_with_baseline=apply"])
    test_scores = pd.read_csv(tmp_path / "apply" / "scores.csv")
    assert set(test_scores["split"]) == {"test"}
    expected = apply_stack(stored, test_scores["logit"], test_scores["baseline_score"])
    assert np.allclose(test_scores["combined_score"], expected, atol=1e-6)
    assert applied["headline"]["combined_auroc"] == pytest.approx(roc_auc(test_scores["label"], expected))
    assert "combined:logistic_stack" in set(pd.read_csv(tmp_path / "apply" / "metrics.csv")["scope"])
    lo, hi = applied["headline"]["combined_auroc_ci95"]
    assert lo <= hi and not applied["combined_logistic_stack"]["in_sample"]

    stream = validate_stream_lensing.main(["--config", SMOKE, "--checkpoint", str(run), "--output-dir",
                                           str(tmp_path / "stream"), "--set", "validate.bootstrap=5",
                                           "--set", "validate.combine_with_baseline=apply"])
    streamed = pd.read_csv(tmp_path / "stream" / "scores.csv")
    assert np.allclose(streamed["combined_score"], apply_stack(stored, streamed["logit"], streamed["baseline_score"]))
    assert stream["headline"]["combined_tpr10"] == pytest.approx(
        stream["combined_logistic_stack"]["metrics"]["tpr10"])

    stale = {**stored, "checkpoints": [{**stored["checkpoints"][0], "step": stored["checkpoints"][0]["step"] + 1}]}
    (run / STACK_FILE).write_text(json.dumps(stale), encoding="utf-8")  # a stack of another training state
    with pytest.raises(InputError, match="fitted for checkpoints"):
        validate_lensing.main([*common, "--output-dir", str(tmp_path / "stale"),
                               "--set", "validate.combine_with_baseline=apply"])
