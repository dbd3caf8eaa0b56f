"""Generated-vs-real quality metrics for ABR waveforms (diffusion generator).

A generator is judged on recordings whose conditions (age, intensity, rate, class) match real held-out
recordings one to one. Each metric is also computed between two disjoint halves of the REAL recordings
("real vs real"), the value a perfect generator would reach at this sample size:

- rms_wasserstein_uv: 1-Wasserstein distance between the per-trace RMS amplitude distributions (µV);
- psd_log_distance_db: mean |10·log10(PSD_gen / PSD_real)| over 100-2500 Hz of the mean periodograms;
- condition_mean_r: Pearson r between the mean generated and mean real trace per intensity (weighted);
- wave_v_latency_shift_ms: mean |median generated − median real| wave V latency per intensity, picked
  by the classical peak search on both (a feature-level comparison, like FID uses features);
- nearest_train_r: mean over generated traces of the highest correlation with any TRAINING trace (a
  value far above real-vs-train indicates memorization).
"""

from __future__ import annotations

import numpy as np
from scipy.stats import wasserstein_distance

from abr.classical import pick_wave_v
from abr.evaluation import rowwise_pearson


def _psd(x: np.ndarray) -> np.ndarray:
    x = x - x.mean(axis=1, keepdims=True)
    return np.mean(np.abs(np.fft.rfft(x * np.hanning(x.shape[1]), axis=1)) ** 2, axis=0)


def _mean_trace_r(a: np.ndarray, b: np.ndarray, levels: np.ndarray) -> float:
    values, weights = [], []
    for level in np.unique(levels):
        sel = levels == level
        r = rowwise_pearson(a[sel].mean(0, keepdims=True), b[sel].mean(0, keepdims=True))[0]
        if np.isfinite(r):
            values.append(r)
            weights.append(sel.sum())
    return float(np.average(values, weights=weights)) if values else float("nan")


def _latency_shift(a: np.ndarray, b: np.ndarray, levels: np.ndarray, t_ms: np.ndarray, cfg: dict) -> float:
    shifts = []
    for level in np.unique(levels):
        sel = np.flatnonzero(levels == level)
        la = [pick_wave_v(x, t_ms, level, cfg["v_window_80db_ms"], cfg["v_window_slope_ms_per_10db"])[0] for x in a[sel]]
        lb = [pick_wave_v(x, t_ms, level, cfg["v_window_80db_ms"], cfg["v_window_slope_ms_per_10db"])[0] for x in b[sel]]
        shifts.append(abs(np.nanmedian(la) - np.nanmedian(lb)))
    return float(np.nanmean(shifts)) if shifts else float("nan")


def nearest_correlation(x: np.ndarray, reference: np.ndarray, chunk: int = 256) -> np.ndarray:
    """For each row of ``x`` the highest Pearson r with any row of ``reference``."""
    def unit(m):
        m = m - m.mean(axis=1, keepdims=True)
        return m / np.maximum(np.linalg.norm(m, axis=1, keepdims=True), 1e-12)
    ref = unit(reference)
    out = []
    for start in range(0, x.shape[0], chunk):
        out.append((unit(x[start:start + chunk]) @ ref.T).max(axis=1))
    return np.concatenate(out) if out else np.zeros(0)


def pair_metrics(a: np.ndarray, b: np.ndarray, levels: np.ndarray, t_ms: np.ndarray, sampling_rate_hz: float,
                 classical_cfg: dict) -> dict:
    """Metrics between two sets of traces (µV) with the same conditions row by row."""
    freqs = np.fft.rfftfreq(a.shape[1], d=1.0 / sampling_rate_hz)
    band = (freqs >= 100) & (freqs <= min(2500.0, sampling_rate_hz / 2))
    psd_a, psd_b = _psd(a)[band], _psd(b)[band]
    return {
        "rms_wasserstein_uv": float(wasserstein_distance(np.sqrt((a**2).mean(1)), np.sqrt((b**2).mean(1)))),
        "psd_log_distance_db": float(np.mean(np.abs(10 * np.log10(np.maximum(psd_a, 1e-20) / np.maximum(psd_b, 1e-20))))),
        "condition_mean_r": _mean_trace_r(a, b, levels),
        "wave_v_latency_shift_ms": _latency_shift(a, b, levels, t_ms, classical_cfg),
    }


def quality_report(generated: np.ndarray, real: np.ndarray, levels: np.ndarray, train_real: np.ndarray,
                   t_ms: np.ndarray, sampling_rate_hz: float, classical_cfg: dict, seed: int = 0) -> dict:
    """Generated vs matched real recordings, and real vs real (two halves) as the reference floor."""
    gen = pair_metrics(generated, real, levels, t_ms, sampling_rate_hz, classical_cfg)
    gen["nearest_train_r"] = float(np.mean(nearest_correlation(generated, train_real)))
    rng = np.random.default_rng(seed)
    order = rng.permutation(real.shape[0])
    half = order.size // 2
    a_idx, b_idx = order[:half], order[half:2 * half]
    # pair the halves level by level so both sides hold the same intensities
    a_idx, b_idx = _match_levels(levels, a_idx, b_idx)
    ref = pair_metrics(real[a_idx], real[b_idx], levels[a_idx], t_ms, sampling_rate_hz, classical_cfg) \
        if a_idx.size >= 4 else {}
    if ref:
        ref["nearest_train_r"] = float(np.mean(nearest_correlation(real, train_real)))
    return {"generated_vs_real": gen, "real_vs_real": ref, "n": int(generated.shape[0])}


def _match_levels(levels: np.ndarray, a_idx: np.ndarray, b_idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    out_a, out_b = [], []
    for level in np.unique(levels):
        la = a_idx[levels[a_idx] == level]
        lb = b_idx[levels[b_idx] == level]
        n = min(la.size, lb.size)
        out_a.append(la[:n])
        out_b.append(lb[:n])
    return np.concatenate(out_a), np.concatenate(out_b)
