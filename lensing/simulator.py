"""Differentiable, batched strong-lens image simulator (torch; CPU and CUDA; float32 and float64).

    params = {"lens": {theta_E, e1, e2, center_x, center_y},          # SIE, [B] each
              "shear": {gamma1, gamma2},                              # SHEAR, [B]
              "source": {amp [B, C], R_sersic, n_sersic, e1, e2, center_x, center_y},   # SERSIC_ELLIPSE
              "source_knots": {amp [B, K, C], R_sersic [B, K], ...},  # optional extra lensed Sérsics
              "lens_light": {...same as source...},                  # SERSIC_ELLIPSE, unlensed
              "neighbours": {amp [B, K, C], R_sersic [B, K], ...}}   # optional unlensed Sérsics
    model = render(params, n_pix=64, pixel_scale_arcsec=0.101, psf=GaussianPSF([0.16]))  # [B, C, H, W]
    image, variance = add_noise(model, background_rms=[[0.01]], exposure_time_s=[[2264.0]])

Conventions follow lenstronomy 1.14 (see :mod:`lensing.profiles`) so images compare pixel by pixel:
pixel (i, j) of an N×N image is centred at x = (j − (N−1)/2)·Δ, y = (i − (N−1)/2)·Δ (lenstronomy's
``data_configure_simple(inverse=False)``); ``amp`` is surface brightness per arcsec², pixel values are
surface brightness × pixel area (counts/s per pixel). Supersampling by s evaluates s×s sub-pixels and
averages them before the PSF (lenstronomy's regular grid without supersampled convolution).

Noise: Gaussian background σ_bkg plus Poisson noise of the model with exposure time t (exact Poisson draws;
lenstronomy 1.14 draws a Gaussian of the same variance): Var = σ_bkg² + max(model, 0)/t, which is also the returned variance map.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from lensing.profiles import (sersic_coefficients, sersic_from_coefficients, shear_deflection, sie_coefficients,
                              sie_deflection_from_coefficients)
from lensing.psf import convolve

LENS_KEYS = ("theta_E", "e1", "e2", "center_x", "center_y")
SHEAR_KEYS = ("gamma1", "gamma2")
SERSIC_KEYS = ("amp", "R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y")


def pixel_grid(n_pix: int, pixel_scale_arcsec, supersampling: int = 1, dtype=torch.float32,
               device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Sub-pixel centres (x, y) in arcsec, shape [B or 1, N·s, N·s].

    ``pixel_scale_arcsec``: float or a [B] tensor (one scale per image).
    """
    n_pix, s = int(n_pix), int(supersampling)
    if n_pix < 1 or s < 1:
        raise ValueError(f"n_pix and supersampling must be >= 1, got {n_pix}, {s}")
    sub = torch.arange(n_pix * s, dtype=dtype, device=device)
    offsets = (sub + 0.5) / s - 0.5 - (n_pix - 1) / 2  # in pixels, symmetric about the centre
    scale = torch.as_tensor(pixel_scale_arcsec, dtype=dtype, device=device).reshape(-1, 1, 1)
    x = offsets[None, None, :] * scale
    y = offsets[None, :, None] * scale
    return x.expand(-1, n_pix * s, -1), y.expand(-1, -1, n_pix * s)


def _col(t: torch.Tensor) -> torch.Tensor:
    """[B] → [B, 1, 1] for broadcasting against [B, H, W] grids."""
    return t.reshape(-1, 1, 1)


def _check_keys(group: str, values: Mapping, keys: tuple[str, ...]) -> None:
    missing = [k for k in keys if k not in values]
    if missing:
        raise KeyError(f"simulator parameters '{group}' lack {missing}; expected {list(keys)}")


SIE_COEFFICIENT_KEYS = ("center_x", "center_y", "cos_phi", "sin_phi", "q2", "s", "k", "scale")
SERSIC_COEFFICIENT_KEYS = ("amp", "center_x", "center_y", "t11", "t12", "t22", "floor2", "b_n_log2e",
                           "half_inv_n_log2e")
LIGHT_GROUPS = ("source", "source_knots", "lens_light", "neighbours")


def scene_coefficients(params: Mapping) -> dict:
    """The per-scene constants of every profile (``lensing.profiles.sie_coefficients`` and
    ``sersic_coefficients``), same leading shapes as the parameters: ``lens`` → SIE_COEFFICIENT_KEYS,
    light groups → SERSIC_COEFFICIENT_KEYS, ``shear`` as given. :func:`deflection`, :func:`sersic_bands` and
    :func:`neighbour_bands` are these followed by the ``*_from_coefficients`` per-pixel functions; the batch
    renderer computes them once per batch, outside its compiled per-pixel kernel."""
    out: dict = {}
    if params.get("lens") is not None:
        lens = params["lens"]
        _check_keys("lens", lens, LENS_KEYS)
        coef = sie_coefficients(lens["theta_E"], lens["e1"], lens["e2"])
        out["lens"] = dict(zip(SIE_COEFFICIENT_KEYS, (lens["center_x"], lens["center_y"], *coef)))
    if params.get("shear") is not None:
        _check_keys("shear", params["shear"], SHEAR_KEYS)
        out["shear"] = {k: params["shear"][k] for k in SHEAR_KEYS}
    for group in LIGHT_GROUPS:
        light = params.get(group)
        if light is not None:
            out[group] = _light_coefficients(light, group)
    return out


def _light_coefficients(light: Mapping, group: str) -> dict:
    _check_keys(group, light, SERSIC_KEYS)
    coef = sersic_coefficients(*(light[k] for k in ("R_sersic", "n_sersic", "e1", "e2")))
    return dict(zip(SERSIC_COEFFICIENT_KEYS, (light["amp"], light["center_x"], light["center_y"], *coef)))


def deflection(x, y, params: Mapping) -> tuple[torch.Tensor, torch.Tensor]:
    """Total deflection of SIE (+ external shear when ``params['shear']`` is given) on grids [B, H, W]."""
    if params.get("lens") is None:
        raise KeyError("deflection: params has no 'lens'")
    return deflection_from_coefficients(x, y, scene_coefficients({"lens": params["lens"],
                                                                  "shear": params.get("shear")}))


def deflection_from_coefficients(x, y, coef: Mapping, fast_math: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`deflection` from :func:`scene_coefficients` (``coef['lens']``, optional ``coef['shear']``);
    ``fast_math`` as in :func:`lensing.profiles.sie_deflection_from_coefficients`."""
    ax, ay = sie_deflection_from_coefficients(x, y, *(_col(coef["lens"][k]) for k in SIE_COEFFICIENT_KEYS),
                                              fast_math=fast_math)
    if coef.get("shear") is not None:
        sx, sy = shear_deflection(x, y, _col(coef["shear"]["gamma1"]), _col(coef["shear"]["gamma2"]))
        ax, ay = ax + sx, ay + sy
    return ax, ay


def sersic_bands(x, y, light: Mapping, group: str) -> torch.Tensor:
    """Multi-band Sérsic surface brightness [B, C, H, W]: one morphology, ``amp`` [B, C] per band."""
    return sersic_bands_from_coefficients(x, y, _light_coefficients(light, group))


def sersic_bands_from_coefficients(x, y, coef: Mapping, fast_math: bool = False) -> torch.Tensor:
    """:func:`sersic_bands` from one light group of :func:`scene_coefficients`; ``fast_math`` as in
    :func:`lensing.profiles.sersic_from_coefficients`."""
    shape = sersic_from_coefficients(x, y, 1.0, *(_col(coef[k]) for k in SERSIC_COEFFICIENT_KEYS[1:]),
                                     fast_math=fast_math)
    amp = coef["amp"]
    if amp.ndim == 1:
        amp = amp[:, None]
    return shape[:, None] * amp[:, :, None, None]


def neighbour_bands(x, y, light: Mapping) -> torch.Tensor:
    """Sum of K unlensed Sérsic neighbours: parameters [B, K] (amp [B, K, C]) → [B, C, H, W]."""
    return neighbour_bands_from_coefficients(x, y, _light_coefficients(light, "neighbours"))


def neighbour_bands_from_coefficients(x, y, coef: Mapping, fast_math: bool = False) -> torch.Tensor:
    """:func:`neighbour_bands` from one [B, K] light group of :func:`scene_coefficients`."""
    amp = coef["amp"]
    b, k, c = amp.shape
    flat = {key: coef[key].reshape(b * k) for key in SERSIC_COEFFICIENT_KEYS[1:]}
    flat["amp"] = amp.reshape(b * k, c)
    gx = x.expand(b, -1, -1).repeat_interleave(k, dim=0)
    gy = y.expand(b, -1, -1).repeat_interleave(k, dim=0)
    return sersic_bands_from_coefficients(gx, gy, flat, fast_math).reshape(b, k, c, *x.shape[-2:]).sum(dim=1)


def render(params: Mapping, n_pix: int, pixel_scale_arcsec, psf=None, supersampling: int = 1,
           n_bands: int | None = None, return_components: bool = False, conv_method: str = "auto"):
    """Noiseless images [B, C, N, N] in counts/s per pixel (gradients flow to every tensor parameter).

    Components present in ``params`` are added: lensed ``source`` (needs ``lens``; plus ``source_knots``,
    lensed the same way and counted as part of the source), ``lens_light``,
    ``neighbours``. With ``return_components`` returns a dict with ``total`` and the PSF-convolved
    ``source``, ``lens_light``, ``neighbours`` images and the deflection ``alpha_x``, ``alpha_y`` [B, N, N].
    """
    ref = _reference_tensor(params)
    dtype, device = ref.dtype, ref.device
    batch = ref.shape[0]
    x, y = pixel_grid(n_pix, pixel_scale_arcsec, supersampling, dtype, device)
    x, y = x.expand(batch, -1, -1), y.expand(batch, -1, -1)
    surface: dict[str, torch.Tensor] = {}
    alpha = None
    if params.get("source") is not None:
        if params.get("lens") is None:
            raise KeyError("a 'source' needs a 'lens' to be lensed (give theta_E=0 for an unlensed source)")
        ax, ay = deflection(x, y, params)
        alpha = (ax, ay)
        surface["source"] = sersic_bands(x - ax, y - ay, params["source"], "source")
        if params.get("source_knots") is not None:  # further lensed components (clumps, a second disc)
            surface["source"] = surface["source"] + neighbour_bands(x - ax, y - ay, params["source_knots"])
    if params.get("lens_light") is not None:
        surface["lens_light"] = sersic_bands(x, y, params["lens_light"], "lens_light")
    if params.get("neighbours") is not None:
        surface["neighbours"] = neighbour_bands(x, y, params["neighbours"])
    if not surface:
        raise KeyError("nothing to render: give at least one of 'source', 'lens_light', 'neighbours'")
    channels = {v.shape[1] for v in surface.values()}
    if len(channels) != 1 or (n_bands is not None and channels != {int(n_bands)}):
        raise ValueError(f"light components disagree on the number of bands: {sorted(channels)} "
                         f"(expected {n_bands})")
    scale = torch.as_tensor(pixel_scale_arcsec, dtype=dtype, device=device).reshape(-1, 1, 1, 1)
    names = list(surface)
    stacked = torch.cat([surface[n] for n in names], dim=1) if return_components else sum(surface.values())
    if supersampling > 1:
        stacked = F.avg_pool2d(stacked, kernel_size=supersampling)
    stacked = stacked * scale**2  # surface brightness × pixel area
    c = next(iter(channels))
    if return_components:
        # convolve each component (linear, so they add up to the convolved total)
        pieces = stacked.reshape(batch, len(names), c, n_pix, n_pix)
        conv = convolve(pieces.reshape(batch, len(names) * c, n_pix, n_pix),
                        _repeat_psf(psf, len(names)), pixel_scale_arcsec, conv_method)
        conv = conv.reshape(batch, len(names), c, n_pix, n_pix)
        out = {name: conv[:, i] for i, name in enumerate(names)}
        out["total"] = conv.sum(dim=1)
        if alpha is not None:
            ax, ay = alpha
            if supersampling > 1:
                ax = F.avg_pool2d(ax[:, None], supersampling)[:, 0]
                ay = F.avg_pool2d(ay[:, None], supersampling)[:, 0]
            out["alpha_x"], out["alpha_y"] = ax, ay
        return out
    return convolve(stacked, psf, pixel_scale_arcsec, conv_method)


def _repeat_psf(psf, times: int):
    """The PSF for a [B, times·C] stack of components (per-band FWHMs / kernels tiled)."""
    from lensing.psf import GaussianPSF, PixelPSF

    if psf is None or times == 1:
        return psf
    if isinstance(psf, GaussianPSF):
        fwhm = torch.as_tensor(psf.fwhm_arcsec)
        if fwhm.ndim == 0:
            return psf
        return GaussianPSF(fwhm.repeat(*([1] * (fwhm.ndim - 1)), times), psf.truncation)
    kernel = torch.as_tensor(psf.kernel)
    if kernel.ndim == 2:
        return psf
    if kernel.ndim == 3:
        return PixelPSF(kernel.repeat(times, 1, 1))
    return PixelPSF(kernel.repeat(1, times, 1, 1))


def _reference_tensor(params: Mapping) -> torch.Tensor:
    for group in ("lens", "source", "lens_light", "neighbours"):
        values = params.get(group)
        if values:
            for key in ("theta_E", "R_sersic"):
                if key in values:
                    t = values[key]
                    if not isinstance(t, torch.Tensor):
                        raise TypeError(f"parameter {group}.{key} must be a torch tensor, got {type(t).__name__}")
                    return t.reshape(t.shape[0], -1)[:, 0] if t.ndim > 1 else t
    raise KeyError("parameters hold neither lens.theta_E nor any R_sersic")


def add_noise(model: torch.Tensor, background_rms, exposure_time_s, generator: torch.Generator | None = None,
              poisson: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """Noisy image and variance map for a noiseless ``model`` [B, C, H, W] in counts/s.

    Poisson noise of the (non-negative) model over ``exposure_time_s``, drawn as Poisson(model·t)/t (exact
    counts; lenstronomy 1.14's image_util.add_poisson draws the Gaussian approximation N(0, |model|/t)
    instead: the same variance, different tails at low counts), plus Gaussian background noise σ = ``background_rms`` (counts/s); both are
    floats, [C] or [B, C]. Variance map = σ_bkg² + max(model, 0)/t. Noise is not differentiable.

    Each image draws from its own stream: ``generator`` gives one 63-bit seed per image (B draws, whatever
    the images hold), and the image's Poisson and Gaussian noise come from a generator seeded with it.
    ``torch.poisson`` consumes a value-dependent number of random numbers (inversion below 10 counts,
    rejection above), so with one shared stream a rounding-level change of one expected count (another
    renderer, another device, float32 vs float64) re-drew the noise of every later image of the batch;
    now it can change only that image's.
    """
    b, c = model.shape[:2]
    sigma = _broadcast_bc(background_rms, b, c, model)
    t_exp = _broadcast_bc(exposure_time_s, b, c, model)
    if bool((sigma < 0).any()) or bool((t_exp <= 0).any()):
        raise ValueError("background_rms must be >= 0 and exposure_time_s > 0")
    clean = model.detach().clamp(min=0)
    noisy = model.detach().clone()
    # draw on the generator's device (a CPU generator with a CUDA model is allowed): the same generator
    # then gives the same noise whichever device rendered the model
    draw = generator.device if generator is not None else model.device
    seeds = torch.randint(0, 2**63 - 1, (b,), generator=generator, device=draw).tolist()
    expected = (clean * t_exp).to(draw)
    counts, gauss = torch.empty_like(expected), torch.empty(model.shape, dtype=model.dtype, device=draw)
    for i, seed in enumerate(seeds):
        stream = torch.Generator(device=draw).manual_seed(seed)
        if poisson:
            counts[i] = torch.poisson(expected[i], generator=stream)
        gauss[i] = torch.randn(model.shape[1:], generator=stream, dtype=model.dtype, device=draw)
    if poisson:
        noisy = noisy + counts.to(model.device) / t_exp - clean
    noisy = noisy + gauss.to(model.device) * sigma
    variance = sigma**2 + (clean / t_exp if poisson else 0.0)
    return noisy, variance


def _broadcast_bc(value, b: int, c: int, like: torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=like.dtype, device=like.device)
    if t.ndim == 0:
        t = t.expand(b, c)
    elif t.ndim == 1:
        t = t[None, :].expand(b, c) if t.numel() == c else t[:, None].expand(b, c)
    if t.shape != (b, c):
        raise ValueError(f"expected a float, [C={c}] or [B={b}, C={c}] values, got shape {list(t.shape)}")
    return t[:, :, None, None]


def variance_map(model: torch.Tensor, background_rms, exposure_time_s) -> torch.Tensor:
    """σ_bkg² + max(model, 0)/t (differentiable in the model), the χ² weight of the physics loss."""
    b, c = model.shape[:2]
    sigma = _broadcast_bc(background_rms, b, c, model)
    t_exp = _broadcast_bc(exposure_time_s, b, c, model)
    return sigma**2 + model.clamp(min=0) / t_exp
