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


def test_validation_reads_the_reference_on_its_rtdose_grid(tmp_path):
    """End to end through preprocessing and evaluate_case: the NPZ carries the RTDOSE, and the reference
    metrics equal those read from it, not from the CT-grid copy (which differs where the dose is curved)."""
    from vmat.case_io import load_case
    from vmat.dvh import case_samples
    from vmat.evaluation import evaluate_case
    from vmat.preprocess_vmat import main as preprocess

    write_patient(tmp_path / "raw" / "pat")
    preprocess(["--data", str(tmp_path / "raw"), "--output-dir", str(tmp_path / "npz"), "--set",
                "preprocess.sanity.enforce=false"])
    case = load_case(tmp_path / "npz" / "pat.npz")
    assert case["rtdose_gy"].shape == (13, 33, 25)
    # make the reference curved (quadratic in x): the two copies then differ between grid points
    z, y, x = (o + s * np.arange(n) for o, s, n in zip(case["rtdose_origin_mm"], case["rtdose_spacing_mm"],
                                                       case["rtdose_gy"].shape))
    case["rtdose_gy"] = np.broadcast_to(40.0 + 0.02 * (x - 3.0) ** 2, case["rtdose_gy"].shape).astype(np.float32)
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
