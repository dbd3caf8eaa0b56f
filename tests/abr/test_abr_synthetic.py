"""Generator physiology: latency-intensity, conductive shift, rate effect, maturation, no response
below threshold, thresholds drawn per class (not from the class label), noise level, and the default
variation of real recordings (5 and 10 dB steps, sweep counts, click polarity and display sign)."""

import math

import numpy as np
import pytest

from abr.dsp import time_axis_ms
from abr.synthetic import (
    SYNTHETIC_DEFAULTS,
    Ear,
    clean_response,
    generate_recordings,
    intensity_shift_ms,
    sample_ear,
    single_polarity_components,
    wave_parameters,
)


def make_ear(**changes) -> Ear:
    base = dict(patient_id="P1", ear="R", age_years=30.0, hearing_loss="NORMAL", threshold_db=15.0,
                air_bone_gap_db=0.0, near_threshold_ms=0.5, growth_db=25.0, v80_ms=5.7, i80_ms=1.65,
                interpeak_iii_fraction=0.55, v_max_uv=0.4, i_factor=0.55, i_offset_db=20.0, iii_offset_db=10.0,
                neuropathy_broadening=1.0, rate_per_s=10.0)
    base.update(changes)
    return Ear(**base)


@pytest.mark.parametrize("level_db, expected_ms", [(80.0, 0.0), (70.0, 0.35), (40.0, 1.4), (100.0, -0.4)])
def test_intensity_shift_table(level_db, expected_ms):
    assert intensity_shift_ms(level_db) == pytest.approx(expected_ms)


def test_wave_v_latency_grows_as_intensity_falls_steeper_near_threshold():
    ear = make_ear()
    levels = [100, 80, 60, 40, 20]
    lat = [wave_parameters(ear, lv)["V"]["latency_ms"] for lv in levels]
    assert all(a < b for a, b in zip(lat, lat[1:]))
    # hand value at 80 dB: 5.7 + 0 + 0.5·exp(−65/10)
    assert lat[1] == pytest.approx(5.7 + 0.5 * math.exp(-6.5))
    # normal ear at 20 dB nHL lies in the published 7.5-8.5 ms band
    assert 7.5 <= lat[-1] <= 8.5
    # steeper near threshold: 40→20 dB adds more than 80→60 dB
    assert lat[4] - lat[3] > lat[2] - lat[1]


def test_conductive_loss_shifts_the_whole_function_right_by_the_air_bone_gap():
    normal, conductive = make_ear(), make_ear(hearing_loss="İTİK", air_bone_gap_db=30.0, threshold_db=45.0)
    for level in (60.0, 80.0, 100.0):
        c = wave_parameters(conductive, level)
        n = wave_parameters(normal, level - 30.0)
        # same effective level → same latency of every wave; near-threshold terms differ only by SL
        for wave in ("V",):
            assert c[wave]["latency_ms"] == pytest.approx(n[wave]["latency_ms"], abs=1e-6)
        assert c["V"]["latency_ms"] > wave_parameters(normal, level)["V"]["latency_ms"]
    c, n = wave_parameters(conductive, 100.0), wave_parameters(normal, 100.0)
    # all waves delayed, interpeak I-V unchanged
    assert c["I"]["latency_ms"] > n["I"]["latency_ms"]
    assert c["V"]["latency_ms"] - c["I"]["latency_ms"] == pytest.approx(n["V"]["latency_ms"] - n["I"]["latency_ms"], abs=1e-6)


def test_click_rate_10_to_100_per_second_adds_half_a_millisecond_to_v():
    slow, fast = make_ear(rate_per_s=10.0), make_ear(rate_per_s=100.0)
    delta = wave_parameters(fast, 80.0)["V"]["latency_ms"] - wave_parameters(slow, 80.0)["V"]["latency_ms"]
    assert delta == pytest.approx(0.5)


def test_no_response_below_threshold_and_detectable_at_threshold():
    ear = make_ear(threshold_db=42.0)
    t = time_axis_ms(450, 30000.0)
    below = wave_parameters(ear, 40.0)
    assert not any(below[w]["present"] for w in ("I", "III", "V"))
    at = wave_parameters(ear, 42.0, floor_uv=0.07)
    assert at["V"]["present"] and at["V"]["amplitude_uv"] == pytest.approx(0.07)
    assert not at["I"]["present"]  # wave I needs 20 dB more
    artifact_only = clean_response(t, below, ear, 40.0)
    assert np.abs(artifact_only[t > 1.5]).max() < 1e-6


def test_infant_wave_v_is_later_than_adult():
    rng = np.random.default_rng(0)
    infant = [wave_parameters(sample_ear("p", "R", 0.05, "NORMAL", 11.1, rng), 80)["V"]["latency_ms"] for _ in range(200)]
    adult = [wave_parameters(sample_ear("p", "R", 30.0, "NORMAL", 11.1, rng), 80)["V"]["latency_ms"] for _ in range(200)]
    assert 6.2 <= np.mean(infant) <= 7.0  # published 6.4-6.8 ms
    assert 5.5 <= np.mean(adult) <= 6.0  # published 5.5-5.9 ms


@pytest.mark.parametrize("cls, low, high", [("NORMAL", 0, 25), ("SNİK", 30, 90), ("İTİK", 20, 85)])
def test_thresholds_are_drawn_per_ear_within_the_class_range(cls, low, high):
    rng = np.random.default_rng(1)
    values = np.array([sample_ear("p", "R", 5.0, cls, 11.1, rng).threshold_db for _ in range(300)])
    assert values.min() >= low and values.max() <= high
    assert values.std() > 3.0  # a spread, not a value derived from the class label


def test_total_loss_has_no_response_at_100_db():
    ear = sample_ear("p", "R", 5.0, "TOTAL", 11.1, np.random.default_rng(2))
    assert math.isinf(ear.threshold_db)
    assert not wave_parameters(ear, 100.0)["V"]["present"]


def test_generated_table_labels_and_noise_level():
    cfg = dict(SYNTHETIC_DEFAULTS, n_patients=6, intensity_steps_db=[], intensity_step_db=20.0, noisy_fraction=0.0,
               sweeps_accepted_range=None,  # every recording at the 2,000-sweep reference noise
               class_probs={"NORMAL": 1.0, "SNIK": 0, "ITIK": 0, "TOTAL": 0, "NOROPATI": 0})
    table, clean = generate_recordings(cfg, 30000.0, 15.0, seed=4)
    samples = table[[str(i + 1) for i in range(450)]].to_numpy()
    noise_nv = 1000 * (samples - clean).std(axis=1)
    assert noise_nv.min() >= 19.0 and noise_nv.max() <= 41.0
    threshold = table["Threshold"].astype(float)
    present = table["V Latency"].notna()
    # wave V is labelled exactly where the level reaches the ear's true threshold
    assert (present == (table["Intensity"] >= threshold)).all()
    assert table["V Latency"].dropna().between(4.5, 10.0).all()


def test_ear_noise_carries_mains_hum_and_muscle_noise_when_drawn():
    from abr.synthetic import ear_noise

    fs = 30000.0
    t = time_axis_ms(3000, fs)  # 100 ms: 0.01 ms bins of 10 Hz
    cfg = {**SYNTHETIC_DEFAULTS, "mains_fraction": 1.0, "mains_hz": [50.0], "mains_rel": [3.0, 3.0],
           "myogenic_fraction": 0.0, "noise_exponent_range": [1.0, 1.0]}
    spectrum = np.abs(np.fft.rfft(ear_noise((4, t.size), t, fs, cfg, np.random.default_rng(0)), axis=1)).mean(0)
    freqs = np.fft.rfftfreq(t.size, 1 / fs)
    assert freqs[np.argmax(spectrum[1:]) + 1] == pytest.approx(50.0)
    cfg.update(mains_fraction=0.0, myogenic_fraction=1.0, myogenic_rel=[5.0, 5.0])
    emg = np.abs(np.fft.rfft(ear_noise((4, t.size), t, fs, cfg, np.random.default_rng(0)), axis=1)).mean(0)
    high = (freqs > 1000) & (freqs < 3000)
    assert emg[high].mean() > 3 * spectrum[high].mean()  # muscle noise lifts the high frequencies


def test_default_generator_mixes_steps_sweep_counts_and_both_polarities():
    table, clean = generate_recordings(dict(SYNTHETIC_DEFAULTS, n_patients=10), 30000.0, 15.0, seed=5)
    ears = table.groupby(["Patient_ID", "Ear"])
    assert {round(float(np.diff(np.sort(g["Intensity"].to_numpy())).min())) for _, g in ears} == {5, 10}
    sweeps = table["Sweeps Accepted"]
    assert sweeps.nunique() > 20 and sweeps.between(250, 4000).all()
    assert set(ears["Stimulus Polarity"].nunique()) == {1}  # one click polarity per ear ...
    assert set(ears["Stimulus Polarity"].first()) == {"Alternating", "Rarefaction", "Condensation"}  # ... all three
    inverted = np.asarray(table.attrs["display_inverted"])
    assert inverted.any() and not inverted.all()
    # the noise-free trace carries the display sign: wave V is a trough in an inverted ear
    strong = (table["V Amplitude"] > 0.1).to_numpy()
    at_v = clean[np.flatnonzero(strong), np.round(table["V Latency"][strong].to_numpy() * 30.0).astype(int)]
    np.testing.assert_array_equal(at_v < 0, inverted[strong])


def test_cochlear_microphonic_reverses_with_click_polarity_and_cancels_in_alternating_averages():
    t = time_axis_ms(450, 30000.0)
    condensation = single_polarity_components(t, 100.0, "Condensation", 0.2, neuropathy=False)
    np.testing.assert_allclose(single_polarity_components(t, 100.0, "Rarefaction", 0.2, neuropathy=False), -condensation)
    assert not single_polarity_components(t, 100.0, "Alternating", 0.2, neuropathy=False).any()
    neuropathy = single_polarity_components(t, 100.0, "Condensation", 0.2, neuropathy=True)
    late = t > 1.0  # after the stimulus artifact: the microphonic alone, larger in neuropathy
    assert np.abs(neuropathy[late]).max() > 3 * np.abs(condensation[late]).max()
