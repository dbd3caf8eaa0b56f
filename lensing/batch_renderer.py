"""A fused, chunked renderer for many scenes of one geometry (the fast path of :func:`lensing.simulator.render`).

    fast = BatchRenderer(n_pix=64, pixel_scale_arcsec=0.1, psf=GaussianPSF(0.18), supersampling=3,
                         n_bands=1, dtype=torch.float32, compile=True)
    images = fast(params)          # [B, C, N, N], the same numbers as render(params, 64, 0.1, psf, 3)

What makes it faster than :func:`~lensing.simulator.render` on a CPU (the physics is the same functions,
``lensing.simulator.scene_coefficients`` and the ``*_from_coefficients`` per-pixel functions that
``deflection`` and ``sersic_bands`` are made of, so the two agree to rounding):
- everything that depends only on the geometry is computed once, in ``__init__``: the (sub-)pixel grid,
  the PSF taps per band (the separable Gaussian with nearest-pixel edges, scipy's
  ``gaussian_filter(mode="nearest")``), the pixel area;
- everything that depends only on the scene (the profiles' trigonometry, square roots and divisions) is
  computed once per batch, before the chunks (:func:`pack_coefficients`), so the per-pixel kernel holds
  only the per-pixel maths;
- scenes are rendered in chunks sized to the CPU cache (``chunk_elements`` sub-pixels per chunk), so the
  intermediates of the profile maths stay in cache instead of streaming [B, H·s, W·s] arrays through memory
  (at supersampling 3, 101 px and batch 128 a single pass holds ~47 MB per float32 intermediate);
- with ``compile=True`` one chunk (deflection, both Sérsic profiles, sub-pixel averaging, pixel area,
  separable PSF) is ONE torch.compile graph (``fullgraph=True``: no graph breaks; the PSF radius, the
  only data-dependent size, is fixed in ``__init__``), so inductor fuses the elementwise maths into one
  vectorized loop. The last chunk is padded to the chunk size, so one compilation serves every batch size.

On CUDA the whole batch is one chunk (the GPU has no cache to fit and wants large launches): the same code
runs on either device. Per-scene PSFs (a [B, C] FWHM) and pixel PSFs are outside this fast path: use
:func:`~lensing.simulator.render`. Gradients flow (the compiled graph is differentiable), but the fast
path is meant for data generation under ``torch.no_grad()``.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.nn.functional as F

from lensing.psf import FWHM_TO_SIGMA, GaussianPSF, gaussian_kernel_1d
from lensing.simulator import (deflection_from_coefficients, neighbour_bands_from_coefficients, pixel_grid,
                               scene_coefficients, sersic_bands_from_coefficients)

GROUPS = ("lens", "shear", "source", "source_knots", "lens_light", "neighbours")
DEFAULT_CHUNK_ELEMENTS = 1 << 17  # sub-pixels per chunk on CPU, eager: 512 KB per float32 intermediate (L2)
COMPILED_CHUNK_ELEMENTS = 1 << 17  # compiled (measured best of 2^15, 2^17, 2^19 at 64 px, ss 1 and 3)
RECOMPILE_LIMIT = 64


def _pad_nearest(images: torch.Tensor, radius: int, dim: int) -> torch.Tensor:
    """``images`` with ``radius`` copies of its first and last slice along ``dim`` added on either side."""
    if radius == 0:
        return images
    shape = list(images.shape)
    shape[dim] = radius
    first = images.narrow(dim, 0, 1).expand(shape)
    last = images.narrow(dim, images.shape[dim] - 1, 1).expand(shape)
    return torch.cat([first, images, last], dim=dim)


def separable_nearest(images: torch.Tensor, taps: torch.Tensor) -> torch.Tensor:
    """images [b, C, H, W] convolved with a symmetric 1-D kernel per band ``taps`` [C, 2R+1] along both axes,
    edges continued with the nearest pixel (scipy.ndimage mode="nearest"). 2(2R+1) multiply-adds per pixel
    (the band-matrix product costs 2N); R is read from the shape, so this traces without graph breaks.

    The edges are padded by concatenating copies of the border rows and columns rather than with
    ``F.pad(mode="replicate")``: under torch.compile a pad with a single producer is fused into it, so the
    whole profile maths was re-evaluated on the padded (N + 2R)² grid with gathered loads and a scalar tail;
    with several readers the rendered image is stored once and the padding only copies it."""
    width = taps.shape[-1]
    radius = width // 2
    h, w = images.shape[-2:]
    padded = _pad_nearest(_pad_nearest(images, radius, -1), radius, -2)
    k = taps[None, :, :, None, None]  # [1, C, 2R+1, 1, 1]
    rows = padded[..., 0:w] * k[:, :, 0]
    for t in range(1, width):
        rows = rows + padded[..., t:t + w] * k[:, :, t]
    out = rows[..., 0:h, :] * k[:, :, 0]
    for t in range(1, width):
        out = out + rows[..., t:t + h, :] * k[:, :, t]
    return out


def _unpack(packed: torch.Tensor, layout: tuple) -> dict:
    """[b, P] columns → the simulator's parameter dict (``layout``: (group, key, trailing shape) per entry)."""
    params: dict = {}
    offset = 0
    for group, key, tail in layout:
        width = 1
        for size in tail:
            width *= size
        params.setdefault(group, {})[key] = packed[:, offset:offset + width].reshape(packed.shape[0], *tail)
        offset += width
    return params


def pack_coefficients(params: Mapping) -> tuple[torch.Tensor, tuple]:
    """(packed [B, P], layout): the per-scene constants of every profile (``scene_coefficients``:
    trigonometry, square roots, divisions), computed once per batch, as one tensor, so a chunk is one slice
    and the compiled graph has few guards (its per-call cost). Inside the compiled kernel these constants
    would be re-evaluated for every vector of pixels (inductor keeps libm's errno semantics, so the C++
    compiler may not hoist them out of the pixel loop; see the README's speed section)."""
    coef = scene_coefficients(params)
    batch = next(iter(next(iter(coef.values())).values())).shape[0]
    layout = tuple((g, k, tuple(v.shape[1:])) for g, d in coef.items() for k, v in d.items())
    return torch.cat([v.reshape(batch, -1) for d in coef.values() for v in d.values()], dim=1), layout


def _surface_chunk(packed: torch.Tensor, layout: tuple, x: torch.Tensor, y: torch.Tensor, supersampling: int,
                   pixel_area: float, taps: torch.Tensor | None) -> torch.Tensor:
    """Rendered chunk [b, C, N, N] of the scenes whose profile coefficients (``scene_coefficients``) are
    packed in ``packed`` [b, P]: lensed source + lens light + neighbours, averaged over sub-pixels, times the
    pixel area, convolved with the per-band Gaussian ``taps``. Traceable without graph breaks (all sizes
    come from shapes and python constants)."""
    coef = _unpack(packed, layout)
    total = None
    if coef.get("source") is not None:
        ax, ay = deflection_from_coefficients(x, y, coef)
        total = sersic_bands_from_coefficients(x - ax, y - ay, coef["source"])
        if coef.get("source_knots") is not None:
            total = total + neighbour_bands_from_coefficients(x - ax, y - ay, coef["source_knots"])
    if coef.get("lens_light") is not None:
        light = sersic_bands_from_coefficients(x, y, coef["lens_light"])
        total = light if total is None else total + light
    if coef.get("neighbours") is not None:
        near = neighbour_bands_from_coefficients(x, y, coef["neighbours"])
        total = near if total is None else total + near
    if supersampling > 1:
        total = F.avg_pool2d(total, kernel_size=supersampling)
    total = total * pixel_area
    if taps is not None:
        total = separable_nearest(total, taps)
    return total


class BatchRenderer:
    """Render batches of scenes on one fixed grid and PSF; see the module docstring.

    Args:
        n_pix, pixel_scale_arcsec, supersampling: the image geometry (one pixel scale for every scene).
        psf: ``GaussianPSF`` with a float or per-band [C] FWHM, or None.
        n_bands: number of bands C (the length of the ``amp`` rows).
        dtype, device: of the grid; the scene parameters must match.
        compile: torch.compile one chunk (``fullgraph=True``, static shapes); False runs the same chunks eagerly.
        chunk_elements: sub-pixels per chunk on CPU (default 2^17); 0 = the whole batch at once.
    """

    def __init__(self, n_pix: int, pixel_scale_arcsec: float, psf=None, supersampling: int = 1, n_bands: int = 1,
                 dtype=torch.float32, device=None, compile: bool = False, chunk_elements: int | None = None):
        self.n_pix, self.supersampling, self.n_bands = int(n_pix), int(supersampling), int(n_bands)
        self.pixel_scale = float(pixel_scale_arcsec)
        self.dtype, self.device = dtype, torch.device(device or "cpu")
        x, y = pixel_grid(self.n_pix, self.pixel_scale, self.supersampling, dtype, self.device)
        self.x, self.y = x.contiguous(), y.contiguous()  # [1, N·s, N·s], computed once
        self.pixel_area = self.pixel_scale**2
        self.taps = None
        if psf is not None:
            if not isinstance(psf, GaussianPSF):
                raise TypeError(f"BatchRenderer supports GaussianPSF or None, got {type(psf).__name__}; use "
                                "lensing.simulator.render for pixel PSFs")
            fwhm = torch.as_tensor(psf.fwhm_arcsec, dtype=torch.float64).reshape(-1)
            if fwhm.numel() == 1:
                fwhm = fwhm.expand(self.n_bands)
            if fwhm.numel() != self.n_bands:
                raise ValueError(f"BatchRenderer: PSF FWHM has {fwhm.numel()} values for {self.n_bands} bands (a "
                                 "per-scene [B, C] PSF needs lensing.simulator.render)")
            # sampled kernels once (float64, then cast): the radius, a data-dependent size, is fixed here
            k1 = gaussian_kernel_1d(fwhm * FWHM_TO_SIGMA / self.pixel_scale, psf.truncation)
            self.taps = k1.to(dtype=dtype, device=self.device)  # [C, 2R+1], symmetric
        pixels = (self.n_pix * self.supersampling) ** 2
        default = COMPILED_CHUNK_ELEMENTS if compile else DEFAULT_CHUNK_ELEMENTS
        budget = default if chunk_elements is None else int(chunk_elements)
        self.chunk = 0 if (self.device.type != "cpu" or budget <= 0) else max(1, budget // pixels)
        self.compiled = bool(compile)
        if compile:
            # every geometry (size, supersampling, bands, chunk) is one more specialization of the same code
            # object; dynamo's default limit of 8 would make the 9th a hard error under fullgraph=True
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        self._fn = torch.compile(_surface_chunk, fullgraph=True, dynamic=False) if compile else _surface_chunk

    def _run(self, packed: torch.Tensor, layout: tuple) -> torch.Tensor:
        return self._fn(packed, layout, self.x, self.y, self.supersampling, self.pixel_area, self.taps)

    def __call__(self, params: Mapping) -> torch.Tensor:
        params = {g: dict(params[g]) for g in GROUPS if params.get(g) is not None}
        if not any(g in params for g in ("source", "lens_light", "neighbours")):
            raise KeyError("nothing to render: give at least one of 'source', 'lens_light', 'neighbours'")
        ref = next(iter(next(iter(params.values())).values()))
        batch = ref.shape[0]
        for group, values in params.items():
            for key, value in values.items():
                other_device = value.device.type != self.device.type or (
                    self.device.index is not None and value.device.index != self.device.index)  # "cuda" ~ "cuda:0"
                if value.dtype != self.dtype or other_device or value.shape[0] != batch:
                    raise ValueError(f"parameter {group}.{key}: {value.dtype} on {value.device}, batch "
                                     f"{value.shape[0]}; the renderer was built for {self.dtype} on {self.device}, "
                                     f"batch {batch}")
            if "amp" in values and values["amp"].shape[-1] != self.n_bands:
                raise ValueError(f"{group}.amp has {values['amp'].shape[-1]} band(s); the renderer has {self.n_bands}")
        packed, layout = pack_coefficients(params)
        chunk = self.chunk or batch
        if chunk >= batch and not self.compiled:
            return self._run(packed, layout)
        outputs = []
        for start in range(0, batch, chunk):
            piece = packed[start:start + chunk]
            short = chunk - piece.shape[0]
            if short:  # pad with copies of the last scene: static shapes, one compilation
                piece = torch.cat([piece, piece[-1:].expand(short, -1)])
            out = self._run(piece, layout)
            outputs.append(out[: chunk - short] if short else out)
        return torch.cat(outputs) if len(outputs) > 1 else outputs[0]
