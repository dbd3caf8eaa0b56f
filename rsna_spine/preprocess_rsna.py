"""Decode every DICOM series of the RSNA 2024 lumbar spine dataset once into a cache of arrays + geometry.

Reads the competition layout as distributed (train.csv, train_label_coordinates.csv,
train_series_descriptions.csv, train_images/{study}/{series}/{instance}.dcm). With synthetic.enabled and
no train.csv under paths.data_root, it first writes the embedded synthetic dataset there (same layout).
Series are decoded in parallel (spawned processes, progress bar); each becomes one or more canonical
stacks (.npz). Then the label points are mapped into the stacks (labels.csv) and the studies are split
into folds (folds.csv). Training and inference never read DICOM again.

A run in which no listed series gives a stack exits with an error (exit code 2), not with an empty cache.
--data: the Kaggle layout root (paths.data_root).

    python -m rsna_spine.preprocess_rsna --config configs/rsna_spine/smoke.yaml
"""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from common.cli import make_parser, start_run
from common.errors import InputError, NothingProcessedError, run_cli
from common.runlog import write_text_atomic
from rsna_spine.cache import (
    build_label_table,
    decode_all,
    make_folds,
    series_tasks,
    worker_count,
    write_csv_atomic,
)
from rsna_spine.data import DataLayoutError, StackStore
from rsna_spine.settings import DEFAULTS
from rsna_spine.synthetic import generate_dataset

CACHE_MANIFEST = "cache_manifest.json"  # decode counts + label counts (read / matched / dropped with reasons)


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True)
    args = parser.parse_args(argv)
    run = start_run(args, domain="rsna_spine", defaults=DEFAULTS, argv=argv, data_key="paths.data_root")
    cfg = run.cfg
    root, cache_dir = Path(cfg["paths"]["data_root"]), Path(cfg["paths"]["cache_dir"])
    pcfg = cfg["preprocess"]

    summary: dict = {}
    if not (root / "train.csv").is_file():
        if not cfg["synthetic"]["enabled"]:
            raise InputError("not found: put the Kaggle dataset in paths.data_root (--data) or set "
                             "synthetic.enabled=true for the embedded synthetic dataset", root / "train.csv")
        synth = {k: v for k, v in cfg["synthetic"].items() if k != "enabled"}
        run.log(f"writing the synthetic Kaggle-layout dataset to {root} ...")
        summary["synthetic"] = generate_dataset(root, synth, log=run.log)
        run.log(f"synthetic: {summary['synthetic']['n_train_studies']} train + "
                f"{summary['synthetic']['n_test_studies']} test studies, {summary['synthetic']['n_dicom_files']} files")

    cache_dir.mkdir(parents=True, exist_ok=True)
    frames, decode_s, n_decoded, n_workers = [], 0.0, 0, 1
    decode_counts: dict = {}  # files, unreadable, skipped_geometry, gap_splits, instance_from_name
    estimates: dict = {}
    for split in pcfg["splits"]:
        tasks = series_tasks(root, split, cache_dir, pcfg["percentiles"], logger=run.log,
                             gap_factor=pcfg["stack_gap_factor"], missing_geometry=pcfg["missing_geometry"])
        n_workers = worker_count(int(pcfg["workers"]), len(tasks))
        estimate: dict = {}
        # resumable: series with a done marker and their stacks on disk are reused (unless preprocess.overwrite)
        index, seconds = decode_all(tasks, n_workers, run.log, desc=f"decode {split}", totals=decode_counts,
                                    reuse=not pcfg["overwrite"], estimate=estimate)
        estimates[split] = estimate
        frames.append(index)
        decode_s += seconds
        n_decoded += len(tasks) - estimate.get("n_resumed", 0)
    index = pd.concat([f for f in frames if len(f)], ignore_index=True)
    write_csv_atomic(index, cache_dir / "stack_index.csv")
    n_ok = int(index.loc[index["status"] == "ok", ["study_id", "series_id"]].drop_duplicates().shape[0])
    n_bad = int((index["status"] != "ok").sum())
    rate = n_decoded / decode_s if decode_s > 0 else float("nan")
    run.log(f"decoded {n_decoded} series in {decode_s:.1f} s ({rate:.2f} series/s with {n_workers} "
            f"process(es)); {n_ok} series usable, {n_bad} missing or unreadable")
    if n_ok == 0:
        n_listed = int(index[["study_id", "series_id"]].drop_duplicates().shape[0]) if len(index) else 0
        raise NothingProcessedError(f"0 of {n_listed} listed series could be decoded into a stack (see "
                                    f"{cache_dir / 'stack_index.csv'} and the log for each series)", root)

    if "train" in pcfg["splits"]:
        store = StackStore(cache_dir, index=index[index["split"] == "train"].reset_index(drop=True),
                           max_mb=cfg["cache"]["memory_mb"])
        label_counts: dict = {}
        table = build_label_table(root, store, logger=run.log, counts=label_counts)
        write_csv_atomic(table, cache_dir / "labels.csv")
        folds = make_folds(table, int(pcfg["n_folds"]), int(pcfg["fold_seed"]))
        write_csv_atomic(folds, cache_dir / "folds.csv")
        located = int(table["k"].notna().sum())
        run.log(f"labels: {int((table['label'] >= 0).sum())} graded targets, {located} with a located point; "
                f"{folds['study_id'].nunique()} studies in {pcfg['n_folds']} folds")
        summary.update({"n_graded_targets": int((table["label"] >= 0).sum()), "n_located_points": located,
                        "n_studies": int(folds["study_id"].nunique()), "labels": label_counts})
    elif not (cache_dir / "labels.csv").is_file():
        raise DataLayoutError("preprocess.splits has no 'train': labels.csv was not built")
    summary.update({"cache_dir": cache_dir.as_posix(), "n_series_decoded": n_decoded, "n_series_usable": n_ok,
                    "n_series_failed": n_bad, "decode_seconds": decode_s, "series_per_second": rate,
                    "decode_counts": decode_counts, "estimate": estimates})
    manifest = {"format": "rsna_spine-cache", "version": 2, "decode_counts": decode_counts,
                "labels": summary.get("labels", {}), "n_series_usable": n_ok, "n_series_failed": n_bad,
                "stack_gap_factor": pcfg["stack_gap_factor"], "missing_geometry": pcfg["missing_geometry"]}
    write_text_atomic(cache_dir / CACHE_MANIFEST, json.dumps(manifest, indent=2))
    run.log(f"cache manifest: {cache_dir / CACHE_MANIFEST} (label counts: {summary.get('labels', {})})")
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
