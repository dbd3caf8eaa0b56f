"""Which copy of the reference dose DVHs read, and the end-cap conventions.

Clinical DVH tools read the RTDOSE on its own grid. Reading the copy resampled onto the CT grid
interpolates twice (RTDOSE -> CT grid -> sample point), which smooths a curved dose: on the synthetic
patients of configs/vmat/phantom.yaml it put PTV70 D99 0.6-0.7 Gy lower than the same samples read from
the RTDOSE (vmat/README.md). Here: the native dose travels from the DICOM files into the NPZ, samples
read a dose on another grid at the right patient positions, and validate-style metrics use it.
"""

import math

import numpy as np
import pytest

from tests.vmat.rt_fixture import linear_dose, write_patient
from tests.vmat.test_vmat_dvh_subvoxel import circle, make_case
from vmat.dicom_rt import load_rt_case
from vmat.dvh import DVH_DEFAULTS, contour_samples, reference_dose, voxel_samples
from vmat.structures import load_structure_map

REQUIRED = ["PTV70", "PTV56", "Prostate", "Rectum", "Bladder", "Femur_L", "Femur_R"]


@pytest.fixture(scope="module")
def smap():
    return load_structure_map("configs/vmat/structure_map.json")


def test_rtdose_on_its_own_grid_travels_with_the_case(tmp_path, smap):
    rt = load_rt_case(write_patient(tmp_path / "pat"), smap, required=REQUIRED)
    dose, origin_zyx, spacing_zyx = rt.rtdose_native
    # the fixture's RTDOSE: z -15 .. 15 every 2.5 mm, y from -82.5 every 5 mm, x from -74 every 6 mm
    np.testing.assert_allclose(origin_zyx, [-15.0, -82.5, -74.0])
    np.testing.assert_allclose(spacing_zyx, [2.5, 5.0, 6.0])
    z, y, x = (o + s * np.arange(n) for o, s, n in zip(origin_zyx, spacing_zyx, dose.shape))
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    assert np.abs(dose - linear_dose(xx, yy, zz)).max() < 2e-3  # DoseGridScaling quantization only
    beams = load_rt_case(write_patient(tmp_path / "beams", dose_files=("BEAM1", "BEAM2")), smap, required=REQUIRED)
    assert np.abs(beams.rtdose_native[0] - dose).max() < 2e-3  # two beam doses on one grid: summed there


def test_samples_read_a_dose_on_another_grid_at_their_patient_positions():
    """A linear dose is exact under trilinear interpolation, so the samples must read f(position) from
    either grid; an offset or a swapped axis in the grid conversion would show."""
    f = lambda z, y, x: 10.0 + 0.7 * z - 0.3 * y + 0.2 * x  # noqa: E731
    polys = [(z, circle(12.0) + [3.0, -2.0]) for z in np.arange(-9.0, 9.1, 3.0)]
    origin, spacing, shape = np.array([-30.0, -31.0, -29.5]), (3.0, 2.0, 2.5), (21, 32, 25)
    smp = contour_samples(polys, origin, spacing, shape, 1.0)
    world = origin + smp.coords * np.asarray(spacing)
    other_origin, other_spacing = np.array([-33.3, -35.0, -40.1]), np.array([2.5, 3.0, 4.0])
    axes = [o + s * np.arange(n) for o, s, n in zip(other_origin, other_spacing, (30, 26, 22))]
    other = f(*np.meshgrid(*axes, indexing="ij"))
    np.testing.assert_allclose(smp.doses(other, (other_origin, other_spacing)), f(*world.T), atol=1e-9)
    own = f(*np.meshgrid(*[o + s * np.arange(n) for o, s, n in zip(origin, spacing, shape)], indexing="ij"))
    a, b = smp.dvh(own), smp.dvh(other, (other_origin, other_spacing))
    assert a.dose_at_percent(95) == pytest.approx(b.dose_at_percent(95), abs=0.005)  # one 0.005 Gy bin
    mask = np.zeros(shape, bool)
    mask[8:12, 10:20, 9:15] = True
    vox = voxel_samples(mask, spacing, origin_zyx_mm=origin)
    np.testing.assert_allclose(vox.doses(other, (other_origin, other_spacing)), own[mask], atol=1e-9)
    with pytest.raises(ValueError, match="origin and spacing"):
        voxel_samples(mask, spacing).doses(other, (other_origin, other_spacing))


def test_reference_dose_choice():
    case = {"dose": np.zeros((2, 2, 2)), "rtdose_gy": np.ones((3, 3, 3)), "rtdose_origin_mm": np.zeros(3),
            "rtdose_spacing_mm": np.ones(3)}
    dose, grid = reference_dose(case, DVH_DEFAULTS)
    assert DVH_DEFAULTS["reference_dose"] == "rtdose" and dose.shape == (3, 3, 3) and grid is not None
    dose, grid = reference_dose(case, {**DVH_DEFAULTS, "reference_dose": "ct_grid"})
    assert dose.shape == (2, 2, 2) and grid is None
    dose, grid = reference_dose({"dose": np.zeros((2, 2, 2))}, DVH_DEFAULTS)  # OpenKBP: no RTDOSE
    assert dose.shape == (2, 2, 2) and grid is None
    with pytest.raises(ValueError, match="reference_dose"):
        reference_dose(case, {**DVH_DEFAULTS, "reference_dose": "native"})


@pytest.fixture(scope="module")
def npz_folder(tmp_path_factory):
    """The fixture patient preprocessed (its RTDOSE grid ends at z = +-15 mm, inside the femoral heads)."""
    from vmat.preprocess_vmat import main as preprocess

    root = tmp_path_factory.mktemp("dvh_reference")
    write_patient(root / "raw" / "pat")
    preprocess(["--data", str(root / "raw"), "--output-dir", str(root / "npz"), "--set",
                "preprocess.sanity.enforce=false"])
    return root / "npz"


def curved_case(npz_folder):
    """The case with a reference curved in x (quadratic) on its RTDOSE grid: the CT-grid copy (still the
    linear dose) then differs from it between grid points."""
    from vmat.case_io import load_case

    case = load_case(npz_folder / "pat.npz")
    assert case["rtdose_gy"].shape == (13, 33, 25)
    z, y, x = (o + s * np.arange(n) for o, s, n in zip(case["rtdose_origin_mm"], case["rtdose_spacing_mm"],
                                                       case["rtdose_gy"].shape))
    case["rtdose_gy"] = np.broadcast_to(40.0 + 0.02 * (x - 3.0) ** 2, case["rtdose_gy"].shape).astype(np.float32)
    return case


def test_validation_reads_the_reference_on_its_rtdose_grid(npz_folder):
    """End to end through preprocessing and evaluate_case: the NPZ carries the RTDOSE, and the reference
    metrics equal those read from it, not from the CT-grid copy (which differs where the dose is curved)."""
    from vmat.dvh import case_samples
    from vmat.evaluation import evaluate_case

    case = curved_case(npz_folder)
    row, _ = evaluate_case(case, case["dose"], compute_gamma_maps=False)
    samples = case_samples(case, DVH_DEFAULTS)
    native = samples["PTV70"].dvh(*reference_dose(case, DVH_DEFAULTS))
    copy = samples["PTV70"].dvh(case["dose"])
    assert row["ref_PTV70_Dmean"] == pytest.approx(float(np.average(native.d, weights=native.w)))
    assert not math.isclose(row["ref_PTV70_Dmean"], float(np.average(copy.d, weights=copy.w)), abs_tol=1e-3)


def test_plane_dose_end_cap_keeps_the_volume_and_reads_the_end_planes():
    """half_slice_plane_dose (dicompyler-core's convention): the half_slice volume, but the outer half slabs
    take their end plane's dose; in a dose rising along z the hottest samples then read the top plane."""
    polys, origin, spacing, dose, _ = make_case("sphere", 3.0, 2.0)
    sampled = contour_samples(polys, origin, spacing, dose.shape, 1.0, end_cap="half_slice")
    plane = contour_samples(polys, origin, spacing, dose.shape, 1.0, end_cap="half_slice_plane_dose")
    assert plane.volume_cc == pytest.approx(sampled.volume_cc, rel=1e-12)
    top = max(z for z, _ in polys)
    assert plane.dvh(dose).d.max() == pytest.approx(50.0 + 0.5 * top)  # sphere_dose = 50 + 0.5 z
    assert sampled.dvh(dose).d.max() > 50.0 + 0.5 * top + 0.4  # the sampled cap reaches above the plane


def test_a_perfect_prediction_scores_zero_although_the_two_readings_differ(npz_folder):
    """The prediction lives on the CT grid: its DVH errors and constraint agreement are measured against the
    reference read there, so the reference's own CT-grid copy scores 0; the clinical values (ref_*) and the
    gap between the readings stay reported."""
    from vmat.evaluation import evaluate_case

    case = curved_case(npz_folder)
    row, _ = evaluate_case(case, case["dose"], compute_gamma_maps=False)
    assert row["dvh_reference_grid"] == "rtdose"
    diffs = {k: v for k, v in row.items() if k.startswith("diff_") and np.isfinite(v)}
    assert len(diffs) > 50 and max(abs(v) for v in diffs.values()) == 0.0
    assert row["constraints_agree_pct"] == 100.0
    gap = row["refgrid_gap_PTV70_Dmean"]
    assert abs(gap) > 0.05 and gap == pytest.approx(row["ref_PTV70_Dmean"] - row["pred_PTV70_Dmean"], abs=1e-9)
    # the CT-grid reading: no second reading, no gap columns
    row_ct, _ = evaluate_case(case, case["dose"], compute_gamma_maps=False,
                              dvh_cfg={**DVH_DEFAULTS, "reference_dose": "ct_grid"})
    assert row_ct["dvh_reference_grid"] == "ct_grid" and not any(k.startswith("refgrid_gap_") for k in row_ct)
    assert row_ct["ref_PTV70_Dmean"] == pytest.approx(row["pred_PTV70_Dmean"], abs=1e-9)


def test_structures_partly_outside_the_rtdose_grid_read_only_inside_it(npz_folder):
    """Femur_L reaches 6 planes beyond the RTDOSE grid: its samples are those of the covered part (as on
    the CT-grid path), and every one of them falls inside the RTDOSE's voxel-centre box, so the native
    reading never extends the edge dose outwards."""
    from vmat.dvh import case_samples
    from vmat.evaluation import evaluate_case

    case = curved_case(npz_folder)
    samples = case_samples(case, DVH_DEFAULTS)
    origin, spacing = case["rtdose_origin_mm"], case["rtdose_spacing_mm"]
    smp = samples["Femur_L"]
    world = smp.grid[0] + smp.coords * smp.grid[1]
    index = (world - origin) / spacing
    assert index.min() >= -1e-6 and np.all(index.max(axis=0) <= np.asarray(case["rtdose_gy"].shape) - 1 + 1e-6)
    assert world[:, 0].min() >= -15.0 - 1e-6 and world[:, 0].max() <= 15.0 + 1e-6  # the grid's z centres
    row, _ = evaluate_case(case, case["dose"], compute_gamma_maps=False)
    assert row["dose_coverage_Femur_L"] == pytest.approx(11 / 17) and "Femur_L" in row["coverage_flagged"]
    native = smp.dvh(*reference_dose(case, DVH_DEFAULTS))
    assert row["ref_Femur_L_D95%"] == pytest.approx(native.dose_at_percent(95))
    assert row["volume_cc_Femur_L"] == pytest.approx(smp.volume_cc)


def test_validate_without_rtdose_falls_back_and_says_so(npz_folder, tmp_path):
    """A cache written before the RTDOSE grid was stored still validates: the reference DVHs read the CT-grid
    copy, the log says so, and metrics.csv / summary record the grid read. With the RTDOSE, the DVH CSV
    carries both readings and a perfect prediction matches the CT-grid one."""
    import csv

    from common.runlog import save_npz_atomic
    from vmat.validate_vmat import main as validate

    with np.load(npz_folder / "pat.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    old = tmp_path / "old"
    save_npz_atomic(old / "pat.npz", **{k: v for k, v in arrays.items() if not k.startswith("rtdose_")})
    pred = tmp_path / "pred"
    save_npz_atomic(pred / "pat.npz", dose=arrays["dose"], spacing_mm=arrays["spacing_mm"],
                    origin_mm=arrays["origin_mm"])
    runs = {}
    for label, data in (("old", old), ("new", npz_folder)):
        runs[label] = tmp_path / f"v_{label}"
        summary = validate(["--config", "configs/vmat/validate_smoke.yaml", "--data", str(data), "--predictions",
                            str(pred), "--output-dir", str(runs[label])])
        assert summary["dvh_reference_grid"] == {"pat": "ct_grid" if label == "old" else "rtdose"}
        rows = list(csv.DictReader((runs[label] / "metrics.csv").open(encoding="utf-8")))
        assert rows[0]["dvh_reference_grid"] == summary["dvh_reference_grid"]["pat"]
        assert float(rows[0]["diff_PTV70_D95%"]) == 0.0
    assert "has no 'rtdose_gy'" in (runs["old"] / "log.txt").read_text(encoding="utf-8")
    assert "has no 'rtdose_gy'" not in (runs["new"] / "log.txt").read_text(encoding="utf-8")
    old_csv = list(csv.DictReader((runs["old"] / "dvh" / "pat.csv").open(encoding="utf-8")))
    new_csv = list(csv.DictReader((runs["new"] / "dvh" / "pat.csv").open(encoding="utf-8")))
    assert "reference_ct_grid_volume_pct" not in old_csv[0] and "reference_ct_grid_volume_pct" in new_csv[0]
    assert all(r["prediction_volume_pct"] == r["reference_ct_grid_volume_pct"] for r in new_csv)


def test_a_prediction_on_another_grid_is_refused(npz_folder, tmp_path):
    from common.runlog import save_npz_atomic
    from vmat.case_io import CaseFileError, load_case, load_prediction

    case = load_case(npz_folder / "pat.npz")
    grid = (case["spacing_mm"], case["origin_mm"])
    save_npz_atomic(tmp_path / "ok.npz", dose=case["dose"], spacing_mm=case["spacing_mm"], origin_mm=case["origin_mm"])
    assert load_prediction(tmp_path / "ok.npz", case["dose"].shape, grid)["dose"].shape == case["dose"].shape
    save_npz_atomic(tmp_path / "bare.npz", dose=case["dose"])  # no grid stored: only the shape is checked
    load_prediction(tmp_path / "bare.npz", case["dose"].shape, grid)
    for key, shift in (("spacing_mm", [0.0, 0.5, 0.0]), ("origin_mm", [2.0, 0.0, 0.0])):
        arrays = {"spacing_mm": case["spacing_mm"], "origin_mm": case["origin_mm"]}
        arrays[key] = np.asarray(arrays[key]) + shift
        save_npz_atomic(tmp_path / f"{key}.npz", dose=case["dose"], **arrays)
        with pytest.raises(CaseFileError, match=f"{key}.npz: key '{key}'.*another grid"):
            load_prediction(tmp_path / f"{key}.npz", case["dose"].shape, grid)


def test_a_broken_rtdose_in_the_npz_is_refused(npz_folder, tmp_path):
    from common.runlog import save_npz_atomic
    from vmat.case_io import CaseFileError, load_case

    with np.load(npz_folder / "pat.npz", allow_pickle=False) as data:
        arrays = {k: data[k] for k in data.files}
    bad_dose = arrays["rtdose_gy"].copy()
    bad_dose[0, 0, 0] = np.nan
    broken = {"no_origin": ({k: v for k, v in arrays.items() if k != "rtdose_origin_mm"}, "needs key 'rtdose_origin_mm'"),
              "flat": ({**arrays, "rtdose_gy": arrays["rtdose_gy"][0]}, "must be 3D"),
              "zero_spacing": ({**arrays, "rtdose_spacing_mm": np.array([0.0, 5.0, 6.0])}, "positive"),
              "nan": ({**arrays, "rtdose_gy": bad_dose}, "NaN")}
    for name, (content, message) in broken.items():
        save_npz_atomic(tmp_path / f"{name}.npz", **content)
        with pytest.raises(CaseFileError, match=f"{name}.npz: .*{message}"):
            load_case(tmp_path / f"{name}.npz")
