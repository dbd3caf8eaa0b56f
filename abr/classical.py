"""Classical ABR analysis, the baseline the network must beat.

Threshold: a response at a level is accepted when its waveform correlates with the next-higher level's
waveform (maximum normalized cross-correlation within ±``max_lag_ms``, inside the analysis window) at or
above a criterion — the visual "repeatability across levels" rule, in the spirit of ABRpresto's
correlation of sub-averages (Shaheen et al. 2024). Going down from the top level, the threshold is the
lowest level of the unbroken run of accepted levels; the estimate is placed half-way into the gap to the
next lower level tested (the true threshold lies in that gap). The estimate never leaves the tested range:
when every level responds it is the lowest level tested, censored "<=" (the threshold is at or below it, how
far is not measured); when none responds it is "no response", censored ">" the highest level tested, with
the censor value as its number (the label convention for "NR" ears). The criterion is chosen on the
validation split, never on the test split.

Wave V: the largest local maximum inside an intensity-dependent latency window (clinical rule of thumb:
window at 80 dB nHL moved later by ~0.45 ms per 10 dB below), interpolated between samples. The search
assumes vertex-positive up. ``classical.wave_v_polarity: auto`` (implied by ``data.signal_polarity: unknown``)
chooses the sign per ear instead (:func:`wave_v_sign`): wave V is followed by the fall to the slow negativity
SN10 (Davis & Hirsh 1979, Audiology 18:445-461), taken here to be the steepest slope around wave V (an
assumption; the synthetic generator draws that trough too), so in the sign where the steepest fall inside the
wave V window (plus 1 ms) is steeper than the steepest rise, wave V points up. On an inverted ear the search without it picks the maximum of the inverted
trace, the SN10 trough (about 1 ms late). The thresholds do not depend on the sign (correlations between
levels are unchanged when every level is inverted).
"""

from __future__ import annotations

import numpy as np

from abr.dsp import local_maxima, parabolic_peak
from common.config import ConfigError


def max_normalized_xcorr(a: np.ndarray, b: np.ndarray, max_lag: int) -> float:
    """max over lags |k| ≤ max_lag of the Pearson correlation between a[t] and b[t + k] (overlap only)."""
    best = -1.0
    n = a.size
    for lag in range(-max_lag, max_lag + 1):
        x = a[max(0, -lag):n - max(0, lag)]
        y = b[max(0, lag):n - max(0, -lag)]
        if x.size < 3:
            continue
        x, y = x - x.mean(), y - y.mean()
        denom = np.sqrt((x * x).sum() * (y * y).sum())
        if denom > 0:
            best = max(best, float((x * y).sum() / denom))
    return best


def series_correlations(signals_uv: np.ndarray, t_ms: np.ndarray, window_ms, max_lag_ms: float) -> np.ndarray:
    """Per level (rows sorted by ascending intensity): correlation with the next-higher level; the top
    level is compared with the level below it (it has no higher neighbour)."""
    sel = (t_ms >= window_ms[0]) & (t_ms <= window_ms[1])
    dt = float(t_ms[1] - t_ms[0])
    lag = int(round(max_lag_ms / dt))
    n = signals_uv.shape[0]
    out = np.full(n, -1.0)
    for i in range(n):
        j = i + 1 if i + 1 < n else i - 1
        if j >= 0:
            out[i] = max_normalized_xcorr(signals_uv[i, sel], signals_uv[j, sel], lag)
    return out


CENSOR_BELOW = "<="  # every level responded: threshold at or below the lowest level tested
CENSOR_ABOVE = ">"  # no level responded: threshold above the highest level tested


def threshold_censoring(accepted: np.ndarray) -> str:
    """"<=" when every level responded, ">" when none did, "" when the threshold lies inside the tested range."""
    accepted = np.asarray(accepted, dtype=bool)
    if accepted.size and accepted.all():
        return CENSOR_BELOW
    if not accepted.any():
        return CENSOR_ABOVE
    return ""


def threshold_from_correlations(corr: np.ndarray, intensity_db: np.ndarray, criterion: float, censor_db: float,
                                step_db: float) -> tuple[float, np.ndarray]:
    """(threshold estimate in dB, accepted-response flag per level) from one ear's correlations.

    Inside the tested range: half-way into the gap below the lowest accepted level. Every level accepted:
    the lowest level tested (never below it; :func:`threshold_censoring` gives "<="). None accepted:
    ``censor_db`` (">" the highest level tested). ``step_db`` is kept for the signature's sake."""
    n = corr.size
    accepted = np.zeros(n, dtype=bool)
    for i in range(n - 1, -1, -1):
        if corr[i] < criterion:
            break
        accepted[i] = True
    if not accepted.any():
        return float(censor_db), accepted
    k = int(np.flatnonzero(accepted)[0])
    if k == 0:
        return float(intensity_db[0]), accepted
    gap = intensity_db[k] - intensity_db[k - 1]
    return float(intensity_db[k] - 0.5 * gap), accepted


def fit_criterion(correlations: list, intensities: list, truths: np.ndarray, grid, censor_db: float,
                  step_db: float) -> float:
    """The grid criterion with the largest share of ears within ±10 dB (ties: smaller MAE)."""
    best, best_key = float(grid[0]), None
    for criterion in grid:
        est = np.array([threshold_from_correlations(c, i, criterion, censor_db, step_db)[0]
                        for c, i in zip(correlations, intensities)])
        err = np.abs(est - truths)
        key = (float(np.mean(err <= 10.0)), -float(np.mean(err)))
        if best_key is None or key > best_key:
            best, best_key = float(criterion), key
    return best


def wave_v_window_ms(intensity_db: float, window_80db_ms, slope_ms_per_10db: float) -> tuple[float, float]:
    """The wave V search window (ms) at ``intensity_db``: the 80 dB window moved later below 80 dB."""
    shift = slope_ms_per_10db * max(0.0, 80.0 - float(intensity_db)) / 10.0
    return window_80db_ms[0] + shift, window_80db_ms[1] + shift


def pick_wave_v(signal_uv: np.ndarray, t_ms: np.ndarray, intensity_db: float, window_80db_ms,
                slope_ms_per_10db: float) -> tuple[float, float]:
    """(latency ms, baseline-to-peak amplitude µV) of wave V by peak search in the latency window."""
    lo, hi = wave_v_window_ms(intensity_db, window_80db_ms, slope_ms_per_10db)
    sel = np.flatnonzero((t_ms >= lo) & (t_ms <= hi))
    if sel.size == 0:
        return float("nan"), float("nan")
    maxima = [i for i in local_maxima(signal_uv) if sel[0] <= i <= sel[-1]]
    index = max(maxima, key=lambda i: signal_uv[i]) if maxima else int(sel[np.argmax(signal_uv[sel])])
    position, value = parabolic_peak(signal_uv, index)
    dt = float(t_ms[1] - t_ms[0])
    return float(t_ms[0] + position * dt), value


def wave_v_sign(signals_uv: np.ndarray, intensity_db: np.ndarray, t_ms: np.ndarray, accepted: np.ndarray,
                cfg: dict) -> float:
    """+1 when the ear shows wave V up as given, −1 when it is inverted (see the module docstring).

    Summed over the levels with a response (``accepted``; none: the three highest levels): the steepest fall
    minus the steepest rise (µV/ms) from the start of the wave V window to 1 ms after its end; a sum below
    zero means the steep fall after wave V appears as a rise, the trace is inverted. Ties give +1."""
    use = np.asarray(accepted, dtype=bool)
    if not use.any():
        use = intensity_db >= np.sort(intensity_db)[-min(3, intensity_db.size)]
    dt = float(t_ms[1] - t_ms[0])
    score = 0.0
    for x, level in zip(signals_uv[use], intensity_db[use]):
        lo, hi = wave_v_window_ms(level, cfg["v_window_80db_ms"], cfg["v_window_slope_ms_per_10db"])
        slope = np.diff(x[(t_ms >= lo) & (t_ms <= hi + 1.0)]) / dt
        if slope.size:
            score += float(-slope.min() - slope.max())
    return -1.0 if score < 0 else 1.0


WAVE_V_POLARITIES = ("declared", "auto")


def wave_v_polarity(classical_cfg: dict, signal_polarity: str | None) -> str:
    """The wave V search's polarity: ``auto`` when the recordings' display sign is unknown
    (``data.signal_polarity: unknown``), else ``classical.wave_v_polarity``."""
    return "auto" if signal_polarity == "unknown" else classical_cfg.get("wave_v_polarity", "declared")


def analyse_series(signals_uv: np.ndarray, intensity_db: np.ndarray, t_ms: np.ndarray, cfg: dict,
                   criterion: float, censor_db: float, step_db: float, polarity: str | None = None) -> dict:
    """Classical analysis of one ear: threshold (with its censoring "<=", ">" or ""), per-level response flag
    and correlation, wave V picks. ``polarity`` (default ``cfg["wave_v_polarity"]``): ``declared`` searches
    wave V as the traces are given (vertex-positive up), ``auto`` in the sign :func:`wave_v_sign` finds;
    ``wave_v_sign`` is returned (−1: picked on the inverted traces; amplitudes are then of the inverted
    trace, i.e. vertex-positive)."""
    polarity = polarity or cfg.get("wave_v_polarity", "declared")
    if polarity not in WAVE_V_POLARITIES:
        raise ConfigError(f"classical.wave_v_polarity must be one of {WAVE_V_POLARITIES}, got {polarity!r}")
    corr = series_correlations(signals_uv, t_ms, cfg["window_ms"], cfg["max_lag_ms"])
    threshold, accepted = threshold_from_correlations(corr, intensity_db, criterion, censor_db, step_db)
    sign = wave_v_sign(signals_uv, intensity_db, t_ms, accepted, cfg) if polarity == "auto" else 1.0
    picks = np.array([pick_wave_v(sign * s, t_ms, i, cfg["v_window_80db_ms"], cfg["v_window_slope_ms_per_10db"])
                      for s, i in zip(signals_uv, intensity_db)])
    return {"threshold_db": threshold, "threshold_censoring": threshold_censoring(accepted),
            "response": accepted, "correlation": corr, "wave_v_sign": sign,
            "latency_ms": picks[:, 0], "amplitude_uv": picks[:, 1]}
