"""Intensity scaling, CLAHE, millimetre-sized crops and N-slice stacks: the stage-2 input (N, 3, H, W).

Intensity (notes: MR intensities are arbitrary per series, so a fixed CT-style window saturates):
- ``percentile`` (default): (v − p_low) / (p_high − p_low) with the stack's percentiles, clipped to [0, 1];
- ``window``: the v9 setting, (v − (WC − WW/2)) / WW clipped to [0, 1] with WC / WW from the config.
Optional CLAHE (OpenCV, Zuiderveld 1994) on the 8-bit crop. Crops are sized in millimetres and resampled
bilinearly (cv2.warpAffine) to ``img_size`` pixels, so a crop covers the same anatomy whatever the pixel
spacing; the slice stack is the N slices around the (rounded) slice of interest, clamped at the ends.
"""

from __future__ import annotations

from collections.abc import Mapping

import cv2
import numpy as np
import torch
import torch.nn.functional as F

from rsna_spine.data import Stack


def scale_intensity(values: np.ndarray, stack: Stack, cfg: Mapping) -> np.ndarray:
    """float32 in [0, 1] by the configured mode (``intensity`` section of the config)."""
    mode = cfg["mode"]
    if mode == "percentile":
        low, high = float(stack.percentiles[0]), float(stack.percentiles[-1])
    elif mode == "window":
        low = float(cfg["window_center"]) - float(cfg["window_width"]) / 2
        high = low + float(cfg["window_width"])
    else:
        raise ValueError(f"intensity.mode must be 'percentile' or 'window', got {mode!r}")
    return np.clip((values - low) / max(high - low, 1e-6), 0.0, 1.0).astype(np.float32)


def apply_clahe(image01: np.ndarray, clip_limit: float, tiles: int) -> np.ndarray:
    """CLAHE on an image in [0, 1] (via uint8), returned in [0, 1]."""
    clahe = cv2.createCLAHE(clipLimit=float(clip_limit), tileGridSize=(int(tiles), int(tiles)))
    return clahe.apply(np.round(image01 * 255).astype(np.uint8)).astype(np.float32) / 255.0


def lr_axis(stack: Stack) -> str:
    """Which array axis runs along patient left-right: 'slice', 'row' or 'col' (for flips)."""
    x = np.array([1.0, 0.0, 0.0])
    scores = {"slice": abs(stack.normal @ x), "row": abs(stack.col_dir @ x), "col": abs(stack.row_dir @ x)}
    return max(scores, key=scores.get)


def crop_stack(stack: Stack, center_kji, num_slices: int, crop_mm: float, img_size: int,
               intensity: Mapping, flip_lr: bool = False, rotation_deg: float = 0.0,
               slice_step: int = 1) -> np.ndarray:
    """(N, 3, H, W) float32: N slices around round(k), each a crop_mm × crop_mm square around (j, i).

    ``flip_lr`` mirrors the patient left-right (slice order reversed for sagittal stacks, columns
    flipped for axial ones): with the condition mirrored, the crop reads as the contralateral side.
    """
    k_c, j_c, i_c = (float(v) for v in center_kji)
    n_k = stack.shape[0]
    k0 = int(round(k_c))
    half = num_slices // 2
    ks = np.clip(k0 + slice_step * (np.arange(num_slices) - half), 0, n_k - 1)
    size = int(img_size)
    sy = crop_mm / stack.spacing_mm[1] / size  # input rows per output pixel
    sx = crop_mm / stack.spacing_mm[2] / size
    theta = np.deg2rad(rotation_deg)
    cos, sin = np.cos(theta), np.sin(theta)
    # output pixel (u, v) → input (x = column, y = row), about the output centre
    m = np.array([[sx * cos, -sy * sin, 0.0], [sx * sin, sy * cos, 0.0]], dtype=np.float64)
    c_out = (size - 1) / 2.0
    m[0, 2] = i_c - (m[0, 0] * c_out + m[0, 1] * c_out)
    m[1, 2] = j_c - (m[1, 0] * c_out + m[1, 1] * c_out)
    out = np.empty((num_slices, size, size), dtype=np.float32)
    for n, k in enumerate(ks):
        plane = scale_intensity(stack.array[int(k)], stack, intensity)
        out[n] = cv2.warpAffine(plane, m, (size, size), flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
                                borderMode=cv2.BORDER_CONSTANT, borderValue=0.0)
        if intensity.get("clahe"):
            out[n] = apply_clahe(out[n], intensity["clahe_clip"], intensity["clahe_tiles"])
    if flip_lr:
        axis = lr_axis(stack)
        if axis == "slice":
            out = out[::-1]
        elif axis == "col":
            out = out[:, :, ::-1]
        else:
            out = out[:, ::-1, :]
    return np.ascontiguousarray(np.repeat(out[:, None], 3, axis=1))


def resample_volume(stack: Stack, grid: tuple[int, int, int], intensity: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Whole stack → (D, H, W) float32 by trilinear interpolation (align_corners=True), and the scale
    factors s such that grid coordinate = voxel coordinate · s (per axis)."""
    vol = torch.from_numpy(scale_intensity(stack.array, stack, intensity))[None, None]
    out = F.interpolate(vol, size=tuple(int(g) for g in grid), mode="trilinear", align_corners=True)
    shape = np.array(stack.shape, dtype=np.float64)
    scale = (np.asarray(grid, dtype=np.float64) - 1) / np.maximum(shape - 1, 1)
    return out[0, 0].numpy(), scale


def resample_slice(stack: Stack, k: int, size: tuple[int, int], intensity: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """One slice → (H, W) float32 (bilinear, align_corners=True) and the (row, col) scale factors."""
    plane = scale_intensity(stack.array[int(np.clip(k, 0, stack.shape[0] - 1))], stack, intensity)
    out = F.interpolate(torch.from_numpy(plane)[None, None], size=tuple(int(s) for s in size), mode="bilinear",
                        align_corners=True)
    shape = np.array(stack.shape[1:], dtype=np.float64)
    scale = (np.asarray(size, dtype=np.float64) - 1) / np.maximum(shape - 1, 1)
    return out[0, 0].numpy(), scale
