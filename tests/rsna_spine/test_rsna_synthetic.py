"""The synthetic dataset: severity is anatomy (visible in pixels), never metadata; the layout is Kaggle's."""

import numpy as np
import pandas as pd
import pydicom
import pytest

from rsna_spine.constants import CONDITIONS, LEVELS, TARGET_COLUMNS
from rsna_spine.phantom import NARROWING_RANGES, render, sample_anatomy
from rsna_spine.synthetic import SYNTHETIC_DEFAULTS, generate_study


def plane(anat, axis: str, at: float, z: float, half: float = 16.0, step: float = 0.5):
    """Patient points of a small patch: sagittal (x = at) around (y canal, z) or axial (z) around the canal."""
    u = np.arange(-half, half, step)
    a, b = np.meshgrid(u, u, indexing="ij")
    yc = float(anat.canal_y(np.array([z]))[0])
    if axis == "sagittal":
        pts = np.c_[np.full(a.size, at), yc + a.ravel(), z + b.ravel()]
    else:
        pts = np.c_[anat.center_mm[0] + a.ravel(), yc + b.ravel(), np.full(a.size, z)]
    return pts, a.ravel(), b.ravel()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_severity_is_visible_in_the_pixels(seed):
    """Within a study, the CSF / fat areas that grading reads shrink monotonically with the grade."""
    grades = {c: {lv: 0 for lv in LEVELS} for c in CONDITIONS}
    for condition in ("spinal_canal_stenosis", "left_neural_foraminal_narrowing", "right_subarticular_stenosis"):
        grades[condition].update({"l1_l2": 0, "l3_l4": 1, "l5_s1": 2})
    anat = sample_anatomy(np.random.default_rng(seed), grades)
    discs = anat.disc_z()
    csf, fat, recess = [], [], []
    for level in ("l1_l2", "l3_l4", "l5_s1"):
        z = discs[LEVELS.index(level)]
        pts, _, dz = plane(anat, "sagittal", anat.center_mm[0], z)  # midline sagittal T2: the CSF column
        csf.append(np.sum((render(anat, pts, "T2") > 700) & (np.abs(dz) < 2)))
        pts, _, _ = plane(anat, "sagittal", anat.center_mm[0] + 24.0, z + 4.0)  # left parasagittal T1: foramen fat
        fat.append(np.sum(render(anat, pts, "T1") > 600))
        pts, dx, _ = plane(anat, "axial", 0.0, z)  # axial T2 at the disc: right lateral recess (−x)
        recess.append(np.sum((render(anat, pts, "T2") > 700) & (dx < -10.0)))
    for measure in (csf, fat, recess):
        assert measure[0] > measure[1] > measure[2], measure


def test_narrowing_ranges_are_disjoint():
    for (lo1, hi1), (lo2, hi2) in zip(NARROWING_RANGES[:-1], NARROWING_RANGES[1:]):
        assert lo1 < hi1 < lo2 < hi2


def test_headers_carry_no_grade_and_layout_rows(tmp_path):
    cfg = {**SYNTHETIC_DEFAULTS, "sag_size_px": 32, "sag_spacing_mm": 6.0, "sag_slices": [7, 7], "axial_size_px": 24,
           "axial_spacing_mm": 5.8, "axial_gap_mm": 12.0, "two_stack_fraction": 1.0, "compressed_fraction": 0.0}
    result = generate_study({"cfg": cfg, "study_id": 123, "split": "train", "seed": 4, "root": str(tmp_path)})
    files = sorted((tmp_path / "train_images" / "123").rglob("*.dcm"))
    assert len(files) > 10
    for path in files[:: max(1, len(files) // 12)]:
        ds = pydicom.dcmread(path, stop_before_pixels=True)
        assert ds.Modality == "MR" and ds.BitsAllocated == 16 and len(ds.ImageOrientationPatient) == 6
        text = " ".join(str(el.value) for el in ds.iterall() if el.VR in ("LO", "SH", "LT", "ST", "UT", "CS"))
        assert not any(word in text for word in ("Mild", "Moderate", "Severe", "stenosis", "narrowing"))
        assert not any(el.tag.is_private for el in ds.iterall())
    labels = pd.DataFrame([result["labels"]])
    assert list(labels.columns) == ["study_id", *TARGET_COLUMNS]
    coords = pd.DataFrame(result["coords"])
    assert set(coords.columns) == {"study_id", "series_id", "instance_number", "condition", "level", "x", "y"}
    assert len(coords) == 25 and set(coords["level"]) == {"L1/L2", "L2/L3", "L3/L4", "L4/L5", "L5/S1"}
    # every label point names an instance file that exists in its series folder
    for row in coords.itertuples():
        assert (tmp_path / "train_images" / "123" / str(row.series_id) / f"{row.instance_number}.dcm").is_file()


def test_existing_synthetic_dataset_is_not_rewritten(tiny_dataset):
    """A second preprocess over a root that already holds the dataset reuses it (and the cache's series)."""
    from rsna_spine.preprocess_rsna import main as preprocess

    root, cache = tiny_dataset["root"], tiny_dataset["cache"]
    before = {p: p.stat().st_mtime_ns for p in (root / "train.csv", root / "train_series_descriptions.csv")}
    summary = preprocess(["--config", "configs/rsna_spine/smoke.yaml", "--output-dir",
                          str(tiny_dataset["work"] / "preprocess_again"), "--set", f"paths.data_root={root.as_posix()}",
                          "--set", f"paths.cache_dir={cache.as_posix()}", "--set", "preprocess.n_folds=2"])
    assert "synthetic" not in summary  # nothing generated; only the series without a folder is looked at again
    assert summary["n_series_decoded"] <= summary["n_series_failed"] < summary["n_series_usable"]
    assert {p: p.stat().st_mtime_ns for p in before} == before


def test_study_ids_are_drawn_without_materializing_the_range():
    """generate_dataset draws 7-9 digit study ids from an integer population (an arange of 10**9 would be 8 GB);
    the draw equals the one from the explicit array (checked on a smaller range)."""
    explicit = np.random.default_rng(5).choice(np.arange(10**6, 10**7), size=9, replace=False)
    implicit = 10**6 + np.random.default_rng(5).choice(10**7 - 10**6, size=9, replace=False)
    np.testing.assert_array_equal(explicit, implicit)
