"""Stacks by geometry (issue 14): parallel blocks split by a gap, level-to-slice distances in mm with a
tolerance, the choice among two Sagittal T2 series, missing orientation and instance numbers from file names.

Fixtures are written the way real files come: shuffled instance numbers not starting at 1, non-square
pixels, header fields removed with pydicom."""

import numpy as np
import pydicom
import pytest

from common.dicom_series import DicomSeriesError
from rsna_spine.data import load_series
from rsna_spine.inference import choose_axial_slice
from rsna_spine.stacks import assign_level_slice, choose_stack, stack_rank
from rsna_spine.synthetic import StackGeometry

NON_SQUARE = (0.6875, 0.75)  # (row, column) spacing in mm


def _log():
    lines = []
    return lines, lines.append


def _edit(folder, change):
    """Apply ``change(ds)`` to every file of a series folder and save it back."""
    for path in sorted(folder.glob("*.dcm")):
        ds = pydicom.dcmread(path)
        change(ds)
        ds.save_as(path, enforce_file_format=True)


def two_axial_blocks(tmp_path, dicom, gap_between_mm=54.0):
    """Lower block of 4 slices at z = 0..12 mm, upper block of 5 at z = 12 + gap .. (same size, parallel)."""
    lower = dicom.make_geometry("axial", n=4, rows=8, cols=10, gap=4.0, spacing=NON_SQUARE)
    upper = dicom.make_geometry("axial", n=5, rows=8, cols=10, gap=4.0, spacing=NON_SQUARE,
                                origin=(0.0, 0.0, 12.0 + gap_between_mm))
    dicom.write_series(tmp_path / "ax", lower, numbers=[23, 21, 24, 22], description="Axial T2")
    dicom.write_series(tmp_path / "ax", upper, numbers=[13, 11, 15, 12, 14], description="Axial T2")
    return lower, upper


def test_two_parallel_axial_blocks_with_a_gap_become_two_stacks(tmp_path, dicom):
    lower, upper = two_axial_blocks(tmp_path, dicom)
    lines, log = _log()
    counts = {}
    stacks = load_series(tmp_path / "ax", 1, 2, "axial_t2", logger=log, counts=counts)
    assert [s.shape for s in stacks] == [(5, 8, 10), (4, 8, 10)]
    assert counts["gap_splits"] == 1 and counts["files"] == 9
    assert any("gap of 54.0 mm" in line and "new stack" in line for line in lines)
    # canonical axial: slices towards the head; instance numbers follow the positions, not the file order
    assert stacks[0].instance_numbers.tolist() == [13, 11, 15, 12, 14]
    assert stacks[1].instance_numbers.tolist() == [23, 21, 24, 22]
    np.testing.assert_allclose(stacks[1].slice_origins_mm[:, 2], lower.positions[:, 2])
    # non-square pixels: a label pixel (x = column, y = row) lands on the right patient point
    point = upper.positions[2] + 7 * NON_SQUARE[1] * upper.row_dir + 5 * NON_SQUARE[0] * upper.col_dir
    kji = stacks[0].label_to_voxel(15, 7, 5)
    np.testing.assert_allclose(stacks[0].voxel_to_patient(kji)[0], point, atol=1e-6)


def test_a_level_27_mm_from_any_slice_is_not_assigned(tmp_path, dicom):
    two_axial_blocks(tmp_path, dicom)
    stacks = load_series(tmp_path / "ax", 1, 2, "axial_t2")
    level = np.array([3.0, 2.0, 12.0 + 27.0])  # 27 mm above the lower block, 27 mm below the upper one
    found = assign_level_slice(stacks, level)
    assert not found["ok"] and found["distance_mm"] == pytest.approx(27.0, abs=1e-3)
    assert "27.0 mm away (tolerance 4.0 mm)" in found["reason"]
    assert choose_axial_slice(stacks, level) is None
    assert assign_level_slice(stacks, level, max_distance_mm=30.0)["ok"]  # an explicit, larger tolerance
    inside = assign_level_slice(stacks, np.array([3.0, 2.0, 13.0]))  # 1 mm above the lower block's top slice
    assert inside["ok"] and inside["stack"] is stacks[1] and inside["k"] == 3
    assert inside["distance_mm"] == pytest.approx(1.0, abs=1e-3)
    between = assign_level_slice(stacks, np.array([3.0, 2.0, 72.0]))  # between slices 1 and 2 of the upper block
    assert between["ok"] and between["stack"] is stacks[0] and between["distance_mm"] == pytest.approx(2.0, abs=1e-3)
    outside = assign_level_slice(stacks, np.array([300.0, 2.0, 13.0]))
    assert not outside["ok"] and "outside every axial image" in outside["reason"]
    assert assign_level_slice([], level)["reason"] == "no axial stack"


def test_uneven_gaps_below_the_factor_stay_one_stack_with_exact_positions(tmp_path, dicom):
    z = np.array([0.0, 4.0, 8.0, 14.0, 18.0])  # one gap of 6 mm: 1.5 x the median, below 2.5
    geom = dicom.make_geometry("axial", n=5, rows=8, cols=8)
    geom = StackGeometry(np.c_[np.zeros(5), np.zeros(5), z], geom.row_dir, geom.col_dir, geom.spacing_rc,
                         geom.shape_rc, thickness_mm=4.0)
    dicom.write_series(tmp_path / "ax", geom, numbers=[105, 101, 103, 102, 104], description="Axial T2")
    (stack,) = load_series(tmp_path / "ax", 1, 2, "axial_t2")
    np.testing.assert_allclose(stack.slice_origins_mm[:, 2], z)
    found = assign_level_slice([stack], np.array([1.0, 1.0, 11.5]))  # 3.5 mm above slice 2, 2.5 below slice 3
    assert found["ok"] and found["k"] == 3 and found["distance_mm"] == pytest.approx(2.5, abs=1e-3)


def test_two_sagittal_t2_series_choose_coverage_then_pixel_size(tmp_path, dicom):
    def series(name, series_id, n, gap, rows, spacing):
        geom = dicom.make_geometry("sagittal", n=n, rows=rows, cols=6, gap=gap, spacing=spacing)
        dicom.write_series(tmp_path / name, geom, numbers=np.arange(n)[::-1] + 40)
        return load_series(tmp_path / name, 1, series_id, "sag_t2")[0]

    narrow = series("narrow", 10, n=3, gap=4.0, rows=80, spacing=(2.0, 2.0))  # 12 mm slab: misses the foramina
    wide_coarse = series("coarse", 20, n=15, gap=3.5, rows=40, spacing=(4.0, 4.0))
    wide_fine = series("fine", 30, n=15, gap=3.5, rows=80, spacing=(2.0, 2.0))
    assert choose_stack([narrow, wide_coarse]) is wide_coarse  # coverage first, whatever the listed order
    assert choose_stack([wide_coarse, narrow]) is wide_coarse
    lines, log = _log()
    assert choose_stack([wide_coarse, wide_fine, narrow], logger=log) is wide_fine  # same coverage: finer pixels
    assert stack_rank(wide_fine)[0] == stack_rank(wide_coarse)[0] == 2.0
    assert "chose series 30" in lines[0] and choose_stack([]) is None


def test_missing_orientation_is_skipped_or_an_error_never_guessed(tmp_path, dicom):
    geom = dicom.make_geometry("sagittal", n=5)
    dicom.write_series(tmp_path / "s", geom, numbers=[8, 6, 10, 7, 9])
    ds = pydicom.dcmread(tmp_path / "s" / "10.dcm")
    del ds.ImageOrientationPatient
    ds.save_as(tmp_path / "s" / "10.dcm", enforce_file_format=True)
    lines, log = _log()
    counts = {}
    (stack,) = load_series(tmp_path / "s", 1, 2, "sag_t2", logger=log, counts=counts)
    assert stack.shape[0] == 4 and 10 not in stack.instance_numbers.tolist() and stack.orientation == "sagittal"
    assert counts["skipped_geometry"] == 1
    assert any("10.dcm" in m and "missing field ImageOrientationPatient" in m and "not guessed" in m for m in lines)
    with pytest.raises(DicomSeriesError, match="10.dcm: missing field ImageOrientationPatient"):
        load_series(tmp_path / "s", 1, 2, "sag_t2", missing_geometry="error")
    _edit(tmp_path / "s", lambda d: delattr(d, "ImageOrientationPatient") if "ImageOrientationPatient" in d else None)
    with pytest.raises(DicomSeriesError, match="no decodable slice"):  # not silently read as axial
        load_series(tmp_path / "s", 1, 2, "sag_t2", logger=log)


def test_instance_numbers_from_file_names_when_headers_lack_them(tmp_path, dicom):
    geom = dicom.make_geometry("sagittal", n=5, spacing=NON_SQUARE)
    numbers = [7, 3, 9, 5, 11]
    dicom.write_series(tmp_path / "s", geom, numbers=numbers)
    _edit(tmp_path / "s", lambda d: delattr(d, "InstanceNumber"))
    (tmp_path / "s" / "9.dcm").rename(tmp_path / "s" / "slice_b.dcm")  # not a number: cannot be recovered
    lines, log = _log()
    counts = {}
    (stack,) = load_series(tmp_path / "s", 1, 2, "sag_t2", logger=log, counts=counts)
    assert stack.instance_numbers.tolist() == [7, 3, -1, 5, 11]  # by position, as written
    assert counts["instance_from_name"] == 4
    assert sum("taken from the file name" in m for m in lines) == 4
    assert any("slice_b.dcm" in m and "cannot be matched" in m for m in lines)
    assert stack.label_to_voxel(5, 2.0, 3.0) is not None and stack.label_to_voxel(9, 2.0, 3.0) is None


def test_label_counts_in_the_cache_manifest_no_label_dropped_silently(tmp_path, dicom):
    """A Kaggle layout whose Sagittal T2 headers lack InstanceNumber: its labels still match (file names);
    a listed series without a folder, an unknown instance and an unlisted series are counted by reason."""
    import pandas as pd

    from rsna_spine.cache import build_label_table, decode_all, series_tasks
    from rsna_spine.constants import CONDITIONS, LEVELS, TARGET_COLUMNS
    from rsna_spine.data import StackStore

    root, cache = tmp_path / "kaggle", tmp_path / "cache"
    sag = dicom.make_geometry("sagittal", n=5, rows=12, cols=12, spacing=NON_SQUARE)
    dicom.write_series(root / "train_images" / "1" / "10", sag, numbers=[7, 3, 9, 5, 11])
    _edit(root / "train_images" / "1" / "10", lambda d: delattr(d, "InstanceNumber"))
    axial = dicom.make_geometry("axial", n=3, rows=12, cols=12)
    dicom.write_series(root / "train_images" / "1" / "12", axial, numbers=[2, 4, 6], description="Axial T2")
    pd.DataFrame([[1] + ["Normal/Mild"] * 25], columns=["study_id", *TARGET_COLUMNS]).to_csv(root / "train.csv",
                                                                                           index=False)
    pd.DataFrame({"study_id": [1, 1, 1], "series_id": [10, 11, 12],
                  "series_description": ["Sagittal T2/STIR", "Sagittal T1", "Axial T2"]}).to_csv(
        root / "train_series_descriptions.csv", index=False)
    titles = {c: c.replace("_", " ").title() for c in CONDITIONS}
    coords = [(1, 10, n, titles["spinal_canal_stenosis"], lv.upper().replace("_", "/"), 4.0, 5.0)
              for n, lv in zip([7, 3, 9, 5, 11], LEVELS)]
    coords += [(1, 11, 4, titles["left_neural_foraminal_narrowing"], "L1/L2", 3.0, 3.0),  # folder missing
               (1, 12, 99, titles["left_subarticular_stenosis"], "L1/L2", 3.0, 3.0),  # no such instance
               (1, 77, 1, titles["right_subarticular_stenosis"], "L1/L2", 3.0, 3.0)]  # series not listed
    pd.DataFrame(coords, columns=["study_id", "series_id", "instance_number", "condition", "level", "x", "y"]).to_csv(
        root / "train_label_coordinates.csv", index=False)
    lines, log = _log()
    totals = {}
    index, _ = decode_all(series_tasks(root, "train", cache, [1.0, 99.5], log), 1, log, totals=totals)
    assert totals["instance_from_name"] == 5 and totals["files"] == 8
    counts = {}
    table = build_label_table(root, StackStore(cache, index=index), log, counts=counts)
    assert counts["label_points_read"] == 8 and counts["label_points_matched"] == 5
    assert counts["label_points_dropped"] == 3
    assert sorted(counts["label_points_dropped_by_reason"]) == [
        "instance not among the decoded slices", "series missing",
        "series not listed in the series descriptions"]
    assert counts["graded_targets"] == 25 and counts["graded_with_point"] == 5
    assert counts["graded_without_coordinate_row"] == 25 - 8 and counts["graded_point_dropped"] == 3
    spinal = table[table["condition"] == "spinal_canal_stenosis"].sort_values("level")
    assert spinal["k"].notna().all() and spinal["series_id"].tolist() == [10] * 5


def test_preprocess_writes_the_cache_manifest_with_label_counts(tiny_dataset):
    import json

    manifest = json.loads((tiny_dataset["cache"] / "cache_manifest.json").read_text(encoding="utf-8"))
    labels = manifest["labels"]
    assert labels["label_points_read"] == labels["label_points_matched"] + labels["label_points_dropped"]
    assert sum(labels["label_points_dropped_by_reason"].values()) == labels["label_points_dropped"]
    assert manifest["decode_counts"]["files"] > 0 and manifest["missing_geometry"] == "skip"
    assert tiny_dataset["summary"]["labels"] == labels
