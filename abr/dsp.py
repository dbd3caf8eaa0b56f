"""Signal processing shared by the generator, preprocessing and the classical baseline.

Band-pass filtering as ABR systems do it (Butterworth, 100/300-3000 Hz), rational resampling to the
model grid, the time axis, per-recording normalization, and sub-sample peak interpolation.
"""

from __future__ import annotations

from fractions import Fraction
from functools import lru_cache

import numpy as np
from scipy import signal as sps


def time_axis_ms(n_samples: int, sampling_rate_hz: float, pre_stimulus_ms: float = 0.0) -> np.ndarray:
    """Sample times in ms relative to stimulus onset: t_k = 1000·k / fs − pre_stimulus_ms."""
    return np.arange(int(n_samples), dtype=np.float64) * 1000.0 / float(sampling_rate_hz) - float(pre_stimulus_ms)


def bandpass(x: np.ndarray, sampling_rate_hz: float, low_hz: float | None, high_hz: float | None,
             order: int = 2, zero_phase: bool = True) -> np.ndarray:
    """Butterworth band-pass along the last axis (second-order sections).

    ``zero_phase`` uses forward-backward filtering (no latency shift, as offline analysis tools do);
    otherwise a causal filter (as a recording amplifier does, which delays peaks slightly).
    ``low_hz`` or ``high_hz`` None gives a high-pass or low-pass only; both None returns ``x``.
    """
    x = np.asarray(x, dtype=np.float64)
    nyquist = float(sampling_rate_hz) / 2.0
    if low_hz is None and high_hz is None:
        return x.copy()
    if high_hz is not None and high_hz >= nyquist:
        raise ValueError(f"filter upper edge {high_hz} Hz must be below the Nyquist frequency {nyquist} Hz "
                         f"(sampling rate {sampling_rate_hz} Hz)")
    sos = _butter_sos(int(order), None if low_hz is None else float(low_hz) / nyquist,
                      None if high_hz is None else float(high_hz) / nyquist)
    if zero_phase:
        return sps.sosfiltfilt(sos, x, axis=-1)
    return sps.sosfilt(sos, x, axis=-1)


@lru_cache(maxsize=32)
def _butter_sos(order: int, low: float | None, high: float | None) -> np.ndarray:
    if low is not None and high is not None:
        return sps.butter(order, [low, high], btype="bandpass", output="sos")
    if low is not None:
        return sps.butter(order, low, btype="highpass", output="sos")
    return sps.butter(order, high, btype="lowpass", output="sos")


def resample(x: np.ndarray, rate_in_hz: float, rate_out_hz: float, n_out: int | None = None) -> np.ndarray:
    """Polyphase resampling (anti-aliased) along the last axis, cropped or edge-padded to ``n_out``."""
    x = np.asarray(x, dtype=np.float64)
    ratio = Fraction(float(rate_out_hz) / float(rate_in_hz)).limit_denominator(1000)
    if ratio == 1:
        out = x.copy()
    else:
        out = sps.resample_poly(x, ratio.numerator, ratio.denominator, axis=-1)
    if n_out is not None:
        if out.shape[-1] >= n_out:
            out = out[..., :n_out]
        else:
            pad = [(0, 0)] * (out.ndim - 1) + [(0, n_out - out.shape[-1])]
            out = np.pad(out, pad, mode="edge")
    return out


def normalize_recordings(x: np.ndarray, floor_uv: float = 1e-3) -> tuple[np.ndarray, np.ndarray]:
    """Divide each recording (last axis) by its RMS about zero; returns (normalized, scale_uv).

    The scale is kept as an input feature so absolute amplitude (µV, clinically meaningful) is not lost.
    """
    x = np.asarray(x, dtype=np.float64)
    scale = np.sqrt(np.mean(x**2, axis=-1))
    scale = np.maximum(scale, floor_uv)
    return x / scale[..., None], scale


def parabolic_peak(y: np.ndarray, index: int) -> tuple[float, float]:
    """Sub-sample position and height of the extremum at ``index`` from the parabola through its
    neighbours (standard three-point interpolation). Returns (fractional index, interpolated value)."""
    y = np.asarray(y, dtype=np.float64)
    if index <= 0 or index >= y.size - 1:
        return float(index), float(y[index])
    a, b, c = y[index - 1], y[index], y[index + 1]
    denom = a - 2 * b + c
    if denom == 0:
        return float(index), float(b)
    offset = 0.5 * (a - c) / denom
    offset = float(np.clip(offset, -0.5, 0.5))
    return index + offset, float(b - 0.25 * (a - c) * offset)


def local_maxima(y: np.ndarray) -> np.ndarray:
    """Indices i with y[i−1] < y[i] ≥ y[i+1] (plateaus count once)."""
    y = np.asarray(y)
    if y.size < 3:
        return np.zeros(0, dtype=int)
    return np.flatnonzero((y[1:-1] > y[:-2]) & (y[1:-1] >= y[2:])) + 1
