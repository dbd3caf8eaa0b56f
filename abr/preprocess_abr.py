"""Preprocess ABR recordings into the model's cached arrays.

Reads recordings (``--table`` or data.table: the clinical CSV/Excel table or any layout of abr/readers.py,
with its units / polarity / level options) or, without one, first generates a synthetic table in the
clinical format (synthetic section), so the real-data path is the one exercised. Then: analysis band-pass,
resampling to the model grid (cropped or zero-padded to preprocess.model_window_ms; training augmentations:
ears with unknown age / rate, ears cut to a short window), per-recording RMS normalization (the RMS in µV
is kept as an input feature), patient-level stratified train/val/test split (abr/splits.py: shares of 0,
small cohorts), grouping into intensity series per patient-ear (threshold labels live on the series), and
label-range statistics.

The cache goes to ``--output-dir`` (default data.cache_dir, else data/abr/<config name>: data live under
data/, which ``make clean`` keeps); training, validation and generation read it with ``--data DIR``. A table
from which no recording survives the checks exits with an error (code 2), never with an empty cache.

Config sections used: seed, data, synthetic, preprocess.

    python -m abr.preprocess_abr --config configs/abr/smoke.yaml --output-dir data/abr/smoke
    python -m abr.preprocess_abr --table exports/abr.xlsx
    python -m abr.preprocess_abr --table exports/long_nv.csv --set data.units=nV --set preprocess.model_window_ms=15
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np

from abr.data import Recordings, TableError, load_recordings
from abr.dataset import CACHE_NAME, META_NAME, SPLITS, STATIC_FEATURES, cache_folder, static_raw
from abr.defaults import abr_defaults
from abr.dsp import bandpass, normalize_recordings, resample, time_axis_ms
from abr.labels import CLASS_NAMES, WAVES
from abr.levels import canonical_level_reference, converted_reference
from abr.species import SPECIES_LEVEL_REFERENCE, check_species
from abr.splits import check_required, empty_splits, stratified_patient_split
from abr.synthetic import clean_sidecar_path, write_synthetic_table
from common.cli import make_parser, start_run
from common.config import ConfigError, load_config
from common.errors import run_cli
from common.files import load_npz
from common.runlog import write_json

DEFAULTS = abr_defaults()


def load_clean_sidecar(table_path: Path, recs: Recordings) -> np.ndarray | None:
    """Noise-free traces aligned with ``recs`` (synthetic tables only), or None when there is none."""
    sidecar = clean_sidecar_path(table_path)
    if not sidecar.is_file():
        return None
    data = load_npz(sidecar, required=("clean_uv", "patient_id", "intensity_db"))
    clean, pids, levels = data["clean_uv"], data["patient_id"], data["intensity_db"]
    rows = recs.row_number - 2
    if rows.max() >= clean.shape[0] or np.any(pids[rows] != recs.patient_id) or \
            not np.allclose(levels[rows], recs.intensity_db - recs.level_offset_db):  # the table's own levels
        raise TableError(f"{sidecar}: does not match the rows of {table_path} (table edited after generation?); "
                         "delete the sidecar to use the table without clean traces")
    return clean[rows].astype(np.float64)


def majority_class(labels: np.ndarray) -> int:
    """The most common known class (≥ 0); -100 (ignored by the class loss) when none is known."""
    labels = np.asarray(labels)
    labels = labels[labels >= 0]
    return int(np.bincount(labels).argmax()) if labels.size else -100


def to_model_grid(x: np.ndarray, fs_in: float, pre_in_ms: float, fs_out: float, n_out: int, pre_out_ms: float,
                  band, order: int) -> np.ndarray:
    """Band-pass at the recording's rate, resample to ``fs_out``, then crop or zero-pad so that sample 0 is at
    −``pre_out_ms`` and there are ``n_out`` samples (a 10 ms recording on a 15 ms grid: zeros after 10 ms,
    which the band-passed, zero-mean trace approaches anyway; a 24.7 ms one is cropped)."""
    if band is not None:
        x = bandpass(x, fs_in, band[0], band[1], order, zero_phase=True)
    x = resample(x, fs_in, fs_out)
    shift = int(round((float(pre_in_ms) - float(pre_out_ms)) * fs_out / 1000.0))  # samples before the grid's start
    if shift > 0:
        x = x[..., shift:]
    elif shift < 0:
        x = np.pad(x, [(0, 0)] * (x.ndim - 1) + [(-shift, 0)])
    if x.shape[-1] >= n_out:
        return x[..., :n_out]
    return np.pad(x, [(0, 0)] * (x.ndim - 1) + [(0, n_out - x.shape[-1])])


def build_cache(recs: Recordings, clean_uv: np.ndarray | None, cfg: dict, grid: dict | None = None,
                static_features=STATIC_FEATURES, split: bool = True) -> tuple[dict, dict]:
    """Arrays and metadata of the cache (see abr.dataset.ABRSeriesDataset for how they are used).

    ``grid`` (``model_rate_hz``, ``n_samples``, ``pre_stimulus_ms``): a trained model's grid (predict_abr);
    default the config's rate over ``preprocess.model_window_ms`` (null: the recordings' own window).
    ``split=False`` (prediction): every ear in the first split, no metadata masking."""
    pcfg = cfg["preprocess"]
    converted_to = cfg["data"].get("converted_level_reference")
    fs_in = recs.sampling_rate_hz
    source_window_ms = recs.signals_uv.shape[1] / fs_in * 1000.0
    if grid is None:
        fs_out = float(pcfg["model_rate_hz"])
        window_ms = float(pcfg.get("model_window_ms") or source_window_ms)
        grid = {"model_rate_hz": fs_out, "n_samples": int(round(window_ms * fs_out / 1000.0)),
                "pre_stimulus_ms": recs.pre_stimulus_ms}
    fs_out, n_out, pre_out = float(grid["model_rate_hz"]), int(grid["n_samples"]), float(grid["pre_stimulus_ms"])
    window_ms = n_out / fs_out * 1000.0
    band = pcfg["filter_hz"]
    notes = list(recs.notes)
    if abs(source_window_ms - recs.pre_stimulus_ms - (window_ms - pre_out)) > 1000.0 / fs_out:
        notes.append(f"recordings of {source_window_ms:.2f} ms (from {-recs.pre_stimulus_ms:g} ms) "
                     f"{'zero-padded' if source_window_ms - recs.pre_stimulus_ms < window_ms - pre_out else 'cropped'}"
                     f" to the model's {window_ms:.2f} ms grid (from {-pre_out:g} ms)")

    def to_grid(x: np.ndarray) -> np.ndarray:
        return to_model_grid(x, fs_in, recs.pre_stimulus_ms, fs_out, n_out, pre_out, band, pcfg["filter_order"])

    # the patient-level split first: the training augmentations below touch training ears only
    patient_class = {str(pid): majority_class(recs.class_idx[recs.patient_id == pid])
                     for pid in np.unique(recs.patient_id)}
    split_of_patient = (stratified_patient_split(patient_class, pcfg["split"], int(cfg["seed"])) if split
                        else dict.fromkeys(patient_class, 0))
    if split:
        check_required(split_of_patient, pcfg.get("required_splits") or [], recs.source)
        for name in empty_splits(split_of_patient, pcfg["split"]):
            notes.append(f"the '{name}' split is empty: {len(patient_class)} patient(s) for preprocess.split "
                         f"{list(pcfg['split'])} (see abr/splits.py)")
    row_train = np.array([split_of_patient[str(p)] == 0 for p in recs.patient_id], dtype=bool)

    signal_uv = to_grid(recs.signals_uv)
    t_grid = time_axis_ms(n_out, fs_out, pre_out)
    cut_ms = np.full(len(recs), np.inf)  # recordings shortened on purpose (short-window augmentation)
    fraction = float(pcfg.get("short_window_fraction", 0.0) or 0.0) if split else 0.0
    if fraction > 0:  # some ears recorded over a shorter window (10 ms TDT / ABRA), zero-padded as predict does
        ear_keys = np.array([f"{p}\t{e}" for p, e in zip(recs.patient_id, recs.ear)])
        unique, inverse = np.unique(ear_keys, return_inverse=True)
        rng = np.random.default_rng([int(cfg["seed"]), 17])
        train_ear = np.zeros(unique.size, dtype=bool)
        train_ear[inverse] = row_train
        chosen = (rng.random(unique.size) < fraction) & train_ear  # training ears only
        cuts = rng.uniform(*pcfg["short_window_ms"], unique.size)
        cut_ms = np.where(chosen[inverse], cuts[inverse], np.inf)
        signal_uv[t_grid[None, :] >= cut_ms[:, None]] = 0.0
        if chosen.any():
            notes.append(f"short-window augmentation: {int(chosen.sum())} of {unique.size} ears cut at "
                         f"{pcfg['short_window_ms'][0]:g}-{pcfg['short_window_ms'][1]:g} ms and zero-padded")
    signal, scale = normalize_recordings(signal_uv)
    has_clean = np.full(len(recs), clean_uv is not None)
    clean = to_grid(clean_uv) / scale[:, None] if clean_uv is not None else np.zeros_like(signal)
    clean[t_grid[None, :] >= cut_ms[:, None]] = 0.0  # nothing to denoise where nothing was recorded

    latency = recs.latency_ms.copy()
    exist = np.isfinite(latency)
    exist_known = recs.peaks_known.copy()
    cut_off = np.nan_to_num(latency, nan=0.0) > cut_ms[:, None] - 0.5  # a wave cut off: unknown, not absent
    exist_known &= ~cut_off
    exist &= ~cut_off
    latency[cut_off] = np.nan
    if not cfg["data"]["missing_peak_means_absent"]:
        exist_known &= exist
    amp_rel = recs.amplitude_uv / scale[:, None]

    # Series = patient-ear, sorted by intensity.
    keys = [f"{p}\t{e}" for p, e in zip(recs.patient_id, recs.ear)]
    order = sorted(range(len(recs)), key=lambda i: (keys[i], recs.intensity_db[i]))
    series_keys = sorted(set(keys))
    key_index = {k: i for i, k in enumerate(series_keys)}
    members: list[list[int]] = [[] for _ in series_keys]
    for i in order:
        members[key_index[keys[i]]].append(i)
    max_levels = max(len(m) for m in members)
    series_rows = np.full((len(members), max_levels), -1, dtype=np.int64)
    for s, rows in enumerate(members):
        series_rows[s, :len(rows)] = rows
    series_of_row = np.empty(len(recs), dtype=np.int64)
    for s, rows in enumerate(members):
        series_of_row[rows] = s

    levels = np.unique(recs.intensity_db)
    step = float(np.median(np.diff(levels))) if levels.size > 1 else 10.0
    censor = float(pcfg["threshold_censor_db"]) if pcfg["threshold_censor_db"] is not None \
        else float(levels.max() + step)
    series_class = np.array([majority_class(recs.class_idx[m]) for m in members], dtype=np.int64)
    series_threshold = np.array([recs.threshold_db[m[0]] for m in members], dtype=np.float64)
    series_censored = np.isinf(series_threshold)
    series_threshold = np.where(series_censored, censor, np.minimum(series_threshold, censor))
    series_patient = np.array([recs.patient_id[m[0]] for m in members])
    series_ear = np.array([str(recs.ear[m[0]]) for m in members])

    series_split = np.array([split_of_patient[str(p)] for p in series_patient], dtype=np.int64)
    row_split = series_split[series_of_row]

    age, rate = recs.age_years.copy(), recs.rate_per_s.copy()
    fraction = float(pcfg.get("unknown_metadata_fraction", 0.0) or 0.0) if split else 0.0
    if fraction > 0:  # some ears with age and rate "unknown", so the model learns that input
        masked = np.random.default_rng([int(cfg["seed"]), 16]).random(len(members)) < fraction
        masked &= series_split == 0  # training ears only: validation and test keep what the table says
        age[masked[series_of_row]] = np.nan
        rate[masked[series_of_row]] = np.nan
    raw = static_raw(age, recs.intensity_db, rate, scale, static_features)
    train_rows = row_split == 0
    with np.errstate(invalid="ignore"), warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)  # a feature unknown for every training row
        mean, std = np.nanmean(raw[train_rows], axis=0), np.nanstd(raw[train_rows], axis=0)
    mean = np.where(np.isfinite(mean), mean, 0.0)
    std = np.where(np.isfinite(std) & (std > 1e-6), std, 1.0)

    arrays = {
        "signal": signal.astype(np.float32), "clean": clean.astype(np.float32), "has_clean": has_clean,
        "scale_uv": scale.astype(np.float32), "static_raw": raw.astype(np.float32),
        "intensity_db": recs.intensity_db.astype(np.float32), "rate_per_s": recs.rate_per_s.astype(np.float32),
        "age_years": recs.age_years.astype(np.float32), "exist": exist, "exist_known": exist_known,
        "latency_ms": latency.astype(np.float32), "amplitude_uv": recs.amplitude_uv.astype(np.float32),
        "amp_rel": amp_rel.astype(np.float32), "class_idx": recs.class_idx, "fmp": recs.fmp.astype(np.float32),
        "series_of_row": series_of_row, "row_number": recs.row_number,
        "series_rows": series_rows, "series_class": series_class, "series_threshold_db": series_threshold,
        "series_censored": series_censored, "series_split": series_split,
        "series_patient": series_patient.astype(str), "series_ear": series_ear.astype(str),
    }
    finite_lat = {w: latency[:, k][exist[:, k]] for k, w in enumerate(WAVES)}
    finite_amp = amp_rel[np.isfinite(amp_rel)]
    meta = {
        "source": recs.source,
        "source_sampling_rate_hz": fs_in,
        "source_window_ms": source_window_ms,
        "source_pre_stimulus_ms": recs.pre_stimulus_ms,
        "level_reference": recs.level_reference,
        "level_offset_db": recs.level_offset_db,
        "signal_polarity": cfg["data"].get("signal_polarity") or "vertex_positive",  # "unknown": classical finds it
        "model_level_reference": converted_reference({"level_reference": recs.level_reference,
                                                      "level_offset_db": recs.level_offset_db,
                                                      "converted_level_reference": converted_to}),
        "notes": notes,
        "pre_stimulus_ms": pre_out,
        "model_rate_hz": fs_out,
        "n_samples": n_out,
        "window_ms": window_ms,
        "time_ms": time_axis_ms(n_out, fs_out, pre_out).tolist(),
        "filter_hz": band,
        "class_names": list(CLASS_NAMES),
        "waves": list(WAVES),
        "static_features": list(static_features),
        "static_mean": mean.tolist(),
        "static_std": std.tolist(),
        "threshold_censor_db": censor,
        "intensity_step_db": step,
        "intensity_levels_db": levels.tolist(),
        "max_levels": int(max_levels),
        "label_ranges": {
            "latency_ms": {w: [float(v.min()), float(v.max())] if v.size else None for w, v in finite_lat.items()},
            "amp_rel": [float(finite_amp.min()), float(finite_amp.max())] if finite_amp.size else None,
            "threshold_db": [float(series_threshold[np.isfinite(series_threshold)].min()),
                             float(series_threshold[np.isfinite(series_threshold)].max())]
            if np.isfinite(series_threshold).any() else None,
        },
        "counts": {
            "recordings": int(len(recs)), "series": int(len(members)), "patients": int(len(patient_class)),
            "dropped": recs.dropped,
            "series_per_split": {name: int((series_split == i).sum()) for i, name in enumerate(SPLITS)},
            "series_per_class": {name: {split: int(((series_class == c) & (series_split == i)).sum())
                                        for i, split in enumerate(SPLITS)}
                                 for c, name in enumerate(CLASS_NAMES)},
        },
        "has_clean": bool(clean_uv is not None),
        "fmp_note": "FMP is cached for reporting only; it encodes the wave-present label and is never a model input",
    }
    return arrays, meta


def write_cache(folder: Path, arrays: dict, meta: dict) -> None:
    """npz + meta.json, each written under a temporary name then renamed (a crash leaves no half cache)."""
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / (CACHE_NAME + ".partial.npz")
    np.savez(tmp, **arrays)
    tmp.replace(folder / CACHE_NAME)
    write_json(folder / META_NAME, meta)


def overview_figure(arrays: dict, meta: dict, path_stem: Path) -> list[Path]:
    """Class counts per split, thresholds by class, and the labelled wave V latency-intensity cloud."""
    from common.plotting import OKABE_ITO, plt, save_figure

    fig, axes = plt.subplots(1, 3, figsize=(11, 3.2))
    names = meta["class_names"]
    counts = meta["counts"]["series_per_class"]
    bottom = np.zeros(len(names))
    for i, split in enumerate(SPLITS):
        values = np.array([counts[n][split] for n in names])
        axes[0].bar(range(len(names)), values, bottom=bottom, label=split, color=OKABE_ITO[i])
        bottom += values
    axes[0].set_xticks(range(len(names)), names, rotation=30)
    axes[0].set_ylabel("ears")
    axes[0].legend()
    for c in range(len(names)):
        values = arrays["series_threshold_db"][arrays["series_class"] == c]
        if values.size:
            axes[1].scatter(np.full(values.size, c) + np.random.default_rng(c).uniform(-0.2, 0.2, values.size),
                            values, s=6, color=OKABE_ITO[c % len(OKABE_ITO)], rasterized=True)
    axes[1].set_xticks(range(len(names)), names, rotation=30)
    axes[1].set_ylabel(f"true threshold ({meta['model_level_reference']})")
    v = meta["waves"].index("V")
    present = arrays["exist"][:, v]
    axes[2].scatter(arrays["intensity_db"][present], arrays["latency_ms"][present, v], s=3, alpha=0.4,
                    c=[OKABE_ITO[c % len(OKABE_ITO)] for c in arrays["class_idx"][present]], rasterized=True)
    axes[2].set_xlabel(f"intensity ({meta['model_level_reference']})")
    axes[2].set_ylabel("wave V latency (ms)")
    fig.tight_layout()
    return save_figure(fig, path_stem)


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__)
    parser.add_argument("--table", type=Path, default=None, help="clinical table (overrides data.table)")
    args = parser.parse_args(argv)
    if args.output_dir is None:  # data.cache_dir or data/abr/<config name>: never runs/, which make clean deletes
        args.output_dir = cache_folder(load_config(args.config, args.set, defaults=DEFAULTS),
                                       Path(args.config).stem if args.config else "default")
    run = start_run(args, domain="abr", defaults=DEFAULTS, argv=argv)
    cfg = run.cfg
    table = args.table or (Path(cfg["data"]["table"]) if cfg["data"]["table"] else None)
    if table is None:
        species = check_species(cfg["synthetic"]["species"])
        if canonical_level_reference(cfg["data"]["level_reference"]) != SPECIES_LEVEL_REFERENCE[species]:
            raise ConfigError(f"synthetic.species {species} writes levels in {SPECIES_LEVEL_REFERENCE[species]} but "
                              f"data.level_reference is {cfg['data']['level_reference']!r}: set it to "
                              f"{SPECIES_LEVEL_REFERENCE[species]!r}")
        run.log(f"no table given: generating {cfg['synthetic']['n_patients']} synthetic patients ({species}, "
                f"{SPECIES_LEVEL_REFERENCE[species]})")
        table, sidecar = write_synthetic_table(cfg["synthetic"], run.run_dir / "synthetic_abr.csv",
                                               cfg["data"]["sampling_rate_hz"], cfg["data"]["window_ms"],
                                               seed=int(cfg["seed"]), columns=cfg["data"]["columns"])
        run.log(f"wrote {table} and {sidecar.name}")
    recs = load_recordings(table, cfg["data"])  # TableError / NoRecordingsError: one line naming the file
    clean = load_clean_sidecar(Path(table), recs)
    run.log(f"read {len(recs)} recordings from {table}" + (f" (dropped {recs.dropped})" if recs.dropped else ""))
    for note in recs.notes:
        run.log(f"  {note}")
    arrays, meta = build_cache(recs, clean, cfg)  # InputError: preprocess.required_splits left empty
    run.record_inputs_valid()
    for note in meta["notes"][len(recs.notes):]:
        run.log(f"  {note}")
    write_cache(run.run_dir, arrays, meta)
    figures = overview_figure(arrays, meta, run.run_dir / "figures" / "dataset_overview")
    counts = meta["counts"]
    run.log(f"{counts['recordings']} recordings, {counts['series']} ears, {counts['patients']} patients; "
            f"ears per split {counts['series_per_split']}; grid {meta['n_samples']} samples at "
            f"{meta['model_rate_hz']:g} Hz; clean traces: {meta['has_clean']}")
    run.log("ears per class: " + json.dumps({k: sum(v.values()) for k, v in counts["series_per_class"].items()},
                                            ensure_ascii=False))
    return run.finish({"cache": (run.run_dir / CACHE_NAME).as_posix(), "table": Path(table).as_posix(),
                       "counts": counts, "label_ranges": meta["label_ranges"],
                       "figures": [p.relative_to(run.run_dir).as_posix() for p in figures if p.suffix == ".png"]})


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
