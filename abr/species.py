"""Species presets of the synthetic generator (``synthetic.species``): what an ear is made of, and the level
reference its intensities are in.

- ``human_click`` (default): click ABR in dB nHL, infants to adults (abr/synthetic.py, Hall 2007, Picton 2011).
- ``mouse_tonepip``: tone-pip ABR of anaesthetised adult mice in dB SPL. The model's wave "V" head is given
  mouse wave IV, the wave most robust near threshold and the one thresholds are read from (Scimemi et al.
  2014, C57BL/6J: five waves within 7 ms, wave IV thresholds 7-23 dB peSPL); wave IV is smaller than wave
  I (IV/I amplitude ratio < 1 in all 10 inbred strains of Zhou et al. 2006, Brain Res 1091:16-26, whose
  click thresholds were 32-43 dB SPL). Protocols step 5 or 10 dB between 10-20 and 90 dB SPL with
  512-1,000 sweeps (configs/abr/mouse_tonepip.yaml). The latency values below (I ≈ 1.4 ms, III ≈ 3.0 ms,
  IV ≈ 4.0 ms at 80 dB SPL) and the µV amplitudes are approximations consistent with those sources, not
  fitted to any data set.
"""

from __future__ import annotations

import math

import numpy as np

from abr.labels import canonical_class
from common.config import ConfigError

SPECIES_LEVEL_REFERENCE = {"human_click": "dB nHL", "mouse_tonepip": "dB SPL"}


def check_species(species: str) -> str:
    if species not in SPECIES_LEVEL_REFERENCE:
        raise ConfigError(f"synthetic.species must be one of {sorted(SPECIES_LEVEL_REFERENCE)}, got {species!r}")
    return species


def sample_mouse_age_years(rng: np.random.Generator) -> float:
    """Adult laboratory mice, 1-6 months (no maturation of latencies modelled)."""
    return float(rng.uniform(1.0, 6.0) / 12.0)


def sample_mouse_ear(patient_id: str, ear: str, age_years: float, hearing_loss: str, rate_per_s: float,
                     rng: np.random.Generator):
    """One mouse ear's threshold (dB SPL) and response parameters; wave "V" stands for mouse wave IV."""
    from abr.synthetic import NO_RESPONSE_DB, Ear

    cls = canonical_class(hearing_loss)
    i80 = rng.normal(1.4, 0.08)
    v80 = i80 + rng.normal(2.6, 0.15)  # wave IV ≈ 4.0 ms at 80 dB SPL
    gap, near, growth = 0.0, 0.4, 20.0
    v_max = float(rng.lognormal(math.log(1.2), 0.35))  # µV, subdermal needle electrodes
    i_factor, i_offset, iii_offset, broadening = 1.5, 10.0, 5.0, 1.0  # IV/I < 1; IV visible lowest
    if cls == "NORMAL":
        threshold = float(np.clip(rng.normal(30.0, 8.0), 5.0, 50.0))
    elif cls == "SNİK":  # age-related or noise-induced loss
        threshold = float(rng.uniform(50.0, 85.0))
        near, growth = 1.0, 12.0
        i_factor = 0.8
    elif cls == "İTİK":  # conductive (middle-ear effusion in some strains)
        gap = float(rng.uniform(15.0, 40.0))
        threshold = float(np.clip(rng.normal(30.0, 6.0), 5.0, 50.0)) + gap
    elif cls == "TOTAL":
        threshold = NO_RESPONSE_DB
    else:  # NÖROPATİ: wave I absent, small late wave IV at high levels in some ears
        threshold = float(rng.uniform(60.0, 85.0)) if rng.random() < 0.3 else NO_RESPONSE_DB
        v_max, broadening, i_factor, iii_offset = 0.3, 1.8, 0.0, 1e9
    return Ear(patient_id=patient_id, ear=ear, age_years=age_years, hearing_loss=cls, threshold_db=threshold,
               air_bone_gap_db=gap, near_threshold_ms=near, growth_db=growth, v80_ms=float(v80), i80_ms=float(i80),
               interpeak_iii_fraction=float(rng.normal(0.6, 0.04)), v_max_uv=v_max, i_factor=i_factor,
               i_offset_db=i_offset, iii_offset_db=iii_offset, neuropathy_broadening=broadening,
               rate_per_s=float(rate_per_s))
