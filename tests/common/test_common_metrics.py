import math

import numpy as np
import pytest
from sklearn import metrics as skm

from common.metrics import (bland_altman, classification_metrics, expected_calibration_error, icc,
                            regression_metrics, reliability_curve, roc_auc, sigma_scale, tpr_at_fp_count, tpr_at_fpr,
                            win_rate)


def test_regression_metrics_hand_computed():
    true = np.array([1.0, 2.0, 3.0, 4.0])
    pred = np.array([2.0, 2.0, 2.0, 6.0])
    m = regression_metrics(pred, true)
    # errors 1, 0, -1, 2
    assert m["mae"] == pytest.approx(1.0)
    assert m["rmse"] == pytest.approx(np.sqrt(6 / 4))
    assert m["bias"] == pytest.approx(0.5)
    assert m["r2"] == pytest.approx(1 - 6 / 5)  # SS_tot = 5
    assert m["pearson_r"] == pytest.approx(np.corrcoef(pred, true)[0, 1])
    assert m["n"] == 4
    assert m["r2"] == pytest.approx(skm.r2_score(true, pred))


def test_regression_metrics_skip_non_finite_and_respect_mask():
    m = regression_metrics([1.0, np.nan, 5.0, 2.0], [1.0, 2.0, np.inf, 4.0], valid=[True, True, True, False])
    assert m["n"] == 1 and m["mae"] == 0.0


def test_bland_altman_hand_computed():
    out = bland_altman([2.0, 4.0, 6.0], [1.0, 2.0, 3.0])  # d = 1, 2, 3
    assert out["bias"] == pytest.approx(2.0)
    assert out["sd"] == pytest.approx(1.0)
    assert out["loa_low"] == pytest.approx(2 - 1.96) and out["loa_high"] == pytest.approx(2 + 1.96)


# Shrout & Fleiss (1979), Table 2: 6 targets rated by 4 judges; published ICC(2,1) = .29, ICC(3,1) = .71.
SHROUT_FLEISS = np.array([[9, 2, 5, 8], [6, 1, 3, 2], [8, 4, 6, 8], [7, 1, 2, 6], [10, 5, 6, 9], [6, 2, 4, 7]])


@pytest.mark.parametrize("kind, published", [("2,1", 0.29), ("3,1", 0.71)])
def test_icc_matches_shrout_fleiss(kind, published):
    assert icc(SHROUT_FLEISS, kind) == pytest.approx(published, abs=0.005)


def test_icc_absolute_agreement_penalizes_offset_consistency_does_not():
    rng = np.random.default_rng(0)
    truth = rng.normal(50, 10, size=200)
    pred = truth + 27.0  # a +27 bias: the original's "ICC 0.9999" was a consistency-type number
    table = np.c_[truth, pred]
    assert icc(table, "3,1") == pytest.approx(1.0)
    assert icc(table, "2,1") < 0.3


def test_icc_rejects_bad_shapes():
    with pytest.raises(ValueError, match="k >= 2"):
        icc(np.ones((5, 1)))


def test_win_rate_counts_strict_wins_and_ties():
    out = win_rate([1.0, 2.0, 3.0, np.nan], [2.0, 2.0, 5.0, 1.0], [1.0, 1.0, 4.0, 1.0])
    # errors A: 0, 1, 1 ; B: 1, 1, 1 → wins 1/3, ties 2/3 (NaN row dropped)
    assert out == {"win_rate": pytest.approx(1 / 3), "tie_rate": pytest.approx(2 / 3), "n": 3}


def test_classification_metrics_against_sklearn():
    rng = np.random.default_rng(1)
    y = rng.integers(0, 3, size=300)
    logits = rng.normal(size=(300, 3)) + 1.5 * np.eye(3)[y]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    m = classification_metrics(y, probs=probs, class_names=["a", "b", "c"])
    pred = probs.argmax(axis=1)
    assert m["balanced_accuracy"] == pytest.approx(skm.balanced_accuracy_score(y, pred))
    assert m["macro_f1"] == pytest.approx(skm.f1_score(y, pred, average="macro"))
    assert m["log_loss"] == pytest.approx(skm.log_loss(y, probs))
    assert m["confusion"] == skm.confusion_matrix(y, pred).tolist()
    assert m["per_class"]["b"]["recall"] == pytest.approx(skm.recall_score(y, pred, average=None)[1])


def test_classification_log_loss_renormalizes_rows():
    probs = np.array([[2.0, 1.0, 1.0], [1.0, 3.0, 0.0]])  # rows sum to 4
    m = classification_metrics([0, 1], probs=probs)
    assert m["log_loss"] == pytest.approx(-(np.log(0.5) + np.log(0.75)) / 2)


def test_expected_calibration_error_hand_computed():
    probs = np.array([[0.1, 0.9], [0.1, 0.9], [0.4, 0.6], [0.4, 0.6]])
    y = np.array([1, 0, 1, 1])  # confidence 0.9 bin: accuracy 0.5; 0.6 bin: accuracy 1.0
    assert expected_calibration_error(probs, y) == pytest.approx(0.5 * 0.4 + 0.5 * 0.4)
    curve = reliability_curve(probs, y, n_bins=10)
    assert sum(curve["count"]) == 4


def test_roc_auc_matches_sklearn_and_single_class_is_nan():
    y = np.array([0, 0, 1, 1, 0, 1])
    s = np.array([0.1, 0.4, 0.35, 0.8, 0.2, 0.9])
    assert roc_auc(y, s) == pytest.approx(skm.roc_auc_score(y, s))
    assert np.isnan(roc_auc([1, 1], [0.2, 0.3]))


# Scores sorted high to low: lens, lens, non-lens (tied with the second lens), lens, non-lens, lens.
Y = [1, 1, 0, 1, 0, 1]
S = [0.9, 0.8, 0.8, 0.7, 0.6, 0.5]


@pytest.mark.parametrize("max_fp, expected", [(0, 1 / 4), (1, 3 / 4), (2, 1.0)])
def test_tpr_at_fp_count_with_ties(max_fp, expected):
    assert tpr_at_fp_count(Y, S, max_fp) == pytest.approx(expected)


def test_tpr_at_fp_count_first_score_is_negative():
    assert tpr_at_fp_count([0, 1], [0.9, 0.1], 0) == 0.0


@pytest.mark.parametrize("max_fpr, expected", [(0.0, 1 / 4), (0.5, 3 / 4), (1.0, 1.0)])
def test_tpr_at_fpr_is_a_rate(max_fpr, expected):
    assert tpr_at_fpr(Y, S, max_fpr) == pytest.approx(expected)


def test_tpr_at_fpr_agrees_with_sklearn_roc_curve():
    rng = np.random.default_rng(3)
    y = rng.integers(0, 2, size=500)
    s = rng.normal(size=500) + y
    fpr, tpr, _ = skm.roc_curve(y, s)
    for limit in (0.01, 0.1, 0.3):
        assert tpr_at_fpr(y, s, limit) == pytest.approx(tpr[fpr <= limit].max())


@pytest.mark.parametrize("err, var, expected, n", [
    ([1.0, 2.0, -2.0], [1.0, 4.0, 1.0], math.sqrt(2.0), 3),  # s² = mean(1, 1, 4) = 2
    ([3.0, np.nan, 1.0, 5.0], [9.0, 1.0, np.inf, 0.0], 1.0, 1),  # only finite errors with finite σ² > 0
    ([np.nan], [1.0], 1.0, 0),  # nothing to fit: 1
])
def test_sigma_scale_is_the_maximum_likelihood_factor(err, var, expected, n):
    assert sigma_scale(np.array(err), np.array(var)) == (pytest.approx(expected), n)
