"""Geometry: voxel ↔ patient mappings and the projection of sagittal level points into axial stacks."""

import numpy as np
import pytest

from rsna_spine.data import load_series
from rsna_spine.inference import choose_axial_slice


def test_voxel_patient_round_trip_and_common_volume_agree(tmp_path, dicom):
    geom = dicom.make_geometry("sagittal", n=7, rows=20, cols=24, gap=3.5, origin=(-12.0, -40.0, 60.0))
    dicom.write_series(tmp_path / "s", geom, numbers=[3, 7, 1, 5, 2, 6, 4])
    (stack,) = load_series(tmp_path / "s", 1, 2, "sag_t2")
    kji = np.array([[0, 0, 0], [3.25, 7.5, 11.0], [6, 19, 23]])
    xyz = stack.voxel_to_patient(kji)
    np.testing.assert_allclose(stack.patient_to_voxel(xyz), kji, atol=1e-9)
    # by hand: voxel (3.25, 7.5, 11) = origin + 3.25·3.5 x̂ + 7.5·1.5 (−ẑ) + 11·2 ŷ
    np.testing.assert_allclose(xyz[1], [-12 + 3.25 * 3.5, -40 + 22.0, 60 - 11.25])
    # common.dicom_series.Volume (affine, uniform spacing) gives the same mapping for even spacing
    volume = stack.volume()
    np.testing.assert_allclose(volume.voxel_to_patient(kji), xyz, atol=1e-9)
    np.testing.assert_allclose(volume.patient_to_voxel(xyz), kji, atol=1e-9)


def test_sagittal_point_projects_into_the_right_axial_slice(tmp_path, dicom):
    sag = dicom.make_geometry("sagittal", n=9, rows=40, cols=40, gap=4.0, spacing=(2.0, 2.0),
                              origin=(-16.0, -40.0, 40.0))
    straight = dicom.make_geometry("axial", n=6, rows=30, cols=30, gap=5.0, spacing=(2.0, 2.0),
                                   origin=(-30.0, -30.0, 10.0))  # z = 10 ... 35
    tilted = dicom.make_geometry("axial", n=4, rows=30, cols=30, gap=5.0, spacing=(2.0, 2.0), tilt_deg=15.0,
                                 origin=(-30.0, -30.0, -30.0))
    dicom.write_series(tmp_path / "sag", sag)
    dicom.write_series(tmp_path / "ax", straight, description="Axial T2")
    dicom.write_series(tmp_path / "ax", tilted, numbers=[7, 8, 9, 10], description="Axial T2")
    (sag_stack,) = load_series(tmp_path / "sag", 1, 2, "sag_t2")
    axial = load_series(tmp_path / "ax", 1, 3, "axial_t2")
    # a level point clicked on the sagittal: slice 4 (x = 0), row 10 (z = 20), column 12 (y = −16)
    point = sag_stack.voxel_to_patient(np.array([[4, 10, 12]]))[0]
    np.testing.assert_allclose(point, [0.0, -16.0, 20.0])
    stack, k, dist = choose_axial_slice(axial, point)
    assert stack.shape == (6, 30, 30) and k == 2 and dist == pytest.approx(0.0)  # z = 10 + 2·5
    j, i = stack.patient_to_voxel(point[None])[0][1:]
    assert (j, i) == pytest.approx((7.0, 15.0))  # y = −30 + 2·7, x = −30 + 2·15

    # a point inside the tilted lower stack: slice 2 of it, in-plane (row 5, column 10)
    target = tilted.positions[2] + 10 * 2.0 * tilted.row_dir + 5 * 2.0 * tilted.col_dir
    stack, k, dist = choose_axial_slice(axial, target)
    assert stack.shape == (4, 30, 30) and k == 2 and dist == pytest.approx(0.0, abs=1e-3)  # DS strings round IOP to 1e-6
    np.testing.assert_allclose(stack.patient_to_voxel(target[None])[0], [2, 5, 10], atol=1e-3)
    # outside every stack (far below): no slice
    assert choose_axial_slice(axial, np.array([0.0, 0.0, -200.0])) is None
