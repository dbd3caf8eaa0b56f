"""Model inputs from a case NPZ, patch sampling and augmentation for training.

Input channels (``input_spec``, stored in every checkpoint so inference rebuilds them exactly):
  0            CT: clip(HU, lo, hi) / 1000
  1 .. S       signed distance fields of the S structures (scaled, negative inside)
  S + 1        prescription map: in each target its dose / Rx (PTV70 → 1.0, PTV56 → 0.8), max-combined
  S + 2        possible-dose (body) mask
  S + 3        only with ``input.atlas_channel``: the mean-dose atlas of the case (vmat/atlas.py) / Rx; the
               atlas fitted on the training cases travels in the input spec, so inference rebuilds it
Conditioning vector (FiLM): [Rx / rx_reference_gy, presence flag of each structure, dose / Rx of each
target]. Target: dose / Rx (the models predict a dose relative to the prescription).

Coarse grid (``input.grid_factor`` f > 1): the model works on the case averaged over f×f×f voxel blocks
(:func:`coarsen`; a 128³ OpenKBP patient becomes 64³ at f = 2, so one window holds the whole patient);
inference upsamples its output trilinearly back to the case grid (vmat/inference.py). A model predicting
the residual over the atlas gets the atlas back at full resolution: only its correction is upsampled.

Left-right flip: axis −1 of every array is the patient's left-right axis (x increases toward the
patient's left, see vmat/geometry.py), so the flip is ``[..., ::-1]``; channels of lateral pairs
(Femur_L/Femur_R, LeftParotid/RightParotid) are swapped, so after the flip the "Femur_L" channel again
holds the patient's left femoral head. (The original flipped the anterior-posterior axis.)
"""

from __future__ import annotations

import math
from collections import OrderedDict
from collections.abc import Mapping, Sequence

import numpy as np
import torch
from scipy import ndimage
from torch.utils.data import Dataset

from vmat.atlas import predict_atlas
from vmat.case_io import load_case
from vmat.structures import left_right_permutation

INPUT_DEFAULTS = {
    "ct_clip_hu": [-1000.0, 1500.0],  # CT window before scaling by 1/1000
    "rx_reference_gy": 70.0,  # conditioning scale of the prescription
    "atlas_channel": False,  # add the mean-dose atlas / Rx as the last input channel (needed by model.residual_over_atlas)
    "grid_factor": 1,  # the model sees the case averaged over f^3 voxel blocks (2: 128^3 -> 64^3); output upsampled
}


def make_input_spec(structure_names: Sequence[str], target_doses_gy: Mapping[str, float], cfg: Mapping,
                    sdf_clip_mm: float, atlas: Mapping | None = None) -> dict:
    """Everything inference needs to rebuild the inputs (plain types, saved in checkpoints).

    ``atlas`` (the dict of vmat.atlas.fit_atlas) is required when ``cfg["atlas_channel"]`` is on."""
    names = list(structure_names)
    targets = {n: float(d) for n, d in target_doses_gy.items() if n in names}
    spec = {"structure_names": names, "target_doses_gy": targets, "ct_clip_hu": [float(v) for v in cfg["ct_clip_hu"]],
            "rx_reference_gy": float(cfg["rx_reference_gy"]), "sdf_clip_mm": float(sdf_clip_mm),
            "n_channels": 1 + len(names) + 2, "cond_dim": 1 + len(names) + len(targets)}
    if cfg.get("atlas_channel"):
        if atlas is None:
            raise ValueError("input.atlas_channel needs a fitted atlas (vmat.atlas.fit_atlas)")
        spec["atlas"] = dict(atlas)
        spec["n_channels"] += 1
    factor = int(cfg.get("grid_factor", 1))
    if factor < 1:
        raise ValueError(f"input.grid_factor must be a positive integer, got {cfg.get('grid_factor')!r}")
    if factor > 1:  # absent for 1, so specs (and checkpoints) of full-resolution models are unchanged
        spec["grid_factor"] = factor
    return spec


def coarsen(volume: np.ndarray, factor: int) -> np.ndarray:
    """Mean over ``factor``³ blocks of the last three axes; axes not divisible by ``factor`` are zero-padded
    at their high end first. ``factor`` 1 returns the input."""
    if factor == 1:
        return volume
    volume = np.asarray(volume, np.float32)
    pad = [(0, 0)] * (volume.ndim - 3) + [(0, (-n) % factor) for n in volume.shape[-3:]]
    padded = np.pad(volume, pad)
    z, y, x = (n // factor for n in padded.shape[-3:])
    blocks = padded.reshape(*padded.shape[:-3], z, factor, y, factor, x, factor)
    return blocks.mean(axis=(-5, -3, -1))


def body_channel(spec: Mapping) -> int:
    """Index of the possible-dose (body) mask among the input channels."""
    return 1 + len(spec["structure_names"]) + 1


def check_case_matches(case: Mapping, spec: Mapping, source: str = "") -> None:
    if list(case["structure_names"]) != list(spec["structure_names"]):
        raise ValueError(f"{source or case.get('case_id')}: structure channels {case['structure_names']} differ from "
                         f"the model's {spec['structure_names']}; preprocess with the same structure list")


def build_inputs(case: Mapping, spec: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """(image (C, z, y, x) float32, conditioning vector float32) of one case."""
    check_case_matches(case, spec)
    lo, hi = spec["ct_clip_hu"]
    names = spec["structure_names"]
    rx = float(case["prescription_gy"])
    ct = (np.clip(np.asarray(case["ct"], np.float32), lo, hi) / 1000.0)[None]
    rx_map = np.zeros(ct.shape[1:], np.float32)
    for name, dose in spec["target_doses_gy"].items():
        rx_map = np.maximum(rx_map, np.asarray(case["masks"][names.index(name)], np.float32) * (dose / rx))
    body = np.asarray(case["possible_dose_mask"], np.float32)[None]
    channels = [ct, np.asarray(case["sdf"], np.float32), rx_map[None], body]
    if spec.get("atlas"):
        atlas_gy = predict_atlas(spec["atlas"], case["masks"], names, case["spacing_mm"], case["possible_dose_mask"])
        channels.append(atlas_gy[None] / rx)
    image = np.concatenate(channels, axis=0)
    present = [float(np.asarray(m).any()) for m in case["masks"]]
    ratios = [(dose / rx) if present[names.index(name)] else 0.0 for name, dose in spec["target_doses_gy"].items()]
    cond = np.asarray([rx / spec["rx_reference_gy"], *present, *ratios], np.float32)
    return image, cond


def input_channel_permutation(spec: Mapping) -> list[int]:
    """Channel order after a left-right flip (SDF channels of lateral pairs swapped)."""
    perm = left_right_permutation(spec["structure_names"])
    n = len(perm)
    return [0] + [1 + p for p in perm] + [n + 1, n + 2] + ([n + 3] if spec.get("atlas") else [])


def cond_permutation(spec: Mapping) -> list[int]:
    perm = left_right_permutation(spec["structure_names"])
    n, t = len(perm), len(spec["target_doses_gy"])
    return [0] + [1 + p for p in perm] + list(range(n + 1, n + 1 + t))


def flip_left_right(array: np.ndarray, channel_perm: Sequence[int] | None = None) -> np.ndarray:
    """Flip the patient's left-right axis (last axis) and reorder channels (first axis) if given."""
    out = array[..., ::-1]
    if channel_perm is not None:
        out = out[list(channel_perm)]
    return np.ascontiguousarray(out)


# --------------------------------------------------------------------------------------------- patches
def _crop(volume: np.ndarray, start: np.ndarray, size: Sequence[int], fill) -> np.ndarray:
    """Crop (C, z, y, x) at ``start`` (may be negative / past the end); outside is ``fill`` per channel."""
    shape = np.array(volume.shape[1:])
    size = np.asarray(size)
    out = np.empty((volume.shape[0], *size), dtype=volume.dtype)
    out[:] = np.asarray(fill, dtype=volume.dtype).reshape(-1, 1, 1, 1)
    lo = np.maximum(start, 0)
    hi = np.minimum(start + size, shape)
    if np.any(hi <= lo):
        return out
    dst = tuple(slice(a - s, b - s) for a, b, s in zip(lo, hi, start))
    src = tuple(slice(a, b) for a, b in zip(lo, hi))
    out[(slice(None), *dst)] = volume[(slice(None), *src)]
    return out


class PatchDataset(Dataset):
    """Random training patches, ``patches_per_case`` per case and epoch.

    Each item is drawn from an RNG seeded by (seed, epoch, index), so a resumed run (DistributedSampler
    with set_epoch) sees the same patches as an uninterrupted one; the epoch comes with the index when the
    sampler tags it (``(epoch, index)``), else from :meth:`set_epoch`. ``high_dose_fraction`` of the patches
    are centred on a voxel with dose ≥ ``high_dose_threshold`` × Rx (the rest anywhere in the body).
    Module-level and picklable (spawn workers); cases are loaded lazily and kept in a least-recently-used
    cache of at most ``cache_mb`` MiB per process (each worker has its own; 0 = no cache). A decoded
    128^3 OpenKBP case takes ~150 MiB, so caching every case of a real training set would not fit in memory.
    """

    def __init__(self, paths: Sequence[str], spec: Mapping, patch_size: Sequence[int], patches_per_case: int,
                 high_dose_fraction: float = 0.5, high_dose_threshold: float = 0.1, augment: Mapping | None = None,
                 seed: int = 0, cache_mb: float = 4096.0):
        self.paths = [str(p) for p in paths]
        self.spec = dict(spec)
        self.patch_size = [int(v) for v in patch_size]
        self.patches_per_case = int(patches_per_case)
        self.high_dose_fraction = float(high_dose_fraction)
        self.high_dose_threshold = float(high_dose_threshold)
        self.augment = dict(augment or {})
        self.seed = int(seed)
        self.epoch = 0
        self.cache_bytes = int(float(cache_mb) * 2**20)
        self._cases: OrderedDict = OrderedDict()  # index -> decoded case, least recently used first
        self.channel_perm = input_channel_permutation(self.spec)
        self.cond_perm = cond_permutation(self.spec)
        self.mask_perm = left_right_permutation(self.spec["structure_names"])

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.paths) * self.patches_per_case

    def _case(self, i: int) -> dict:
        if i in self._cases:
            self._cases.move_to_end(i)
            return self._cases[i]
        case = load_case(self.paths[i])
        image, cond = build_inputs(case, self.spec)
        rx = float(case["prescription_gy"])
        f = int(self.spec.get("grid_factor", 1))
        image = coarsen(image, f)
        dose_gy = coarsen(np.asarray(case["dose"]), f)
        target = (np.asarray(dose_gy, np.float32) / rx)[None]
        body = image[body_channel(self.spec)] > 0  # any body voxel in the block (its fraction is the input)
        # a coarse voxel's reference dose is known only if it is known in every voxel of its block
        valid = coarsen(np.asarray(case["dose_valid_mask"], np.float32), f) > 1 - 1e-6
        index_dtype = np.int16 if max(image.shape[1:]) < 2**15 else np.int64
        item = {"image": image, "cond": cond, "target": target,
                "masks": (coarsen(np.asarray(case["masks"], np.uint8), f) >= 0.5).astype(np.uint8), "rx": rx,
                "valid": valid.astype(np.uint8)[None],
                "high": np.argwhere(dose_gy >= self.high_dose_threshold * rx).astype(index_dtype),
                # patch centres where the loss can see something: body voxels with a known reference dose
                "body": np.argwhere(body & valid).astype(index_dtype)}
        item["nbytes"] = sum(v.nbytes for v in item.values() if isinstance(v, np.ndarray))
        if item["nbytes"] <= self.cache_bytes:
            self._cases[i] = item
            while sum(c["nbytes"] for c in self._cases.values()) > self.cache_bytes:
                self._cases.popitem(last=False)
        return item

    def __getitem__(self, index: int | tuple[int, int]) -> dict:
        # (epoch, index) from common.runtime.ResumableSampler(tag_epoch=True): persistent workers need no set_epoch
        epoch, index = (int(index[0]), int(index[1])) if isinstance(index, tuple) else (self.epoch, int(index))
        rng = np.random.default_rng([self.seed, epoch, index])
        case = self._case(index % len(self.paths))
        pool = case["high"] if (len(case["high"]) and rng.uniform() < self.high_dose_fraction) else case["body"]
        centre = pool[rng.integers(len(pool))].astype(np.int64) if len(pool) else np.array(case["image"].shape[1:]) // 2
        # along an axis the patch covers whole, it is centred on the volume (so it holds all of it, up to the shift)
        whole = np.asarray(self.patch_size) >= np.asarray(case["image"].shape[1:])
        centre = np.where(whole, np.asarray(case["image"].shape[1:]) // 2, centre)
        shift = int(self.augment.get("shift_vox", 0))
        if shift:
            centre = centre + rng.integers(-shift, shift + 1, size=3)
        angle = float(rng.uniform(-1, 1) * self.augment.get("rotate_deg", 0.0))
        size = np.array(self.patch_size)
        margin = np.zeros(3, int)
        if abs(angle) > 1e-3:  # crop larger, rotate in the axial plane, crop back (no empty corners)
            extra = int(math.ceil(max(size[1:]) * (math.sqrt(2) - 1) / 2)) + 1
            margin = np.array([0, extra, extra])
        big = size + 2 * margin
        start = centre - big // 2
        n_struct = len(self.spec["structure_names"])
        image_fill = [self.spec["ct_clip_hu"][0] / 1000.0] + [1.0] * n_struct + [0.0, 0.0] \
            + ([0.0] if self.spec.get("atlas") else [])
        image = _crop(case["image"], start, big, image_fill)
        target = _crop(case["target"], start, big, [0.0])
        masks = _crop(case["masks"], start, big, [0] * n_struct).astype(np.float32)
        valid = _crop(case["valid"], start, big, [0]).astype(np.float32)  # dose known (inside the RTDOSE grid)
        if abs(angle) > 1e-3:
            def rot(a, order):
                return ndimage.rotate(a, angle, axes=(2, 3), reshape=False, order=order, mode="nearest")
            image, target, masks, valid = rot(image, 1), rot(target, 1), rot(masks, 0), rot(valid, 0)
            sl = (slice(None), slice(None), slice(margin[1], margin[1] + size[1]), slice(margin[2], margin[2] + size[2]))
            image, target, masks, valid = image[sl], target[sl], masks[sl], valid[sl]
        cond = case["cond"].copy()
        flipped = rng.uniform() < float(self.augment.get("flip_lr", 0.0))
        if flipped:
            image = flip_left_right(image, self.channel_perm)
            target = flip_left_right(target)
            masks = flip_left_right(masks, self.mask_perm)
            valid = flip_left_right(valid)
            cond = cond[self.cond_perm]
        scale = float(self.augment.get("ct_scale", 0.0))
        offset = float(self.augment.get("ct_shift", 0.0))
        if scale or offset:
            image = image.copy()
            image[0] = image[0] * (1 + rng.uniform(-scale, scale)) + rng.uniform(-offset, offset)
        body = image[body_channel(self.spec)][None].copy()
        return {"input": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "cond": torch.from_numpy(cond.astype(np.float32)),
                "target": torch.from_numpy(np.ascontiguousarray(target, dtype=np.float32)),
                "body": torch.from_numpy(np.ascontiguousarray(body, dtype=np.float32)),
                "masks": torch.from_numpy(np.ascontiguousarray(masks, dtype=np.float32)),
                "valid": torch.from_numpy(np.ascontiguousarray(valid, dtype=np.float32)),
                "rx_gy": torch.tensor(case["rx"], dtype=torch.float32),
                "flipped": torch.tensor(flipped)}
