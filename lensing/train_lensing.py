"""Train a lens finder (DeepLens-style ResNet) with BCE, optionally plus a hard-negative term and the
physics-informed loss.

    python lensing/train_lensing.py --config configs/lensing/baseline.yaml --data data/lensing/smoke
    python lensing/train_lensing.py --config configs/lensing/physics_informed.yaml --data DIR
    python lensing/train_lensing.py --config configs/lensing/ensemble.yaml --data DIR   # members one after another
    python -m torch.distributed.run --nproc_per_node=2 -m lensing.train_lensing --config ... --data DIR

AdamW + cosine schedule, flips/90° rotations, AMP on CUDA, DDP under torchrun, progress bars. Ctrl+C (or
SIGTERM, or ``--stop-after-steps N``) saves checkpoint_last.pt in the middle of the epoch and ``--resume``
continues exactly there: the batch order depends only on (seed, epoch) and the flips/rotations of a step
only on (seed, rank, step). Each epoch logs BCE, the physics χ², val AUROC/TPR0/TPR10 and samples/s to
metrics.csv; the best val AUROC checkpoint is kept. An ensemble trains its members sequentially (seed + i)
into member_<i>/ (rows of metrics.csv carry the member) and lists them in ensemble.json, so only one
model is ever in memory; validation averages their logits. Config sections read: seed, data, model,
train, physics, ensemble, runtime (lensing/defaults.py).
"""

from __future__ import annotations

import gc
import itertools
import json
import math
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from common.checkpoint import build_model, write_ensemble_manifest
from common.cli import make_parser, run_root, start_run
from common.config import ConfigError
from common.errors import InputError, run_cli
from common.runlog import progress, write_json
from common.runtime import (
    CoolingPause,
    ResumableSampler,
    all_reduce_mean,
    amp_policy,
    dataloader_kwargs,
    gather_arrays,
    optimizer_step,
    seed_everything,
    wrap_model,
)
from common.training import CheckpointSaver, StopRequest, TrainState, resume_training
from lensing.data import STRETCHES, LensingDataset, augment_batch
from lensing.defaults import lensing_defaults
from lensing.inference import predict_logits
from lensing.metrics import bologna_metrics
from lensing.physics_loss import PhysicsInformedLoss

MODEL_TARGETS = {"deeplens": "lensing.models.DeepLensResNet", "deeplens_params": "lensing.models.LensParameterResNet"}

DEFAULTS = lensing_defaults()


def model_kwargs(cfg: dict, n_bands: int, image_size: int) -> dict:
    m = cfg["model"]
    kwargs = {"in_bands": n_bands, "image_size": image_size, "widths": list(m["widths"]),
              "blocks_per_stage": list(m["blocks_per_stage"]), "dropout": float(m["dropout"]),
              "stem_kernel": int(m["stem_kernel"])}
    if m["name"] == "deeplens_params":
        kwargs["head_hidden"] = int(m["head_hidden"])
    return kwargs


def evaluate(model, loader, device, amp, dataset: LensingDataset, is_main: bool) -> dict:
    """Val BCE and Bologna metrics over the whole split (gathered over DDP ranks, padding removed)."""
    logits, idx = predict_logits(model, loader, device, amp, is_main, desc="val")
    logits, idx = gather_arrays(logits), gather_arrays(idx)
    _, first = np.unique(idx, return_index=True)
    logits, idx = logits[first], idx[first]
    labels = dataset.labels()[idx].astype(np.float64)
    known = labels >= 0
    bce = float(F.binary_cross_entropy_with_logits(torch.as_tensor(logits[known]),
                                                   torch.as_tensor(labels[known], dtype=torch.float32)))
    metrics = bologna_metrics(labels, logits)
    return {"val_bce": bce, "val_auroc": metrics["auroc"], "val_tpr0": metrics["tpr0"], "val_tpr10": metrics["tpr10"]}


def hard_negative_bce(logit: torch.Tensor, label: torch.Tensor, fraction: float) -> torch.Tensor:
    """Mean BCE of the ``fraction`` highest-scoring non-lenses of the batch (at least one): online hard-example
    mining (Shrivastava, Gupta & Girshick 2016, CVPR) applied to the negatives only. TPR0 and TPR10 are decided
    by the few non-lenses ranked above the lenses, so this term pushes those down instead of the easy bulk.
    0 (with a gradient path) when the batch has no non-lens."""
    negative = logit[label == 0]
    if negative.numel() == 0:
        return logit.sum() * 0.0
    k = max(1, math.ceil(fraction * negative.numel()))
    top = torch.topk(negative, k).values
    return F.binary_cross_entropy_with_logits(top, torch.zeros_like(top))


def augmentation_generator(seed: int, rank: int, step: int) -> torch.Generator:
    """The flips/rotations of optimizer step ``step`` come from a generator seeded by (seed, rank, step), so a
    run resumed mid-epoch draws exactly what the uninterrupted run drew."""
    return torch.Generator().manual_seed(int(np.random.SeedSequence([seed, rank, step]).generate_state(1)[0]))


def train_one_epoch(model, loader, optimizer, amp, physics: PhysicsInformedLoss, state: TrainState,
                    stop: StopRequest, cooling, device, tcfg: dict, n_steps: int, epoch: int, seed: int, rank: int,
                    desc: str, is_main: bool) -> None:
    """The remaining ``n_steps - state.batches_done`` batches of ``epoch``; running sums go to ``state.partial``
    (bce and physics weighted by samples, n samples, the gated χ² per step, seconds)."""
    model.train()
    t0 = time.perf_counter()
    remaining = max(n_steps - state.batches_done, 0)
    for batch in progress(itertools.islice(loader, remaining), desc=desc, total=remaining, is_main=is_main):
        if tcfg["augment"]:
            batch = augment_batch(batch, augmentation_generator(seed, rank, state.step))
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        label = batch["label"]
        known = label >= 0
        with amp.autocast():
            outputs = model(batch["input"])
        logit = outputs["logit"].float()
        bce = F.binary_cross_entropy_with_logits(logit[known], label[known]) if bool(known.any()) \
            else logit.sum() * 0.0
        loss = bce
        if tcfg["hard_negative_weight"] > 0:
            loss = loss + tcfg["hard_negative_weight"] * hard_negative_bce(logit, label,
                                                                           tcfg["hard_negative_fraction"])
        if physics.active:
            phys, stats = physics(outputs, batch, epoch)
            loss = loss + phys
            state.add(physics=float(phys.detach()) * len(label))
            if "physics_chi2" in stats:
                state.add(chi2=stats["physics_chi2"], chi2_steps=1)
        optimizer_step(loss, optimizer, amp, grad_clip=tcfg["grad_clip"])
        state.add(bce=float(bce.detach()) * len(label), n=len(label))
        state.step, state.batches_done = state.step + 1, state.batches_done + 1
        cooling.step()
        if stop.check(state.step):
            break
    state.add(seconds=time.perf_counter() - t0)


def train_member(run, member: int, seed: int, member_dir: Path, train_set, val_set, resume_from: Path | None,
                 first_step: int = 0) -> dict:
    """Train one model into ``member_dir`` (from ``resume_from`` when given); returns its results.

    ``first_step`` continues the run's global optimizer step over the members of an ensemble, so
    ``--stop-after-steps`` can stop any member."""
    cfg, device, dist = run.cfg, run.device, run.dist
    tcfg, rcfg = cfg["train"], cfg["runtime"]
    ensemble = int(cfg["ensemble"]["n_members"]) > 1
    seed_everything(seed, dist.rank)
    n_bands, image_size = train_set[0]["image"].shape[0], train_set[0]["input"].shape[-1]
    input_channels = train_set[0]["input"].shape[0]  # 2 × bands with data.residual_channel
    physics = PhysicsInformedLoss(**cfg["physics"])
    model = build_model(MODEL_TARGETS[cfg["model"]["name"]], model_kwargs(cfg, input_channels, image_size)).to(device)
    # DistributedSampler also in one process: the order depends only on (seed, epoch), and ResumableSampler
    # skips the batches a stopped epoch already trained on.
    sampler = ResumableSampler(DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank,
                                                  shuffle=True, seed=seed))
    # own loader generator: creating an iterator never draws from the global RNG (restored for dropout)
    loader_kw = dataloader_kwargs(device, rcfg["num_workers"], seed=seed + dist.rank)
    train_loader = DataLoader(train_set, batch_size=tcfg["batch_size"], sampler=sampler, drop_last=True, **loader_kw)
    val_sampler = DistributedSampler(val_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=False)
    val_loader = DataLoader(val_set, batch_size=tcfg["val_batch_size"], sampler=val_sampler, **loader_kw)
    n_steps = len(sampler.sampler) // tcfg["batch_size"]
    if tcfg["max_steps_per_epoch"]:
        n_steps = min(n_steps, int(tcfg["max_steps_per_epoch"]))
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tcfg["epochs"])
    amp = amp_policy(device, rcfg["amp"])
    match = {"member": member} if ensemble else None
    if resume_from is not None:
        state = resume_training(run, model, optimizer, scheduler, amp.scaler, checkpoint=resume_from, match=match)
    else:
        state = TrainState(step=first_step)
    preprocessing = {"n_bands": int(n_bands), "image_size": int(image_size), "clip_sigma": cfg["data"]["clip_sigma"],
                     "stretch": cfg["data"]["stretch"], "size_policy": cfg["data"]["size_policy"],
                     "residual_channel": bool(cfg["data"]["residual_channel"]), "input_channels": int(input_channels),
                     "normalization": "per-band background sigma (sqrt median variance), clipped",
                     "surveys": sorted(train_set.catalog["survey"].unique().tolist()),
                     "bands": str(train_set.catalog["bands"].iloc[0]), "data_dir": str(cfg["data"]["dir"])}
    saver = CheckpointSaver(run, model, optimizer, scheduler, amp.scaler, preprocessing=preprocessing,
                            extra={"member": member, "seed": seed}, folder=member_dir, metric_name="val_auroc",
                            mode="max")
    # a parameter head that no loss uses would stall DDP's gradient reduction
    unused_head = cfg["model"]["name"] == "deeplens_params" and not physics.active
    ddp_model = wrap_model(model, dist, device, find_unused_parameters=unused_head)
    cooling = CoolingPause(rcfg["cooling_every_steps"], rcfg["cooling_pause_s"])

    last_metrics: dict = {}
    with StopRequest(run) as stop:
        for epoch in range(state.epoch + 1, tcfg["epochs"] + 1):
            sampler.set_epoch(epoch, skip_samples=state.batches_done * tcfg["batch_size"])
            train_one_epoch(ddp_model, train_loader, optimizer, amp, physics, state, stop, cooling, device, tcfg,
                            n_steps, epoch, seed, dist.rank, f"member {member} epoch {epoch}", run.is_main)
            if stop.stopped:  # epoch unfinished: checkpoint_last records where to pick up
                saver.save_partial(state)
                break
            scheduler.step()
            sums = state.partial
            train_bce, train_phys = all_reduce_mean([sums.get("bce", 0.0), sums.get("physics", 0.0)],
                                                    [sums.get("n", 0.0)] * 2, device)
            samples = float(all_reduce_mean([sums.get("n", 0.0)], [1.0], device)[0]) * dist.world_size
            chi2 = sums["chi2"] / sums["chi2_steps"] if sums.get("chi2_steps") else float("nan")
            samples_per_s = samples / max(sums.get("seconds", 0.0), 1e-9)
            val = evaluate(model, val_loader, device, amp, val_set, run.is_main)
            state.end_epoch(epoch)
            last_metrics = {**({"member": member} if ensemble else {}), "train_bce": train_bce,
                            "train_physics": train_phys, "physics_chi2": chi2, **val,
                            "lr": scheduler.get_last_lr()[0], "train_samples_per_s": samples_per_s}
            score = val["val_auroc"] if math.isfinite(val["val_auroc"]) else -val["val_bce"]
            saver.end_epoch(state, last_metrics, metric=score)
            run.log(f"member {member} epoch {epoch}: bce {train_bce:.4f} phys {train_phys:.4g} "
                    f"val_bce {val['val_bce']:.4f} val_auroc {val['val_auroc']:.4f} tpr0 {val['val_tpr0']:.3f} "
                    f"tpr10 {val['val_tpr10']:.3f} ({samples_per_s:.0f} samples/s)")
    best = state.best_metric if state.best_metric is not None else -math.inf
    return {"member": member, "seed": seed, "best_val_auroc": best, "epochs_completed": state.epoch,
            "step": state.step, "interrupted": stop.stopped, "last": last_metrics}


def _check_config(cfg: dict) -> None:
    """Choices the schema cannot express, checked before any data is read."""
    name = cfg["model"]["name"]
    if name not in MODEL_TARGETS:
        raise ConfigError(f"model.name must be one of {sorted(MODEL_TARGETS)}, got {name!r}")
    if cfg["data"]["stretch"] not in STRETCHES:
        raise ConfigError(f"data.stretch must be one of {list(STRETCHES)}, got {cfg['data']['stretch']!r}")
    try:
        physics = PhysicsInformedLoss(**cfg["physics"])
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    if name == "deeplens_params" and cfg["data"]["residual_channel"]:
        raise ConfigError("data.residual_channel doubles the input channels; the lens-parameter head of "
                          "model.name: deeplens_params predicts one amplitude per input channel: use model.name: deeplens")
    fraction = cfg["train"]["hard_negative_fraction"]
    if not cfg["train"]["hard_negative_weight"] >= 0 or not 0 < fraction <= 1:
        raise ConfigError(f"train.hard_negative_weight must be >= 0 and train.hard_negative_fraction in (0, 1], got "
                          f"{cfg['train']['hard_negative_weight']} and {fraction}")
    if physics.active and name != "deeplens_params":
        raise ConfigError("physics.weight / physics.param_supervision_weight > 0 need model.name: deeplens_params "
                          "(a model with a lens-parameter head)")


def _member_checkpoint(folder: Path) -> Path:
    best = folder / "checkpoint_best.pt"
    return best if best.is_file() else folder / "checkpoint_last.pt"


def _plot_curves(run_dir: Path, n_members: int) -> list[Path]:
    """Training curves from metrics.csv: one figure, or one per ensemble member."""
    import pandas as pd

    from common.plotting import plot_training_curves

    metrics = run_dir / "metrics.csv"
    if n_members == 1:
        return plot_training_curves(metrics, run_dir / "figures" / "training_curves")
    figures = []
    with tempfile.TemporaryDirectory() as tmp:
        for member, rows in pd.read_csv(metrics).groupby("member"):
            csv = Path(tmp) / f"member_{member}.csv"
            rows.drop(columns="member").to_csv(csv, index=False)
            figures += plot_training_curves(csv, run_dir / "figures" / f"training_curves_member_{member}")
    return figures


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, train=True, data=True)
    args = parser.parse_args(argv)
    run = start_run(args, domain="lensing", defaults=DEFAULTS, argv=argv, data_key="data.dir")
    cfg, dcfg = run.cfg, run.cfg["data"]
    if not dcfg["dir"]:
        raise ConfigError("give the data set folder with --data DIR (or data.dir)")
    _check_config(cfg)
    common_kw = {"surveys": dcfg["surveys"] or None, "clip_sigma": dcfg["clip_sigma"], "stretch": dcfg["stretch"],
                 "preload": dcfg["preload"], "on_missing_files": dcfg["on_missing_files"],
                 "size_policy": dcfg["size_policy"], "residual_channel": dcfg["residual_channel"], "log": run.log}
    size = int(dcfg["image_size"]) or None
    if size is None:  # the first training cutout's size, then every cutout follows data.size_policy
        size = LensingDataset(dcfg["dir"], split=dcfg["train_split"],
                              **{**common_kw, "preload": False, "log": None})[0]["input"].shape[-1]
    train_set = LensingDataset(dcfg["dir"], split=dcfg["train_split"], expected_size=size, **common_kw)
    n_bands = train_set[0]["image"].shape[0]
    val_set = LensingDataset(dcfg["dir"], split=dcfg["val_split"], expected_bands=n_bands, expected_size=size,
                             **common_kw)
    if len(train_set) // run.dist.world_size < cfg["train"]["batch_size"]:
        raise InputError(f"{len(train_set)} training cutouts ({dcfg['train_split']!r} split) are fewer than one batch "
                         f"of {cfg['train']['batch_size']} per process; lower train.batch_size",
                         Path(dcfg["dir"]) / "catalog.csv")
    labels = train_set.labels()
    run.log(f"[lensing] train {len(train_set)} cutouts ({int((labels == 1).sum())} lenses, "
            f"{int((labels == 0).sum())} non-lenses), val {len(val_set)}; {n_bands} band(s), {size}x{size} px")
    run.record_inputs_valid()

    n_members = int(cfg["ensemble"]["n_members"])
    resume_root = run_root(run.resume_from) if run.resume_from is not None else None
    if resume_root is None and run.is_main:
        for stale in [*run.run_dir.glob("member_*/member_summary.json"), run.run_dir / "ensemble.json"]:
            if stale.is_file():
                stale.unlink()  # a fresh run into a reused --output-dir must not look finished
                run.log(f"[lensing] removed {stale} from an earlier run in this folder")

    results: list[dict] = []
    for member in range(n_members):
        seed = int(cfg["seed"]) + member
        member_dir = run.run_dir if n_members == 1 else run.run_dir / f"member_{member}"
        done = resume_root / member_dir.name / "member_summary.json" if resume_root is not None else None
        if n_members > 1 and done is not None and done.is_file():
            run.log(f"[lensing] member {member} already complete, skipped")
            results.append(json.loads(done.read_text(encoding="utf-8")))
            continue
        resume_from = None
        if resume_root is not None:
            candidate = run.resume_from if n_members == 1 else resume_root / member_dir.name / "checkpoint_last.pt"
            resume_from = candidate if candidate.is_file() else None
        first_step = int(results[-1].get("step", 0)) if results else 0
        result = train_member(run, member, seed, member_dir, train_set, val_set, resume_from, first_step)
        results.append(result)
        if result["interrupted"]:
            break
        if n_members > 1 and run.is_main:
            write_json(member_dir / "member_summary.json", result)
        gc.collect()  # one model in memory at a time
        if torch.cuda.is_available():
            torch.cuda.empty_cache()

    interrupted = any(r.get("interrupted") for r in results)
    if n_members > 1 and run.is_main and not interrupted:
        write_ensemble_manifest(run.run_dir, [_member_checkpoint(run.run_dir / f"member_{i}") for i in range(n_members)],
                                combine="mean logit", domain="lensing")
    summary = {"n_members": n_members, "members": results, "interrupted": interrupted,
               "best_val_auroc_per_member": [r["best_val_auroc"] for r in results],
               "train_samples_per_s": float(np.mean([r["last"].get("train_samples_per_s", float("nan"))
                                                    for r in results if r.get("last")] or [float("nan")]))}
    if run.is_main and cfg["train"]["plot_curves"] and not interrupted and (run.run_dir / "metrics.csv").is_file():
        figures = _plot_curves(run.run_dir, n_members)
        summary["figures"] = [str(p.relative_to(run.run_dir).as_posix()) for p in figures if p.suffix == ".png"]
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
