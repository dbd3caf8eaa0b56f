"""predict_abr on what a lab has: no labels, no split, other layouts and units, manual overrides (issue 16)."""

import csv

import pandas as pd
import pytest

from abr import predict_abr
from abr.data import read_table, write_table
from abr.dsp import resample
from common.errors import InputError

LABELS = ["Age", "Stimulus Rate", "Hear_Loss", "Threshold", "FMP", "Sweeps Rejected", "Sweeps Accepted",
          "Stimulus Polarity", "I Latency", "I Amplitude", "III Latency", "III Amplitude", "V Latency", "V Amplitude"]


def rows(path):
    with open(path, encoding="utf-8", newline="") as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def exports(tiny_cache, tmp_path_factory):
    """A folder with an unlabelled clinical table (2 patients) and a TDT-like ABRA file (10 ms, V, inverted)."""
    table = read_table(tiny_cache / "synthetic_abr.csv")
    keep = table[table["Patient_ID"].isin(sorted(table["Patient_ID"].unique())[:2])]
    folder = tmp_path_factory.mktemp("abr_exports")
    write_table(keep.drop(columns=[c for c in LABELS if c in keep.columns]), folder / "clinic.csv")
    one = keep[(keep["Patient_ID"] == keep["Patient_ID"].iloc[0]) & (keep["Ear"] == keep["Ear"].iloc[0])]
    samples = one[[str(i + 1) for i in range(450)]].to_numpy(dtype=float)
    tdt = resample(samples, 30000.0, 24414.0625)[:, :244]
    abra = tmp_path_factory.mktemp("abr_tdt") / "mouse1.csv"
    pd.concat([pd.DataFrame({"Freq(Hz)": 0, "Level(dB)": one["Intensity"].to_numpy()}),
               pd.DataFrame(-tdt * 1e-6)], axis=1).to_csv(abra, index=False)
    return folder, abra, keep


def test_predict_folder_then_overrides_are_reapplied(trained, tiny_config, exports, tmp_path):
    run_dir, _ = trained
    folder, _, keep = exports
    out = tmp_path / "pred"
    args = ["--config", str(tiny_config), "--data", str(folder), "--checkpoint", str(run_dir), "--output-dir", str(out),
            "--set", "predict.figure_ears=1"]
    summary = predict_abr.main(args)
    ears = rows(out / "ears.csv")
    n_ears = keep.groupby(["Patient_ID", "Ear"]).ngroups
    assert summary["headline"]["n_ears"] == len(ears) == n_ears
    assert summary["headline"]["polarity_tta"] is True  # the default, recorded
    assert len(rows(out / "recordings.csv")) == len(keep)
    for ear in ears:
        assert ear["level_reference"] == "dB nHL" and float(ear["threshold_model_sd"]) > 0
        assert ear["classical_censoring"] in ("", "<=", ">") and ear["threshold_source"] == "model"
        assert abs(sum(float(v) for k, v in ear.items() if k.startswith("p_")) - 1.0) < 1e-3
    rec = rows(out / "recordings.csv")[0]
    assert {"latency_I", "latency_III", "latency_V", "amplitude_V", "classical_v_latency"} <= set(rec)
    assert len(summary["figures"]) == 1 and (out / summary["figures"][0]).is_file()
    assert (out / "overrides_template.csv").is_file()

    first = ears[0]
    level = rows(out / "recordings.csv")[0]
    overrides = pd.DataFrame([
        {"patient_id": first["patient_id"], "ear": first["ear"], "intensity_db": "", "field": "threshold",
         "value": "35", "who": "AB", "when": "2026-12-04T10:00"},
        {"patient_id": level["patient_id"], "ear": level["ear"], "intensity_db": level["intensity_db"],
         "field": "latency_V", "value": "7.25", "who": "AB", "when": "2026-12-04T10:01"},
        {"patient_id": "NOBODY", "ear": "R", "intensity_db": "", "field": "threshold", "value": "20", "who": "AB",
         "when": "2026-12-04T10:02"}])
    overrides.to_csv(out / "overrides.csv", index=False)
    again = predict_abr.main(args)  # a later run into the same folder re-applies overrides.csv
    ear = rows(out / "ears.csv")[0]
    assert float(ear["threshold_final"]) == 35.0 and "override by AB at 2026-12-04T10:00" in ear["threshold_source"]
    assert float(ear["threshold_model"]) == pytest.approx(float(first["threshold_model"]))  # the model's own kept
    rec = rows(out / "recordings.csv")[0]
    assert float(rec["latency_V"]) == 7.25 and "latency_V: override by AB" in rec["override"]
    assert again["headline"]["overrides_applied"] == 2 and again["headline"]["overrides_unmatched"] == 1


def test_predict_tdt_export_in_volts_inverted(trained, tiny_config, exports, tmp_path):
    run_dir, _ = trained
    _, abra, _ = exports
    common = ["--config", str(tiny_config), "--data", str(abra), "--checkpoint", str(run_dir),
              "--set", "predict.figure_ears=0"]
    with pytest.raises(InputError, match=r"mouse1.csv: data.units: .*look like V"):
        predict_abr.main(common + ["--output-dir", str(tmp_path / "refused")])
    summary = predict_abr.main(common + ["--output-dir", str(tmp_path / "ok"), "--set", "data.units=V",
                                         "--set", "data.signal_polarity=vertex_negative",
                                         "--set", "data.level_reference=dB SPL", "--set", "data.level_offset_db=-20",
                                         "--set", "data.converted_level_reference=dB nHL"])
    ears = rows(tmp_path / "ok" / "ears.csv")
    assert summary["headline"]["n_ears"] == 1 and ears[0]["patient_id"] == "mouse1"
    assert float(ears[0]["source_window_ms"]) == pytest.approx(10.0, abs=0.01)
    assert ears[0]["level_reference"] == "dB SPL" and "levels converted from dB SPL" in ears[0]["unsure_reasons"]
    levels = [float(r["intensity_db"]) for r in rows(tmp_path / "ok" / "recordings.csv")]
    assert min(levels) >= 0.0  # given back in the input's reference (the offset is undone)
    lo, hi = (float(v) for v in ears[0]["levels_tested"].split("-"))
    assert (lo, hi) == (min(levels), max(levels))


def test_bad_override_file_names_the_field(trained, tiny_config, exports, tmp_path):
    run_dir, _ = trained
    folder, _, _ = exports
    bad = tmp_path / "over.csv"
    pd.DataFrame([{"patient_id": "P1", "ear": "R", "intensity_db": "", "field": "threshold", "value": "30",
                   "who": "", "when": ""}]).to_csv(bad, index=False)
    with pytest.raises(InputError, match=r"over.csv: row 2: 'who' and 'when' are required"):
        predict_abr.main(["--config", str(tiny_config), "--data", str(folder), "--checkpoint", str(run_dir),
                          "--output-dir", str(tmp_path / "p"), "--overrides", str(bad)])


def test_benchmark_exports_scores_every_variant(trained, tiny_config, tiny_cache, tmp_path):
    from abr import benchmark_exports_abr

    run_dir, _ = trained
    summary = benchmark_exports_abr.main(["--config", str(tiny_config), "--checkpoint", str(run_dir), "--data",
                                          str(tiny_cache), "--output-dir", str(tmp_path / "bench"),
                                          "--set", "classical.criterion=0.5"])
    by_name = {v["variant"]: v for v in summary["variants"]}
    assert "look like nV" in by_name["nV_undeclared"]["refused"]
    same = ("clinical_uV", "volts_declared", "nV_convert", "inverted_declared")  # declared formats: same numbers
    assert len({round(by_name[n]["model_mae_db"], 6) for n in same}) == 1
    assert by_name["tdt_abra_10ms_24kHz_V_inverted"]["ears"] == by_name["clinical_uV"]["ears"] > 0
    assert (tmp_path / "bench" / "variants.csv").is_file()


def test_predict_with_unknown_polarity_finds_the_inverted_sign(trained, tiny_config, exports, tmp_path):
    """The same inverted TDT export declared vertex_negative and read with polarity unknown: the model's
    outputs are the same (polarity averaging), and the classical wave V search finds the ear inverted and
    picks the same peaks as with the sign declared."""
    run_dir, _ = trained
    _, abra, _ = exports
    common = ["--config", str(tiny_config), "--data", str(abra), "--checkpoint", str(run_dir),
              "--set", "predict.figure_ears=0", "--set", "data.units=V", "--set", "data.level_reference=dB SPL",
              "--set", "data.level_offset_db=-20", "--set", "data.converted_level_reference=dB nHL",
              "--set", "classical.criterion=0.5"]
    predict_abr.main(common + ["--output-dir", str(tmp_path / "declared"), "--set",
                               "data.signal_polarity=vertex_negative"])
    predict_abr.main(common + ["--output-dir", str(tmp_path / "unknown"), "--set", "data.signal_polarity=unknown"])
    declared, unknown = rows(tmp_path / "declared" / "ears.csv")[0], rows(tmp_path / "unknown" / "ears.csv")[0]
    assert declared["classical_wave_v_sign"] == "1" and unknown["classical_wave_v_sign"] == "-1"
    assert float(unknown["threshold_model"]) == pytest.approx(float(declared["threshold_model"]), abs=1e-4)
    assert unknown["threshold_classical"] == declared["threshold_classical"]
    lat_declared = [r["classical_v_latency"] for r in rows(tmp_path / "declared" / "recordings.csv")]
    lat_unknown = [r["classical_v_latency"] for r in rows(tmp_path / "unknown" / "recordings.csv")]
    assert lat_unknown == lat_declared
    log = (tmp_path / "unknown" / "log.txt").read_text(encoding="utf-8")
    assert "data.signal_polarity = unknown" in log
