"""Predict on new ABR recordings: no labels, no split. For a clinician or a lab reviewing their own exports.

``--data`` is one file or a folder of files in any layout abr/readers.py reads (clinical table, long CSV,
.npz / .npy / .mat, ABRA/TDT CSV; reader options in the ``data`` section: units, polarity, sampling rate,
level reference). Each recording is band-passed and resampled onto the checkpoint's grid (cropped or
zero-padded to its window; the original window is reported); age, rate and class may be unknown.

Outputs (``--output-dir``):
- ``ears.csv``: per ear (series of levels) the model threshold in the INPUT's level reference with its
  standard deviation (``threshold_model_sd``: the model's σ scaled by the checkpoint's val fit and, for an
  unsure ear, widened by the model-classical gap, abr/unsure.py; ``threshold_model_sd_own`` without the
  widening) and outlier probability, the classical estimate beside it (with its censoring "<=" /
  ">" when every / no level responded), an ``unsure`` flag with its reasons (large σ, likely outlier,
  model outside the tested range, model and classical disagree, input outside what the model was trained on:
  levels beyond the trained range or converted from another level reference (abr/levels.py; an input in
  another reference without a declared conversion is refused), a recording RMS far from training, a window
  not seen in training), class probabilities, and the final
  threshold after manual overrides with their provenance;
- ``recordings.csv``: per recording, waves I / III / V: presence probability, latency (ms) with σ,
  amplitude (µV); the classical wave V pick; overrides applied;
- ``figures/ear_<file>_<patient>_<ear>.png|pdf``: stacked waveforms, picked peaks, thresholds;
- ``overrides_template.csv`` (when no override file exists yet) and ``summary.json``.

Model outputs (thresholds, classes, wave probabilities, latencies, amplitudes) are averaged over each recording
and its inverse (× −1) when ``predict.polarity_tta`` is true (the default; ``headline.polarity_tta`` records it),
so they do not depend on the recording's sign; ``data.signal_polarity`` still orients the traces drawn and the
classical wave V search (``unknown``: the search finds each ear's sign, ``classical_wave_v_sign`` in ears.csv).
See abr/evaluation.py:average_over_polarity.

Manual overrides (``--overrides FILE``, or ``predict.overrides``, or else ``<output-dir>/overrides.csv``
when it exists, so editing that file and running again re-applies it): CSV with columns
``patient_id, ear, intensity_db, field, value, who, when[, note, file]``; ``field`` is ``threshold`` (ear
level, ``intensity_db`` empty, value in the input's level reference, or NR) or ``latency_<wave>`` /
``amplitude_<wave>`` (a recording; wave I, III or V; empty value = wave absent). ``who`` and ``when`` are
required. An override that matches no ear or recording is reported, never silently dropped.

Config sections used: data (reader options), predict, classical (plus the checkpoint's preprocessing metadata).

    python -m abr.predict_abr --data exports/ --checkpoint runs/abr/train/cpu_medium --output-dir runs/abr/predict/clinic
"""

from __future__ import annotations

import copy
import math
from pathlib import Path

import numpy as np
import pandas as pd

from abr.classical import analyse_series, wave_v_polarity
from abr.data import TableError, load_recordings
from abr.dataset import ABRSeriesDataset
from abr.defaults import abr_defaults
from abr.evaluation import classical_inputs, predict
from abr.labels import CLASS_ASCII, WAVES
from abr.levels import check_input_reference, model_level_reference
from abr.preprocess_abr import build_cache
from abr.unsure import checkpoint_sd_scale, reported_threshold_sd, unsure_reasons
from abr.validate_abr import model_checkpoint, write_csv
from common.cli import make_parser, start_run
from common.errors import InputError, NothingProcessedError, run_cli

DEFAULTS = abr_defaults()
SUFFIXES = (".csv", ".tsv", ".txt", ".xlsx", ".xlsm", ".xls", ".npz", ".npy", ".mat")
OVERRIDE_COLUMNS = ("patient_id", "ear", "intensity_db", "field", "value", "who", "when")
OVERRIDE_FIELDS = ("threshold",) + tuple(f"{kind}_{w}" for kind in ("latency", "amplitude") for w in WAVES)


class OverrideError(InputError):
    """An override file that cannot be applied as written."""


# ------------------------------------------------------------------------------------------- inputs
def input_files(path: Path) -> list[Path]:
    """``path`` itself, or the supported files of a folder (sorted; the outputs of this script skipped)."""
    if path is None:
        raise InputError("--data FILE_OR_FOLDER is required (recordings to analyse)")
    path = Path(path)
    if path.is_file():
        return [path]
    if not path.is_dir():
        raise InputError("not found", path)
    skip = {"ears.csv", "recordings.csv", "overrides.csv", "overrides_template.csv"}
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in SUFFIXES and p.name not in skip
                   and not p.name.endswith("_clean.npz"))
    if not files:
        raise NothingProcessedError(f"no files with a supported suffix ({', '.join(SUFFIXES)})", path)
    return files


def read_overrides(path: Path) -> pd.DataFrame:
    """The override table, checked: required columns, known fields, who and when given."""
    try:
        table = pd.read_csv(path, dtype=str, keep_default_na=False, encoding="utf-8-sig")
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError) as exc:
        raise OverrideError(f"not a readable CSV ({exc})", path) from exc
    table.columns = [str(c).strip() for c in table.columns]
    missing = [c for c in OVERRIDE_COLUMNS if c not in table.columns]
    if missing:
        raise OverrideError(f"column(s) {', '.join(missing)} missing; expected {', '.join(OVERRIDE_COLUMNS)}", path)
    for i, row in table.iterrows():
        where = f"row {i + 2}"
        if row["field"].strip() not in OVERRIDE_FIELDS:
            raise OverrideError(f"{where} column 'field': {row['field']!r} is not one of {', '.join(OVERRIDE_FIELDS)}",
                                path)
        if not row["who"].strip() or not row["when"].strip():
            raise OverrideError(f"{where}: 'who' and 'when' are required (provenance of a manual reading)", path)
        if row["field"].strip() != "threshold" and not row["intensity_db"].strip():
            raise OverrideError(f"{where} column 'intensity_db': a {row['field']} override names its recording's level",
                                path)
    return table


def override_value(text: str, field: str, where: str, path: Path) -> float:
    text = str(text).strip()
    if text == "":
        return math.nan  # a wave marked absent
    if field == "threshold" and text.upper() in ("NR", "NORESPONSE") or text.startswith(">"):
        return math.inf
    try:
        return float(text)
    except ValueError:
        raise OverrideError(f"{where} column 'value': {text!r} is not a number", path) from None


# ------------------------------------------------------------------------------------------- outputs
def ear_figure(t_ms, traces_uv, levels, picks, thr_model, thr_sd, thr_classical, censoring, thr_final, title,
               path_stem) -> list[Path]:
    """Stacked waveforms (lowest level at the bottom), model peaks (I/III/V where present), the classical
    wave V, the model and classical thresholds as lines between the levels."""
    from common.plotting import OKABE_ITO, plt, save_figure

    fig, ax = plt.subplots(figsize=(4.0, 1.2 + 0.45 * len(levels)))
    spacing = max(float(np.abs(traces_uv).max()) * 0.9, 0.15) if traces_uv.size else 1.0
    for k, (trace, level) in enumerate(zip(traces_uv, levels)):
        offset = k * spacing
        ax.plot(t_ms, trace + offset, color="0.2", linewidth=0.7)
        ax.text(t_ms[-1], offset, f" {level:g}", fontsize=6, va="center")
        for w, wave in enumerate(WAVES):
            if picks["prob"][k, w] >= 0.5 and np.isfinite(picks["latency"][k, w]):
                ax.plot(picks["latency"][k, w], picks["amplitude"][k, w] + offset, "o", ms=3,
                        color=OKABE_ITO[1 + w], label=f"model {wave}" if k == 0 else None)
        if picks["classical_response"][k]:
            ax.plot(picks["classical_latency"][k], picks["classical_amplitude"][k] + offset, "x", ms=4,
                    color=OKABE_ITO[0], label="classical V" if k == 0 else None)

    def level_to_y(db):  # trace k sits at k·spacing; a threshold between two levels is interpolated
        if not np.isfinite(db) or len(levels) == 0:
            return None
        return float(np.interp(db, levels, np.arange(len(levels)))) * spacing

    for value, style, label in ((thr_model, "-", f"model {thr_model:.0f} ± {thr_sd:.0f}"),
                                (thr_classical, ":", f"classical {censoring}{thr_classical:.0f}"),
                                (thr_final, "--", f"final {thr_final:.0f}")):
        y = level_to_y(value)
        if y is not None:
            ax.axhline(y, linestyle=style, linewidth=0.8, color="0.4", label=label)
    ax.set_title(title, fontsize=7)
    ax.set_xlabel("time (ms)")
    ax.set_ylabel("level (input reference), µV offsets", fontsize=7)
    ax.set_yticks([])
    ax.legend(fontsize=5, loc="upper right")
    fig.tight_layout()
    return save_figure(fig, path_stem)


def safe_name(text: str) -> str:
    return "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in str(text))[:60] or "x"


# ------------------------------------------------------------------------------------------- main
def analyse_file(path: Path, cfg: dict, model, ckpt: dict, device, run) -> tuple[list[dict], list[dict], dict]:
    """Model and classical analysis of one input file: (ear rows, recording rows, figure inputs per ear)."""
    ckpt_meta = ckpt["preprocessing"]
    recs = load_recordings(path, cfg["data"])
    for note in recs.notes:
        run.log(f"  {path.name}: {note}")
    pcfg = copy.deepcopy(cfg)
    pcfg["preprocess"]["filter_hz"] = ckpt_meta.get("filter_hz", pcfg["preprocess"]["filter_hz"])
    grid = {"model_rate_hz": ckpt_meta["model_rate_hz"], "n_samples": ckpt_meta["n_samples"],
            "pre_stimulus_ms": -float(ckpt_meta["time_ms"][0])}
    arrays, meta = build_cache(recs, None, pcfg, grid=grid, split=False,
                               static_features=ckpt_meta.get("static_features", ["log_age_months", "intensity_01",
                                                                                  "rate_per_50s", "log10_scale_uv"]))
    for note in meta["notes"][len(recs.notes):]:
        run.log(f"  {path.name}: {note}")
    series = np.arange(arrays["series_rows"].shape[0])
    dataset = ABRSeriesDataset(arrays, ckpt_meta, series)  # the training statistics standardize the inputs
    pred = predict(model, dataset, device, cfg["predict"]["batch_size"], polarity_tta=cfg["predict"]["polarity_tta"])
    t_ms = np.asarray(ckpt_meta["time_ms"])
    criterion = float(cfg["classical"]["criterion"] if cfg["classical"]["criterion"] is not None
                      else cfg["predict"]["classical_criterion"])
    polarity = wave_v_polarity(cfg["classical"], cfg["data"].get("signal_polarity"))
    offset = recs.level_offset_db
    recorded_ms = recs.window_ms - recs.pre_stimulus_ms  # after the stimulus, as recorded
    model_ms = float(t_ms[-1]) + 1000.0 / float(ckpt_meta["model_rate_hz"])
    trained = (ckpt.get("config") or {}).get("preprocess") or {}  # windows the model saw zero-padded in training
    shortest_trained_ms = (float(trained["short_window_ms"][0]) if trained.get("short_window_fraction")
                           else model_ms)
    names = list(ckpt_meta["class_names"])
    pcut = cfg["predict"]
    sd_scale, _ = checkpoint_sd_scale(ckpt)
    rec_pos = {int(r): i for i, r in enumerate(pred["rows"])}
    ears, recordings, figures_in = [], [], {}
    for i, (s, (rows, signals, levels)) in enumerate(zip(pred["series"], classical_inputs(arrays, pred["series"]))):
        levels_in = levels - offset
        tested = (float(levels_in.min()), float(levels_in.max()))
        cl = analyse_series(signals, levels, t_ms, cfg["classical"], criterion, meta["threshold_censor_db"],
                            meta["intensity_step_db"], polarity=polarity)
        thr = float(pred["threshold_db"][i]) - offset
        sd = sd_scale * float(pred["threshold_sd"][i])  # the model's σ, scaled by the val fit (abr/unsure.py)
        outlier = float(pred["outlier_prob"][i])
        thr_cl = float(cl["threshold_db"]) - offset if cl["threshold_censoring"] != ">" else math.inf
        reasons = unsure_reasons(float(pred["threshold_db"][i]), sd, outlier, float(cl["threshold_db"]),
                                 cl["threshold_censoring"], levels, meta["intensity_step_db"],
                                 arrays["static_raw"][rows], ckpt_meta, pcut,
                                 converted_from=recs.level_reference if offset != 0 else None)
        if recorded_ms < min(model_ms - 0.5, shortest_trained_ms):
            reasons.append(f"short window ({recorded_ms:.1f} of {model_ms:.1f} ms, not seen in training)")
        sd_model = sd
        sd = float(reported_threshold_sd(float(pred["threshold_sd"][i]), sd_scale, float(pred["threshold_db"][i]),
                                         float(cl["threshold_db"]), bool(reasons), widen=bool(pcut["widen_unsure_sd"])))
        probs = pred["class_probs"][i]
        patient, ear = str(arrays["series_patient"][s]), str(arrays["series_ear"][s])
        ears.append({"file": path.name, "patient_id": patient, "ear": ear, "n_levels": int(len(rows)),
                     "levels_tested": f"{tested[0]:g}-{tested[1]:g}", "level_reference": recs.level_reference,
                     "threshold_model": round(thr, 2), "threshold_model_sd": round(sd, 2),
                     "threshold_model_sd_own": round(sd_model, 2),
                     "threshold_outlier_prob": round(outlier, 3),
                     "threshold_classical": round(thr_cl, 2) if math.isfinite(thr_cl) else f">{tested[1]:g}",
                     "classical_censoring": cl["threshold_censoring"],
                     "classical_wave_v_sign": int(cl["wave_v_sign"]), "unsure": bool(reasons),
                     "unsure_reasons": "; ".join(reasons), "class_model": names[int(np.argmax(probs))],
                     **{f"p_{CLASS_ASCII.get(n, n)}": round(float(p), 4) for n, p in zip(names, probs)},
                     "source_window_ms": round(recs.window_ms, 3), "source_sampling_rate_hz": recs.sampling_rate_hz})
        picks = {"prob": [], "latency": [], "amplitude": [], "classical_response": cl["response"],
                 "classical_latency": cl["latency_ms"],
                 "classical_amplitude": cl["wave_v_sign"] * cl["amplitude_uv"]}  # on the trace as drawn
        for k, r in enumerate(rows):
            j = rec_pos[int(r)]
            scale = float(arrays["scale_uv"][r])
            entry = {"file": path.name, "table_row": int(arrays["row_number"][r]), "patient_id": patient, "ear": ear,
                     "intensity_db": float(levels_in[k])}
            for w, wave in enumerate(WAVES):
                entry[f"p_{wave}"] = round(float(pred["exist_prob"][j, w]), 4)
                entry[f"latency_{wave}"] = round(float(pred["latency_ms"][j, w]), 4)
                entry[f"latency_{wave}_sd"] = round(float(pred["latency_sd"][j, w]), 4)
                entry[f"amplitude_{wave}"] = round(float(pred["amp_rel"][j, w]) * scale, 5)
            entry.update({"classical_v_response": bool(cl["response"][k]),
                          "classical_v_latency": round(float(cl["latency_ms"][k]), 4),
                          "classical_v_amplitude": round(float(cl["amplitude_uv"][k]), 5)})
            recordings.append(entry)
            picks["prob"].append(pred["exist_prob"][j])
            picks["latency"].append(pred["latency_ms"][j])
            picks["amplitude"].append(pred["amp_rel"][j] * scale)
        picks = {k: np.asarray(v) for k, v in picks.items()}
        traces = arrays["signal"][rows] * arrays["scale_uv"][rows, None]
        figures_in[(path.name, patient, ear)] = (t_ms, traces, levels_in, picks)
    return ears, recordings, figures_in


def apply_overrides(ears: list[dict], recordings: list[dict], table: pd.DataFrame, path: Path) -> tuple[int, list[str]]:
    """Write final values (override, else model) and their source into the rows; (applied, unmatched)."""
    for ear in ears:
        ear.update({"threshold_final": ear["threshold_model"], "threshold_source": "model"})
    for rec in recordings:
        rec["override"] = ""
    applied, unmatched = 0, []
    for i, row in table.iterrows():
        where = f"row {i + 2}"
        field = row["field"].strip()
        value = override_value(row["value"], field, where, path)
        provenance = f"override by {row['who'].strip()} at {row['when'].strip()}"
        if row.get("note", "").strip():
            provenance += f" ({row['note'].strip()})"

        def match(item, row=row):
            return (item["patient_id"] == row["patient_id"].strip() and item["ear"] == row["ear"].strip()
                    and (not row.get("file", "").strip() or item["file"] == row["file"].strip()))

        if field == "threshold":
            hits = [e for e in ears if match(e)]
            for e in hits:
                e["threshold_final"] = value if math.isfinite(value) else "NR"
                e["threshold_source"] = provenance
        else:
            level = override_value(row["intensity_db"], "level", where, path)
            hits = [r for r in recordings if match(r) and abs(r["intensity_db"] - level) < 1e-6]
            kind, wave = field.split("_", 1)
            for r in hits:
                if math.isnan(value):
                    r[f"p_{wave}"] = 0.0
                else:
                    r[field] = value
                    if kind == "latency":
                        r[f"p_{wave}"] = 1.0
                r["override"] = "; ".join(x for x in (r["override"], f"{field}: {provenance}") if x)
        if hits:
            applied += 1
        else:
            unmatched.append(f"{where}: {row['patient_id']} {row['ear']} {row['intensity_db']} {field}")
    return applied, unmatched


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True, checkpoint=True)
    parser.add_argument("--overrides", type=Path, default=None,
                        help="manual override CSV (default predict.overrides, else <output-dir>/overrides.csv if present)")
    args = parser.parse_args(argv)
    run = start_run(args, domain="abr", defaults=DEFAULTS, argv=argv, data_key="data.table")
    cfg, device = run.cfg, run.device
    files = input_files(Path(cfg["data"]["table"]) if cfg["data"]["table"] else None)
    model, ckpt = model_checkpoint(args.checkpoint, device)
    conversion = check_input_reference(cfg["data"], ckpt["preprocessing"], args.checkpoint)  # refuse before reading
    if conversion:
        run.log(conversion)
    override_path = args.overrides or (Path(cfg["predict"]["overrides"]) if cfg["predict"]["overrides"] else None)
    if override_path is None and (run.run_dir / "overrides.csv").is_file():
        override_path = run.run_dir / "overrides.csv"
    overrides = read_overrides(override_path) if override_path is not None else None
    run.log(f"{ckpt['model']['target']} (epoch {ckpt['epoch']}) on {len(files)} file(s)")
    ears, recordings, figures_in, failed = [], [], {}, []
    for path in files:
        try:
            e, r, f = analyse_file(path, cfg, model, ckpt, device, run)
        except TableError as exc:
            if len(files) == 1:
                raise
            failed.append(str(exc))
            run.log(f"skipped: {exc}")
            continue
        ears += e
        recordings += r
        figures_in.update(f)
    if not ears:
        raise NothingProcessedError(f"none of {len(files)} file(s) could be read: {failed[0] if failed else ''}")
    run.record_inputs_valid()
    applied, unmatched = (apply_overrides(ears, recordings, overrides, override_path) if overrides is not None
                          else apply_overrides(ears, recordings, pd.DataFrame(columns=OVERRIDE_COLUMNS), Path(".")))
    if override_path is not None:
        run.log(f"overrides: {applied} of {len(overrides)} applied from {override_path}")
    for item in unmatched:
        run.log(f"WARNING override matches no ear/recording: {item}")

    out = run.run_dir
    write_csv(out / "ears.csv", list(ears[0]), [list(e.values()) for e in ears])
    write_csv(out / "recordings.csv", list(recordings[0]), [list(r.values()) for r in recordings])
    if override_path is None and not (out / "overrides_template.csv").exists():
        write_csv(out / "overrides_template.csv", list(OVERRIDE_COLUMNS) + ["note", "file"],
                  [[ears[0]["patient_id"], ears[0]["ear"], "", "threshold", "30", "initials", "2026-01-31T10:00", "", ""]])
    figures = []
    for e in ears[:cfg["predict"]["figure_ears"]]:
        name, patient, ear = e["file"], e["patient_id"], e["ear"]
        t_ms, traces, levels, picks = figures_in[(name, patient, ear)]
        final = e["threshold_final"] if isinstance(e["threshold_final"], float) else math.nan
        thr_cl = e["threshold_classical"] if isinstance(e["threshold_classical"], float) else math.nan
        title = (f"{name} {patient} {ear} ({e['level_reference']}) class {CLASS_ASCII.get(e['class_model'])}"
                 + (f"\nUNSURE: {e['unsure_reasons']}" if e["unsure"] else ""))
        figures += ear_figure(t_ms, traces, levels, picks, e["threshold_model"], e["threshold_model_sd"], thr_cl,
                              e["classical_censoring"], final, title,
                              out / "figures" / f"ear_{safe_name(Path(name).stem)}_{safe_name(patient)}_{safe_name(ear)}")
    headline = {"n_files": len(files) - len(failed), "n_files_failed": len(failed), "n_ears": len(ears),
                "n_recordings": len(recordings), "n_unsure": int(sum(e["unsure"] for e in ears)),
                "overrides_applied": applied, "overrides_unmatched": len(unmatched),
                "polarity_tta": bool(cfg["predict"]["polarity_tta"])}
    run.log(f"{headline['n_ears']} ears ({headline['n_unsure']} unsure), {headline['n_recordings']} recordings")
    return run.finish({"headline": headline, "checkpoint": Path(args.checkpoint).as_posix(),
                       "level_reference": cfg["data"]["level_reference"],
                       "model_level_reference": model_level_reference(ckpt["preprocessing"]),
                       "files": [p.as_posix() for p in files], "failed": failed, "unmatched_overrides": unmatched,
                       "overrides": override_path.as_posix() if override_path else None,
                       "figures": [p.relative_to(out).as_posix() for p in figures if p.suffix == ".png"],
                       "notes": "No labels: thresholds are in the input's level reference; 'unsure' ears need a "
                                "human reading. Trained on synthetic data: see abr/README.md before clinical use."})


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
