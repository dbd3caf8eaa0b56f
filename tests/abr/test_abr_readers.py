"""Readers for lab exports (issue 16): long CSV, NumPy, MATLAB, ABRA/TDT CSV; units, polarity, window and
sampling rate, the amplitude-scale check. Every fixture is written here the way real files come."""

import numpy as np
import pandas as pd
import pytest
from scipy.io import savemat

from abr.data import DEFAULT_COLUMNS, load_recordings, write_table
from abr.defaults import abr_defaults
from abr.dsp import resample
from abr.preprocess_abr import build_cache
from abr.readers import AmplitudeScaleError, detect_format
from abr.synthetic import SYNTHETIC_DEFAULTS, generate_recordings
from common.errors import InputError

FS = 30000.0
SAMPLES = [str(i + 1) for i in range(450)]


def data_cfg(**changes):
    cfg = abr_defaults()["data"]
    cfg.update(changes)
    return cfg


@pytest.fixture(scope="module")
def reference():
    cfg = dict(SYNTHETIC_DEFAULTS, n_patients=3, intensity_step_db=20.0, class_probs={"NORMAL": 1.0})
    table, _ = generate_recordings(cfg, FS, 15.0, seed=4)
    return table


def long_table(reference, samples_uv, factor, tmp_path, files=False):
    rows = []
    for i, (_, row) in enumerate(reference.iterrows()):
        entry = {"Patient_ID": row["Patient_ID"], "Ear": row["Ear"], "Intensity": row["Intensity"]}
        trace = samples_uv[i] * factor
        if files:
            name = f"trace_{i:03d}.npy"
            np.save(tmp_path / name, trace)
            entry["File"] = name
        else:
            entry["Samples"] = " ".join(f"{v:.8g}" for v in trace)
        rows.append(entry)
    return pd.DataFrame(rows)


@pytest.mark.parametrize("units, factor, files", [("nV", 1e3, False), ("uV", 1.0, True)])
def test_long_csv_in_cells_or_files(reference, tmp_path, units, factor, files):
    samples = reference[SAMPLES].to_numpy(dtype=float)
    path = tmp_path / "long.csv"
    long_table(reference, samples, factor, tmp_path, files).to_csv(path, index=False)
    cfg = data_cfg(units=units)
    assert detect_format(path, cfg) == "long"
    recs = load_recordings(path, cfg)
    np.testing.assert_allclose(recs.signals_uv, samples, rtol=1e-6, atol=1e-9)
    np.testing.assert_array_equal(recs.intensity_db, reference["Intensity"].to_numpy())
    assert np.isnan(recs.age_years).all() and (recs.class_idx == -1).all()  # metadata absent: unknown


def test_npz_in_volts_and_mat_in_millivolts(reference, tmp_path):
    samples = reference[SAMPLES].to_numpy(dtype=float)
    npz = tmp_path / "ears.npz"
    np.savez(npz, signals=samples * 1e-6, intensity_db=reference["Intensity"].to_numpy(dtype=float),
             sampling_rate_hz=FS, patient_id=reference["Patient_ID"].to_numpy(dtype=str),
             ear=reference["Ear"].to_numpy(dtype=str))
    recs = load_recordings(npz, data_cfg(units="V"))
    np.testing.assert_allclose(recs.signals_uv, samples, rtol=1e-9)
    assert list(np.unique(recs.patient_id)) == sorted(reference["Patient_ID"].unique())
    mat = tmp_path / "ears.mat"  # MATLAB names, samples as columns (MATLAB users store traces column-wise)
    savemat(mat, {"abr": (samples * 1e-3).T, "levels": reference["Intensity"].to_numpy(dtype=float), "fs": FS})
    cfg = data_cfg(units="mV", array_keys={**abr_defaults()["data"]["array_keys"], "signals": "abr",
                                           "intensity_db": "levels", "sampling_rate_hz": "fs"})
    recs = load_recordings(mat, cfg)
    np.testing.assert_allclose(recs.signals_uv, samples, rtol=1e-6)
    assert recs.sampling_rate_hz == FS and any("transposed" in n for n in recs.notes)


def test_abra_tdt_export_10ms_other_rate_inverted(reference, tmp_path):
    """A TDT-like export: 10 ms at 24414 Hz, volts, vertex-negative up, one file per subject."""
    one = reference[reference["Patient_ID"] == reference["Patient_ID"].iloc[0]]
    one = one[one["Ear"] == one["Ear"].iloc[0]]
    samples = one[SAMPLES].to_numpy(dtype=float)
    fs_tdt = 24414.0625
    tdt = resample(samples, FS, fs_tdt)[:, :244]  # 244 samples ≈ 10 ms
    frame = pd.concat([pd.DataFrame({"Freq(Hz)": 0, "Level(dB)": one["Intensity"].to_numpy()}),
                       pd.DataFrame(-tdt * 1e-6)], axis=1)
    path = tmp_path / "mouse7.csv"
    frame.to_csv(path, index=False)
    cfg = data_cfg(units="V", signal_polarity="vertex_negative")
    assert detect_format(path, cfg) == "abra"
    recs = load_recordings(path, cfg)
    assert recs.window_ms == pytest.approx(10.0, abs=0.01) and recs.sampling_rate_hz == fs_tdt
    assert set(recs.patient_id) == {"mouse7"} and set(recs.ear) == {"click"}
    # onto the 15 ms model grid of a clinical recording: the first 10 ms agree, the rest is padding
    pipeline = abr_defaults()
    pipeline["preprocess"]["model_rate_hz"] = 5000.0
    grid = {"model_rate_hz": 5000.0, "n_samples": 75, "pre_stimulus_ms": 0.0}
    arrays, meta = build_cache(recs, None, pipeline, grid=grid, split=False)
    ref = load_recordings(write_table(one, tmp_path / "ref.csv"), data_cfg())
    ref_arrays, _ = build_cache(ref, None, pipeline, grid=grid, split=False)
    a = arrays["signal"] * arrays["scale_uv"][:, None]
    b = ref_arrays["signal"] * ref_arrays["scale_uv"][:, None]
    core = slice(5, 45)  # 1-9 ms, away from the edges of the 10 ms recording
    r = [np.corrcoef(x[core], y[core])[0, 1] for x, y in zip(a, b) if np.std(y[core]) > 0.02]
    assert r and min(r) > 0.95
    assert np.all(a[:, 52:] == 0.0)  # after 10.4 ms: zero padding
    assert meta["source_window_ms"] == pytest.approx(10.0, abs=0.01) and meta["n_samples"] == 75
    assert any("zero-padded" in n for n in meta["notes"])


@pytest.mark.parametrize("factor, unit", [(1e-6, "V"), (1e3, "nV")])
def test_table_in_other_units_is_refused_or_converted(reference, tmp_path, factor, unit):
    frame = reference.copy()
    frame[SAMPLES] = frame[SAMPLES].to_numpy(dtype=float) * factor
    path = write_table(frame, tmp_path / f"in_{unit}.csv")
    with pytest.raises(AmplitudeScaleError, match=rf"{path.name}: data.units: .* look like {unit} \(set data.units: {unit}"):
        load_recordings(path, data_cfg())
    recs = load_recordings(path, data_cfg(amplitude_check="convert"))
    np.testing.assert_allclose(recs.signals_uv, reference[SAMPLES].to_numpy(dtype=float), rtol=1e-6, atol=1e-9)
    assert any(n.startswith("WARNING amplitude scale") for n in recs.notes)
    recs = load_recordings(path, data_cfg(units=unit))  # stated explicitly: no warning
    assert not any("WARNING" in n for n in recs.notes)


@pytest.mark.parametrize("builder, message", [
    (lambda d: np.savez(d / "x.npz", signals=np.ones((3, 100))), r"x.npz: no array 'intensity_db'"),
    (lambda d: np.savez(d / "x.npz", levels=np.ones(3)), r"x.npz: no array 'signals'"),
    (lambda d: pd.DataFrame({"Patient_ID": [1], "Intensity": [80], "File": ["nope.npy"]}).to_csv(d / "x.csv"),
     r"x.csv: row 2 column 'File': waveform file not found"),
    (lambda d: pd.DataFrame({"Patient_ID": [1], "Intensity": [80], "Samples": ["1 2 x"]}).to_csv(d / "x.csv"),
     r"x.csv: row 2 column 'Samples': the samples are not numbers"),
])
def test_bad_files_name_the_file_and_field(tmp_path, builder, message):
    builder(tmp_path)
    path = next(p for p in tmp_path.iterdir() if p.stem == "x")
    with pytest.raises(InputError, match=message):
        load_recordings(path, data_cfg())


def test_level_offset_is_applied_and_recorded(reference, tmp_path):
    path = write_table(reference, tmp_path / "spl.csv")
    recs = load_recordings(path, data_cfg(level_reference="dB SPL", level_offset_db=-30.0,
                                          columns={**DEFAULT_COLUMNS}))
    np.testing.assert_array_equal(recs.intensity_db, reference["Intensity"].to_numpy() - 30.0)
    assert recs.level_reference == "dB SPL" and recs.level_offset_db == -30.0
