"""Synthetic click-ABR recordings grounded in published physiology, written in the clinical table format.

Each patient gets an age (infant to adult) and a hearing-loss class (realistic imbalance); each ear gets
a TRUE threshold drawn for its class (the label the threshold head learns — measured physiology, never a
function of the class label), then a recording at every level of an intensity series. The response at a
level is the sum of waves I-V (plus II, IV and the SN10 trough), placed by latency-intensity and
amplitude-intensity functions, with rate, age and class effects; residual EEG noise of a realistic size
is added and the sum is band-pass filtered as the recording device does.

Physiology used (Hall 2007, *New Handbook of Auditory Evoked Responses*; Picton 2011, *Human Auditory
Evoked Potentials*; values collected in the domain notes):
- adult click at 80 dB nHL: I ≈ 1.6-1.7 ms, III ≈ 3.8 ms, V ≈ 5.7 ms, I-V ≈ 4.0 ms; infants V ≈ 6.6 ms
  with I-V ≈ 5 ms, maturing with a ~6-month time constant (adult values by ~18 months);
- wave V latency +0.35 ms per 10 dB below 80 dB (flatter above), steeper near threshold (7.5-8.5 ms at
  20-30 dB nHL in normal ears); click rate 10 → 100 /s adds ~0.5 ms to V;
- conductive loss: the whole latency-intensity function shifted right by the air-bone gap (≤ 60 dB);
  sensorineural: raised threshold, near-normal latency at high levels, steep slope near threshold
  (recruitment), wave I small or absent; total loss: no response up to 100 dB; neuropathy: absent or
  grossly abnormal waves from wave I on, at most a small, late, broad wave V at high levels, and a
  residual cochlear microphonic that alternating polarity does not fully cancel;
- the threshold is where wave V becomes detectable: its amplitude there is ``response_floor_uv``
  (≈ 3× a 25 nV residual noise, the "clear response" criterion) and grows with sensation level;
- residual noise after averaging 20-40 nV RMS (the clinical target), with a quarter of the recordings
  noisier (40-100 nV: restless infants, runs stopped early), 1/f-coloured EEG.

What real recordings vary (issue 16), randomized per ear: the EEG spectrum's slope (1/f^a,
``noise_exponent_range``), mains hum at 50 or 60 Hz with harmonics in ``mains_fraction`` of ears, myogenic
(muscle) noise above ~300 Hz in ``myogenic_fraction``, all inside the same residual RMS; and the response
size across subjects (electrode placement, skull: a log-normal gain, ``subject_gain_sd``); the level step
per ear (``intensity_steps_db``: 5 or 10 dB, both protocols are in use); the accepted sweep count per
recording (``sweeps_accepted_range``, log-uniform), with the residual noise scaled by
√(``noise_reference_sweeps`` / sweeps), since averaging N sweeps divides the EEG's standard deviation by √N;
and polarity, in two senses:

- the click polarity per ear (``stimulus_polarity_probs``: Alternating, Rarefaction, Condensation; written to
  the ``Stimulus Polarity`` column). The cochlear microphonic (CM) follows the stimulus waveform, so it
  reverses with click polarity and cancels in an alternating average, while the neural waves do not reverse
  (Hall 2007; the CM reversal is the clinical sign of auditory neuropathy, Starr et al. 1996, Brain
  119:741-753; Berlin et al. 1998, Ear Hear 19:37-47). A single-polarity average therefore keeps a CM
  (``cochlear_microphonic_uv`` at 100 dB, four times larger in neuropathy) and the uncancelled stimulus
  artifact, with the sign of the click; an alternating one keeps only the small residuals of before;
- the display sign of the whole ear (``inverted_fraction``): labs export vertex-positive up or
  vertex-negative up, and the table does not say which (abr/readers.py, ``data.signal_polarity``). An
  inverted ear's samples and clean traces are multiplied by −1; its peak labels stay the latencies and
  vertex-positive amplitudes of the waves.

Setting a list to empty, a range to null, a fraction to 0 or the Rarefaction and Condensation shares to 0
turns that variation off without drawing a random number, so the tables are then those of the generator
without it. ``species: mouse_tonepip`` draws mouse ears in dB SPL instead (abr/species.py).

Ground-truth peaks are measured on the noise-free trace after the device filter (what a perfect reader
would mark on that trace): the local maximum nearest each wave's component latency.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from abr.dsp import bandpass, local_maxima, parabolic_peak, time_axis_ms
from abr.labels import CLASS_NAMES, WAVES, canonical_class
from abr.species import check_species, sample_mouse_age_years, sample_mouse_ear
from common.config import ConfigError

# Default generator settings (the ``synthetic`` config section; documented there in abr/defaults.py).
SYNTHETIC_DEFAULTS = {
    "n_patients": 400,
    "class_probs": {"NORMAL": 0.797, "SNIK": 0.106, "ITIK": 0.056, "TOTAL": 0.033, "NOROPATI": 0.008},
    "age_group_probs": {"infant": 0.6, "child": 0.15, "adult": 0.25},
    "both_ears_prob": 0.85,
    "intensity_min_db": 0.0,
    "intensity_max_db": 100.0,
    "intensity_step_db": 10.0,  # the fixed step when intensity_steps_db is empty
    "drop_level_prob": 0.0,
    "rates_per_s": [11.1, 19.1, 21.1, 27.7, 33.3, 37.1, 45.1, 49.1],
    "noise_rms_nv": [20.0, 40.0],
    "noisy_fraction": 0.25,
    "noisy_rms_nv": [40.0, 100.0],
    "response_floor_uv": 0.07,
    "device_filter_hz": [100.0, 3000.0],
    "device_filter_order": 2,
    "device_zero_phase": True,
    "noise_exponent_range": [0.6, 1.6],  # EEG 1/f^a slope per ear
    "mains_fraction": 0.3,  # ears with mains hum (50 or 60 Hz + harmonics 2-5) inside the residual noise
    "mains_hz": [50.0, 60.0],
    "mains_rel": [0.3, 1.5],  # hum RMS relative to the EEG noise before the mix is scaled to the residual RMS
    "myogenic_fraction": 0.15,  # ears with muscle noise (white, high-passed at 300 Hz) ...
    "myogenic_rel": [0.5, 1.5],  # ... of this RMS relative to the EEG noise
    "subject_gain_sd": 0.25,  # log-normal σ of a per-ear response amplitude scale (0 = none)
    "species": "human_click",  # human_click (dB nHL) | mouse_tonepip (dB SPL): abr/species.py
    "intensity_steps_db": [5.0, 10.0],  # per-ear level step drawn from this list; empty = intensity_step_db
    "sweeps_accepted_range": [250, 4000],  # accepted sweeps per recording, log-uniform; residual ∝ 1/√sweeps; null = all at the reference
    "noise_reference_sweeps": 2000,  # the sweep count at which noise_rms_nv / noisy_rms_nv hold
    # click polarity per ear (assumed shares); Rarefaction and Condensation at 0 = all Alternating, no draw
    "stimulus_polarity_probs": {"Alternating": 0.5, "Rarefaction": 0.3, "Condensation": 0.2},
    "cochlear_microphonic_uv": [0.05, 0.2],  # CM amplitude at 100 dB in a single-polarity average, normal ear (assumed)
    "inverted_fraction": 0.2,  # ears written vertex-negative up (the display sign labs differ in; assumed share)
    "output_format": "csv",
}

# Component shapes: Gaussian peak width (ms) and the following trough (delay ms, width ms, depth × peak).
_SHAPE = {"I": (0.17, 0.55, 0.20, 0.5), "II": (0.17, 0.5, 0.2, 0.3), "III": (0.21, 0.6, 0.25, 0.5),
          "IV": (0.22, 0.0, 0.0, 0.0), "V": (0.30, 1.0, 0.45, 0.8)}
NO_RESPONSE_DB = math.inf
STIMULUS_POLARITIES = ("Alternating", "Rarefaction", "Condensation")
NEUROPATHY_CM_FACTOR = 4.0  # CM in auditory neuropathy relative to a normal ear's (assumed; large in ANSD)


@dataclass
class Ear:
    """One ear's physiology (latencies in ms, amplitudes in µV, levels in the species' reference: dB nHL for
    the human click, dB SPL for the mouse preset of abr/species.py)."""

    patient_id: str
    ear: str
    age_years: float
    hearing_loss: str  # canonical class name
    threshold_db: float  # true ABR (wave V) threshold; inf = no response at any level
    air_bone_gap_db: float
    near_threshold_ms: float  # extra latency at threshold, decaying with sensation level
    growth_db: float  # amplitude growth constant (dB of sensation level)
    v80_ms: float  # wave V latency at 80 dB nHL, 11/s, for this ear
    i80_ms: float  # wave I latency at 80 dB nHL
    interpeak_iii_fraction: float  # (III − I) / (V − I)
    v_max_uv: float  # wave V amplitude at high sensation level
    i_factor: float  # wave I amplitude relative to V
    i_offset_db: float  # wave I needs this many dB above the V threshold
    iii_offset_db: float
    neuropathy_broadening: float  # width multiplier of a desynchronized wave V
    rate_per_s: float


def _age_months(age_years: float) -> float:
    return 12.0 * max(age_years, 0.0)


def sample_age_years(group: str, rng: np.random.Generator) -> float:
    """Infants 0-2 y (most of them newborns, as in the clinical data), children 2-18, adults 18-80."""
    if group == "infant":
        return float(min(rng.exponential(0.35), 2.0))
    if group == "child":
        return float(rng.uniform(2.0, 18.0))
    return float(rng.uniform(18.0, 80.0))


def sample_ear(patient_id: str, ear: str, age_years: float, hearing_loss: str, rate_per_s: float,
               rng: np.random.Generator) -> Ear:
    """Draw one ear's true threshold and response parameters for its class."""
    cls = canonical_class(hearing_loss)
    months = _age_months(age_years)
    maturation = math.exp(-months / 6.0)  # immature I-V interval decays by ~18 months
    # Wave I (cochlear nerve) is stable; the I-V interpeak interval carries the maturation and most of
    # the individual variation (infants ~5 ms, adults ~4 ms).
    i80 = rng.normal(1.65, 0.1) + 0.1 * maturation
    interpeak = rng.normal(4.0, 0.12) + 0.9 * maturation + 0.01 * max(age_years - 40.0, 0.0)
    v80 = i80 + interpeak
    gap, near, growth = 0.0, 0.5, 25.0
    v_max = float(rng.lognormal(math.log(0.38 if age_years >= 2 else 0.32), 0.3))
    i_factor, i_offset, iii_offset, broadening = (0.7 if age_years < 2 else 0.55), 20.0, 10.0, 1.0
    if cls == "NORMAL":
        threshold = float(np.clip(rng.normal(12.0, 6.0), 0.0, 25.0))
    elif cls == "SNİK":
        threshold = float(rng.uniform(30.0, 90.0))
        near, growth, v_max = 1.5, 12.0, 0.85 * v_max  # recruitment: steep latency and amplitude growth
        i_factor, i_offset = 0.3, 30.0  # wave I small or absent
    elif cls == "İTİK":
        cochlear = float(np.clip(rng.normal(10.0, 5.0), 0.0, 25.0))
        gap = float(rng.uniform(20.0, 60.0))
        threshold = cochlear + gap
    elif cls == "TOTAL":
        threshold = NO_RESPONSE_DB
    else:  # NÖROPATİ: mostly no ABR; some ears show a small, late, broad wave V at high levels
        if rng.random() < 0.3:
            threshold = float(rng.uniform(70.0, 95.0))
            v80 += 1.5
            v_max, broadening = float(rng.uniform(0.08, 0.15)), 1.8
        else:
            threshold = NO_RESPONSE_DB
        i_factor = 0.0
        iii_offset = 1e9  # wave III absent too
    return Ear(patient_id=patient_id, ear=ear, age_years=age_years, hearing_loss=cls, threshold_db=threshold,
               air_bone_gap_db=gap, near_threshold_ms=near, growth_db=growth, v80_ms=float(v80),
               i80_ms=float(i80), interpeak_iii_fraction=float(rng.normal(0.55, 0.03)), v_max_uv=v_max,
               i_factor=i_factor, i_offset_db=i_offset, iii_offset_db=iii_offset,
               neuropathy_broadening=broadening, rate_per_s=float(rate_per_s))


def intensity_shift_ms(effective_db: float) -> float:
    """Latency change relative to 80 dB nHL: +0.35 ms per 10 dB below 80, +0.2 ms per 10 dB above."""
    below = 80.0 - effective_db
    return 0.035 * below if below >= 0 else 0.02 * below


def wave_parameters(ear: Ear, intensity_db: float, floor_uv: float = 0.07) -> dict:
    """Presence, latency (ms) and component amplitude (µV) of waves I, III and V (and II, IV) at a level.

    A wave exists when the level is at or above its own threshold (V: the ear's threshold; I and III:
    ``i_offset_db`` / ``iii_offset_db`` higher). Conductive loss enters through the effective level
    I − air-bone gap, which shifts the whole latency-intensity function right.
    """
    effective = intensity_db - ear.air_bone_gap_db
    sensation = intensity_db - ear.threshold_db  # dB above the V threshold (−inf/neg: no response)
    rate_frac = (ear.rate_per_s - 10.0) / 90.0
    near = ear.near_threshold_ms * math.exp(-max(sensation, 0.0) / 10.0) if math.isfinite(sensation) else 0.0
    shift = intensity_shift_ms(effective) + near
    amp_rate = 1.0 - 0.2 * rate_frac
    out = {}
    lat_i = ear.i80_ms + shift + 0.1 * rate_frac
    lat_v = ear.v80_ms + shift + 0.5 * rate_frac
    lat_iii = lat_i + ear.interpeak_iii_fraction * (ear.v80_ms - ear.i80_ms) + 0.2 * rate_frac
    growth = 1.0 - math.exp(-max(sensation, 0.0) / ear.growth_db) if math.isfinite(sensation) else 0.0
    v_amp = (floor_uv + (ear.v_max_uv - floor_uv) * growth) * amp_rate if sensation >= 0 else 0.0
    if ear.hearing_loss == "NÖROPATİ":
        v_amp = min(v_amp, ear.v_max_uv)
    for name, latency, offset, factor in (("I", lat_i, ear.i_offset_db, ear.i_factor),
                                          ("III", lat_iii, ear.iii_offset_db, 0.6), ("V", lat_v, 0.0, 1.0)):
        wave_sl = sensation - offset
        present = bool(v_amp > 0 and wave_sl >= 0 and factor > 0)
        amp = 0.0
        if present:
            amp = factor * v_amp * (0.35 + 0.65 * (1.0 - math.exp(-wave_sl / 20.0))) if name != "V" else v_amp
        out[name] = {"present": present, "latency_ms": float(latency), "amplitude_uv": float(amp)}
    out["II"] = {"present": out["I"]["present"], "latency_ms": lat_i + 1.0,
                 "amplitude_uv": 0.5 * out["I"]["amplitude_uv"]}
    out["IV"] = {"present": out["V"]["present"] and sensation >= 20, "latency_ms": lat_v - 0.7,
                 "amplitude_uv": 0.35 * v_amp}
    return out


def _gauss(t: np.ndarray, mu: float, sigma: float) -> np.ndarray:
    return np.exp(-0.5 * ((t - mu) / sigma) ** 2)


def clean_response(t_ms: np.ndarray, waves: dict, ear: Ear, intensity_db: float) -> np.ndarray:
    """Noise-free response (µV) before device filtering: wave peaks, their troughs, residual artifacts."""
    y = np.zeros_like(t_ms)
    for name, (width, trough_delay, trough_width, depth) in _SHAPE.items():
        wave = waves[name]
        if not wave["present"] or wave["amplitude_uv"] <= 0:
            continue
        width = width * (ear.neuropathy_broadening if name == "V" else 1.0)
        y += wave["amplitude_uv"] * _gauss(t_ms, wave["latency_ms"], width)
        if depth > 0:
            y -= depth * wave["amplitude_uv"] * _gauss(t_ms, wave["latency_ms"] + trough_delay, trough_width)
    # Residual stimulus artifact after alternating-polarity averaging (small, first ~0.5 ms).
    onset = t_ms >= 0
    y += 0.02 * (intensity_db / 100.0) * onset * np.exp(-np.clip(t_ms, 0, None) / 0.15) * np.cos(2 * np.pi * 3.0 * t_ms)
    if ear.hearing_loss == "NÖROPATİ" and intensity_db >= 60:
        # Cochlear microphonic, large in neuropathy, imperfectly cancelled by alternating polarity.
        y += 0.05 * (intensity_db / 100.0) * microphonic_shape(t_ms)
    return y


def microphonic_shape(t_ms: np.ndarray) -> np.ndarray:
    """Unit-amplitude cochlear microphonic after a click: 1.2 kHz ringing from 0.5 ms, decaying with 1.5 ms."""
    ringing = np.sin(2 * np.pi * 1.2 * t_ms) * np.exp(-np.clip(t_ms - 0.5, 0, None) / 1.5)
    return ringing * ((t_ms > 0.5) & (t_ms < 5.0))


def single_polarity_components(t_ms: np.ndarray, intensity_db: float, polarity: str, microphonic_uv: float,
                               neuropathy: bool) -> np.ndarray:
    """What a single-polarity average (Rarefaction or Condensation) adds to the alternating one (µV, before
    filtering): the cochlear microphonic (``microphonic_uv`` at 100 dB, scaled linearly with the level;
    ×``NEUROPATHY_CM_FACTOR`` in neuropathy) and the stimulus artifact five times the alternating residual, both
    with the sign of the click (condensation +, rarefaction −). Zero for Alternating: both cancel there."""
    if polarity == "Alternating":
        return np.zeros_like(t_ms)
    sign = 1.0 if polarity == "Condensation" else -1.0
    level = intensity_db / 100.0
    cm_uv = microphonic_uv * (NEUROPATHY_CM_FACTOR if neuropathy else 1.0) * level
    artifact = 0.1 * level * (t_ms >= 0) * np.exp(-np.clip(t_ms, 0, None) / 0.15) * np.cos(2 * np.pi * 3.0 * t_ms)
    return sign * (cm_uv * microphonic_shape(t_ms) + artifact)


def draw_stimulus_polarity(cfg: dict, rng: np.random.Generator) -> str:
    """One ear's click polarity from ``stimulus_polarity_probs``; no random draw when it is empty (Alternating)
    or gives a share to one polarity only (that one)."""
    probs = cfg.get("stimulus_polarity_probs") or {}
    if not probs:
        return "Alternating"
    unknown = sorted(set(probs) - set(STIMULUS_POLARITIES))
    weights = np.array([float(probs.get(name, 0.0)) for name in STIMULUS_POLARITIES])
    if unknown or weights.sum() <= 0 or (weights < 0).any():
        raise ConfigError(f"synthetic.stimulus_polarity_probs: keys from {STIMULUS_POLARITIES} with non-negative "
                          f"shares, not all zero; got {probs}")
    if (weights > 0).sum() == 1:
        return STIMULUS_POLARITIES[int(np.argmax(weights))]
    return STIMULUS_POLARITIES[int(rng.choice(len(STIMULUS_POLARITIES), p=weights / weights.sum()))]


def coloured_noise(shape: tuple, sampling_rate_hz: float, rng: np.random.Generator, exponent: float = 1.0) -> np.ndarray:
    """Gaussian noise with power ∝ 1/f^exponent (EEG background), unit variance per row."""
    n = shape[-1]
    white = rng.standard_normal(shape)
    spectrum = np.fft.rfft(white, axis=-1)
    freqs = np.fft.rfftfreq(n, d=1.0 / sampling_rate_hz)
    freqs[0] = freqs[1]
    spectrum *= freqs ** (-exponent / 2.0)
    noise = np.fft.irfft(spectrum, n=n, axis=-1)
    return noise / noise.std(axis=-1, keepdims=True)


def ear_noise(shape: tuple, t_ms: np.ndarray, sampling_rate_hz: float, cfg: dict, rng: np.random.Generator) -> np.ndarray:
    """One ear's background before filtering and scaling: 1/f^a EEG (a drawn per ear), plus mains hum
    (50/60 Hz and harmonics 2-5, random phases) and myogenic noise (white, high-passed at 300 Hz) in a
    fraction of ears. Unit-free: the caller scales it to the residual RMS."""
    # no random draw for a feature that is off: with them off the tables are those of the generator before
    lo, hi = cfg.get("noise_exponent_range", [1.0, 1.0])
    noise = coloured_noise(shape, sampling_rate_hz, rng, exponent=float(rng.uniform(lo, hi)) if hi > lo else float(lo))
    if cfg.get("mains_fraction", 0.0) > 0 and rng.random() < cfg["mains_fraction"]:
        f0 = float(rng.choice(cfg["mains_hz"]))
        hum = sum(rng.uniform(0.2, 1.0) / h * np.sin(2 * np.pi * f0 * h * t_ms[None, :] / 1000.0
                                                      + rng.uniform(0, 2 * np.pi, (shape[0], 1)))
                  for h in range(1, 6))
        noise = noise + rng.uniform(*cfg["mains_rel"]) * hum / max(float(np.std(hum)), 1e-12)
    if cfg.get("myogenic_fraction", 0.0) > 0 and rng.random() < cfg["myogenic_fraction"]:
        emg = bandpass(rng.standard_normal(shape), sampling_rate_hz, 300.0, None, 2)
        noise = noise + rng.uniform(*cfg["myogenic_rel"]) * emg / emg.std()
    return noise


def measure_peak(trace: np.ndarray, t_ms: np.ndarray, latency_ms: float, search_ms: float = 0.5) -> tuple[float, float]:
    """Latency (ms) and value (µV) of the local maximum of ``trace`` nearest ``latency_ms`` within
    ±``search_ms``, interpolated between samples; the trace value at ``latency_ms`` when there is none."""
    dt = t_ms[1] - t_ms[0]
    maxima = local_maxima(trace)
    maxima = maxima[np.abs(t_ms[maxima] - latency_ms) <= search_ms]
    if maxima.size == 0:
        index = int(np.clip(round((latency_ms - t_ms[0]) / dt), 0, trace.size - 1))
        return float(latency_ms), float(trace[index])
    best = int(maxima[np.argmin(np.abs(t_ms[maxima] - latency_ms))])
    position, value = parabolic_peak(trace, best)
    return float(t_ms[0] + position * dt), value


def intensity_series(cfg: dict, rng: np.random.Generator) -> list[float]:
    """The levels recorded for one ear: the configured grid, optionally with random gaps (never the top)."""
    steps = cfg.get("intensity_steps_db") or []
    step = float(rng.choice(steps)) if steps else float(cfg["intensity_step_db"])  # no draw when off
    levels = np.arange(cfg["intensity_min_db"], cfg["intensity_max_db"] + 1e-9, step)
    keep = rng.random(levels.size) >= cfg["drop_level_prob"]
    keep[-1] = True
    return [float(v) for v in levels[keep]]


def _class_probabilities(cfg: dict) -> np.ndarray:
    probs = np.zeros(len(CLASS_NAMES))
    for key, value in cfg["class_probs"].items():
        probs[CLASS_NAMES.index(canonical_class(key, "synthetic.class_probs"))] = float(value)
    if probs.sum() <= 0:
        raise ConfigError("synthetic.class_probs: probabilities must not all be zero")
    return probs / probs.sum()


def generate_recordings(cfg: dict, sampling_rate_hz: float, window_ms: float, seed: int,
                        columns: dict | None = None) -> tuple[pd.DataFrame, np.ndarray]:
    """Simulate ``cfg['n_patients']`` patients. Returns (table, clean) where ``table`` has one row per
    recording in the clinical format (metadata + sample columns "1".."N", µV) and ``clean`` holds the
    noise-free filtered traces in the recording's display sign (rows aligned with the table);
    ``table.attrs["display_inverted"]`` says which rows were written vertex-negative up."""
    from abr.data import DEFAULT_COLUMNS

    cols = dict(DEFAULT_COLUMNS if columns is None else columns)
    rng = np.random.default_rng(seed)
    n_samples = int(round(sampling_rate_hz * window_ms / 1000.0))
    t_ms = time_axis_ms(n_samples, sampling_rate_hz)
    # Simulate on a padded axis (−5 ms .. window + 10 ms) so filter edge effects stay outside the window.
    pad_before = int(round(5.0 * sampling_rate_hz / 1000.0))
    pad_after = int(round(10.0 * sampling_rate_hz / 1000.0))
    t_pad = time_axis_ms(n_samples + pad_before + pad_after, sampling_rate_hz, pre_stimulus_ms=5.0)
    low, high = cfg["device_filter_hz"]
    class_p = _class_probabilities(cfg)
    group_names = list(cfg["age_group_probs"])
    group_p = np.array([cfg["age_group_probs"][g] for g in group_names], dtype=float)
    group_p /= group_p.sum()
    mouse = check_species(cfg.get("species", "human_click")) == "mouse_tonepip"
    rows, clean_rows, inverted_rows = [], [], []
    for p in range(int(cfg["n_patients"])):
        patient_id = f"P{p + 1:05d}"
        age = (sample_mouse_age_years(rng) if mouse
               else sample_age_years(group_names[rng.choice(len(group_names), p=group_p)], rng))
        cls = CLASS_NAMES[rng.choice(len(CLASS_NAMES), p=class_p)]
        ears = ["R", "L"] if rng.random() < cfg["both_ears_prob"] else [str(rng.choice(["R", "L"]))]
        for side in ears:
            ear = (sample_mouse_ear if mouse else sample_ear)(patient_id, side, age, cls,
                                                              float(rng.choice(cfg["rates_per_s"])), rng)
            levels = intensity_series(cfg, rng)
            clean = np.zeros((len(levels), t_pad.size))
            waves_per_level = []
            for k, level in enumerate(levels):
                waves = wave_parameters(ear, level, cfg["response_floor_uv"])
                for name in waves:  # per-recording latency jitter
                    waves[name]["latency_ms"] += float(rng.normal(0.0, 0.04))
                waves_per_level.append(waves)
                clean[k] = clean_response(t_pad, waves, ear, level)
            noisy = rng.random(len(levels)) < cfg["noisy_fraction"]
            rms_nv = np.where(noisy, rng.uniform(*cfg["noisy_rms_nv"], len(levels)),
                              rng.uniform(*cfg["noise_rms_nv"], len(levels)))
            sweeps = np.full(len(levels), int(cfg.get("noise_reference_sweeps", 2000)))
            if cfg.get("sweeps_accepted_range"):  # averaging N sweeps leaves the single-sweep EEG / √N
                lo, hi = np.log(np.asarray(cfg["sweeps_accepted_range"], dtype=np.float64))
                sweeps = np.round(np.exp(rng.uniform(lo, hi, len(levels)))).astype(int)
                rms_nv = rms_nv * np.sqrt(float(cfg["noise_reference_sweeps"]) / sweeps)
            if cfg.get("subject_gain_sd", 0.0):
                clean *= float(np.exp(rng.normal(0.0, cfg["subject_gain_sd"])))
            noise = ear_noise(clean.shape, t_pad, sampling_rate_hz, cfg, rng)
            noise = bandpass(noise, sampling_rate_hz, low, high, cfg["device_filter_order"], cfg["device_zero_phase"])
            noise *= (rms_nv / 1000.0 / noise[:, pad_before:pad_before + n_samples].std(axis=1))[:, None]
            clean_f = bandpass(clean, sampling_rate_hz, low, high, cfg["device_filter_order"], cfg["device_zero_phase"])
            clean_f = clean_f[:, pad_before:pad_before + n_samples]  # the alternating average: peak labels
            polarity = draw_stimulus_polarity(cfg, rng)
            stimulus_locked = clean_f  # the noise-free recording, with what single polarity does not cancel
            if polarity != "Alternating":
                cm_uv = float(rng.uniform(*cfg["cochlear_microphonic_uv"]))
                extra = np.stack([single_polarity_components(t_pad, level, polarity, cm_uv, cls == "NÖROPATİ")
                                  for level in levels])
                extra = bandpass(extra, sampling_rate_hz, low, high, cfg["device_filter_order"], cfg["device_zero_phase"])
                stimulus_locked = clean_f + extra[:, pad_before:pad_before + n_samples]
            inverted = bool(cfg.get("inverted_fraction", 0.0) > 0 and rng.random() < cfg["inverted_fraction"])
            display_sign = -1.0 if inverted else 1.0
            recorded = display_sign * (stimulus_locked + noise[:, pad_before:pad_before + n_samples])
            for k, level in enumerate(levels):
                row = {cols["patient_id"]: patient_id, cols["ear"]: side, cols["age"]: round(age, 3),
                       cols["intensity"]: level, cols["rate"]: ear.rate_per_s}
                window = (t_ms >= 1.0) & (t_ms <= 12.0)
                ratio = 1.0 + stimulus_locked[k, window].var() / (rms_nv[k] / 1000.0) ** 2
                row[cols["fmp"]] = round(float(ratio * rng.chisquare(15) / 15.0), 2)
                row[cols["sweeps_rejected"]] = int(rng.poisson(40 if noisy[k] else 12))
                if cols.get("sweeps_accepted"):
                    row[cols["sweeps_accepted"]] = int(sweeps[k])  # 2,000 unless sweeps_accepted_range
                row[cols["polarity"]] = polarity
                row[cols["hearing_loss"]] = cls
                row[cols["threshold"]] = "NR" if not math.isfinite(ear.threshold_db) else round(ear.threshold_db, 2)
                for name in WAVES:
                    wave = waves_per_level[k][name]
                    latency, amplitude = (measure_peak(clean_f[k], t_ms, wave["latency_ms"])
                                          if wave["present"] else (math.nan, math.nan))
                    row[cols[f"latency_{name}"]] = round(latency, 4) if wave["present"] else math.nan
                    row[cols[f"amplitude_{name}"]] = round(amplitude, 5) if wave["present"] else math.nan
                rows.append((row, recorded[k]))
                clean_rows.append(display_sign * stimulus_locked[k])
                inverted_rows.append(inverted)
    sample_names = [f"{cols['sample_prefix']}{i + 1}" for i in range(n_samples)]
    meta = pd.DataFrame([r for r, _ in rows])
    samples = pd.DataFrame(np.round(np.stack([s for _, s in rows]), 5), columns=sample_names)
    table = pd.concat([meta, samples], axis=1)
    table.attrs["display_inverted"] = inverted_rows  # the truth no export carries (a list: pandas compares attrs)
    return table, np.stack(clean_rows).astype(np.float32)


def write_synthetic_table(cfg: dict, path: str | Path, sampling_rate_hz: float, window_ms: float, seed: int,
                          columns: dict | None = None) -> tuple[Path, Path]:
    """Generate and write the table (CSV UTF-8 with BOM, or XLSX) and the clean-trace sidecar
    ``<stem>_clean.npz`` (noise-free traces for the denoising target; real data has none)."""
    from abr.data import DEFAULT_COLUMNS, write_table

    cols = dict(DEFAULT_COLUMNS if columns is None else columns)
    table, clean = generate_recordings(cfg, sampling_rate_hz, window_ms, seed, cols)
    path = Path(path)
    if cfg["output_format"] not in ("csv", "xlsx"):
        raise ConfigError(f"synthetic.output_format must be 'csv' or 'xlsx', got {cfg['output_format']!r}")
    path = path.with_suffix("." + cfg["output_format"])
    write_table(table, path)
    sidecar = clean_sidecar_path(path)
    np.savez_compressed(sidecar, clean_uv=clean, patient_id=table[cols["patient_id"]].astype(str).to_numpy().astype(str),
                        intensity_db=table[cols["intensity"]].to_numpy(dtype=np.float64),
                        display_inverted=np.asarray(table.attrs["display_inverted"], dtype=bool))
    return path, sidecar


def clean_sidecar_path(table_path: str | Path) -> Path:
    table_path = Path(table_path)
    return table_path.with_name(table_path.stem + "_clean.npz")
