"""Dose-grid coverage and geometry refused rather than guessed, on DICOM-RT written with pydicom
(tests/vmat/rt_fixture.py: non-square pixels, shuffled slice files, an RTDOSE grid of its own that is
shorter than the body)."""

import csv

import numpy as np
import pytest

from tests.vmat.rt_fixture import CT_Z, DX, DY, NX, NY, X0, Y0, linear_dose, write_patient
from vmat.dicom_rt import CaseError, load_rt_case
from vmat.structures import load_structure_map

REQUIRED = ["PTV70", "PTV56", "Prostate", "Rectum", "Bladder", "Femur_L", "Femur_R"]
COVERED = (CT_Z >= -15.0) & (CT_Z <= 15.0)  # CT planes within the RTDOSE voxel centres (-15 .. 15 mm)


@pytest.fixture(scope="module")
def smap():
    return load_structure_map()


@pytest.fixture(scope="module")
def patient(tmp_path_factory):
    return write_patient(tmp_path_factory.mktemp("rt_fixture") / "pat_a")


def test_dose_outside_the_rtdose_grid_is_unknown_not_zero(patient, smap):
    rt = load_rt_case(patient, smap, required=REQUIRED)
    assert rt.dose_valid is not None and rt.dose_valid.shape == rt.ct_hu.shape
    np.testing.assert_array_equal(rt.dose_valid.all(axis=(1, 2)), COVERED)
    np.testing.assert_array_equal(rt.dose_valid.any(axis=(1, 2)), COVERED)
    zz, yy, xx = np.meshgrid(CT_Z, Y0 + DY * np.arange(NY), X0 + DX * np.arange(NX), indexing="ij")
    truth = linear_dose(xx, yy, zz)
    known = rt.dose_valid
    assert np.abs(rt.dose_gy[known] - truth[known]).max() < 2e-3  # linear dose: trilinear is exact
    fem = rt.masks["Femur_L"]
    assert fem[known].sum() / fem.sum() == pytest.approx(11 / 17)
    assert rt.contours["Femur_L"] and len(rt.contours["Femur_L"]) == 17


@pytest.fixture(scope="module")
def preprocessed(patient, tmp_path_factory):
    from vmat.preprocess_vmat import main

    out = tmp_path_factory.mktemp("rt_fixture_npz")
    summary = main(["--data", str(patient.parent), "--output-dir", str(out), "--set", "preprocess.sanity.enforce=false"])
    assert summary["n_ok"] == 1, summary["skipped"]
    return out, summary


def test_coverage_travels_in_the_npz_and_manifest(preprocessed):
    from vmat.case_io import load_case

    out, summary = preprocessed
    case = load_case(out / "pat_a.npz")
    valid = case["dose_valid_mask"].astype(bool)
    np.testing.assert_array_equal(valid.all(axis=(1, 2)), COVERED)
    assert case["meta"]["dose_coverage"]["Femur_L"] == pytest.approx(11 / 17)
    assert case["meta"]["coverage_flagged"] == ["Femur_L", "Femur_R"]  # bladder/rectum: 11/11 planes covered
    assert "contour_index" in case and len(case["contour_index"]) > 0
    rows = list(csv.DictReader((out / "manifest.csv").open(encoding="utf-8")))
    assert float(rows[0]["dose_coverage_Femur_L"]) == pytest.approx(11 / 17, abs=1e-4)
    assert "Femur_L 64.7% inside the RTDOSE grid" in rows[0]["coverage_flags"]
    assert "pat_a" in summary["coverage_flagged"]


def test_unknown_dose_never_counts_as_zero_in_metrics(preprocessed):
    """The femoral head's D95 is read from its covered part (about 42 Gy of the linear field there), not
    the 0 Gy the voxels outside the grid hold; a prediction wrong only there changes nothing."""
    from vmat.case_io import load_case
    from vmat.evaluation import evaluate_case

    out, _ = preprocessed
    case = load_case(out / "pat_a.npz")
    valid = case["dose_valid_mask"].astype(bool)
    pred = case["dose"].copy()
    pred[~valid] = 99.0  # anything: there is no reference there
    cfg = {"implementation": "torch", "criteria": [[3.0, 3.0]], "lower_percent_cutoff": 10.0, "local": False,
           "max_gamma": 2.0, "interp_fraction": 5, "random_subset": None, "device": "cpu"}
    row, maps = evaluate_case(case, pred, cfg, constraints=[])
    assert row["mae_body_gy"] == 0.0 and row["openkbp_dose_score"] == 0.0
    assert row["gamma_3_3_pass_pct"] == 100.0 and np.isnan(maps["3%/3mm"][~valid]).all()
    d95 = row["ref_Femur_L_D95%"]
    # not 0 Gy; the reference is read on its RTDOSE grid, the prediction on the CT grid: for this linear
    # dose the two agree to float32 rounding
    assert 40.0 < d95 < 45.0 and abs(row["diff_Femur_L_D95%"]) < 1e-3
    assert row["dose_coverage_Femur_L"] == pytest.approx(11 / 17)
    assert "Femur_L" in row["coverage_flagged"] and row["dvh_method_Femur_L"] == "contour"
    # all DVH metrics reach the row: OAR D95/D2/D0.03cc/Dmax_point/V_xGy, target D99..D2, HI, CI
    for key in ("ref_Rectum_D2%", "ref_Rectum_D95%", "ref_Rectum_D0.03cc", "ref_Rectum_Dmax_point",
                "ref_Rectum_V50Gy", "ref_PTV70_D99%", "ref_PTV70_HI", "ref_PTV70_ci_paddick"):
        assert key in row, key


def test_training_loss_ignores_unknown_dose():
    import torch

    from vmat.data import make_input_spec
    from vmat.defaults import defaults
    from vmat.losses import DoseLoss

    spec = make_input_spec(["PTV70", "Rectum"], {"PTV70": 70.0}, defaults()["input"], 50.0)
    cfg = {**defaults()["loss"], "gradient_weight": 0.1, "dvh_weight": 0.5}
    loss = DoseLoss(cfg, spec, [])
    shape = (1, 1, 8, 8, 8)
    target = torch.rand(shape)
    valid = torch.ones(shape)
    valid[..., :3] = 0
    pred = target.clone()
    pred[..., :3] = 5.0  # wrong only where the reference is unknown
    masks = torch.ones((1, 2, 8, 8, 8))
    batch = {"target": target, "body": torch.ones(shape), "masks": masks, "valid": valid, "rx_gy": torch.tensor([70.0]),
             "input": torch.zeros((1, 5, 8, 8, 8))}
    total, terms = loss(pred, batch)
    assert terms["base"] == 0.0 and terms["dvh"] == pytest.approx(0.0, abs=1e-6)
    del batch["valid"]
    assert loss(pred, batch)[1]["base"] > 0.5


def test_patches_carry_the_valid_mask(preprocessed):
    from vmat.data import PatchDataset, make_input_spec
    from vmat.defaults import defaults

    out, summary = preprocessed
    spec = make_input_spec(summary["structure_names"], summary["target_doses_gy"], defaults()["input"], 50.0)
    ds = PatchDataset([str(out / "pat_a.npz")], spec, [16, 16, 16], 4, augment={"flip_lr": 1.0})
    item = ds[0]
    assert item["valid"].shape == item["target"].shape
    assert float(item["valid"].min()) in (0.0, 1.0)


# ------------------------------------------------------------------------------------- geometry refused
@pytest.mark.parametrize("kwargs, code, message", [
    ({"drop_slice": 7}, "uneven_slices", r"gap\(s\) of 6.00 mm between -12.00 and -6.00"),
    ({"tilt": True}, "gantry_tilt", "GantryDetectorTilt"),
    ({"odd_slice_orientation": True}, "mixed_ct_orientation", "2 different orientations"),
    ({"second_series": True}, "ambiguous_ct_series", "2 CT series"),
    ({"struct_frame": "1.2.3.4.5"}, "mixed_frame_of_reference", "RTSTRUCT frame of reference"),
    ({"dose_files": ("FRACTION",)}, "rtdose_summation", "FRACTION"),
    ({"dose_files": ("BEAM1",)}, "incomplete_beam_doses", r"missing \[2\]"),
    ({"dose_files": ("PLAN", "PLAN")}, "ambiguous_rtdose", "2 RTDOSE files of type PLAN"),
])
def test_geometry_is_refused_with_a_reason(tmp_path, smap, kwargs, code, message):
    folder = write_patient(tmp_path / code, **kwargs)
    with pytest.raises(CaseError, match=message) as info:
        load_rt_case(folder, smap, required=REQUIRED)
    assert info.value.code == code
    if code == "uneven_slices":
        assert "CT series" in str(info.value) and "slice_gaps: interpolate" in str(info.value)


def test_missing_slice_interpolated_when_asked_and_recorded(tmp_path, smap, patient):
    folder = write_patient(tmp_path / "gap", drop_slice=7)
    rt = load_rt_case(folder, smap, required=REQUIRED, ct_slice_gaps="interpolate")
    whole = load_rt_case(patient, smap, required=REQUIRED)
    assert rt.grid.shape_zyx == whole.grid.shape_zyx and rt.grid.interpolated_k == (7,)
    assert rt.repairs and "interpolated to 3.000 mm" in rt.repairs[0] and "1 slice(s) made" in rt.repairs[0]
    np.testing.assert_allclose(rt.ct_hu, whole.ct_hu, atol=1e-3)  # the body is constant in z
    for name in ("PTV70", "Femur_L"):  # the slice has no contours: interpolated from its neighbours
        np.testing.assert_array_equal(rt.masks[name], whole.masks[name])


def test_beam_doses_summed_when_complete(tmp_path, smap, patient):
    folder = write_patient(tmp_path / "beams", dose_files=("BEAM1", "BEAM2"))
    rt = load_rt_case(folder, smap, required=REQUIRED)
    whole = load_rt_case(patient, smap, required=REQUIRED)
    assert np.abs(rt.dose_gy - whole.dose_gy).max() < 2e-3
    assert any("sum of 2 BEAM RTDOSE files (beams [1, 2])" in w for w in rt.warnings)


def test_preprocess_records_interpolation_in_the_manifest(tmp_path):
    from vmat.preprocess_vmat import main

    write_patient(tmp_path / "raw" / "gap", drop_slice=7)
    from common.errors import NothingProcessedError

    with pytest.raises(NothingProcessedError):  # by default the case is skipped, the gap named
        main(["--data", str(tmp_path / "raw"), "--output-dir", str(tmp_path / "a"), "--set",
              "preprocess.sanity.enforce=false"])
    rows = list(csv.DictReader((tmp_path / "a" / "manifest.csv").open(encoding="utf-8")))
    assert rows[0]["status"] == "skipped" and rows[0]["reason"].startswith("uneven_slices: CT series")
    summary = main(["--data", str(tmp_path / "raw"), "--output-dir", str(tmp_path / "b"),
                    "--set", "preprocess.sanity.enforce=false", "--set", "preprocess.ct.slice_gaps=interpolate"])
    rows = list(csv.DictReader((tmp_path / "b" / "manifest.csv").open(encoding="utf-8")))
    assert rows[0]["status"] == "ok" and "CT slices interpolated" in rows[0]["repairs"]
    assert "gap" in summary["repaired"]


def test_validate_reports_coverage(preprocessed, tmp_path):
    """validate_vmat.py: coverage per structure in metrics.csv, flagged structures in summary and report,
    per-case DVH CSV; a perfect prediction scores 0 everywhere although the dose grid is short."""
    from common.runlog import save_npz_atomic
    from vmat.case_io import load_case
    from vmat.validate_vmat import main as validate

    out, _ = preprocessed
    case = load_case(out / "pat_a.npz")
    save_npz_atomic(tmp_path / "pred" / "pat_a.npz", dose=case["dose"])
    summary = validate(["--config", "configs/vmat/validate_smoke.yaml", "--data", str(out), "--predictions",
                        str(tmp_path / "pred"), "--output-dir", str(tmp_path / "v")])
    assert summary["coverage_flagged"] == {"pat_a": "Femur_L 64.7%; Femur_R 64.7%"}
    assert summary["overall"]["dose_coverage_Femur_L"] == pytest.approx(11 / 17)
    assert summary["overall"]["mae_body_gy"] == 0.0 and summary["overall"]["openkbp_dvh_score"] == 0.0
    rows = list(csv.DictReader((tmp_path / "v" / "metrics.csv").open(encoding="utf-8")))
    assert float(rows[0]["dose_coverage_Femur_L"]) == pytest.approx(11 / 17) and rows[0]["dvh_method_Rectum"] == "contour"
    assert "Femur_L 64.7%" in (tmp_path / "v" / "report.md").read_text(encoding="utf-8")
    dvh = list(csv.DictReader((tmp_path / "v" / "dvh" / "pat_a.csv").open(encoding="utf-8")))
    assert {r["structure"] for r in dvh} >= {"PTV70", "Femur_L"} and float(dvh[0]["reference_volume_pct"]) == 100.0
