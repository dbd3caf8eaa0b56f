"""preprocess_vmat.py: NPZ format, manifest with skip reasons, no partial outputs, OpenKBP layout."""

import copy
import csv

import numpy as np
import pytest

from tests.vmat.conftest import TINY
from vmat.case_io import CaseFileError, load_case
from vmat.phantom import generate_case, write_case
from vmat.preprocess_vmat import _crop_case, main

KEYS = {"ct", "dose", "masks", "sdf", "structure_names", "structure_present", "spacing_mm", "origin_mm",
        "prescription_gy", "possible_dose_mask", "meta_json"}


def test_npz_format_and_allow_pickle_false(tiny_npz):
    path = sorted(tiny_npz.glob("*.npz"))[0]
    with np.load(path, allow_pickle=False) as data:
        assert KEYS <= set(data.files)
        assert data["masks"].dtype == np.uint8 and data["masks"].shape[1:] == data["ct"].shape
        assert list(data["structure_names"])[:2] == ["PTV70", "PTV56"]
        assert data["spacing_mm"].tolist() == [10.0, 12.0, 12.0]
    case = load_case(path)
    assert case["prescription_gy"] == 70.0
    assert case["meta"]["target_doses_gy"] == {"PTV70": 70.0, "PTV56": 56.0}
    sdf, masks = case["sdf"], case["masks"].astype(bool)
    assert np.all(sdf[masks] < 0) and np.all(sdf[~masks & (case["structure_present"][:, None, None, None] > 0)] > 0)
    assert -1.0 <= sdf.min() and sdf.max() <= 1.0
    with open(tiny_npz / "manifest.csv", encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["status"] for r in rows] == ["ok"] * 3
    assert float(rows[0]["top_target_d95_gy"]) > 0.8 * 70 and "Couch_Surface" in rows[0]["unmatched_rois"]


@pytest.fixture(scope="module")
def mixed_raw(tmp_path_factory):
    raw = tmp_path_factory.mktemp("vmat_mixed")
    case = generate_case(copy.deepcopy(TINY), 0, 5)
    write_case(case, raw / "good", TINY, 5)
    write_case(case, raw / "nonsib", TINY, 5, broken="missing_ptv56")
    write_case(case, raw / "nodose", TINY, 5, broken="missing_rtdose")
    (raw / "empty").mkdir()
    return raw


def _check_mixed(summary, out):
    assert summary["n_ok"] == 1 and summary["n_skipped"] == 3
    reasons = summary["skipped"]
    assert reasons["nonsib"].startswith("missing_structure") and "non-SIB" in reasons["nonsib"]
    assert reasons["nodose"].startswith("no_rtdose")
    assert reasons["empty"].startswith("no_dicom")
    assert sorted(p.name for p in out.glob("*.npz")) == ["good.npz"]  # no partial file of a skipped case
    assert (out / "manifest.csv").is_file() and (out / "preprocessing.json").is_file()
    assert (out / "summary.json").is_file()  # the output folder is also the run folder


def test_batch_skips_broken_cases_with_reasons(mixed_raw, tmp_path, capsys):
    # the deprecated spellings of --data / --output-dir still work, with a one-line notice each
    _check_mixed(main(["--input", str(mixed_raw), "--output", str(tmp_path), "--set", "preprocess.num_workers=1"]), tmp_path)
    err = capsys.readouterr().err
    assert "--input is deprecated; use --data" in err and "--output is deprecated; use --output-dir" in err


@pytest.mark.slow
def test_batch_in_spawned_worker_processes(mixed_raw, tmp_path):
    _check_mixed(main(["--data", str(mixed_raw), "--output-dir", str(tmp_path), "--set", "preprocess.num_workers=2"]), tmp_path)


def test_crop_keeps_origin_consistent():
    arrays = {"ct": np.arange(5 * 6 * 7, dtype=np.float32).reshape(5, 6, 7), "dose": None,
              "masks": np.zeros((1, 5, 6, 7), bool), "body": np.ones((5, 6, 7), bool)}
    arrays["masks"][0, 2, 3, 3] = True
    out, origin = _crop_case(arrays, (2.0, 1.0, 0.5), np.array([10.0, 20.0, 30.0]), (3, 4, 4), arrays["masks"][0])
    assert out["ct"].shape == (3, 4, 4)
    assert out["ct"][1, 2, 2] == arrays["ct"][2, 3, 3]  # the centre voxel moved to the crop centre
    np.testing.assert_allclose(origin, [10.0 + 1 * 0.5, 20.0 + 1 * 1.0, 30.0 + 1 * 2.0])
    big, _ = _crop_case(arrays, (2.0, 1.0, 0.5), np.zeros(3), (7, 8, 9), arrays["masks"][0])
    assert big["ct"].shape == (7, 8, 9) and (big["ct"] == -1000).sum() == 7 * 8 * 9 - 5 * 6 * 7


def _openkbp_fixture(folder, with_ct=True):
    """A 128^3 OpenKBP patient with a 20^3 body; arrays in OpenKBP's (y, x, z-inferior) axis order."""
    from vmat.openkbp import GRID_SHAPE, write_patient

    ct = np.full(GRID_SHAPE, -1024.0)
    body = np.zeros(GRID_SHAPE, bool)
    body[50:70, 50:70, 50:70] = True
    ct[body] = 40.0
    dose = np.zeros(GRID_SHAPE)
    dose[body] = 10.0
    dose[58:62, 58:62, 55:65] = 70.0
    ptv = np.zeros(GRID_SHAPE, bool)
    ptv[58:62, 58:62, 55:65] = True
    left = np.zeros(GRID_SHAPE, bool)
    left[60:62, 66:69, 52:54] = True  # larger axis-1 index = patient left
    right = np.zeros(GRID_SHAPE, bool)
    right[60:62, 51:54, 52:54] = True
    masks = {"PTV70": ptv, "LeftParotid": left, "RightParotid": right}
    write_patient(folder, ct if with_ct else ct, dose, masks, body, voxel_dimensions=(3.9, 3.9, 2.5))
    if not with_ct:
        (folder / "ct.csv").unlink()
    return ct, dose


def test_openkbp_reader(tmp_path):
    from vmat.openkbp import read_patient, to_canonical

    ct, dose = _openkbp_fixture(tmp_path / "train" / "pt_1")
    _openkbp_fixture(tmp_path / "train" / "pt_2", with_ct=False)
    patient = read_patient(tmp_path / "train" / "pt_1")
    np.testing.assert_allclose(patient["ct"], to_canonical(ct))
    np.testing.assert_allclose(patient["dose"], to_canonical(dose))
    assert patient["spacing_zyx"] == (2.5, 3.9, 3.9)
    names = patient["structure_names"]
    left = np.argwhere(patient["masks"][names.index("LeftParotid")])[:, 2].mean()
    right = np.argwhere(patient["masks"][names.index("RightParotid")])[:, 2].mean()
    assert left > right  # x (last axis) increases toward the patient's left
    # OpenKBP axis 2 runs inferior-ward: its index 52..53 (parotids) ends up near the top after the flip
    assert set(np.argwhere(patient["masks"][names.index("LeftParotid")])[:, 0]) == {127 - 52, 127 - 53}
    out = tmp_path / "npz"
    summary = main(["--format", "openkbp", "--config", "configs/vmat/preprocess_openkbp.yaml",
                    "--data", str(tmp_path / "train"), "--output-dir", str(out), "--set", "preprocess.grid.crop_shape=[24,24,24]", "--set", "preprocess.num_workers=1"])
    assert summary["n_ok"] == 1 and summary["skipped"]["pt_2"].startswith("missing_file")
    case = load_case(out / "pt_1.npz")
    assert case["structure_names"][-1] == "PTV70" and case["prescription_gy"] == 70.0
    assert case["ct"].shape == (24, 24, 24) and case["ct"].min() == -1024.0
    assert case["masks"][-1].sum() == 4 * 4 * 10  # the whole PTV inside the crop


def test_openkbp_bad_csv(tmp_path):
    from vmat.dicom_rt import CaseError
    from vmat.openkbp import read_sparse_csv

    bad = tmp_path / "dose.csv"
    bad.write_text("index,value\n1,2\n", encoding="utf-8")
    with pytest.raises(CaseError, match="expected the header ',data'"):
        read_sparse_csv(bad)
    bad.write_text(",data\n99999999,1\n", encoding="utf-8")
    with pytest.raises(CaseError, match="outside the"):
        read_sparse_csv(bad)


def test_load_case_errors_name_file_and_key(tmp_path):
    from common.runlog import save_npz_atomic

    path = save_npz_atomic(tmp_path / "x.npz", ct=np.zeros((2, 2, 2), np.float32))
    with pytest.raises(CaseFileError, match=r"x.npz: missing key\(s\) \['masks'"):
        load_case(path)
    with pytest.raises(CaseFileError, match="not found"):
        load_case(tmp_path / "nope.npz")


def test_resample_to_a_fixed_spacing_keeps_geometry():
    from vmat.preprocess_vmat import _resample_case

    z, y, x = np.meshgrid(np.arange(6) * 4.0, np.arange(8) * 3.0, np.arange(10) * 2.0, indexing="ij")
    dose = (x + 2 * y + 0.5 * z).astype(np.float32)  # linear in mm: reproduced exactly inside the grid
    masks = np.zeros((1, 6, 8, 10), bool)
    masks[0, 2:4, 2:6, 2:8] = True
    arrays = {"ct": dose.copy(), "dose": dose, "masks": masks, "body": np.ones((6, 8, 10), bool)}
    out, spacing, origin = _resample_case(arrays, (4.0, 3.0, 2.0), np.zeros(3), (2.0, 1.5, 1.0))
    assert spacing == (2.0, 1.5, 1.0) and out["dose"].shape == (11, 15, 19)
    z2, y2, x2 = np.meshgrid(np.arange(11) * 2.0, np.arange(15) * 1.5, np.arange(19) * 1.0, indexing="ij")
    np.testing.assert_allclose(out["dose"], x2 + 2 * y2 + 0.5 * z2, rtol=1e-5, atol=1e-3)
    # masks are interpolated linearly and thresholded at 0.5: the box of source voxels z 2..3 (8-12 mm),
    # y 2..5 (6-15 mm), x 2..7 (4-14 mm) reaches half-way to the next voxel centre on each side:
    # z 6-14 mm -> new indices 3..7, y 4.5-16.5 mm -> 3..11, x 3-15 mm -> 3..15
    inside = np.argwhere(out["masks"][0])
    assert inside.min(0).tolist() == [3, 3, 3] and inside.max(0).tolist() == [7, 11, 15]
