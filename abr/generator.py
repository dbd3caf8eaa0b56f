"""Pieces of the conditional ABR generator shared by training (train_diffusion_abr.py) and sampling
(generate_abr.py): the per-recording dataset, the conditioning features and guided DDIM sampling.

Waveforms are modelled in µV divided by ``data_scale_uv`` (the 99.9th percentile of |x| over training
recordings) so they lie in about [-1, 1], as diffusion needs (common/diffusion.py).
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import Dataset

from abr.dataset import static_raw
from common.config import ConfigError
from common.diffusion import GaussianDiffusion, guided

N_COND_STATIC = 3  # log age, intensity, rate (the recording RMS is an outcome, not a condition)


def condition_features(age_years, intensity_db, rate_per_s, meta: dict) -> np.ndarray:
    """Standardized [log(1 + age months), level/100, rate/50] with the training statistics in ``meta``."""
    raw = static_raw(age_years, intensity_db, rate_per_s, np.ones(np.shape(age_years)))[:, :N_COND_STATIC]
    mean = np.asarray(meta["static_mean"][:N_COND_STATIC])
    std = np.asarray(meta["static_std"][:N_COND_STATIC])
    raw = np.where(np.isfinite(raw), raw, mean)  # unknown age / rate: the training mean
    return ((raw - mean) / std).astype(np.float32)


def target_uv(arrays: dict, rows: np.ndarray, target: str) -> np.ndarray:
    """The waveforms the generator learns, in µV: the recordings, or (synthetic data) the clean traces."""
    if target == "recorded":
        return arrays["signal"][rows].astype(np.float64) * arrays["scale_uv"][rows, None]
    if target == "clean":
        if not arrays["has_clean"][rows].all():
            raise ConfigError("diffusion.target=clean needs clean traces (synthetic data only); use recorded")
        return arrays["clean"][rows].astype(np.float64) * arrays["scale_uv"][rows, None]
    raise ConfigError(f"diffusion.target must be recorded or clean, got {target!r}")


class RecordingDataset(Dataset):
    """Items: x (1, T) scaled waveform, cond (3,) standardized conditions, class_idx ()."""

    def __init__(self, waveforms_scaled: np.ndarray, conditions: np.ndarray, class_idx: np.ndarray):
        self.x = torch.as_tensor(waveforms_scaled, dtype=torch.float32)[:, None]
        self.cond = torch.as_tensor(conditions, dtype=torch.float32)
        self.cls = torch.as_tensor(class_idx, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def __getitem__(self, index: int) -> dict:
        return {"x": self.x[index], "cond": self.cond[index], "class_idx": self.cls[index]}


def make_process(dcfg: dict) -> GaussianDiffusion:
    return GaussianDiffusion(int(dcfg["num_steps"]), dcfg["schedule"], dcfg["prediction"])


@torch.no_grad()
def sample_waveforms(model: torch.nn.Module, process: GaussianDiffusion, conditions: np.ndarray,
                     class_idx: np.ndarray, steps: int, guidance_scale: float, clip: float, device,
                     seed: int = 0, batch_size: int = 256) -> np.ndarray:
    """DDIM samples (scaled units) for each row of ``conditions`` / ``class_idx``, classifier-free guided."""
    model.eval()
    n_samples = int(model.n_samples)
    out = []
    generator = torch.Generator().manual_seed(int(seed))
    for start in range(0, len(class_idx), batch_size):
        cond = torch.as_tensor(conditions[start:start + batch_size], dtype=torch.float32, device=device)
        cls = torch.as_tensor(class_idx[start:start + batch_size], dtype=torch.long, device=device)
        fn = guided(lambda x, t, c: model(x, t, c[0], c[1]), (cond, cls), (cond, torch.full_like(cls, -1)),
                    float(guidance_scale))
        x = process.ddim_sample(fn, (cls.shape[0], 1, n_samples), num_sampling_steps=steps,
                                clip_x0=(-clip, clip), device=device, generator=generator)
        out.append(x[:, 0].float().cpu().numpy())
    return np.concatenate(out) if out else np.zeros((0, n_samples), dtype=np.float32)
