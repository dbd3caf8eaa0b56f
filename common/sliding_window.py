"""Sliding-window inference with Gaussian blending, for volumes larger than the training patch.

Same idea as MONAI's ``sliding_window_inference`` (and nnU-Net's): tile the input with overlapping
windows, weight each window's output by a Gaussian centred on the window (σ = ``sigma_scale`` × window
size) so seams vanish, and divide by the summed weights. With ``mode="constant"`` all positions weigh the
same, so a translation-equivariant model reproduces its full-volume output exactly.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F


def _starts(size: int, window: int, step: int) -> list[int]:
    if size <= window:
        return [0]
    starts = list(range(0, size - window + 1, step))
    if starts[-1] != size - window:
        starts.append(size - window)
    return starts


def importance_map(window: Sequence[int], mode: str = "gaussian", sigma_scale: float = 0.125,
                   device=None, dtype=torch.float32) -> torch.Tensor:
    """Blending weights for one window: separable Gaussian (normalized to max 1, floored at 1e-3 so
    borders still count) or constant ones."""
    if mode == "constant":
        return torch.ones(tuple(window), device=device, dtype=dtype)
    if mode != "gaussian":
        raise ValueError(f"mode must be 'gaussian' or 'constant', got {mode!r}")
    weights = torch.ones((), device=device, dtype=dtype)
    for axis, size in enumerate(window):
        coords = torch.arange(size, device=device, dtype=dtype) - (size - 1) / 2
        sigma = max(size * sigma_scale, 1e-3)
        g = torch.exp(-0.5 * (coords / sigma) ** 2)
        shape = [1] * len(window)
        shape[axis] = size
        weights = weights * g.reshape(shape)
    weights = weights / weights.max()
    return weights.clamp_min(1e-3)


@torch.no_grad()
def sliding_window_inference(inputs: torch.Tensor, window: Sequence[int], predictor: Callable[[torch.Tensor], torch.Tensor],
                             overlap: float = 0.5, mode: str = "gaussian", sigma_scale: float = 0.125,
                             batch_size: int = 1, output_device=None, progress: Callable | None = None) -> torch.Tensor:
    """Predict on (N, C, *spatial) inputs window by window and blend.

    Args:
        window: spatial window size; inputs smaller than the window are zero-padded (then cropped back).
        predictor: maps (B, C, *window) to (B, C_out, *window) (same spatial size).
        overlap: fraction of the window shared by neighbours (0 ≤ overlap < 1).
        batch_size: windows per predictor call.
        output_device: where the blended output accumulates (default: the input's device), e.g. "cpu" to
            keep a large volume off the GPU.
    """
    spatial = inputs.shape[2:]
    if len(window) != len(spatial):
        raise ValueError(f"window {tuple(window)} has {len(window)} dims, the input has {len(spatial)} spatial dims")
    if not 0 <= overlap < 1:
        raise ValueError(f"overlap must be in [0, 1), got {overlap}")
    pad = []
    for size, win in zip(reversed(spatial), reversed(window)):
        extra = max(win - size, 0)
        pad += [extra // 2, extra - extra // 2]
    padded = F.pad(inputs, pad) if any(pad) else inputs
    full = padded.shape[2:]
    steps = [max(1, int(round(w * (1 - overlap)))) for w in window]
    grid = list(itertools.product(*[_starts(s, w, st) for s, w, st in zip(full, window, steps)]))
    out_device = output_device if output_device is not None else inputs.device
    weights = importance_map(window, mode, sigma_scale, device=out_device)
    output = None
    norm = torch.zeros((1, 1, *full), device=out_device)
    iterator = range(0, len(grid), batch_size)
    if progress is not None:
        iterator = progress(iterator)
    for n in range(inputs.shape[0]):
        for first in iterator if n == 0 else range(0, len(grid), batch_size):
            starts = grid[first:first + batch_size]
            slices = [tuple(slice(s, s + w) for s, w in zip(start, window)) for start in starts]
            batch = torch.stack([padded[n][(slice(None), *sl)] for sl in slices])
            pred = predictor(batch).to(out_device, torch.float32)
            if output is None:
                output = torch.zeros((inputs.shape[0], pred.shape[1], *full), device=out_device)
            for p, sl in zip(pred, slices):
                output[n][(slice(None), *sl)] += p * weights
                if n == 0:
                    norm[0][(slice(None), *sl)] += weights
    result = output / norm
    crop = tuple(slice(pad[2 * i], pad[2 * i] + size) for i, size in enumerate(reversed(spatial)))[::-1]
    return result[(slice(None), slice(None), *crop)]
