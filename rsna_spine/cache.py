"""Decode every series once (in parallel) into the cache, and build the tables training reads.

    <cache>/stacks/{study}/{series}_{stack}.npz   canonical stacks (rsna_spine.data.Stack)
    <cache>/stack_index.csv                       one row per stack (or per failed / missing series)
    <cache>/labels.csv                            study, condition, level, label (−1 = none) + the label
                                                  point as (series, stack, k, j, i) and patient mm
    <cache>/folds.csv                             study_id, fold (StratifiedGroupKFold by study)
"""

from __future__ import annotations

import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path

import pandas as pd
from sklearn.model_selection import StratifiedGroupKFold

from common.runlog import progress, write_text_atomic
from rsna_spine.constants import GROUP_OF_CONDITION, SERIES_OF_GROUP
from rsna_spine.data import (
    StackStore,
    cached_result,
    decode_series_task,
    map_label_coordinates,
    read_coordinates,
    read_labels,
    read_series_descriptions,
)

INDEX_COLUMNS = ["split", "study_id", "series_id", "series_key", "stack_index", "status", "orientation",
                 "n_slices", "rows", "cols", "message"]


def series_tasks(root: Path, split: str, cache_dir: Path, percentiles, logger, gap_factor: float = 2.5,
                 missing_geometry: str = "skip") -> list[dict]:
    """One task per listed series with a known description (unknown ones are logged and dropped)."""
    desc = read_series_descriptions(root, split, logger=logger)
    return [{"split": split, "study_id": int(r.study_id), "series_id": int(r.series_id),
             "series_key": r.series_key, "folder": str(Path(root) / f"{split}_images" / str(r.study_id)
                                                      / str(r.series_id)),
             "cache_dir": str(cache_dir), "percentiles": list(percentiles), "gap_factor": float(gap_factor),
             "missing_geometry": missing_geometry} for r in desc.itertuples()]


def worker_count(requested: int, n_tasks: int, tasks_per_worker: int = 100) -> int:
    """Processes to use: ``requested`` if > 0, else automatic: one per ``tasks_per_worker`` tasks, at most
    one per CPU. (A spawned worker re-imports torch and pandas first, seconds each on a busy machine, so
    small jobs run faster in-process.)"""
    if requested > 0:
        return int(requested)
    return int(max(1, min(os.cpu_count() or 1, n_tasks // tasks_per_worker)))


def estimate_tasks(tasks: list[dict]) -> dict:
    """What a decode job holds before it starts: studies, series, files (slices) and DICOM bytes (one stat per
    file; folders that do not exist count 0)."""
    files = size = 0
    for task in tasks:
        folder = Path(task["folder"])
        if folder.is_dir():
            with os.scandir(folder) as entries:
                for entry in entries:
                    if entry.is_file():
                        files += 1
                        size += entry.stat().st_size
    return {"studies": len({t["study_id"] for t in tasks}), "series": len(tasks), "files": files, "bytes": size}


def decode_all(tasks: list[dict], workers: int, logger, desc: str = "decode series",
               totals: dict | None = None, reuse: bool = True, estimate: dict | None = None) -> tuple[pd.DataFrame, float]:
    """Run :func:`decode_series_task` over ``tasks`` (spawned processes when workers > 1; 0 = automatic),
    with a progress bar; returns (stack index, wall seconds).

    Resumable: with ``reuse``, a series whose done marker and stacks are on disk (a finished or interrupted
    earlier run) is not decoded again. Before decoding, the job is estimated (studies, series, slices, DICOM
    bytes, the cache size at most 0.6 x, free disk) and, after the first series, its time at the measured
    rate; ``estimate`` (a dict) receives these numbers. Every skipped file and unusable series is written to
    ``<cache>/decode_errors_<split>.csv`` (study, series, message). ``totals`` (a dict) accumulates the
    per-series counts (files, unreadable, skipped_geometry, gap_splits, instance_from_name)."""
    start = time.perf_counter()
    resumed, todo = [], []  # resumed: (task, result) of series decoded by an earlier run
    for task in tasks:
        done = cached_result(task) if reuse else None
        (resumed.append((task, done)) if done is not None else todo.append(task))
    results = [result for _, result in resumed]
    if results:
        logger(f"{desc}: {len(results)} series already in the cache (resumed), {len(todo)} to decode")
    info = estimate_tasks(todo)
    cache_dir = Path(tasks[0]["cache_dir"]) if tasks else None
    if cache_dir is not None:
        cache_dir.mkdir(parents=True, exist_ok=True)
        info["disk_free_bytes"] = shutil.disk_usage(cache_dir).free
        logger(f"{desc}: {info['studies']} studies, {info['series']} series, {info['files']} files, "
               f"{info['bytes'] / 1e9:.2f} GB of DICOM to decode; cache <= {0.6 * info['bytes'] / 1e9:.2f} GB "
               f"(free on disk: {info['disk_free_bytes'] / 1e9:.1f} GB)")
        if info["disk_free_bytes"] < 0.6 * info["bytes"]:
            logger(f"warning: {cache_dir} may run out of space (needs up to {0.6 * info['bytes'] / 1e9:.2f} GB)")
    workers = worker_count(workers, len(todo))
    decoded = []
    if todo:  # the first series in-process: it calibrates the time estimate
        first = decode_series_task(todo[0])
        decoded.append(first)
        first_bytes = estimate_tasks(todo[:1])["bytes"]
        rate = first_bytes / max(first["seconds"], 1e-6)
        eta = (info["bytes"] - first_bytes) / max(rate, 1.0) / max(1, min(workers, os.cpu_count() or 1))
        info.update({"first_series_mb_per_s": rate / 1e6, "estimated_seconds": eta})
        logger(f"{desc}: first series {first_bytes / 1e6:.1f} MB in {first['seconds']:.2f} s "
               f"({rate / 1e6:.1f} MB/s); estimated {eta / 60:.1f} min for the rest with {workers} process(es)")
    rest = todo[1:]
    if workers > 1 and len(rest) > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for result in progress(pool.map(decode_series_task, rest, chunksize=1), desc=desc, total=len(rest)):
                decoded.append(result)
    else:
        for task in progress(rest, desc=desc):
            decoded.append(decode_series_task(task))
    errors = []
    for result in decoded:
        for line in result["messages"]:
            logger(line)
    for task, result in [*resumed, *zip(todo, decoded)]:
        for line in result["messages"]:
            if line.startswith("skipping ") or " unusable: " in line or "has no folder" in line:
                errors.append({"study_id": task["study_id"], "series_id": task["series_id"], "message": line})
        if totals is not None:
            for key, value in result.get("counts", {}).items():
                totals[key] = totals.get(key, 0) + int(value)
    if cache_dir is not None:
        split = tasks[0].get("split", "train")
        write_csv_atomic(pd.DataFrame(errors, columns=["study_id", "series_id", "message"]),
                         cache_dir / f"decode_errors_{split}.csv")
    if estimate is not None:
        estimate.update({**info, "n_resumed": len(results), "n_errors": len(errors)})
    rows = [row for result in [*results, *decoded] for row in result["rows"]]
    return pd.DataFrame(rows, columns=INDEX_COLUMNS), time.perf_counter() - start


def write_csv_atomic(frame: pd.DataFrame, path: Path) -> Path:
    return write_text_atomic(path, frame.to_csv(index=False))


def make_folds(labels: pd.DataFrame, n_folds: int, seed: int) -> pd.DataFrame:
    """StratifiedGroupKFold over (study, target) rows: grades stratified, every study in one fold."""
    studies = sorted(labels["study_id"].unique())
    rows = labels[labels["label"] >= 0]
    if len(studies) < n_folds:
        raise ValueError(f"{len(studies)} studies cannot make {n_folds} folds; lower preprocess.n_folds")
    fold_of = {}
    splitter = StratifiedGroupKFold(n_splits=n_folds, shuffle=True, random_state=seed)
    for fold, (_, val_idx) in enumerate(splitter.split(rows, rows["label"].astype(int), groups=rows["study_id"])):
        for study in rows.iloc[val_idx]["study_id"].unique():
            fold_of[int(study)] = fold
    for i, study in enumerate(s for s in studies if int(s) not in fold_of):  # studies without any label
        fold_of[int(study)] = i % n_folds
    return pd.DataFrame({"study_id": list(fold_of), "fold": list(fold_of.values())}).sort_values("study_id")


def build_label_table(root: Path, store: StackStore, logger, counts: dict | None = None) -> pd.DataFrame:
    """labels.csv: every (study, condition, level) of train.csv with its label and, where the label point
    maps into a decoded stack of the right series type, its voxel and patient coordinates.

    Nothing is dropped silently: ``counts`` (a dict) receives the numbers of label points read, matched and
    dropped by reason, and of graded targets with and without a located point (also logged)."""
    labels = read_labels(root, logger=logger)
    coords = read_coordinates(root)
    drops: list = []
    mapped = map_label_coordinates(coords, store, logger=logger, drops=drops)
    table = labels.merge(mapped, on=["study_id", "condition", "level"], how="left")
    ok_series = store.index[store.index["status"] == "ok"][["study_id", "series_id", "series_key"]].drop_duplicates()
    table = table.merge(ok_series, on=["study_id", "series_id"], how="left")
    expected = table["condition"].map(GROUP_OF_CONDITION).map(SERIES_OF_GROUP)
    wrong = table["series_key"].notna() & (table["series_key"] != expected)
    for rec in table[wrong].itertuples():
        logger(f"label of study {rec.study_id} {rec.condition} {rec.level} sits on a {rec.series_key} series, "
               f"expected {expected[rec.Index]}; point kept as given")
    imaged = set(store.index.loc[store.index["status"] == "ok", "study_id"].astype(int))
    missing = sorted(set(labels["study_id"].astype(int)) - imaged)
    for study in missing:
        logger(f"study {study} is in train.csv but has no decodable images; its labels are skipped")
    table["has_images"] = table["study_id"].astype(int).isin(imaged)
    graded = table["label"] >= 0
    keys = set(zip(coords["study_id"].astype(int), coords["condition"], coords["level"]))
    has_coord = pd.Series([(int(a), b, c) in keys for a, b, c in zip(table["study_id"], table["condition"],
                                                                     table["level"])], index=table.index)
    reasons: dict = {}
    for drop in drops:
        reasons[drop["reason"].split(" (")[0]] = reasons.get(drop["reason"].split(" (")[0], 0) + 1
    summary = {"label_points_read": int(len(coords)), "label_points_matched": int(len(mapped)),
               "label_points_dropped": int(len(drops)), "label_points_dropped_by_reason": reasons,
               "graded_targets": int(graded.sum()),
               "graded_with_point": int((graded & table["k"].notna()).sum()),
               "graded_without_images": int((graded & ~table["has_images"]).sum()),
               "graded_without_coordinate_row": int((graded & ~has_coord).sum()),
               "graded_point_dropped": int((graded & has_coord & table["has_images"] & table["k"].isna()).sum())}
    logger(f"label points: {summary['label_points_read']} read, {summary['label_points_matched']} matched, "
           f"{summary['label_points_dropped']} dropped {reasons or ''}")
    if counts is not None:
        counts.update(summary)
    return table
