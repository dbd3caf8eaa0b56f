"""The official RSNA 2024 metric against hand-computed values on small tables."""

import math

import numpy as np
import pandas as pd
import pytest
import sklearn.metrics

from rsna_spine.metric import (
    ParticipantVisibleError,
    class_priors,
    prior_probabilities,
    reweight_probabilities,
    score,
    score_details,
    solution_from_labels,
)

# (row_id, true class, prediction): two studies, every condition group represented
ROWS = [
    ("1_spinal_canal_stenosis_l1_l2", 0, [0.5, 0.3, 0.2]),
    ("1_spinal_canal_stenosis_l2_l3", 2, [0.2, 0.2, 0.6]),
    ("2_spinal_canal_stenosis_l1_l2", 1, [0.25, 0.5, 0.25]),
    ("1_left_neural_foraminal_narrowing_l4_l5", 1, [0.2, 0.7, 0.1]),
    ("1_right_subarticular_stenosis_l5_s1", 0, [0.9, 0.05, 0.05]),
    ("2_left_subarticular_stenosis_l3_l4", 2, [0.1, 0.1, 0.8]),
]
# by hand: weights 1 / 2 / 4 for normal_mild / moderate / severe
SPINAL = (1 * -math.log(0.5) + 4 * -math.log(0.6) + 2 * -math.log(0.5)) / 7
FORAMINAL = -math.log(0.7)
SUBARTICULAR = (1 * -math.log(0.9) + 4 * -math.log(0.8)) / 5
# study 1: a severe spinal level, max severe prob 0.6, weight max(1, 4) = 4; study 2: none, 0.25, weight 2
ANY_SEVERE = (4 * -math.log(0.6) + 2 * -math.log(1 - 0.25)) / 6
EXPECTED = (SPINAL + FORAMINAL + SUBARTICULAR + ANY_SEVERE) / 4


def tables(rows=ROWS):
    sol = pd.DataFrame({"row_id": [r[0] for r in rows]})
    onehot = np.eye(3)[[r[1] for r in rows]]
    for j, name in enumerate(["normal_mild", "moderate", "severe"]):
        sol[name] = onehot[:, j]
    sol["sample_weight"] = onehot @ np.array([1.0, 2.0, 4.0])
    sub = pd.DataFrame({"row_id": [r[0] for r in rows]})
    pred = np.array([r[2] for r in rows])
    for j, name in enumerate(["normal_mild", "moderate", "severe"]):
        sub[name] = pred[:, j]
    return sol, sub


def test_score_matches_hand_computed_terms():
    sol, sub = tables()
    details = score_details(sol, sub, "row_id", 1.0)
    assert details["spinal"] == pytest.approx(SPINAL, rel=1e-9)
    assert details["foraminal"] == pytest.approx(FORAMINAL, rel=1e-9)
    assert details["subarticular"] == pytest.approx(SUBARTICULAR, rel=1e-9)
    assert details["any_severe_spinal"] == pytest.approx(ANY_SEVERE, rel=1e-9)
    assert score(sol, sub, "row_id", 1.0) == pytest.approx(EXPECTED, rel=1e-9)


def test_any_severe_scalar_weights_the_fourth_term():
    sol, sub = tables()
    expected = (SPINAL + FORAMINAL + SUBARTICULAR + 2.0 * ANY_SEVERE) / 5.0
    assert score(sol, sub, "row_id", 2.0) == pytest.approx(expected, rel=1e-9)
    assert score(sol, sub, "row_id", 0.0) == pytest.approx((SPINAL + FORAMINAL + SUBARTICULAR) / 3, rel=1e-9)


def test_unnormalized_rows_are_normalized_first_including_any_severe():
    sol, sub = tables()
    scaled = sub.copy()
    factors = np.array([2.0, 10.0, 0.5, 3.0, 1.0, 7.0])
    scaled[["normal_mild", "moderate", "severe"]] *= factors[:, None]
    assert score(sol, scaled, "row_id", 1.0) == pytest.approx(EXPECTED, rel=1e-9)
    # the any_severe term must see the normalized severe probability (0.6 of [0.4, 0.4, 1.2] → 0.6)
    assert score_details(sol, scaled, "row_id", 1.0)["any_severe_spinal"] == pytest.approx(ANY_SEVERE, rel=1e-9)


def test_rows_matched_by_id_not_position_and_untruthed_rows_not_scored():
    sol, sub = tables()
    shuffled = sub.sample(frac=1.0, random_state=3).reset_index(drop=True)
    extra_sol = pd.concat([sol, pd.DataFrame([{"row_id": "2_spinal_canal_stenosis_l5_s1", "normal_mild": np.nan,
                                               "moderate": np.nan, "severe": np.nan, "sample_weight": np.nan}])])
    extra_sub = pd.concat([shuffled, pd.DataFrame([{"row_id": "2_spinal_canal_stenosis_l5_s1", "normal_mild": 0.0,
                                                    "moderate": 0.0, "severe": 1.0}])])
    assert score(extra_sol, extra_sub, "row_id", 1.0) == pytest.approx(EXPECTED, rel=1e-9)


def test_sample_weight_derived_when_absent_and_sklearn_cross_check():
    sol, sub = tables()
    no_weight = sol.drop(columns="sample_weight")
    assert score(no_weight, sub, "row_id", 1.0) == pytest.approx(EXPECTED, rel=1e-9)
    sel = sol["row_id"].str.contains("subarticular")
    direct = sklearn.metrics.log_loss(sol.loc[sel, ["normal_mild", "moderate", "severe"]].to_numpy(),
                                      sub.loc[sel, ["normal_mild", "moderate", "severe"]].to_numpy(),
                                      sample_weight=sol.loc[sel, "sample_weight"])
    assert score_details(sol, sub, "row_id", 1.0)["subarticular"] == pytest.approx(direct, rel=1e-12)


def test_no_severe_study_still_scores():
    rows = [("5_spinal_canal_stenosis_l1_l2", 0, [0.8, 0.1, 0.1]), ("5_spinal_canal_stenosis_l2_l3", 1, [0.3, 0.6, 0.1])]
    sol, sub = tables(rows)
    details = score_details(sol, sub, "row_id", 1.0)
    # any_severe: label 0, prediction max(0.1, 0.1), weight max(1, 2) = 2
    assert details["any_severe_spinal"] == pytest.approx(-math.log(0.9), rel=1e-9)
    assert math.isnan(details["foraminal"])
    spinal = (1 * -math.log(0.8) + 2 * -math.log(0.6)) / 3
    assert details["score"] == pytest.approx((spinal - math.log(0.9)) / 2, rel=1e-9)


@pytest.mark.parametrize("change, message", [
    (lambda s: s.iloc[:-1], "lacks 1 row"),
    (lambda s: s.assign(moderate=s["moderate"].where(s.index != 0, -0.1)), "at least zero"),
    (lambda s: s.assign(severe=s["severe"].where(s.index != 1, np.nan)), "finite"),
    (lambda s: s.assign(normal_mild=0.0, moderate=0.0, severe=s["severe"] * 0), "sums to 0"),
    (lambda s: pd.concat([s, s.iloc[:1]]), "duplicate"),
    (lambda s: s.drop(columns="severe"), "lacks column"),
])
def test_bad_submissions_raise_clear_errors(change, message):
    sol, sub = tables()
    with pytest.raises(ParticipantVisibleError, match=message):
        score(sol, change(sub).reset_index(drop=True), "row_id", 1.0)


def test_reweighting_from_training_weights_to_metric_weights():
    p = np.array([[0.5, 0.3, 0.2]])
    q = reweight_probabilities(p, [1.0, 4.0, 6.0])  # q ∝ p · [1, 2, 4] / [1, 4, 6]
    expected = np.array([0.5, 0.3 * 0.5, 0.2 * 4 / 6])
    np.testing.assert_allclose(q[0], expected / expected.sum(), rtol=1e-12)
    np.testing.assert_allclose(reweight_probabilities(p, [2.0, 4.0, 8.0]), p, rtol=1e-12)  # proportional: identity


def test_metric_optimal_constant_beats_the_plain_prior():
    """Under the weighted loss the best constant is q ∝ w·p, not p (notes/rsna_spine.md)."""
    labels = np.array([0] * 70 + [1] * 20 + [2] * 10)
    rows = [(f"{i}_foraminal_narrowing_l1_l2".replace("foraminal", "left_neural_foraminal"), int(y), [0, 0, 0])
            for i, y in enumerate(labels)]
    sol, _ = tables(rows)
    p = np.bincount(labels) / len(labels)
    w = np.array([1.0, 2.0, 4.0])
    losses = {}
    for name, q in {"prior": p, "weighted": w * p / (w * p).sum()}.items():
        sub = pd.DataFrame({"row_id": sol["row_id"], "normal_mild": q[0], "moderate": q[1], "severe": q[2]})
        losses[name] = score_details(sol, sub, "row_id", 1.0)["foraminal"]
    assert losses["weighted"] < losses["prior"]
    # and it equals the weighted entropy: −Σ w_c p_c log q_c / Σ w_c p_c
    q = w * p / (w * p).sum()
    assert losses["weighted"] == pytest.approx(-(w * p * np.log(q)).sum() / (w * p).sum(), rel=1e-9)


def test_class_priors_and_solution_from_labels():
    labels = pd.DataFrame({"study_id": [1, 2, 3, 4], "condition": ["spinal_canal_stenosis"] * 4,
                           "level": ["l1_l2"] * 4, "label": [0, 0, 2, -1]})
    priors = class_priors(labels, by="condition_level", smoothing=1.0)
    np.testing.assert_allclose(priors["spinal_canal_stenosis|l1_l2"], [3 / 6, 1 / 6, 2 / 6])
    q = prior_probabilities("spinal_canal_stenosis", "l1_l2", priors, metric_optimal=True)
    np.testing.assert_allclose(q, np.array([3, 2, 8]) / 13)
    sol = solution_from_labels(labels)
    assert sol["row_id"].tolist()[0] == "1_spinal_canal_stenosis_l1_l2"
    assert sol["sample_weight"].tolist()[:3] == [1.0, 1.0, 4.0] and np.isnan(sol["sample_weight"].iloc[3])
