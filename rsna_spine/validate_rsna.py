"""Out-of-fold validation of a train_rsna.py run, the way the test set is predicted.

For every trained fold, its own stage-1 localizers locate the levels of the held-out studies, and its
classifier grades crops around those predicted points (with flip TTA as configured). Targets stage 1
could not locate (missing series, no axial stack at a level) get the fold's class priors: every graded
target of the held-out studies is scored, as the metric would. Reported:
- the official metric, overall and per condition group, against the class-prior baseline (each row
  predicts its training prior re-weighted to the metric optimum q ∝ w·p), and with label-point crops
  ("oracle" stage 1) to separate localization from grading errors;
- per-class recall, balanced accuracy, confusion matrices, calibration (ECE, reliability diagram);
- temperature scaling per condition group fitted on the official metric (any-severe term included),
  measured cross-fitted on two halves of the studies (``temperatures.json``; the prediction scripts apply
  it when it is in the model folder, or named by ``predict.temperatures``);
- with a classifier trained with the second view (``model.second_view``), how many spinal / subarticular
  targets were fused and how many graded from the primary view alone, with the reasons;
- stage-1 localization error (3D mm and slices) per condition group;
- figures: training curves, confusion matrices, reliability, localization errors, attention weights per
  slice and crops with predicted vs true grades for sample studies.

    python -m rsna_spine.validate_rsna --config configs/rsna_spine/smoke.yaml --checkpoint runs/x/train

--checkpoint: the run folder of train_rsna.py (ensemble.json: every fold's models), or a checkpoint file;
--data: the preprocessed cache (paths.cache_dir). --train-dir is the deprecated name of --checkpoint.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd

from common.cli import add_deprecated_alias, make_parser, start_run
from common.errors import InputError, run_cli
from common.runlog import write_text_atomic
from rsna_spine.calibration import cross_fitted
from rsna_spine.constants import SUBMISSION_COLUMNS
from rsna_spine.data import StackStore
from rsna_spine.stage_datasets import CropDataset, crop_items
from rsna_spine.evaluation import (
    grading_report,
    localization_errors,
    prediction_table,
    summarize_localization,
)
from rsna_spine.fusion import attach_for_ensemble
from rsna_spine.figures import attention_figure, crops_figure, evaluation_figure, training_figure
from rsna_spine.inference import classify, ensemble_members, find_train_dir, load_ensemble, localize_studies
from rsna_spine.metric import class_priors, prior_probabilities, score_details, solution_from_labels, submission_frame
from rsna_spine.settings import DEFAULTS

DOMAIN = "rsna_spine"


def fallback_rows(graded: pd.DataFrame, covered: set, priors: dict) -> pd.DataFrame:
    """Prior predictions for graded targets stage 1/2 could not handle (scored, as the metric would)."""
    rows = graded[[(s, c, lv) not in covered for s, c, lv in zip(graded["study_id"], graded["condition"],
                                                                 graded["level"])]]
    items = [{"study_id": r.study_id, "condition": r.condition, "level": r.level, "label": r.label}
             for r in rows.itertuples()]
    probs = np.array([prior_probabilities(it["condition"], it["level"], priors) for it in items]).reshape(-1, 3)
    return prediction_table(items, probs)


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True, checkpoint=True)
    add_deprecated_alias(parser, "--train-dir", "--checkpoint", dest="checkpoint", type=Path)
    args = parser.parse_args(argv)
    run = start_run(args, domain=DOMAIN, defaults=DEFAULTS, argv=argv, data_key="paths.cache_dir")
    cfg = run.cfg
    train_dir = find_train_dir(args.checkpoint, cfg, run.config_name)
    members = ensemble_members(train_dir)
    cache_dir = Path(cfg["paths"]["cache_dir"])
    store = StackStore(cache_dir, max_mb=cfg["cache"]["memory_mb"])
    labels = pd.read_csv(cache_dir / "labels.csv")
    folds = pd.read_csv(cache_dir / "folds.csv")
    classifiers = [m for m in members if m["stage"] == "classifier"]
    if not classifiers:
        raise InputError("no trained classifier to validate", train_dir)
    unknown = [str(m["path"]) for m in classifiers if m.get("fold") is None]
    if unknown:
        raise InputError(f"classifier checkpoint(s) {unknown[:3]} name no fold; out-of-fold validation needs the "
                         "run folder of train_rsna.py (ensemble.json)", train_dir)
    model_folds = sorted({int(m["fold"]) for m in classifiers})
    run.log(f"validating {train_dir} (folds {model_folds}) on {cache_dir}")
    run.record_inputs_valid()

    oof, oracle, baseline, loc, examples_src = [], [], [], [], []
    misses: list = []  # levels with no axial slice within tolerance (subarticular rows from priors)
    second_view: dict = {"fused": 0, "primary_only": 0, "reasons": {}}  # sagittal + axial fusion counts
    crop_cfg, intensity_cfg = cfg["crop"], cfg["intensity"]
    for fold in model_folds:
        models = load_ensemble(members, [fold], run.device, cfg["predict"]["checkpoint"], logger=run.log)
        crop_cfg = models["classifier"][0][1]["preprocessing"]["crop"]
        intensity_cfg = models["classifier"][0][1]["preprocessing"]["intensity"]
        val_studies = sorted(set(folds.loc[folds["fold"] == fold, "study_id"].astype(int)))
        train_labels = labels[~labels["study_id"].isin(val_studies)]
        priors = class_priors(train_labels)
        graded = labels[labels["study_id"].isin(val_studies) & (labels["label"] >= 0)]
        imaged = labels[labels["has_images"] & labels["study_id"].isin(val_studies)]["study_id"].unique()
        if models["localizer"]:
            centers = localize_studies(sorted(imaged), store, models["localizer"], run.device,
                                       cfg["localizer"]["decode_window"], logger=run.log,
                                       max_distance_mm=cfg["localizer"]["axial_max_distance_mm"], misses=misses)
            loc.append(localization_errors(centers, labels).assign(fold=fold))
        else:
            run.log(f"fold {fold}: no localizer in the run; crops are centred on the label points")
            centers = labels[labels["study_id"].isin(imaged) & labels["k"].notna()]
        items = crop_items(labels, centers, val_studies)
        fused = attach_for_ensemble(items, store, models["classifier"], logger=run.log)
        if fused is not None:
            second_view["fused"] += fused["fused"]
            second_view["primary_only"] += fused["primary_only"]
            for reason, n in fused["reasons"].items():
                second_view["reasons"][reason] = second_view["reasons"].get(reason, 0) + n
        probs, attention = classify(items, store, models["classifier"], run.device, cfg["predict"]["batch_size"],
                                    cfg["predict"]["tta_flip"])
        table = prediction_table(items, probs).assign(fold=fold, source="two_stage")
        covered = {(it["study_id"], it["condition"], it["level"]) for it in items}
        oof.append(pd.concat([table, fallback_rows(graded, covered, priors).assign(fold=fold, source="prior")],
                             ignore_index=True))
        gt_items = crop_items(labels, None, val_studies)
        gt_probs, _ = classify(gt_items, store, models["classifier"], run.device, cfg["predict"]["batch_size"],
                               cfg["predict"]["tta_flip"])
        gt_covered = {(it["study_id"], it["condition"], it["level"]) for it in gt_items}
        oracle.append(pd.concat([prediction_table(gt_items, gt_probs),
                                 fallback_rows(graded, gt_covered, priors)], ignore_index=True))
        baseline.append(fallback_rows(graded, set(), priors))
        for it, att, p in zip(items, attention, probs):
            examples_src.append({**it, "attention": att, "probs": p})
        run.log(f"fold {fold}: {len(items)} targets graded by the model, "
                f"{len(graded) - len(items)} by priors (no stage-1 point)")
    oof_table = pd.concat(oof, ignore_index=True)
    report = grading_report(oof_table)
    # temperature scaling per condition group on the official metric, measured cross-fitted (two study halves)
    calibration = cross_fitted(oof_table, seed=int(cfg["seed"]))
    run.log(f"temperature scaling (cross-fitted on two study halves): OOF {calibration['uncalibrated']:.4f} -> "
            f"{calibration['cross_fitted']:.4f}; temperatures fitted on all OOF rows "
            f"{ {g: round(t, 3) for g, t in calibration['temperatures_all'].items()} }")
    oracle_report = grading_report(pd.concat(oracle, ignore_index=True))
    base_table = pd.concat(baseline, ignore_index=True)
    base = score_details(solution_from_labels(base_table), submission_frame(
        base_table["row_id"], base_table[list(SUBMISSION_COLUMNS)].to_numpy()), "row_id", 1.0, mode="normalized")
    errors = pd.concat(loc, ignore_index=True) if loc else pd.DataFrame(
        columns=["study_id", "condition", "level", "group", "distance_mm", "slice_error", "fold"])
    loc_summary = summarize_localization(errors)
    if run.is_main:
        oof_table.to_csv(run.run_dir / "oof_predictions.csv", index=False)
        write_text_atomic(run.run_dir / "temperatures.json", json.dumps(calibration, indent=2))
        base_table.to_csv(run.run_dir / "oof_prior_baseline.csv", index=False)
        errors.to_csv(run.run_dir / "localization_errors.csv", index=False)

    figures = _figures(run, cfg, train_dir, model_folds, report, oof_table, errors, examples_src, store,
                       crop_cfg, intensity_cfg)
    official, score_base = report["official"], base["score"]
    run.log(f"OOF official score (two-stage) {official['score']:.4f} vs class-prior baseline {score_base:.4f} "
            f"(margin {score_base - official['score']:+.4f}); label-point crops {oracle_report['official']['score']:.4f}")
    for group in ("spinal", "foraminal", "subarticular", "any_severe_spinal"):
        run.log(f"  {group:18s} model {official.get(group, float('nan')):.4f}  prior {base.get(group, float('nan')):.4f}")
    for group, s in loc_summary.items():
        run.log(f"  stage 1 {group:13s} median {s['median_mm']:.1f} mm, mean slice error {s['mean_slice_error']:.2f}")
    headline = {"oof_official_score": official["score"], "class_prior_baseline": score_base,
                "margin_vs_prior": score_base - official["score"],
                "oof_official_label_point_crops": oracle_report["official"]["score"],
                "balanced_accuracy": report["balanced_accuracy"],
                "stage1_median_error_mm": {g: round(s["median_mm"], 2) for g, s in loc_summary.items()},
                "levels_without_axial_slice": len(misses),
                "second_view_fused_targets": second_view["fused"],
                "second_view_primary_only_targets": second_view["primary_only"],
                "n_targets": report["n"], "oof_official_temperature_cross_fitted": calibration["cross_fitted"]}
    return run.finish({"headline": headline, "second_view": second_view, "official": official, "prior_baseline": base,
                       "label_point_crops": oracle_report["official"], "report": report, "calibration": calibration,
                       "oracle_report": oracle_report, "localization": loc_summary, "train_dir": str(train_dir),
                       "figures": figures})


def training_curves(train_dir: Path, fold: int) -> dict[str, pd.DataFrame]:
    """{job name: its metrics rows} of one fold, from the run's metrics.csv (``job`` column) or, for runs made
    before it, from each job folder's own metrics.csv. Empty when ``train_dir`` is a checkpoint file."""
    prefix = f"fold{fold}/"
    if (train_dir / "metrics.csv").is_file():
        rows = pd.read_csv(train_dir / "metrics.csv")
        if "job" in rows.columns:
            return {job[len(prefix):]: part.dropna(axis=1, how="all").reset_index(drop=True)
                    for job, part in rows.groupby("job", sort=True) if str(job).startswith(prefix)}
    return {csv.parent.name: pd.read_csv(csv) for csv in sorted((train_dir / f"fold{fold}").glob("*/metrics.csv"))}


def _figures(run, cfg, train_dir, model_folds, report, oof_table, errors, examples_src, store, crop_cfg,
             intensity_cfg) -> list[str]:
    """Write the figures; returns PNG paths relative to the run folder."""
    if not run.is_main:
        return []
    fig_dir = run.run_dir / "figures"
    paths = []
    for fold in model_folds:
        curves = training_curves(Path(train_dir), fold)
        if curves:
            paths += training_figure(curves, fig_dir / f"training_curves_fold{fold}")
    paths += evaluation_figure(report, oof_table, errors, fig_dir / "evaluation")
    n_ex = int(cfg["validate"]["n_example_studies"])
    studies = sorted({e["study_id"] for e in examples_src})[:n_ex]
    spinal = [{"study_id": e["study_id"], "level": e["level"], "attention": e["attention"], "label": e["label"],
               "pred": int(np.argmax(e["probs"]))} for e in examples_src
              if e["study_id"] in studies and e["condition"] == "spinal_canal_stenosis" and len(e["attention"])]
    if spinal:
        paths += attention_figure(spinal, fig_dir / "attention_per_slice")
    picked = [e for e in examples_src if e["study_id"] in studies][:: max(1, len(studies) * 25 // 10)][:10]
    if picked:
        dataset = CropDataset(picked, store, crop_cfg, intensity_cfg)
        crops = [{**e, "image": dataset[i]["image"].numpy(), "pred": int(np.argmax(e["probs"])),
                  "p_pred": float(np.max(e["probs"]))} for i, e in enumerate(picked)]
        paths += crops_figure(crops, fig_dir / "crops_pred_vs_true")
    return [p.relative_to(run.run_dir).as_posix() for p in paths if p.suffix == ".png"]


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
