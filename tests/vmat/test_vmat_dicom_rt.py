"""Reading synthetic DICOM-RT patients: masks, dose, CT numbers, prescription, broken cases, RTDOSE export."""

import copy

import numpy as np
import pytest

from tests.vmat.conftest import TINY, dose_on_ct_grid
from vmat.dicom_rt import CaseError, dose_on_grid, find_case_files, load_rt_case
from vmat.dvh import dose_at_volume_percent
from vmat.phantom import generate_case, write_case
from vmat.structures import PROSTATE_STRUCTURES, load_structure_map

REQUIRED = ["PTV70", "PTV56", "Prostate", "Rectum", "Bladder", "Femur_L", "Femur_R"]


@pytest.fixture(scope="module")
def smap():
    return load_structure_map()


def test_generated_patient_is_reproduced(smoke_case, smap):
    """Masks match the generator's analytic structures (Dice > 0.95), the dose matches an independent
    scipy interpolation of the generated RTDOSE, PTV70 D95 agrees within 1 Gy, HU survive slope 0.5."""
    case, folder = smoke_case
    rt = load_rt_case(folder, smap, required=REQUIRED)
    assert rt.grid.shape_zyx == case.hu.shape
    np.testing.assert_allclose(rt.grid.origin_xyz, case.ct_origin_xyz)
    assert rt.grid.spacing_zyx == pytest.approx(case.ct_spacing_zyx)
    assert np.abs(rt.ct_hu - case.hu).max() <= 0.5 * 0.5 + 1e-3  # stored with slope 0.5: rounding only
    for name in PROSTATE_STRUCTURES:
        if name not in case.masks_ct:
            continue
        truth, got = case.masks_ct[name], rt.masks[name]
        dice = 2 * (truth & got).sum() / (truth.sum() + got.sum())
        assert dice > 0.95, (name, dice)
    truth_dose = dose_on_ct_grid(case)
    assert np.abs(rt.dose_gy - truth_dose).max() < 1e-3 * case.dose.max()  # DoseGridScaling quantization only
    d95_truth = dose_at_volume_percent(truth_dose[case.masks_ct["PTV70"]], 95)
    d95_read = dose_at_volume_percent(rt.dose_gy[rt.masks["PTV70"]], 95)
    assert abs(d95_read - d95_truth) < 1.0
    assert rt.prescription_gy == 70.0 and rt.prescription_source.startswith("RTPLAN TargetPrescriptionDose")
    assert rt.target_doses_gy == {"PTV70": 70.0, "PTV56": 56.0}
    assert set(rt.unmatched_rois) == {"Couch_Surface", "z_PTV70_ring", "PTV70_eval", "Rectum_PRV5", "Marker_1"}
    assert rt.uids["frame_of_reference_uid"]


def test_files_are_found_by_modality_not_name(smoke_case):
    _, folder = smoke_case
    found = find_case_files(folder)
    assert {"CT", "RTSTRUCT", "RTDOSE", "RTPLAN"} <= set(found)
    assert all(not p.name.startswith(("CT", "RS", "RD", "RP")) for entries in found.values() for p, _ in entries)


@pytest.fixture(scope="module")
def tiny_case():
    return generate_case(copy.deepcopy(TINY), 0, 11)


@pytest.mark.parametrize("broken, code, message", [
    ("missing_ptv56", "missing_structure", "PTV56"),
    ("missing_rtdose", "no_rtdose", "no RTDOSE"),
    ("contour_outside_ct", "contour_outside_ct", "outside the CT"),
    ("mismatched_frame", "mixed_frame_of_reference", "frame of reference"),
    ("compressed_ct", "ct_unreadable", "1.2.840.10008.1.2.4.100"),
    ("dose_outside_ct", "dose_outside_ct", "does not overlap the CT"),
    ("empty_contour", "empty_contour", "Rectum"),
])
def test_broken_cases_raise_a_reason(tmp_path, tiny_case, smap, broken, code, message):
    folder = write_case(tiny_case, tmp_path / broken, TINY, 11, broken=broken)
    with pytest.raises(CaseError, match=message) as info:
        load_rt_case(folder, smap, required=REQUIRED)
    assert info.value.code == code


def test_prescription_fallbacks(tmp_path, tiny_case, smap):
    folder = write_case(tiny_case, tmp_path / "no_rx", TINY, 11, broken="no_prescription")
    rt = load_rt_case(folder, smap, required=REQUIRED)
    assert rt.prescription_source == "RTPLAN BeamDose x NumberOfFractionsPlanned"
    assert rt.prescription_gy == pytest.approx(70.0, rel=1e-4)
    folder = write_case(tiny_case, tmp_path / "no_plan", TINY, 11, broken="no_rtplan")
    rt = load_rt_case(folder, smap, required=REQUIRED, fallback_prescription_gy=72.0)
    assert rt.prescription_gy == 72.0 and any("fallback" in w for w in rt.warnings)
    with pytest.raises(CaseError, match="no_prescription"):
        load_rt_case(folder, smap, required=REQUIRED, fallback_prescription_gy=None)


def test_rtdose_export_round_trip(tmp_path, tiny_npz):
    """A dose exported as RTDOSE on the CT frame of reference reads back onto the same grid."""
    from vmat.case_io import list_cases, load_case
    from vmat.dicom_rt import Grid
    from vmat.export import export_rtdose

    case = load_case(list_cases(tiny_npz)[0])
    dose = case["dose"] * 0.97 + 0.5 * case["possible_dose_mask"]
    path = export_rtdose(tmp_path / "pred_RD.dcm", dose, case)
    grid = Grid(origin_xyz=case["origin_mm"][::-1], spacing_zyx=tuple(case["spacing_mm"]), shape_zyx=dose.shape)
    import pydicom

    header = pydicom.dcmread(str(path), stop_before_pixels=True)
    assert header.FrameOfReferenceUID == case["meta"]["uids"]["frame_of_reference_uid"]
    assert header.Modality == "RTDOSE" and header.DoseUnits == "GY"
    back = dose_on_grid([(path, header)], grid, header.FrameOfReferenceUID, "linear", [])
    np.testing.assert_allclose(back, dose, atol=1e-6 * dose.max() + 1e-6)
