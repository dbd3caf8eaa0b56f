"""Species presets, per-ear level steps, sweep counts with residual noise ∝ 1/√sweeps, and level references
carried from the input to the checkpoint and back (refused when they differ and nothing converts them)."""

import numpy as np
import pytest

from abr.levels import canonical_level_reference, check_input_reference, model_level_reference
from abr.synthetic import SYNTHETIC_DEFAULTS, generate_recordings
from common.config import ConfigError
from common.errors import InputError

NORMAL_ONLY = {"NORMAL": 1.0, "SNIK": 0, "ITIK": 0, "TOTAL": 0, "NOROPATI": 0}


def test_level_reference_names():
    assert canonical_level_reference("nhl") == canonical_level_reference("dBnHL") == "dB nHL"
    assert canonical_level_reference("dB SPL") == "dB SPL" and canonical_level_reference("pespl") == "dB peSPL"
    with pytest.raises(InputError, match="data.level_reference"):
        canonical_level_reference("dB A")


def test_other_reference_refused_unless_converted():
    human = {"level_reference": "dB nHL", "level_offset_db": 0.0}
    assert model_level_reference({}) == "dB nHL"  # checkpoints from before references were recorded
    assert check_input_reference({"level_reference": "nHL", "level_offset_db": 0.0}, human, "x") is None
    with pytest.raises(InputError, match="trained on levels in dB nHL"):
        check_input_reference({"level_reference": "dB SPL", "level_offset_db": 0.0}, human, "x")
    with pytest.raises(InputError, match="converted_level_reference"):  # an offset alone names no reference
        check_input_reference({"level_reference": "dB SPL", "level_offset_db": -20.0}, human, "x")
    note = check_input_reference({"level_reference": "dB SPL", "level_offset_db": -20.0,
                                  "converted_level_reference": "dB nHL"}, human, "x")
    assert "dB SPL" in note and "-20" in note


def test_mouse_preset_steps_and_sweeps():
    cfg = dict(SYNTHETIC_DEFAULTS, species="mouse_tonepip", n_patients=8, intensity_min_db=10.0,
               intensity_max_db=90.0, intensity_steps_db=[5.0, 10.0], class_probs=NORMAL_ONLY, noisy_fraction=0.0,
               noise_rms_nv=[100.0, 100.0], noise_reference_sweeps=512, sweeps_accepted_range=[128, 2048],
               response_floor_uv=0.3)
    table, clean = generate_recordings(cfg, 24414.0625, 10.0, seed=2)
    steps = {round(float(np.diff(np.sort(g["Intensity"].to_numpy())).min())) for _, g in table.groupby(["Patient_ID", "Ear"])}
    assert steps == {5, 10}
    assert table["Age"].max() < 0.6  # adult mice, not human ages
    assert table["Threshold"].astype(float).between(5.0, 50.0).all()
    v = table["V Latency"].dropna()
    # wave I at 90 dB SPL: 1.4 ms at 80 dB - 0.2 ms, sd 0.09 ms over ears and recordings: above 0.8 ms
    assert v.between(3.3, 7.5).all() and table["I Latency"].dropna().between(0.8, 4.0).all()
    samples = table[[str(i + 1) for i in range(clean.shape[1])]].to_numpy()
    residual_nv = 1000.0 * (samples - clean).std(axis=1)
    expected_nv = 100.0 * np.sqrt(512.0 / table["Sweeps Accepted"].to_numpy())
    assert table["Sweeps Accepted"].nunique() > 10
    np.testing.assert_allclose(residual_nv, expected_nv, rtol=0.02)


def test_preprocess_refuses_species_in_the_wrong_reference(tiny_config, tmp_path):
    from abr.preprocess_abr import main

    with pytest.raises(ConfigError, match="data.level_reference"):
        main(["--config", str(tiny_config), "--output-dir", str(tmp_path / "c"),
              "--set", "synthetic.species=mouse_tonepip"])


def test_predict_refuses_spl_input_for_an_nhl_model(trained, tiny_config, tiny_cache, tmp_path):
    from abr import predict_abr

    with pytest.raises(InputError, match="trained on levels in dB nHL"):
        predict_abr.main(["--config", str(tiny_config), "--data", str(tiny_cache / "synthetic_abr.csv"),
                          "--checkpoint", str(trained[0]), "--output-dir", str(tmp_path / "p"),
                          "--set", "data.level_reference=dB SPL"])
    assert not (tmp_path / "p" / "config.yaml").exists()


def test_ears_outside_training_are_named():
    from abr.unsure import outside_training

    meta = {"intensity_levels_db": [0.0, 20.0, 40.0, 60.0, 80.0, 100.0], "intensity_step_db": 20.0,
            "static_features": ["intensity_01", "log10_scale_uv"], "static_mean": [0.5, -0.7], "static_std": [0.3, 0.2]}
    inside = np.array([[0.2, -0.8], [0.6, -0.6]])
    assert outside_training(np.array([20.0, 60.0]), inside, meta, max_z=3.0) == []
    reasons = outside_training(np.array([-30.0, 60.0]), inside + [0.0, 1.0], meta, max_z=3.0)
    assert reasons[0].startswith("levels outside the trained 0-100 dB") and "recording RMS +" in reasons[1]


def test_interval_coverage():
    from abr.evaluation import interval_coverage

    out = interval_coverage(np.array([0.0, 1.0, 5.0, 30.0]), np.array([1.0, 1.0, 2.0, 5.0]))
    assert out == {"coverage_95": 0.5, "median_sd_db": 1.5, "n": 4}
    assert interval_coverage(np.array([]), np.array([]))["n"] == 0


def test_unsure_rules_name_their_reason():
    from abr.unsure import unsure_reasons

    meta = {"intensity_levels_db": [0.0, 50.0, 100.0], "intensity_step_db": 50.0, "static_features": []}
    cuts = {"unsure_sd_db": 10.0, "unsure_outlier_prob": 0.5, "unsure_disagreement_db": 20.0, "unsure_input_z": 3.0}
    levels, static = np.array([20.0, 40.0, 60.0]), np.zeros((3, 0))
    assert unsure_reasons(30.0, 4.0, 0.1, 35.0, "", levels, 20.0, static, meta, cuts) == []
    assert unsure_reasons(30.0, 12.0, 0.1, 35.0, "", levels, 20.0, static, meta, cuts) == ["sd>10dB"]
    assert unsure_reasons(30.0, 4.0, 0.1, 55.0, "", levels, 20.0, static, meta, cuts) == ["model and classical disagree"]
    assert unsure_reasons(30.0, 4.0, 0.1, 80.0, ">", levels, 20.0, static, meta, cuts) == ["classical finds no response"]
    converted = unsure_reasons(30.0, 4.0, 0.1, 35.0, "", levels, 20.0, static, meta, cuts, converted_from="dB SPL")
    assert converted == ["levels converted from dB SPL (the model never saw this stimulus)"]


def test_mouse_preset_classical_window_holds_mouse_wave_iv():
    """The mouse preset's classical wave V window (mouse wave IV) contains the generator's wave IV latencies at
    every level; the human click window it replaces misses most of them (it starts after wave IV)."""
    from pathlib import Path

    from abr.classical import wave_v_window_ms
    from abr.defaults import abr_defaults
    from common.config import load_config

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(root / "configs" / "abr" / "mouse_tonepip.yaml", defaults=abr_defaults())
    syn = dict(cfg["synthetic"], n_patients=12)
    table, _ = generate_recordings(syn, 24414.0625, 15.0, seed=3)
    rows = table.dropna(subset=["V Latency"])
    assert len(rows) > 100

    def inside(classical: dict) -> float:
        windows = [wave_v_window_ms(i, classical["v_window_80db_ms"], classical["v_window_slope_ms_per_10db"])
                   for i in rows["Intensity"].astype(float)]
        lat = rows["V Latency"].astype(float).to_numpy()
        return float(np.mean([lo <= x <= hi for x, (lo, hi) in zip(lat, windows)]))

    assert inside(cfg["classical"]) == 1.0
    assert inside(abr_defaults()["classical"]) < 0.5
