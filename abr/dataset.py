"""The preprocessed cache (written by preprocess_abr.py) and the PyTorch dataset over intensity series.

Cache = ``abr_cache.npz`` (plain arrays, no pickles) + ``meta.json`` (grid, class names, feature
statistics, label ranges). One dataset item is one EAR: all its recordings sorted by intensity, padded
to the longest series, so per-recording heads (peaks, denoising) and series heads (threshold, class)
train together. Dataset, sampler and collate live at module level (picklable under spawn).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from common.config import ConfigError
from common.errors import InputError
from common.files import load_npz

CACHE_NAME = "abr_cache.npz"
META_NAME = "meta.json"
SPLITS = ("train", "val", "test")
# Model inputs besides the waveform (FMP is deliberately absent: it encodes the wave-present label).
# Age and rate may be unknown: their value is then the training mean (0 after standardization) and the
# *_known flag is 0, so the model is conditioned on "unknown" rather than on a guess.
STATIC_FEATURES = ("log_age_months", "intensity_01", "rate_per_50s", "log10_scale_uv", "age_known", "rate_known")


def static_raw(age_years, intensity_db, rate_per_s, scale_uv, features=STATIC_FEATURES) -> np.ndarray:
    """Unstandardized static features (N, F) named by ``features`` (a checkpoint's own list, so models
    trained before the *_known flags keep their 4): log(1 + age in months), level/100, rate/50,
    log10 RMS µV, age known, rate known. Unknown age / rate are NaN (see :func:`standardize_static`)."""
    age = np.asarray(age_years, dtype=np.float64)
    rate = np.asarray(rate_per_s, dtype=np.float64)
    columns = {"log_age_months": np.log1p(12.0 * age), "intensity_01": np.asarray(intensity_db, np.float64) / 100.0,
               "rate_per_50s": rate / 50.0, "log10_scale_uv": np.log10(np.asarray(scale_uv, dtype=np.float64)),
               "age_known": np.isfinite(age).astype(np.float64), "rate_known": np.isfinite(rate).astype(np.float64)}
    return np.stack([columns[name] for name in features], axis=-1)


def standardize_static(raw: np.ndarray, meta: dict) -> np.ndarray:
    """(raw − mean) / std with the training statistics; unknown (NaN) values become the mean (0)."""
    mean = np.asarray(meta["static_mean"], dtype=np.float64)
    std = np.asarray(meta["static_std"], dtype=np.float64)
    raw = np.where(np.isfinite(raw), raw, mean)
    return ((raw - mean) / std).astype(np.float32)


# Arrays every reader of the cache indexes (written by preprocess_abr.build_cache).
CACHE_ARRAYS = ("signal", "clean", "has_clean", "scale_uv", "static_raw", "intensity_db", "exist", "exist_known",
                "latency_ms", "amp_rel", "class_idx", "series_of_row", "series_rows", "series_class",
                "series_threshold_db", "series_split")


class CacheError(InputError):
    """A preprocessed cache folder that cannot be used (missing, damaged, or not what the model needs)."""


def cache_folder(cfg: dict, config_name: str) -> Path:
    """The preprocessed cache folder: data.cache_dir (set by ``--data DIR``) or data/abr/<config name>."""
    return Path(cfg["data"]["cache_dir"]) if cfg["data"].get("cache_dir") else Path("data") / "abr" / config_name


def training_cache_folder(run) -> Path:
    """The cache a trainer reads: ``--data DIR``; on ``--resume`` without it, the folder the run was trained
    on (recorded in its checkpoint's config); else data/abr/<config name>. Recorded in ``run.cfg``."""
    if not run.cfg["data"].get("cache_dir") and run.resume_from is not None:
        from common.checkpoint import load_checkpoint

        saved = ((load_checkpoint(run.resume_from, expected_domain="abr").get("config") or {}).get("data") or {})
        if saved.get("cache_dir"):
            run.cfg["data"]["cache_dir"] = saved["cache_dir"]
    folder = cache_folder(run.cfg, run.config_name)
    run.cfg["data"]["cache_dir"] = folder.as_posix()
    return folder


def load_cache(folder: str | Path) -> tuple[dict, dict]:
    """(arrays, meta) from a preprocessing output folder; one-line errors naming the file when it is not one."""
    folder = Path(folder)
    cache, meta_path = folder / CACHE_NAME, folder / META_NAME
    if not cache.is_file() or not meta_path.is_file():
        raise CacheError(f"no {CACHE_NAME} + {META_NAME}; run abr/preprocess_abr.py first "
                         "(python -m abr.preprocess_abr --output-dir <folder>)", folder)
    arrays = load_npz(cache, required=CACHE_ARRAYS)
    try:
        meta = json.loads(meta_path.read_text(encoding="utf-8"))
    except ValueError as exc:
        raise CacheError(f"not valid JSON, truncated? ({exc})", meta_path) from exc
    return arrays, meta


def split_series(arrays: dict, split: str) -> np.ndarray:
    """Indices of the ears of ``split`` (train, val, test, or all: every ear of the cache)."""
    if split == "all":
        return np.arange(arrays["series_split"].size)
    if split not in SPLITS:
        raise ConfigError(f"split must be one of {SPLITS + ('all',)}, got {split!r}")
    return np.flatnonzero(arrays["series_split"] == SPLITS.index(split))


class ABRSeriesDataset(Dataset):
    """Items are ears. Keys (L = longest series, T = samples, W = 3 waves):

    signal (L, T) normalized recording · clean (L, T) normalized noise-free trace · has_clean (L,)
    static (L, 4) standardized · intensity_db (L,) · level_mask (L,) · exist (L, W) · exist_known (L, W)
    latency_ms (L, W) · amp_rel (L, W) · amp_known (L, W) · class_idx () (−100 unknown)
    threshold_db () · threshold_known () · series ()
    """

    def __init__(self, arrays: dict, meta: dict, series: np.ndarray):
        self.a = arrays
        self.meta = meta
        self.series = np.asarray(series, dtype=np.int64)
        self.static = standardize_static(arrays["static_raw"], meta)

    def __len__(self) -> int:
        return int(self.series.size)

    def recording_indices(self, item: int) -> np.ndarray:
        rows = self.a["series_rows"][self.series[item]]
        return rows[rows >= 0]

    def __getitem__(self, item: int) -> dict:
        s = int(self.series[item])
        rows = self.a["series_rows"][s]
        valid = rows >= 0
        idx = np.where(valid, rows, 0)
        mask = torch.from_numpy(valid)
        a = self.a

        def take(name, dtype=torch.float32):
            out = torch.as_tensor(a[name][idx]).to(dtype)
            out[~mask] = 0
            return out

        latency = np.nan_to_num(a["latency_ms"][idx], nan=0.0)
        amp_rel = a["amp_rel"][idx]
        return {
            "signal": take("signal"),
            "clean": take("clean"),
            "has_clean": take("has_clean", torch.bool),
            "static": torch.from_numpy(np.where(valid[:, None], self.static[idx], 0.0).astype(np.float32)),
            "intensity_db": take("intensity_db"),
            "level_mask": mask,
            "exist": take("exist", torch.bool),
            "exist_known": take("exist_known", torch.bool),
            "latency_ms": torch.from_numpy(np.where(valid[:, None], latency, 0.0).astype(np.float32)),
            "amp_rel": torch.from_numpy(np.where(valid[:, None] & np.isfinite(amp_rel), amp_rel, 0.0).astype(np.float32)),
            "amp_known": torch.from_numpy(valid[:, None] & np.isfinite(amp_rel) & a["exist"][idx]),
            "class_idx": torch.tensor(int(a["series_class"][s]), dtype=torch.long),
            "threshold_db": torch.tensor(float(np.nan_to_num(a["series_threshold_db"][s], nan=0.0))),
            "threshold_known": torch.tensor(bool(np.isfinite(a["series_threshold_db"][s]))),
            "series": torch.tensor(s, dtype=torch.long),
        }


def class_frequencies(arrays: dict, series: np.ndarray, n_classes: int) -> np.ndarray:
    labels = arrays["series_class"][series]
    labels = labels[labels >= 0]
    return np.bincount(labels, minlength=n_classes).astype(np.float64)


def class_weights(freq: np.ndarray, mode: str) -> np.ndarray:
    """Per-class loss weights from training frequencies, normalized to mean 1 over present classes.

    inverse: 1/n_c; inverse_sqrt: 1/√n_c (milder, more stable with very rare classes); none: ones.
    Classes absent from training get weight 0 (they cannot be learned from these data).
    """
    present = freq > 0
    if mode == "none":
        w = present.astype(np.float64)
    elif mode == "inverse":
        w = np.where(present, 1.0 / np.maximum(freq, 1), 0.0)
    elif mode == "inverse_sqrt":
        w = np.where(present, 1.0 / np.sqrt(np.maximum(freq, 1)), 0.0)
    else:
        raise ConfigError(f"loss.class_weighting must be none, inverse or inverse_sqrt, got {mode!r}")
    return w / w[present].mean() if present.any() else w


class BalancedDistributedSampler(Sampler):
    """Class-balanced sampling with replacement that is also DDP- and resume-exact.

    Each epoch draws ``len(dataset)`` (rounded to the world size) items with probability ∝ 1/frequency
    of their class, from a generator seeded by (seed, epoch), then keeps this rank's share.
    """

    def __init__(self, labels: np.ndarray, num_replicas: int = 1, rank: int = 0, seed: int = 0):
        labels = np.asarray(labels)
        freq = np.bincount(labels[labels >= 0], minlength=int(labels.max()) + 1 if labels.size else 1)
        weight = np.where(labels >= 0, 1.0 / np.maximum(freq[np.clip(labels, 0, None)], 1), 0.0)
        self.prob = weight / weight.sum()
        self.num_replicas, self.rank, self.seed, self.epoch = num_replicas, rank, seed, 0
        self.num_samples = math.ceil(labels.size / num_replicas)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        rng = np.random.default_rng([self.seed, self.epoch])
        draws = rng.choice(self.prob.size, size=self.num_samples * self.num_replicas, p=self.prob)
        return iter(draws[self.rank::self.num_replicas].tolist())

    def __len__(self) -> int:
        return self.num_samples
