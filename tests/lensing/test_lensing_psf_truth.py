"""PSF matching (Gaussian closed form, Fourier ratio, refusal to sharpen) and the per-image truth."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from lensing.data import augment_batch
from lensing.psf import (
    FWHM_TO_SIGMA,
    PSFMatchingError,
    fourier_matching_kernel,
    gaussian_kernel_2d,
    gaussian_matching_sigma_arcsec,
    kernel_second_moment_fwhm,
    match_psf,
)
from lensing.simulator import render
from lensing.truth import count_images, einstein_area

F64 = torch.float64


@pytest.mark.parametrize("source,target,expected_sigma", [
    (0.6, 1.0, 0.8 * FWHM_TO_SIGMA),  # √(1.0² − 0.6²) = 0.8 (a 3-4-5 triangle)
    (0.3, 0.5, 0.4 * FWHM_TO_SIGMA),
    (0.7, 0.7, 0.0),  # already matched: nothing to do
])
def test_gaussian_matching_sigma_closed_form(source, target, expected_sigma):
    assert gaussian_matching_sigma_arcsec(source, target) == pytest.approx(expected_sigma, abs=1e-12)


def test_psf_matching_refuses_to_sharpen():
    with pytest.raises(PSFMatchingError, match="sharpen"):
        gaussian_matching_sigma_arcsec(1.0, 0.6)
    with pytest.raises(PSFMatchingError, match="sharpen"):
        fourier_matching_kernel(gaussian_kernel_2d(1.0, 0.1).numpy(), gaussian_kernel_2d(0.6, 0.1).numpy())
    with pytest.raises(ValueError, match="sharpen"):
        match_psf(np.ones((1, 16, 16)), None, 0.1, source_fwhm_arcsec=1.0, target_fwhm_arcsec=0.5)


def test_matched_gaussian_point_source_has_the_target_width():
    """A point source seen through a 0.6" Gaussian PSF, matched to 1.0", has a 1.0" FWHM (second moments)."""
    image = np.zeros((1, 81, 81))
    image[0, 40, 40] = 1.0
    observed = match_psf(image, None, 0.1, source_fwhm_arcsec=0.01, target_fwhm_arcsec=0.6)[0]
    matched, _, info = match_psf(observed, None, 0.1, source_fwhm_arcsec=0.6, target_fwhm_arcsec=1.0)
    assert info["method"] == "gaussian_closed_form"
    assert kernel_second_moment_fwhm(matched[0], 0.1) == pytest.approx(1.0, rel=0.01)
    assert matched.sum() == pytest.approx(1.0, rel=1e-6)  # flux conserved


def test_fourier_ratio_kernel_turns_source_psf_into_target():
    """S ⊛ K ≈ T for a non-Gaussian (two-component) source PSF and a Gaussian target."""
    pixel = 0.1
    s = 0.7 * gaussian_kernel_2d(0.5, pixel).numpy()
    wide = gaussian_kernel_2d(0.9, pixel).numpy()
    pad = (wide.shape[0] - s.shape[0]) // 2
    s = np.pad(s, pad) + 0.3 * wide
    t = gaussian_kernel_2d(1.2, pixel).numpy()
    k = fourier_matching_kernel(s, t, regularization=1e-6)
    from scipy.signal import fftconvolve

    size = max(s.shape[0], t.shape[0])
    reproduced = fftconvolve(np.pad(s, (size - s.shape[0]) // 2), k, mode="same")
    target = np.pad(t, (size - t.shape[0]) // 2)
    assert np.abs(reproduced - target).max() < 2e-3 * target.max()


def test_variance_propagates_as_kernel_squared():
    var = np.full((1, 41, 41), 4.0)
    _, out_var, _ = match_psf(np.zeros((1, 41, 41)), var, 0.1, source_fwhm_arcsec=0.3, target_fwhm_arcsec=0.8)
    sigma_px = gaussian_matching_sigma_arcsec(0.3, 0.8) / 0.1
    k = gaussian_kernel_2d(sigma_px * 0.1 / FWHM_TO_SIGMA, 0.1).numpy()
    assert out_var[0, 20, 20] == pytest.approx(4.0 * (k**2).sum(), rel=1e-6)  # Var Σ kᵢxᵢ = Σ kᵢ² σ²


def _lens(theta_e, e1=0.0, e2=0.0, g1=0.0, g2=0.0, sx=0.0, sy=0.0):
    t = lambda v: torch.tensor(v, dtype=F64)  # noqa: E731
    return {"lens": {"theta_E": t(theta_e), "e1": t(e1), "e2": t(e2), "center_x": t([0.0] * len(theta_e)),
                     "center_y": t([0.0] * len(theta_e))},
            "shear": {"gamma1": t(g1), "gamma2": t(g2)}, "source": {"center_x": t(sx), "center_y": t(sy)}}


def test_einstein_area_is_pi_theta_e_squared_without_shear():
    params = _lens([0.8, 1.5, 1.0], e1=[0.0, 0.2, -0.1], e2=[0.0, 0.1, 0.25], g1=[0, 0, 0], g2=[0, 0, 0],
                   sx=[0, 0, 0], sy=[0, 0, 0])
    area = einstein_area(params, n=200)
    expected = math.pi * params["lens"]["theta_E"] ** 2
    assert torch.allclose(area, expected, rtol=0.02)


@pytest.mark.parametrize("source_offset,e1,expected", [
    (0.3, 0.0, 2),  # SIS, source inside the Einstein radius: two images
    (2.5, 0.0, 1),  # far outside: one image
    (0.02, 0.25, 4),  # elliptical lens, source inside the astroid caustic: four images
])
def test_image_counts_hand_cases(source_offset, e1, expected):
    params = _lens([1.0], e1=[e1], e2=[0.0], g1=[0.0], g2=[0.0], sx=[source_offset], sy=[0.01])
    assert int(count_images(params)[0]) == expected


def test_image_counts_match_lenstronomy_solver():
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LensModel.Solver.lens_equation_solver import LensEquationSolver

    rng = np.random.default_rng(4)
    n = 4
    te, e1, e2 = rng.uniform(0.6, 1.8, n), rng.uniform(-0.3, 0.3, n), rng.uniform(-0.3, 0.3, n)
    g1, g2 = rng.normal(0, 0.04, n), rng.normal(0, 0.04, n)
    sx, sy = rng.uniform(-0.4, 0.4, n) * te, rng.uniform(-0.4, 0.4, n) * te
    ours = count_images(_lens(te.tolist(), e1.tolist(), e2.tolist(), g1.tolist(), g2.tolist(), sx.tolist(),
                              sy.tolist())).numpy()
    solver = LensEquationSolver(LensModel(["SIE", "SHEAR"]))
    for i in range(n):
        kw = [{"theta_E": te[i], "e1": e1[i], "e2": e2[i], "center_x": 0.0, "center_y": 0.0},
              {"gamma1": g1[i], "gamma2": g2[i]}]
        x, y = solver.image_position_from_source(sx[i], sy[i], kw, min_distance=0.01, search_window=6 * te[i],
                                                 precision_limit=1e-10, num_iter_max=100)
        assert ours[i] == int((np.hypot(x, y) > 0.1 * te[i]).sum()), i


def test_augmentation_transforms_lens_truth_consistently():
    """Flip/rot90 of a rendered lens equals rendering the transformed truth (source at the origin)."""
    torch.manual_seed(0)
    b = 8
    truth = torch.stack([0.8 + torch.rand(b, dtype=F64), *(0.4 * (torch.rand(4, b, dtype=F64) - 0.5)),
                         *(0.1 * (torch.rand(2, b, dtype=F64) - 0.5))], dim=1)

    def scene(tp):
        zeros = torch.zeros(b, dtype=F64)
        return {"lens": {"theta_E": tp[:, 0], "e1": tp[:, 1], "e2": tp[:, 2], "center_x": tp[:, 3],
                         "center_y": tp[:, 4]}, "shear": {"gamma1": tp[:, 5], "gamma2": tp[:, 6]},
                "source": {"amp": torch.ones(b, 1, dtype=F64), "R_sersic": zeros + 0.2, "n_sersic": zeros + 1,
                           "e1": zeros, "e2": zeros, "center_x": zeros, "center_y": zeros}}

    image = render(scene(truth), 32, 0.1)
    out = augment_batch({"input": image, "image": image, "variance": image, "true_params": truth},
                        torch.Generator().manual_seed(3))
    rerendered = render(scene(out["true_params"]), 32, 0.1)
    assert (rerendered - out["image"]).abs().max() < 1e-10 * image.abs().max()
