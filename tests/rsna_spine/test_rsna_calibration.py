"""Temperature scaling on the official metric (issue 14, item 6, part): by hand, against the slow scorer,
and on deliberately overconfident predictions."""

import numpy as np
import pandas as pd
import pytest

from rsna_spine.calibration import _Scorer, apply_temperature, apply_temperatures, cross_fitted, table_score
from rsna_spine.constants import CONDITIONS, LEVELS, row_id


def test_temperature_by_hand():
    p = np.array([[0.5, 0.3, 0.2]])
    np.testing.assert_allclose(apply_temperature(p, 1.0), p, rtol=1e-12)
    q = np.sqrt(p[0]) / np.sqrt(p[0]).sum()  # T = 2: q ∝ p^(1/2)
    np.testing.assert_allclose(apply_temperature(p, 2.0)[0], q, rtol=1e-12)


def overconfident_table(n_studies=40, power=2.5, seed=0):
    """Labels drawn from p; predictions (w·p)^power renormalized, w = [1, 2, 4]: the metric-optimal q ∝ w·p made
    overconfident, so the best temperature is ≈ power."""
    rng = np.random.default_rng(seed)
    rows = []
    for study in range(1, n_studies + 1):
        for condition in CONDITIONS:
            for level in LEVELS:
                p = rng.dirichlet([4.0, 1.5, 1.0])
                label = int(rng.choice(3, p=p))
                q = (np.array([1.0, 2.0, 4.0]) * p) ** power
                q /= q.sum()
                rows.append({"study_id": study, "condition": condition, "level": level, "label": label,
                             "row_id": row_id(study, condition, level), "normal_mild": q[0], "moderate": q[1],
                             "severe": q[2]})
    return pd.DataFrame(rows)


def test_fast_scorer_equals_the_official_metric():
    table = overconfident_table(n_studies=6)
    temps = {"spinal": 0.7, "foraminal": 1.8, "subarticular": 1.0}
    assert _Scorer(table)(temps) == pytest.approx(table_score(apply_temperatures(table, temps)), rel=1e-12)
    # class-prior rows are not tempered, in the fit as at prediction
    table["source"] = np.where(np.arange(len(table)) % 3 == 0, "prior", "two_stage")
    tempered = apply_temperatures(table, temps)
    prior = (table["source"] == "prior").to_numpy()
    cols = ["normal_mild", "moderate", "severe"]
    np.testing.assert_array_equal(tempered.loc[prior, cols].to_numpy(), table.loc[prior, cols].to_numpy())
    assert not np.allclose(tempered.loc[~prior, cols].to_numpy(), table.loc[~prior, cols].to_numpy())
    assert _Scorer(table)(temps) == pytest.approx(table_score(tempered), rel=1e-12)


def test_cross_fitted_temperature_fixes_overconfidence():
    result = cross_fitted(overconfident_table())
    assert result["cross_fitted"] < result["uncalibrated"] - 0.05
    assert all(1.8 < t < 3.5 for t in result["temperatures_all"].values()), result["temperatures_all"]
    tiny = cross_fitted(overconfident_table(n_studies=2))
    assert np.isnan(tiny["cross_fitted"]) and np.isfinite(tiny["uncalibrated"])


def test_temperatures_file_read_back_and_applied_to_model_rows_only(tmp_path):
    from rsna_spine.calibration import load_temperatures, temper_probabilities
    from rsna_spine.submission import find_temperatures_file

    path = tmp_path / "temperatures.json"
    path.write_text('{"uncalibrated": 0.4, "temperatures_all": {"spinal": 2.0, "foraminal": 1.0}}')
    assert find_temperatures_file("auto", tmp_path) == path
    assert find_temperatures_file("auto", tmp_path / "checkpoint_best.pt") == path  # a file in the model folder
    (tmp_path / "other_model").mkdir()
    assert find_temperatures_file("none", tmp_path) is None
    assert find_temperatures_file("auto", tmp_path / "other_model") is None
    temperatures = load_temperatures(path)
    assert temperatures == {"spinal": 2.0, "foraminal": 1.0}
    probs = np.array([[0.5, 0.3, 0.2], [0.5, 0.3, 0.2], [np.nan] * 3])
    out = temper_probabilities(probs, ["spinal_canal_stenosis", "left_subarticular_stenosis",
                                       "spinal_canal_stenosis"], temperatures)
    np.testing.assert_allclose(out[0], apply_temperature(probs[:1], 2.0)[0], rtol=1e-12)
    np.testing.assert_array_equal(out[1], probs[1])  # no temperature for the group: unchanged
    assert np.isnan(out[2]).all()  # no model output: left for the class prior


@pytest.mark.parametrize("content, field", [("{not json", "not valid JSON"),
                                            ('{"temperatures_all": {"lumbar": 1.0}}', "field 'temperatures_all.lumbar'"),
                                            ('{"temperatures_all": {"spinal": -1}}', "field 'temperatures_all.spinal'"),
                                            ('{"spinal": "hot"}', "field 'spinal'"),
                                            ('{"temperatures_all": {}}', "non-empty")])
def test_bad_temperatures_file_names_file_and_field(tmp_path, content, field):
    from common.errors import InputError
    from rsna_spine.calibration import load_temperatures
    from rsna_spine.submission import find_temperatures_file

    path = tmp_path / "temperatures.json"
    path.write_text(content)
    with pytest.raises(InputError) as exc:
        load_temperatures(path)
    assert field in str(exc.value) and "temperatures.json" in str(exc.value)
    with pytest.raises(InputError, match="predict.temperatures"):
        find_temperatures_file(str(tmp_path / "missing.json"), tmp_path)
