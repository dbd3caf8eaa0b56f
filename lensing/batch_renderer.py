"""A fused, chunked renderer for many scenes of one geometry (the fast path of :func:`lensing.simulator.render`).

    fast = BatchRenderer(n_pix=64, pixel_scale_arcsec=0.1, psf=GaussianPSF(0.18), supersampling=3,
                         n_bands=1, dtype=torch.float32, compile=True)
    images = fast(params)          # [B, C, N, N], the same numbers as render(params, 64, 0.1, psf, 3)
    images = fast(params, psf_fwhm_arcsec=fwhm_bc, pixel_scale_arcsec=0.168)  # per-scene seeing [B, C], another scale

What makes it faster than :func:`~lensing.simulator.render` on a CPU (the physics is the same functions,
``lensing.simulator.scene_coefficients`` and the ``*_from_coefficients`` per-pixel functions that
``deflection`` and ``sersic_bands`` are made of, so the two agree to rounding):
- everything that depends only on the geometry is computed once, in ``__init__``: the (sub-)pixel grid,
  the PSF taps per band (the separable Gaussian with nearest-pixel edges, scipy's
  ``gaussian_filter(mode="nearest")``), the pixel area; a call with its own pixel scale or per-scene PSF
  (the validation stream's varying seeing) recomputes only these, once per call;
- everything that depends only on the scene (the profiles' trigonometry, square roots and divisions) is
  computed once per batch, before the chunks (:func:`pack_coefficients`), so the per-pixel kernel holds
  only the per-pixel maths;
- scenes are rendered in chunks (``chunk_elements`` sub-pixels per chunk, rounded down to a power of two
  of scenes so that the usual power-of-two batches split without a padded chunk), so the intermediates
  stay in cache instead of streaming [B, H·s, W·s] arrays through memory (at supersampling 3, 101 px and
  batch 128 a single pass holds ~47 MB per float32 intermediate);
- the sub-pixel grid is stored sub-pixel-major, [1, s², N²] (:func:`subpixel_major`), so the mean over a
  pixel's s² sub-pixels is a sum over one axis (no average-pooling pass over an [N·s, N·s] image);
- with ``compile=True`` one chunk (deflection, both Sérsic profiles, sub-pixel sum, pixel area, separable
  PSF, written in place into the batch's output) is ONE torch.compile graph (``fullgraph=True``: no graph
  breaks; the PSF radius, the only data-dependent size, is fixed in ``__init__``). The s² sub-pixel rows
  are added in one expression, so inductor makes a few vectorized loops over the pixels and no
  [b, C, s², N²] intermediate (at 101 px, supersampling 3: six loops that each store one sub-pixel's
  lensed-source radius, [b, N²], because inductor stores an expression of > 30 operations that is read
  twice, and one loop that evaluates the rest for all nine sub-pixels and sums them in registers). In
  these loops the arctan and the logarithms are Cephes' float32 algorithms (``fast_math``,
  :func:`lensing.profiles.atan_ratio_f32`, :func:`lensing.profiles.log_f32`) rather than calls into
  SLEEF, the Sérsic profile is written in base 2 (SLEEF's exp2 is cheaper than exp), and multiply-adds
  are contracted into FMA instructions (:data:`COMPILE_OPTIONS`). The per-scene constants are one small
  compiled kernel too. The last chunk is padded to the chunk size, so one compilation serves every
  batch size. The README's speed section has the measured effect of each of these.

On CUDA the whole batch is one chunk (the GPU has no cache to fit and wants large launches) and torch's own
atan is used (``fast_math`` defaults to CPU only): the same code runs on either device. Pixel PSFs and
the per-component images of ``render(return_components=True)`` are outside this fast path: use
:func:`~lensing.simulator.render`. Gradients flow (the compiled graph is differentiable), but the fast path
is meant for data generation under ``torch.no_grad()``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

from lensing.psf import FWHM_TO_SIGMA, GaussianPSF, gaussian_kernel_1d, per_sample_band
from lensing.simulator import (deflection_from_coefficients, neighbour_bands_from_coefficients, pixel_grid,
                               scene_coefficients, sersic_bands_from_coefficients)

GROUPS = ("lens", "shear", "source", "source_knots", "lens_light", "neighbours")
DEFAULT_CHUNK_ELEMENTS = 1 << 17  # sub-pixels per chunk on CPU, eager: 512 KB per float32 intermediate (L2)
COMPILED_CHUNK_ELEMENTS = 1 << 19  # compiled (measured best of 2^18, 2^19, 2^20 at 64 and 101 px, ss 1 and 3)
RECOMPILE_LIMIT = 64
# per-call PSF kernels: radius rounded up to a multiple of this (zero taps), so that a stream of batches with
# varying seeing compiles once or twice, not once per largest radius (one compilation of a scene layout with
# neighbours and source knots took 70-90 s here)
CALL_RADIUS_STEP = 4
# inductor compiles its C++ with -ffp-contract=off by default; "fast" lets the compiler fuse a·b + c into one
# FMA instruction (one rounding instead of two; 3 % faster at 101 px, supersampling 3)
COMPILE_OPTIONS = {"cpp.enable_floating_point_contract_flag": "fast"}


def separable_nearest(images: torch.Tensor, taps: torch.Tensor, fold_edges: bool = False) -> torch.Tensor:
    """images [b, C, H, W] convolved with a symmetric 1-D kernel per band ``taps`` [C, 2R+1] (or per scene and
    band, [b, C, 2R+1]) along both axes,
    edges continued with the nearest pixel (scipy.ndimage mode="nearest"). 2(2R+1) multiply-adds per pixel
    (the band-matrix product costs 2N); R is read from the shape, so this traces without graph breaks.
    ``fold_edges``: the edge outputs fold the outside taps onto the border pixel instead of reading a padded
    copy (for torch.compile, where it is faster; eagerly its ~4R² small operations per axis cost more)."""
    return _convolve_nearest(_convolve_nearest(images, taps, -1, fold_edges), taps, -2, fold_edges)


def _convolve_nearest(images: torch.Tensor, taps: torch.Tensor, dim: int, fold_edges: bool) -> torch.Tensor:
    """One axis of :func:`separable_nearest`. Padded: the image is extended by R copies of its border pixels
    (concatenation, not ``F.pad(mode="replicate")``: under torch.compile a pad with a single producer is
    fused into it, and the whole profile maths was re-evaluated on the padded grid) and the output is a sum
    of 2R + 1 shifted slices. With ``fold_edges`` only the N − 2R interior outputs are such a sum; each of the
    R outputs at either edge folds the taps that fall outside onto the border pixel, so no padded copy is
    made (compiled: 12 % faster at 101 px without supersampling). Images of at most 2R pixels are padded."""
    width = taps.shape[-1]
    radius = width // 2
    n = images.shape[dim]
    k = taps.reshape(-1, taps.shape[-2], width, 1, 1)  # [1 or b, C, 2R+1, 1, 1]
    if radius == 0:
        return images * k[:, :, 0]
    if n <= 2 * radius or not fold_edges:
        shape = list(images.shape)
        shape[dim] = radius
        padded = torch.cat([images.narrow(dim, 0, 1).expand(shape), images,
                            images.narrow(dim, n - 1, 1).expand(shape)], dim=dim)
        return sum(padded.narrow(dim, t, n) * k[:, :, t] for t in range(width))
    interior = sum(images.narrow(dim, t, n - 2 * radius) * k[:, :, t] for t in range(width))
    left, right = [], []
    for i in range(radius):  # output i reads pixels i − R … i + R; those below 0 are pixel 0
        outside = radius - i
        left.append(images.narrow(dim, 0, 1) * k[:, :, : outside + 1].sum(dim=2)
                    + sum(images.narrow(dim, j, 1) * k[:, :, outside + j] for j in range(1, i + radius + 1)))
        j_last = n - 1  # mirror image: output n − 1 − i
        right.insert(0, images.narrow(dim, j_last, 1) * k[:, :, width - outside - 1:].sum(dim=2)
                     + sum(images.narrow(dim, j_last - j, 1) * k[:, :, width - outside - 1 - j]
                           for j in range(1, i + radius + 1)))
    return torch.cat(left + [interior] + right, dim=dim)


def subpixel_major(grid: torch.Tensor, n_pix: int, supersampling: int) -> torch.Tensor:
    """A [1, N·s, N·s] sub-pixel grid as [1, s², N²] (contiguous): column p holds the s² sub-pixels of pixel p
    (row-major), so the mean over a pixel's sub-pixels is a sum over dim -2 (F.avg_pool2d on the [N·s, N·s]
    layout, reordered)."""
    s = supersampling
    return grid.reshape(1, n_pix, s, n_pix, s).permute(0, 2, 4, 1, 3).reshape(1, s * s, n_pix * n_pix).contiguous()


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


def _surface(coef: Mapping, x: torch.Tensor, y: torch.Tensor, fast_math: bool) -> torch.Tensor:
    """Surface brightness [b, C, …] of lensed source + lens light + neighbours on the grid (x, y)."""
    total = None
    if coef.get("source") is not None:
        ax, ay = deflection_from_coefficients(x, y, coef, fast_math)
        total = sersic_bands_from_coefficients(x - ax, y - ay, coef["source"], fast_math)
        if coef.get("source_knots") is not None:
            total = total + neighbour_bands_from_coefficients(x - ax, y - ay, coef["source_knots"], fast_math)
    if coef.get("lens_light") is not None:
        light = sersic_bands_from_coefficients(x, y, coef["lens_light"], fast_math)
        total = light if total is None else total + light
    if coef.get("neighbours") is not None:
        near = neighbour_bands_from_coefficients(x, y, coef["neighbours"], fast_math)
        total = near if total is None else total + near
    return total


def _surface_chunk(out: torch.Tensor, packed: torch.Tensor, layout: tuple, x: torch.Tensor, y: torch.Tensor,
                   supersampling: int, subpixel_area: torch.Tensor, taps: torch.Tensor | None,
                   fast_math: bool = False, compiled: bool = False) -> None:
    """Renders into ``out`` [b, C, N, N] the scenes whose profile coefficients (``scene_coefficients``) are
    packed in ``packed`` [b, P]: lensed source + lens light + neighbours, summed over sub-pixels, times
    ``subpixel_area`` ([1], arcsec²: the pixel area over s², a tensor so that a new pixel scale is not a new
    compilation), convolved with the per-scene, per-band Gaussian ``taps`` [b, C, 2R+1]. Traceable without graph breaks (all sizes
    come from shapes and python constants); compiled, the last kernel writes straight into ``out`` (a slice
    of the batch's images), so the chunks need no concatenation afterwards. ``fast_math``: the float32
    arctan and log of :func:`lensing.profiles.atan_ratio_f32` and :func:`lensing.profiles.log_f32`, inlined
    into the fused loops, instead of ``torch.atan`` and ``torch.log``.

    x, y are [1, s², N²] (:func:`subpixel_major`): row j holds sub-pixel j of every pixel, so the mean over a
    pixel's sub-pixels is a sum over dim -2. When ``compiled`` (traced for inductor) the s² rows are rendered
    and added in one expression, which inductor turns into a few loops over the N² pixels (no [b, C, s², N²]
    intermediate is stored and read back: 4-10 % faster at s = 3; see the module docstring); eagerly, one
    pass over all sub-pixels and a ``sum`` (fewer, larger operations)."""
    coef = _unpack(packed, layout)
    if compiled:
        total = _surface(coef, x[:, :1], y[:, :1], fast_math)
        for j in range(1, x.shape[1]):
            total = total + _surface(coef, x[:, j:j + 1], y[:, j:j + 1], fast_math)
        total = total[..., 0, :]
    else:
        total = _surface(coef, x, y, fast_math).sum(dim=-2)
    n_pix = math.isqrt(x.shape[-1])
    total = (total * subpixel_area).reshape(*total.shape[:-1], n_pix, n_pix)
    if taps is not None:
        total = separable_nearest(total, taps, fold_edges=compiled)
    out.copy_(total)


class BatchRenderer:
    """Render batches of scenes on one fixed grid and PSF; see the module docstring.

    Args:
        n_pix, pixel_scale_arcsec, supersampling: the image geometry (one pixel scale for every scene of a call;
            a call may give another, ``pixel_scale_arcsec=``).
        psf: ``GaussianPSF`` with a float or per-band [C] FWHM, or None. A call may give other FWHMs, also one
            per scene and band (``psf_fwhm_arcsec=`` [B, C], seeing that varies from image to image), rendered
            exactly as :func:`~lensing.simulator.render` does with ``GaussianPSF([B, C])``: per-scene sampled
            kernels, zero beyond each one's own radius. A new largest radius (rounded up to a multiple of
            ``CALL_RADIUS_STEP``) is a new compilation.
        n_bands: number of bands C (the length of the ``amp`` rows).
        dtype, device: of the grid; the scene parameters must match.
        compile: torch.compile one chunk (``fullgraph=True``, static shapes); False runs the same chunks eagerly.
        chunk_elements: sub-pixels per chunk on CPU (default 2^17 eagerly, 2^19 compiled; rounded down to a
            power of two of scenes); 0 = the whole batch at once.
        fast_math: arctan and log by :func:`lensing.profiles.atan_ratio_f32` and
            :func:`lensing.profiles.log_f32` (Cephes' float32 algorithms as tensor arithmetic, inlined by the
            compiler; 3e-7 relative, 1 ulp) instead of ``torch.atan`` and ``torch.log``; None (default) = on
            for compiled float32 on a CPU, off otherwise (CUDA has fast ones; float64 needs torch's).
    """

    def __init__(self, n_pix: int, pixel_scale_arcsec: float, psf=None, supersampling: int = 1, n_bands: int = 1,
                 dtype=torch.float32, device=None, compile: bool = False, chunk_elements: int | None = None,
                 fast_math: bool | None = None):
        self.n_pix, self.supersampling, self.n_bands = int(n_pix), int(supersampling), int(n_bands)
        self.pixel_scale = float(pixel_scale_arcsec)
        self.dtype, self.device = dtype, torch.device(device or "cpu")
        # the sub-pixel grid in pixel units, computed once (pixel_grid's offsets; times the scale per geometry)
        x, y = pixel_grid(self.n_pix, 1.0, self.supersampling, dtype, self.device)
        self.unit_x, self.unit_y = (subpixel_major(g, self.n_pix, self.supersampling) for g in (x, y))
        self.x, self.y = self.unit_x * self.pixel_scale, self.unit_y * self.pixel_scale
        self.psf, self.taps = psf, None
        if psf is not None:
            if not isinstance(psf, GaussianPSF):
                raise TypeError(f"BatchRenderer supports GaussianPSF or None, got {type(psf).__name__}; use "
                                "lensing.simulator.render for pixel PSFs")
            fwhm = torch.as_tensor(psf.fwhm_arcsec, dtype=torch.float64)
            if fwhm.ndim > 1 or fwhm.numel() not in (1, self.n_bands):
                raise ValueError(f"BatchRenderer: PSF FWHM of shape {list(fwhm.shape)} for {self.n_bands} bands "
                                 "(give a per-scene [B, C] FWHM per call: psf_fwhm_arcsec=)")
            self.taps = self._kernels(fwhm, self.pixel_scale, 1)[0]  # [C, 2R+1], sampled once
        pixels = (self.n_pix * self.supersampling) ** 2
        default = COMPILED_CHUNK_ELEMENTS if compile else DEFAULT_CHUNK_ELEMENTS
        budget = default if chunk_elements is None else int(chunk_elements)
        # a power of two of scenes, so that batches of a power of two (the usual) split without a padded chunk
        self.chunk = 0 if (self.device.type != "cpu" or budget <= 0) else 1 << max(0, (budget // pixels).bit_length() - 1)
        self.compiled = bool(compile)
        if fast_math is None:
            fast_math = self.compiled and dtype == torch.float32 and self.device.type == "cpu"
        if fast_math and dtype != torch.float32:
            raise ValueError(f"BatchRenderer: fast_math is float32-only, the renderer was built for {dtype}")
        self.fast_math = bool(fast_math)
        if compile:
            # every geometry (size, supersampling, bands, chunk) is one more specialization of the same code
            # object; dynamo's default limit of 8 would make the 9th a hard error under fullgraph=True
            torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
        # the per-scene constants: ~40 small operations on [B] tensors, one kernel when compiled (at 64 px and
        # supersampling 1 they took ~5 % of the time eagerly); dynamic shapes after a second batch size
        self._pack = torch.compile(pack_coefficients, fullgraph=True, dynamic=None) if compile else pack_coefficients
        self._fn = torch.compile(_surface_chunk, fullgraph=True, dynamic=False, options=COMPILE_OPTIONS
                                 ) if compile else _surface_chunk

    def _kernels(self, fwhm_arcsec, pixel_scale: float, batch: int, radius_step: int = 1) -> torch.Tensor:
        """Sampled Gaussian kernels [batch, C, 2R+1] (float64, then cast) for a float, [C] or [B, C] FWHM; R is
        rounded up to a multiple of ``radius_step`` with zero taps (the same images: each kernel is zero beyond
        its own radius anyway), so that calls whose largest radius differs a little share one compilation."""
        fwhm = per_sample_band(fwhm_arcsec, batch, self.n_bands, torch.float64, "cpu")
        k1 = gaussian_kernel_1d(fwhm.reshape(-1) * FWHM_TO_SIGMA / pixel_scale, self.psf.truncation)
        extra = -(k1.shape[-1] // 2) % radius_step
        k1 = torch.nn.functional.pad(k1, (extra, extra))
        return k1.reshape(batch, self.n_bands, -1).to(dtype=self.dtype, device=self.device)

    def _geometry(self, batch: int, psf_fwhm_arcsec, pixel_scale_arcsec):
        """(x, y, sub-pixel area [1], taps [batch, C, 2R+1] or None) of one call."""
        scale = self.pixel_scale if pixel_scale_arcsec is None else float(pixel_scale_arcsec)
        if not (math.isfinite(scale) and scale > 0):
            raise ValueError(f"pixel_scale_arcsec must be positive and finite, got {scale}")
        x, y = (self.x, self.y) if scale == self.pixel_scale else (self.unit_x * scale, self.unit_y * scale)
        area = torch.full((1,), scale**2 / self.supersampling**2, dtype=self.dtype, device=self.device)
        if psf_fwhm_arcsec is not None and self.psf is None:
            raise ValueError("psf_fwhm_arcsec given to a renderer built without a PSF (build it with "
                             "psf=GaussianPSF(...), whose truncation the call's kernels use)")
        if self.psf is None:
            taps = None
        elif psf_fwhm_arcsec is None and scale == self.pixel_scale:
            taps = self.taps.expand(batch, -1, -1).contiguous()  # contiguous: one compiled variant either way
        else:
            taps = self._kernels(self.psf.fwhm_arcsec if psf_fwhm_arcsec is None else psf_fwhm_arcsec, scale, batch,
                                 CALL_RADIUS_STEP)
        return x, y, area, taps

    def components(self, params: Mapping, psf_fwhm_arcsec=None, pixel_scale_arcsec: float | None = None) -> dict:
        """{"total": the images, "source": the lensed source (+ knots) alone, PSF-convolved} — what
        :func:`lensing.truth.lens_truth` reads of ``render(return_components=True)`` — from two calls: the
        scene, then its lens and source alone (the source's maths done twice: 1.3-1.5x one call; eagerly on
        500 KiDS-like 48-px scenes with knots and neighbours ``render(return_components=True)`` took 2.2-2.7x
        as long). No "source" when the scenes have none."""
        out = {"total": self(params, psf_fwhm_arcsec, pixel_scale_arcsec)}
        if params.get("source") is not None and params.get("lens") is not None:
            lensed = {g: params[g] for g in ("lens", "shear", "source", "source_knots") if params.get(g) is not None}
            out["source"] = self(lensed, psf_fwhm_arcsec, pixel_scale_arcsec)
        return out

    def __call__(self, params: Mapping, psf_fwhm_arcsec=None, pixel_scale_arcsec: float | None = None) -> torch.Tensor:
        """Images [B, C, N, N] of the scenes in ``params``; ``psf_fwhm_arcsec`` (float, [C] or [B, C]) and
        ``pixel_scale_arcsec`` replace the renderer's for this call."""
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
            bands = values["amp"].shape[-1] if "amp" in values and values["amp"].ndim >= 2 else 1  # [B] amp: one band
            if "amp" in values and bands != self.n_bands:
                raise ValueError(f"{group}.amp has {bands} band(s); the renderer has {self.n_bands}")
        try:
            x, y, area, taps = self._geometry(batch, psf_fwhm_arcsec, pixel_scale_arcsec)
        except ValueError as exc:  # a PSF of the wrong shape for this batch, a bad pixel scale
            raise ValueError(f"BatchRenderer: {exc}") from None
        packed, layout = self._pack(params)
        images = torch.empty(batch, self.n_bands, self.n_pix, self.n_pix, dtype=self.dtype, device=self.device)
        chunk = min(self.chunk, 1 << (batch - 1).bit_length()) if self.chunk else batch  # no chunk above the batch
        for start in range(0, batch, chunk):
            piece = packed[start:start + chunk]
            piece_taps = None if taps is None else taps[start:start + chunk]
            short = chunk - piece.shape[0]
            if short and self.compiled:  # pad with copies of the last scene: static shapes, one compilation
                padded = torch.empty(chunk, *images.shape[1:], dtype=self.dtype, device=self.device)
                if piece_taps is not None:
                    piece_taps = torch.cat([piece_taps, piece_taps[-1:].expand(short, -1, -1)])
                self._fn(padded, torch.cat([piece, piece[-1:].expand(short, -1)]), layout, x, y, self.supersampling,
                         area, piece_taps, self.fast_math, self.compiled)
                images[start:] = padded[: chunk - short]
            else:
                self._fn(images[start:start + chunk], piece, layout, x, y, self.supersampling, area, piece_taps,
                         self.fast_math, self.compiled)
        return images
