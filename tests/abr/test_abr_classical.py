"""The classical baseline on clean synthetic series, and its pieces by hand."""

import numpy as np
import pytest

from abr.classical import (
    analyse_series,
    max_normalized_xcorr,
    pick_wave_v,
    threshold_censoring,
    threshold_from_correlations,
)
from abr.defaults import abr_defaults
from abr.dsp import bandpass, resample, time_axis_ms
from abr.synthetic import clean_response, sample_ear, wave_parameters


def test_xcorr_finds_a_shifted_copy():
    t = np.linspace(0, 10, 200)
    a = np.exp(-0.5 * ((t - 5) / 0.1) ** 2)
    assert max_normalized_xcorr(a, np.roll(a, 6), max_lag=6) == pytest.approx(1.0)
    assert max_normalized_xcorr(a, np.roll(a, 6), max_lag=1) < 0.5


@pytest.mark.parametrize("corr, expected, censoring", [
    ([0.1, 0.2, 0.8, 0.9, 0.9], 25.0, ""),  # accepted from 30 dB up → 30 − 10/2
    ([0.9, 0.9, 0.9, 0.9, 0.9], 10.0, "<="),  # all accepted → "<= lowest level tested", never below it
    ([0.1, 0.1, 0.1, 0.1, 0.2], 110.0, ">"),  # none → "> highest" (the censor value as its number)
    ([0.9, 0.1, 0.9, 0.9, 0.9], 25.0, ""),  # an isolated low "response" below a gap does not count
    ([0.1, 0.1, 0.1, 0.1, 0.9], 45.0, ""),  # only the top level → half-way into the gap below it
])
def test_threshold_rule_by_hand(corr, expected, censoring):
    levels = np.array([10.0, 20.0, 30.0, 40.0, 50.0])
    value, accepted = threshold_from_correlations(np.array(corr), levels, 0.5, censor_db=110.0, step_db=10.0)
    assert value == pytest.approx(expected)
    assert threshold_censoring(accepted) == censoring
    if censoring != ">":
        assert levels[0] <= value <= levels[-1]  # never outside the tested range


def test_analyse_series_reports_censoring_when_every_level_responds():
    t = time_axis_ms(150, 10000.0)
    bump = np.exp(-0.5 * ((t - 6.0) / 0.3) ** 2)
    levels = np.array([30.0, 50.0, 70.0])
    out = analyse_series(np.stack([bump * a for a in (0.2, 0.4, 0.6)]), levels, t, abr_defaults()["classical"],
                         criterion=0.5, censor_db=80.0, step_db=20.0)
    assert out["threshold_db"] == 30.0 and out["threshold_censoring"] == "<="
    flat = np.random.default_rng(0).normal(size=(3, 150))
    out = analyse_series(flat, levels, t, abr_defaults()["classical"], criterion=0.9, censor_db=80.0, step_db=20.0)
    assert out["threshold_db"] == 80.0 and out["threshold_censoring"] == ">"


def test_classical_on_clean_synthetic_series_finds_threshold_and_wave_v():
    cfg = abr_defaults()["classical"]
    fs, fs_model = 30000.0, 10000.0
    t_dev = time_axis_ms(450, fs)
    t = time_axis_ms(150, fs_model)
    rng = np.random.default_rng(5)
    levels = np.arange(0.0, 101.0, 10.0)
    for _ in range(5):
        ear = sample_ear("p", "R", 30.0, "NORMAL", 11.1, rng)
        ear.threshold_db = float(rng.uniform(20, 60))  # make the threshold interior to the series
        waves = [wave_parameters(ear, lv) for lv in levels]
        traces = np.stack([clean_response(t_dev, w, ear, lv) for w, lv in zip(waves, levels)])
        traces = resample(bandpass(traces, fs, 100, 3000), fs, fs_model, 150)
        traces += np.random.default_rng(0).normal(scale=0.005, size=traces.shape)  # 5 nV: essentially clean
        out = analyse_series(traces, levels, t, cfg, criterion=0.6, censor_db=110.0, step_db=10.0)
        assert abs(out["threshold_db"] - ear.threshold_db) <= 10.0
        present = levels >= ear.threshold_db + 10
        true_v = np.array([w["V"]["latency_ms"] for w in waves])
        assert np.all(np.abs(out["latency_ms"][present] - true_v[present]) < 0.3)


def test_pick_wave_v_window_moves_with_intensity():
    t = time_axis_ms(150, 10000.0)
    trace = np.exp(-0.5 * ((t - 8.0) / 0.3) ** 2) + 0.9 * np.exp(-0.5 * ((t - 5.5) / 0.3) ** 2)
    lat80, _ = pick_wave_v(trace, t, 80.0, [5.0, 7.8], 0.45)
    lat20, _ = pick_wave_v(trace, t, 20.0, [5.0, 7.8], 0.45)
    assert lat80 == pytest.approx(5.5, abs=0.05)
    assert lat20 == pytest.approx(8.0, abs=0.05)


def clean_series(seed: int = 5):
    """A clean synthetic normal ear on the 10 kHz grid (µV traces, levels, true wave V latencies)."""
    fs, fs_model = 30000.0, 10000.0
    t_dev, t = time_axis_ms(450, fs), time_axis_ms(150, fs_model)
    rng = np.random.default_rng(seed)
    levels = np.arange(0.0, 101.0, 10.0)
    ear = sample_ear("p", "R", 30.0, "NORMAL", 11.1, rng)
    ear.threshold_db = 35.0
    waves = [wave_parameters(ear, lv) for lv in levels]
    traces = np.stack([clean_response(t_dev, w, ear, lv) for w, lv in zip(waves, levels)])
    traces = resample(bandpass(traces, fs, 100, 3000), fs, fs_model, 150)
    traces += rng.normal(scale=0.005, size=traces.shape)
    return traces, levels, t, np.array([w["V"]["latency_ms"] for w in waves]), levels >= ear.threshold_db + 10


def test_wave_v_on_an_inverted_ear_needs_the_sign():
    """As declared (vertex-positive assumed), an inverted ear's wave V is the SN10 trough, about 1 ms late;
    with wave_v_polarity auto the sign is found and the picks equal those of the upright ear."""
    cfg = abr_defaults()["classical"]
    traces, levels, t, true_v, present = clean_series()
    args = (0.6, 110.0, 10.0)  # criterion, censor dB, step dB
    upright = analyse_series(traces, levels, t, cfg, *args)
    inverted_declared = analyse_series(-traces, levels, t, cfg, *args)
    inverted_auto = analyse_series(-traces, levels, t, cfg, *args, polarity="auto")
    upright_auto = analyse_series(traces, levels, t, cfg, *args, polarity="auto")
    assert np.all(np.abs(upright["latency_ms"][present] - true_v[present]) < 0.3)
    assert np.median(inverted_declared["latency_ms"][present] - true_v[present]) > 0.5  # the trough after V
    assert inverted_auto["wave_v_sign"] == -1.0 and upright_auto["wave_v_sign"] == 1.0
    np.testing.assert_allclose(inverted_auto["latency_ms"], upright["latency_ms"])
    np.testing.assert_allclose(inverted_auto["amplitude_uv"], upright["amplitude_uv"])
    assert inverted_declared["threshold_db"] == upright["threshold_db"] == inverted_auto["threshold_db"]


def test_unknown_signal_polarity_means_auto_and_bad_values_are_refused():
    from abr.classical import wave_v_polarity
    from common.config import ConfigError

    cfg = abr_defaults()["classical"]
    assert wave_v_polarity(cfg, "unknown") == "auto"
    assert wave_v_polarity(cfg, "vertex_negative") == "declared"
    assert wave_v_polarity({**cfg, "wave_v_polarity": "auto"}, "vertex_positive") == "auto"
    traces, levels, t, _, _ = clean_series()
    with pytest.raises(ConfigError, match="wave_v_polarity"):
        analyse_series(traces, levels, t, cfg, 0.6, 110.0, 10.0, polarity="flipped")
