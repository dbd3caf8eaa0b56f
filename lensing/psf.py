"""Point-spread functions: Gaussian and pixelized kernels, batched convolution (direct or FFT), PSF matching.

Convolution of a batch [B, C, H, W] with per-sample, per-band kernels:
- Gaussian PSF: separable sampled kernel, radius int(truncation·σ_px + 0.5), normalized, edges
  continued with the nearest pixel -- exactly scipy.ndimage.gaussian_filter(mode="nearest"), which is what
  lenstronomy's ImageModel uses for psf_type="GAUSSIAN" (truncation 5).
- Pixel PSF: a normalized odd-sized kernel, zero padding, output the size of the input -- exactly
  scipy.signal.fftconvolve(mode="same"), lenstronomy's psf_type="PIXEL" path.
Small kernels are applied directly (grouped conv2d), large ones through the FFT; both give the same result.

PSF matching (Fourier ratio): the kernel K with K̂ = T̂ Ŝ* / (|Ŝ|² + λ max|Ŝ|²) turns a source PSF S into the
target T (regularized Wiener deconvolution, e.g. Boucaud et al. 2016 "Convolution kernels for multi-
wavelength imaging"). For two Gaussians it is the Gaussian of σ_K = √(σ_T² − σ_S²) in closed form. A
target narrower than the source would need sharpening (noise amplification): refused.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

FWHM_TO_SIGMA = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
DIRECT_MAX_KERNEL_1D = 63  # separable Gaussian: direct up to this width
DIRECT_MAX_KERNEL_2D = 15  # 2-D kernels: direct up to this width, FFT beyond


class PSFMatchingError(ValueError):
    """The requested PSF matching would sharpen the image (target narrower than the source PSF)."""


@dataclass
class GaussianPSF:
    """Gaussian PSF of FWHM ``fwhm_arcsec``: a float, [C] (per band) or [B, C] tensor (per sample and band).

    ``truncation``: kernel radius in σ (lenstronomy's PSF default is 5).
    """

    fwhm_arcsec: torch.Tensor | float
    truncation: float = 5.0


@dataclass
class PixelPSF:
    """Pixelized PSF kernel [k, k], [C, k, k] or [B, C, k, k] (odd k, centred); normalized to unit sum."""

    kernel: torch.Tensor


def per_sample_band(value, batch: int, bands: int, dtype, device) -> torch.Tensor:
    t = torch.as_tensor(value, dtype=dtype, device=device)
    if t.ndim == 0:
        t = t.expand(batch, bands)
    elif t.ndim == 1:
        if t.numel() == bands:
            t = t[None, :].expand(batch, bands)
        elif t.numel() == batch:
            t = t[:, None].expand(batch, bands)
        else:
            raise ValueError(f"PSF parameter of length {t.numel()} fits neither {bands} bands nor batch {batch}")
    elif t.shape != (batch, bands):
        raise ValueError(f"PSF parameter must be [B, C] = [{batch}, {bands}], got {list(t.shape)}")
    return t


def gaussian_kernel_1d(sigma_px: torch.Tensor, truncation: float = 5.0) -> torch.Tensor:
    """Sampled, normalized 1-D Gaussians [N, 2R + 1] for σ (pixels) of shape [N].

    Each row has its own radius r = int(truncation·σ + 0.5) (scipy.ndimage's rule); R is the largest, and
    taps beyond a row's own r are zero, so every row equals scipy's kernel for its σ.
    """
    sigma_px = sigma_px.reshape(-1)
    if not torch.compiler.is_compiling() and (bool((sigma_px <= 0).any()) or not bool(torch.isfinite(sigma_px).all())):
        raise ValueError(f"PSF σ must be positive and finite, got {sigma_px.detach().cpu().tolist()[:8]}")
    radii = torch.floor(truncation * sigma_px.detach() + 0.5).to(torch.int64).clamp(min=1)
    big_r = int(radii.max())
    taps = torch.arange(-big_r, big_r + 1, dtype=sigma_px.dtype, device=sigma_px.device)
    weights = torch.exp(-0.5 * (taps[None, :] / sigma_px[:, None]) ** 2)
    weights = weights * (taps[None, :].abs() <= radii[:, None].to(sigma_px.dtype))
    return weights / weights.sum(dim=1, keepdim=True)


def gaussian_kernel_2d(fwhm_arcsec, pixel_scale_arcsec: float, truncation: float = 5.0,
                       dtype=torch.float64) -> torch.Tensor:
    """One 2-D Gaussian kernel [k, k] (outer product of the 1-D kernel), for PSF matching and tests."""
    sigma_px = torch.as_tensor([float(fwhm_arcsec) * FWHM_TO_SIGMA / float(pixel_scale_arcsec)], dtype=dtype)
    k1 = gaussian_kernel_1d(sigma_px, truncation)[0]
    return k1[:, None] * k1[None, :]


def _fft_convolve_same(images: torch.Tensor, kernels: torch.Tensor, pad_mode: str) -> torch.Tensor:
    """images [N, H, W], kernels [N, k, k] (true convolution, odd k) → [N, H, W] via rfft2.

    ``pad_mode`` "constant" (zeros) or "replicate" (nearest)."""
    n, h, w = images.shape
    k = kernels.shape[-1]
    r = k // 2
    padded = F.pad(images[:, None], (r, r, r, r), mode=pad_mode)[:, 0]
    ph, pw = h + 2 * r, w + 2 * r
    fh, fw = ph + k - 1, pw + k - 1  # linear (not circular) convolution
    spectrum = torch.fft.rfft2(padded, s=(fh, fw)) * torch.fft.rfft2(kernels, s=(fh, fw))
    full = torch.fft.irfft2(spectrum, s=(fh, fw))
    return full[:, 2 * r: 2 * r + h, 2 * r: 2 * r + w]


def _direct_convolve_same(images: torch.Tensor, kernels: torch.Tensor, pad_mode: str) -> torch.Tensor:
    """Grouped conv2d with flipped kernels (conv2d is a correlation). images [N, H, W], kernels [N, kh, kw]."""
    n = images.shape[0]
    kh, kw = kernels.shape[-2:]
    padded = F.pad(images[None], (kw // 2, kw // 2, kh // 2, kh // 2), mode=pad_mode)
    weight = torch.flip(kernels, dims=(-2, -1))[:, None]
    return F.conv2d(padded, weight, groups=n)[0]


def band_matrix(k1: torch.Tensor, n: int) -> torch.Tensor:
    """[M, 2R+1] 1-D kernels → [M, n, n] matrices A with (x @ A)[j] = Σ_t k[t]·x[clamp(j − t + R)]:
    a 1-D convolution whose edges repeat the nearest pixel, as one matrix product (BLAS-fast for the
    small images of lens finding; differentiable in the kernel)."""
    m, width = k1.shape
    radius = width // 2
    dst = torch.arange(n, device=k1.device)
    taps = torch.arange(width, device=k1.device)
    src = (dst[None, :] - (taps[:, None] - radius)).clamp(0, n - 1)
    index = (src * n + dst[None, :]).reshape(1, -1).expand(m, -1)
    values = k1[:, :, None].expand(m, width, n).reshape(m, -1)
    return torch.zeros(m, n * n, dtype=k1.dtype, device=k1.device).scatter_add(1, index, values).reshape(m, n, n)


def _separable_replicate(flat: torch.Tensor, k1: torch.Tensor) -> torch.Tensor:
    """Separable convolution of [N, H, W] with per-image 1-D kernels [N, 2R+1] (one shared when all equal)."""
    n, h, w = flat.shape
    shared = bool((k1 == k1[:1]).all()) and not k1.requires_grad
    kernels = k1[:1] if shared else k1
    along_w = band_matrix(kernels, w)
    along_h = along_w if h == w else band_matrix(kernels, h)
    if shared:
        return along_h[0].T @ (flat @ along_w[0])
    return torch.bmm(along_h.transpose(1, 2), torch.bmm(flat, along_w))


def convolve(images: torch.Tensor, psf, pixel_scale_arcsec, method: str = "auto") -> torch.Tensor:
    """Convolve images [B, C, H, W] with ``psf`` (GaussianPSF, PixelPSF or None = no PSF).

    ``pixel_scale_arcsec``: float or [B] tensor (converts a Gaussian FWHM to pixels).
    ``method``: "auto" (direct for small kernels, FFT for large), "direct" or "fft".
    """
    if psf is None:
        return images
    if method not in ("auto", "direct", "fft"):
        raise ValueError(f"convolution method must be auto, direct or fft, got {method!r}")
    b, c, h, w = images.shape
    flat = images.reshape(b * c, h, w)
    if isinstance(psf, GaussianPSF):
        fwhm = per_sample_band(psf.fwhm_arcsec, b, c, images.dtype, images.device)
        scale = torch.as_tensor(pixel_scale_arcsec, dtype=images.dtype, device=images.device).reshape(-1)
        scale = scale[:, None].expand(b, c) if scale.numel() == b else scale.reshape(1, 1).expand(b, c)
        k1 = gaussian_kernel_1d((fwhm * FWHM_TO_SIGMA / scale).reshape(-1), psf.truncation)
        width = k1.shape[-1]
        if method == "fft" or (method == "auto" and width > DIRECT_MAX_KERNEL_1D):
            k2 = k1[:, :, None] * k1[:, None, :]
            out = _fft_convolve_same(flat, k2, "replicate")
        else:  # separable: rows then columns, nearest-pixel edges (scipy mode="nearest")
            out = _separable_replicate(flat, k1)
        return out.reshape(b, c, h, w)
    if isinstance(psf, PixelPSF):
        kernel = torch.as_tensor(psf.kernel, dtype=images.dtype, device=images.device)
        if kernel.shape[-1] % 2 == 0 or kernel.shape[-1] != kernel.shape[-2]:
            raise ValueError(f"pixel PSF kernel must be square with odd size, got {list(kernel.shape)}")
        if kernel.ndim == 2:
            kernel = kernel.expand(b, c, *kernel.shape)
        elif kernel.ndim == 3:
            if kernel.shape[0] != c:
                raise ValueError(f"pixel PSF has {kernel.shape[0]} bands, images have {c}")
            kernel = kernel[None].expand(b, *kernel.shape)
        elif kernel.shape[:2] != (b, c):
            raise ValueError(f"pixel PSF [B, C, k, k] must match images {[b, c]}, got {list(kernel.shape)}")
        kernel = kernel / kernel.sum(dim=(-2, -1), keepdim=True)
        kernel = kernel.reshape(b * c, *kernel.shape[-2:])
        k = kernel.shape[-1]
        if method == "fft" or (method == "auto" and k > DIRECT_MAX_KERNEL_2D):
            out = _fft_convolve_same(flat, kernel, "constant")
        else:
            out = _direct_convolve_same(flat, kernel, "constant")
        return out.reshape(b, c, h, w)
    raise TypeError(f"psf must be GaussianPSF, PixelPSF or None, got {type(psf).__name__}")


# ------------------------------------------------------------------------------------------ PSF matching
def kernel_second_moment_fwhm(kernel: np.ndarray, pixel_scale_arcsec: float) -> float:
    """FWHM (arcsec) of the Gaussian with the kernel's second moment: 2√(2 ln 2)·√((Ixx + Iyy)/2)."""
    kernel = np.asarray(kernel, dtype=np.float64)
    kernel = kernel / kernel.sum()
    k = kernel.shape[0]
    coords = np.arange(k) - (k - 1) / 2
    yy, xx = np.meshgrid(coords, coords, indexing="ij")
    cx, cy = (kernel * xx).sum(), (kernel * yy).sum()
    var = 0.5 * ((kernel * (xx - cx) ** 2).sum() + (kernel * (yy - cy) ** 2).sum())
    return float(math.sqrt(max(var, 0.0)) / FWHM_TO_SIGMA * pixel_scale_arcsec)


def gaussian_matching_sigma_arcsec(source_fwhm_arcsec: float, target_fwhm_arcsec: float) -> float:
    """σ of the Gaussian that turns a Gaussian PSF of FWHM ``source`` into ``target``: √(σ_T² − σ_S²).

    Equal FWHMs give 0 (nothing to do). A narrower target raises :class:`PSFMatchingError`.
    """
    source, target = float(source_fwhm_arcsec), float(target_fwhm_arcsec)
    if not (source > 0 and target > 0):
        raise ValueError(f"PSF FWHMs must be positive, got source {source}, target {target}")
    if target < source * (1 - 1e-9):
        raise PSFMatchingError(f"target PSF FWHM {target:.4g}\" is narrower than the source PSF {source:.4g}\": "
                               "matching would sharpen the image (deconvolution amplifies noise); refused")
    return math.sqrt(max(target**2 - source**2, 0.0)) * FWHM_TO_SIGMA


def fourier_matching_kernel(source_kernel: np.ndarray, target_kernel: np.ndarray, regularization: float = 1e-4,
                            size: int | None = None) -> np.ndarray:
    """Matching kernel K with S ⊛ K ≈ T from K̂ = T̂ Ŝ* / (|Ŝ|² + λ·max|Ŝ|²).

    Both kernels share one pixel scale, are odd-sized and centred; they are zero-padded to a common size
    (``size`` or the larger one). The result is real, centred and normalized to unit sum. A target whose
    second-moment width is below the source's is refused (:class:`PSFMatchingError`).
    """
    s = np.asarray(source_kernel, dtype=np.float64)
    t = np.asarray(target_kernel, dtype=np.float64)
    for name, k in (("source", s), ("target", t)):
        if k.ndim != 2 or k.shape[0] != k.shape[1] or k.shape[0] % 2 == 0:
            raise ValueError(f"{name} PSF kernel must be square with odd size, got {k.shape}")
        if not np.isfinite(k).all() or k.sum() <= 0:
            raise ValueError(f"{name} PSF kernel must be finite with a positive sum")
    s, t = s / s.sum(), t / t.sum()
    if kernel_second_moment_fwhm(t, 1.0) < kernel_second_moment_fwhm(s, 1.0) * (1 - 1e-6):
        raise PSFMatchingError("target PSF is narrower than the source PSF (second moments): matching would "
                               "sharpen the image; refused")
    n = int(size or max(s.shape[0], t.shape[0]))
    if n % 2 == 0:
        n += 1

    def embed(k):
        out = np.zeros((n, n))
        off = (n - k.shape[0]) // 2
        if off < 0:
            raise ValueError(f"size {n} is smaller than a kernel of {k.shape[0]} pixels")
        out[off:off + k.shape[0], off:off + k.shape[0]] = k
        return np.fft.ifftshift(out)  # centre at [0, 0] so the transforms carry no phase ramp

    s_hat, t_hat = np.fft.fft2(embed(s)), np.fft.fft2(embed(t))
    power = np.abs(s_hat) ** 2
    k_hat = t_hat * np.conj(s_hat) / (power + regularization * power.max())
    kernel = np.fft.fftshift(np.real(np.fft.ifft2(k_hat)))
    return kernel / kernel.sum()


def match_psf(image: np.ndarray, variance: np.ndarray | None, pixel_scale_arcsec: float,
              source_fwhm_arcsec: float | None = None, target_fwhm_arcsec: float | None = None,
              source_kernel: np.ndarray | None = None, target_kernel: np.ndarray | None = None,
              regularization: float = 1e-4) -> tuple[np.ndarray, np.ndarray | None, dict]:
    """Degrade ``image`` [C, H, W] (one PSF for all bands, or per-band FWHM lists) to the target PSF.

    Gaussian → Gaussian uses the closed form; otherwise the Fourier ratio (pixel kernels; a Gaussian side
    is rendered as a kernel). The variance map of independent pixel noise becomes var ⊛ K² (Var Σ kᵢxᵢ =
    Σ kᵢ² Var xᵢ). Returns (image, variance, info).
    """
    image = np.asarray(image, dtype=np.float64)
    if image.ndim == 2:
        image = image[None]
    n_bands = image.shape[0]
    src = np.broadcast_to(np.asarray(source_fwhm_arcsec if source_fwhm_arcsec is not None else np.nan,
                                     dtype=np.float64), (n_bands,))
    if source_kernel is None and target_kernel is None:
        if source_fwhm_arcsec is None or target_fwhm_arcsec is None:
            raise ValueError("PSF matching needs source and target FWHMs (or kernels)")
        kernels = []
        for band in range(n_bands):
            sigma = gaussian_matching_sigma_arcsec(src[band], target_fwhm_arcsec)
            if sigma <= 0:
                kernels.append(np.ones((1, 1)))
                continue
            fwhm_k = sigma / FWHM_TO_SIGMA
            kernels.append(gaussian_kernel_2d(fwhm_k, pixel_scale_arcsec).numpy())
        method = "gaussian_closed_form"
    else:
        if source_kernel is None:
            source_kernel = gaussian_kernel_2d(src[0], pixel_scale_arcsec).numpy()
        if target_kernel is None:
            if target_fwhm_arcsec is None:
                raise ValueError("PSF matching needs a target FWHM or a target kernel")
            target_kernel = gaussian_kernel_2d(target_fwhm_arcsec, pixel_scale_arcsec).numpy()
        size = max(np.shape(source_kernel)[0], np.shape(target_kernel)[0])
        kernels = [fourier_matching_kernel(source_kernel, target_kernel, regularization, size)] * n_bands
        method = "fourier_ratio"
    out = np.empty_like(image)
    var_out = None if variance is None else np.empty_like(np.asarray(variance, dtype=np.float64).reshape(image.shape))
    for band, kernel in enumerate(kernels):
        k = torch.as_tensor(kernel, dtype=torch.float64)
        if k.shape[-1] == 1:
            out[band] = image[band]
            if var_out is not None:
                var_out[band] = np.asarray(variance).reshape(image.shape)[band]
            continue
        psf = PixelPSF(k)
        out[band] = convolve(torch.as_tensor(image[band][None, None]), psf, pixel_scale_arcsec)[0, 0].numpy()
        if var_out is not None:
            var_band = np.asarray(variance, dtype=np.float64).reshape(image.shape)[band]
            k2 = PixelPSF(k**2 / (k**2).sum())
            var_out[band] = convolve(torch.as_tensor(var_band[None, None]), k2, pixel_scale_arcsec)[0, 0].numpy() \
                * float((k**2).sum())
    return out, var_out, {"method": method, "target_fwhm_arcsec": target_fwhm_arcsec}
