"""Per-image truth used to stratify the Bologna metrics (Metcalf et al. 2019, section 5).

- ``einstein_radius_arcsec``: the SIE θ_E (product-average Einstein radius);
- ``einstein_area_arcsec2``: area where det A < 0 (inside the tangential critical curve of SIE + shear),
  measured on a fine grid around the lens: π θ_E² for an SIE without shear;
- ``lensed_source_flux``: flux of the PSF-convolved lensed source inside the cutout (counts/s, all bands);
- ``lensed_pixels_above_1sigma``: pixels where the noiseless lensed source exceeds 1σ of the background
  noise in at least one band;
- ``flux_contrast``: lensed-source flux / total flux (lens light + source + neighbours) in the cutout;
- ``n_images``: number of images of the source centre, counted by mapping the triangles of a fine image-
  plane grid to the source plane (Schneider, Ehlers & Falco 1992 §6; the usual triangle-mapping solver).
  Triangles touching the singular centre of the isothermal lens (|θ − c| < max(5 % θ_E, 3 grid steps))
  are skipped: their images in the source plane wrap around the whole cut; the SIE has no central image.
Non-lenses (no source) get zeros.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch

from lensing.simulator import deflection

DEFAULT_TRUTH_GRID = 160  # points per axis of the fine lens-plane grid


def _lens_plane_grid(params: Mapping, half_width: torch.Tensor, n: int):
    """Per-lens square grids [B, n, n] centred on the lens, half-width ``half_width`` [B] (arcsec)."""
    lens = params["lens"]
    steps = torch.linspace(-1.0, 1.0, n, dtype=half_width.dtype, device=half_width.device)
    hw = half_width.reshape(-1, 1, 1)
    x = lens["center_x"].reshape(-1, 1, 1) + steps[None, None, :] * hw
    y = lens["center_y"].reshape(-1, 1, 1) + steps[None, :, None] * hw
    return x.expand(-1, n, n), y.expand(-1, n, n), 2 * half_width / (n - 1)


@torch.no_grad()
def einstein_area(params: Mapping, n: int = DEFAULT_TRUTH_GRID) -> torch.Tensor:
    """Area (arcsec²) of the region with det A < 0, A = ∂β/∂θ by central differences on a fine grid."""
    theta_e = params["lens"]["theta_E"]
    x, y, step = _lens_plane_grid(params, 2.5 * theta_e.clamp(min=1e-3), n)
    ax, ay = deflection(x, y, params)
    bx, by = x - ax, y - ay
    h = step.reshape(-1, 1, 1)
    dbx_dx = (bx[:, 1:-1, 2:] - bx[:, 1:-1, :-2]) / (2 * h)
    dbx_dy = (bx[:, 2:, 1:-1] - bx[:, :-2, 1:-1]) / (2 * h)
    dby_dx = (by[:, 1:-1, 2:] - by[:, 1:-1, :-2]) / (2 * h)
    dby_dy = (by[:, 2:, 1:-1] - by[:, :-2, 1:-1]) / (2 * h)
    det = dbx_dx * dby_dy - dbx_dy * dby_dx
    area = (det < 0).sum(dim=(1, 2)).to(theta_e.dtype) * step**2
    return torch.where(theta_e > 0, area, torch.zeros_like(area))


def _cross(ax, ay, bx, by):
    return ax * by - ay * bx


@torch.no_grad()
def count_images(params: Mapping, n: int = DEFAULT_TRUTH_GRID) -> torch.Tensor:
    """Number of images of the source centre (``params['source']`` centre) by triangle mapping."""
    lens, source = params["lens"], params["source"]
    theta_e = lens["theta_E"]
    offset = torch.hypot(source["center_x"] - lens["center_x"], source["center_y"] - lens["center_y"])
    half = 2.0 * theta_e.clamp(min=1e-3) + 1.5 * offset
    x, y, step = _lens_plane_grid(params, half, n)
    ax, ay = deflection(x, y, params)
    bx = x - ax - source["center_x"].reshape(-1, 1, 1)
    by = y - ay - source["center_y"].reshape(-1, 1, 1)
    r = torch.hypot(x - lens["center_x"].reshape(-1, 1, 1), y - lens["center_y"].reshape(-1, 1, 1))
    near_centre = r < torch.maximum(0.05 * theta_e, 3 * step).reshape(-1, 1, 1)
    # two triangles per cell: (00, 10, 11) and (00, 11, 01); vertices (x index, y index)
    p00 = (bx[:, :-1, :-1], by[:, :-1, :-1])
    p10 = (bx[:, :-1, 1:], by[:, :-1, 1:])
    p11 = (bx[:, 1:, 1:], by[:, 1:, 1:])
    p01 = (bx[:, 1:, :-1], by[:, 1:, :-1])
    skip = near_centre[:, :-1, :-1] | near_centre[:, :-1, 1:] | near_centre[:, 1:, 1:] | near_centre[:, 1:, :-1]
    total = torch.zeros(theta_e.shape[0], dtype=torch.int64, device=theta_e.device)
    for a, b, c in ((p00, p10, p11), (p00, p11, p01)):
        # the origin (source centre) lies inside triangle abc when the three edge cross products share a
        # sign (either orientation: saddle-point images map to mirrored triangles)
        d1 = _cross(b[0] - a[0], b[1] - a[1], -a[0], -a[1])
        d2 = _cross(c[0] - b[0], c[1] - b[1], -b[0], -b[1])
        d3 = _cross(a[0] - c[0], a[1] - c[1], -c[0], -c[1])
        inside = ((d1 > 0) & (d2 > 0) & (d3 > 0)) | ((d1 < 0) & (d2 < 0) & (d3 < 0))
        total += (inside & ~skip).sum(dim=(1, 2))
    return torch.where(theta_e > 0, total, torch.zeros_like(total))


@torch.no_grad()
def image_truth(components: Mapping, background_rms: torch.Tensor, pixel_scale_arcsec) -> dict:
    """Flux-based truth from :func:`lensing.simulator.render` components (noiseless, PSF-convolved).

    ``background_rms``: [B, C] (counts/s per pixel).
    """
    total = components["total"]
    source = components.get("source")
    b = total.shape[0]
    total_flux = total.sum(dim=(1, 2, 3))
    if source is None:
        zeros = torch.zeros(b, dtype=total.dtype, device=total.device)
        return {"lensed_source_flux": zeros, "lensed_pixels_above_1sigma": zeros.long(), "flux_contrast": zeros}
    sigma = torch.as_tensor(background_rms, dtype=total.dtype, device=total.device).reshape(b, -1, 1, 1)
    source_flux = source.sum(dim=(1, 2, 3))
    above = (source > sigma).any(dim=1).sum(dim=(1, 2))
    contrast = source_flux / total_flux.clamp(min=torch.finfo(total.dtype).tiny)
    return {"lensed_source_flux": source_flux, "lensed_pixels_above_1sigma": above, "flux_contrast": contrast}


@torch.no_grad()
def lens_truth(params: Mapping, components: Mapping, background_rms, pixel_scale_arcsec,
               is_lens: torch.Tensor | None = None, n_grid: int = DEFAULT_TRUTH_GRID) -> dict:
    """All truth columns for a batch; rows with ``is_lens`` False (or without a source) are zero."""
    b = components["total"].shape[0]
    out = image_truth(components, background_rms, pixel_scale_arcsec)
    device, dtype = components["total"].device, components["total"].dtype
    mask = torch.ones(b, dtype=torch.bool, device=device) if is_lens is None else is_lens.to(device).bool()
    if params.get("lens") is not None and params.get("source") is not None:
        theta_e = params["lens"]["theta_E"]
        out["einstein_radius_arcsec"] = theta_e.to(dtype)
        out["einstein_area_arcsec2"] = einstein_area(params, n_grid).to(dtype)
        out["n_images"] = count_images(params, n_grid)
    else:
        out["einstein_radius_arcsec"] = torch.zeros(b, dtype=dtype, device=device)
        out["einstein_area_arcsec2"] = torch.zeros(b, dtype=dtype, device=device)
        out["n_images"] = torch.zeros(b, dtype=torch.int64, device=device)
    return {k: torch.where(mask, v, torch.zeros_like(v)) for k, v in out.items()}
