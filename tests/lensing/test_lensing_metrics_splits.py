"""Bologna metrics on hand-made score lists, and stratified splits on tiny catalogues."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from lensing.metrics import (
    bologna_metrics,
    bootstrap_comparison,
    calibration,
    per_survey_metrics,
    rate_metric_name,
    stratified_curve,
)
from lensing.splits import SplitError, balance_report, merged_strata, stratified_split

# label, score: sorted by score the sequence is L L N L L L N ...
HAND = [
    # (labels, scores, tpr0, tpr10, note)
    ([1, 1, 0, 1, 0], [0.9, 0.8, 0.7, 0.6, 0.1], 2 / 3, 1.0, "two lenses before the first non-lens"),
    ([1, 0, 1], [0.9, 0.9, 0.2], 0.0, 1.0, "a lens tied with a non-lens cannot be counted without it"),
    ([0, 1, 1], [0.95, 0.9, 0.8], 0.0, 1.0, "the top score is a non-lens: TPR0 = 0"),
    ([1, 1, 1, 0], [0.5, 0.5, 0.4, 0.5], 0.0, 1.0, "ties at 0.5 include the non-lens: no clean threshold"),
    ([1, 1, 1, 0], [0.6, 0.5, 0.5, 0.5], 1 / 3, 1.0, "only the untied top lens is clean"),
]


@pytest.mark.parametrize("labels,scores,tpr0,tpr10,note", HAND)
def test_tpr0_and_tpr10_hand_cases(labels, scores, tpr0, tpr10, note):
    m = bologna_metrics(labels, scores)
    assert m["tpr0"] == pytest.approx(tpr0), note
    assert m["tpr10"] == pytest.approx(tpr10), note


def test_tpr10_counts_fewer_than_ten_false_positives():
    """20 lenses interleaved with 30 non-lenses: exactly i non-lenses score above lens i.

    With at most 9 false positives the threshold can sit just above the 10th non-lens: lenses 0..9 pass
    (TPR10 = 10/20); TPR0 keeps only lens 0 (1/20). As rates, 9 FP of 30 is FPR 0.3, so TPR at FPR ≤ 0.1
    (3 FP) is 4/20 — a different number, which is why the names differ.
    """
    labels, scores = [], []
    for i in range(30):
        if i < 20:
            labels.append(1)
            scores.append(100 - 2 * i)
        labels.append(0)
        scores.append(99 - 2 * i)
    m = bologna_metrics(labels, scores)
    assert m["tpr0"] == pytest.approx(1 / 20)
    assert m["tpr10"] == pytest.approx(10 / 20)
    assert m[rate_metric_name(0.1)] == pytest.approx(4 / 20)
    assert m["n_lenses"] == 20 and m["n_nonlenses"] == 30
    assert set(m) >= {"auroc", "tpr_at_fpr_rate_0.1", "tpr_at_fpr_rate_0.01", "tpr_at_fpr_rate_0.001"}


def test_unknown_labels_are_ignored_and_nan_scores_rejected():
    m = bologna_metrics([1, 0, -1], [0.9, 0.1, 0.95])
    assert m["tpr0"] == 1.0 and m["n_lenses"] == 1 and m["n_nonlenses"] == 1
    with pytest.raises(ValueError, match="NaN"):
        bologna_metrics([1, 0], [float("nan"), 0.2])


def test_stratified_curve_keeps_all_nonlenses():
    labels = np.array([1, 1, 1, 0, 0, 0])
    scores = np.array([0.9, 0.2, 0.6, 0.5, 0.1, 0.3])
    area = np.array([3.0, 0.5, 2.0, 0.0, 0.0, 0.0])  # non-lenses have no Einstein area
    rows = stratified_curve(labels, scores, area, thresholds=[0.0, 1.0, 2.5])
    assert [r["n_nonlenses"] for r in rows] == [3, 3, 3]
    assert [r["n_lenses"] for r in rows] == [3, 2, 1]
    assert rows[1]["auroc"] == pytest.approx(1.0)  # the faint lens (0.2) dropped: perfect separation
    assert rows[0]["auroc"] == pytest.approx(7 / 9)


def test_per_survey_metrics_warn_on_domain_shift():
    lines = []
    labels = [1, 0, 1, 0, 1, 0, 1, 0]
    scores = [0.9, 0.1, 0.8, 0.2, 0.1, 0.9, 0.2, 0.8]
    surveys = ["euclid_vis"] * 4 + ["kids"] * 4
    out = per_survey_metrics(labels, scores, surveys, lines.append)
    assert out["euclid_vis"]["auroc"] == 1.0 and not out["euclid_vis"]["domain_shift_warning"]
    assert out["kids"]["auroc"] == 0.0 and out["kids"]["domain_shift_warning"]
    assert len(lines) == 1 and "kids" in lines[0]


def test_domain_shift_warning_only_for_surveys_not_trained_on():
    """Both surveys score AUROC 0: the one trained on is flagged as weak, only the other as a domain shift."""
    lines = []
    labels = [1, 0, 1, 0] * 2
    scores = [0.1, 0.9, 0.2, 0.8] * 2
    surveys = ["euclid_vis"] * 4 + ["kids"] * 4
    out = per_survey_metrics(labels, scores, surveys, lines.append, trained_surveys=["euclid_vis"])
    assert not out["euclid_vis"]["domain_shift_warning"] and out["euclid_vis"]["low_auroc_in_training_survey"]
    assert out["kids"]["domain_shift_warning"] and not out["kids"]["trained_on"]
    assert [("WARNING" in line, "kids" in line) for line in lines] == [(False, False), (True, True)]


def test_calibration_perfect_and_overconfident():
    assert calibration([1, 0, 1, 0], [1.0, 0.0, 1.0, 0.0])["ece"] == pytest.approx(0.0)
    assert calibration([1, 0], [0.0, 1.0])["ece"] == pytest.approx(1.0)


def _catalog(n, seed=0, surveys=("euclid_vis", "kids", "hsc")):
    rng = np.random.default_rng(seed)
    survey = rng.choice(surveys, n)
    return pd.DataFrame({
        "label": rng.integers(0, 2, n), "survey": survey, "z_phot": rng.uniform(0.1, 1.0, n),
        "magnitude": rng.uniform(18, 24, n), "seeing": np.where(survey == "kids", 0.7, rng.uniform(0.1, 0.8, n)),
        "psf_fwhm": rng.uniform(0.1, 1.0, n), "pixel_scale": np.where(survey == "kids", 0.2, 0.101),
    })


@pytest.mark.parametrize("n,seed", [(6, 0), (9, 1), (13, 2), (40, 3), (300, 4)])
def test_seven_factor_splits_are_valid_on_tiny_catalogs(n, seed):
    df = _catalog(n, seed)
    fractions = {"train": 0.6, "val": 0.2, "test": 0.2}
    split, strata = stratified_split(df, fractions, seed=seed)
    assert set(split) == {"train", "val", "test"}  # every split non-empty
    assert strata.value_counts().min() >= 3 or n < 3  # rare strata merged
    for name in fractions:  # both classes everywhere when there are enough of each
        for value in (0, 1):
            if (df["label"] == value).sum() >= 3:
                assert ((split == name) & (df["label"] == value)).any(), (name, value)
    sizes = split.value_counts()
    assert abs(sizes["train"] - 0.6 * n) <= max(2, 0.05 * n)
    again, _ = stratified_split(df, fractions, seed=seed)
    assert (again == split).all()  # reproducible


def test_balance_report_and_label_never_merged_away():
    df = _catalog(300, 5)
    split, strata = stratified_split(df, {"train": 0.7, "val": 0.15, "test": 0.15}, seed=0)
    report = balance_report(df, split)
    assert report["factors"]["label"]["max_abs_deviation"] < 0.05
    assert report["split_sizes"]["train"] == 210
    keys = merged_strata(df, ["label", "survey", "redshift", "magnitude", "seeing", "psf_fwhm", "pixel_scale"], 3)
    for key, group in df.groupby(keys):
        assert group["label"].nunique() == 1, key  # every stratum is pure in label


def test_split_errors_are_clear():
    with pytest.raises(SplitError, match="cannot fill"):
        stratified_split(_catalog(2), {"train": 0.5, "val": 0.25, "test": 0.25})
    with pytest.raises(ValueError, match="at most 7"):
        merged_strata(_catalog(10), ["label"] * 8, 3)
    with pytest.raises(KeyError, match="z_phot"):
        stratified_split(_catalog(10).drop(columns="z_phot"), {"train": 1.0})
    assert math.isnan(bologna_metrics([0, 0], [0.1, 0.2])["tpr0"])


def test_bootstrap_comparison_perfect_model_vs_useless_baseline_and_identical_scores():
    rng = np.random.default_rng(0)
    labels = np.array([1] * 40 + [0] * 60)
    perfect = labels + 0.01 * rng.random(100)  # every lens above every non-lens
    useless = rng.random(100)
    out = bootstrap_comparison(labels, perfect, useless, n_boot=100, seed=1)
    assert out["n_boot"] == 100 and out["auroc"]["model"] == pytest.approx([1.0, 1.0])
    assert out["tpr10"]["model"] == pytest.approx([1.0, 1.0])
    assert out["auroc"]["difference"][0] > 0.3 and out["auroc"]["baseline"][0] < 0.5 < out["auroc"]["baseline"][1]
    assert out["auroc"]["difference_point"] == pytest.approx(1 - bologna_metrics(labels, useless)["auroc"])
    same = bootstrap_comparison(labels, useless, useless, n_boot=50, seed=1)
    assert same["auroc"]["difference"] == pytest.approx([0.0, 0.0]) and same["tpr0"]["difference"] == pytest.approx([0.0, 0.0])
    assert bootstrap_comparison(labels, useless, useless, n_boot=50, seed=1) == same  # seeded
    assert bootstrap_comparison([0, 0], [0.1, 0.2], [0.3, 0.4])["n_boot"] == 0  # one class: no CI
