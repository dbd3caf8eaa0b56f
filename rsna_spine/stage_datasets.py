"""PyTorch datasets over the cache (module-level classes: picklable for spawned DataLoader workers).

- :class:`SagittalPointDataset`: a whole sagittal stack resampled to the localizer grid, with the label
  points of its series type (5 spinal-canal levels on T2, 10 foramina on T1) as output-grid coordinates.
- :class:`AxialPointDataset`: one axial slice at a disc level with its left / right subarticular points.
- :class:`CropDataset`: the stage-2 samples, (N, 3, H, W) crops around a level point of one condition,
  with stage-1-like jitter of slice and centre, random rotation and left-right flips (condition mirrored).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import pandas as pd
import torch
from torch.utils.data import Dataset

from rsna_spine.constants import (
    CONDITIONS,
    GROUP_OF_CONDITION,
    LEVELS,
    MIRROR_CONDITION,
    SERIES_OF_GROUP,
)
from rsna_spine.crops import crop_stack, resample_slice, resample_volume
from rsna_spine.data import StackStore

# heatmap channels of each localizer: (condition, level) in channel order
POINTS = {
    "sag_t2": [("spinal_canal_stenosis", lv) for lv in LEVELS],
    "sag_t1": [("left_neural_foraminal_narrowing", lv) for lv in LEVELS]
              + [("right_neural_foraminal_narrowing", lv) for lv in LEVELS],
    "axial_t2": [("left_subarticular_stenosis", None), ("right_subarticular_stenosis", None)],
}
STRIDE = 2  # in-plane output stride of HeatmapLocalizer


def output_to_voxel(coords: np.ndarray, stack_shape, grid, k: float | None = None) -> np.ndarray:
    """Localizer output coordinates (P, 3) → canonical voxel (k, j, i) of the stack.

    Sagittal (``k`` None): the volume was resampled to ``grid`` (D, H, W) with align_corners=True.
    Axial: one slice ``k`` resampled to ``grid`` (H, W). In-plane output stride: STRIDE.
    """
    coords = np.asarray(coords, dtype=np.float64)
    grid_coords = np.c_[coords[:, 0], coords[:, 1:] * STRIDE]
    shape = np.asarray(stack_shape, dtype=np.float64)
    if k is None:
        scale = (np.asarray(grid, dtype=np.float64) - 1) / np.maximum(shape - 1, 1)
        return grid_coords / scale[None, :]
    scale = (np.asarray(grid, dtype=np.float64) - 1) / np.maximum(shape[1:] - 1, 1)
    return np.c_[np.full(len(coords), float(k)), grid_coords[:, 1:] / scale[None, :]]


def mirrored_channels(series_key: str) -> list[int]:
    """Channel permutation of a left-right flip (left ↔ right points)."""
    points = POINTS[series_key]
    return [points.index((MIRROR_CONDITION[c], lv)) for c, lv in points]


def sagittal_items(labels: pd.DataFrame, store: StackStore, series_key: str, studies) -> list[dict]:
    """One item per decoded stack of ``series_key`` in ``studies`` that holds at least one label point."""
    items = []
    points = POINTS[series_key]
    located = labels[labels["k"].notna() & labels["study_id"].isin(studies)]
    for (study, series, stack_index), group in located.groupby(["study_id", "series_id", "stack_index"]):
        if store.index.loc[(store.index["study_id"] == study) & (store.index["series_id"] == series)
                           & (store.index["stack_index"] == stack_index), "series_key"].tolist() != [series_key]:
            continue
        kji = np.full((len(points), 3), np.nan)
        for rec in group.itertuples():
            if (rec.condition, rec.level) in points:
                kji[points.index((rec.condition, rec.level))] = (rec.k, rec.j, rec.i)
        if np.isfinite(kji).all(axis=1).any():
            items.append({"study_id": int(study), "series_id": int(series), "stack_index": int(stack_index),
                          "kji": kji})
    return items


def axial_items(labels: pd.DataFrame, store: StackStore, studies) -> list[dict]:
    """One item per (study, level, axial stack): the slice of the left point (else the right one)."""
    items = []
    sub = labels[labels["k"].notna() & labels["study_id"].isin(studies)
                 & labels["condition"].isin(["left_subarticular_stenosis", "right_subarticular_stenosis"])]
    for (study, level, series, stack_index), group in sub.groupby(["study_id", "level", "series_id", "stack_index"]):
        ji = np.full((2, 2), np.nan)
        k = None
        for rec in group.sort_values("condition").itertuples():  # "left..." sorts before "right..."
            side = 0 if rec.condition.startswith("left") else 1
            ji[side] = (rec.j, rec.i)
            k = rec.k if k is None else k
        items.append({"study_id": int(study), "series_id": int(series), "stack_index": int(stack_index),
                      "k": int(round(k)), "ji": ji, "level": level})
    return items


class SagittalPointDataset(Dataset):
    """(1, D, H, W) volume + (P, 3) output-grid point coordinates + (P,) mask."""

    def __init__(self, items: list[dict], store: StackStore, series_key: str, grid, intensity: Mapping,
                 augment: bool = False, seed: int = 0):
        self.items, self.store, self.series_key = items, store, series_key
        self.grid = tuple(int(g) for g in grid)
        self.intensity = dict(intensity)
        self.augment = augment
        self.seed = seed
        self.mirror = mirrored_channels(series_key)

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        stack = self.store.get(item["study_id"], item["series_id"], item["stack_index"])
        volume, scale = resample_volume(stack, self.grid, self.intensity)
        coords = item["kji"] * scale[None, :]
        if self.augment:
            volume, coords = _augment(volume, coords, self.mirror, slice_flip=True)
        return _point_sample(volume, coords, index)


class AxialPointDataset(Dataset):
    """(1, 1, H, W) axial slice + (2, 3) output-grid points (left, right subarticular) + (2,) mask."""

    def __init__(self, items: list[dict], store: StackStore, size, intensity: Mapping, augment: bool = False):
        self.items, self.store = items, store
        self.size = tuple(int(s) for s in size)
        self.intensity = dict(intensity)
        self.augment = augment
        self.mirror = mirrored_channels("axial_t2")

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        stack = self.store.get(item["study_id"], item["series_id"], item["stack_index"])
        plane, scale = resample_slice(stack, item["k"], self.size, self.intensity)
        coords = np.c_[np.zeros(2), item["ji"] * scale[None, :]]
        volume = plane[None]
        if self.augment:
            volume, coords = _augment(volume, coords, self.mirror, slice_flip=False)
        return _point_sample(volume, coords, index)


def _augment(volume: np.ndarray, coords: np.ndarray, mirror: list[int], slice_flip: bool):
    """Left-right flip (slices for sagittal, columns for axial) with the points' channels swapped,
    intensity gamma / scale, and an in-plane shift (zero fill)."""
    rng = np.random.default_rng(torch.randint(0, 2**31 - 1, (1,)).item())
    volume = volume.copy()
    coords = coords.copy()
    if rng.uniform() < 0.5:
        if slice_flip:
            volume = volume[::-1]
            coords[:, 0] = volume.shape[0] - 1 - coords[:, 0]
        else:
            volume = volume[:, :, ::-1]
            coords[:, 2] = volume.shape[2] - 1 - coords[:, 2]
        coords = coords[mirror]
    volume = np.clip(volume, 0, 1) ** rng.uniform(0.7, 1.4) * rng.uniform(0.9, 1.1)
    shift = rng.integers(-volume.shape[1] // 10, volume.shape[1] // 10 + 1, size=2)
    volume = np.roll(volume, tuple(int(s) for s in shift), axis=(1, 2))
    for axis, s in zip((1, 2), shift):
        if s > 0:
            np.moveaxis(volume, axis, 0)[:s] = 0
        elif s < 0:
            np.moveaxis(volume, axis, 0)[s:] = 0
    coords[:, 1:] += shift[None, :]
    return np.ascontiguousarray(volume, dtype=np.float32), coords


def _point_sample(volume: np.ndarray, coords: np.ndarray, index: int) -> dict:
    """Grid coordinates → localizer output coordinates (in-plane stride 2) and the mask of known points."""
    mask = np.isfinite(coords).all(axis=1)
    out = np.where(mask[:, None], coords, 0.0).astype(np.float32)
    out[:, 1:] /= STRIDE
    return {"input": torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None],
            "coords": torch.from_numpy(out), "mask": torch.from_numpy(mask.astype(np.float32)),
            "index": index}


# ------------------------------------------------------------------------------------------- stage 2
def crop_items(labels: pd.DataFrame, centers: pd.DataFrame | None, studies, conditions=CONDITIONS) -> list[dict]:
    """Stage-2 samples: graded targets of ``studies`` with a centre.

    ``centers``: None → the label points themselves (training); else a table with the same columns
    (study_id, condition, level, series_id, stack_index, k, j, i), e.g. stage-1 predictions.
    """
    graded = labels[labels["study_id"].isin(studies) & (labels["label"] >= 0) & labels["condition"].isin(conditions)]
    if centers is None:
        table = graded[graded["k"].notna()]
    else:
        cols = ["study_id", "condition", "level", "series_id", "stack_index", "k", "j", "i"]
        table = graded[["study_id", "condition", "level", "label"]].merge(centers[cols], how="inner",
                                                                          on=["study_id", "condition", "level"])
        table = table[table["k"].notna()]
    return [{"study_id": int(r.study_id), "condition": r.condition, "level": r.level, "label": int(r.label),
             "series_id": int(r.series_id), "stack_index": int(r.stack_index), "kji": (r.k, r.j, r.i)}
            for r in table.itertuples()]


class CropDataset(Dataset):
    """{"image": (N, 3, H, W), "level", "condition", "label", "index"} for one (study, condition, level).

    ``flip`` forces the left-right flip (TTA); in training the flip is random (``flip_prob``) and the
    condition is mirrored with it, so the sample stays correctly labelled.

    ``second_view=True`` (:mod:`rsna_spine.fusion`) adds "second_image" (N, 3, H, W) cropped around
    ``item["second_view"]`` (same size, same flip; in training it follows the primary centre's jitter) and
    "second_present" (1.0, or 0.0 with zeros when the item has none or, in training, with probability
    ``augment["second_view_dropout"]``).
    """

    def __init__(self, items: list[dict], store: StackStore, crop_cfg: Mapping, intensity: Mapping,
                 augment: Mapping | None = None, flip: bool = False, second_view: bool = False):
        self.items, self.store = items, store
        self.second_view = second_view
        self.num_slices = int(crop_cfg["num_slices"])
        self.img_size = int(crop_cfg["img_size"])
        self.crop_mm = dict(crop_cfg["crop_mm"])
        self.intensity = dict(intensity)
        self.augment = dict(augment) if augment else None
        self.flip = flip

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict:
        item = self.items[index]
        stack = self.store.get(item["study_id"], item["series_id"], item["stack_index"])
        k, j, i = (float(v) for v in item["kji"])
        flip, rotation = self.flip, 0.0
        if self.augment:
            aug = self.augment
            rng = np.random.default_rng(torch.randint(0, 2**31 - 1, (1,)).item())
            k += int(rng.integers(-aug["jitter_slices"], aug["jitter_slices"] + 1))
            j += rng.normal(0, aug["jitter_mm"]) / stack.spacing_mm[1]
            i += rng.normal(0, aug["jitter_mm"]) / stack.spacing_mm[2]
            rotation = float(rng.uniform(-aug["rotation_deg"], aug["rotation_deg"]))
            flip = bool(rng.uniform() < aug["flip_prob"])
        group = GROUP_OF_CONDITION[item["condition"]]
        image = crop_stack(stack, (k, j, i), self.num_slices, self.crop_mm[group], self.img_size, self.intensity,
                           flip_lr=flip, rotation_deg=rotation)
        if self.augment:
            image = np.clip(image, 0, 1) ** rng.uniform(0.8, 1.25)
        condition = MIRROR_CONDITION[item["condition"]] if flip else item["condition"]
        sample = {"image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                  "level": LEVELS.index(item["level"]), "condition": CONDITIONS.index(condition),
                  "label": int(item["label"]), "index": index}
        if self.second_view:  # drawn after the primary view's augmentation: its random stream is unchanged
            jittered = stack.voxel_to_patient(np.array([k, j, i]))[0] if self.augment else None
            sample.update(self._second_crop(item, group, flip, rng if self.augment else None, jittered))
        return sample

    def _second_crop(self, item: dict, group: str, flip: bool, rng: np.random.Generator | None,
                     jittered_mm: np.ndarray | None = None) -> dict:
        """{"second_image", "second_present"} of one item (zeros and 0.0 when it has no second view).

        In training the second view follows the primary view's jitter: its centre is the jittered primary
        centre (``jittered_mm``, patient mm) projected into the second view's stack, as at test time, where
        the second view inherits the stage-1 point's error."""
        center = item.get("second_view")
        if center is not None and rng is not None and rng.uniform() < self.augment["second_view_dropout"]:
            center = None
        if center is None:
            blank = np.zeros((self.num_slices, 3, self.img_size, self.img_size), dtype=np.float32)
            return {"second_image": torch.from_numpy(blank), "second_present": 0.0}
        stack = self.store.get(item["study_id"], center["series_id"], center["stack_index"])
        k, j, i = (float(v) for v in center["kji"])
        rotation = 0.0
        if rng is not None:
            k, j, i = (float(v) for v in stack.patient_to_voxel(jittered_mm)[0])
            rotation = float(rng.uniform(-self.augment["rotation_deg"], self.augment["rotation_deg"]))
        image = crop_stack(stack, (k, j, i), self.num_slices, self.crop_mm[group], self.img_size, self.intensity,
                           flip_lr=flip, rotation_deg=rotation)
        if rng is not None:
            image = np.clip(image, 0, 1) ** rng.uniform(0.8, 1.25)
        return {"second_image": torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32)),
                "second_present": 1.0}


def series_key_of(condition: str) -> str:
    return SERIES_OF_GROUP[GROUP_OF_CONDITION[condition]]
