"""Whole-set metrics against scikit-learn and hand-computed tables; temperature scaling."""

import numpy as np
import pytest
from sklearn import metrics as skm

from abr.evaluation import (
    binary_detection_metrics,
    class_prior_baselines,
    fit_temperature,
    rowwise_pearson,
    softmax,
    threshold_metrics,
)


def test_detection_metrics_match_sklearn():
    rng = np.random.default_rng(0)
    y = rng.random(500) < 0.7
    score = np.clip(y * 0.3 + rng.random(500) * 0.7, 0, 1)
    m = binary_detection_metrics(y, score, threshold=0.5)
    pred = score >= 0.5
    assert m["f1"] == pytest.approx(skm.f1_score(y, pred))
    assert m["precision"] == pytest.approx(skm.precision_score(y, pred))
    assert m["recall"] == pytest.approx(skm.recall_score(y, pred))
    assert m["auroc"] == pytest.approx(skm.roc_auc_score(y, score))
    tn, fp, fn, tp = skm.confusion_matrix(y, pred).ravel()
    assert m["false_peak_rate"] == pytest.approx(fp / (fp + tn))
    assert m["missed_peak_rate"] == pytest.approx(fn / (fn + tp))


def test_threshold_metrics_by_hand():
    true = np.array([10.0, 20.0, 30.0, 40.0, 110.0])
    pred = np.array([12.0, 27.0, 19.0, 40.0, np.nan])  # errors +2, +7, −11, 0; the last is ignored
    m = threshold_metrics(pred, true)
    assert m["n"] == 4
    assert m["mae"] == pytest.approx(5.0)
    assert m["within_5db"] == pytest.approx(0.5)
    assert m["within_10db"] == pytest.approx(0.75)
    assert m["over_rate"] == pytest.approx(0.25)
    assert m["under_rate"] == pytest.approx(0.25)
    assert m["r2"] == pytest.approx(skm.r2_score(true[:4], pred[:4]))


def test_rowwise_pearson_matches_numpy():
    rng = np.random.default_rng(1)
    a, b = rng.normal(size=(5, 40)), rng.normal(size=(5, 40))
    expected = [np.corrcoef(x, y)[0, 1] for x, y in zip(a, b)]
    np.testing.assert_allclose(rowwise_pearson(a, b), expected)


def test_temperature_scaling_recovers_the_generating_temperature():
    rng = np.random.default_rng(2)
    logits = rng.normal(scale=3.0, size=(4000, 5))
    probs = softmax(logits / 2.0)  # the labels follow a temperature of 2
    labels = np.array([rng.choice(5, p=p) for p in probs])
    assert fit_temperature(logits, labels) == pytest.approx(2.0, rel=0.1)


def test_class_prior_baseline_by_hand():
    train = np.array([0] * 8 + [1] * 2)
    test = np.array([0, 0, 0, 1])
    out = class_prior_baselines(train, test, 2, ["A", "B"], draws=10)
    # always "A": F1_A = 2·0.75/(1.75) = 0.857, F1_B = 0 → macro 0.4286
    assert out["majority_macro_f1"] == pytest.approx((2 * 0.75 / 1.75) / 2)
    assert out["majority_class"] == "A"


def test_threshold_sd_scale_recovers_the_generating_factor():
    """σ scaling: errors drawn with twice the model's σ give a fitted scale of 2 (maximum likelihood)."""
    from abr.unsure import fit_threshold_sd_scale

    rng = np.random.default_rng(0)
    sd = rng.uniform(2.0, 8.0, size=20000)
    error = np.abs(rng.normal(scale=2.0 * sd))
    assert fit_threshold_sd_scale(error, sd) == pytest.approx(2.0, rel=0.03)
    assert fit_threshold_sd_scale(np.append(error, np.nan), np.append(sd, 1.0)) == pytest.approx(2.0, rel=0.03)
    assert fit_threshold_sd_scale(np.array([np.nan]), np.array([3.0])) == 1.0  # no labelled ear: unchanged


def test_reported_threshold_sd_widens_only_unsure_ears():
    from abr.unsure import reported_threshold_sd

    sd = reported_threshold_sd(np.array([4.0, 4.0, 4.0]), 1.5, np.array([30.0, 30.0, 30.0]),
                               np.array([60.0, 60.0, np.nan]), np.array([False, True, True]))
    np.testing.assert_allclose(sd, [6.0, np.hypot(6.0, 30.0), 6.0])  # sure; unsure 30 dB apart; no classical
    off = reported_threshold_sd(np.array([4.0]), 1.5, np.array([30.0]), np.array([60.0]), np.array([True]),
                                widen=False)
    np.testing.assert_allclose(off, [6.0])
