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


def test_cross_fitted_temperature_fixes_overconfidence():
    result = cross_fitted(overconfident_table())
    assert result["cross_fitted"] < result["uncalibrated"] - 0.05
    assert all(1.8 < t < 3.5 for t in result["temperatures_all"].values()), result["temperatures_all"]
    tiny = cross_fitted(overconfident_table(n_studies=2))
    assert np.isnan(tiny["cross_fitted"]) and np.isfinite(tiny["uncalibrated"])
