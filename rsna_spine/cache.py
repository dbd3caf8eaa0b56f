"""Decode every series once (in parallel) into the cache, and build the tables training reads.

    <cache>/stacks/{study}/{series}_{stack}.npz   canonical stacks (rsna_spine.data.Stack)
    <cache>/stack_index.csv                       one row per stack (or per failed / missing series)
    <cache>/labels.csv                            study, condition, level, label (−1 = none) + the label
                                                  point as (series, stack, k, j, i) and patient mm
    <cache>/folds.csv                             study_id, fold (StratifiedGroupKFold by study)
"""

from __future__ import annotations

import os
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
    decode_series_task,
    map_label_coordinates,
    read_coordinates,
    read_labels,
    read_series_descriptions,
)

INDEX_COLUMNS = ["split", "study_id", "series_id", "series_key", "stack_index", "status", "orientation",
                 "n_slices", "rows", "cols", "message"]


def series_tasks(root: Path, split: str, cache_dir: Path, percentiles, logger) -> list[dict]:
    """One task per listed series with a known description (unknown ones are logged and dropped)."""
    desc = read_series_descriptions(root, split, logger=logger)
    return [{"split": split, "study_id": int(r.study_id), "series_id": int(r.series_id),
             "series_key": r.series_key, "folder": str(Path(root) / f"{split}_images" / str(r.study_id)
                                                      / str(r.series_id)),
             "cache_dir": str(cache_dir), "percentiles": list(percentiles)} for r in desc.itertuples()]


def worker_count(requested: int, n_tasks: int, tasks_per_worker: int = 100) -> int:
    """Processes to use: ``requested`` if > 0, else automatic: one per ``tasks_per_worker`` tasks, at most
    one per CPU. (A spawned worker re-imports torch and pandas first, seconds each on a busy machine, so
    small jobs run faster in-process.)"""
    if requested > 0:
        return int(requested)
    return int(max(1, min(os.cpu_count() or 1, n_tasks // tasks_per_worker)))


def decode_all(tasks: list[dict], workers: int, logger, desc: str = "decode series") -> tuple[pd.DataFrame, float]:
    """Run :func:`decode_series_task` over ``tasks`` (spawned processes when workers > 1; 0 = automatic),
    with a progress bar; returns (stack index, wall seconds)."""
    start = time.perf_counter()
    workers = worker_count(workers, len(tasks))
    results = []
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            for result in progress(pool.map(decode_series_task, tasks, chunksize=1), desc=desc, total=len(tasks)):
                results.append(result)
    else:
        for task in progress(tasks, desc=desc):
            results.append(decode_series_task(task))
    for result in results:
        for line in result["messages"]:
            logger(line)
    rows = [row for result in results for row in result["rows"]]
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


def build_label_table(root: Path, store: StackStore, logger) -> pd.DataFrame:
    """labels.csv: every (study, condition, level) of train.csv with its label and, where the label point
    maps into a decoded stack of the right series type, its voxel and patient coordinates."""
    labels = read_labels(root, logger=logger)
    coords = read_coordinates(root)
    mapped = map_label_coordinates(coords, store, logger=logger)
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
    return table
