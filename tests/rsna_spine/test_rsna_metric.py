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


def test_normalized_mode_normalizes_rows_first_including_any_severe():
    sol, sub = tables()
    scaled = sub.copy()
    factors = np.array([2.0, 10.0, 0.5, 3.0, 1.0, 7.0])
    scaled[["normal_mild", "moderate", "severe"]] *= factors[:, None]
    assert score(sol, scaled, "row_id", 1.0, mode="normalized") == pytest.approx(EXPECTED, rel=1e-9)
    # the any_severe term must see the normalized severe probability (0.6 of [0.4, 0.4, 1.2] → 0.6)
    details = score_details(sol, scaled, "row_id", 1.0, mode="normalized")
    assert details["any_severe_spinal"] == pytest.approx(ANY_SEVERE, rel=1e-9)


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


def test_no_severe_study_scores_in_normalized_mode_and_raises_in_official_mode():
    rows = [("5_spinal_canal_stenosis_l1_l2", 0, [0.8, 0.1, 0.1]), ("5_spinal_canal_stenosis_l2_l3", 1, [0.3, 0.6, 0.1])]
    sol, sub = tables(rows)
    with pytest.raises(ParticipantVisibleError, match="only one"):  # scikit-learn's log_loss raises there
        score_details(sol, sub, "row_id", 1.0)
    details = score_details(sol, sub, "row_id", 1.0, mode="normalized")
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
@pytest.mark.parametrize("mode", ["official", "normalized"])
def test_bad_submissions_raise_clear_errors(change, message, mode):
    sol, sub = tables()
    if message == "sums to 0" and mode == "official":
        return  # the official code scores an all-zero row (test_official_all_zero_row_scores_as_uniform)
    with pytest.raises(ParticipantVisibleError, match=message):
        score(sol, change(sub).reset_index(drop=True), "row_id", 1.0, mode=mode)


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
        losses[name] = score_details(sol, sub, "row_id", 1.0, mode="normalized")["foraminal"]
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


# ----------------------------------------------------------------- official mode: the published code's edge cases
EPS = float(np.finfo(np.float64).eps)  # scikit-learn 1.2 log_loss(eps="auto") for float64 predictions


def one_study(preds, truths=(2, 0, 0, 0, 0)):
    """Five spinal rows of study 7 (truth classes ``truths``) + one foraminal and one subarticular row."""
    levels = ["l1_l2", "l2_l3", "l3_l4", "l4_l5", "l5_s1"]
    rows = [(f"7_spinal_canal_stenosis_{lv}", t, p) for lv, t, p in zip(levels, truths, preds[:5])]
    rows += [("7_left_neural_foraminal_narrowing_l1_l2", 0, preds[5]), ("7_left_subarticular_stenosis_l1_l2", 1, preds[6])]
    # a second study without a severe spinal row, so the any-severe term has both labels
    rows += [("8_spinal_canal_stenosis_l1_l2", 0, [0.5, 0.25, 0.25])]
    return tables(rows)


def test_official_mode_equals_hand_values_and_sklearn_on_normalized_rows():
    sol, sub = tables()
    assert score(sol, sub, "row_id", 1.0) == pytest.approx(EXPECTED, rel=1e-9)
    for mode in ("official", "normalized"):
        d = score_details(sol, sub, "row_id", 1.0, mode=mode)
        assert d["mode"] == mode and d["score"] == pytest.approx(EXPECTED, rel=1e-12)


def test_official_unnormalized_rows_are_clipped_before_normalizing():
    """scikit-learn 1.2 clips to [eps, 1 − eps] first, then divides by the row sum: [2, 10, 0.5] → [0.4, 0.4, 0.2];
    rows below 1 are plainly normalized ([0.1, 0.1, 0.2] → [0.25, 0.25, 0.5]) but any_severe takes the raw 0.2."""
    preds = [[0.1, 0.1, 0.2]] + [[0.7, 0.2, 0.1]] * 4 + [[2.0, 10.0, 0.5], [0.2, 0.2, 0.1]]
    sol, sub = one_study(preds)
    d = score_details(sol, sub, "row_id", 1.0)
    spinal = (4 * -math.log(0.5) + 1 * -math.log(0.7) * 4 + 1 * -math.log(0.5)) / (4 + 4 + 1)
    assert d["spinal"] == pytest.approx(spinal, rel=1e-9)
    assert d["foraminal"] == pytest.approx(-math.log(0.4), rel=1e-9)  # normalize first would give 1/12.5
    assert d["subarticular"] == pytest.approx(-math.log(0.4), rel=1e-9)
    # study 7: severe, raw max severe 0.2, weight 4; study 8: not severe, 0.25, weight 1
    assert d["any_severe_spinal"] == pytest.approx((4 * -math.log(0.2) + -math.log(0.75)) / 5, rel=1e-9)
    norm = score_details(sol, sub, "row_id", 1.0, mode="normalized")
    assert norm["foraminal"] == pytest.approx(-math.log(2.0 / 12.5), rel=1e-9)
    assert norm["any_severe_spinal"] == pytest.approx((4 * -math.log(0.5) + -math.log(0.75)) / 5, rel=1e-9)


def test_official_all_zero_row_scores_as_uniform_and_its_severe_as_eps():
    preds = [[0.0, 0.0, 0.0]] + [[0.7, 0.2, 0.1]] * 4 + [[0.6, 0.3, 0.1], [0.0, 0.0, 0.0]]
    sol, sub = one_study(preds, truths=(0, 0, 0, 0, 0))
    sol.loc[sol["row_id"] == "8_spinal_canal_stenosis_l1_l2", ["normal_mild", "severe", "sample_weight"]] = [0, 1, 4]
    d = score_details(sol, sub, "row_id", 1.0)
    assert d["subarticular"] == pytest.approx(math.log(3.0), rel=1e-9)
    assert d["spinal"] == pytest.approx((math.log(3.0) - 4 * math.log(0.7) - 4 * math.log(0.25)) / 9, rel=1e-9)
    # study 7: not severe, raw max severe 0.1 (the zero row clips to eps), weight 1; study 8: severe, 0.25, weight 4
    assert d["any_severe_spinal"] == pytest.approx((-math.log(0.9) - 4 * math.log(0.25)) / 5, rel=1e-9)
    with pytest.raises(ParticipantVisibleError, match="sums to 0"):
        score_details(sol, sub, "row_id", 1.0, mode="normalized")


def test_official_exact_zero_on_the_true_class_costs_log_eps():
    preds = [[1.0, 0.0, 0.0]] + [[0.7, 0.3, 0.0]] * 4 + [[0.6, 0.3, 0.1], [0.5, 0.5, 0.0]]
    sol, sub = one_study(preds)
    for eps in (EPS, 1e-15):  # scikit-learn 1.2+ (auto) and the older fixed 1e-15
        d = score_details(sol, sub, "row_id", 1.0, eps=eps)
        first = -math.log(eps / (1.0 - eps + 2 * eps))  # [1 − eps, eps, eps] renormalized, truth severe
        normal = -math.log(0.7 / (1.0 + eps))
        assert d["spinal"] == pytest.approx((4 * first + 4 * normal - math.log(0.5)) / 9, rel=1e-9)
        assert d["subarticular"] == pytest.approx(-math.log(0.5 / (1 + eps)), rel=1e-9)
        # study 7: severe, every raw severe value 0 → clipped to eps, weight 4; study 8: 0.25, weight 1
        assert d["any_severe_spinal"] == pytest.approx((4 * -math.log(eps) - math.log(0.75)) / 5, rel=1e-9)
    assert first == pytest.approx(34.539, abs=1e-3) and -math.log(EPS) == pytest.approx(36.044, abs=1e-3)


def test_official_missing_and_extra_rows():
    sol, sub = tables()
    with pytest.raises(ParticipantVisibleError, match="lacks 1 row.*2_left_subarticular"):
        score(sol, sub.iloc[:-1], "row_id", 1.0)
    extra = pd.concat([sub, pd.DataFrame([{"row_id": "9_spinal_canal_stenosis_l1_l2", "normal_mild": 1.0,
                                           "moderate": 0.0, "severe": 0.0}])], ignore_index=True)
    assert score(sol, extra, "row_id", 1.0) == pytest.approx(EXPECTED, rel=1e-9)  # extra rows are ignored
    with pytest.raises(ValueError, match="mode must be"):
        score(sol, sub, "row_id", 1.0, mode="kaggle")
