"""Train the ABR multi-task model (peaks, threshold, hearing-loss class, denoising) on a preprocessed cache.

Seed 003's loss weights and curriculum (config loss.weights / loss.curriculum), masked Gaussian NLL or
Huber for peaks, Huber for the threshold, focal loss or weighted CE for the class, optional learned
uncertainty weighting and class-balanced sampling; random polarity inversion of training ears
(``train.polarity_inversion_prob``, :func:`invert_polarity`); AdamW with warm restarts, gradient clipping, AMP on
CUDA, DDP (torchrun), progress bars. Ctrl+C (or --stop-after-steps N) saves checkpoint_last.pt mid-epoch and
``--resume`` continues exactly where it stopped. ``model.weights`` warm-starts from another checkpoint and is
refused when fewer than ``model.weights_min_fraction`` of the tensors fit. After training the best checkpoint
gets a class temperature and a threshold σ scale fitted on the validation split (calibration; abr/unsure.py).
``train.validation: false`` trains on the train and val ears without validation and keeps the last epoch
(no temperature or σ scale: both stay 1), for a cohort too small to hold ears back.

Config sections used: seed, data (cache_dir), model, loss, train, runtime, validate (batch size),
predict (polarity_tta, for the σ scale).
``--data DIR`` is the preprocessing output (default data/abr/<config name>).

    python -m abr.train_abr --config configs/abr/smoke.yaml --data data/abr/smoke
    python -m torch.distributed.run --nproc_per_node=2 -m abr.train_abr --config configs/abr/production_improved.yaml --data DIR
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from abr.dataset import (
    ABRSeriesDataset,
    BalancedDistributedSampler,
    CacheError,
    class_frequencies,
    class_weights,
    load_cache,
    split_series,
    training_cache_folder,
)
from abr.defaults import abr_defaults
from abr.evaluation import evaluate_model, fit_temperature, predict, predictions, run_model
from abr.objectives import LOSS_KINDS, LOSS_NAMES, combine_losses, loss_weights, task_losses
from abr.unsure import fit_threshold_sd_scale
from common.checkpoint import build_model, load_checkpoint, load_model, warm_start
from common.cli import make_parser, start_run
from common.config import ConfigError
from common.errors import run_cli
from common.losses import UncertaintyWeighting
from common.runlog import progress
from common.runtime import (
    CoolingPause,
    ResumableSampler,
    all_reduce_mean,
    amp_policy,
    dataloader_kwargs,
    gather_arrays,
    optimizer_step,
    wrap_model,
)
from common.training import CheckpointSaver, StopRequest, TrainState, resume_training

DEFAULTS = abr_defaults()
BATCH_KEYS_TO_DEVICE = ("signal", "clean", "has_clean", "static", "intensity_db", "level_mask", "exist",
                        "exist_known", "latency_ms", "amp_rel", "amp_known", "class_idx", "threshold_db",
                        "threshold_known")


def model_kwargs(cfg: dict, meta: dict) -> dict:
    """Plain constructor arguments of abr.models.ABRMultiTaskNet from the config and the cache metadata."""
    m = cfg["model"]
    return {"n_samples": int(meta["n_samples"]), "time_ms": [round(float(t), 6) for t in meta["time_ms"]],
            "static_dim": len(meta["static_features"]), "channels": m["channels"], "width": m["width"],
            "transformer_layers": m["transformer_layers"], "heads": m["heads"], "series_layers": m["series_layers"],
            "dropout": m["dropout"], "scales": list(m["scales"]),
            "latency_range_ms": [list(m["latency_range_ms"][w]) for w in meta["waves"]],
            "amplitude_range_rel": list(m["amplitude_range_rel"]), "threshold_range_db": list(m["threshold_range_db"]),
            "censor_db": float(meta["threshold_censor_db"]), "step_db": float(meta["intensity_step_db"]),
            "n_classes": len(meta["class_names"]), "wave_v_index": meta["waves"].index("V")}


def check_label_ranges(cfg: dict, meta: dict, data_dir: Path) -> None:
    """The heads' output ranges must cover the labels (the original squashed latency into (1, 8) ms
    although half the wave V latencies were later). Stops with a message naming the key to change."""
    ranges = meta["label_ranges"]
    problems = []
    for wave, span in ranges["latency_ms"].items():
        lo, hi = cfg["model"]["latency_range_ms"][wave]
        if span is not None and (span[0] < lo or span[1] > hi):
            problems.append(f"model.latency_range_ms.{wave}={[lo, hi]} does not cover the labels {span} ms")
    if ranges["amp_rel"] is not None:
        lo, hi = cfg["model"]["amplitude_range_rel"]
        if ranges["amp_rel"][0] < lo or ranges["amp_rel"][1] > hi:
            problems.append(f"model.amplitude_range_rel={[lo, hi]} does not cover the labels {ranges['amp_rel']}")
    if ranges["threshold_db"] is not None:
        lo, hi = cfg["model"]["threshold_range_db"]
        if ranges["threshold_db"][0] < lo or ranges["threshold_db"][1] > hi:
            problems.append(f"model.threshold_range_db={[lo, hi]} does not cover the labels {ranges['threshold_db']}")
    if problems:
        raise ConfigError(f"{data_dir}: " + "; ".join(problems))


def to_device(batch: dict, device: torch.device) -> dict:
    return {k: batch[k].to(device, non_blocking=True) for k in BATCH_KEYS_TO_DEVICE}


def validation_pass(model, dataset, series_all, device, cfg, cw, final_weights, dist, amp):
    """Whole-split validation: this rank's share of ears, losses reduced over ranks (ear-weighted) and
    predictions gathered for whole-set metrics."""
    shard = ABRSeriesDataset(dataset.a, dataset.meta, series_all[dist.rank::dist.world_size])
    outputs, batch = run_model(model, shard, device, cfg["validate"]["batch_size"], amp)
    with torch.no_grad():
        losses = task_losses(outputs, batch, cfg["loss"], None if cw is None else cw.cpu())
        total = float(combine_losses(losses, final_weights))
    n = len(shard)
    reduced = all_reduce_mean([total * n] + [float(v) * n for v in losses.values()], [n] * (len(losses) + 1), device)
    pred = predictions(outputs, batch, shard)
    if dist.enabled:
        pred = {k: gather_arrays(v) for k, v in pred.items()}
    return float(reduced[0]), dict(zip(losses, reduced[1:])), pred


def invert_polarity(batch: dict, probability: float, seed: int, rank: int, step: int) -> dict:
    """Training augmentation: each ear's recordings and clean traces multiplied by −1 with ``probability``.

    Labs export vertex-positive up or vertex-negative up and the file does not say which (abr/readers.py,
    ``data.signal_polarity``); an ear seen both ways teaches the model a threshold, class and peak latencies
    that do not depend on the display sign. Labels are unchanged (latencies do not depend on the sign; the
    amplitude labels are the vertex-positive wave amplitudes); the denoising target flips with its input.
    The draw comes from a generator seeded by (seed, rank, step), so a resumed run repeats it. Returns a new
    dict with the flipped ``signal`` and ``clean`` and ``inverted`` (ears,) bool.
    """
    n_ears = batch["signal"].shape[0]
    if probability <= 0:
        return {**batch, "inverted": torch.zeros(n_ears, dtype=torch.bool)}
    draws = np.random.default_rng([int(seed), int(rank), int(step)]).random(n_ears)
    inverted = torch.from_numpy(draws < probability)
    sign = torch.where(inverted, -1.0, 1.0).to(batch["signal"].dtype)[:, None, None]
    return {**batch, "signal": batch["signal"] * sign, "clean": batch["clean"] * sign, "inverted": inverted}


def train_one_epoch(model, loader, optimizer, scheduler, amp, state: TrainState, stop: StopRequest, cooling,
                    device, n_batches: int, epoch: int, lcfg: dict, grad_clip: float, params, cw, uncertainty,
                    is_main: bool, augment=None) -> None:
    """The remaining batches of ``epoch`` (all of them unless resumed mid-epoch); loss sums go to
    ``state.partial`` so a stop and resume inside the epoch gives the same epoch means. ``augment(batch, step)``
    (e.g. :func:`invert_polarity` with its probability and seed bound) is applied to each batch first."""
    model.train()
    remaining = n_batches - state.batches_done
    for batch in progress(itertools.islice(loader, remaining), desc=f"epoch {epoch}", total=remaining, is_main=is_main):
        index = state.batches_done  # batch position in the epoch, also after a resume
        weights = loss_weights(lcfg, epoch - 1 + index / n_batches)  # curriculum clock: fractional epochs
        if augment is not None:
            batch = augment(batch, state.step)
        batch = to_device(batch, device)
        with amp.autocast():
            out = model(batch["signal"], batch["static"], batch["intensity_db"], batch["level_mask"])
        losses = task_losses(out, batch, lcfg, cw)
        total = combine_losses(losses, weights, uncertainty)
        optimizer_step(total, optimizer, amp, parameters=params, grad_clip=grad_clip)
        scheduler.step(epoch - 1 + (index + 1) / n_batches)
        state.add(n=1, total=float(total.detach()), **{name: float(losses[name].detach()) for name in LOSS_NAMES})
        state.step, state.batches_done = state.step + 1, state.batches_done + 1
        cooling.step()
        if stop.check(state.step):
            return


def evaluate(model, val_set, val_series, device, cfg, cw, final_weights, dist, amp, arrays, meta, is_main) -> tuple:
    """Validation losses (all ranks) and, on rank 0, the clinical metrics of the row; returns (row, metrics)."""
    val_loss, val_losses, pred = validation_pass(model, val_set, val_series, device, cfg, cw, final_weights, dist, amp)
    row = {"val_loss": val_loss, **{f"val_{n}": float(v) for n, v in val_losses.items()}}
    metrics = None
    if pred is not None and is_main:
        metrics = evaluate_model(pred, arrays, meta)
        row.update({"val_macro_f1": metrics["classification"]["macro_f1"],
                    "val_threshold_mae_db": metrics["threshold"]["mae"],
                    "val_threshold_within_10db": metrics["threshold"]["within_10db"],
                    "val_wave_v_f1": metrics["waves"]["V"]["existence"]["f1"],
                    "val_wave_v_latency_mae_ms": metrics["waves"]["V"]["latency_ms"]["mae"]})
    return row, metrics


def updated_class_weights(cw, cw_np, metrics, meta, dist, device):
    """loss.dynamic_class_weights: scale the base weights by (1.5 − val recall); rank 0 computes, all share."""
    if metrics is not None:
        recall = np.array([metrics["classification"]["per_class"][n]["recall"] for n in meta["class_names"]])
        new = cw_np * (1.5 - recall)
        cw = torch.tensor(new / new[cw_np > 0].mean(), dtype=torch.float32, device=device)
    if dist.enabled:
        buffer = cw.detach().clone() if device.type == "cuda" else cw.detach().cpu().clone()
        torch.distributed.broadcast(buffer, src=0)
        cw = buffer.to(device)
    return cw


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, train=True, data=True)
    args = parser.parse_args(argv)
    run = start_run(args, domain="abr", defaults=DEFAULTS, argv=argv, data_key="data.cache_dir")
    cfg, device, dist = run.cfg, run.device, run.dist
    tcfg, lcfg, rcfg = cfg["train"], cfg["loss"], cfg["runtime"]
    data_dir = training_cache_folder(run)
    arrays, meta = load_cache(data_dir)
    check_label_ranges(cfg, meta, data_dir)
    train_series, val_series = split_series(arrays, "train"), split_series(arrays, "val")
    with_val = bool(tcfg["validation"])
    if not with_val:  # a small cohort: every non-test ear trains, the last epoch is kept
        train_series, val_series = np.sort(np.concatenate([train_series, val_series])), val_series[:0]
    if len(train_series) == 0 or (with_val and len(val_series) < dist.world_size):
        raise CacheError(f"{len(train_series)} train / {len(val_series)} val ears; training needs train ears and "
                         f"at least one val ear per process ({dist.world_size}): preprocess more patients, or with "
                         "preprocess.split giving val a share (and preprocess.required_splits: [train, val] to "
                         "catch this at preprocessing), or train without validation (train.validation: false, "
                         "e.g. with preprocess.split [1, 0, 0])", data_dir)
    train_set = ABRSeriesDataset(arrays, meta, train_series)
    val_set = ABRSeriesDataset(arrays, meta, val_series)
    n_classes = len(meta["class_names"])
    cw_np = class_weights(class_frequencies(arrays, train_series, n_classes), lcfg["class_weighting"])
    run.log(f"{len(train_set)} train / {len(val_set)} val ears; class weights "
            + ", ".join(f"{n} {w:.2f}" for n, w in zip(meta["class_names"], cw_np)))
    if not with_val:
        run.log("WARNING train.validation: false: training on the train and val ears together without validation; "
                "checkpoint_best.pt is the last epoch's model (no early model selection), and the class temperature "
                "and the threshold σ scale are not fitted (left at 1): report accuracy on ears the model did not see")

    # The order of an epoch depends only on (seed, epoch) (DistributedSampler also in one process); the
    # ResumableSampler skips the batches a resumed epoch already trained on.
    if tcfg["balanced_sampling"]:
        base_sampler = BalancedDistributedSampler(arrays["series_class"][train_series], dist.world_size, dist.rank,
                                                  cfg["seed"])
    else:
        base_sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                          seed=cfg["seed"])
    sampler = ResumableSampler(base_sampler)
    # The loader's own generator: starting an epoch never draws from the global RNG that the checkpoint restores.
    loader = DataLoader(train_set, batch_size=tcfg["batch_size"], sampler=sampler,
                        drop_last=len(train_set) > tcfg["batch_size"],
                        **dataloader_kwargs(device, rcfg["num_workers"], seed=int(cfg["seed"]) + dist.rank,
                                            start_method="spawn" if rcfg["num_workers"] else None))
    n_batches = len(loader) if not tcfg["max_steps_per_epoch"] else min(len(loader), tcfg["max_steps_per_epoch"])
    # a small cohort trains few steps per epoch: the mouse preset did not converge in 60 (abr/README.md)
    run.log(f"{n_batches} optimizer steps per epoch (batch {tcfg['batch_size']}), {n_batches * tcfg['epochs']} "
            f"in {tcfg['epochs']} epochs")

    model = build_model("abr.models.ABRMultiTaskNet", model_kwargs(cfg, meta)).to(device)
    if run.resume_from is None and cfg["model"]["weights"]:
        warm_start(model, cfg["model"]["weights"], min_fraction=float(cfg["model"]["weights_min_fraction"]),
                   log=run.log)
    elif run.resume_from is None:
        run.log("random initialization (no model.weights given)")
    uncertainty = UncertaintyWeighting(LOSS_KINDS).to(device) if lcfg["uncertainty_weighting"] else None
    params = list(model.parameters()) + (list(uncertainty.parameters()) if uncertainty is not None else [])
    optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=tcfg["restart_epochs"],
                                                                     T_mult=tcfg["restart_mult"], eta_min=tcfg["min_lr"])
    amp = amp_policy(device, rcfg["amp"])
    cw = torch.tensor(cw_np, dtype=torch.float32, device=device)
    if run.resume_from is not None:  # task weights that change during training travel in the checkpoint
        extra = load_checkpoint(run.resume_from, expected_domain="abr").get("extra") or {}
        if uncertainty is not None and extra.get("uncertainty"):
            uncertainty.load_state_dict(extra["uncertainty"])
        if extra.get("class_weights") is not None:
            cw = torch.as_tensor(extra["class_weights"], dtype=torch.float32, device=device)
    state = resume_training(run, model, optimizer, scheduler, amp.scaler)
    saver = CheckpointSaver(run, model, optimizer, scheduler, amp.scaler,
                            preprocessing={**meta, "cache": Path(data_dir).as_posix()},
                            extra=lambda: {"class_weights": cw.cpu(),
                                           "uncertainty": uncertainty.state_dict() if uncertainty else None},
                            # without validation "best" is the latest epoch
                            **({} if with_val else {"metric_name": "epoch", "mode": "max"}))
    ddp_model = wrap_model(model, dist, device)
    cooling = CoolingPause(rcfg["cooling_every_steps"], rcfg["cooling_pause_s"])
    final_weights = loss_weights(lcfg, 1e9)
    inversion_prob = float(tcfg["polarity_inversion_prob"])
    if not 0.0 <= inversion_prob <= 1.0:
        raise ConfigError(f"train.polarity_inversion_prob must lie in [0, 1], got {inversion_prob}")

    def augment(batch, step):
        return invert_polarity(batch, inversion_prob, int(cfg["seed"]), dist.rank, step)

    run.log(f"polarity augmentation: {inversion_prob:.0%} of training ears inverted per step")
    run.record_inputs_valid()

    with StopRequest(run) as stop:
        for epoch in range(state.epoch + 1, tcfg["epochs"] + 1):
            sampler.set_epoch(epoch, skip_samples=state.batches_done * tcfg["batch_size"])
            train_one_epoch(ddp_model, loader, optimizer, scheduler, amp, state, stop, cooling, device, n_batches,
                            epoch, lcfg, tcfg["grad_clip"], params, cw, uncertainty, run.is_main, augment)
            if stop.stopped:  # epoch unfinished: checkpoint_last.pt records where to pick up
                saver.save_partial(state)
                break
            sums = [state.partial.get("total", 0.0)] + [state.partial.get(n, 0.0) for n in LOSS_NAMES]
            train_means = all_reduce_mean(sums, [state.partial.get("n", 0.0)] * len(sums), device)
            row, metrics = {}, None
            if with_val:
                row, metrics = evaluate(model, val_set, val_series, device, cfg, cw, final_weights, dist, amp,
                                        arrays, meta, run.is_main)
            if lcfg["dynamic_class_weights"] and with_val:
                cw = updated_class_weights(cw, cw_np, metrics, meta, dist, device)
            row = {"lr": scheduler.get_last_lr()[0], "train_loss": train_means[0],
                   **{f"train_{n}": v for n, v in zip(LOSS_NAMES, train_means[1:])}, **row}
            state.end_epoch(epoch)
            saver.end_epoch(state, row, metric=row["val_loss"] if with_val else float(epoch))
            run.log(f"epoch {epoch}: train {train_means[0]:.4f}"
                    + (f"  val {row['val_loss']:.4f}" if with_val else "")
                    + (f"  F1 {row['val_macro_f1']:.3f}  thr MAE {row['val_threshold_mae_db']:.1f} dB  "
                       f"V lat MAE {row['val_wave_v_latency_mae_ms']:.3f} ms" if "val_macro_f1" in row else ""))

    summary: dict = {"epochs_completed": state.epoch, "interrupted": stop.stopped, "validation": with_val,
                     "best_val_loss": state.best_metric if with_val else None}
    if run.is_main and not stop.stopped and with_val:
        summary.update(finalize(run, val_set, device, cfg, arrays, meta))
    elif run.is_main and not stop.stopped:
        summary.update({"best_epoch": state.epoch, "temperature": 1.0, "threshold_sd_scale": None,
                        "note": "trained without validation (train.validation: false): checkpoint_best.pt is the "
                                "last epoch; no temperature or threshold σ scale fitted"})
    return run.finish(summary)


def finalize(run, val_set, device, cfg, arrays, meta) -> dict:
    """Rebuild the best model from its checkpoint, fit the class temperature on validation, store it in
    checkpoint_best.pt, and report validation metrics (calibrated) and training curves."""
    from common.plotting import plot_training_curves

    best_path = run.run_dir / "checkpoint_best.pt"
    model, ckpt = load_model(best_path, device=device, expected_domain="abr")
    outputs, batch = run_model(model, val_set, device, cfg["validate"]["batch_size"])
    labels = batch["class_idx"].numpy()
    temperature = 1.0
    if cfg["train"]["temperature_scaling"]:
        temperature = fit_temperature(outputs["class_logits"].numpy(), labels)
        model.classifier.temperature.fill_(temperature)
        ckpt["state_dict"] = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    # threshold σ scale on the val ears, with the polarity averaging predict and validate use (abr/unsure.py)
    polarity_tta = bool(cfg["predict"]["polarity_tta"])
    val_pred = predict(model, val_set, device, cfg["validate"]["batch_size"], polarity_tta=polarity_tta)
    val_error = np.abs(val_pred["threshold_db"] - arrays["series_threshold_db"][val_pred["series"]])
    n_scale = int(np.isfinite(val_error).sum())
    sd_scale = fit_threshold_sd_scale(val_error, val_pred["threshold_sd"])
    ckpt["extra"] = {**(ckpt.get("extra") or {}),
                     "threshold_sd_scale": {"scale": sd_scale, "n_val_ears": n_scale, "polarity_tta": polarity_tta}}
    from common.checkpoint import atomic_torch_save

    atomic_torch_save(ckpt, best_path)
    if n_scale:
        known = np.isfinite(val_error)
        covered = float(np.mean(val_error[known] <= 1.96 * val_pred["threshold_sd"][known]))
        run.log(f"threshold σ scale {sd_scale:.3f} (fitted on {n_scale} val ears; ±1.96σ covered {covered:.3f} of "
                "them before)")
    else:
        run.log("threshold σ scale 1: no val ear with a threshold")
    raw = predictions(outputs, batch, val_set, 1.0)
    pred = predictions(outputs, batch, val_set, temperature)
    metrics = evaluate_model(pred, arrays, meta)
    ece_before = evaluate_model(raw, arrays, meta)["classification"].get("ece")
    figures = []
    if (run.run_dir / "metrics.csv").is_file():
        figures = plot_training_curves(run.run_dir / "metrics.csv", run.run_dir / "figures" / "training_curves",
                                       keys=["train_loss", "val_loss", "val_macro_f1", "val_threshold_mae_db",
                                             "val_wave_v_latency_mae_ms", "lr"])
    run.log(f"best epoch {ckpt['epoch']}: temperature {temperature:.3f} (val ECE {ece_before:.3f} -> "
            f"{metrics['classification']['ece']:.3f}); val macro F1 {metrics['classification']['macro_f1']:.3f}, "
            f"threshold MAE {metrics['threshold']['mae']:.1f} dB, wave V latency MAE "
            f"{metrics['waves']['V']['latency_ms']['mae']:.3f} ms")
    return {"best_epoch": ckpt["epoch"], "temperature": temperature, "val_ece_before_temperature": ece_before,
            "threshold_sd_scale": sd_scale,
            "val": metrics, "figures": [p.relative_to(run.run_dir).as_posix() for p in figures if p.suffix == ".png"]}


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
