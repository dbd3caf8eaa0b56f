"""Whole-set predictions and clinical metrics of the ABR model and its baselines.

Every metric is computed once over all recordings / ears of a split (the original averaged R² over
batches, which gave NaN for small batches). Wave-level metrics are over recordings; threshold and
class metrics over ears.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch.utils.data import DataLoader

from abr.classical import analyse_series, fit_criterion, series_correlations, wave_v_polarity
from abr.dataset import ABRSeriesDataset, split_series
from common.metrics import classification_metrics, regression_metrics, roc_auc


# ------------------------------------------------------------------------------------------ predict
@torch.no_grad()
def run_model(model: torch.nn.Module, dataset: ABRSeriesDataset, device: torch.device, batch_size: int = 64,
              amp=None, invert_signal: bool = False) -> tuple[dict, dict]:
    """Model outputs and the matching batch fields for every ear of ``dataset``, concatenated on CPU
    (ears are padded to the same number of levels, so batches stack). ``invert_signal``: the model sees
    every recording multiplied by −1 (the batch fields returned stay as stored)."""
    model.eval()
    outputs: dict[str, list] = {}
    batches: dict[str, list] = {}
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
        context = amp.autocast() if amp is not None else contextlib.nullcontext()
        with context:
            signal = -batch["signal"] if invert_signal else batch["signal"]
            out = model(signal.to(device), batch["static"].to(device), batch["intensity_db"].to(device),
                        batch["level_mask"].to(device))
        for key, value in out.items():
            outputs.setdefault(key, []).append(value.float().cpu())
        for key, value in batch.items():
            batches.setdefault(key, []).append(value)
    return ({k: torch.cat(v) for k, v in outputs.items()}, {k: torch.cat(v) for k, v in batches.items()})


def predictions(outputs: dict, batch: dict, dataset: ABRSeriesDataset, temperature: float = 1.0) -> dict:
    """Numpy predictions: recording outputs flat (aligned with cache rows ``rows``), series outputs in
    the order of ``series``; class logits divided by ``temperature``."""
    mask = batch["level_mask"]
    rows = torch.as_tensor(dataset.a["series_rows"][batch["series"].numpy()])
    out = outputs
    pred = {
        "rows": rows[mask].numpy(),
        "exist_prob": torch.sigmoid(out["exist_logit"])[mask].numpy(),
        "latency_ms": out["latency_ms"][mask].numpy(),
        "latency_sd": torch.exp(0.5 * out["latency_logvar"])[mask].numpy(),
        "amp_rel": out["amp_rel"][mask].numpy(),
        "amp_sd": torch.exp(0.5 * out["amp_logvar"])[mask].numpy(),
        "denoised": out["denoised"][mask].numpy(),
        "series": batch["series"].numpy(),
        "threshold_db": out["threshold_db"].numpy(),
        "threshold_sd": (10.0 * torch.exp(0.5 * out["threshold_logvar"])).numpy(),
        "threshold_global_db": out["threshold_global_db"].numpy(),
        "threshold_local_db": out["threshold_local_db"].numpy(),
        "outlier_prob": torch.sigmoid(out["outlier_logit"]).numpy(),
        "class_logits_raw": out["class_logits"].numpy(),
        "class_logits": (out["class_logits"] / temperature).numpy(),
    }
    pred["class_probs"] = softmax(pred["class_logits"])
    return pred


def gaussian_mixture_of_two(mean_a, sd_a, mean_b, sd_b) -> tuple[np.ndarray, np.ndarray]:
    """Mean and SD of the equal-weight mixture of N(mean_a, sd_a²) and N(mean_b, sd_b²), elementwise (same
    units as the inputs): mean (a + b) / 2, variance (sd_a² + sd_b²) / 2 + ((a − b) / 2)². Symmetric in
    a and b, so swapping the two passes gives bit-identical results."""
    mean = 0.5 * (mean_a + mean_b)
    sd = np.sqrt(0.5 * (sd_a ** 2 + sd_b ** 2) + (0.5 * (mean_a - mean_b)) ** 2)
    return mean, sd


def average_over_polarity(as_recorded: dict, inverted: dict) -> dict:
    """Combine the :func:`predictions` of the recordings as given and of the same recordings × −1 into
    predictions that do not depend on the recording's sign.

    Threshold (dB), wave latencies (ms) and relative amplitudes: equal-weight mixture of the two Gaussians
    (:func:`gaussian_mixture_of_two`), so the SD grows by half the disagreement of the two passes. Wave
    existence and outlier probabilities: averaged; the global / local threshold paths (dB): averaged. Class
    probabilities: averaged (``class_logits`` / ``class_logits_raw`` become the log of the averaged
    calibrated / uncalibrated probabilities). Denoised trace: the mean of the first pass and the negated
    second, so it keeps the sign of the input. Every wave output is the average of both passes, not the pass
    matching the declared polarity: with ``data.signal_polarity`` declared correctly the first pass is that
    one, and averaging keeps the peaks the same when it is not."""
    a, b = as_recorded, inverted
    out = {"rows": a["rows"], "series": a["series"]}
    for mean_key, sd_key in (("threshold_db", "threshold_sd"), ("latency_ms", "latency_sd"), ("amp_rel", "amp_sd")):
        out[mean_key], out[sd_key] = gaussian_mixture_of_two(a[mean_key], a[sd_key], b[mean_key], b[sd_key])
    for key in ("exist_prob", "outlier_prob", "threshold_global_db", "threshold_local_db"):
        out[key] = 0.5 * (a[key] + b[key])
    out["denoised"] = 0.5 * (a["denoised"] - b["denoised"])
    out["class_probs"] = 0.5 * (a["class_probs"] + b["class_probs"])
    tiny = np.finfo(np.float32).tiny  # log(0) guard; softmax of these logits gives back the averaged probabilities
    out["class_logits"] = np.log(np.maximum(out["class_probs"], tiny))
    raw_probs = 0.5 * (softmax(a["class_logits_raw"]) + softmax(b["class_logits_raw"]))
    out["class_logits_raw"] = np.log(np.maximum(raw_probs, tiny))
    return out


def predict(model: torch.nn.Module, dataset: ABRSeriesDataset, device: torch.device, batch_size: int = 64,
            amp=None, polarity_tta: bool = False) -> dict:
    """:func:`run_model` + :func:`predictions` with the model's fitted class temperature. ``polarity_tta``:
    also run every recording × −1 and combine the two passes with :func:`average_over_polarity` (twice the
    model time), so that inverting the input changes no threshold, class or peak output."""
    temperature = float(model.classifier.temperature.item())
    outputs, batch = run_model(model, dataset, device, batch_size, amp)
    pred = predictions(outputs, batch, dataset, temperature)
    if polarity_tta:
        inverted_outputs, _ = run_model(model, dataset, device, batch_size, amp, invert_signal=True)
        pred = average_over_polarity(pred, predictions(inverted_outputs, batch, dataset, temperature))
    return pred


def softmax(logits: np.ndarray) -> np.ndarray:
    z = logits - logits.max(axis=1, keepdims=True)
    e = np.exp(z)
    return e / e.sum(axis=1, keepdims=True)


def fit_temperature(logits: np.ndarray, labels: np.ndarray) -> float:
    """Temperature T in [0.2, 10] minimizing the validation negative log-likelihood of softmax(logits / T)
    (Guo et al. 2017), by a log-spaced grid search refined once around the best value."""
    labels = np.asarray(labels)
    keep = labels >= 0
    logits, labels = logits[keep], labels[keep]
    if labels.size == 0:
        return 1.0

    def nll(t: float) -> float:
        p = softmax(logits / t)
        return float(-np.mean(np.log(np.clip(p[np.arange(labels.size), labels], 1e-12, None))))

    # Bounded to [0.2, 10]: on a small, perfectly separated validation set the likelihood keeps improving
    # as T → 0, which would only make the test predictions over-confident.
    low, high = 0.2, 10.0
    grid = np.exp(np.linspace(np.log(low), np.log(high), 121))
    best = float(grid[np.argmin([nll(t) for t in grid])])
    fine = np.clip(best * np.exp(np.linspace(-0.05, 0.05, 41)), low, high)
    return float(fine[np.argmin([nll(t) for t in fine])])


# ------------------------------------------------------------------------------------------- metrics
def binary_detection_metrics(y_true, score, threshold: float = 0.5) -> dict:
    """F1, precision, recall, AUROC, false-peak rate FP/(FP+TN) and missed-peak rate FN/(TP+FN)."""
    y = np.asarray(y_true, dtype=bool).ravel()
    s = np.asarray(score, dtype=np.float64).ravel()
    pred = s >= threshold
    tp, fp = int(np.sum(pred & y)), int(np.sum(pred & ~y))
    fn, tn = int(np.sum(~pred & y)), int(np.sum(~pred & ~y))
    precision = tp / (tp + fp) if tp + fp else 0.0
    recall = tp / (tp + fn) if tp + fn else 0.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"f1": f1, "precision": precision, "recall": recall, "auroc": roc_auc(y, s),
            "false_peak_rate": fp / (fp + tn) if fp + tn else float("nan"),
            "missed_peak_rate": fn / (tp + fn) if tp + fn else float("nan"), "n": int(y.size),
            "n_present": int(y.sum())}


def threshold_metrics(pred_db, true_db, valid=None) -> dict:
    """MAE, R², bias, share within ±5 / ±10 dB, over-estimation (pred > true + 5 dB) and
    under-estimation (pred < true − 5 dB) rates, over ears with a known threshold."""
    pred = np.asarray(pred_db, dtype=np.float64).ravel()
    true = np.asarray(true_db, dtype=np.float64).ravel()
    keep = np.isfinite(pred) & np.isfinite(true)
    if valid is not None:
        keep &= np.asarray(valid, dtype=bool).ravel()
    err = pred[keep] - true[keep]
    out = regression_metrics(pred[keep], true[keep])
    if err.size == 0:
        return {**out, "within_5db": float("nan"), "within_10db": float("nan"), "over_rate": float("nan"),
                "under_rate": float("nan")}
    out.update({"within_5db": float(np.mean(np.abs(err) <= 5.0)), "within_10db": float(np.mean(np.abs(err) <= 10.0)),
                "over_rate": float(np.mean(err > 5.0)), "under_rate": float(np.mean(err < -5.0))})
    return out


def rowwise_pearson(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a - a.mean(axis=1, keepdims=True)
    b = b - b.mean(axis=1, keepdims=True)
    denom = np.sqrt((a * a).sum(1) * (b * b).sum(1))
    return np.where(denom > 0, (a * b).sum(1) / np.where(denom > 0, denom, 1.0), np.nan)


def class_prior_baselines(train_labels: np.ndarray, test_labels: np.ndarray, n_classes: int, names,
                          seed: int = 0, draws: int = 200) -> dict:
    """Macro F1 of always predicting the training majority class, and the mean over ``draws`` of
    predicting classes at random with the training priors."""
    train_labels = train_labels[train_labels >= 0]
    test_labels = test_labels[test_labels >= 0]
    if train_labels.size == 0 or test_labels.size == 0:  # no known classes: nothing to compare
        nan = float("nan")
        return {"majority_macro_f1": nan, "majority_balanced_accuracy": nan, "majority_accuracy": nan,
                "prior_sampling_macro_f1": nan, "majority_class": None}
    prior = np.bincount(train_labels, minlength=n_classes) / max(train_labels.size, 1)
    majority = classification_metrics(test_labels, y_pred=np.full(test_labels.size, int(prior.argmax())),
                                      labels=list(range(n_classes)), class_names=names)
    rng = np.random.default_rng(seed)
    sampled = [classification_metrics(test_labels, y_pred=rng.choice(n_classes, size=test_labels.size, p=prior),
                                      labels=list(range(n_classes)), class_names=names)["macro_f1"]
               for _ in range(draws)]
    return {"majority_macro_f1": majority["macro_f1"], "majority_balanced_accuracy": majority["balanced_accuracy"],
            "majority_accuracy": majority["accuracy"], "prior_sampling_macro_f1": float(np.mean(sampled)),
            "majority_class": names[int(prior.argmax())]}


def class_metrics(labels: np.ndarray, probs: np.ndarray, names) -> dict:
    """common.metrics.classification_metrics, or the same keys as NaN when no ear has a known class (a table
    without a class column: sklearn refuses empty input)."""
    if labels.size:
        return classification_metrics(labels, probs=probs, labels=list(range(len(names))), class_names=names)
    nan = float("nan")
    return {"accuracy": nan, "balanced_accuracy": nan, "macro_f1": nan, "log_loss": nan, "ece": nan, "n": 0,
            "per_class": {n: {"recall": nan, "precision": nan, "f1": nan, "support": 0} for n in names},
            "confusion": [[0] * len(names) for _ in names]}


def interval_coverage(abs_error_db: np.ndarray, sd_db: np.ndarray, z: float = 1.96) -> dict:
    """Share of ears whose |error| lies inside the model's ±z·σ interval (0.95 expected for a calibrated
    Gaussian at z = 1.96), the median σ (dB) and the number of ears."""
    abs_error_db, sd_db = np.asarray(abs_error_db, np.float64), np.asarray(sd_db, np.float64)
    if abs_error_db.size == 0:
        return {"coverage_95": float("nan"), "median_sd_db": float("nan"), "n": 0}
    return {"coverage_95": float(np.mean(abs_error_db <= z * sd_db)), "median_sd_db": float(np.median(sd_db)),
            "n": int(abs_error_db.size)}


def evaluate_model(pred: dict, arrays: dict, meta: dict) -> dict:
    """All model metrics from :func:`predict` output and the cache arrays."""
    rows, series = pred["rows"], pred["series"]
    waves, names = meta["waves"], meta["class_names"]
    exist = arrays["exist"][rows]
    known = arrays["exist_known"][rows]
    scale = arrays["scale_uv"][rows].astype(np.float64)
    out: dict = {"waves": {}}
    for w, wave in enumerate(waves):
        k = known[:, w]
        det = binary_detection_metrics(exist[k, w], pred["exist_prob"][k, w])
        present = exist[:, w] & k
        lat = regression_metrics(pred["latency_ms"][:, w], arrays["latency_ms"][rows, w], present)
        err = np.abs(pred["latency_ms"][present, w] - arrays["latency_ms"][rows[present], w])
        lat["within_0.1ms"] = float(np.mean(err <= 0.1)) if err.size else float("nan")
        amp_true = arrays["amplitude_uv"][rows, w]
        amp = regression_metrics(pred["amp_rel"][:, w] * scale, amp_true, present & np.isfinite(amp_true))
        out["waves"][wave] = {"existence": det, "latency_ms": lat, "amplitude_uv": amp}
    thr_true = arrays["series_threshold_db"][series]
    out["threshold"] = threshold_metrics(pred["threshold_db"], thr_true)
    out["threshold_global_path"] = threshold_metrics(pred["threshold_global_db"], thr_true)
    out["threshold_local_path"] = threshold_metrics(pred["threshold_local_db"], thr_true)
    err = np.abs(pred["threshold_db"] - thr_true)
    ok = np.isfinite(err)
    out["threshold_outlier_auroc"] = roc_auc(err[ok] > 10.0, pred["outlier_prob"][ok])
    out["threshold_interval"] = interval_coverage(err[ok], pred["threshold_sd"][ok])
    labels = arrays["series_class"][series]
    keep = labels >= 0
    out["classification"] = class_metrics(labels[keep], pred["class_probs"][keep], names)
    has_clean = arrays["has_clean"][rows]
    if has_clean.any():
        clean = arrays["clean"][rows][has_clean].astype(np.float64)
        r_model = rowwise_pearson(pred["denoised"][has_clean].astype(np.float64), clean)
        r_input = rowwise_pearson(arrays["signal"][rows][has_clean].astype(np.float64), clean)
        responding = exist[has_clean].any(axis=1)
        out["signal"] = {"denoised_vs_clean_r": float(np.nanmean(r_model[responding])) if responding.any() else float("nan"),
                         "noisy_input_vs_clean_r": float(np.nanmean(r_input[responding])) if responding.any() else float("nan"),
                         "n_responding": int(responding.sum()),
                         "denoised_rmse_rel": float(np.sqrt(np.mean((pred["denoised"][has_clean] - clean) ** 2)))}
    fmp = arrays["fmp"][rows]
    v = waves.index("V")
    if np.isfinite(fmp).any():
        ok = np.isfinite(fmp) & known[:, v]
        out["fmp_leak_wave_v_auroc"] = roc_auc(exist[ok, v], fmp[ok])
    return out


# ---------------------------------------------------------------------------------- classical baseline
def classical_inputs(arrays: dict, series: np.ndarray) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """(rows, µV signals, intensities) per ear, rows ascending by intensity."""
    out = []
    for s in series:
        rows = arrays["series_rows"][s]
        rows = rows[rows >= 0]
        signals = arrays["signal"][rows].astype(np.float64) * arrays["scale_uv"][rows, None]
        out.append((rows, signals, arrays["intensity_db"][rows].astype(np.float64)))
    return out


def fit_classical(arrays: dict, meta: dict, series: np.ndarray, cfg: dict) -> float:
    """The correlation criterion (cfg classical.criterion, or fitted on ``series`` — the val split)."""
    if cfg["criterion"] is not None:
        return float(cfg["criterion"])
    t_ms = np.asarray(meta["time_ms"])
    inputs = classical_inputs(arrays, series)
    corr = [series_correlations(sig, t_ms, cfg["window_ms"], cfg["max_lag_ms"]) for _, sig, _ in inputs]
    truths = arrays["series_threshold_db"][series]
    keep = np.isfinite(truths)
    return fit_criterion([c for c, k in zip(corr, keep) if k], [i for (_, _, i), k in zip(inputs, keep) if k],
                         truths[keep], cfg["criterion_grid"], meta["threshold_censor_db"], meta["intensity_step_db"])


def classical_criterion(arrays: dict, meta: dict, cfg: dict) -> tuple[float, str]:
    """The classical baseline's correlation criterion and where it came from: ``classical.criterion`` when
    set; else fitted on the val ears with a known threshold; else (none: a small cohort, or preprocess.split
    without val) ``predict.classical_criterion``, the value used on unlabelled recordings."""
    if cfg["classical"]["criterion"] is not None:
        return float(cfg["classical"]["criterion"]), "classical.criterion"
    val = split_series(arrays, "val")
    if np.isfinite(arrays["series_threshold_db"][val]).any():
        return fit_classical(arrays, meta, val, cfg["classical"]), f"fitted on {val.size} val ears"
    return float(cfg["predict"]["classical_criterion"]), "predict.classical_criterion (no val ear with a threshold)"


def evaluate_classical(arrays: dict, meta: dict, series: np.ndarray, cfg: dict, criterion: float) -> dict:
    """Classical threshold and wave V metrics on ``series`` plus the per-ear / per-recording picks. The wave V
    search's polarity: ``classical.wave_v_polarity``, or ``auto`` for a cache read with ``data.signal_polarity:
    unknown``; ``wave_v_sign`` per ear (−1: found inverted) is in the picks."""
    t_ms = np.asarray(meta["time_ms"])
    polarity = wave_v_polarity(cfg, meta.get("signal_polarity"))
    v = meta["waves"].index("V")
    rows_all, thr, cens, resp, corr, lat, amp, signs = [], [], [], [], [], [], [], []
    for rows, signals, levels in classical_inputs(arrays, series):
        res = analyse_series(signals, levels, t_ms, cfg, criterion, meta["threshold_censor_db"],
                             meta["intensity_step_db"], polarity=polarity)
        signs.append(res["wave_v_sign"])
        rows_all.append(rows)
        thr.append(res["threshold_db"])
        cens.append(res["threshold_censoring"])
        resp.append(res["response"])
        corr.append(res["correlation"])
        lat.append(res["latency_ms"])
        amp.append(res["amplitude_uv"])
    rows = np.concatenate(rows_all)
    resp, corr = np.concatenate(resp), np.concatenate(corr)
    lat, amp = np.concatenate(lat), np.concatenate(amp)
    exist = arrays["exist"][rows, v]
    known = arrays["exist_known"][rows, v]
    det = binary_detection_metrics(exist[known], resp[known].astype(float))
    det["auroc"] = roc_auc(exist[known], corr[known])
    present = exist & known
    lat_m = regression_metrics(lat, arrays["latency_ms"][rows, v], present)
    err = np.abs(lat[present] - arrays["latency_ms"][rows[present], v])
    lat_m["within_0.1ms"] = float(np.mean(err <= 0.1)) if err.size else float("nan")
    amp_true = arrays["amplitude_uv"][rows, v]
    metrics = {"criterion": criterion, "wave_v_polarity": polarity,
               "wave_v_inverted_ears": int(np.sum(np.asarray(signs) < 0)),
               "threshold": threshold_metrics(np.array(thr), arrays["series_threshold_db"][series]),
               "wave_v": {"existence": det, "latency_ms": lat_m,
                          "amplitude_uv": regression_metrics(amp, amp_true, present & np.isfinite(amp_true))}}
    picks = {"rows": rows, "response": resp, "correlation": corr, "latency_ms": lat, "amplitude_uv": amp,
             "threshold_db": np.array(thr), "threshold_censoring": np.array(cens, dtype=object),
             "series": np.asarray(series), "wave_v_sign": np.asarray(signs)}
    return {"metrics": metrics, "picks": picks}
