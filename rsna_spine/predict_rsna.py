"""Predict the test layout: test_series_descriptions.csv + test_images/ in, submission.csv out.

Every study of test_series_descriptions.csv (and of sample_submission.csv, when present) gets its 25 rows
``{study}_{condition}_{level}`` with normal_mild, moderate, severe summing to 1. The test series are
decoded once (parallel), stage 1 of every trained fold locates the levels (heatmaps averaged over folds),
stage 2 grades the crops with every fold's classifier and left-right flip TTA (the flipped crop is fed
with the mirrored condition, so a left output is read back as the right one and vice versa), the
probabilities are re-weighted to the metric's class weights when a model was trained with other ones, and
tempered per condition group with the temperatures fitted by validate_rsna.py (``predict.temperatures``:
``temperatures.json`` of the model folder when present, recorded in the summary and the log). A classifier
trained with the second view (sagittal + axial fusion) gets it for the spinal and subarticular targets;
how many had both views and how many fell back to the primary one is logged and in the summary.
Whatever could not be read or located (missing or unreadable series, no axial stack at a level) gets the
training class priors (metric-optimal), with a log line: the submission is always complete. No network.
If not one listed series decodes, nothing is written and the script exits with code 2.

With ``--solution`` (Kaggle solution format: row_id, normal_mild, moderate, severe[, sample_weight]) the
submission is also scored with the official metric against the class-prior submission.

    python -m rsna_spine.predict_rsna --config configs/rsna_spine/smoke.yaml --checkpoint runs/x/train --data DIR

--checkpoint: the run folder of train_rsna.py (ensemble.json) or a checkpoint file; --data: the Kaggle layout
root (paths.data_root). --train-dir and --data-root are the deprecated names of these two options.
"""

from __future__ import annotations

import shutil
from pathlib import Path


from common.cli import add_deprecated_alias, make_parser, start_run
from common.errors import InputError, NothingProcessedError, run_cli
from common.runlog import write_text_atomic
from rsna_spine.cache import decode_all, series_tasks
from rsna_spine.data import StackStore
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


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True, checkpoint=True)
    add_deprecated_alias(parser, "--train-dir", "--checkpoint", dest="checkpoint", type=Path)
    add_deprecated_alias(parser, "--data-root", "--data", dest="data", type=Path)
    parser.add_argument("--split", default="test", help="which {split}_series_descriptions.csv / {split}_images")
    parser.add_argument("--solution", type=Path, default=None, help="optional truth to score the submission")
    args = parser.parse_args(argv)
    run = start_run(args, domain=DOMAIN, defaults=DEFAULTS, argv=argv, data_key="paths.data_root")
    cfg = run.cfg
    train_dir = find_train_dir(args.checkpoint, cfg, run.config_name)
    members = ensemble_members(train_dir)
    if not any(m["stage"] == "classifier" for m in members):
        raise InputError("no trained classifier here", train_dir)
    root = Path(cfg["paths"]["data_root"])
    cache_dir = run.run_dir / "test_cache"

    tasks = series_tasks(root, args.split, cache_dir, cfg["preprocess"]["percentiles"], logger=run.log,
                         gap_factor=cfg["preprocess"]["stack_gap_factor"],
                         missing_geometry=cfg["preprocess"]["missing_geometry"])
    studies = studies_to_submit(tasks, root, args.split)
    run.record_inputs_valid()
    index, seconds = decode_all(tasks, int(cfg["predict"]["workers"]), run.log, desc=f"decode {args.split}")
    run.log(f"decoded {len(tasks)} series of {len(studies)} studies in {seconds:.1f} s")
    if tasks and not (index["status"] == "ok").any():
        raise NothingProcessedError(f"none of the {len(tasks)} listed series could be decoded (see log.txt); "
                                    "a submission from class priors alone is not written", root / f"{args.split}_images")
    store = StackStore(cache_dir, index=index, max_mb=cfg["cache"]["memory_mb"])

    models = load_ensemble(members, None, run.device, cfg["predict"]["checkpoint"], logger=run.log)
    run.log(f"ensemble: {len(models['classifier'])} classifier(s), localizers "
            f"{ {k: len(v) for k, v in models['localizer'].items()} }, flip TTA {cfg['predict']['tta_flip']}")
    misses: list = []  # levels with no axial slice within tolerance (subarticular rows from priors)
    centers = localize_studies(studies, store, models["localizer"], run.device, cfg["localizer"]["decode_window"],
                               logger=run.log, max_distance_mm=cfg["localizer"]["axial_max_distance_mm"],
                               misses=misses)
    items = center_items(centers)
    second_view = attach_for_ensemble(items, store, models["classifier"], logger=run.log)
    probs, _ = classify(items, store, models["classifier"], run.device, cfg["predict"]["batch_size"],
                        cfg["predict"]["tta_flip"])
    priors = mean_priors(models["classifier"])
    temperatures, temperatures_file = resolve_temperatures(cfg["predict"]["temperatures"], train_dir, run.log)
    submission, n_prior = build_submission(studies, items, probs, priors, temperatures)
    out_path = run.run_dir / "submission.csv"
    write_text_atomic(out_path, submission.to_csv(index=False))
    run.log(f"wrote {out_path}: {len(submission)} rows ({len(studies)} studies x 25), {len(submission) - n_prior} "
            f"from the model, {n_prior} from class priors")
    if not cfg["predict"]["keep_cache"]:
        shutil.rmtree(cache_dir, ignore_errors=True)

    summary: dict = {"submission": out_path.name, "n_rows": len(submission), "n_studies": len(studies),
                     "n_model_rows": len(submission) - n_prior, "n_prior_rows": n_prior, "train_dir": str(train_dir),
                     "levels_without_axial_slice": len(misses), "second_view": second_view,
                     "temperatures": temperatures,
                     "temperatures_file": temperatures_file}
    if args.solution is not None:
        untempered = build_submission(studies, items, probs, priors)[0] if temperatures else None
        scored = score_submission(args.solution, submission, priors, run.log, untempered)
        scored["headline"].update({"n_test_studies": len(studies), "rows_from_priors": n_prior})
        summary.update(scored)
    summary["probability_rows_sum_to_1"] = rows_sum_to_one(submission)
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
