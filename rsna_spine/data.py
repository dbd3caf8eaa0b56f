"""The competition layout in, decoded stacks out: CSV tables, DICOM series → canonical stacks, the cache.

Reading (notes/rsna_spine.md, "pitfalls"):
- files are found by content and read once each; unreadable or truncated files are skipped with a log
  line naming the file; compressed pixel data is decoded by pydicom's plugins (pylibjpeg + openjpeg /
  libjpeg, RLE built in) or raises an error naming the file and transfer syntax (common.dicom_series);
- a series is split into stacks of one orientation, image size and continuous positions (several axial
  stacks, parallel blocks separated by a gap, scouts, mixed sizes; :mod:`rsna_spine.stacks`) and each stack
  is sorted by ImagePositionPatient along its normal, never by InstanceNumber (which comes from the header,
  else from the file name); a slice without orientation or position is skipped or an error, never guessed;
- each stack is put in a canonical orientation (sagittal: slices towards patient left, rows towards the
  feet, columns towards posterior; axial: slices towards the head, rows posterior, columns patient left)
  with its geometry kept exact, so "left" is a position, not an instance order.

The cache (``preprocess_rsna.py``) holds one compressed ``.npz`` per stack (exact 16-bit pixels as byte
planes, :func:`encode_pixels`, + geometry + instance numbers + intensity percentiles), a done marker per
series (resumption) and CSV tables; training and inference read only the cache, through a
:class:`StackStore` whose memory is bounded (LRU).
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import pydicom

from common.errors import InputError
from common.files import load_npz
from common.slice_geometry import instance_number, split_stacks
from common.dicom_series import (
    DicomSeriesError,
    Volume,
    orientation,
    pixel_data,
    pixel_spacing,
    position,
    slice_normal,
)
from rsna_spine.constants import (
    CONDITIONS,
    GRADE_TO_CLASS,
    LEVELS,
    ORIENTATION_OF_SERIES,
    SERIES_KEY,
    SERIES_TYPES,
    TARGET_COLUMNS,
    TITLE_TO_CONDITION,
    TITLE_TO_LEVEL,
)

log = logging.getLogger(__name__)

# the arrays of one cached stack file (Stack.save writes them, Stack.load requires them); "array" holds the
# pixels as written by encode_pixels (format 2: byte planes of uint16 / float16, see there; format 1: float32)
STACK_ARRAYS = ("array", "slice_origins_mm", "row_dir", "col_dir", "normal", "spacing_mm", "instance_numbers",
                "orig_row_dir", "orig_col_dir", "orig_corner", "percentiles", "meta", "keys")

# canonical in-patient directions (LPS): sagittal slices towards +x, rows towards −z (feet), columns +y
CANONICAL = {
    "sagittal": {"normal": np.array([1.0, 0, 0]), "col_dir": np.array([0, 0, -1.0]), "row_dir": np.array([0, 1.0, 0])},
    "axial": {"normal": np.array([0, 0, 1.0]), "col_dir": np.array([0, 1.0, 0]), "row_dir": np.array([1.0, 0, 0])},
    "coronal": {"normal": np.array([0, 1.0, 0]), "col_dir": np.array([0, 0, -1.0]), "row_dir": np.array([1.0, 0, 0])},
}


class DataLayoutError(InputError):
    """A competition file that is missing or malformed; the message names the file and the column."""


# ---------------------------------------------------------------------------------------------- CSVs
def _read_csv(path: Path, required: list[str]) -> pd.DataFrame:
    if not path.is_file():
        raise DataLayoutError(f"{path}: file not found (expected the Kaggle competition layout)")
    frame = pd.read_csv(path)
    missing = [c for c in required if c not in frame.columns]
    if missing:
        raise DataLayoutError(f"{path}: missing column(s) {missing}; columns are {list(frame.columns)}")
    return frame


def read_series_descriptions(root: Path, split: str = "train", logger=log.warning) -> pd.DataFrame:
    """``{split}_series_descriptions.csv`` with a ``series_key`` column (sag_t1 / sag_t2 / axial_t2).

    Unknown descriptions are dropped with a log line naming them."""
    frame = _read_csv(Path(root) / f"{split}_series_descriptions.csv",
                      ["study_id", "series_id", "series_description"])
    frame["series_description"] = frame["series_description"].astype(str).str.strip()
    unknown = frame[~frame["series_description"].isin(SERIES_TYPES)]
    for _, row in unknown.iterrows():
        logger(f"{split}_series_descriptions.csv: study {row.study_id} series {row.series_id}: unknown "
               f"series_description '{row.series_description}' (expected one of {list(SERIES_TYPES)}); skipped")
    frame = frame[frame["series_description"].isin(SERIES_TYPES)].copy()
    frame["series_key"] = frame["series_description"].map(SERIES_KEY)
    return frame.reset_index(drop=True)


def read_labels(root: Path, logger=log.warning) -> pd.DataFrame:
    """train.csv as a long table: study_id, condition, level, label (0/1/2, −1 = no truth)."""
    path = Path(root) / "train.csv"
    frame = _read_csv(path, ["study_id", *TARGET_COLUMNS])
    rows = []
    n_missing = 0
    for _, rec in frame.iterrows():
        for condition in CONDITIONS:
            for level in LEVELS:
                value = rec[f"{condition}_{level}"]
                if isinstance(value, str) and value.strip().lower() in GRADE_TO_CLASS:
                    label = GRADE_TO_CLASS[value.strip().lower()]
                elif value is None or (isinstance(value, float) and np.isnan(value)):
                    label, n_missing = -1, n_missing + 1
                else:
                    raise DataLayoutError(f"{path}: study {rec.study_id} column '{condition}_{level}': "
                                          f"unknown grade '{value}' (expected Normal/Mild, Moderate, Severe)")
                rows.append((int(rec.study_id), condition, level, label))
    if n_missing:
        logger(f"train.csv: {n_missing} empty label(s) (NaN): not trained on and not scored")
    return pd.DataFrame(rows, columns=["study_id", "condition", "level", "label"])


def read_coordinates(root: Path) -> pd.DataFrame:
    """train_label_coordinates.csv with snake-case condition / level columns."""
    path = Path(root) / "train_label_coordinates.csv"
    frame = _read_csv(path, ["study_id", "series_id", "instance_number", "condition", "level", "x", "y"])
    cond = frame["condition"].astype(str).str.strip().str.lower().map(TITLE_TO_CONDITION)
    level = frame["level"].astype(str).str.strip().str.lower().map(TITLE_TO_LEVEL)
    bad = cond.isna() | level.isna()
    if bad.any():
        row = frame[bad].iloc[0]
        raise DataLayoutError(f"{path}: unknown condition '{row.condition}' or level '{row.level}' "
                              f"(study {row.study_id})")
    frame = frame.assign(condition=cond, level=level)
    return frame


# ------------------------------------------------------------------------------------------- stacks
@dataclass
class Stack:
    """One canonical stack of a series: array (K, J, I) and the geometry of every slice.

    Patient position of voxel (k, j, i) = slice_origins_mm[k] + j·Δr·col_dir + i·Δc·row_dir; slices
    are stacked along ``normal`` (exactly, per slice, even with uneven gaps).
    """

    study_id: int
    series_id: int
    stack_index: int
    series_key: str
    orientation: str
    array: np.ndarray
    slice_origins_mm: np.ndarray
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    spacing_mm: tuple[float, float, float]
    instance_numbers: np.ndarray
    orig_row_dir: np.ndarray  # directions of the stored files, to map label pixels (x, y) to patient
    orig_col_dir: np.ndarray
    orig_corner: np.ndarray  # (K, 3) ImagePositionPatient of each slice as stored (canonical order)
    percentiles: np.ndarray  # intensity percentiles (preprocess.percentiles) of the whole stack

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(s) for s in self.array.shape)

    def volume(self) -> Volume:
        """common.dicom_series.Volume of this stack (uniform median slice spacing)."""
        along = self.slice_origins_mm @ self.normal
        return Volume(array=self.array, origin_mm=self.slice_origins_mm[0].copy(), spacing_mm=self.spacing_mm,
                      row_dir=self.row_dir, col_dir=self.col_dir, normal=self.normal, slice_positions_mm=along)

    def voxel_to_patient(self, kji: np.ndarray) -> np.ndarray:
        """(N, 3) fractional (k, j, i) → patient mm, interpolating the exact per-slice origins."""
        kji = np.atleast_2d(np.asarray(kji, dtype=np.float64))
        k = np.clip(kji[:, 0], 0, len(self.slice_origins_mm) - 1)
        k0 = np.floor(k).astype(int)
        k1 = np.minimum(k0 + 1, len(self.slice_origins_mm) - 1)
        t = (k - k0)[:, None]
        origin = (1 - t) * self.slice_origins_mm[k0] + t * self.slice_origins_mm[k1]
        extra = (kji[:, 0] - k)[:, None] * self.spacing_mm[0] * self.normal[None, :]  # outside the stack
        return (origin + extra + kji[:, 1:2] * self.spacing_mm[1] * self.col_dir[None, :]
                + kji[:, 2:3] * self.spacing_mm[2] * self.row_dir[None, :])

    def patient_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) patient mm → fractional (k, j, i) (slice index interpolated over exact positions)."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        along = self.slice_origins_mm @ self.normal
        s = xyz @ self.normal
        if len(along) > 1:
            k = np.interp(s, along, np.arange(len(along)))
            k = np.where(s < along[0], (s - along[0]) / self.spacing_mm[0], k)
            k = np.where(s > along[-1], len(along) - 1 + (s - along[-1]) / self.spacing_mm[0], k)
        else:
            k = (s - along[0]) / self.spacing_mm[0]
        origin = self.voxel_to_patient(np.c_[np.clip(k, 0, len(along) - 1), np.zeros((len(k), 2))])
        rel = xyz - origin
        return np.c_[k, rel @ self.col_dir / self.spacing_mm[1], rel @ self.row_dir / self.spacing_mm[2]]

    def label_to_voxel(self, instance_number: int, x: float, y: float) -> np.ndarray | None:
        """Kaggle label (instance, x = column, y = row in the stored image) → canonical (k, j, i)."""
        hits = np.flatnonzero(self.instance_numbers == int(instance_number))
        if hits.size == 0:
            return None
        k = int(hits[0])
        point = (self.orig_corner[k] + float(x) * self.spacing_mm[2] * self.orig_row_dir
                 + float(y) * self.spacing_mm[1] * self.orig_col_dir)
        rel = point - self.slice_origins_mm[k]
        return np.array([k, rel @ self.col_dir / self.spacing_mm[1], rel @ self.row_dir / self.spacing_mm[2]])

    # ------------------------------------------------------------------------------------------- I/O
    def save(self, path: Path) -> Path:
        """Write the stack as a compressed .npz (pixels as :func:`encode_pixels`), atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        planes, encoding, offset = encode_pixels(self.array)
        np.savez_compressed(tmp, array=planes, pixel_encoding=np.array(encoding),
                            pixel_offset=np.array(offset, dtype=np.float64), slice_origins_mm=self.slice_origins_mm,
                            row_dir=self.row_dir, col_dir=self.col_dir, normal=self.normal,
                            spacing_mm=np.asarray(self.spacing_mm), instance_numbers=self.instance_numbers,
                            orig_row_dir=self.orig_row_dir, orig_col_dir=self.orig_col_dir,
                            orig_corner=self.orig_corner, percentiles=self.percentiles,
                            meta=np.array([self.study_id, self.series_id, self.stack_index], dtype=np.int64),
                            keys=np.array([self.series_key, self.orientation]))
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Path) -> Stack:
        """A cached stack; a truncated or foreign file is an InputError naming it (rerun preprocess_rsna.py
        with preprocess.overwrite=true to decode it again)."""
        z = load_npz(path, required=STACK_ARRAYS)
        meta, keys = z["meta"], z["keys"]
        encoding = str(z["pixel_encoding"]) if "pixel_encoding" in z else "float32"
        array = decode_pixels(z["array"], encoding, float(z.get("pixel_offset", 0.0)), path)
        return cls(study_id=int(meta[0]), series_id=int(meta[1]), stack_index=int(meta[2]),
                   series_key=str(keys[0]), orientation=str(keys[1]), array=array,
                   slice_origins_mm=z["slice_origins_mm"], row_dir=z["row_dir"], col_dir=z["col_dir"],
                   normal=z["normal"], spacing_mm=tuple(float(v) for v in z["spacing_mm"]),
                   instance_numbers=z["instance_numbers"], orig_row_dir=z["orig_row_dir"],
                   orig_col_dir=z["orig_col_dir"], orig_corner=z["orig_corner"], percentiles=z["percentiles"])


def encode_pixels(array: np.ndarray) -> tuple[np.ndarray, str, float]:
    """Pixels → (planes, encoding, offset) for a compact cache file.

    Integer-valued pixels whose range fits 16 bits (MR: RescaleSlope 1, as in the competition data) are
    stored exactly as uint16 (value − offset, offset = min if negative else 0): encoding "u16". Anything
    else (a non-integer rescale) is stored as float16: encoding "f16", lossy by at most 2^-11 relative.
    Either way the 16-bit words are split into a high-byte and a low-byte plane, shape (2, K, J, I) uint8:
    zlib then compresses the mostly constant high bytes almost away (≈ 0.56 of the 16-bit size on the
    noisy synthetic 384-px series vs 0.72 without the split; real MR has darker, more compressible air).
    """
    array = np.asarray(array)
    finite = np.isfinite(array).all()
    lo, hi = (float(array.min()), float(array.max())) if array.size else (0.0, 0.0)
    if finite and np.array_equal(array, np.round(array)) and hi - min(lo, 0.0) <= 65535:
        offset = min(lo, 0.0)
        words, encoding = (array - offset).astype(np.uint16), "u16"
    elif not finite or max(abs(lo), abs(hi)) > 65504.0:  # beyond float16 (or NaN): keep float32
        return np.asarray(array, dtype=np.float32), "float32", 0.0
    else:
        offset = 0.0
        words, encoding = array.astype(np.float16).view(np.uint16), "f16"
    planes = np.stack([(words >> 8).astype(np.uint8), (words & 0xFF).astype(np.uint8)])
    return planes, encoding, offset


def decode_pixels(planes: np.ndarray, encoding: str, offset: float = 0.0, source: str | Path = "") -> np.ndarray:
    """Inverse of :func:`encode_pixels` → float32 (K, J, I); "float32" is the uncompressed format-1 cache."""
    if encoding == "float32":
        return np.asarray(planes, dtype=np.float32)
    if encoding not in ("u16", "f16") or planes.dtype != np.uint8 or planes.ndim != 4 or planes.shape[0] != 2:
        raise InputError(f"unknown pixel encoding {encoding!r} or planes {planes.dtype} {planes.shape}", source)
    words = (planes[0].astype(np.uint16) << 8) | planes[1]
    if encoding == "u16":
        return (words.astype(np.float32) + np.float32(offset)) if offset else words.astype(np.float32)
    return words.view(np.float16).astype(np.float32)


def classify_orientation(normal: np.ndarray) -> str:
    """sagittal / coronal / axial from the dominant patient axis of the slice normal."""
    return ("sagittal", "coronal", "axial")[int(np.argmax(np.abs(normal)))]


def canonicalize(array: np.ndarray, corners: np.ndarray, row_dir: np.ndarray, col_dir: np.ndarray,
                 normal: np.ndarray, spacing: tuple[float, float, float], instances: np.ndarray, kind: str):
    """Flip slice / row / column axes so they point along CANONICAL[kind]; geometry follows exactly.

    ``corners`` (K, 3) are the stored ImagePositionPatient (voxel (k, 0, 0)), sorted along ``normal``.
    Returns (array, slice_origins, row_dir, col_dir, normal, instances, corners_in_new_slice_order).
    """
    want = CANONICAL[kind]
    ds, dr, dc = spacing
    rows, cols = array.shape[1], array.shape[2]
    origins = corners.copy()
    orig_corners = corners.copy()
    if float(normal @ want["normal"]) < 0:
        array, origins, orig_corners = array[::-1], origins[::-1], orig_corners[::-1]
        instances = instances[::-1]
        normal = -normal
    if float(col_dir @ want["col_dir"]) < 0:
        array = array[:, ::-1]
        origins = origins + (rows - 1) * dr * col_dir[None, :]
        col_dir = -col_dir
    if float(row_dir @ want["row_dir"]) < 0:
        array = array[:, :, ::-1]
        origins = origins + (cols - 1) * dc * row_dir[None, :]
        row_dir = -row_dir
    return (np.ascontiguousarray(array), origins, row_dir, col_dir, normal, np.ascontiguousarray(instances),
            np.ascontiguousarray(orig_corners))


def load_series(folder: Path, study_id: int, series_id: int, series_key: str,
                percentiles: tuple[float, float] = (1.0, 99.5), logger=log.warning, gap_factor: float = 2.5,
                missing_geometry: str = "skip", counts: dict | None = None) -> list[Stack]:
    """Decode one series folder into canonical stacks (largest first).

    Files that are not DICOM, cannot be read or cannot be decoded are skipped with a log line naming the
    file; duplicate positions keep the first file. Stacks are split by orientation, image size and position
    continuity (a gap > ``gap_factor`` x the median gap starts a new stack); a slice without orientation or
    position is skipped or an error (``missing_geometry``), never guessed (:mod:`rsna_spine.stacks`).
    Instance numbers come from the header, else from the file name with a log line. ``counts`` (a dict)
    receives files, unreadable, skipped_geometry, gap_splits, instance_from_name. Raises DicomSeriesError
    when nothing usable remains.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSeriesError(f"{folder}: series folder not found")
    datasets, sources = [], []
    files = sorted(p for p in folder.iterdir() if p.is_file())
    for path in files:
        try:
            ds = pydicom.dcmread(str(path))
            if "PixelData" not in ds:
                raise DicomSeriesError(f"{path}: no PixelData element")
            if getattr(ds, "NumberOfFrames", 1) not in (None, "", 1, "1"):
                raise DicomSeriesError(f"{path}: multi-frame images are not supported")
            pixel_spacing(ds, path)
        except DicomSeriesError as exc:
            logger(f"skipping {exc}")
            continue
        except Exception as exc:  # InvalidDicomError, EOFError, OSError, ... from pydicom
            logger(f"skipping {path}: not a readable DICOM file ({type(exc).__name__}: {exc})")
            continue
        datasets.append(ds)
        sources.append(path)
    if not datasets:
        raise DicomSeriesError(f"{folder}: no readable DICOM image in this series")

    splits, split_counts = split_stacks(datasets, sources, gap_factor=gap_factor, missing=missing_geometry,
                                        logger=logger)
    named: list[str] = []
    numbers = [instance_number(ds, path, logger=named.append) for ds, path in zip(datasets, sources)]
    for line in named:
        logger(line)
    if counts is not None:
        counts.update({"files": len(files), "unreadable": len(files) - len(datasets),
                       "skipped_geometry": split_counts["skipped_geometry"], "gap_splits": split_counts["gap_splits"],
                       "instance_from_name": sum("taken from the file name" in m for m in named)})
    stacks = []
    for split in splits:
        members, member_paths = datasets, sources
        images, keep, kept_along = [], [], []
        for idx, pos in zip(split.indices, split.along_mm):
            if kept_along and abs(pos - kept_along[-1]) < 1e-3:
                logger(f"skipping {member_paths[idx]}: same position as the previous slice (duplicate)")
                continue
            try:
                images.append(pixel_data(members[idx], member_paths[idx]))
            except DicomSeriesError as exc:
                logger(f"skipping {exc}")
                continue
            keep.append(idx)
            kept_along.append(pos)
        if not images:
            continue
        ref = members[keep[0]]
        iop = orientation(ref)
        normal = slice_normal(iop)
        dr, dc = pixel_spacing(ref, member_paths[keep[0]])
        corners = []
        for n_i, idx in enumerate(keep):
            p = position(members[idx])
            corners.append(p if p is not None else normal * kept_along[n_i])
        corners = np.asarray(corners, dtype=np.float64)
        gaps = np.diff(np.asarray(kept_along))
        ds_mm = float(np.median(gaps)) if gaps.size else float(getattr(ref, "SliceThickness", 1.0) or 1.0)
        instances = np.array([numbers[i] for i in keep])
        kind = classify_orientation(normal)
        array = np.stack(images).astype(np.float32)
        arr, origins, row_dir, col_dir, normal_c, inst, orig_corner = canonicalize(
            array, corners, iop[0], iop[1], normal, (ds_mm, dr, dc), instances, kind)
        pct = np.percentile(arr, list(percentiles)).astype(np.float32)
        stacks.append(Stack(study_id=int(study_id), series_id=int(series_id), stack_index=len(stacks),
                            series_key=series_key, orientation=kind, array=arr, slice_origins_mm=origins,
                            row_dir=row_dir, col_dir=col_dir, normal=normal_c, spacing_mm=(abs(ds_mm), dr, dc),
                            instance_numbers=inst, orig_row_dir=iop[0], orig_col_dir=iop[1],
                            orig_corner=orig_corner, percentiles=pct))
    if not stacks:
        raise DicomSeriesError(f"{folder}: no decodable slice in this series")
    expected = ORIENTATION_OF_SERIES.get(series_key)
    if expected and stacks[0].orientation != expected:
        logger(f"{folder}: series described as {series_key} but its largest stack is {stacks[0].orientation}")
    return stacks


# -------------------------------------------------------------------------------------------- cache
def stack_path(cache_dir: Path, study_id: int, series_id: int, stack_index: int) -> Path:
    return Path(cache_dir) / "stacks" / str(study_id) / f"{series_id}_{stack_index}.npz"


class StackStore:
    """Cached stacks by (study, series, stack), loaded on first use and kept in memory up to a budget.

    ``max_mb``: the decoded arrays one process keeps (least recently used evicted first; a stack larger than
    the budget is still returned, just not kept). Each DataLoader worker holds its own store, so the memory of
    a training job is about (1 + workers) x max_mb. Picklable: the in-memory cache is not pickled.
    """

    def __init__(self, cache_dir: str | Path, index: pd.DataFrame | None = None, max_mb: float = 1024.0):
        self.cache_dir = Path(cache_dir)
        self.index = index if index is not None else read_stack_index(self.cache_dir)
        self.max_bytes = int(float(max_mb) * 2**20)
        self._cache: OrderedDict = OrderedDict()
        self._bytes = 0
        self.loads = 0  # files read (misses), for tests and benchmarks

    def __getstate__(self):
        state = dict(self.__dict__)
        state["_cache"], state["_bytes"] = OrderedDict(), 0
        return state

    @property
    def cached_mb(self) -> float:
        return self._bytes / 2**20

    def get(self, study_id: int, series_id: int, stack_index: int) -> Stack:
        key = (int(study_id), int(series_id), int(stack_index))
        stack = self._cache.get(key)
        if stack is not None:
            self._cache.move_to_end(key)
            return stack
        stack = Stack.load(stack_path(self.cache_dir, *key))
        self.loads += 1
        self.put(stack)
        return stack

    def put(self, stack: Stack) -> None:
        key = (stack.study_id, stack.series_id, stack.stack_index)
        if key in self._cache:
            self._bytes -= self._cache.pop(key).array.nbytes
        size = stack.array.nbytes
        if size > self.max_bytes:
            return
        while self._cache and self._bytes + size > self.max_bytes:
            _, old = self._cache.popitem(last=False)
            self._bytes -= old.array.nbytes
        self._cache[key] = stack
        self._bytes += size

    def stacks_of(self, study_id: int, series_key: str) -> list[Stack]:
        """All decoded stacks of a study's series of one type (largest stack of each series first)."""
        rows = self.index[(self.index["study_id"] == int(study_id)) & (self.index["series_key"] == series_key)
                          & (self.index["status"] == "ok")]
        return [self.get(r.study_id, r.series_id, r.stack_index) for r in rows.itertuples()]


def read_stack_index(cache_dir: Path) -> pd.DataFrame:
    path = Path(cache_dir) / "stack_index.csv"
    if not path.is_file():
        raise DataLayoutError(f"{path}: not found; run preprocess_rsna.py first (it decodes the DICOM series "
                              "into this cache)")
    return pd.read_csv(path)


def map_label_coordinates(coords: pd.DataFrame, store: StackStore, logger=log.warning,
                          drops: list | None = None) -> pd.DataFrame:
    """Label points → (series_id, stack_index, k, j, i) and patient mm. Every point that cannot be mapped is
    logged and, when ``drops`` is a list, appended to it as {study_id, series_id, instance_number, condition,
    level, reason} (reasons: series not listed / folder missing / unreadable, instance not in the decoded
    slices)."""
    rows = []
    for rec in coords.itertuples():
        found = None
        listed = store.index[(store.index["study_id"] == rec.study_id) & (store.index["series_id"] == rec.series_id)]
        index = listed[listed["status"] == "ok"]
        for entry in index.itertuples():
            stack = store.get(entry.study_id, entry.series_id, entry.stack_index)
            kji = stack.label_to_voxel(rec.instance_number, rec.x, rec.y)
            if kji is not None:
                found = (entry.stack_index, kji, stack.voxel_to_patient(kji)[0])
                break
        if found is None:
            if listed.empty:
                reason = "series not listed in the series descriptions (or of an unknown description)"
            elif index.empty:
                reason = f"series {listed['status'].iloc[0]} ({str(listed['message'].iloc[0])[:80]})"
            else:
                reason = "instance not among the decoded slices"
            logger(f"label of study {rec.study_id} ({rec.condition} {rec.level}): series {rec.series_id} "
                   f"instance {rec.instance_number}: {reason}; point dropped")
            if drops is not None:
                drops.append({"study_id": int(rec.study_id), "series_id": int(rec.series_id),
                              "instance_number": int(rec.instance_number), "condition": rec.condition,
                              "level": rec.level, "reason": reason})
            continue
        stack_index, kji, xyz = found
        rows.append({"study_id": int(rec.study_id), "condition": rec.condition, "level": rec.level,
                     "series_id": int(rec.series_id), "stack_index": int(stack_index),
                     "k": float(kji[0]), "j": float(kji[1]), "i": float(kji[2]),
                     "x_mm": float(xyz[0]), "y_mm": float(xyz[1]), "z_mm": float(xyz[2])})
    return pd.DataFrame(rows, columns=["study_id", "condition", "level", "series_id", "stack_index", "k", "j",
                                       "i", "x_mm", "y_mm", "z_mm"])


def decode_series_task(task: dict) -> dict:
    """Decode one series folder into cached stacks. Module-level: runs in spawned worker processes.

    Returns {"rows": [stack index rows], "messages": [log lines], "seconds": float}.
    """
    start = time.perf_counter()
    messages: list[str] = []
    base = {"split": task["split"], "study_id": int(task["study_id"]), "series_id": int(task["series_id"]),
            "series_key": task["series_key"]}
    folder = Path(task["folder"])
    if not folder.is_dir():
        messages.append(f"study {task['study_id']}: series {task['series_id']} ({task['series_key']}) has no "
                        f"folder {folder}; skipped")
        return {"rows": [{**base, "stack_index": -1, "status": "missing", "message": "folder not found"}],
                "messages": messages, "seconds": time.perf_counter() - start, "counts": {}}
    counts: dict = {}
    try:
        stacks = load_series(folder, task["study_id"], task["series_id"], task["series_key"],
                             tuple(task["percentiles"]), logger=messages.append,
                             gap_factor=float(task.get("gap_factor", 2.5)),
                             missing_geometry=task.get("missing_geometry", "skip"), counts=counts)
    except DicomSeriesError as exc:
        messages.append(f"study {task['study_id']}: series {task['series_id']} unusable: {exc}")
        return _done(task, {"rows": [{**base, "stack_index": -1, "status": "error", "message": str(exc)[:300]}],
                            "messages": messages, "seconds": time.perf_counter() - start, "counts": counts})
    rows = []
    for stack in stacks:
        stack.save(stack_path(task["cache_dir"], stack.study_id, stack.series_id, stack.stack_index))
        rows.append({**base, "stack_index": stack.stack_index, "status": "ok", "orientation": stack.orientation,
                     "n_slices": stack.shape[0], "rows": stack.shape[1], "cols": stack.shape[2], "message": ""})
    if len(stacks) > 1:
        messages.append(f"study {task['study_id']}: series {task['series_id']} holds {len(stacks)} stacks "
                        f"({', '.join(f'{s.orientation} {s.shape}' for s in stacks)})")
    return _done(task, {"rows": rows, "messages": messages, "seconds": time.perf_counter() - start, "counts": counts})


def done_marker(cache_dir: str | Path, study_id: int, series_id: int) -> Path:
    """The file that says a series is fully decoded (its stacks written): the unit of resumption."""
    return Path(cache_dir) / "stacks" / str(int(study_id)) / f"{int(series_id)}.done.json"


def _done(task: dict, result: dict) -> dict:
    """Write the series' done marker (stack index rows, log lines, counts) atomically, after its stacks."""
    marker = done_marker(task["cache_dir"], task["study_id"], task["series_id"])
    marker.parent.mkdir(parents=True, exist_ok=True)
    tmp = marker.with_name(marker.name + ".tmp")
    tmp.write_text(json.dumps({k: result[k] for k in ("rows", "messages", "counts")}, default=str), encoding="utf-8")
    tmp.replace(marker)
    return result


def cached_result(task: dict) -> dict | None:
    """The result of a series decoded by an earlier (possibly interrupted) run, or None: its done marker is
    readable and every stack it lists is on disk."""
    marker = done_marker(task["cache_dir"], task["study_id"], task["series_id"])
    try:
        result = json.loads(marker.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    for row in result.get("rows", []):
        if row.get("status") == "ok" and not stack_path(task["cache_dir"], row["study_id"], row["series_id"],
                                                        row["stack_index"]).is_file():
            return None
    return {**result, "seconds": 0.0, "cached": True}
