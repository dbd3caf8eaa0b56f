"""The mean-dose atlas as an input channel and as the additive base of the U-Net (residual over the atlas)."""

import numpy as np
import pytest
import torch
import yaml

from common.config import ConfigError
from vmat.atlas import fit_atlas, predict_atlas
from vmat.case_io import list_cases, load_case
from vmat.data import body_channel, build_inputs, coarsen, input_channel_permutation, make_input_spec
from vmat.defaults import defaults
from vmat.inference import EnsemblePredictor
from vmat.models import UNet3D
from vmat.train_vmat import check_training_config, model_spec_from_config


@pytest.fixture(scope="module")
def atlas_setup(tiny_npz):
    cases = [load_case(p) for p in list_cases(tiny_npz)]
    cfg = defaults()
    cfg["input"]["atlas_channel"] = True
    targets = {"PTV70": 70.0, "PTV56": 56.0}
    atlas = fit_atlas(cases, targets)
    spec = make_input_spec(cases[0]["structure_names"], targets, cfg["input"], 50.0, atlas=atlas)
    return cases, cfg, spec, atlas


def test_atlas_channel_is_the_case_atlas_over_rx(atlas_setup):
    cases, _, spec, atlas = atlas_setup
    case = cases[0]
    image, _ = build_inputs(case, spec)
    assert image.shape[0] == spec["n_channels"] == 1 + len(spec["structure_names"]) + 3
    expected = predict_atlas(atlas, case["masks"], case["structure_names"], case["spacing_mm"],
                             case["possible_dose_mask"]) / float(case["prescription_gy"])
    np.testing.assert_allclose(image[-1], expected, rtol=1e-6)
    np.testing.assert_array_equal(image[body_channel(spec)], case["possible_dose_mask"])
    assert input_channel_permutation(spec)[-1] == spec["n_channels"] - 1  # a flip leaves the atlas channel in place


@pytest.mark.parametrize("grid_factor", [1, 2])
def test_untrained_residual_unet_predicts_the_atlas(atlas_setup, grid_factor):
    """At every grid factor: the coarse model's zero correction, upsampled, leaves the full-resolution atlas."""
    cases, cfg, _, atlas = atlas_setup
    cfg["input"]["grid_factor"] = grid_factor
    spec = make_input_spec(cases[0]["structure_names"], {"PTV70": 70.0, "PTV56": 56.0}, cfg["input"], 50.0, atlas=atlas)
    cfg["model"].update({"channels": [4, 8], "groups": 2, "residual_over_atlas": True})
    target, kwargs = model_spec_from_config(cfg["model"], spec)
    model = UNet3D(**kwargs).eval()
    prep = {"input_spec": spec, "patch_size": [8, 16, 16]}
    predictor = EnsemblePredictor(cfg={"tta_flip": True, "overlap": 0.25}, members=[(model, prep)])
    case = cases[1]
    dose = predictor.predict(case)["dose"]
    expected = predict_atlas(atlas, case["masks"], case["structure_names"], case["spacing_mm"], case["possible_dose_mask"])
    np.testing.assert_allclose(dose, np.minimum(expected, 1.5 * float(case["prescription_gy"])), atol=1e-4)


def test_coarsen_is_the_block_mean_with_zero_padding():
    volume = np.arange(2 * 3 * 4 * 5, dtype=np.float32).reshape(2, 3, 4, 5)
    coarse = coarsen(volume, 2)
    assert coarse.shape == (2, 2, 2, 3)
    assert coarse[1, 0, 1, 1] == pytest.approx(volume[1, 0:2, 2:4, 2:4].mean())
    assert coarse[0, 1, 0, 2] == pytest.approx(volume[0, 2, 0:2, 4].sum() / 8)  # padded block: zeros count
    assert coarsen(volume, 1) is volume


def test_residual_needs_the_atlas_channel_and_a_unet():
    cfg = defaults()
    cfg["model"]["residual_over_atlas"] = True
    with pytest.raises(ConfigError, match="atlas_channel"):
        check_training_config(cfg)
    cfg["input"]["atlas_channel"] = True
    check_training_config(cfg)
    cfg["model"]["type"] = "cascade"
    with pytest.raises(ConfigError, match="residual_over_atlas"):
        check_training_config(cfg)
    cfg["model"]["type"] = "unet"
    cfg["input"]["grid_factor"] = 0
    with pytest.raises(ConfigError, match="grid_factor"):
        check_training_config(cfg)
    with pytest.raises(ValueError, match="residual_input_channel"):
        UNet3D(3, 1, [4, 8], groups=2, residual_input_channel=3)


def test_residual_training_runs_and_predicts(tiny_npz, tmp_path):
    """train_vmat main with the atlas channel, the residual U-Net and the coarse grid (the tiny 24x32x32 patients
    become 12x16x16, one patch); the checkpoint alone predicts on the case grid."""
    from vmat.predict_vmat import main as predict
    from vmat.train_vmat import main as train

    cfg = {"input": {"atlas_channel": True, "grid_factor": 2}, "model": {"channels": [4, 8], "groups": 2, "residual_over_atlas": True},
           "patch": {"size": [12, 16, 16], "per_case_per_epoch": 2}, "train": {"epochs": 1, "batch_size": 2},
           "val": {"gamma_subset": 0, "inference": {"tta_flip": False}},
           "dvh": {"sample_mm": 4.0}}
    config = tmp_path / "residual.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    summary = train(["--config", str(config), "--data", str(tiny_npz), "--output-dir", str(tmp_path / "run")])
    assert np.isfinite(summary["val"]["val_mae_body_gy"]) and np.isfinite(summary["val"]["val_openkbp_dvh_score"])
    out = predict(["--checkpoint", str(tmp_path / "run"), "--data", str(tiny_npz), "--output-dir", str(tmp_path / "pred"),
                   "--set", "inference.tta_flip=false"])
    assert out["n_cases"] == 3
    dose = np.load(tmp_path / "pred" / "synth_000.npz")["dose"]
    assert dose.shape == load_case(tiny_npz / "synth_000.npz")["dose"].shape
    assert np.isfinite(dose).all() and dose.max() > 0
    ckpt = torch.load(tmp_path / "run" / "checkpoint_last.pt", weights_only=True)
    assert ckpt["model"]["kwargs"]["residual_input_channel"] == ckpt["preprocessing"]["input_spec"]["n_channels"] - 1


def test_ensemble_of_different_atlases_is_refused_naming_the_atlas(atlas_setup):
    """Two runs fit their own atlases on different patients: their members cannot share one input."""
    from common.checkpoint import CheckpointError

    cases, _, _, atlas = atlas_setup
    cfg = defaults()  # the fixture's config may carry another test's grid factor
    cfg["input"]["atlas_channel"] = True
    targets = {"PTV70": 70.0, "PTV56": 56.0}
    spec = make_input_spec(cases[0]["structure_names"], targets, cfg["input"], 50.0, atlas=atlas)
    other = make_input_spec(cases[0]["structure_names"], targets, cfg["input"], 50.0,
                            atlas=fit_atlas(cases[1:], targets))
    cfg["model"].update({"channels": [4, 8], "groups": 2, "residual_over_atlas": True})
    _, kwargs = model_spec_from_config(cfg["model"], spec)
    members = [(UNet3D(**kwargs).eval(), {"input_spec": s, "patch_size": [8, 16, 16]}) for s in (spec, other)]
    with pytest.raises(CheckpointError, match=r"differing in \['atlas'\] \(each run fits its own mean-dose atlas"):
        EnsemblePredictor(cfg={}, members=members)
    EnsemblePredictor(cfg={}, members=[members[0], (members[1][0], {"input_spec": dict(spec), "patch_size": [8, 16, 16]})])
