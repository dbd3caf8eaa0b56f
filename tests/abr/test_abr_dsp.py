"""Filtering, resampling, normalization and peak interpolation against hand-computed values."""

import numpy as np
import pytest

from abr.dsp import bandpass, local_maxima, normalize_recordings, parabolic_peak, resample, time_axis_ms


def test_time_axis():
    np.testing.assert_allclose(time_axis_ms(4, 2000.0, pre_stimulus_ms=0.5), [-0.5, 0.0, 0.5, 1.0])


@pytest.mark.parametrize("freq_hz, gain_low, gain_high", [(800.0, 0.95, 1.01), (20.0, 0.0, 0.1), (8000.0, 0.0, 0.05)])
def test_bandpass_passes_the_abr_band_only(freq_hz, gain_low, gain_high):
    fs = 30000.0
    t = np.arange(6000) / fs
    x = np.sin(2 * np.pi * freq_hz * t)
    y = bandpass(x, fs, 100.0, 3000.0, order=2, zero_phase=True)
    gain = y[1000:-1000].std() / x[1000:-1000].std()
    assert gain_low <= gain <= gain_high


def test_bandpass_rejects_an_edge_above_nyquist():
    with pytest.raises(ValueError, match="Nyquist"):
        bandpass(np.zeros(100), 5000.0, 100.0, 3000.0)


def test_resample_30k_to_10k_keeps_a_slow_sine():
    fs_in, fs_out = 30000.0, 10000.0
    t_in = np.arange(450) / fs_in
    y = resample(np.sin(2 * np.pi * 500 * t_in), fs_in, fs_out, n_out=150)
    t_out = np.arange(150) / fs_out
    assert y.shape == (150,)
    np.testing.assert_allclose(y[20:-20], np.sin(2 * np.pi * 500 * t_out)[20:-20], atol=0.02)


def test_normalize_keeps_the_scale():
    x = np.array([[3.0, -3.0, 3.0, -3.0], [0.0, 0.0, 0.0, 0.0]])
    norm, scale = normalize_recordings(x, floor_uv=1e-3)
    np.testing.assert_allclose(scale, [3.0, 1e-3])
    np.testing.assert_allclose(norm[0], [1, -1, 1, -1])


def test_parabolic_peak_is_exact_on_a_parabola():
    x = np.arange(10, dtype=float)
    y = -(x - 4.3) ** 2 + 2.0
    position, value = parabolic_peak(y, 4)
    assert position == pytest.approx(4.3)
    assert value == pytest.approx(2.0)
    assert list(local_maxima(y)) == [4]
