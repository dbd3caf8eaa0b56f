"""Train the ABR multi-task model (peaks, threshold, hearing-loss class, denoising) on a preprocessed cache.

Seed 003's loss weights and curriculum (config loss.weights / loss.curriculum), masked Gaussian NLL or
Huber for peaks, Huber for the threshold, focal loss or weighted CE for the class, optional learned
uncertainty weighting and class-balanced sampling; AdamW with warm restarts, gradient clipping, AMP on
CUDA, resume, DDP (torchrun), progress bars, Ctrl+C-safe. After training the best checkpoint gets a class
temperature fitted on the validation split (calibration).

Config sections used: seed, model, loss, train, runtime, validate (batch size).

    python -m abr.train_abr --config configs/abr/smoke.yaml --data runs/abr/data/smoke
    python -m torch.distributed.run --nproc_per_node=2 -m abr.train_abr --config configs/abr/production_improved.yaml --data DIR
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from abr.dataset import (
    ABRSeriesDataset,
    BalancedDistributedSampler,
    class_frequencies,
    class_weights,
    load_cache,
    split_series,
)
from abr.defaults import abr_defaults
from abr.evaluation import evaluate_model, fit_temperature, predictions, run_model
from abr.objectives import LOSS_KINDS, LOSS_NAMES, combine_losses, loss_weights, task_losses
from common.checkpoint import build_model, load_checkpoint, load_model, restore_training_state, save_checkpoint
from common.cli import make_parser, start_run
from common.losses import UncertaintyWeighting
from common.runlog import progress
from common.runtime import (
    CoolingPause,
    GracefulInterrupt,
    all_reduce_mean,
    amp_policy,
    dataloader_kwargs,
    gather_arrays,
    optimizer_step,
    wrap_model,
)

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


def check_label_ranges(cfg: dict, meta: dict) -> None:
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
        raise SystemExit("error: " + "; ".join(problems))


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


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, train=True)
    parser.add_argument("--data", type=Path, required=True, help="preprocessing output folder (abr_cache.npz)")
    args = parser.parse_args(argv)
    run = start_run(args, domain="abr", defaults=DEFAULTS, argv=argv)
    cfg, device, dist = run.cfg, run.device, run.dist
    tcfg, lcfg, rcfg = cfg["train"], cfg["loss"], cfg["runtime"]
    arrays, meta = load_cache(args.data)
    check_label_ranges(cfg, meta)
    train_series, val_series = split_series(arrays, "train"), split_series(arrays, "val")
    if len(val_series) < dist.world_size or len(train_series) == 0:
        raise SystemExit(f"error: {args.data}: {len(train_series)} train / {len(val_series)} val ears; training needs "
                         f"train ears and at least one val ear per process ({dist.world_size})")
    train_set = ABRSeriesDataset(arrays, meta, train_series)
    val_set = ABRSeriesDataset(arrays, meta, val_series)
    n_classes = len(meta["class_names"])
    freq = class_frequencies(arrays, train_series, n_classes)
    cw_np = class_weights(freq, lcfg["class_weighting"])
    run.log(f"{len(train_set)} train / {len(val_set)} val ears; class weights "
            + ", ".join(f"{n} {w:.2f}" for n, w in zip(meta["class_names"], cw_np)))

    if tcfg["balanced_sampling"]:
        sampler = BalancedDistributedSampler(arrays["series_class"][train_series], dist.world_size, dist.rank,
                                             cfg["seed"])
    else:  # DistributedSampler even in one process: shuffling depends on (seed, epoch) only → exact resume
        sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                     seed=cfg["seed"])
    loader = DataLoader(train_set, batch_size=tcfg["batch_size"], sampler=sampler, drop_last=len(train_set) > tcfg["batch_size"],
                        **dataloader_kwargs(device, rcfg["num_workers"], start_method="spawn" if rcfg["num_workers"] else None))

    model = build_model("abr.models.ABRMultiTaskNet", model_kwargs(cfg, meta)).to(device)
    if cfg["model"]["weights"]:
        state = torch.load(cfg["model"]["weights"], map_location="cpu", weights_only=True)
        model.load_state_dict(state.get("state_dict", state), strict=False)
        run.log(f"initialized from {cfg['model']['weights']}")
    else:
        run.log("random initialization (no model.weights given)")
    uncertainty = UncertaintyWeighting(LOSS_KINDS).to(device) if lcfg["uncertainty_weighting"] else None
    params = list(model.parameters()) + (list(uncertainty.parameters()) if uncertainty is not None else [])
    optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(optimizer, T_0=tcfg["restart_epochs"],
                                                                     T_mult=tcfg["restart_mult"], eta_min=tcfg["min_lr"])
    amp = amp_policy(device, rcfg["amp"])
    cw = torch.tensor(cw_np, dtype=torch.float32, device=device)
    start_epoch, step, best = 1, 0, math.inf
    if run.resume_from is not None:
        ckpt = load_checkpoint(run.resume_from, expected_domain="abr")
        state = restore_training_state(ckpt, model, optimizer, scheduler, amp.scaler)
        if uncertainty is not None and ckpt["extra"].get("uncertainty"):
            uncertainty.load_state_dict(ckpt["extra"]["uncertainty"])
        if ckpt["extra"].get("class_weights") is not None:
            cw = torch.as_tensor(ckpt["extra"]["class_weights"], dtype=torch.float32, device=device)
        start_epoch, step = state["epoch"] + 1, state["step"]
        best = state["best_metric"] if state["best_metric"] is not None else math.inf
    ddp_model = wrap_model(model, dist, device)
    cooling = CoolingPause(rcfg["cooling_every_steps"], rcfg["cooling_pause_s"])
    final_weights = loss_weights(lcfg, 1e9)
    preprocessing = {**meta, "cache": Path(args.data).as_posix()}

    def save(name: str, epoch: int) -> None:
        if run.is_main:
            extra = {"class_weights": cw.cpu(), "uncertainty": uncertainty.state_dict() if uncertainty else None}
            save_checkpoint(run.run_dir / name, model, domain="abr", config=cfg, optimizer=optimizer,
                            scheduler=scheduler, scaler=amp.scaler, epoch=epoch, step=step, best_metric=best,
                            best_metric_name="val_loss", preprocessing=preprocessing, extra=extra)

    n_batches = len(loader) if not tcfg["max_steps_per_epoch"] else min(len(loader), tcfg["max_steps_per_epoch"])
    epoch = start_epoch - 1
    with GracefulInterrupt() as interrupt:
        for epoch in range(start_epoch, tcfg["epochs"] + 1):
            sampler.set_epoch(epoch)
            ddp_model.train()
            sums = dict.fromkeys(LOSS_NAMES, 0.0)
            total_sum, seen = 0.0, 0
            for i, batch in enumerate(progress(loader, desc=f"epoch {epoch}", total=n_batches, is_main=run.is_main)):
                if i >= n_batches:
                    break
                position = epoch - 1 + i / n_batches  # fractional epochs since the start (curriculum clock)
                weights = loss_weights(lcfg, position)
                batch = to_device(batch, device)
                with amp.autocast():
                    out = ddp_model(batch["signal"], batch["static"], batch["intensity_db"], batch["level_mask"])
                losses = task_losses(out, batch, lcfg, cw)
                total = combine_losses(losses, weights, uncertainty)
                optimizer_step(total, optimizer, amp, parameters=params, grad_clip=tcfg["grad_clip"])
                scheduler.step(epoch - 1 + (i + 1) / n_batches)
                total_sum, seen, step = total_sum + float(total.detach()), seen + 1, step + 1
                for name in LOSS_NAMES:
                    sums[name] += float(losses[name].detach())
                cooling.step()
                if interrupt.requested:
                    break
            train_means = all_reduce_mean([total_sum] + [sums[n] for n in LOSS_NAMES], [seen] * (len(LOSS_NAMES) + 1), device)
            val_loss, val_losses, pred = validation_pass(model, val_set, val_series, device, cfg, cw, final_weights, dist, amp)
            row = {"epoch": epoch, "step": step, "lr": scheduler.get_last_lr()[0], "train_loss": train_means[0],
                   **{f"train_{n}": v for n, v in zip(LOSS_NAMES, train_means[1:])}, "val_loss": val_loss,
                   **{f"val_{n}": float(v) for n, v in val_losses.items()}}
            if pred is not None and run.is_main:
                metrics = evaluate_model(pred, arrays, meta)
                row.update({"val_macro_f1": metrics["classification"]["macro_f1"],
                            "val_threshold_mae_db": metrics["threshold"]["mae"],
                            "val_threshold_within_10db": metrics["threshold"]["within_10db"],
                            "val_wave_v_f1": metrics["waves"]["V"]["existence"]["f1"],
                            "val_wave_v_latency_mae_ms": metrics["waves"]["V"]["latency_ms"]["mae"]})
                if lcfg["dynamic_class_weights"]:
                    recall = np.array([metrics["classification"]["per_class"][n]["recall"] for n in meta["class_names"]])
                    new = cw_np * (1.5 - recall)
                    new = new / new[cw_np > 0].mean()
                    cw = torch.tensor(new, dtype=torch.float32, device=device)
            if dist.enabled and lcfg["dynamic_class_weights"]:  # rank 0 computed them; share
                buffer = cw.detach().clone() if device.type == "cuda" else cw.detach().cpu().clone()
                torch.distributed.broadcast(buffer, src=0)
                cw = buffer.to(device)
            run.logger.log_metrics(row)
            run.log(f"epoch {epoch}: train {train_means[0]:.4f}  val {val_loss:.4f}"
                    + (f"  F1 {row['val_macro_f1']:.3f}  thr MAE {row['val_threshold_mae_db']:.1f} dB  "
                       f"V lat MAE {row['val_wave_v_latency_mae_ms']:.3f} ms" if "val_macro_f1" in row else ""))
            if val_loss < best:
                best = float(val_loss)
                save("checkpoint_best.pt", epoch)
            save("checkpoint_last.pt", epoch)
            if interrupt.requested:
                run.log(f"stopped by the user after epoch {epoch}; resume with --resume {run.run_dir}")
                break

    summary: dict = {"epochs_completed": epoch, "interrupted": interrupt.requested, "best_val_loss": best}
    if run.is_main:
        summary.update(finalize(run, val_set, device, cfg, arrays, meta))
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
        from common.checkpoint import atomic_torch_save

        atomic_torch_save(ckpt, best_path)
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
            "val": metrics, "figures": [p.relative_to(run.run_dir).as_posix() for p in figures if p.suffix == ".png"]}


if __name__ == "__main__":
    main()
