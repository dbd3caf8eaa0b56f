"""Intensity scaling, millimetre crops, flips, CSV parsing."""

import numpy as np
import pandas as pd
import pytest

from rsna_spine.constants import TARGET_COLUMNS, parse_row_id, row_id
from rsna_spine.crops import apply_clahe, crop_stack, lr_axis, scale_intensity
from rsna_spine.data import DataLayoutError, Stack, read_coordinates, read_labels, read_series_descriptions

INTENSITY = {"mode": "percentile", "window_center": 50.0, "window_width": 350.0, "clahe": False,
             "clahe_clip": 2.0, "clahe_tiles": 8}


def make_stack(kind="sagittal", shape=(7, 40, 40), spacing=(4.0, 0.5, 0.5)):
    """A canonical stack whose voxel (k, j, i) holds 100·k; a bright 10 mm × 10 mm square in its centre."""
    array = np.repeat(100.0 * np.arange(shape[0])[:, None, None], shape[1] * shape[2], axis=1).reshape(shape)
    c = shape[1] // 2
    half = int(round(5.0 / spacing[1]))
    array[:, c - half:c + half, c - half:c + half] += 1000.0
    dirs = {"sagittal": ([1.0, 0, 0], [0, 0, -1.0], [0, 1.0, 0]), "axial": ([0, 0, 1.0], [0, 1.0, 0], [1.0, 0, 0])}
    normal, col_dir, row_dir = (np.array(v) for v in dirs[kind])
    origins = np.arange(shape[0])[:, None] * spacing[0] * normal[None, :]
    return Stack(study_id=1, series_id=2, stack_index=0, series_key="x", orientation=kind,
                 array=array.astype(np.float32), slice_origins_mm=origins, row_dir=row_dir, col_dir=col_dir,
                 normal=normal, spacing_mm=spacing, instance_numbers=np.arange(1, shape[0] + 1),
                 orig_row_dir=row_dir, orig_col_dir=col_dir, orig_corner=origins,
                 percentiles=np.array([0.0, 1600.0], dtype=np.float32))


@pytest.mark.parametrize("mode, value, expected", [
    ("percentile", 400.0, 0.25), ("percentile", 2000.0, 1.0), ("window", 50.0, 0.5), ("window", -125.0, 0.0),
    ("window", 400.0, 1.0)])
def test_intensity_modes_by_hand(mode, value, expected):
    stack = make_stack()
    got = scale_intensity(np.array([value], dtype=np.float32), stack, {**INTENSITY, "mode": mode})
    assert got[0] == pytest.approx(expected)


def test_crop_is_sized_in_millimetres_and_stacks_n_slices():
    stack = make_stack(spacing=(4.0, 0.5, 0.5))  # the bright square is 10 mm wide
    crop = crop_stack(stack, (3, 19.5, 19.5), num_slices=5, crop_mm=20.0, img_size=32, intensity=INTENSITY)
    assert crop.shape == (5, 3, 32, 32) and crop.dtype == np.float32
    np.testing.assert_array_equal(crop[:, 0], crop[:, 2])  # grey replicated to 3 channels
    bright = crop[2, 0] > (300 + 1300) / 2 / 1600  # slice 3: 300 outside, 1300 inside the square
    assert bright.mean() == pytest.approx(0.25, abs=0.04)  # (10 mm / 20 mm)²
    # the same anatomy with a coarser pixel spacing gives the same crop content
    coarse = make_stack(shape=(7, 20, 20), spacing=(4.0, 1.0, 1.0))
    crop2 = crop_stack(coarse, (3, 9.5, 9.5), 5, 20.0, 32, INTENSITY)
    assert (crop2[2, 0] > (300 + 1300) / 2 / 1600).mean() == pytest.approx(0.25, abs=0.04)
    # slices around k = 3: 1..5; clamped at the end for k = 6
    np.testing.assert_allclose(crop[:, 0, 0, 0] * 1600, [100, 200, 300, 400, 500], atol=1e-3)
    edge = crop_stack(stack, (6, 19.5, 19.5), 5, 20.0, 32, INTENSITY)
    np.testing.assert_allclose(edge[:, 0, 0, 0] * 1600, [400, 500, 600, 600, 600], atol=1e-3)


def test_left_right_flip_axis_depends_on_orientation():
    sag, ax = make_stack("sagittal"), make_stack("axial")
    assert lr_axis(sag) == "slice" and lr_axis(ax) == "col"
    plain = crop_stack(sag, (3, 15.0, 24.0), 5, 20.0, 16, INTENSITY)
    flipped = crop_stack(sag, (3, 15.0, 24.0), 5, 20.0, 16, INTENSITY, flip_lr=True)
    np.testing.assert_array_equal(flipped, plain[::-1])
    plain = crop_stack(ax, (3, 15.0, 24.0), 3, 20.0, 16, INTENSITY)
    flipped = crop_stack(ax, (3, 15.0, 24.0), 3, 20.0, 16, INTENSITY, flip_lr=True)
    np.testing.assert_array_equal(flipped, plain[:, :, :, ::-1])


def test_clahe_keeps_range_and_raises_local_contrast():
    rng = np.random.default_rng(0)
    image = np.clip(0.4 + 0.05 * rng.standard_normal((64, 64)), 0, 1).astype(np.float32)
    out = apply_clahe(image, 2.0, 8)
    assert out.min() >= 0 and out.max() <= 1 and out.std() > image.std()


def test_csv_readers_handle_nan_unknown_and_bad_values(tmp_path):
    labels = pd.DataFrame([[11] + ["Normal/Mild"] * 25, [12] + ["Severe"] * 24 + [np.nan]],
                          columns=["study_id", *TARGET_COLUMNS])
    labels.to_csv(tmp_path / "train.csv", index=False)
    messages = []
    long = read_labels(tmp_path, logger=messages.append)
    assert len(long) == 50 and (long["label"] == -1).sum() == 1 and (long["label"] == 2).sum() == 24
    assert any("empty label" in m for m in messages)
    labels.iloc[0, 3] = "Mild-ish"
    labels.to_csv(tmp_path / "train.csv", index=False)
    with pytest.raises(DataLayoutError, match="unknown grade 'Mild-ish'"):
        read_labels(tmp_path)
    pd.DataFrame({"study_id": [1, 1], "series_id": [5, 6], "series_description": ["Axial T2", "Coronal T1"]}).to_csv(
        tmp_path / "train_series_descriptions.csv", index=False)
    desc = read_series_descriptions(tmp_path, "train", logger=messages.append)
    assert desc["series_key"].tolist() == ["axial_t2"] and any("Coronal T1" in m for m in messages)
    pd.DataFrame({"study_id": [1], "series_id": [5], "instance_number": [3], "condition": ["Left Foramen"],
                  "level": ["L1/L2"], "x": [1.0], "y": [2.0]}).to_csv(tmp_path / "train_label_coordinates.csv",
                                                                      index=False)
    with pytest.raises(DataLayoutError, match="unknown condition 'Left Foramen'"):
        read_coordinates(tmp_path)
    with pytest.raises(DataLayoutError, match="test_series_descriptions.csv: file not found"):
        read_series_descriptions(tmp_path, "test")


def test_row_ids_round_trip():
    rid = row_id(44036939, "left_neural_foraminal_narrowing", "l1_l2")
    assert rid == "44036939_left_neural_foraminal_narrowing_l1_l2"
    assert parse_row_id(rid) == ("44036939", "left_neural_foraminal_narrowing", "l1_l2")
    with pytest.raises(ValueError, match="unknown condition"):
        parse_row_id("1_spinal_stenosis_l1_l2")
