"""Offline Kaggle-notebook inference: a model folder + the competition's test layout in, submission.csv out.

Runs as a code-competition notebook must: no network, no training config. The model folder (a
train_rsna.py run folder with ensemble.json, or any folder or file ``--checkpoint`` accepts, e.g. the
checkpoints uploaded as a Kaggle dataset) carries everything: each checkpoint's preprocessing (crop,
intensity, grids, class weights, priors) and the decoding settings of its training config (intensity
percentiles, stack gap factor, missing-geometry policy, stage-1 decode window, level-to-slice tolerance),
plus ``temperatures.json`` when present (applied, and recorded). This script's own config only says how
to run (``predict.batch_size``, ``predict.tta_flip``, ``predict.checkpoint``, ``predict.temperatures``,
``kaggle.*``); decoding keys given to it are not used (the checkpoint's win; logged).

Studies are processed one at a time, as a notebook with a 9-hour limit and a small disk would: decode the
study's series into a scratch cache, stage 1 (localize), stage 2 (crops → classifiers, flip TTA), then
delete its stacks. Each step is timed per study (``per_study_times.csv``: decode, stage 1, crops,
classifier, total) and the time for ``kaggle.n_studies_estimate`` test studies (default 1,500, the hidden
test set's size order) is estimated from the mean measured per-study time plus the one-off model load,
with the machine it was measured on (CPU model, cores, torch threads, device).

    python -m rsna_spine.predict_kaggle_rsna --checkpoint MODEL_DIR --data /kaggle/input/rsna-2024-lumbar-spine-degenerative-classification --output-dir /kaggle/working

--checkpoint: the model folder (else paths.train_dir, else the latest train_rsna.py run of the config); --data: the Kaggle layout root (test_series_descriptions.csv, test_images/,
sample_submission.csv).
"""

from __future__ import annotations

import os
import platform
import shutil
import time
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.cli import make_parser, start_run
from common.errors import InputError, NothingProcessedError, run_cli
from common.runlog import write_text_atomic
from rsna_spine.cache import INDEX_COLUMNS, series_tasks
from rsna_spine.data import StackStore, decode_series_task
from rsna_spine.fusion import attach_for_ensemble
from rsna_spine.inference import center_items, classify, ensemble_members, find_train_dir, load_ensemble, localize_studies
from rsna_spine.settings import DEFAULTS
from rsna_spine.submission import (
    build_submission,
    mean_priors,
    resolve_temperatures,
    rows_sum_to_one,
    score_submission,
    studies_to_submit,
)

DOMAIN = "rsna_spine"
STEP_COLUMNS = ["decode_s", "stage1_s", "crops_s", "classifier_s"]


def decoding_settings(classifiers: list) -> dict:
    """The decoding and stage-1 settings of the training config stored in the first classifier checkpoint
    (keys missing from an older checkpoint take the schema's defaults, named in ``from_defaults``)."""
    saved = classifiers[0][1].get("config") or {}
    wanted = {("preprocess", "percentiles"), ("preprocess", "stack_gap_factor"), ("preprocess", "missing_geometry"),
              ("localizer", "decode_window"), ("localizer", "axial_max_distance_mm")}
    out, defaulted = {}, []
    for section, key in sorted(wanted):
        if key in saved.get(section, {}):
            out[key] = saved[section][key]
        else:
            out[key] = DEFAULTS[section][key]
            defaulted.append(f"{section}.{key}")
    out["from_defaults"] = defaulted
    return out


def machine_description(device: torch.device) -> dict:
    """What the times were measured on: CPU model, logical cores, torch threads, device (GPU name)."""
    cpu = platform.processor() or ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            cpu = next((line.split(":", 1)[1].strip() for line in handle if line.startswith("model name")), cpu)
    except OSError:
        pass
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else device.type
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return {"cpu": cpu or "unknown", "logical_cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "device": name, "platform": platform.platform(), "load_average_1min": round(load, 2)}


def estimate_total(times: pd.DataFrame, n_studies: int, load_s: float) -> dict:
    """Seconds for ``n_studies`` studies: the one-off model load + n × the mean measured per-study time (and the
    same with the slowest measured study, an upper guide); the share of each step in the mean."""
    mean = times[STEP_COLUMNS].mean()
    per_study = float(times["total_s"].mean())
    return {"n_studies": int(n_studies), "n_measured": len(times), "mean_per_study_s": per_study,
            "max_per_study_s": float(times["total_s"].max()), "model_load_s": load_s,
            "estimated_s": load_s + n_studies * per_study,
            "estimated_s_at_slowest": load_s + n_studies * float(times["total_s"].max()),
            "mean_step_s": {k: float(v) for k, v in mean.items()}}


def predict_one_study(study: int, tasks: list[dict], models: dict, cfg: dict, settings: dict, device, cache_dir: Path,
                      logger) -> tuple[list[dict], np.ndarray, dict, dict]:
    """(items, probabilities, per-step seconds, counts) of one study; its decoded stacks are deleted after."""
    timings: dict = {"study_id": study}
    start = time.perf_counter()
    rows = []
    for task in tasks:
        result = decode_series_task(task)
        rows += result["rows"]
        for line in result["messages"]:
            logger(line)
    index = pd.DataFrame(rows, columns=INDEX_COLUMNS)
    timings["decode_s"] = time.perf_counter() - start
    counts = {"series": len(tasks), "series_ok": int(index.loc[index["status"] == "ok", "series_id"].nunique())}
    store = StackStore(cache_dir, index=index, max_mb=cfg["cache"]["memory_mb"])
    misses: list = []
    start = time.perf_counter()
    centers = localize_studies([study], store, models["localizer"], device, settings["decode_window"], logger=logger,
                               max_distance_mm=settings["axial_max_distance_mm"], misses=misses)
    timings["stage1_s"] = time.perf_counter() - start
    items = center_items(centers)
    start = time.perf_counter()
    second_view = attach_for_ensemble(items, store, models["classifier"])
    step: dict = {"crops_s": time.perf_counter() - start}  # finding the second view counts as making crops
    probs, _ = classify(items, store, models["classifier"], device, cfg["predict"]["batch_size"],
                        cfg["predict"]["tta_flip"], timings=step)
    timings["crops_s"], timings["classifier_s"] = step["crops_s"], step.get("model_s", 0.0)
    timings["total_s"] = sum(timings[k] for k in STEP_COLUMNS)
    counts.update(levels_without_axial_slice=len(misses),
                  second_view_fused=(second_view or {}).get("fused", 0),
                  second_view_primary_only=(second_view or {}).get("primary_only", 0))
    shutil.rmtree(cache_dir / "stacks" / str(study), ignore_errors=True)  # disk bounded by one study
    return items, probs, timings, counts


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True, checkpoint=True)
    parser.add_argument("--split", default="test", help="which {split}_series_descriptions.csv / {split}_images")
    parser.add_argument("--solution", type=Path, default=None, help="optional truth to score the submission")
    args = parser.parse_args(argv)
    run = start_run(args, domain=DOMAIN, defaults=DEFAULTS, argv=argv, data_key="paths.data_root")
    cfg = run.cfg
    model_dir = find_train_dir(args.checkpoint, cfg, run.config_name)
    members = ensemble_members(model_dir)
    if not any(m["stage"] == "classifier" for m in members):
        raise InputError("no trained classifier here", model_dir)
    start = time.perf_counter()
    models = load_ensemble(members, None, run.device, cfg["predict"]["checkpoint"], logger=run.log)
    load_s = time.perf_counter() - start
    settings = decoding_settings(models["classifier"])
    run.log(f"model folder {model_dir}: {len(models['classifier'])} classifier(s), localizers "
            f"{ {k: len(v) for k, v in models['localizer'].items()} }, loaded in {load_s:.2f} s; decoding settings "
            f"from the checkpoint: { {k: v for k, v in settings.items() if k != 'from_defaults'} }"
            + (f" (not in the checkpoint, defaults: {settings['from_defaults']})" if settings["from_defaults"] else ""))
    temperatures, temperatures_file = resolve_temperatures(cfg["predict"]["temperatures"], model_dir, run.log)

    root = Path(cfg["paths"]["data_root"])
    cache_dir = run.run_dir / "scratch_cache"
    tasks = series_tasks(root, args.split, cache_dir, settings["percentiles"], logger=run.log,
                         gap_factor=settings["stack_gap_factor"], missing_geometry=settings["missing_geometry"])
    studies = studies_to_submit(tasks, root, args.split)
    run.record_inputs_valid()
    machine = machine_description(run.device)
    run.log(f"machine: {machine}")

    all_items, all_probs, times, totals = [], [], [], {}
    for n, study in enumerate(studies, 1):
        study_tasks = [t for t in tasks if t["study_id"] == study]
        items, probs, timing, counts = predict_one_study(study, study_tasks, models, cfg, settings, run.device,
                                                         cache_dir, run.log)
        all_items += items
        all_probs.append(np.asarray(probs).reshape(-1, 3))
        times.append(timing)
        for key, value in counts.items():
            totals[key] = totals.get(key, 0) + value
        run.log(f"study {study} ({n}/{len(studies)}): {len(study_tasks)} series, {len(items)} targets graded; "
                + ", ".join(f"{k} {timing[k]:.2f}" for k in [*STEP_COLUMNS, "total_s"]))
    shutil.rmtree(cache_dir, ignore_errors=True)
    run.log(f"series decoded {totals.get('series_ok', 0)} of {totals.get('series', 0)}; levels without an axial slice "
            f"{totals.get('levels_without_axial_slice', 0)}; sagittal + axial fusion: {totals.get('second_view_fused', 0)} "
            f"targets with both views, {totals.get('second_view_primary_only', 0)} from the primary view alone")
    if tasks and totals.get("series_ok", 0) == 0:
        raise NothingProcessedError(f"none of the {len(tasks)} listed series could be decoded (see log.txt); "
                                    "a submission from class priors alone is not written", root / f"{args.split}_images")

    priors = mean_priors(models["classifier"])
    probs = np.concatenate(all_probs) if all_probs else np.zeros((0, 3))
    submission, n_prior = build_submission(studies, all_items, probs, priors, temperatures)
    out_path = run.run_dir / "submission.csv"
    write_text_atomic(out_path, submission.to_csv(index=False))
    run.log(f"wrote {out_path}: {len(submission)} rows ({len(studies)} studies x 25), {len(submission) - n_prior} "
            f"from the model, {n_prior} from class priors")

    table = pd.DataFrame(times, columns=["study_id", *STEP_COLUMNS, "total_s"])
    table.to_csv(run.run_dir / "per_study_times.csv", index=False)
    estimate = estimate_total(table, int(cfg["kaggle"]["n_studies_estimate"]), load_s)
    limit_s = float(cfg["kaggle"]["time_limit_h"]) * 3600.0
    run.log(f"estimated time for {estimate['n_studies']} test studies on this machine ({machine['cpu']}, "
            f"{machine['logical_cores']} logical cores, {machine['torch_threads']} torch threads, device "
            f"{machine['device']}, load {machine['load_average_1min']}): {estimate['estimated_s'] / 3600:.2f} h "
            f"(mean {estimate['mean_per_study_s']:.2f} s per study over {estimate['n_measured']} measured: "
            + ", ".join(f"{k} {v:.2f}" for k, v in estimate["mean_step_s"].items())
            + f"; at the slowest study's pace {estimate['estimated_s_at_slowest'] / 3600:.2f} h); notebook limit "
            f"{limit_s / 3600:.0f} h: {'within' if estimate['estimated_s'] <= limit_s else 'OVER'}")

    summary: dict = {"submission": out_path.name, "n_rows": len(submission), "n_studies": len(studies),
                     "n_model_rows": len(submission) - n_prior, "n_prior_rows": n_prior, "model_dir": str(model_dir),
                     "counts": totals, "temperatures": temperatures, "temperatures_file": temperatures_file,
                     "decoding_settings": settings, "machine": machine, "time_estimate": estimate,
                     "within_time_limit": bool(estimate["estimated_s"] <= limit_s),
                     "probability_rows_sum_to_1": rows_sum_to_one(submission)}
    if args.solution is not None:
        untempered = build_submission(studies, all_items, probs, priors)[0] if temperatures else None
        summary.update(score_submission(args.solution, submission, priors, run.log, untempered))
    summary.setdefault("headline", {}).update({
        "estimated_hours_for_test_set": estimate["estimated_s"] / 3600, "mean_seconds_per_study": estimate["mean_per_study_s"]})
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
