"""Harder data (issue 15, item 2): clumpy multi-component sources, line-of-sight companions, per-image seeing
and depth, lenstronomy-rendered held-out sets, the residual input channel, and validation on the fly."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lensing import preprocess_lensing, train_lensing, validate_lensing, validate_stream_lensing
from lensing.artefacts import add_artefacts
from lensing.baseline import azimuthal_median_model, azimuthal_residual_score
from lensing.data import LensingDataset
from lensing.population import PopulationConfig, sample_scenes
from lensing.psf import GaussianPSF
from lensing.simulate_data import batch_survey, observing_conditions
from lensing.simulator import render
from lensing.surveys import get_survey

SMOKE = "configs/lensing/smoke.yaml"
REALISM = ["--set", "simulate.population.source_knots_max=4", "--set", "simulate.population.los_companions_max=2",
           "--set", "simulate.population.confuser_fraction=0.5", "--set", "simulate.seeing_scatter=0.2",
           "--set", "simulate.depth_scatter_mag=0.5", "--set", "simulate.artefact_fraction=0.3"]


def _scenes(n=24, seed=0, **cfg):
    survey = get_survey("hsc")
    params, meta = sample_scenes(n, survey, 32, PopulationConfig(**cfg), np.random.default_rng(seed), torch.float64)
    return survey, params, meta


def test_source_knots_are_lensed_only_in_lenses_and_hold_a_share_of_the_source_flux():
    survey, params, meta = _scenes(source_knots_max=4)
    knots = params["source_knots"]["amp"].numpy()  # [B, K, C]
    assert knots.shape == (24, 4, 3)
    assert (knots[meta["label"] == 0] == 0).all() and (knots[meta["label"] == 1] > 0).any()
    with_knots = render(params, 32, survey.pixel_scale_arcsec)
    without = render({k: v for k, v in params.items() if k != "source_knots"}, 32, survey.pixel_scale_arcsec)
    lens = meta["label"] == 1
    assert torch.equal(with_knots[~lens], without[~lens])
    assert (with_knots[lens].sum(dim=(1, 2, 3)) >= without[lens].sum(dim=(1, 2, 3))).all()


def test_realism_options_off_draw_nothing_extra():
    _, plain, plain_meta = _scenes()
    _, again, again_meta = _scenes(source_knots_max=0, los_companions_max=0)
    assert "source_knots" not in again and np.array_equal(plain_meta["z_phot"], again_meta["z_phot"])
    assert all(torch.equal(plain[g][k], again[g][k]) for g in plain for k in plain[g])
    _, los, _ = _scenes(los_companions_max=2)
    assert los["neighbours"]["amp"].shape[1] == plain["neighbours"]["amp"].shape[1] + 2


def test_torch_matches_lenstronomy_with_knots_companions_and_confusers():
    pytest.importorskip("lenstronomy")
    from lensing.lenstronomy_bridge import render_scene_lenstronomy

    survey, params, _ = _scenes(n=4, seed=3, source_knots_max=3, los_companions_max=2, confuser_fraction=1.0,
                                lens_fraction=0.5)
    fwhm = np.array(survey.psf_fwhm_arcsec)
    ours = render(params, 32, survey.pixel_scale_arcsec, GaussianPSF(torch.tensor(fwhm, dtype=torch.float64)))
    for i in range(4):
        ref = render_scene_lenstronomy(params, i, 32, survey.pixel_scale_arcsec, fwhm)
        assert np.abs(ours[i].numpy() - ref).max() / np.abs(ref).max() < 1e-6


def test_observing_conditions_scale_seeing_together_and_depth_like_exposure_count():
    survey = get_survey("hsc")
    fwhm, bkg, t_exp = observing_conditions(survey, 5, 0.0, 0.0, np.random.default_rng(0))
    assert np.allclose(fwhm, survey.psf_fwhm_arcsec) and np.allclose(bkg[0], [survey.background_rms(b) for b in range(3)])
    fwhm, bkg2, t_exp2 = observing_conditions(survey, 500, 0.2, 0.5, np.random.default_rng(0))
    ratio = fwhm / np.array(survey.psf_fwhm_arcsec)
    assert np.allclose(ratio, ratio[:, :1]) and 0.1 < np.log(ratio[:, 0]).std() < 0.3
    assert np.allclose(bkg2**2 * t_exp2, bkg[0] ** 2 * t_exp[0])  # σ ∝ T^-1/2
    depth_shift = 1.25 * np.log10(t_exp2[:, 0] / t_exp[0, 0])
    assert depth_shift.min() >= -0.5 - 1e-9 and depth_shift.max() <= 0.5 + 1e-9


def test_pixel_scale_scatter_draws_one_scale_per_batch_and_moves_the_sky_noise_with_it():
    survey = get_survey("kids")
    rng = np.random.default_rng(0)
    assert batch_survey(survey, 0.0, rng) is survey
    assert rng.uniform() == np.random.default_rng(0).uniform()  # off: nothing drawn
    scales = []
    for _ in range(200):
        drawn = batch_survey(survey, 0.35, rng)
        factor = drawn.pixel_scale_arcsec / survey.pixel_scale_arcsec
        assert np.exp(-0.35) <= factor <= np.exp(0.35)
        # sky per pixel ∝ pixel area; read noise unchanged
        sky_var = [s.background_rms(2) ** 2 - s.num_exposures[2] * s.read_noise_e**2 / s.total_exposure_s(2) ** 2
                   for s in (survey, drawn)]
        assert np.isclose(sky_var[1] / sky_var[0], factor**2)
        assert drawn.psf_fwhm_arcsec == survey.psf_fwhm_arcsec and drawn.name == survey.name
        scales.append(np.log(factor))
    assert np.ptp(scales) > 0.6  # spread over the range, not one value


def test_simulated_pixel_scale_scatter_reaches_the_catalogue(tmp_path):
    out = tmp_path / "data"
    preprocess_lensing.main(["simulate", "--config", SMOKE, "--output-dir", str(out), "--set", "simulate.n_per_survey=[30]",
                             "--set", "simulate.batch_size=10", "--set", "simulate.pixel_scale_scatter=0.3",
                             "--set", "split.enabled=false"])
    catalog = pd.read_csv(out / "catalog.csv")
    nominal = get_survey("euclid_vis").pixel_scale_arcsec
    per_batch = catalog["pixel_scale"].to_numpy().reshape(3, 10)
    assert (per_batch == per_batch[:, :1]).all() and len(np.unique(per_batch[:, 0])) == 3
    assert (np.abs(np.log(per_batch / nominal)) <= 0.3 + 1e-9).all()


def test_hard_negative_term_weights_only_the_highest_scoring_non_lenses():
    logit = torch.tensor([3.0, -2.0, 1.0, 0.5, -1.0, 2.0], requires_grad=True)
    label = torch.tensor([0.0, 0.0, 0.0, 0.0, 1.0, 1.0])
    loss = train_lensing.hard_negative_bce(logit, label, 0.5)  # the top 2 of 4 non-lenses: logits 3 and 1
    assert torch.isclose(loss, torch.nn.functional.softplus(torch.tensor([3.0, 1.0])).mean())
    loss.backward()
    assert (logit.grad[[0, 2]] > 0).all() and (logit.grad[[1, 3, 4, 5]] == 0).all()
    assert train_lensing.hard_negative_bce(logit, torch.ones(6), 0.5).item() == 0.0
    one = train_lensing.hard_negative_bce(logit, label, 0.01)  # at least one non-lens
    assert torch.isclose(one, torch.nn.functional.softplus(torch.tensor(3.0)))


def test_artefacts_hit_lenses_and_non_lenses_and_draw_nothing_when_off():
    images = torch.zeros(40, 2, 16, 16, dtype=torch.float64)
    bkg, fwhm = np.full((40, 2), 0.1), np.full((40, 2), 0.3)
    rng = np.random.default_rng(0)
    same, hit = add_artefacts(images, bkg, fwhm, 0.1, 0.0, rng)
    assert same is images and not hit.any() and rng.uniform() == np.random.default_rng(0).uniform()
    out, hit = add_artefacts(images, bkg, fwhm, 0.1, 0.5, np.random.default_rng(1))
    changed = (out != 0).flatten(1).any(dim=1).numpy()
    assert np.array_equal(changed, hit) and 5 < hit.sum() < 35
    assert float(out.max()) >= 20 * 0.1  # cosmic rays of >= 20 sigma


def test_lenstronomy_rendered_set_is_sim_external_with_per_image_conditions(tmp_path):
    pytest.importorskip("lenstronomy")
    out = tmp_path / "heldout"
    summary = preprocess_lensing.main(["simulate", "--config", SMOKE, "--output-dir", str(out), "--seed", "5",
                                       "--set", "simulate.n_per_survey=[12]", "--set", "simulate.n_pix=20",
                                       "--set", "simulate.renderer=lenstronomy", "--set", "split.enabled=false",
                                       *REALISM])
    cat = pd.read_csv(out / "catalog.csv")
    assert summary["n_rows"] == 12 and set(cat["label_source"]) == {"sim:external"}
    assert cat["simulator"].str.startswith("lenstronomy").all() and cat["psf_fwhm"].nunique() == 12
    assert cat["background_rms"].nunique() == 12 and cat["artefacts"].dtype == bool


def test_vectorized_baseline_matches_the_per_image_ring_medians():
    x = np.random.default_rng(0).normal(size=(3, 1, 15, 15))
    model = azimuthal_median_model(x[:, 0])
    yy, xx = np.mgrid[0:15, 0:15]
    ring = np.floor(np.hypot(yy - 7, xx - 7)).astype(int)
    for r in (0, 3, 7):
        assert np.allclose(model[1][ring == r], np.median(x[1, 0][ring == r]))
    assert azimuthal_residual_score(x).shape == (3,)


def test_residual_channel_model_trains_validates_and_streams(tmp_path):
    data = tmp_path / "data"
    preprocess_lensing.main(["simulate", "--config", SMOKE, "--output-dir", str(data), *REALISM])
    rows = LensingDataset(data, split="train", residual_channel=True)
    item = rows[0]
    assert item["input"].shape[0] == 2 * item["image"].shape[0]
    bands = item["input"][:1].numpy()
    assert np.allclose(item["input"][1:].numpy(), bands - azimuthal_median_model(bands), atol=1e-5)
    run = tmp_path / "run"
    train_lensing.main(["--config", SMOKE, "--data", str(data), "--output-dir", str(run),
                        "--set", "data.residual_channel=true", "--set", "data.stretch=asinh"])
    val = validate_lensing.main(["--config", SMOKE, "--checkpoint", str(run), "--data", str(data),
                                 "--output-dir", str(tmp_path / "val"), "--set", "validate.figures=false"])
    assert 0 <= val["headline"]["auroc"] <= 1 and 0 <= val["headline"]["baseline_auroc"] <= 1
    # the baseline reads the linear noise-normalized image, not the model's asinh-stretched input
    scored = pd.read_csv(tmp_path / "val" / "scores.csv")
    test = LensingDataset(data, split="test")
    linear = np.stack([test[i]["input"].numpy() for i in range(len(test))])
    expected = dict(zip(test.catalog["object_id"], azimuthal_residual_score(linear)))
    assert np.allclose(scored["baseline_score"], scored["object_id"].map(expected), rtol=1e-5)
    stream = validate_stream_lensing.main(["--config", SMOKE, "--checkpoint", str(run), *REALISM,
                                           "--output-dir", str(tmp_path / "stream"), "--set", "validate.bootstrap=5"])
    scores = pd.read_csv(tmp_path / "stream" / "scores.csv")
    assert (scores["label"] == 0).sum() == 40 and (scores["label"] == 1).sum() == 20
    assert stream["headline"]["n_nonlenses"] == 40 and stream["headline"]["wall_s"] > 0
    assert sum(stream["false_positives_at_tpr10_threshold_by_kind"].values()) >= 10
    assert set(scores["sim_kind"]) > {"lens"}


def test_stream_refuses_a_band_count_the_model_does_not_take(tmp_path):
    data = tmp_path / "data"
    preprocess_lensing.main(["simulate", "--config", SMOKE, "--output-dir", str(data)])
    run = tmp_path / "run"
    train_lensing.main(["--config", SMOKE, "--data", str(data), "--output-dir", str(run)])
    with pytest.raises(Exception, match="band"):
        validate_stream_lensing.main(["--config", SMOKE, "--checkpoint", str(run), "--output-dir", str(tmp_path / "s"),
                                      "--set", "simulate.surveys=[hsc]"])


def test_batch_renderer_renders_source_knots_like_render():
    from lensing.batch_renderer import BatchRenderer

    survey, params, _ = _scenes(n=6, seed=4, source_knots_max=3, los_companions_max=1)
    psf = GaussianPSF(torch.tensor(survey.psf_fwhm_arcsec, dtype=torch.float64))
    reference = render(params, 32, survey.pixel_scale_arcsec, psf)
    fast = BatchRenderer(32, survey.pixel_scale_arcsec, psf, 1, n_bands=3, dtype=torch.float64, chunk_elements=2048)
    assert torch.allclose(fast(params), reference, rtol=1e-10, atol=1e-12 * float(reference.abs().max()))


@pytest.mark.parametrize("weight,fraction", [(-1.0, 0.25), (1.0, 0.0), (1.0, 1.5)])
def test_hard_negative_settings_out_of_range_are_config_errors(weight, fraction):
    from common.config import ConfigError
    from lensing.defaults import lensing_defaults

    cfg = lensing_defaults()
    cfg["train"].update(hard_negative_weight=weight, hard_negative_fraction=fraction)
    with pytest.raises(ConfigError, match="train.hard_negative"):
        train_lensing._check_config(cfg)
