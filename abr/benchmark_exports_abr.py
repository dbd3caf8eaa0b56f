"""How a trained ABR model holds up when the same recordings arrive the way labs export them (issue 16).

Takes the test-split ears of a preprocessed SYNTHETIC cache (their source table, labels removed), writes
them again as real exports come (volts, nV, inverted polarity, a 10 ms window, a TDT/ABRA CSV at
24414 Hz, no age / rate), runs ``predict_abr`` on each variant and scores the model and the classical
thresholds against the table's true thresholds (within ±10 dB, MAE), with the number of ears flagged
``unsure``, the share within ±10 dB among the others, and how far each variant moves the model's threshold of
an ear from its threshold on the plain clinical µV table (median and largest |Δ| in dB, ears moved > 10 dB):
with ``inverted_undeclared`` that is the model's sensitivity to the display polarity. A variant the readers refuse (an undeclared
unit) is reported with its error message: refusing is the expected outcome there.

Synthetic ears only: these numbers say what the readers and the model do with a change of format, not how
the model does on real recordings.

Config sections used: classical (criterion; null = fitted on the cache's validation split), predict.

    python -m abr.benchmark_exports_abr --config configs/abr/smoke.yaml --checkpoint runs/demo/abr/train --data data/abr/smoke
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd

from abr import predict_abr
from abr.data import read_table, write_table
from abr.dataset import load_cache, split_series
from abr.defaults import abr_defaults
from abr.dsp import resample
from abr.evaluation import classical_criterion
from abr.validate_abr import model_checkpoint, write_csv
from common.cli import make_parser, start_run
from common.errors import InputError, run_cli

DEFAULTS = abr_defaults()
LABELS = ("Hear_Loss", "Threshold", "FMP", "I Latency", "I Amplitude", "III Latency", "III Amplitude",
          "V Latency", "V Amplitude")
TDT_RATE_HZ = 24414.0625


def variants(base: pd.DataFrame, samples: list[str], fs: float) -> list[tuple[str, pd.DataFrame | dict, list[str]]]:
    """(name, table or {file name: ABRA table}, --set options) of each export variant."""
    x = base[samples].to_numpy(dtype=np.float64)

    def with_samples(values):
        out = base.copy()
        out[samples] = values
        return out

    n10 = int(round(fs * 0.010))
    abra = {}
    for (pid, ear), group in base.groupby(["Patient_ID", "Ear"]):
        tdt = resample(-group[samples].to_numpy(dtype=np.float64) * 1e-6, fs, TDT_RATE_HZ)[:, :int(TDT_RATE_HZ * 0.010)]
        abra[f"{pid}_{ear}.csv"] = pd.concat([pd.DataFrame({"Freq(Hz)": 0, "Level(dB)": group["Intensity"].to_numpy()}),
                                              pd.DataFrame(tdt)], axis=1)
    return [
        ("clinical_uV", base, []),
        ("volts_declared", with_samples(x * 1e-6), ["data.units=V"]),
        ("nV_undeclared", with_samples(x * 1e3), []),
        ("nV_convert", with_samples(x * 1e3), ["data.amplitude_check=convert"]),
        ("inverted_undeclared", with_samples(-x), []),
        ("inverted_declared", with_samples(-x), ["data.signal_polarity=vertex_negative"]),
        ("window_10ms", base.drop(columns=samples[n10:]), ["data.window_ms=10"]),
        ("tdt_abra_10ms_24kHz_V_inverted", abra, ["data.units=V", "data.signal_polarity=vertex_negative"]),
        ("no_age_rate", base.drop(columns=[c for c in ("Age", "Stimulus Rate") if c in base.columns]), []),
    ]


def score(ears_csv: Path, truth: dict, censor_db: float, abra: bool) -> tuple[dict, dict]:
    """(scores, the model's threshold in dB per (patient, ear)) of one variant's predict_abr ``ears.csv``."""
    with ears_csv.open(encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    model, classical, unsure, thresholds = [], [], [], {}
    for row in rows:
        key = tuple(Path(row["file"]).stem.rsplit("_", 1)) if abra else (row["patient_id"], row["ear"])
        true = truth[key]
        thresholds[key] = float(row["threshold_model"])
        model.append(abs(float(row["threshold_model"]) - true))
        value = row["threshold_classical"]
        classical.append(abs((censor_db if value.startswith(">") else float(value)) - true))
        unsure.append(row["unsure"] == "True")
    model, classical, unsure = np.array(model), np.array(classical), np.array(unsure, dtype=bool)
    return {"ears": len(rows), "model_within_10db": float(np.mean(model <= 10)), "model_mae_db": float(model.mean()),
            "classical_within_10db": float(np.mean(classical <= 10)), "classical_mae_db": float(classical.mean()),
            "unsure": int(unsure.sum()),
            "model_within_10db_not_unsure": float(np.mean(model[~unsure] <= 10)) if (~unsure).any() else math.nan
            }, thresholds


def threshold_shift(thresholds_db: dict, reference_db: dict) -> dict:
    """|model threshold − its threshold on the reference variant| over the ears both have (dB)."""
    shift = np.array([abs(thresholds_db[key] - reference_db[key]) for key in thresholds_db if key in reference_db])
    if shift.size == 0:
        return {"shift_median_db": math.nan, "shift_max_db": math.nan, "ears_shifted_over_10db": 0}
    return {"shift_median_db": float(np.median(shift)), "shift_max_db": float(shift.max()),
            "ears_shifted_over_10db": int((shift > 10).sum())}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True, checkpoint=True)
    args = parser.parse_args(argv)
    run = start_run(args, domain="abr", defaults=DEFAULTS, argv=argv)
    cfg = run.cfg
    _, ckpt = model_checkpoint(args.checkpoint, run.device)
    data_dir = args.data or Path(ckpt["preprocessing"]["cache"])
    arrays, meta = load_cache(data_dir)
    source = Path(meta["source"])
    if not source.is_file():
        raise InputError(f"meta.json names source table {source}, which is not there", data_dir)
    table = read_table(source)
    test = split_series(arrays, "test")
    if test.size == 0:
        raise InputError("the 'test' split has no ears", data_dir)
    patients = set(arrays["series_patient"][test])
    table = table[table["Patient_ID"].astype(str).isin(patients)].reset_index(drop=True)
    run.record_inputs_valid()
    censor = float(meta["threshold_censor_db"])
    truth = {}
    for (pid, ear), group in table.groupby(["Patient_ID", "Ear"]):
        value = str(group["Threshold"].iloc[0]).strip().upper()
        truth[(str(pid), str(ear))] = censor if value in ("NR", "INF") else min(float(value), censor)
    criterion, criterion_source = classical_criterion(arrays, meta, cfg)
    run.log(f"{len(truth)} test ears of {source}; classical criterion {criterion:g} ({criterion_source})")
    fs = float(meta["source_sampling_rate_hz"])
    samples = [c for c in table.columns if c.isdigit()]
    base = table.drop(columns=[c for c in LABELS if c in table.columns])
    results, reference_thresholds = [], None
    for name, export, options in variants(base, samples, fs):
        folder = run.run_dir / "exports" / name
        folder.mkdir(parents=True, exist_ok=True)
        abra = isinstance(export, dict)
        for file_name, frame in (export.items() if abra else [("export.csv", export)]):
            if abra:
                frame.to_csv(folder / file_name, index=False)
            else:
                write_table(frame, folder / file_name)
        predict_args = ["--checkpoint", str(args.checkpoint), "--data", str(folder), "--device", str(run.device),
                        "--output-dir", str(run.run_dir / "predictions" / name), "--set",
                        f"classical.criterion={criterion}", "--set", "predict.figure_ears=0"]
        if args.config:
            predict_args += ["--config", str(args.config)]
        for option in options:
            predict_args += ["--set", option]
        try:
            predict_abr.main(predict_args)
        except InputError as exc:
            results.append({"variant": name, "options": " ".join(options), "refused": str(exc)})
            run.log(f"{name}: refused ({str(exc)[-120:]})")
            continue
        scores, thresholds = score(run.run_dir / "predictions" / name / "ears.csv", truth, censor, abra)
        reference_thresholds = thresholds if reference_thresholds is None else reference_thresholds  # clinical µV
        row = {"variant": name, "options": " ".join(options), "refused": "", **scores,
               **threshold_shift(thresholds, reference_thresholds)}
        results.append(row)
        run.log(f"{name}: model ±10 dB {row['model_within_10db']:.3f} (MAE {row['model_mae_db']:.2f}), classical "
                f"{row['classical_within_10db']:.3f} ({row['classical_mae_db']:.2f}), unsure {row['unsure']}; "
                f"model threshold moved {row['shift_median_db']:.1f} dB median, {row['shift_max_db']:.1f} dB at most "
                f"({row['ears_shifted_over_10db']} ears > 10 dB) from clinical µV")
    header = ["variant", "options", "refused", "ears", "model_within_10db", "model_mae_db", "classical_within_10db",
              "classical_mae_db", "unsure", "model_within_10db_not_unsure", "shift_median_db", "shift_max_db",
              "ears_shifted_over_10db"]
    write_csv(run.run_dir / "variants.csv", header, [[r.get(k, "") for k in header] for r in results])
    headline = {r["variant"]: (r.get("model_within_10db") if not r["refused"] else "refused") for r in results}
    return run.finish({"headline": headline, "variants": results, "criterion": criterion,
                       "notes": "Synthetic test ears re-exported in other formats; not real recordings."})


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
