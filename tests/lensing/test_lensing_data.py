"""Data set layout: storage round trips, catalogue validation, bad input, converters, models, physics loss."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest
import torch

from lensing.catalog import CatalogError, empty_row, read_catalog, validate_catalog, write_catalog
from lensing.data import LensingDataset, fit_size, normalize
from lensing.models import DeepLensResNet, LensParameterResNet, parameter_spec
from lensing.physics_loss import PhysicsInformedLoss, params_from_prediction, reduced_chi2
from lensing.storage import ImageFileError, read_array, write_array


@pytest.mark.parametrize("fmt,suffix", [("npy", ".npy"), ("fits", ".fits"), ("tiff16", ".tif")])
def test_storage_round_trip_keeps_physical_units(tmp_path, fmt, suffix):
    rng = np.random.default_rng(0)
    array = (rng.normal(0, 0.01, (3, 16, 16)) + 0.5).astype(np.float32)
    scale, offset = write_array(tmp_path / f"a{suffix}", array, fmt)
    back = read_array(tmp_path / f"a{suffix}", scale, offset)
    assert back.shape == (3, 16, 16) and back.dtype == np.float32
    tolerance = 0.5 * scale + 1e-7 if fmt == "tiff16" else 0.0
    assert np.abs(back - array).max() <= tolerance
    if fmt == "tiff16":
        with pytest.raises(ImageFileError, match="scale/offset"):
            read_array(tmp_path / f"a{suffix}")


def _write_dataset(folder, n=6, n_bands=1, size=12, seed=0, survey="euclid_vis"):
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        image = rng.normal(0, 0.01, (n_bands, size, size)).astype(np.float32)
        var = np.full_like(image, 1e-4)
        write_array(folder / f"images/{i}.npy", image, "npy")
        write_array(folder / f"variance/{i}.npy", var, "npy")
        row = empty_row()
        row.update({"object_id": str(i), "image_path": f"images/{i}.npy", "variance_path": f"variance/{i}.npy",
                    "bands": ";".join(["r"] * n_bands), "band_psf_fwhm": "0.2", "background_rms": "0.01",
                    "label": i % 2, "label_source": "sim:torch", "psf_fwhm": 0.2, "pixel_scale": 0.1,
                    "survey": survey, "instrument": "x", "split": "train" if i < n - 2 else "test"})
        for c in ("einstein_radius_arcsec", "einstein_area_arcsec2", "lensed_source_flux",
                  "lensed_pixels_above_1sigma", "flux_contrast", "n_images"):
            row[c] = 0.0
        rows.append(row)
    df = pd.DataFrame(rows)
    write_catalog(df, folder)
    return df


@pytest.mark.parametrize("column,value,message", [
    ("survey", "euclid", "unknown survey"),
    ("label", 2, "'label' must be -1, 0 or 1"),
    ("label_source", "sim:mine", "label_source"),
    ("pixel_scale", -0.1, "'pixel_scale' must be a positive"),
    ("schema_version", "1.0", "schema_version"),
])
def test_catalog_validation_names_column(tmp_path, column, value, message):
    df = _write_dataset(tmp_path)
    df.loc[1, column] = value
    with pytest.raises(CatalogError, match=message):
        validate_catalog(df, "catalog.csv", tmp_path)


def test_missing_files_error_or_drop_with_log(tmp_path):
    _write_dataset(tmp_path)
    (tmp_path / "images/3.npy").unlink()
    with pytest.raises(CatalogError, match="missing files"):
        read_catalog(tmp_path)
    lines = []
    df = read_catalog(tmp_path, on_missing_files="drop", log=lines.append)
    assert len(df) == 5 and "dropped 1 row" in lines[0]
    with pytest.raises(CatalogError, match="missing column"):
        validate_catalog(df.drop(columns="psf_matched"))


def test_nan_pixels_and_bad_variance_are_masked_with_a_log_line(tmp_path):
    _write_dataset(tmp_path)
    image = read_array(tmp_path / "images/0.npy")
    image[0, 2, 3] = np.nan
    write_array(tmp_path / "images/0.npy", image, "npy")
    var = read_array(tmp_path / "variance/1.npy")
    var[0, :2, :] = 0.0
    var[0, 5, 5] = -1.0
    write_array(tmp_path / "variance/1.npy", var, "npy")
    lines = []
    ds = LensingDataset(tmp_path, log=lines.append)
    assert ds.masked_counts == {"nan_pixels": 1, "nonpositive_variance": 25, "images_with_masks": 2}
    assert len(lines) == 1 and "masked 1 NaN pixel(s) and 25 variance" in lines[0]
    item = ds[0]
    assert torch.isfinite(item["input"]).all() and item["input"][0, 2, 3] == 0
    assert torch.isinf(item["variance"][0, 2, 3])
    assert torch.isinf(ds[1]["variance"][0, 0]).all()


def test_external_simulation_label_source_is_in_the_schema(tmp_path):
    df = _write_dataset(tmp_path)
    df["label_source"] = "sim:external"
    df["simulator"] = "lenstronomy 1.14"  # optional free column naming the simulator
    write_catalog(df, tmp_path)
    ds = LensingDataset(tmp_path)
    assert set(ds.catalog["label_source"]) == {"sim:external"} and len(ds) == 6


def test_wrong_band_count_and_size_are_errors_naming_the_file(tmp_path):
    _write_dataset(tmp_path, n_bands=1)
    with pytest.raises(ImageFileError, match=r"0\.npy: 1 band\(s\), but the model expects 3"):
        LensingDataset(tmp_path, expected_bands=3)
    with pytest.raises(ImageFileError, match="expects 16x16"):
        LensingDataset(tmp_path, expected_size=16, size_policy="error")
    df = read_catalog(tmp_path)
    df.loc[0, "bands"] = "g;r"
    write_catalog(df, tmp_path)
    with pytest.raises(ImageFileError, match="lists 2"):
        LensingDataset(tmp_path)
    model = DeepLensResNet(in_bands=3, image_size=12, widths=[4], blocks_per_stage=[1])
    with pytest.raises(ValueError, match=r"expects input \[B, 3, H, W\]"):
        model(torch.zeros(2, 1, 12, 12))


def test_size_policy_crop_pad_and_any_size_model(tmp_path):
    """12x12 cutouts: padded to 16 (input 0, variance +inf in the border), cropped to 8 (the centre), or
    passed as they are; the network itself takes any size."""
    _write_dataset(tmp_path, n_bands=1, size=12)
    lines = []
    native = LensingDataset(tmp_path, size_policy="native", expected_size=16)
    padded = LensingDataset(tmp_path, expected_size=16, log=lines.append)  # crop_pad is the default
    cropped = LensingDataset(tmp_path, expected_size=8, size_policy="crop_pad")
    assert native[0]["input"].shape == (1, 12, 12)
    assert padded[0]["input"].shape == (1, 16, 16) and cropped[0]["input"].shape == (1, 8, 8)
    torch.testing.assert_close(padded[0]["input"][:, 2:14, 2:14], native[0]["input"])
    torch.testing.assert_close(cropped[0]["input"], native[0]["input"][:, 2:10, 2:10])
    assert (padded[0]["input"][:, :2] == 0).all() and torch.isinf(padded[0]["variance"][:, :, :2]).all()
    assert torch.isfinite(padded[0]["variance"][:, 2:14, 2:14]).all()
    assert padded[0]["noise_sigma"] == native[0]["noise_sigma"]  # normalized with the full cutout's sigma
    assert any("6 padded to 16x16" in line for line in lines)
    with pytest.raises(ValueError, match="size_policy"):
        LensingDataset(tmp_path, expected_size=16, size_policy="resize")
    model = DeepLensResNet(in_bands=1, image_size=12, widths=[4, 8], blocks_per_stage=[1, 1]).eval()
    for size in (9, 12, 33):
        assert model(torch.zeros(2, 1, size, size))["logit"].shape == (2,)
    np.testing.assert_array_equal(fit_size(np.arange(9.0).reshape(1, 3, 3), 1, -1.0), [[[4.0]]])
    np.testing.assert_array_equal(fit_size(np.ones((1, 1, 1)), 2, 0.0), [[[1.0, 0.0], [0.0, 0.0]]])


def test_normalization_divides_by_sigma_and_clips():
    image = np.array([[[0.0, 0.02, 10.0]]], dtype=np.float32)
    out = normalize(image, np.array([0.01], dtype=np.float32), clip_sigma=250.0)
    np.testing.assert_allclose(out[0, 0], [0.0, 2.0, 250.0])
    np.testing.assert_allclose(normalize(image, np.array([0.01]), 250.0, "asinh")[0, 0],
                               np.arcsinh([0.0, 2.0, 250.0]), rtol=1e-6)


def test_galaxiesml_converter_on_a_small_hdf5(tmp_path):
    import h5py

    from lensing.converters import convert_galaxiesml
    from lensing.preprocess_lensing import DEFAULTS

    rng = np.random.default_rng(0)
    path = tmp_path / "5x64x64_testing_with_morphology.hdf5"
    with h5py.File(path, "w") as f:
        f["image"] = rng.normal(0, 0.05, (4, 5, 16, 16)).astype(np.float32)  # channels-first, g r i z y
        f["object_id"] = np.arange(100, 104, dtype=np.int64)
        f["specz_redshift"] = np.array([0.1, 0.2, 0.3, 0.4])
        for band in "grizy":
            f[f"{band}_cmodel_mag"] = np.array([20.0, 21.0, 22.0, 23.0])
    cfg = dict(DEFAULTS["convert"], bands=["g", "r", "i"], label=-1, target_psf_fwhm=0.9)
    df = convert_galaxiesml(path, tmp_path / "out", cfg, log=lambda m: None)
    assert len(df) == 4 and set(df["label"]) == {-1} and set(df["label_source"]) == {"pretrain:galaxiesml"}
    assert df["object_id"].tolist() == ["100", "101", "102", "103"]
    assert df["psf_matched"].all() and (df["psf_fwhm"] == 0.9).all()
    img = read_array(tmp_path / "out" / df["image_path"][0])
    assert img.shape == (3, 16, 16)
    write_catalog(df, tmp_path / "out")
    ds = LensingDataset(tmp_path / "out")  # no variance map: σ from the border, variance = σ²
    assert ds[0]["input"].shape == (3, 16, 16) and torch.isfinite(ds[0]["variance"]).all()
    with h5py.File(tmp_path / "channels_last.hdf5", "w") as f:
        f["image"] = np.zeros((2, 16, 16, 5), dtype=np.float32)
        f["object_id"] = np.arange(2)
    with pytest.raises(ValueError, match="channels-last"):
        convert_galaxiesml(tmp_path / "channels_last.hdf5", tmp_path / "o2", cfg, log=lambda m: None)


def test_folder_converter_fits_and_refuses_sharpening(tmp_path):
    from lensing.converters import convert_folder
    from lensing.preprocess_lensing import DEFAULTS

    src = tmp_path / "castles"
    write_array(src / "lens_a.fits", np.ones((1, 12, 12), np.float32), "fits")
    write_array(src / "lens_b.fits", np.ones((1, 12, 12), np.float32), "fits")
    pd.DataFrame({"file": ["lens_a.fits", "lens_b.fits"], "label": [1, 1], "survey": ["hst_acs", "hst_acs"],
                  "label_source": ["obs:castles", "obs:castles"]}).to_csv(src / "catalog.csv", index=False)
    cfg = dict(DEFAULTS["convert"], format="folder")
    df = convert_folder(src, tmp_path / "out", cfg, log=lambda m: None)
    assert df["survey"].tolist() == ["hst_acs", "hst_acs"] and df["pixel_scale"].iloc[0] == 0.05
    write_catalog(df, tmp_path / "out")
    with pytest.raises(ValueError, match="lens_a.*sharpen|row 0.*sharpen"):
        convert_folder(src, tmp_path / "o2", dict(cfg, target_psf_fwhm=0.05), log=lambda m: None)
    pd.DataFrame({"file": ["lens_a.fits"], "survey": ["jwst"]}).to_csv(src / "catalog.csv", index=False)
    with pytest.raises(CatalogError, match="unknown survey 'jwst'"):
        convert_folder(src, tmp_path / "o3", cfg, log=lambda m: None)


def test_parameter_model_outputs_are_bounded():
    model = LensParameterResNet(in_bands=2, image_size=16, widths=[4, 8], blocks_per_stage=[1, 1])
    out = model(torch.randn(3, 2, 16, 16) * 100)
    spec = parameter_spec(2)
    assert out["logit"].shape == (3,) and out["params"].shape == (3, len(spec))
    low = torch.tensor([s[1] for s in spec])
    high = torch.tensor([s[2] for s in spec])
    assert ((out["params"] >= low) & (out["params"] <= high)).all()


def _sim_batch(b=2, size=16):
    from lensing.physics_loss import render_prediction

    torch.manual_seed(0)
    spec = parameter_spec(1)
    unit = torch.rand(b, len(spec)) * 0.6 + 0.2
    low, high = torch.tensor([s[1] for s in spec]), torch.tensor([s[2] for s in spec])
    params = low + (high - low) * unit
    batch = {"noise_sigma": torch.full((b, 1), 0.01), "pixel_scale": torch.full((b,), 0.1),
             "psf_fwhm": torch.full((b, 1), 0.2), "label": torch.tensor([1.0, 0.0])[:b],
             "image": torch.zeros(b, 1, size, size), "index": torch.arange(b)}
    model = render_prediction(params, batch)
    variance = torch.full_like(model, 0.01**2)
    noise = torch.randn(model.shape, generator=torch.Generator().manual_seed(1)) * 0.01
    batch.update({"image": model + noise, "variance": variance})
    return params, batch


def test_physics_chi2_is_about_one_for_the_true_parameters_and_gated():
    params, batch = _sim_batch()
    from lensing.physics_loss import render_prediction

    chi2 = reduced_chi2(render_prediction(params, batch), batch["image"], batch["variance"])
    assert torch.allclose(chi2, torch.ones(2), atol=0.3)
    raw = torch.zeros_like(params, requires_grad=True)  # head output before the sigmoid

    def outputs(p):
        return {"logit": torch.tensor([5.0, -5.0]), "params": p, "params_unit": torch.sigmoid(raw)}

    loss_fn = PhysicsInformedLoss(weight=1.0, warmup_epochs=4, gate="label")
    assert loss_fn.curriculum(1) == 0.25 and loss_fn.curriculum(8) == 1.0
    shifted = params.clone()
    shifted[:, 0] += 0.3  # wrong Einstein radius
    p = shifted.clone().requires_grad_(True)
    loss, stats = loss_fn(outputs(p), batch, epoch=4)
    loss.backward()
    assert stats["physics_chi2"] > 1.5 and p.grad[0].abs().sum() > 0
    assert p.grad[1].abs().sum() == 0  # label gate: the non-lens row does not contribute


def test_physics_loss_raises_instead_of_returning_zero():
    params, batch = _sim_batch()
    batch["variance"][0, 0, 0, 0] = -1.0  # masked pixel: fine
    loss, _ = PhysicsInformedLoss(weight=1.0)({"logit": torch.zeros(2), "params": params}, batch, 1)
    assert torch.isfinite(loss)
    batch["image"][1, 0, 3, 3] = float("nan")
    with pytest.raises(FloatingPointError, match=r"non-finite chi2 for batch rows \[1\]"):
        PhysicsInformedLoss(weight=1.0)({"logit": torch.zeros(2), "params": params}, batch, 1)
    with pytest.raises(KeyError, match="parameter head"):
        PhysicsInformedLoss(weight=1.0)({"logit": torch.zeros(2)}, batch, 1)
    with pytest.raises(ValueError, match=r"\[B, 21\]"):
        params_from_prediction(params[:, :5], batch["noise_sigma"], batch["pixel_scale"])
