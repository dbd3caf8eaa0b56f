"""Sub-voxel DVHs from contours against closed-form DVHs, at several grid resolutions.

A sphere in a linear dose gradient along z (the cumulative DVH is the volume of a spherical cap), a
cylinder in a linear and in a Gaussian gradient across it (the area of a circular segment). Contours are
circles on the CT planes, as an RTSTRUCT stores them; the dose lives on the CT grid (trilinear). The
sub-voxel method converges to the closed form as the grid is refined and beats voxel counting on
coarse grids; voxel counting stays as it was (exact discrete definitions, tests in test_vmat_dvh.py).
"""

import math

import numpy as np
import pytest
from scipy.optimize import brentq

from vmat.dvh import contour_samples, voxel_samples
from vmat.geometry import rasterize_slice_polygons

R_SPHERE, R_CYL, HALF_HEIGHT = 20.0, 15.0, 15.0
GRADIENT = 0.5  # Gy/mm
RESOLUTIONS = [(5.0, 4.0), (3.0, 3.0), (2.0, 2.0), (1.0, 1.0)]  # (slice, pixel) mm


def circle(r: float, n: int = 720) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.c_[r * np.cos(t), r * np.sin(t)]


def cap_fraction(z0: float) -> float:
    """Fraction of the sphere's volume with z >= z0."""
    h = float(np.clip(R_SPHERE - z0, 0, 2 * R_SPHERE))
    return h * h * (3 * R_SPHERE - h) / (4 * R_SPHERE**3)


def segment_fraction(x0: float) -> float:
    """Fraction of the disc's area with x >= x0."""
    x0 = float(np.clip(x0, -R_CYL, R_CYL))
    return (R_CYL**2 * math.acos(x0 / R_CYL) - x0 * math.sqrt(R_CYL**2 - x0**2)) / (math.pi * R_CYL**2)


def sphere_dose(z, y, x):
    return 50.0 + GRADIENT * z


def cylinder_linear(z, y, x):
    return 50.0 + GRADIENT * x


SIGMA = 10.0


def cylinder_gauss(z, y, x):
    return 60.0 * np.exp(-x**2 / (2 * SIGMA**2))


def truth(kind: str):
    """(volume cc, V(>= D) fraction function) of the closed form."""
    if kind == "sphere":
        return 4 / 3 * math.pi * R_SPHERE**3 / 1000, lambda d: cap_fraction((d - 50.0) / GRADIENT)
    volume = math.pi * R_CYL**2 * 2 * HALF_HEIGHT / 1000
    if kind == "cylinder_linear":
        return volume, lambda d: segment_fraction((d - 50.0) / GRADIENT)

    def gauss(d):  # |x| <= x_d receives >= d
        if d >= 60.0:
            return 0.0
        xd = SIGMA * math.sqrt(2 * math.log(60.0 / d))
        return 1.0 - 2 * segment_fraction(xd)
    return volume, gauss


def dose_at_fraction(kind: str, fraction: float) -> float:
    _, f = truth(kind)
    lo, hi = (30.0, 70.0) if kind != "cylinder_gauss" else (1.0, 60.0)
    return brentq(lambda d: f(d) - fraction, lo, hi)


def make_case(kind: str, dz: float, dxy: float):
    """Contours on the CT planes, the dose on the CT grid and the voxel mask; the grid is offset from the
    shape's centre by fractions of a voxel (no lucky alignment)."""
    half = 26.0 + 2 * max(dz, dxy)
    nz, n = int(2 * half / dz) + 1, int(2 * half / dxy) + 1
    origin = np.array([-half + 0.37 * dz, -half + 0.21 * dxy, -half + 0.13 * dxy])  # z, y, x
    zc = origin[0] + np.arange(nz) * dz
    yc = origin[1] + np.arange(n) * dxy
    xc = origin[2] + np.arange(n) * dxy
    if kind == "sphere":
        polys = [(z, circle(math.sqrt(R_SPHERE**2 - z * z))) for z in zc if abs(z) < R_SPHERE]
        func = sphere_dose
    else:
        # planes every slice inside the cylinder; the half-slice end caps make its height
        polys = [(z, circle(R_CYL)) for z in zc if abs(z) < HALF_HEIGHT]
        func = cylinder_linear if kind == "cylinder_linear" else cylinder_gauss
    zz, yy, xx = np.meshgrid(zc, yc, xc, indexing="ij")
    dose = func(zz, yy, xx)
    mask = np.zeros(dose.shape, bool)
    for z, xy in polys:
        k = int(round((z - origin[0]) / dz))
        mask[k] = rasterize_slice_polygons([((xy[:, 0] - origin[2]) / dxy, (xy[:, 1] - origin[1]) / dxy)], (n, n))
    return polys, origin, (dz, dxy, dxy), dose, mask


def errors(kind: str, dz: float, dxy: float, method: str, end_cap: str = "half_slice") -> dict:
    polys, origin, spacing, dose, mask = make_case(kind, dz, dxy)
    if method == "contour":
        smp = contour_samples(polys, origin, spacing, dose.shape, sample_mm=1.0, end_cap=end_cap)
    else:
        smp = voxel_samples(mask, spacing)
    dvh = smp.dvh(dose)
    volume, frac = truth(kind)
    out = {"volume_pct": 100 * (smp.volume_cc - volume) / volume}
    for x in (98, 95, 50, 2):
        out[f"D{x}"] = dvh.dose_at_percent(x) - dose_at_fraction(kind, x / 100)
    level = 52.0 if kind != "cylinder_gauss" else 40.0
    out["V_pct"] = dvh.volume_percent_at_least(level) - 100 * frac(level)
    return out


@pytest.mark.parametrize("end_cap", ["half_slice", "half_slice_plane_dose"])
@pytest.mark.parametrize("kind", ["sphere", "cylinder_linear", "cylinder_gauss"])
def test_contour_dvh_converges_to_the_closed_form(kind, end_cap):
    """Both half-slice end caps converge (they differ only in the dose of the outer half slabs)."""
    table = {res: errors(kind, *res, "contour", end_cap) for res in RESOLUTIONS}
    worst = {res: max(abs(v) for k, v in e.items() if k.startswith("D")) for res, e in table.items()}
    finest = table[RESOLUTIONS[-1]]
    # 1 mm grid: every D_x within 0.1 Gy (0.2 % of the dose), V within 0.2 points, volume within 0.5 %
    assert worst[RESOLUTIONS[-1]] < 0.1, table
    assert abs(finest["V_pct"]) < 0.2 and abs(finest["volume_pct"]) < 0.5, table
    # convergence: the finest grid is better than the coarsest, and 2 mm already within 0.25 Gy
    assert worst[RESOLUTIONS[-1]] < worst[RESOLUTIONS[0]], worst
    assert worst[(2.0, 2.0)] < 0.25, worst


@pytest.mark.parametrize("kind", ["sphere", "cylinder_linear"])
def test_contour_dvh_beats_voxel_counting_on_a_clinical_grid(kind):
    """3 mm slices with 3 mm pixels: the sub-voxel DVH is closer to the closed form in every D_x summed."""
    contour = errors(kind, 3.0, 3.0, "contour")
    voxel = errors(kind, 3.0, 3.0, "voxel")
    total = lambda e: sum(abs(v) for k, v in e.items() if k.startswith("D"))  # noqa: E731
    assert total(contour) < 0.5 * total(voxel), (contour, voxel)
    assert max(abs(v) for k, v in contour.items() if k.startswith("D")) < 0.25, contour


def test_end_cap_conventions():
    """half_slice: each end contour stands for half a slice beyond its plane (volume = Σ area × slice);
    none: the structure stops at its end planes (one slice thickness of area less in all)."""
    dz = 3.0
    polys, origin, spacing, dose, _ = make_case("cylinder_linear", dz, 2.0)
    capped = contour_samples(polys, origin, spacing, dose.shape, 1.0, end_cap="half_slice")
    open_ = contour_samples(polys, origin, spacing, dose.shape, 1.0, end_cap="none")
    area_cc = capped.volume_cc / (len(polys) * dz)  # cc per mm of height
    assert capped.volume_cc == pytest.approx(len(polys) * dz * area_cc)
    assert capped.volume_cc - open_.volume_cc == pytest.approx(dz * area_cc, rel=1e-9)
    with pytest.raises(ValueError, match="end_cap"):
        contour_samples(polys, origin, spacing, dose.shape, 1.0, end_cap="full")


def test_points_outside_the_known_dose_are_left_out():
    polys, origin, spacing, dose, _ = make_case("sphere", 2.0, 2.0)
    valid = np.ones(dose.shape, bool)
    z = origin[0] + np.arange(dose.shape[0]) * spacing[0]
    valid[z > 0] = False  # the dose grid ends at z = 0
    part = contour_samples(polys, origin, spacing, dose.shape, 1.0, valid=valid)
    whole = contour_samples(polys, origin, spacing, dose.shape, 1.0)
    assert 0.4 < part.volume_cc / whole.volume_cc < 0.55  # about the lower half (trilinear neighbourhoods)
    assert part.dvh(dose).d.max() <= 50.0 + 1e-9  # no sample reads the unknown (upper) half


if __name__ == "__main__":  # the convergence table of vmat/README.md: python tests/vmat/test_vmat_dvh_subvoxel.py
    print("| shape and dose | slice / pixel (mm) | contour: max abs D_x error (Gy) | V error (points) | volume error "
          "| voxels: max abs D_x error (Gy) | V error (points) | volume error |")
    print("|---|---|---|---|---|---|---|---|")
    for kind in ("sphere", "cylinder_linear", "cylinder_gauss"):
        for res in RESOLUTIONS:
            c, v = errors(kind, *res, "contour"), errors(kind, *res, "voxel")
            worst = [max(abs(x) for k, x in e.items() if k.startswith("D")) for e in (c, v)]
            print(f"| {kind} | {res[0]:g} / {res[1]:g} | {worst[0]:.3f} | {abs(c['V_pct']):.3f} | {c['volume_pct']:+.2f} % "
                  f"| {worst[1]:.3f} | {abs(v['V_pct']):.3f} | {v['volume_pct']:+.2f} % |")
