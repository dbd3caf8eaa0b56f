"""Evaluate a trained lens finder with the Bologna Lens Challenge metrics (Metcalf et al. 2019).

    python lensing/validate_lensing.py --checkpoint runs/lensing/baseline/RUN --data data/lensing/smoke
    python lensing/validate_lensing.py --checkpoint RUN --data DIR --set validate.mc_dropout_samples=20

``--checkpoint`` is a checkpoint file, a run folder, or an ensemble run (members averaged, loaded one at
a time). Writes into the output folder: ``summary.json`` (overall, per-survey, calibration, stratified
metrics, the non-learned baseline), ``metrics.csv`` (one row per scope), ``scores.csv`` (per-image
probability, logit, label, survey, truth), and figures: ROC (by false-positive count and rate),
stratified TPR curves, the highest-scoring false positives and the lowest-scoring lenses, reliability.
TPR0/TPR10 are false-positive COUNTS; rate-based TPR@FPR is reported as tpr_at_fpr_rate_*.

``--set validate.combine_with_baseline=fit`` (with ``validate.split=val`` on the training data set) fits a
logistic stack of the network logit and the baseline score (lensing/combine.py) and writes it beside the
checkpoint; ``=apply`` scores any set with it as a third row (metrics, bootstrap CIs, ``combined_score``).
"""

from __future__ import annotations

import numpy as np
import pandas as pd
from torch.utils.data import DataLoader

from common.checkpoint import load_checkpoint, resolve_checkpoints
from common.cli import make_parser, start_run
from common.config import ConfigError
from common.errors import InputError, run_cli
from common.runlog import write_text_atomic
from common.runtime import amp_policy, dataloader_kwargs
from lensing.baseline import azimuthal_residual_score
from lensing.catalog import TRUTH_COLUMNS
from lensing.combine import (
    apply_stack,
    checkpoint_identity,
    combined_report,
    describe,
    fit_stack,
    load_stack,
    save_stack,
    stack_path,
)
from lensing.data import LensingDataset, normalize
from lensing.defaults import lensing_defaults
from lensing.inference import score_run
from lensing.metrics import (
    bologna_metrics,
    bootstrap_comparison,
    calibration,
    per_survey_metrics,
    stratified_curve,
)

DEFAULTS = lensing_defaults()  # sections read here: seed, data.dir, validate, runtime

STRATIFY_LABELS = {"einstein_area_arcsec2": "Einstein area (arcsec²)", "flux_contrast": "flux contrast",
                   "lensed_pixels_above_1sigma": "lensed pixels > 1σ"}


def _metric_rows(scope: str, metrics: dict) -> dict:
    return {"scope": scope, **{k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True, checkpoint=True)
    args = parser.parse_args(argv)
    if args.checkpoint is None:
        parser.error("give the model with --checkpoint PATH (checkpoint file, run folder or ensemble folder)")
    run = start_run(args, domain="lensing", defaults=DEFAULTS, argv=argv, data_key="data.dir")
    cfg, vcfg, device = run.cfg, run.cfg["validate"], run.device
    data_dir = cfg["data"]["dir"]
    if not data_dir:
        raise ConfigError("give the data set folder with --data DIR (or data.dir)")
    combine = str(vcfg["combine_with_baseline"])
    if combine not in ("off", "fit", "apply"):
        raise ConfigError(f"validate.combine_with_baseline must be off, fit or apply, not {combine!r}")
    if combine != "off" and not vcfg["baseline"]:
        raise ConfigError("validate.combine_with_baseline needs validate.baseline: true")
    if combine == "fit" and vcfg["split"] != cfg["data"]["val_split"]:
        raise ConfigError(f"the stack is fitted on the validation split only: set validate.split="
                          f"{cfg['data']['val_split']} (now {vcfg['split']!r})")
    if not run.is_main:
        return run.finish({})

    checkpoints = resolve_checkpoints(args.checkpoint)
    first = load_checkpoint(checkpoints[0], expected_domain="lensing")
    prep = first.get("preprocessing", {})
    dataset = LensingDataset(data_dir, split=vcfg["split"] or None, surveys=vcfg["surveys"] or None,
                             expected_bands=prep.get("n_bands"), expected_size=prep.get("image_size"),
                             clip_sigma=prep.get("clip_sigma", 250.0), stretch=prep.get("stretch", "linear"),
                             residual_channel=prep.get("residual_channel", False),
                             size_policy=cfg["data"]["size_policy"], log=run.log)
    run.record_inputs_valid()
    loader = DataLoader(dataset, batch_size=vcfg["batch_size"], shuffle=False,
                        **dataloader_kwargs(device, cfg["runtime"]["num_workers"]))
    scored = score_run(args.checkpoint, loader, device, amp_policy(device, cfg["runtime"]["amp"]),
                       int(vcfg["mc_dropout_samples"]), run.is_main, run.log)
    cat = dataset.catalog.iloc[scored["index"]].reset_index(drop=True)
    labels = pd.to_numeric(cat["label"]).to_numpy()
    prob = scored["probability"]

    overall = bologna_metrics(labels, scored["logit"])
    surveys = per_survey_metrics(labels, scored["logit"], cat["survey"].to_numpy(), run.log,
                                 float(vcfg["domain_shift_auroc"]), trained_surveys=prep.get("surveys"))
    calib = calibration(labels, prob, int(vcfg["calibration_bins"]))
    curves = {}
    for quantity in vcfg["stratify"]:
        if quantity not in cat.columns:
            run.log(f"[lensing] stratified curve skipped: the catalogue has no column '{quantity}'")
            continue
        lens_q = pd.to_numeric(cat.loc[labels == 1, quantity], errors="coerce").dropna().to_numpy()
        thresholds = np.unique(np.percentile(lens_q, np.linspace(0, 90, int(vcfg["n_thresholds"])))) \
            if lens_q.size else []
        curves[quantity] = stratified_curve(labels, scored["logit"], pd.to_numeric(cat[quantity], errors="coerce"),
                                            thresholds)
    n_image_bands = dataset[0]["image"].shape[0]  # the figures show the model's bands, not residual channels
    inputs = np.stack([dataset[int(i)]["input"].numpy()[:n_image_bands] for i in scored["index"]])
    baseline = None
    if vcfg["baseline"]:  # always on the linear noise-normalized image it was designed for, whatever the stretch
        linear = np.stack([normalize(item["image"].numpy(), item["noise_sigma"].numpy(), dataset.clip_sigma, "linear")
                           for item in (dataset[int(i)] for i in scored["index"])])
        baseline_score = azimuthal_residual_score(linear)
        baseline = bologna_metrics(labels, baseline_score)
    combined, stack, boot_combined = None, None, None
    if combine != "off":
        identity = checkpoint_identity(
            [first] + [load_checkpoint(p, expected_domain="lensing") for p in checkpoints[1:]], checkpoints)
        if combine == "fit":
            splits = set(cat["split"].astype(str)) if "split" in cat.columns else set()
            if splits != {cfg["data"]["val_split"]}:
                raise InputError(f"the stack is fitted on validation rows only; these rows have splits {sorted(splits)}",
                                 data_dir)
            fitted = fit_stack(labels, scored["logit"], baseline_score)
            fitted_on = {"data": str(data_dir), "split": vcfg["split"], "surveys": list(vcfg["surveys"]),
                         "n": fitted["n_fit"], "n_lenses": fitted["n_lenses_fit"]}
            stack = save_stack(stack_path(args.checkpoint), fitted, fitted_on, identity)
            write_text_atomic(run.run_dir / "baseline_stack.json", stack_path(args.checkpoint).read_text("utf-8"))
            run.log(f"[lensing] stack fitted on {fitted['n_fit']} validation cutouts, written to "
                    f"{stack_path(args.checkpoint)} (the combination row below is in-sample)")
        else:
            stack = load_stack(stack_path(args.checkpoint), identity)
        combined_score = apply_stack(stack, scored["logit"], baseline_score)
        combined, boot_combined, combined_headline = combined_report(
            labels, combined_score, scored["logit"], baseline_score, int(vcfg["bootstrap"]), cfg["seed"])

    out_dir = run.run_dir
    scores = pd.DataFrame({"object_id": cat["object_id"], "survey": cat["survey"], "label": labels,
                           "probability": prob, "logit": scored["logit"],
                           "logit_member_std": scored["logit_member_std"]})
    if "logit_mc_dropout_std" in scored:
        scores["logit_mc_dropout_std"] = scored["logit_mc_dropout_std"]
    if baseline is not None:
        scores["baseline_score"] = baseline_score
    if combined is not None:
        scores["combined_score"] = combined_score
    for column in (*TRUTH_COLUMNS, "sim_kind", "split"):
        if column in cat.columns:
            scores[column] = cat[column].values
    write_text_atomic(out_dir / "scores.csv", scores.to_csv(index=False))
    rows = [_metric_rows("overall", overall)]
    rows += [_metric_rows(f"survey:{name}", m) for name, m in surveys.items()]
    if baseline is not None:
        rows.append(_metric_rows("baseline:azimuthal_residual", baseline))
    if combined is not None:
        rows.append(_metric_rows("combined:logistic_stack", combined))
    for quantity, curve in curves.items():
        rows += [_metric_rows(f"stratified:{quantity}>={r['threshold']:.6g}", r) for r in curve]
    write_text_atomic(out_dir / "metrics.csv", pd.DataFrame(rows).to_csv(index=False))

    figures = []
    if vcfg["figures"]:
        from lensing.plots import plot_cutout_grid, plot_reliability, plot_roc, plot_stratified

        figures += plot_roc(labels, {"model": scored["logit"], **({"baseline": baseline_score} if baseline else {}),
                                     **({"model + baseline stack": combined_score} if combined else {})},
                           out_dir / "figures" / "roc")
        figures += plot_stratified(curves, out_dir / "figures" / "stratified_tpr", STRATIFY_LABELS)
        n_grid = int(vcfg["grid_size"])
        fp = np.where(labels == 0)[0]
        fp = fp[np.argsort(-prob[fp])][:n_grid]
        fn = np.where(labels == 1)[0]
        fn = fn[np.argsort(prob[fn])][:n_grid]
        kind = cat["sim_kind"].astype(str).to_numpy() if "sim_kind" in cat.columns else np.array([""] * len(cat))
        figures += plot_cutout_grid(inputs[fp], [f"p={prob[i]:.3f} {kind[i]}" for i in fp],
                                    out_dir / "figures" / "top_false_positives", "highest-scoring non-lenses")
        figures += plot_cutout_grid(inputs[fn], [f"p={prob[i]:.3f} fc={cat['flux_contrast'].iloc[i]:.2f}"
                                                 if "flux_contrast" in cat.columns else f"p={prob[i]:.3f}" for i in fn],
                                    out_dir / "figures" / "lowest_scoring_lenses", "lowest-scoring lenses")
        if calib.get("reliability"):
            figures += plot_reliability(calib["reliability"], out_dir / "figures" / "calibration", calib["ece"])

    run.log(f"[lensing] {len(labels)} cutouts ({overall['n_lenses']} lenses): AUROC {overall['auroc']:.4f}, "
            f"TPR0 {overall['tpr0']:.3f}, TPR10 {overall['tpr10']:.3f} (false-positive counts), "
            f"TPR at FPR rate 0.01 {overall['tpr_at_fpr_rate_0.01']:.3f}; ECE {calib['ece']:.3f}"
            + (f"; baseline AUROC {baseline['auroc']:.4f}" if baseline else "")
            )
    headline = {"auroc": overall["auroc"], "tpr0": overall["tpr0"], "tpr10": overall["tpr10"],
                "tpr_at_fpr_rate_0.01": overall["tpr_at_fpr_rate_0.01"], "ece": calib["ece"],
                "n_test": len(labels)}
    boot = None
    if baseline:
        headline["baseline_auroc"] = baseline["auroc"]
        headline["baseline_tpr0"] = baseline["tpr0"]
        headline["baseline_tpr10"] = baseline["tpr10"]
        if int(vcfg["bootstrap"]) > 0:
            boot = bootstrap_comparison(labels, scored["logit"], baseline_score, int(vcfg["bootstrap"]), cfg["seed"])
            if boot.get("n_boot"):
                for metric in ("auroc", "tpr0", "tpr10"):  # [low, high], rounded for the demo report
                    for key, part in ((f"{metric}_ci95", "model"), (f"baseline_{metric}_ci95", "baseline"),
                                      (f"{metric}_minus_baseline_ci95", "difference")):
                        headline[key] = [round(v, 4) for v in boot[metric][part]]
                run.log("[lensing] bootstrap (" + str(boot["n_boot"]) + " stratified paired resamples, 95 %): " + "; ".join(
                    f"{m} model [{boot[m]['model'][0]:.3f}, {boot[m]['model'][1]:.3f}] baseline "
                    f"[{boot[m]['baseline'][0]:.3f}, {boot[m]['baseline'][1]:.3f}] difference "
                    f"[{boot[m]['difference'][0]:+.3f}, {boot[m]['difference'][1]:+.3f}]" for m in ("auroc", "tpr10")))
    if combined is not None:
        headline.update(combined_headline)
        run.log(describe(combined_headline))
    for name, m in surveys.items():
        if len(surveys) > 1:
            headline[f"auroc_{name}"] = m["auroc"]
    summary = {"checkpoint": str(args.checkpoint), "checkpoints": scored["checkpoint_paths"], "data": str(data_dir),
               "split": vcfg["split"],
               "n_members": scored["n_members"], "overall": overall, "per_survey": surveys,
               "domain_shift_warnings": [k for k, v in surveys.items() if v["domain_shift_warning"]],
               "calibration": calib, "stratified": curves, "baseline_azimuthal_residual": baseline,
               "bootstrap_vs_baseline": boot,
               "combined_logistic_stack": None if combined is None else {
                   "mode": combine, "stack": stack, "metrics": combined, "bootstrap": boot_combined,
                   "in_sample": combine == "fit"},
               "headline": headline,
               "figures": [str(p.relative_to(out_dir).as_posix()) for p in figures if p.suffix == ".png"],
               "notes": "TPR0/TPR10: false-positive counts (Metcalf et al. 2019); tpr_at_fpr_rate_*: rates."}
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
