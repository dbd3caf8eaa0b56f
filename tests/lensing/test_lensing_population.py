"""The scene population draws theta_E from the configured range; a field-of-view cap is explicit and warned."""

from __future__ import annotations

import numpy as np
import pytest

from lensing.defaults import lensing_defaults
from lensing.population import PopulationConfig, sample_scenes, theta_e_range
from lensing.simulate_data import simulate_dataset
from lensing.surveys import get_survey


def test_theta_e_follows_the_configured_range_without_cap():
    survey = get_survey("euclid_vis")
    cfg = PopulationConfig.from_dict({"lens_fraction": 1.0, "theta_E_range_arcsec": [0.5, 2.0]})
    params, _ = sample_scenes(400, survey, 40, cfg, np.random.default_rng(0))  # half width 2.0": no silent cap
    theta = params["lens"]["theta_E"].numpy()
    assert theta.min() >= 0.5 and theta.max() <= 2.0 and theta.max() > 1.9 and abs(theta.mean() - 1.25) < 0.08


def test_explicit_cap_truncates_and_is_reported(tmp_path):
    survey = get_survey("euclid_vis")  # 0.101"/px: 40 px → half width 2.02"
    capped = PopulationConfig.from_dict({"theta_E_range_arcsec": [0.5, 2.0], "theta_E_max_fov_fraction": 0.45})
    lo, hi, was_capped = theta_e_range(capped, survey, 40)
    assert (lo, was_capped) == (0.5, True) and hi == pytest.approx(0.45 * 20 * 0.101)
    assert theta_e_range(capped, survey, 101)[2] is False  # 0.45 × 5.1" > 2.0": nothing cut
    with pytest.raises(ValueError, match="theta_E_max_fov_fraction .* below theta_E_range_arcsec's low end"):
        theta_e_range(PopulationConfig.from_dict({"theta_E_max_fov_fraction": 0.1}), survey, 40)
    with pytest.raises(ValueError, match="must be > 0 or null"):
        PopulationConfig.from_dict({"theta_E_max_fov_fraction": 0})
    cfg = lensing_defaults()["simulate"]
    cfg.update({"n_per_survey": [4], "n_pix": 40, "truth_grid": 32})
    cfg["population"]["theta_E_max_fov_fraction"] = 0.45
    lines = []
    rows = simulate_dataset(cfg, tmp_path, seed=0, log=lines.append, is_main=False)
    warning = [line for line in lines if "WARNING" in line]
    assert len(warning) == 1 and "U(0.5, 0.909)" in warning[0] and "[0.5, 2.0]" in warning[0]
    assert rows["true_theta_E"].max() <= 0.91


def test_confusers_are_opt_in_and_render():
    """confuser_fraction 0 reproduces the earlier random stream exactly; 1 gives every non-lens a ring,
    spiral, close pair or edge-on disc (all kinds appear in 200 scenes), with light where the kind says."""
    import torch

    from lensing.population import CONFUSER_KINDS, CONFUSER_KNOTS, MAX_NEIGHBOURS
    from lensing.psf import GaussianPSF
    from lensing.simulator import render

    survey = get_survey("hsc")
    plain, meta_plain = sample_scenes(200, survey, 48, PopulationConfig(), np.random.default_rng(3))
    off, meta_off = sample_scenes(200, survey, 48, PopulationConfig(confuser_fraction=0.0), np.random.default_rng(3))
    torch.testing.assert_close(off["lens"]["theta_E"], plain["lens"]["theta_E"])
    assert (meta_off["sim_kind"] == meta_plain["sim_kind"]).all()
    params, meta = sample_scenes(200, survey, 48, PopulationConfig(confuser_fraction=1.0), np.random.default_rng(3))
    lens = meta["label"] == 1
    torch.testing.assert_close(params["lens"]["theta_E"], plain["lens"]["theta_E"])  # lenses untouched
    assert set(meta["sim_kind"][~lens]) == {f"galaxy+{k}" for k in CONFUSER_KINDS}
    assert set(meta["sim_kind"][lens]) == {"lens"}
    amp = params["neighbours"]["amp"]
    assert amp.shape[1] == MAX_NEIGHBOURS + CONFUSER_KNOTS
    knots = (amp[:, MAX_NEIGHBOURS:, 0] > 0).sum(dim=1).numpy()
    kind = meta["sim_kind"]
    assert (knots[kind == "galaxy+ring"] >= 6).all() and (knots[kind == "galaxy+spiral"] == CONFUSER_KNOTS).all()
    assert (knots[kind == "galaxy+pair"] == 1).all() and (knots[lens | (kind == "galaxy+edge_on")] == 0).all()
    e1, e2 = params["lens_light"]["e1"].numpy(), params["lens_light"]["e2"].numpy()
    q = (1 - np.hypot(e1, e2)) / (1 + np.hypot(e1, e2))
    assert (q[kind == "galaxy+edge_on"] <= 0.25 + 1e-6).all()
    images = render(params, 48, survey.pixel_scale_arcsec, GaussianPSF(torch.tensor(survey.psf_fwhm_arcsec)))
    assert torch.isfinite(images).all() and images.shape == (200, len(survey.bands), 48, 48)
