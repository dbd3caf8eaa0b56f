"""__domain__ data: a synthetic generator (the embedded default) and the reader of the preprocessed folder."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from common.files import load_npz


def synthetic_arrays(n: int, n_features: int, noise_std: float, seed: int) -> dict[str, np.ndarray]:
    """y = Σ_i w_i·sin(x_i) + ε, w fixed, x ~ U(−π, π)^d, ε ~ N(0, noise_std²) (replace with real physics)."""
    rng = np.random.default_rng(seed)
    weights = np.random.default_rng(12345).normal(size=n_features)
    x = rng.uniform(-math.pi, math.pi, size=(n, n_features)).astype(np.float32)
    y = (np.sin(x) @ weights + rng.normal(scale=noise_std, size=n)).astype(np.float32)[:, None]
    return {"x": x, "y": y}


def load_split(data_dir: str | Path | None, split: str, dcfg: dict, seed: int) -> dict[str, np.ndarray]:
    """``<data_dir>/<split>.npz`` (arrays x, y), or a synthetic split when no folder is configured."""
    if data_dir is None:
        n = dcfg["n_train"] if split == "train" else dcfg["n_val"]
        return synthetic_arrays(n, dcfg["n_features"], dcfg["noise_std"], seed + (0 if split == "train" else 10_000))
    return load_npz(Path(data_dir) / f"{split}.npz", required=("x", "y"))


class ArrayDataset(Dataset):
    """Module-level (picklable under spawn)."""

    def __init__(self, arrays: dict[str, np.ndarray]):
        self.x, self.y = arrays["x"], arrays["y"]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"input": torch.from_numpy(self.x[index]), "target": torch.from_numpy(self.y[index])}
