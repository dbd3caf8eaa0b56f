"""Rasterization of known polygons, signed distances, resampling and reorientation."""

import numpy as np
import pytest

from vmat.dicom_rt import CaseError, Grid, canonicalize, rasterize_roi
from vmat.geometry import (
    overlap_fraction,
    polygon_mask,
    rasterize_slice_polygons,
    resample_to_grid,
    scaled_sdf,
    signed_distance_mm,
    world_to_voxel,
)


def square(c0, c1, r0, r1):
    return np.array([c0, c1, c1, c0]), np.array([r0, r0, r1, r1])


@pytest.mark.parametrize("poly, area", [
    (square(1.5, 5.5, 2.5, 4.5), 8),  # 4 x 2 pixel centres inside
    (square(-0.5, 9.5, -0.5, 9.5), 100),  # the whole 10 x 10 image
    (square(-5.5, 2.5, -5.5, 2.5), 9),  # partly outside: clipped to 3 x 3
    ((np.array([0.0, 8.0, 0.0]), np.array([0.0, 0.0, 8.0])), 36),  # right triangle with legs on pixel centres
])
def test_polygon_area(poly, area):
    assert polygon_mask(*poly, (10, 10)).sum() == area


def test_triangle_counts_centres_by_half_open_rule():
    # legs along row 0 / column 0; hypotenuse col + row = 8; half-open scanline rule: rows 0..7 hold
    # 8 - r centres each (the vertex row 8 holds none) -> 36
    mask = polygon_mask(np.array([0.0, 8.0, 0.0]), np.array([0.0, 0.0, 8.0]), (10, 10))
    assert [int(mask[r].sum()) for r in range(9)] == [8, 7, 6, 5, 4, 3, 2, 1, 0]


def test_xor_makes_holes_and_islands():
    outer, inner, island = square(0.5, 8.5, 0.5, 8.5), square(2.5, 6.5, 2.5, 6.5), square(3.5, 5.5, 3.5, 5.5)
    ring = rasterize_slice_polygons([outer, inner], (10, 10))
    assert ring.sum() == 64 - 16 and not ring[4, 4] and ring[1, 1]
    with_island = rasterize_slice_polygons([outer, inner, island], (10, 10))
    assert with_island.sum() == 64 - 16 + 4 and with_island[4, 4]


def test_world_to_voxel_with_non_square_pixels():
    origin = np.array([-10.0, 20.0, 5.0])
    kji = world_to_voxel(np.array([[-10.0 + 3 * 0.8, 20.0 + 2 * 1.5, 5.0 + 4 * 2.5]]), origin, (2.5, 1.5, 0.8),
                         np.array([1.0, 0, 0]), np.array([0, 1.0, 0]), np.array([0, 0, 1.0]))
    np.testing.assert_allclose(kji, [[4, 2, 3]])


def test_rasterize_roi_non_square_pixels_area():
    # 30 mm x 12 mm rectangle on a grid with 2 mm columns and 3 mm rows: 15 x 4 pixel centres
    from pydicom.dataset import Dataset

    grid = Grid(origin_xyz=np.array([0.0, 0.0, 0.0]), spacing_zyx=(5.0, 3.0, 2.0), shape_zyx=(3, 20, 30))
    item = Dataset()
    item.ContourGeometricType = "CLOSED_PLANAR"
    x0, x1, y0, y1 = 3.0, 33.0, 4.5, 16.5  # columns 2..16 -> centres 4..32 mm; rows 2..5 -> centres 6..15 mm
    item.ContourData = [x0, y0, 5.0, x1, y0, 5.0, x1, y1, 5.0, x0, y1, 5.0]
    warnings = []
    mask = rasterize_roi([item], grid, "box", "test", warnings)
    assert mask[1].sum() == 15 * 4 and mask[0].sum() == 0 and mask[2].sum() == 0
    assert mask[1].sum() * 2.0 * 3.0 == pytest.approx((x1 - x0) * (y1 - y0))


def test_contour_outside_ct_is_an_error():
    from pydicom.dataset import Dataset

    grid = Grid(origin_xyz=np.zeros(3), spacing_zyx=(5.0, 1.0, 1.0), shape_zyx=(2, 10, 10))
    item = Dataset()
    item.ContourData = [1.0, 1.0, 50.0, 5.0, 1.0, 50.0, 5.0, 5.0, 50.0]
    with pytest.raises(CaseError, match="outside the CT"):
        rasterize_roi([item], grid, "Bladder", "rs.dcm", [])


def test_sdf_sign_and_scale_with_anisotropic_spacing():
    mask = np.zeros((9, 9, 9), bool)
    mask[4, 4, 4] = True
    spacing = (3.0, 2.0, 1.0)
    sdf = signed_distance_mm(mask, spacing)
    assert sdf[4, 4, 4] < 0  # inside is negative
    assert sdf[4, 4, 7] == pytest.approx(3.0)  # 3 columns of 1 mm
    assert sdf[4, 6, 4] == pytest.approx(4.0)  # 2 rows of 2 mm
    assert sdf[6, 4, 4] == pytest.approx(6.0)  # 2 slices of 3 mm
    assert sdf[5, 5, 4] == pytest.approx(np.hypot(3.0, 2.0))
    big = np.zeros((20, 20, 20), bool)
    big[5:15, 5:15, 5:15] = True
    s = scaled_sdf(big, (1.0, 1.0, 1.0), clip_mm=4.0)
    assert s.min() == -1.0 and s.max() == 1.0
    assert s[10, 10, 16] == pytest.approx(2.0 / 4.0)  # 2 mm outside
    assert s[10, 10, 13] == pytest.approx(-2.0 / 4.0)  # 2 mm inside (distance to the first outside voxel)


def test_absent_structure_sdf_is_zero_not_far_away():
    assert np.all(scaled_sdf(np.zeros((4, 4, 4), bool), (1, 1, 1)) == 0)
    assert np.isnan(signed_distance_mm(np.zeros((2, 2, 2), bool), (1, 1, 1))).all()


def test_resampling_preserves_a_linear_field():
    """Linear interpolation reproduces a linear field exactly inside the source grid; 0 Gy outside."""
    src_origin, src_spacing, shape = np.array([-20.0, -30.0, 10.0]), (4.0, 3.0, 2.5), (12, 20, 24)
    z, y, x = np.meshgrid(*[o + np.arange(n) * s for o, n, s in zip(src_origin[::-1], shape, src_spacing)], indexing="ij")

    def field(x, y, z):
        return 2.0 * x - 0.5 * y + 1.5 * z + 100.0

    values = field(x, y, z)
    dst_origin, dst_spacing, dst_shape = np.array([-17.3, -26.1, 14.2]), (2.7, 3.3, 1.9), (15, 14, 25)
    out = resample_to_grid(values, src_origin, src_spacing, dst_origin, dst_spacing, dst_shape)
    dz, dy, dx = np.meshgrid(*[o + np.arange(n) * s for o, n, s in zip(dst_origin[::-1], dst_shape, dst_spacing)], indexing="ij")
    np.testing.assert_allclose(out, field(dx, dy, dz), rtol=1e-5, atol=1e-3)
    outside = resample_to_grid(values, src_origin, src_spacing, src_origin + 1000, dst_spacing, (2, 2, 2))
    assert np.all(outside == 0)


def test_canonicalize_flips_reversed_axes():
    array = np.arange(24, dtype=float).reshape(2, 3, 4)  # (k, j, i)
    # rows run toward -x, columns toward -y (a feet-first / rotated orientation)
    out, origin, spacing = canonicalize(array, np.array([10.0, 20.0, 30.0]), (5.0, 2.0, 1.0),
                                        row_dir=np.array([-1.0, 0, 0]), col_dir=np.array([0, -1.0, 0]),
                                        normal=np.array([0, 0, 1.0]))
    np.testing.assert_array_equal(out, array[:, ::-1, ::-1])
    np.testing.assert_allclose(origin, [10.0 - 3 * 1.0, 20.0 - 2 * 2.0, 30.0])
    assert spacing == (5.0, 2.0, 1.0)
    with pytest.raises(CaseError, match="not axis-aligned"):
        canonicalize(array, np.zeros(3), (1, 1, 1), np.array([0.8, 0.6, 0]), np.array([-0.6, 0.8, 0]), np.array([0, 0, 1.0]))


def test_overlap_fraction():
    a = (np.zeros(3), np.ones(3) * 10)
    assert overlap_fraction(a, (np.ones(3) * 5, np.ones(3) * 20)) == pytest.approx(0.125)
    assert overlap_fraction(a, (np.ones(3) * 50, np.ones(3) * 60)) == 0.0
