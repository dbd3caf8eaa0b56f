"""The torch simulator against lenstronomy 1.14 (float64), its gradients, PSF convolution and noise."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from scipy import ndimage, signal

from lensing import lenstronomy_bridge as lt
from lensing.profiles import ellipticity_to_phi_q, phi_q_to_ellipticity, sersic_ellipse, sersic_total_flux, sie_deflection
from lensing.psf import GaussianPSF, PixelPSF, convolve
from lensing.simulator import add_noise, pixel_grid, render, variance_map

F64 = torch.float64


def _t(a):
    return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=F64)


def _random_scenes(n, seed=0, round_lens=False):
    rng = np.random.default_rng(seed)
    e = (lambda: np.zeros(n)) if round_lens else (lambda: rng.uniform(-0.35, 0.35, n))
    return {
        "lens": {"theta_E": _t(rng.uniform(0.3, 2.0, n)), "e1": _t(e()), "e2": _t(e()),
                 "center_x": _t(rng.uniform(-0.2, 0.2, n)), "center_y": _t(rng.uniform(-0.2, 0.2, n))},
        "shear": {"gamma1": _t(rng.normal(0, 0.05, n)), "gamma2": _t(rng.normal(0, 0.05, n))},
        "source": {"amp": _t(rng.uniform(1, 50, (n, 1))), "R_sersic": _t(rng.uniform(0.05, 0.6, n)),
                   "n_sersic": _t(rng.uniform(0.5, 4, n)), "e1": _t(rng.uniform(-0.4, 0.4, n)),
                   "e2": _t(rng.uniform(-0.4, 0.4, n)), "center_x": _t(rng.uniform(-0.4, 0.4, n)),
                   "center_y": _t(rng.uniform(-0.4, 0.4, n))},
        "lens_light": {"amp": _t(rng.uniform(1, 50, (n, 1))), "R_sersic": _t(rng.uniform(0.3, 2.0, n)),
                       "n_sersic": _t(rng.uniform(1, 6, n)), "e1": _t(rng.uniform(-0.3, 0.3, n)),
                       "e2": _t(rng.uniform(-0.3, 0.3, n)), "center_x": _t(rng.uniform(-0.1, 0.1, n)),
                       "center_y": _t(rng.uniform(-0.1, 0.1, n))},
    }


def test_sie_deflection_matches_lenstronomy_on_random_parameters():
    rng = np.random.default_rng(1)
    x, y = rng.uniform(-3, 3, 500), rng.uniform(-3, 3, 500)
    x[0] = y[0] = 0.0  # exactly on a lens centre below
    for trial in range(12):
        te, e1, e2 = rng.uniform(0.2, 2.5), rng.uniform(-0.45, 0.45), rng.uniform(-0.45, 0.45)
        if trial == 0:
            e1 = e2 = 0.0  # round lens (q = 1)
        if trial == 1:
            e1, e2 = 1e-7, 0.0  # nearly round
        cx, cy = (0.0, 0.0) if trial == 2 else (rng.uniform(-0.3, 0.3), rng.uniform(-0.3, 0.3))
        ref_x, ref_y = lt.sie_alpha(x, y, te, e1, e2, cx, cy)
        ax, ay = sie_deflection(_t(x), _t(y), *(_t(v) for v in (te, e1, e2, cx, cy)))
        scale = np.abs(np.concatenate([ref_x, ref_y])).max()
        assert np.abs(ax.numpy() - ref_x).max() / scale < 1e-7, trial
        assert np.abs(ay.numpy() - ref_y).max() / scale < 1e-7, trial


def test_sersic_matches_lenstronomy_on_random_parameters():
    rng = np.random.default_rng(2)
    x, y = rng.uniform(-3, 3, 400), rng.uniform(-3, 3, 400)
    for _ in range(12):
        p = (rng.uniform(0.5, 20), rng.uniform(0.05, 2.0), rng.uniform(0.5, 7), rng.uniform(-0.5, 0.5),
             rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5), rng.uniform(-0.5, 0.5))
        ref = lt.sersic_ellipse(x, y, *p)
        ours = sersic_ellipse(_t(x), _t(y), *(_t(v) for v in p)).numpy()
        np.testing.assert_allclose(ours, ref, rtol=1e-10, atol=1e-12 * ref.max())


@pytest.mark.parametrize("n_pix,supersampling,fwhm", [(33, 1, 0.18), (24, 2, 0.3), (20, 1, None)])
def test_render_matches_lenstronomy_image_model(n_pix, supersampling, fwhm):
    params = _random_scenes(4, seed=n_pix)
    ref = lt.LenstronomyRenderer(n_pix, 0.1, fwhm, supersampling)
    ours = render(params, n_pix, 0.1, GaussianPSF(fwhm) if fwhm else None, supersampling)[:, 0].numpy()
    for i in range(4):
        expected = ref.render(params, i)
        assert np.abs(ours[i] - expected).max() / np.abs(expected).max() < 1e-10


def test_render_float32_close_to_float64_and_round_lens_finite():
    params = _random_scenes(3, seed=5, round_lens=True)
    f64 = render(params, 32, 0.1, GaussianPSF(0.2))
    f32 = render({g: {k: v.float() for k, v in d.items()} for g, d in params.items()}, 32, 0.1, GaussianPSF(0.2))
    assert torch.isfinite(f32).all()
    assert (f32.double() - f64).abs().max() / f64.abs().max() < 1e-4


def test_gaussian_psf_equals_scipy_gaussian_filter_and_fft_equals_direct():
    img = torch.rand(2, 3, 30, 30, dtype=F64)
    fwhm = torch.tensor([[0.2, 0.35, 0.5], [0.25, 0.3, 0.6]], dtype=F64)
    direct = convolve(img, GaussianPSF(fwhm), 0.1, method="direct")
    fft = convolve(img, GaussianPSF(fwhm), 0.1, method="fft")
    sigma_px = fwhm / (2 * math.sqrt(2 * math.log(2))) / 0.1
    for b in range(2):
        for c in range(3):
            ref = ndimage.gaussian_filter(img[b, c].numpy(), float(sigma_px[b, c]), mode="nearest", truncate=5.0)
            np.testing.assert_allclose(direct[b, c].numpy(), ref, atol=1e-12)
    np.testing.assert_allclose(fft.numpy(), direct.numpy(), atol=1e-10)


def test_pixel_psf_equals_scipy_fftconvolve_same_both_methods():
    rng = np.random.default_rng(0)
    img = torch.as_tensor(rng.random((1, 2, 25, 25)))
    for k in (5, 21):  # below and above the direct/FFT switch
        kernel = torch.as_tensor(rng.random((2, k, k)))
        kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True)
        for method in ("direct", "fft"):
            out = convolve(img, PixelPSF(kernel), 0.1, method=method)
            for c in range(2):
                ref = signal.fftconvolve(img[0, c].numpy(), kernel[c].numpy(), mode="same")
                np.testing.assert_allclose(out[0, c].numpy(), ref, atol=1e-12)


def test_render_gradients_flow_to_every_parameter_gradcheck():
    params = _random_scenes(2, seed=3)
    params["neighbours"] = {"amp": _t(np.full((2, 1, 1), 5.0)), "R_sersic": _t([[0.2], [0.3]]),
                            "n_sersic": _t([[1.0], [1.5]]), "e1": _t([[0.1], [-0.2]]), "e2": _t([[0.05], [0.1]]),
                            "center_x": _t([[0.5], [-0.4]]), "center_y": _t([[0.2], [0.3]])}
    names = [(g, k) for g in params for k in params[g]]
    shapes = [params[g][k].shape for g, k in names]
    flat = torch.cat([params[g][k].reshape(-1) for g, k in names] + [torch.tensor([0.25], dtype=F64)])

    def fn(theta):
        p, start = {g: {} for g in params}, 0
        for (g, k), shape in zip(names, shapes):
            size = math.prod(shape)
            p[g][k] = theta[start:start + size].reshape(shape)
            start += size
        return render(p, 8, 0.15, GaussianPSF(theta[start:start + 1]), supersampling=2)

    # every parameter (and the PSF FWHM) as one vector: the Jacobian checked against finite differences
    # along a random direction (fast mode), then each parameter's own gradient must be non-zero
    theta = flat.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(fn, (theta,), eps=1e-6, atol=1e-5, rtol=1e-4, fast_mode=True)
    grad = torch.autograd.grad(fn(theta).sum(), theta)[0]
    assert torch.isfinite(grad).all()
    start = 0
    for (g, k), shape in zip(names, shapes):
        size = math.prod(shape)
        assert grad[start:start + size].abs().sum() > 0, f"no gradient reaches {g}.{k}"
        start += size
    assert grad[-1] != 0, "no gradient reaches the PSF FWHM"


def test_ellipticity_roundtrip_and_sersic_total_flux():
    phi, q = torch.tensor([0.3, 1.2], dtype=F64), torch.tensor([0.5, 0.9], dtype=F64)
    e1, e2 = phi_q_to_ellipticity(phi, q)
    phi2, q2, _ = ellipticity_to_phi_q(e1, e2)
    torch.testing.assert_close(q2, q)
    torch.testing.assert_close(torch.remainder(phi2, math.pi), phi)
    # numerical integral of a round Sérsic profile equals the closed form
    x, y = pixel_grid(801, 0.02, dtype=F64)
    image = sersic_ellipse(x, y, _t(2.0), _t(0.8), _t(2.5), _t(0.0), _t(0.0), _t(0.0), _t(0.0))
    numeric = float(image.sum()) * 0.02**2
    assert abs(numeric / sersic_total_flux(2.0, 0.8, 2.5) - 1) < 0.02  # the tail beyond ±8" is missing


def test_noise_of_an_image_does_not_depend_on_the_other_images():
    """Each image draws from its own stream: a change of the first image's expected counts (Poisson's
    inversion and rejection consume a value-dependent number of random numbers; with one shared stream this
    re-drew every later image) leaves the noise of every other image bit for bit unchanged; the same seed
    gives the same noise."""
    model = torch.rand(6, 2, 16, 16, generator=torch.Generator().manual_seed(1), dtype=F64) * 0.2  # ≤ 20 counts
    nudged = model.clone()
    nudged[0] = nudged[0] * 1.05
    first, _ = add_noise(model, 0.1, 100.0, generator=torch.Generator().manual_seed(3))
    again, _ = add_noise(model, 0.1, 100.0, generator=torch.Generator().manual_seed(3))
    other, _ = add_noise(nudged, 0.1, 100.0, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, again)
    assert torch.equal(first[1:] - model[1:], other[1:] - nudged[1:])


def test_noise_statistics_match_variance_map():
    model = torch.full((4, 2, 64, 64), 0.5, dtype=F64)
    gen = torch.Generator().manual_seed(0)
    noisy, var = add_noise(model, [0.1, 0.2], [100.0, 400.0], generator=gen)
    expected = torch.tensor([0.1**2 + 0.5 / 100, 0.2**2 + 0.5 / 400], dtype=F64)
    torch.testing.assert_close(var[0, :, 0, 0], expected)
    torch.testing.assert_close(variance_map(model, [0.1, 0.2], [100.0, 400.0]), var)
    resid = (noisy - model).transpose(0, 1).reshape(2, -1)
    assert torch.allclose(resid.var(dim=1), expected, rtol=0.05)
    assert resid.mean(dim=1).abs().max() < 0.01
    with pytest.raises(ValueError, match="exposure_time_s"):
        add_noise(model, 0.1, 0.0)


def test_render_bad_parameters_raise_clear_errors():
    params = _random_scenes(2)
    del params["lens"]["theta_E"]
    with pytest.raises(KeyError, match="theta_E"):
        render(params, 8, 0.1)
    with pytest.raises(KeyError, match="nothing to render"):
        render({"lens": _random_scenes(1)["lens"]}, 8, 0.1)
    with pytest.raises(ValueError, match="positive"):
        convolve(torch.ones(1, 1, 8, 8), GaussianPSF(-0.1), 0.1)


def _hsc_scenes(n, dtype, n_pix=20, seed=0):
    """Population scenes of a 3-band survey, with neighbours (every component of the renderer)."""
    from lensing.population import PopulationConfig, sample_scenes
    from lensing.surveys import get_survey

    survey = get_survey("hsc")
    params, _ = sample_scenes(n, survey, n_pix, PopulationConfig(), np.random.default_rng(seed), dtype)
    return params, GaussianPSF(torch.tensor(survey.psf_fwhm_arcsec, dtype=dtype)), survey.pixel_scale_arcsec


@pytest.mark.parametrize("supersampling,chunk_elements,chunk", [(1, 900, 2), (1, 1300, 2), (3, 2000, 1), (2, 0, 0)])
def test_batch_renderer_equals_render_in_chunks(supersampling, chunk_elements, chunk):
    """Fused, chunked rendering (7 scenes in chunks of 2 or 1, the last one short; or one chunk) gives the
    same float64 images as render: per-band PSF, lensed source, lens light and neighbours. Chunks are a power
    of two of scenes within the sub-pixel budget (1300 // 400 = 3 → 2)."""
    from lensing.batch_renderer import BatchRenderer

    params, psf, scale = _hsc_scenes(7, F64)
    expected = render(params, 20, scale, psf, supersampling)
    fast = BatchRenderer(20, scale, psf, supersampling, n_bands=3, dtype=F64, chunk_elements=chunk_elements)
    assert fast.chunk == chunk
    torch.testing.assert_close(fast(params), expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())
    no_psf = BatchRenderer(20, scale, None, supersampling, n_bands=3, dtype=F64, chunk_elements=chunk_elements)
    torch.testing.assert_close(no_psf(params), render(params, 20, scale, None, supersampling))


@pytest.mark.parametrize("supersampling,chunk_elements", [(1, 900), (2, 0)])
def test_batch_renderer_per_call_seeing_and_pixel_scale_equal_render(supersampling, chunk_elements):
    """A call with its own per-scene, per-band FWHM [B, C] (seeing that varies from image to image, radii
    from 2 to 5 pixels in one batch) and its own pixel scale gives render's float64 images with
    GaussianPSF([B, C]) at that scale, in chunks (the last one short) or whole; the same renderer then still
    renders its own geometry; a per-band [C] FWHM per call, too."""
    from lensing.batch_renderer import BatchRenderer

    params, psf, scale = _hsc_scenes(7, F64, seed=3)
    fwhm = torch.from_numpy(np.random.default_rng(5).uniform(0.3, 1.2, (7, 3)))
    other_scale = 0.21
    expected = render(params, 20, other_scale, GaussianPSF(fwhm), supersampling)
    fast = BatchRenderer(20, scale, psf, supersampling, n_bands=3, dtype=F64, chunk_elements=chunk_elements)
    ours = fast(params, psf_fwhm_arcsec=fwhm, pixel_scale_arcsec=other_scale)
    torch.testing.assert_close(ours, expected, rtol=1e-12, atol=1e-12 * expected.abs().max().item())
    own = render(params, 20, scale, psf, supersampling)
    torch.testing.assert_close(fast(params), own, rtol=1e-12, atol=1e-12 * own.abs().max().item())
    per_band = render(params, 20, scale, GaussianPSF(fwhm[0]), supersampling)
    torch.testing.assert_close(fast(params, psf_fwhm_arcsec=fwhm[0]), per_band, rtol=1e-12,
                               atol=1e-12 * per_band.abs().max().item())


def test_batch_renderer_components_equal_render_components():
    """What the truth table reads of render(return_components=True): the total and the PSF-convolved lensed
    source (with its knots), float64, per-scene seeing; scenes without a source give no "source"."""
    from lensing.batch_renderer import BatchRenderer
    from lensing.population import PopulationConfig, sample_scenes
    from lensing.surveys import get_survey

    survey = get_survey("hsc")
    params, _ = sample_scenes(5, survey, 20, PopulationConfig(source_knots_max=3), np.random.default_rng(8), F64)
    assert params.get("source_knots") is not None
    fwhm = torch.from_numpy(np.random.default_rng(9).uniform(0.5, 1.0, (5, 3)))
    expected = render(params, 20, survey.pixel_scale_arcsec, GaussianPSF(fwhm), 2, return_components=True)
    fast = BatchRenderer(20, survey.pixel_scale_arcsec, GaussianPSF(0.7), 2, n_bands=3, dtype=F64)
    ours = fast.components(params, psf_fwhm_arcsec=fwhm)
    assert set(ours) == {"total", "source"}
    for key in ours:
        torch.testing.assert_close(ours[key], expected[key], rtol=1e-12,
                                   atol=1e-12 * expected["total"].abs().max().item())
    unlensed = {g: params[g] for g in ("lens_light", "neighbours")}
    assert set(fast.components(unlensed, psf_fwhm_arcsec=fwhm)) == {"total"}


@pytest.mark.parametrize("fast_math", [False, True])
def test_batch_renderer_float32_matches_lenstronomy_float64(fast_math):
    """float32 fused rendering vs lenstronomy's float64 ImageModel, incl. round lenses (q → 1, where a
    vectorized atanh loses precision: profiles use log1p), within 1e-4 of each image's peak; with torch's
    arctan and with the compiled renderer's polynomial one (here run eagerly)."""
    from lensing.batch_renderer import BatchRenderer

    params = _random_scenes(4, seed=11, round_lens=True)
    params32 = {g: {k: v.float() for k, v in d.items()} for g, d in params.items()}
    ref = lt.LenstronomyRenderer(28, 0.1, 0.18, 3)
    fast = BatchRenderer(28, 0.1, GaussianPSF(0.18), 3, chunk_elements=3000, fast_math=fast_math)
    ours = fast(params32)[:, 0].double().numpy()
    for i in range(4):
        expected = ref.render(params, i)
        assert np.abs(ours[i] - expected).max() / np.abs(expected).max() < 1e-4


@pytest.mark.parametrize("n", [3, 8, 9, 10, 31])
def test_separable_nearest_equals_scipy_correlate_nearest(n):
    """The batch renderer's separable convolution, padded or with the edge outputs' outside taps folded onto
    the border pixel (images of at most 2R pixels are padded either way), equals
    scipy.ndimage.correlate1d(mode="nearest") along both axes, per band, for images smaller than, equal to
    and larger than the 9-tap kernel's 2R = 8."""
    from lensing.batch_renderer import separable_nearest

    rng = np.random.default_rng(n)
    images = rng.normal(size=(2, 2, n, n))
    taps = rng.uniform(0.1, 1.0, (2, 9))
    taps = (taps + taps[:, ::-1]) / 2  # symmetric, as a Gaussian's
    expected = np.stack([np.stack([ndimage.correlate1d(ndimage.correlate1d(images[b, c], taps[c], axis=1,
                                                                            mode="nearest"), taps[c], axis=0,
                                                       mode="nearest") for c in range(2)]) for b in range(2)])
    for fold_edges in (False, True):
        ours = separable_nearest(torch.from_numpy(images), torch.from_numpy(taps), fold_edges).numpy()
        np.testing.assert_allclose(ours, expected, rtol=1e-12, atol=1e-12)


def test_atan_ratio_f32_and_atanh_log1p_against_float64():
    """The float32 arctan(num/den) of the compiled renderer (Cephes atanf's reduction and polynomial) within
    3e-7 relative of float64 arctan across its three ranges, both signs, 0 and the range boundaries; and the
    log-based log1p (Goldberg's correction) within 2e-7 relative of float64 log1p from 1e-9 to 1e7 and down to
    u = −1 + 1e-6, with the gradient 1/(1 + u)."""
    from lensing.profiles import TAN_3PI_8, TAN_PI_8, atan_ratio_f32, log1p_from_log

    ratios = np.concatenate([[0.0, 1e-30, 1e-8, 1e-3, 0.1, TAN_PI_8, 0.5, 1.0, 2.0, TAN_3PI_8, 3.0, 1e3, 1e8],
                             np.geomspace(1e-6, 1e6, 2001)])
    ratios = np.concatenate([ratios, -ratios])
    den = np.random.default_rng(0).uniform(0.01, 10.0, ratios.size)
    num32, den32 = torch.tensor(ratios * den, dtype=torch.float32), torch.tensor(den, dtype=torch.float32)
    exact = np.arctan(num32.double().numpy() / den32.double().numpy())  # of the float32 inputs
    ours = atan_ratio_f32(num32, den32).double().numpy()
    rel = np.abs(ours - exact) / np.maximum(np.abs(exact), 1e-300)
    assert rel.max() < 3e-7 and ours[0] == 0.0
    u = torch.tensor(np.concatenate([np.geomspace(1e-9, 1e7, 500), -np.geomspace(1e-9, 1 - 1e-6, 500)]),
                     dtype=torch.float32, requires_grad=True)
    value = log1p_from_log(u)
    exact = np.log1p(u.detach().double().numpy())
    assert (np.abs(value.detach().double().numpy() - exact) / np.abs(exact)).max() < 2e-7
    value.sum().backward()
    torch.testing.assert_close(u.grad.double(), 1 / (1 + u.detach().double()), rtol=1e-6, atol=0)


def test_log_f32_against_float64_and_its_gradient():
    """The compiled renderer's float32 log (Cephes logf from the exponent and mantissa bits) within 1 ulp of
    float64's log of the same float32 inputs (0.74 measured) from the smallest normal float32 to 1e38, across the √½ mantissa
    split and at exact powers of two; where a gradient is needed it is torch.log (value and gradient)."""
    from lensing.profiles import log_f32

    values = np.concatenate([np.geomspace(1.2e-38, 1e38, 20001), np.geomspace(0.5, 2.0, 4001),
                             [2.0**k for k in range(-126, 127)], [1.0, 0.70710677, 0.70710683, 5e-8]])
    x = torch.tensor(values, dtype=torch.float32)
    exact = np.log(x.double().numpy())
    ours = log_f32(x).double().numpy()
    ulp = np.spacing(np.abs(exact).astype(np.float32)).astype(np.float64)  # one float32 ulp of the result
    assert (np.abs(ours - exact) / np.maximum(ulp, np.spacing(np.float32(0)))).max() <= 1.0
    assert log_f32(torch.tensor([1.0]))[0] == 0.0
    assert log_f32(torch.tensor([float("nan"), float("inf")])).isnan().all()  # a bad input is not hidden
    leaf = torch.tensor([0.3, 7.0], requires_grad=True)
    out = log_f32(leaf)
    out.sum().backward()
    torch.testing.assert_close(out.detach(), torch.log(leaf.detach()))
    torch.testing.assert_close(leaf.grad, 1 / leaf.detach())


def test_sie_deflection_with_fast_math_matches_float64():
    """The float32 SIE deflection with the polynomial arctan agrees with torch.atan's to 5e-7 of θ_E (measured
    2.4e-7), for elliptical, round (q = 1) and extreme (|e| = 0.9999, the clip) lenses, on and off the axes;
    and, except at the extreme (where float32 itself is off: √(1 − q²) rounds to 1), with the float64
    deflection to 3e-6 of θ_E (float32 rounding of the coefficients: 1.4e-6 with either arctan)."""
    from lensing.profiles import sie_coefficients, sie_deflection, sie_deflection_from_coefficients

    g = torch.linspace(-2.0, 2.0, 41, dtype=F64)
    x, y = g[None, None, :].expand(1, 41, 41), g[None, :, None].expand(1, 41, 41)
    theta_e = 1.2
    for e1, e2 in ((0.2, -0.1), (0.0, 0.0), (-0.3, 0.35), (0.9999, 0.0)):
        p64 = [torch.tensor([v], dtype=F64).reshape(1, 1, 1) for v in (theta_e, e1, e2, 0.05, -0.03)]
        coef = sie_coefficients(*(v.float() for v in p64[:3]))
        f32 = {fm: torch.stack(sie_deflection_from_coefficients(x.float(), y.float(), p64[3].float(), p64[4].float(),
                                                                *coef, fast_math=fm)).double() for fm in (False, True)}
        assert (f32[True] - f32[False]).abs().max() < 5e-7 * theta_e, (e1, e2)
        if e1 < 0.99:
            assert (f32[True] - torch.stack(sie_deflection(x, y, *p64))).abs().max() < 3e-6 * theta_e, (e1, e2)


def test_unrolled_subpixel_sum_equals_the_reduction_and_fast_math_needs_float32():
    """The compiled path's chunk (unrolled sum over the s² sub-pixel rows, PSF edges folded), run eagerly,
    gives the eager path's images (float64, rounding only); fast_math is on by default only for compiled
    float32 CPU rendering, and refused for float64."""
    from lensing.batch_renderer import BatchRenderer, _surface_chunk, pack_coefficients

    params, psf, scale = _hsc_scenes(3, F64)
    fast = BatchRenderer(16, scale, psf, 3, n_bands=3, dtype=F64)
    packed, layout = pack_coefficients(params)
    x, y, area, taps = fast._geometry(3, None, None)
    images = {}
    for compiled in (False, True):
        images[compiled] = torch.empty(3, 3, 16, 16, dtype=F64)
        _surface_chunk(images[compiled], packed, layout, x, y, 3, area, taps, False, compiled)
    torch.testing.assert_close(images[True], images[False], rtol=1e-13, atol=0)
    torch.testing.assert_close(images[False], render(params, 16, scale, psf, 3), rtol=1e-12, atol=0)
    assert not fast.fast_math and not BatchRenderer(16, scale, psf, 3, n_bands=3).fast_math
    with pytest.raises(ValueError, match="float32-only"):
        BatchRenderer(16, scale, psf, 3, n_bands=3, dtype=F64, fast_math=True)


def test_batch_renderer_chunk_traces_without_graph_breaks_and_refuses_what_it_cannot_do():
    """The chunk function is one torch.compile graph (dynamo explain: no breaks; the PSF radius, the
    data-dependent size that broke render's graph, is fixed at construction). No C++ compilation here."""
    from lensing.batch_renderer import BatchRenderer, _surface_chunk, pack_coefficients

    params, psf, scale = _hsc_scenes(2, torch.float32, n_pix=12)
    fast = BatchRenderer(12, scale, psf, 2, n_bands=3)
    packed, layout = pack_coefficients(params)
    out = torch.empty(2, 3, 12, 12)
    x, y, area, taps = fast._geometry(2, torch.full((2, 3), 0.5), 0.21)  # per-scene PSF, another pixel scale
    for fast_math, compiled in ((False, False), (True, True)):
        explanation = torch._dynamo.explain(_surface_chunk)(out, packed, layout, x, y, 2, area, taps, fast_math,
                                                            compiled)
        assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    with pytest.raises(TypeError, match="GaussianPSF or None"):
        BatchRenderer(12, scale, PixelPSF(torch.ones(3, 3)), n_bands=3)
    with pytest.raises(ValueError, match="per-scene"):
        BatchRenderer(12, scale, GaussianPSF(torch.full((2, 3), 0.6)), n_bands=3)
    with pytest.raises(ValueError, match="fits neither"):
        fast(params, psf_fwhm_arcsec=torch.full((5,), 0.6))
    with pytest.raises(ValueError, match="built without a PSF"):
        BatchRenderer(12, scale, None, n_bands=3)(params, psf_fwhm_arcsec=0.6)
    with pytest.raises(ValueError, match="positive and finite"):
        fast(params, pixel_scale_arcsec=0.0)
    with pytest.raises(ValueError, match="built for torch.float64"):
        BatchRenderer(12, scale, psf, n_bands=3, dtype=F64)(params)
    with pytest.raises(ValueError, match="the renderer has 1"):
        BatchRenderer(12, scale, None, n_bands=1)(params)
    one_band = {"lens_light": {k: v[:, 0] if k == "amp" else v for k, v in params["lens_light"].items()}}
    torch.testing.assert_close(BatchRenderer(12, scale, None, n_bands=1)(one_band),  # amp [B]: one band
                               render(one_band, 12, scale, None))


@pytest.mark.slow
def test_compiled_batch_renderer_matches_float64_render_any_batch():
    """The compiled CPU path as benchmarked (fast_math, unrolled sub-pixels, chunks written in place, the
    per-scene constants compiled): float32 images within 1e-4 of each float64 image's peak, for a batch that
    fills whole chunks and one that ends in a padded chunk (C++ compilation: ~20-40 s)."""
    from lensing.batch_renderer import BatchRenderer

    params, psf, scale = _hsc_scenes(7, F64, n_pix=16)
    params32 = {g: {k: v.float() for k, v in d.items()} for g, d in params.items()}
    psf32 = GaussianPSF(psf.fwhm_arcsec.float())
    fast = BatchRenderer(16, scale, psf32, 3, n_bands=3, compile=True, chunk_elements=2 * 48 * 48)
    assert fast.fast_math and fast.chunk == 2
    with torch.no_grad():
        for n in (4, 7):
            sub = {g: {k: v[:n] for k, v in d.items()} for g, d in params32.items()}
            expected = render({g: {k: v[:n] for k, v in d.items()} for g, d in params.items()}, 16, scale, psf, 3)
            peak = expected.abs().amax(dim=(1, 2, 3), keepdim=True)
            assert ((fast(sub).double() - expected).abs() / peak).max() < 1e-4
