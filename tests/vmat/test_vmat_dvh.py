"""DVH metrics, constraint checks and the OpenKBP scores against hand-computed values."""

import numpy as np
import pytest

from vmat.dvh import (
    DEFAULT_CONSTRAINTS,
    check_constraints,
    conformity_indices,
    cumulative_dvh,
    dose_at_volume_cc,
    dose_at_volume_percent,
    homogeneity_index,
    metric_value,
    structure_metrics,
    volume_at_dose_percent,
)
from vmat.scores import openkbp_dose_score, openkbp_dvh_metrics, openkbp_scores

DOSES = np.arange(1.0, 11.0)  # ten voxels receiving 1..10 Gy


@pytest.mark.parametrize("percent, expected", [(100, 1.0), (95, 1.0), (90, 2.0), (50, 6.0), (10, 10.0), (2, 10.0), (25, 8.0)])
def test_dose_at_volume_percent(percent, expected):
    # hottest ceil(x% of 10) voxels: 95 % -> 10 voxels -> 1 Gy; 50 % -> 5 voxels (10..6) -> 6 Gy
    assert dose_at_volume_percent(DOSES, percent) == expected


@pytest.mark.parametrize("cc, voxel_cc, expected", [(0.1, 0.1, 10.0), (0.25, 0.1, 8.0), (0.05, 0.1, 10.0), (5.0, 0.1, 1.0)])
def test_dose_at_cc(cc, voxel_cc, expected):
    assert dose_at_volume_cc(DOSES, cc, voxel_cc) == expected


@pytest.mark.parametrize("dose, expected", [(0.0, 100.0), (5.0, 60.0), (5.5, 50.0), (10.0, 10.0), (10.5, 0.0)])
def test_volume_at_dose(dose, expected):
    assert volume_at_dose_percent(DOSES, dose) == pytest.approx(expected)


def test_cumulative_dvh_and_indices():
    edges, volume = cumulative_dvh(DOSES, bin_width_gy=1.0)
    assert edges[:3].tolist() == [0.0, 1.0, 2.0] and volume[:3].tolist() == [100.0, 100.0, 90.0]
    assert volume[10] == pytest.approx(10.0)
    # HI = (D2 - D98) / D50 = (10 - 1) / 6
    assert homogeneity_index(DOSES) == pytest.approx(9 / 6)
    dose = np.zeros((1, 4, 4))
    dose[0, :2, :2] = 70.0  # 4 voxels at Rx
    dose[0, 2, 0] = 70.0  # 1 more outside the target
    target = np.zeros((1, 4, 4), bool)
    target[0, :2, :3] = True  # 6 target voxels, 4 covered
    ci = conformity_indices(dose, target, np.ones_like(target), 70.0)
    assert ci["ci_rtog"] == pytest.approx(5 / 6) and ci["ci_paddick"] == pytest.approx(4**2 / (6 * 5))


@pytest.mark.parametrize("metric, expected", [("V5Gy", 60.0), ("D50%", 6.0), ("D0.2cc", 9.0), ("Dmean", 5.5),
                                              ("D0.03cc", 10.0), ("Dmin", 1.0), ("Dmax_point", 10.0)])
def test_metric_value(metric, expected):
    assert metric_value(DOSES, metric, voxel_cc=0.1) == pytest.approx(expected)
    # the same with explicit equal weights (the sub-voxel path)
    assert metric_value(DOSES, metric, voxel_cc=0.1, weights=np.full(10, 0.1)) == pytest.approx(expected)


def test_bare_dmax_is_refused_with_the_icru83_names():
    with pytest.raises(ValueError, match="D0.03cc.*Dmax_point"):
        metric_value(DOSES, "Dmax", voxel_cc=0.1)


def test_metric_value_rejects_unknown_metric():
    with pytest.raises(ValueError, match="unknown DVH metric 'V50'"):
        metric_value(DOSES, "V50", 0.1)


def test_constraints_pass_fail():
    masks = np.zeros((2, 1, 1, 10), np.uint8)
    masks[0, 0, 0, :] = 1  # Rectum: 10 voxels
    masks[1, 0, 0, :4] = 1  # PTV70: 4 voxels
    dose = np.zeros((1, 1, 10))
    dose[0, 0, :] = [72, 71, 69, 66, 61, 55, 40, 30, 20, 10]
    rows = check_constraints(dose, masks, ["Rectum", "PTV70"], DEFAULT_CONSTRAINTS, {"PTV70": 70.0}, 70.0, (1, 1, 1))
    table = {(r["structure"], r["metric"]): r for r in rows}
    # rectum: V50 = 60 % (fails < 50), V60 = 50 % (fails < 35), V70 = 20 % (fails < 20), V75 = 0 % (passes)
    assert table[("Rectum", "V50Gy")]["value"] == 60.0 and not table[("Rectum", "V50Gy")]["passed"]
    assert not table[("Rectum", "V70Gy")]["passed"] and table[("Rectum", "V75Gy")]["passed"]
    # PTV70 doses 72, 71, 69, 66: D95 = 66 Gy < 66.5 Gy (95 % Rx): fails; D2 = 72 < 74.9: passes
    assert table[("PTV70", "D95%")]["limit"] == pytest.approx(66.5) and not table[("PTV70", "D95%")]["passed"]
    assert table[("PTV70", "D2%")]["passed"]
    assert ("Bladder", "V65Gy") not in table  # absent structures are not judged
    with pytest.raises(ValueError, match="lacks 'op'"):
        check_constraints(dose, masks, ["Rectum", "PTV70"], [{"structure": "Rectum", "metric": "V50Gy", "value": 1}],
                          {}, 70.0, (1, 1, 1))


def test_structure_metrics_targets_and_oars():
    dose = np.arange(1.0, 11.0).reshape(1, 1, 10)
    masks = np.ones((2, 1, 1, 10), np.uint8)
    out = structure_metrics(dose, masks, ["PTV70", "Rectum"], {"PTV70": 10.0}, (10.0, 10.0, 1.0), body=np.ones((1, 1, 10)))
    assert out["PTV70"]["D95%"] == 1.0 and out["PTV70"]["D2%"] == 10.0 and out["PTV70"]["V95%Rx"] == 10.0
    assert out["Rectum"]["Dmean"] == 5.5 and out["Rectum"]["D0.03cc"] == 10.0 and "Dmax" not in out["Rectum"]
    assert out["Rectum"]["D95%"] == 1.0 and out["Rectum"]["D2%"] == 10.0 and "HI" not in out["Rectum"]
    assert out["PTV70"]["D99%"] == 1.0 and out["PTV70"]["Dmax_point"] == 10.0


def test_openkbp_scores_hand_made():
    ref = np.zeros((1, 2, 4))
    ref[0, 0] = [0, 10, 20, 30]
    ref[0, 1] = [60, 70, 70, 80]
    pred = ref.copy()
    pred[0, 0] += 2.0  # +2 Gy on the OAR row
    pred[0, 1, 0] -= 4.0
    body = np.zeros_like(ref)
    body[0, :, 1:] = 1  # 6 voxels, though the error sum runs over the whole grid
    assert openkbp_dose_score(ref, pred, body) == pytest.approx((4 * 2.0 + 4.0) / 6)
    masks = np.zeros((2, 1, 2, 4), bool)
    masks[0, 0, 0] = True  # Brainstem (OAR)
    masks[1, 0, 1] = True  # PTV70
    names = ["Brainstem", "PTV70"]
    voxel = (10.0, 10.0, 1.0)  # 100 mm^3: 1 voxel per 0.1 cc
    m = openkbp_dvh_metrics(ref, masks, names, voxel)
    # D_0.1cc = percentile(100 - 1/4*100 = 75) of [0, 10, 20, 30] = 22.5 (numpy linear); mean 15
    assert m[("D_0.1_cc", "Brainstem")] == pytest.approx(22.5) and m[("mean", "Brainstem")] == 15.0
    # targets: D99 = percentile 1, D95 = percentile 5, D1 = percentile 99 of [60, 70, 70, 80]
    assert m[("D_99", "PTV70")] == pytest.approx(60.3) and m[("D_95", "PTV70")] == pytest.approx(61.5)
    assert m[("D_1", "PTV70")] == pytest.approx(79.7)
    scores = openkbp_scores([{"reference": ref, "prediction": pred, "possible_dose_mask": body, "masks": masks,
                              "names": names, "voxel_dims_mm": voxel}])
    pm = openkbp_dvh_metrics(pred, masks, names, voxel)
    expected_dvh = np.mean([abs(pm[k] - m[k]) for k in m])
    assert scores["dose_score"] == pytest.approx(2.0) and scores["dvh_score"] == pytest.approx(expected_dvh)
    assert scores["n_dvh_terms"] == 5
    # the OAR metrics shift by exactly 2 Gy; D99 of [56, 70, 70, 80] = 56.42 vs 60.3
    assert abs(pm[("mean", "Brainstem")] - m[("mean", "Brainstem")]) == pytest.approx(2.0)
    with pytest.raises(ValueError, match="possible_dose_mask is empty"):
        openkbp_dose_score(ref, pred, np.zeros_like(ref))
