"""Gamma index (Low et al., Med Phys 1998) vectorized in torch (CPU or CUDA), and the pymedphys reference.

γ(r) = min over displacements o of √( (D_e(r + o) − D_r(r))² / ΔD² + |o|² / Δd² ), evaluated for every
reference voxel with D_r ≥ cutoff. ΔD is ``dose_percent`` % of the global normalisation (the reference
maximum unless given) or, for local gamma, of D_r(r). The evaluated dose between voxels is trilinear,
as in pymedphys.

The search follows Wendling et al. (Med Phys 2007), as pymedphys does: displacements on a lattice of
step Δd / ``interp_fraction`` inside a sphere of radius ``max_gamma``·Δd, visited in shells of
increasing distance; a point stops once the next shell's distance term alone exceeds its current γ.
Unlike pymedphys the work is batched: all displacements of a shell are evaluated for all still-active
points at once by gathering the eight trilinear corners from the flattened, padded evaluated grid
(padding holds a huge dose, so displacements leaving the grid never win, like pymedphys' ∞ fill).

Returns γ per voxel (NaN where not evaluated), capped at ``max_gamma``. Pass rate = % of evaluated
voxels with γ ≤ 1.

Threads: on a CPU the search runs with ``cpu_threads`` intra-op threads (default 1, restored afterwards).
It issues a few hundred short batched operations; with more threads each one ends in a barrier, and on
cores shared with other jobs a descheduled thread stalls every barrier: measured on a 128³ OpenKBP dose
at load average ~5 on 2 cores, 3%/3 mm took 2.97 s wall with 2 threads and 0.63 s with 1 (vmat/README.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from common.runtime import cpu_threads as runtime_cpu_threads

_BIG = 1e6  # dose (in units of the normalisation) used outside the evaluated grid


def _offsets(spacing_mm: Sequence[float], radius_mm: float, step_mm: float):
    """Lattice displacements (mm) within the sphere, sorted by length, and their lengths."""
    n = int(math.ceil(radius_mm / step_mm))
    axis = np.arange(-n, n + 1) * step_mm
    oz, oy, ox = np.meshgrid(axis, axis, axis, indexing="ij")
    offsets = np.stack([oz.ravel(), oy.ravel(), ox.ravel()], axis=1)
    length = np.linalg.norm(offsets, axis=1)
    keep = length <= radius_mm + 1e-9
    offsets, length = offsets[keep], length[keep]
    order = np.argsort(length, kind="stable")
    return offsets[order], length[order]


def _shell_blocks(offsets_mm: np.ndarray, lengths: np.ndarray, spacing_mm: Sequence[float], strides: Sequence[int],
                  step_mm: float, distance_mm: float):
    """Group displacements into shells (length bins of one lattice step) and, within a shell, by the
    voxel cell they fall in. Inside one cell the trilinear value is Σ_c w_c(o)·V_c over the cell's eight
    corner values V_c, so a whole group is one (points × 8) @ (8 × k) product: eight gathers per point
    and cell instead of eight per point and displacement.

    Returns per shell: (min normalized distance², cell flat shifts (g,), weights (g, 8, kmax),
    normalized distance² (g, kmax) padded with +inf).
    """
    frac_vox = offsets_mm / np.asarray(spacing_mm, dtype=np.float64)
    cell = np.floor(frac_vox + 1e-9)
    w = frac_vox - cell
    w[w < 1e-9] = 0.0
    corner_w = []
    for cz in (0, 1):
        for cy in (0, 1):
            for cx in (0, 1):
                corner_w.append((w[:, 0] if cz else 1 - w[:, 0]) * (w[:, 1] if cy else 1 - w[:, 1])
                                * (w[:, 2] if cx else 1 - w[:, 2]))
    corner_w = np.stack(corner_w, 1)  # (K, 8)
    cell_shift = (cell @ np.asarray(strides, dtype=np.float64)).astype(np.int64)
    d2 = (lengths / distance_mm) ** 2
    shell_id = np.floor(lengths / step_mm + 1e-9).astype(np.int64)
    blocks = []
    for sid in np.unique(shell_id):
        in_shell = np.flatnonzero(shell_id == sid)
        cells, inverse = np.unique(cell_shift[in_shell], return_inverse=True)
        counts = np.bincount(inverse)
        kmax = int(counts.max())
        order = np.argsort(inverse, kind="stable")
        slot = np.arange(in_shell.size) - np.repeat(np.cumsum(counts) - counts, counts)
        weights = np.zeros((len(cells), kmax, 8))
        dist2 = np.full((len(cells), kmax), np.inf)
        weights[inverse[order], slot] = corner_w[in_shell[order]]
        dist2[inverse[order], slot] = d2[in_shell[order]]
        blocks.append((float(d2[in_shell].min()), cells, np.ascontiguousarray(weights.transpose(0, 2, 1)), dist2))
    return blocks


def _hood_offsets(reach: Sequence[int], strides: np.ndarray, device) -> torch.Tensor:
    """Flat index shifts of the (2r+1)³ voxel neighbourhood, in C order."""
    hz, hy, hx = np.meshgrid(*[np.arange(-r, r + 1) for r in reach], indexing="ij")
    return torch.as_tensor((hz * strides[0] + hy * strides[1] + hx * strides[2]).ravel(), device=device)


def _neighbourhood_blocks(offsets, lengths, spacing_mm, reach, step, distance_mm, device):
    """Shell blocks whose cell indices address columns of a (2r+1)³ neighbourhood array."""
    hood_shape = [2 * r + 1 for r in reach]
    hood_strides = (hood_shape[1] * hood_shape[2], hood_shape[2], 1)
    centre = int(np.asarray(reach) @ np.asarray(hood_strides))
    corner_shift = np.array([cz * hood_strides[0] + cy * hood_strides[1] + cx
                             for cz in (0, 1) for cy in (0, 1) for cx in (0, 1)])
    out = []
    for min_d2, cells, weights, dist2 in _shell_blocks(offsets, lengths, spacing_mm, hood_strides, step, distance_mm):
        cols = torch.as_tensor((centre + cells[:, None] + corner_shift[None]).ravel(), device=device)
        out.append((min_d2, cols, torch.as_tensor(weights, dtype=torch.float32, device=device),
                    torch.as_tensor(dist2, dtype=torch.float32, device=device)[:, None, :]))
    return out


def gamma_index(dose_ref: np.ndarray, dose_eval: np.ndarray, spacing_mm: Sequence[float], dose_percent: float = 3.0,
                distance_mm: float = 3.0, lower_percent_cutoff: float = 10.0, local: bool = False,
                global_normalisation: float | None = None, max_gamma: float = 2.0, interp_fraction: int = 10,
                random_subset: int | None = None, seed: int = 0, mask: np.ndarray | None = None,
                device: str | torch.device = "cpu", max_elements: int = 2**22, cpu_threads: int | None = 1) -> np.ndarray:
    """Gamma of ``dose_eval`` against ``dose_ref`` (same (z, y, x) grid, spacing in mm per axis).

    Args:
        lower_percent_cutoff: reference voxels below this % of the normalisation are not evaluated.
        max_gamma: search radius = max_gamma·distance_mm; larger γ are reported as max_gamma.
        interp_fraction: lattice step = distance_mm / interp_fraction (pymedphys' meaning).
        random_subset: evaluate only this many randomly chosen voxels above the cutoff (seeded).
        mask: evaluate only inside this mask (in addition to the cutoff).
        max_elements: bound on the (points × cells × displacements) block of one batch (memory).
        cpu_threads: torch intra-op threads for the search on a CPU (None: the process setting); see the
            module docstring.
    """
    with runtime_cpu_threads(cpu_threads, device):
        return _gamma_index(dose_ref, dose_eval, spacing_mm, dose_percent, distance_mm, lower_percent_cutoff, local,
                            global_normalisation, max_gamma, interp_fraction, random_subset, seed, mask, device,
                            max_elements)


def _gamma_index(dose_ref, dose_eval, spacing_mm, dose_percent, distance_mm, lower_percent_cutoff, local,
                 global_normalisation, max_gamma, interp_fraction, random_subset, seed, mask, device,
                 max_elements) -> np.ndarray:
    ref = np.asarray(dose_ref, dtype=np.float64)
    ev = np.asarray(dose_eval, dtype=np.float64)
    if ref.shape != ev.shape or ref.ndim != 3:
        raise ValueError(f"gamma needs two 3D doses on one grid, got {ref.shape} and {ev.shape}")
    if max_gamma is None or not np.isfinite(max_gamma) or max_gamma <= 0:
        raise ValueError("max_gamma must be a finite positive number (it sets the search radius)")
    norm = float(global_normalisation if global_normalisation is not None else ref.max())
    out = np.full(ref.shape, np.nan, dtype=np.float32)
    if norm <= 0:
        return out
    selected = ref >= lower_percent_cutoff / 100.0 * norm
    if mask is not None:
        selected &= np.asarray(mask, bool)
    points = np.flatnonzero(selected)
    if random_subset is not None and random_subset < points.size:
        points = np.sort(np.random.default_rng(seed).choice(points, size=int(random_subset), replace=False))
    if points.size == 0:
        return out

    device = torch.device(device)
    radius = float(max_gamma) * distance_mm
    step = distance_mm / float(interp_fraction)
    offsets, lengths = _offsets(spacing_mm, radius, step)
    zyx = np.stack(np.unravel_index(points, ref.shape), 1)
    reach = [int(math.ceil(radius / s)) + 1 for s in spacing_mm]
    pad = [r + 1 for r in reach]
    padded = np.pad(ev / norm, [(p, p) for p in pad], mode="constant", constant_values=_BIG)
    strides = np.array([padded.shape[1] * padded.shape[2], padded.shape[2], 1])
    base = torch.as_tensor((zyx + np.asarray(pad)) @ strides, device=device)
    eval_flat = torch.as_tensor(padded.ravel(), dtype=torch.float32, device=device)
    ref_pts = torch.as_tensor(ref.ravel()[points] / norm, dtype=torch.float32, device=device)
    tol = (ref_pts if local else torch.ones_like(ref_pts)) * (dose_percent / 100.0)
    gamma2 = torch.full((points.size,), float("inf"), device=device)
    inner_reach = [1, 1, 1]  # displacements shorter than every voxel size stay in the 2×2×2 cells around a point
    # The margin keeps lattice points that equal a voxel size up to rounding (9 × 0.3 mm vs 2.7 mm), whose
    # cell index rounds up to +1, out of the inner neighbourhood.
    inner_limit = min(spacing_mm) * (1.0 - 1e-6)
    phases = [(inner_reach, lengths < inner_limit), (reach, lengths >= inner_limit)]
    candidates = torch.arange(points.size, device=device)
    for hood_reach, selection in phases:
        if not selection.any() or candidates.numel() == 0:
            continue
        blocks = _neighbourhood_blocks(offsets[selection], lengths[selection], spacing_mm, hood_reach, step,
                                       distance_mm, device)
        hood = _hood_offsets(hood_reach, strides, device)
        outer = max(1, max_elements // hood.numel())
        for p0 in range(0, candidates.numel(), outer):
            members = candidates[p0:p0 + outer]
            # (V − D_r)/ΔD over the neighbourhood of each point, gathered once. Since Σ_c w_c = 1, the
            # normalized difference of an interpolated value is the same weighted sum of these.
            hood_values = (eval_flat[base[members, None] + hood[None]] - ref_pts[members, None]) / tol[members, None]
            g2 = gamma2[members]
            for min_d2, cols, weights_t, dist2_t in blocks:
                active = torch.nonzero(g2 > min_d2).squeeze(1)  # points whose γ can still improve here
                if active.numel() == 0:
                    break
                n_cells, _, k = weights_t.shape
                chunk = max(1, max_elements // (n_cells * max(k, 8)))
                for c0 in range(0, active.numel(), chunk):
                    idx = active[c0:c0 + chunk]
                    if idx.numel() == hood_values.shape[0]:
                        corners = hood_values[:, cols]
                    else:  # one gather of the needed columns (not a copy of every active row first)
                        corners = hood_values[idx[:, None], cols[None, :]]
                    corners = corners.view(-1, n_cells, 8).transpose(0, 1)  # (g, m, 8)
                    cand = torch.bmm(corners, weights_t).square_().add_(dist2_t)  # (g, m, k)
                    g2[idx] = torch.minimum(g2[idx], cand.amin(dim=2).amin(dim=0))  # contiguous k first
            gamma2[members] = g2
        # Only points whose γ exceeds the largest distance searched so far continue to the next phase.
        searched = float((lengths[selection].max() / distance_mm) ** 2)
        candidates = candidates[gamma2[candidates] > searched]
    gamma = torch.sqrt(gamma2).clamp_max(float(max_gamma)).cpu().numpy()
    out.ravel()[points] = gamma
    return out


def gamma_pymedphys(dose_ref: np.ndarray, dose_eval: np.ndarray, spacing_mm: Sequence[float], dose_percent: float = 3.0,
                    distance_mm: float = 3.0, lower_percent_cutoff: float = 10.0, local: bool = False,
                    global_normalisation: float | None = None, max_gamma: float = 2.0, interp_fraction: int = 10,
                    random_subset: int | None = None, seed: int = 0, mask: np.ndarray | None = None,
                    ram_available: int = 2**30) -> np.ndarray:
    """The same comparison through ``pymedphys.gamma`` (the reference implementation; needs numba).

    ``mask`` is applied afterwards (pymedphys has no mask option); ``random_subset`` uses numpy's global
    RNG seeded with ``seed`` (pymedphys shuffles with np.random).
    """
    import logging

    import pymedphys

    ref = np.asarray(dose_ref, dtype=np.float64)
    axes = tuple(np.arange(n) * float(s) for n, s in zip(ref.shape, spacing_mm))
    if random_subset is not None:
        np.random.seed(seed)
    level = logging.getLogger().level
    logging.getLogger().setLevel(logging.WARNING)  # pymedphys logs every shell at INFO
    try:
        gamma = pymedphys.gamma(axes, ref, axes, np.asarray(dose_eval, dtype=np.float64), dose_percent, distance_mm,
                                lower_percent_dose_cutoff=lower_percent_cutoff, interp_fraction=interp_fraction,
                                max_gamma=max_gamma, local_gamma=local, global_normalisation=global_normalisation,
                                random_subset=random_subset, ram_available=ram_available)
    finally:
        logging.getLogger().setLevel(level)
    gamma = np.asarray(gamma, dtype=np.float32)
    if mask is not None:
        gamma = np.where(np.asarray(mask, bool), gamma, np.nan).astype(np.float32)
    return gamma


def compute_gamma(dose_ref, dose_eval, spacing_mm, implementation: str = "torch", **kwargs) -> np.ndarray:
    """Dispatch on ``implementation``: "torch" (this module's vectorized search) or "pymedphys"."""
    if implementation == "torch":
        return gamma_index(dose_ref, dose_eval, spacing_mm, **kwargs)
    if implementation == "pymedphys":
        for key in ("device", "max_elements", "cpu_threads"):
            kwargs.pop(key, None)
        return gamma_pymedphys(dose_ref, dose_eval, spacing_mm, **kwargs)
    raise ValueError(f"gamma implementation must be 'torch' or 'pymedphys', got {implementation!r}")


def pass_rate(gamma: np.ndarray, region: np.ndarray | None = None) -> float:
    """% of evaluated voxels (finite γ) with γ ≤ 1, optionally within ``region``; NaN if none."""
    g = np.asarray(gamma)
    valid = np.isfinite(g)
    if region is not None:
        valid &= np.asarray(region, bool)
    n = int(valid.sum())
    return float(100.0 * np.sum(g[valid] <= 1.0) / n) if n else float("nan")
