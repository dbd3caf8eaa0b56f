"""Validate a trained ABR model on a split, side by side with the classical and class-prior baselines.

Rebuilds the model from the checkpoint alone (no class named here). Every metric is computed once over
the whole split: wave V existence F1 / AUROC / false- and missed-peak rates, latency MAE (ms) and R²,
amplitude MAE (µV) and R²; threshold MAE (dB), share within ±5 / ±10 dB, over/under-estimation rates;
macro F1, balanced accuracy, per-class F1, confusion matrix, calibration (ECE, reliability diagram);
correlation of the denoised trace with the clean one (against the noisy input's). The classical
baseline's criterion is fitted on the validation split (without val ears that have a threshold: classical.criterion,
else predict.classical_criterion; logged). ``--split all`` scores every ear of the cache (a small labelled
cohort preprocessed with ``--set "preprocess.split=[0,0,1]"`` is all test).

Outputs: summary.json (headline + everything), metrics.csv (metric, model, classical, class prior),
predictions_ears.csv and predictions_recordings.csv (per-ear and per-recording estimates for review; each ear
with predict_abr's ``unsure`` flag and reasons, abr/unsure.py, and the headline counts how many ears more than
10 dB off it catches),
figures/. The threshold σ reported is the model's times the σ scale fitted on val ears at training, widened on
unsure ears by the model-classical gap (abr/unsure.py; ``predict.widen_unsure_sd``); the headline also gives the
coverage of the model's own σ.

Config sections used: validate, classical, predict (``predict.polarity_tta``, on by default: the model is
averaged over each recording and its inverse, recorded in the headline; plus the checkpoint's preprocessing
metadata).
``--checkpoint PATH``: a checkpoint file or a training run folder; ``--data DIR``: the preprocessed cache
(default: the one the model was trained on).

    python -m abr.validate_abr --checkpoint runs/abr/smoke/<run> --data data/abr/smoke
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from abr.dataset import ABRSeriesDataset, CacheError, load_cache, split_series
from abr.defaults import abr_defaults
from abr.evaluation import (
    class_prior_baselines,
    classical_criterion,
    evaluate_classical,
    evaluate_model,
    interval_coverage,
    predict,
    softmax,
)
from abr.figures import (
    confusion_matrix,
    latency_intensity,
    pick_figure_ears,
    reliability_diagram,
    threshold_agreement,
    waveform_stacks,
)
from abr.levels import model_level_reference
from abr.unsure import checkpoint_sd_scale, reported_threshold_sd, unsure_reasons
from common.checkpoint import CheckpointError, load_model, resolve_checkpoints
from common.cli import make_parser, start_run
from common.errors import InputError, run_cli
from common.metrics import reliability_curve
from common.runlog import write_text_atomic

DEFAULTS = abr_defaults()
MULTITASK_TARGET = "abr.models.ABRMultiTaskNet"


def check_grid(meta: dict, ckpt_meta: dict, data_dir: Path) -> None:
    """The cache fits the checkpoint: grid, classes, waves, static inputs and the level reference."""
    if model_level_reference(meta) != model_level_reference(ckpt_meta):
        raise CacheError(f"levels in {model_level_reference(meta)} but the checkpoint was trained on "
                         f"{model_level_reference(ckpt_meta)}; preprocess with data.level_offset_db converting "
                         "to the model's reference", data_dir)
    for key in ("n_samples", "model_rate_hz", "class_names", "waves", "static_features"):
        if meta.get(key) != ckpt_meta.get(key):
            hint = ""
            if key == "n_samples" and meta.get("model_rate_hz") == ckpt_meta.get("model_rate_hz"):
                hint = (f" (a {meta.get('window_ms', 0):.1f} ms window against the model's "
                        f"{ckpt_meta.get('window_ms', 0):.1f} ms: preprocess with --set preprocess.model_window_ms="
                        f"{ckpt_meta.get('window_ms', 0):g} to crop / zero-pad, or use abr.predict_abr, which does)")
            raise CacheError(f"cache field '{key}' is {meta.get(key)!r} but the checkpoint was trained with "
                             f"{ckpt_meta.get(key)!r}; preprocess the data with the model's config{hint}", data_dir)


def model_checkpoint(path: Path | None, device) -> tuple:
    """(model, checkpoint) of the multi-task model that ``--checkpoint PATH`` names: a checkpoint file or a
    training run folder (its checkpoint_best.pt). An ensemble folder is refused: these scripts score one model."""
    if path is None:
        raise InputError("--checkpoint PATH is required (a checkpoint file or a run folder of abr.train_abr)")
    files = resolve_checkpoints(path)
    if len(files) != 1:
        raise InputError(f"names {len(files)} checkpoints (an ensemble); abr validation scores one model: "
                         f"give one of {[f.as_posix() for f in files[:3]]}", path)
    model, ckpt = load_model(files[0], device=device, expected_domain="abr")
    if ckpt["model"]["target"] != MULTITASK_TARGET:
        raise CheckpointError(f"{files[0]}: holds {ckpt['model']['target']}, not the multi-task model "
                              f"{MULTITASK_TARGET} (diffusion generators are used by abr.generate_abr)")
    return model, ckpt


def ear_unsure(arrays: dict, meta: dict, ckpt_meta: dict, pred: dict, picks: dict, predict_cfg: dict) -> list:
    """predict_abr's ``unsure`` reasons (abr/unsure.py) for every evaluated ear, in the order of pred["series"]."""
    index = {int(s): j for j, s in enumerate(picks["series"])}
    converted = meta.get("level_reference") if float(meta.get("level_offset_db", 0.0) or 0.0) != 0 else None
    out = []
    for i, s in enumerate(pred["series"]):
        rows = arrays["series_rows"][s]
        rows = rows[rows >= 0]
        j = index[int(s)]
        out.append(unsure_reasons(float(pred["threshold_db"][i]), float(pred["threshold_sd"][i]),
                                  float(pred["outlier_prob"][i]), float(picks["threshold_db"][j]),
                                  picks["threshold_censoring"][j], arrays["intensity_db"][rows].astype(np.float64),
                                  float(meta["intensity_step_db"]), arrays["static_raw"][rows], ckpt_meta,
                                  predict_cfg, converted_from=converted))
    return out


def report_threshold_sd(pred: dict, arrays: dict, meta: dict, ckpt: dict, picks: dict, predict_cfg: dict) -> dict:
    """Replace ``pred["threshold_sd"]`` (the model's own σ) by the σ predict_abr reports: scaled by the
    checkpoint's val fit and widened on unsure ears by the model-classical gap (abr/unsure.py). Returns the
    unsure reasons and flags per ear, the scale and its source, the classical thresholds in the order of
    pred["series"], and the ±1.96σ coverage of the model's own and of the scaled σ (ears with a threshold)."""
    sd_scale, sd_scale_source = checkpoint_sd_scale(ckpt)
    sd_model = pred["threshold_sd"]
    pred["threshold_sd"] = sd_scale * sd_model
    reasons = ear_unsure(arrays, meta, ckpt["preprocessing"], pred, picks, predict_cfg)
    unsure = np.array([bool(r) for r in reasons], dtype=bool)
    index = {int(s): i for i, s in enumerate(picks["series"])}
    classical_db = np.array([picks["threshold_db"][index[int(s)]] for s in pred["series"]])
    pred["threshold_sd"] = reported_threshold_sd(sd_model, sd_scale, pred["threshold_db"], classical_db, unsure,
                                                 widen=bool(predict_cfg["widen_unsure_sd"]))
    error = np.abs(pred["threshold_db"] - arrays["series_threshold_db"][pred["series"]])
    known = np.isfinite(error)
    coverage = {"threshold_interval_model_only": interval_coverage(error[known], sd_model[known]),
                "threshold_interval_scaled": interval_coverage(error[known], sd_scale * sd_model[known])}
    return {"reasons": reasons, "unsure": unsure, "sd_scale": sd_scale, "sd_scale_source": sd_scale_source,
            "classical_db": classical_db, "coverage": coverage}


def write_csv(path: Path, header: list[str], rows: list[list]) -> None:
    tmp = path.with_name(path.name + ".partial")
    with tmp.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(header)
        writer.writerows(rows)
    tmp.replace(path)


def flat_metrics(prefix: str, value, out: dict) -> dict:
    """Nested metrics to dotted names (lists such as confusion matrices are left out)."""
    if isinstance(value, dict):
        for key, item in value.items():
            flat_metrics(f"{prefix}.{key}" if prefix else str(key), item, out)
    elif isinstance(value, (int, float, np.floating, np.integer)) and not isinstance(value, bool):
        out[prefix] = float(value)
    return out


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True, checkpoint=True)
    parser.add_argument("--split", default=None, help="train | val | test | all (default validate.split)")
    args = parser.parse_args(argv)
    run = start_run(args, domain="abr", defaults=DEFAULTS, argv=argv)
    cfg, device = run.cfg, run.device
    model, ckpt = model_checkpoint(args.checkpoint, device)
    ckpt_meta = ckpt["preprocessing"]
    data_dir = args.data or Path(ckpt_meta["cache"])  # default: the cache the model was trained on
    arrays, meta = load_cache(data_dir)
    check_grid(meta, ckpt_meta, data_dir)
    split = args.split or cfg["validate"]["split"]
    series = split_series(arrays, split)
    if series.size == 0:
        counts = {name: int(split_series(arrays, name).size) for name in ("train", "val", "test")}
        raise CacheError(f"the '{split}' split has no ears (ears per split: {counts}); pass --split with one "
                         "that has, or --split all", data_dir)
    run.record_inputs_valid()
    dataset = ABRSeriesDataset(arrays, ckpt_meta, series)  # the training statistics standardize the inputs
    run.log(f"{ckpt['model']['target']} (epoch {ckpt['epoch']}) on {len(dataset)} {split} ears of {data_dir}")

    polarity_tta = bool(cfg["predict"]["polarity_tta"])
    pred = predict(model, dataset, device, cfg["validate"]["batch_size"], polarity_tta=polarity_tta)
    criterion, criterion_source = classical_criterion(arrays, meta, cfg)
    run.log(f"classical criterion {criterion:g}: {criterion_source}"
            + (" (the evaluated ears themselves)" if split in ("val", "all") and "fitted" in criterion_source else ""))
    classical = evaluate_classical(arrays, meta, series, cfg["classical"], criterion)
    sd = report_threshold_sd(pred, arrays, meta, ckpt, classical["picks"], cfg["predict"])
    reasons, unsure, sd_scale, sd_scale_source = sd["reasons"], sd["unsure"], sd["sd_scale"], sd["sd_scale_source"]
    ser_index = {int(s): i for i, s in enumerate(classical["picks"]["series"])}
    cls_thr = sd["classical_db"]
    run.log(f"threshold σ scale {sd_scale:.3f} ({sd_scale_source}); unsure ears widened by the model-classical "
            f"gap: {bool(cfg['predict']['widen_unsure_sd'])}")
    metrics = evaluate_model(pred, arrays, meta)
    metrics.update(sd["coverage"])
    names = meta["class_names"]
    labels = arrays["series_class"][pred["series"]]
    keep = labels >= 0
    before = reliability_curve(softmax(pred["class_logits_raw"])[keep], labels[keep], cfg["validate"]["calibration_bins"])
    after = reliability_curve(pred["class_probs"][keep], labels[keep], cfg["validate"]["calibration_bins"])
    from common.metrics import expected_calibration_error

    metrics["calibration"] = {"temperature": float(model.classifier.temperature.item()),
                              "ece_raw": expected_calibration_error(softmax(pred["class_logits_raw"])[keep], labels[keep]),
                              "ece_calibrated": metrics["classification"]["ece"]}
    prior = class_prior_baselines(arrays["series_class"][split_series(arrays, "train")], labels, len(names), names,
                                  seed=int(cfg["seed"]))

    error = np.abs(pred["threshold_db"] - arrays["series_threshold_db"][pred["series"]])
    off = np.isfinite(error) & (error > 10.0)
    sure_known = ~unsure & np.isfinite(error)
    within_sure = float(np.mean(error[sure_known] <= 10.0)) if sure_known.any() else float("nan")  # NaN: all unsure
    v = metrics["waves"]["V"]
    cv = classical["metrics"]["wave_v"]
    headline = {
        "threshold_within_10db": metrics["threshold"]["within_10db"],
        "classical_threshold_within_10db": classical["metrics"]["threshold"]["within_10db"],
        "threshold_mae_db": metrics["threshold"]["mae"],
        "classical_threshold_mae_db": classical["metrics"]["threshold"]["mae"],
        "wave_v_latency_mae_ms": v["latency_ms"]["mae"],
        "classical_wave_v_latency_mae_ms": cv["latency_ms"]["mae"],
        "wave_v_existence_f1": v["existence"]["f1"],
        "classical_wave_v_existence_f1": cv["existence"]["f1"],
        "wave_v_auroc": v["existence"]["auroc"],
        "macro_f1": metrics["classification"]["macro_f1"],
        "class_prior_macro_f1": prior["majority_macro_f1"],
        "balanced_accuracy": metrics["classification"]["balanced_accuracy"],
        "denoised_vs_clean_r": metrics.get("signal", {}).get("denoised_vs_clean_r"),
        "noisy_input_vs_clean_r": metrics.get("signal", {}).get("noisy_input_vs_clean_r"),
        "threshold_interval_coverage_95": metrics["threshold_interval"]["coverage_95"],
        "threshold_median_sd_db": metrics["threshold_interval"]["median_sd_db"],
        "threshold_interval_coverage_95_model_only": metrics["threshold_interval_model_only"]["coverage_95"],
        "threshold_sd_scale": sd_scale,
        "n_unsure": int(unsure.sum()),
        "n_off_by_10db": int(off.sum()),
        "n_off_by_10db_flagged_unsure": int((off & unsure).sum()),
        "n_ears": int(series.size),
        "polarity_tta": polarity_tta,
    }
    run.log(f"model averaged over each recording and its inverse (predict.polarity_tta): {polarity_tta}")
    run.log("          model   classical / prior")
    run.log(f"thr ±10 dB {headline['threshold_within_10db']:.3f}   {headline['classical_threshold_within_10db']:.3f}")
    run.log(f"thr MAE    {headline['threshold_mae_db']:.2f}   {headline['classical_threshold_mae_db']:.2f} dB")
    run.log(f"V lat MAE  {headline['wave_v_latency_mae_ms']:.3f}   {headline['classical_wave_v_latency_mae_ms']:.3f} ms")
    run.log(f"V F1       {headline['wave_v_existence_f1']:.3f}   {headline['classical_wave_v_existence_f1']:.3f}")
    run.log(f"thr ±1.96σ {headline['threshold_interval_coverage_95']:.3f} of ears (median σ "
            f"{headline['threshold_median_sd_db']:.1f} dB; the model's own σ: "
            f"{headline['threshold_interval_coverage_95_model_only']:.3f})")
    run.log(f"unsure     {headline['n_unsure']} ears, {headline['n_off_by_10db_flagged_unsure']} of the "
            f"{headline['n_off_by_10db']} more than 10 dB off; ±10 dB among the others "
            f"{within_sure:.3f}")
    run.log(f"macro F1   {headline['macro_f1']:.3f}   {headline['class_prior_macro_f1']:.3f} (majority class)")

    # ---- tables for review
    out_dir = run.run_dir
    comparable = {"threshold": "threshold", "waves.V.latency_ms": "wave_v.latency_ms",
                  "waves.V.existence": "wave_v.existence", "waves.V.amplitude_uv": "wave_v.amplitude_uv"}
    model_flat = flat_metrics("", metrics, {})
    classical_flat = flat_metrics("", classical["metrics"], {})
    rows = []
    for key, value in model_flat.items():
        other = ""
        for mine, theirs in comparable.items():
            if key.startswith(mine + "."):
                other = classical_flat.get(theirs + key[len(mine):], "")
        prior_value = prior["majority_macro_f1"] if key == "classification.macro_f1" else \
            prior["majority_balanced_accuracy"] if key == "classification.balanced_accuracy" else ""
        rows.append([key, value, other, prior_value])
    write_csv(out_dir / "metrics.csv", ["metric", "model", "classical_baseline", "class_prior_baseline"], rows)
    ear_rows = []
    for i, s in enumerate(pred["series"]):
        true_class = names[int(arrays["series_class"][s])] if arrays["series_class"][s] >= 0 else "unknown"
        ear_rows.append([arrays["series_patient"][s], arrays["series_ear"][s], true_class,
                         names[int(np.argmax(pred["class_probs"][i]))], round(float(pred["class_probs"][i].max()), 4),
                         arrays["series_threshold_db"][s], round(float(pred["threshold_db"][i]), 2),
                         round(float(pred["threshold_sd"][i]), 2), round(float(pred["outlier_prob"][i]), 3),
                         classical["picks"]["threshold_db"][ser_index[int(s)]],
                         classical["picks"]["threshold_censoring"][ser_index[int(s)]], bool(unsure[i]),
                         "; ".join(reasons[i])])
    write_csv(out_dir / "predictions_ears.csv", ["patient_id", "ear", "class_true", "class_model", "class_prob",
                                                  "threshold_true_db", "threshold_model_db", "threshold_model_sd_db",
                                                  "threshold_outlier_prob", "threshold_classical_db",
                                                  "threshold_classical_censoring", "unsure", "unsure_reasons"],
              ear_rows)
    wv = meta["waves"].index("V")
    cpos = {int(r): i for i, r in enumerate(classical["picks"]["rows"])}
    rec_rows = []
    for i, r in enumerate(pred["rows"]):
        j = cpos[int(r)]
        rec_rows.append([int(arrays["row_number"][r]), arrays["series_patient"][arrays["series_of_row"][r]],
                         arrays["series_ear"][arrays["series_of_row"][r]], float(arrays["intensity_db"][r]),
                         bool(arrays["exist"][r, wv]), float(arrays["latency_ms"][r, wv]),
                         round(float(pred["exist_prob"][i, wv]), 4), round(float(pred["latency_ms"][i, wv]), 4),
                         round(float(pred["latency_sd"][i, wv]), 4),
                         round(float(pred["amp_rel"][i, wv] * arrays["scale_uv"][r]), 5),
                         bool(classical["picks"]["response"][j]), round(float(classical["picks"]["latency_ms"][j]), 4)])
    write_csv(out_dir / "predictions_recordings.csv",
              ["table_row", "patient_id", "ear", "intensity_db", "v_true_present", "v_true_latency_ms", "v_model_prob",
               "v_model_latency_ms", "v_model_latency_sd_ms", "v_model_amplitude_uv", "v_classical_present",
               "v_classical_latency_ms"], rec_rows)

    # ---- figures
    fig_dir = out_dir / "figures"
    ears = pick_figure_ears(arrays, series, cfg["validate"]["figure_ears"], int(cfg["seed"]))
    model_thr = {int(s): float(t) for s, t in zip(pred["series"], pred["threshold_db"])}
    figures = []
    figures += waveform_stacks(arrays, meta, pred, classical["picks"], ears, fig_dir / "waveform_stacks", model_thr)
    figures += latency_intensity(arrays, meta, pred, fig_dir / "latency_intensity")
    thr_true = arrays["series_threshold_db"][pred["series"]]
    figures += threshold_agreement(thr_true, pred["threshold_db"], cls_thr, fig_dir / "threshold_agreement",
                                   model_level_reference(meta))
    figures += confusion_matrix(metrics["classification"]["confusion"], names, fig_dir / "confusion_matrix")
    figures += reliability_diagram(before, after, fig_dir / "reliability")
    write_text_atomic(out_dir / "README.txt", "ABR validation outputs: summary.json (headline first), metrics.csv, "
                      "predictions_ears.csv, predictions_recordings.csv, figures/ (PNG 300 DPI + PDF).\n")
    summary = {"headline": headline, "split": split, "classical_criterion_source": criterion_source,
               "threshold_sd_scale_source": sd_scale_source,
               "threshold_within_10db_not_unsure": within_sure,
               "checkpoint": Path(args.checkpoint).as_posix(),
               "checkpoint_epoch": ckpt["epoch"], "model": metrics, "classical_baseline": classical["metrics"],
               "class_prior_baseline": prior, "reliability": {"raw": before, "calibrated": after},
               "figures": [p.relative_to(out_dir).as_posix() for p in figures if p.suffix == ".png"],
               "notes": "Synthetic held-out patients. Classical: correlation with the next-higher level "
                        "(criterion: classical_criterion_source) and wave V peak search in a latency window. Class prior: "
                        "always the training majority class."}
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
