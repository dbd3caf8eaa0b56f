"""Image artefacts that are not sky: cosmic-ray hits and satellite trails, added to noiseless images.

A share ``fraction`` of ALL images (lenses and non-lenses alike, so an artefact says nothing about the
label) gets artefacts before the noise is drawn:
- cosmic rays: 1-4 hits, each a straight streak of 1-4 pixels (not PSF-blurred: they hit the detector),
  of 20-200 σ_bkg per pixel;
- with probability 1/3, a satellite trail: a straight line across the whole cutout, a Gaussian profile
  across the line of the image's PSF FWHM (it is in the sky), peak 2-20 σ_bkg.
Images are [B, C, H, W] in counts/s per pixel; σ_bkg is the per-image, per-band background σ. Cosmic rays
hit one band (one exposure); trails appear in every band.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from lensing.psf import FWHM_TO_SIGMA


def add_artefacts(images: torch.Tensor, background_rms: np.ndarray, psf_fwhm_arcsec: np.ndarray,
                  pixel_scale_arcsec: float, fraction: float, rng: np.random.Generator) -> tuple[torch.Tensor, np.ndarray]:
    """(images with artefacts, [B] bool: which images got them). ``background_rms``, ``psf_fwhm_arcsec``
    [B, C]. With ``fraction`` 0 nothing is drawn and the images are returned unchanged."""
    b, c, h, w = images.shape
    hit = np.zeros(b, dtype=bool)
    if fraction <= 0:
        return images, hit
    hit = rng.uniform(0, 1, b) < fraction
    extra = np.zeros((b, c, h, w))
    yy, xx = np.mgrid[0:h, 0:w]
    for i in np.where(hit)[0]:
        for _ in range(rng.integers(1, 5)):  # cosmic rays
            band, length = rng.integers(0, c), rng.integers(1, 5)
            y0, x0 = rng.integers(0, h), rng.integers(0, w)
            dy, dx = [(0, 1), (1, 0), (1, 1), (1, -1)][rng.integers(0, 4)]
            ys = np.clip(y0 + dy * np.arange(length), 0, h - 1)
            xs = np.clip(x0 + dx * np.arange(length), 0, w - 1)
            extra[i, band, ys, xs] += rng.uniform(20, 200) * background_rms[i, band]
        if rng.uniform(0, 1) < 1 / 3:  # satellite trail through a random point at a random angle
            angle = rng.uniform(0, math.pi)
            y0, x0 = rng.uniform(0, h), rng.uniform(0, w)
            distance = np.abs((xx - x0) * math.sin(angle) - (yy - y0) * math.cos(angle))  # pixels from the line
            peak = rng.uniform(2, 20)
            for band in range(c):
                sigma_px = psf_fwhm_arcsec[i, band] * FWHM_TO_SIGMA / pixel_scale_arcsec
                extra[i, band] += peak * background_rms[i, band] * np.exp(-0.5 * (distance / sigma_px) ** 2)
    return images + torch.as_tensor(extra, dtype=images.dtype, device=images.device), hit
