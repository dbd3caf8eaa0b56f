"""Train a lens finder (DeepLens-style ResNet) with BCE, optionally plus the physics-informed loss.

    python lensing/train_lensing.py --config configs/lensing/baseline.yaml --data data/lensing/smoke
    python lensing/train_lensing.py --config configs/lensing/physics_informed.yaml --data DIR
    python lensing/train_lensing.py --config configs/lensing/ensemble.yaml --data DIR   # members one after another
    python -m torch.distributed.run --nproc_per_node=2 -m lensing.train_lensing --config ... --data DIR

AdamW + cosine schedule, flips/90° rotations, AMP on CUDA, DDP under torchrun, progress bars, Ctrl+C-safe,
``--resume``. Each epoch logs BCE, the physics χ², val AUROC/TPR0/TPR10 and samples/s; the best val AUROC
checkpoint is kept. An ensemble trains its members sequentially (seed + i) into member_<i>/ and lists
them in ensemble.json, so only one model is ever in memory; validation averages their logits.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, DistributedSampler

from common.checkpoint import build_model, load_checkpoint, restore_training_state, save_checkpoint
from common.cli import make_parser, run_root, start_run
from common.ensembling import train_members
from common.runlog import progress, write_json
from common.runtime import (
    RUNTIME_DEFAULTS,
    CoolingPause,
    GracefulInterrupt,
    all_reduce_mean,
    amp_policy,
    dataloader_kwargs,
    gather_arrays,
    optimizer_step,
    seed_everything,
    wrap_model,
)
from lensing.pipeline_config import with_other_sections
from lensing.data import LensingDataset, augment_batch
from lensing.inference import ENSEMBLE_MANIFEST, predict_logits
from lensing.metrics import bologna_metrics
from lensing.physics_loss import PhysicsInformedLoss

MODEL_TARGETS = {"deeplens": "lensing.models.DeepLensResNet", "deeplens_params": "lensing.models.LensParameterResNet"}

DEFAULTS = {
    "seed": 0,
    "data": {
        "dir": "",  # data set folder (catalog.csv); --data overrides
        "train_split": "train",
        "val_split": "val",
        "surveys": [],  # train/validate on these surveys only (empty = all)
        "clip_sigma": 250.0,  # noise-normalized inputs clipped at ±this (DeepLens)
        "stretch": "linear",  # linear (DeepLens) | asinh (compresses the bright lens galaxy)
        "preload": True,  # read all cutouts into memory once
        "on_missing_files": "error",  # error | drop (rows whose files are missing, with a log line)
    },
    "model": {
        "name": "deeplens",  # deeplens (classifier) | deeplens_params (+ bounded lens-parameter head)
        "widths": [16, 32, 64],  # channels per ResNet stage
        "blocks_per_stage": [1, 1, 1],
        "dropout": 0.0,  # > 0 enables MC dropout at validation
        "stem_kernel": 7,
        "head_hidden": 128,  # deeplens_params only
    },
    "train": {
        "epochs": 10,
        "batch_size": 64,
        "lr": 1.0e-3,  # AdamW; cosine annealing to 0 over the epochs
        "weight_decay": 1.0e-4,
        "grad_clip": 5.0,
        "augment": True,  # random flips and 90° rotations
        "max_steps_per_epoch": 0,  # 0 = full epochs
        "val_batch_size": 256,
        "plot_curves": True,  # training-curve figures at the end
    },
    "physics": {
        "weight": 0.0,  # weight of the gated chi2 term (0 = off)
        "warmup_epochs": 3,  # curriculum min(1, epoch / warmup_epochs)
        "gate": "probability",  # probability (detached sigmoid) | label
        "supersampling": 1,  # rendering sub-pixels for the chi2 model
        "param_supervision_weight": 0.0,  # MSE on the simulated lens-mass truth (true_* columns), lenses only
    },
    "ensemble": {
        "n_members": 1,  # > 1: members trained one after another with seeds seed + i
    },
    "runtime": {**RUNTIME_DEFAULTS, "torch_threads": 0},  # torch_threads: 0 = torch default
}

DEFAULTS = with_other_sections(DEFAULTS)


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


def train_member(run, member: int, seed: int, member_dir: Path, train_set, val_set, resume_from) -> dict:
    """Train one model into ``member_dir``; returns its best metrics."""
    cfg, device, dist = run.cfg, run.device, run.dist
    tcfg, rcfg = cfg["train"], cfg["runtime"]
    seed_everything(seed, dist.rank)
    n_bands, image_size = train_set[0]["input"].shape[0], train_set[0]["input"].shape[-1]
    physics = PhysicsInformedLoss(**cfg["physics"])
    if physics.active and cfg["model"]["name"] != "deeplens_params":
        raise SystemExit("error: physics.weight / physics.param_supervision_weight > 0 need "
                         "model.name: deeplens_params (a model with a lens-parameter head)")
    target = MODEL_TARGETS.get(cfg["model"]["name"])
    if target is None:
        raise SystemExit(f"error: model.name must be one of {sorted(MODEL_TARGETS)}, got {cfg['model']['name']!r}")
    model = build_model(target, model_kwargs(cfg, n_bands, image_size)).to(device)
    sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=seed)
    loader_kw = dataloader_kwargs(device, rcfg["num_workers"])
    train_loader = DataLoader(train_set, batch_size=tcfg["batch_size"], sampler=sampler, drop_last=True, **loader_kw)
    val_sampler = DistributedSampler(val_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=False)
    val_loader = DataLoader(val_set, batch_size=tcfg["val_batch_size"], sampler=val_sampler, **loader_kw)
    if len(train_loader) == 0:
        raise SystemExit(f"error: {len(train_set)} training cutouts are fewer than one batch of {tcfg['batch_size']}")
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tcfg["epochs"])
    amp = amp_policy(device, rcfg["amp"])
    start_epoch, step, best = 1, 0, -math.inf
    if resume_from is not None:
        state = restore_training_state(load_checkpoint(resume_from, expected_domain="lensing"), model, optimizer,
                                       scheduler, amp.scaler)
        start_epoch, step = state["epoch"] + 1, state["step"]
        best = state["best_metric"] if state["best_metric"] is not None else -math.inf
        run.log(f"[lensing] member {member}: resumed at epoch {start_epoch} from {resume_from}")
    # a parameter head that no loss uses would stall DDP's gradient reduction
    unused_head = cfg["model"]["name"] == "deeplens_params" and not physics.active
    ddp_model = wrap_model(model, dist, device, find_unused_parameters=unused_head)
    cooling = CoolingPause(rcfg["cooling_every_steps"], rcfg["cooling_pause_s"])
    aug_gen = torch.Generator().manual_seed(seed * 1000 + dist.rank)
    preprocessing = {"n_bands": int(n_bands), "image_size": int(image_size), "clip_sigma": cfg["data"]["clip_sigma"],
                     "stretch": cfg["data"]["stretch"],
                     "normalization": "per-band background sigma (sqrt median variance), clipped",
                     "surveys": sorted(train_set.catalog["survey"].unique().tolist()),
                     "bands": str(train_set.catalog["bands"].iloc[0]), "data_dir": str(cfg["data"]["dir"])}

    def save(name: str, epoch: int) -> None:
        if run.is_main:
            save_checkpoint(member_dir / name, model, domain="lensing", config=cfg, optimizer=optimizer,
                            scheduler=scheduler, scaler=amp.scaler, epoch=epoch, step=step, best_metric=best,
                            best_metric_name="val_auroc", preprocessing=preprocessing,
                            extra={"member": member, "seed": seed})

    epoch, last_metrics = start_epoch - 1, {}
    with GracefulInterrupt() as interrupt:
        for epoch in range(start_epoch, tcfg["epochs"] + 1):
            sampler.set_epoch(epoch)
            ddp_model.train()
            sums = np.zeros(3)  # bce, physics loss, samples
            chi2_sum, chi2_n = 0.0, 0
            t0 = time.perf_counter()
            n_steps = len(train_loader) if not tcfg["max_steps_per_epoch"] else min(len(train_loader),
                                                                                   tcfg["max_steps_per_epoch"])
            for i, batch in enumerate(progress(train_loader, desc=f"member {member} epoch {epoch}",
                                               total=n_steps, is_main=run.is_main)):
                if i >= n_steps:
                    break
                if tcfg["augment"]:
                    batch = augment_batch(batch, aug_gen)
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                label = batch["label"]
                known = label >= 0
                with amp.autocast():
                    outputs = ddp_model(batch["input"])
                logit = outputs["logit"].float()
                bce = F.binary_cross_entropy_with_logits(logit[known], label[known]) if bool(known.any()) \
                    else logit.sum() * 0.0
                loss = bce
                if physics.active:
                    phys, stats = physics(outputs, batch, epoch)
                    loss = loss + phys
                    sums[1] += float(phys.detach()) * len(label)
                    if "physics_chi2" in stats:
                        chi2_sum, chi2_n = chi2_sum + stats["physics_chi2"], chi2_n + 1
                optimizer_step(loss, optimizer, amp, grad_clip=tcfg["grad_clip"])
                sums[0] += float(bce.detach()) * len(label)
                sums[2] += len(label)
                step += 1
                cooling.step()
                if interrupt.requested:
                    break
            scheduler.step()
            elapsed = time.perf_counter() - t0
            train_bce, train_phys = all_reduce_mean(sums[:2], [sums[2], sums[2]], device)
            samples = float(all_reduce_mean([sums[2]], [1.0], device)[0]) * dist.world_size
            val = evaluate(model, val_loader, device, amp, val_set, run.is_main)
            last_metrics = {"epoch": epoch, "step": step, "train_bce": train_bce, "train_physics": train_phys,
                            "physics_chi2": chi2_sum / chi2_n if chi2_n else float("nan"), **val,
                            "lr": scheduler.get_last_lr()[0], "train_samples_per_s": samples / max(elapsed, 1e-9)}
            run.logger.log_metrics(last_metrics, filename=f"metrics_member{member}.csv" if member_dir != run.run_dir
                                   else "metrics.csv")
            run.log(f"member {member} epoch {epoch}: bce {train_bce:.4f} phys {train_phys:.4g} "
                    f"val_bce {val['val_bce']:.4f} val_auroc {val['val_auroc']:.4f} tpr0 {val['val_tpr0']:.3f} "
                    f"tpr10 {val['val_tpr10']:.3f} ({last_metrics['train_samples_per_s']:.0f} samples/s)")
            score = val["val_auroc"] if math.isfinite(val["val_auroc"]) else -val["val_bce"]
            if score > best:
                best = float(score)
                save("checkpoint_best.pt", epoch)
            save("checkpoint_last.pt", epoch)
            if interrupt.requested:
                run.log(f"stopped by the user after epoch {epoch}; resume with --resume {run.run_dir}")
                break
    return {"member": member, "seed": seed, "best_val_auroc": best, "epochs_completed": epoch,
            "interrupted": interrupt.requested, "last": last_metrics}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, train=True)
    parser.add_argument("--data", type=Path, default=None, help="data set folder (overrides data.dir)")
    args = parser.parse_args(argv)
    if args.data is not None:
        args.set = [*args.set, f"data.dir={args.data.as_posix()}"]
    run = start_run(args, domain="lensing", defaults=DEFAULTS, argv=argv)
    cfg = run.cfg
    if not cfg["data"]["dir"]:
        raise SystemExit("error: give the data set folder with --data DIR (or data.dir)")
    dcfg = cfg["data"]
    common_kw = {"surveys": dcfg["surveys"] or None, "clip_sigma": dcfg["clip_sigma"], "stretch": dcfg["stretch"],
                 "preload": dcfg["preload"],
                 "on_missing_files": dcfg["on_missing_files"], "log": run.log}
    train_set = LensingDataset(dcfg["dir"], split=dcfg["train_split"], **common_kw)
    n_bands, size = train_set[0]["input"].shape[0], train_set[0]["input"].shape[-1]
    val_set = LensingDataset(dcfg["dir"], split=dcfg["val_split"], expected_bands=n_bands, expected_size=size,
                             **common_kw)
    labels = train_set.labels()
    run.log(f"[lensing] train {len(train_set)} cutouts ({int((labels == 1).sum())} lenses, "
            f"{int((labels == 0).sum())} non-lenses), val {len(val_set)}; {n_bands} band(s), {size}x{size} px")

    if run.resume_from is None and run.is_main:
        for stale in [*run.run_dir.glob("metrics*.csv"), *run.run_dir.glob("member_*/member_summary.json")]:
            stale.unlink()  # a fresh run into a reused --output-dir must not append to old epochs
            run.log(f"[lensing] removed {stale} from an earlier run in this folder")
    n_members = int(cfg["ensemble"]["n_members"])
    resume_root = run_root(run.resume_from) if run.resume_from is not None else None

    def train_one(member: int, seed: int):
        member_dir = run.run_dir if n_members == 1 else run.run_dir / f"member_{member}"
        done = member_dir / "member_summary.json"
        if n_members > 1 and done.is_file() and resume_root is not None:
            run.log(f"[lensing] member {member} already complete, skipped")
            return json.loads(done.read_text(encoding="utf-8"))
        resume_from = None
        if resume_root is not None:
            candidate = (resume_root if n_members == 1 else resume_root / f"member_{member}") / "checkpoint_last.pt"
            resume_from = candidate if candidate.is_file() else None
        result = train_member(run, member, seed, member_dir, train_set, val_set, resume_from)
        if n_members > 1 and run.is_main and not result["interrupted"]:
            write_json(done, result)
        return result

    results = train_members(n_members, cfg["seed"], train_one)
    interrupted = any(r.get("interrupted") for r in results)
    if n_members > 1 and run.is_main:
        write_json(run.run_dir / ENSEMBLE_MANIFEST, {"members": [f"member_{i}" for i in range(n_members)],
                                                     "combine": "mean logit"})
    summary = {"n_members": n_members, "members": results, "interrupted": interrupted,
               "best_val_auroc_per_member": [r["best_val_auroc"] for r in results],
               "train_samples_per_s": float(np.mean([r["last"].get("train_samples_per_s", float("nan"))
                                                    for r in results if r.get("last")] or [float("nan")]))}
    if run.is_main and cfg["train"]["plot_curves"]:
        from common.plotting import plot_training_curves

        figures = []
        for csv in sorted(run.run_dir.glob("metrics*.csv")):
            figures += plot_training_curves(csv, run.run_dir / "figures" / f"training_curves_{csv.stem}")
        summary["figures"] = [str(p.relative_to(run.run_dir).as_posix()) for p in figures if p.suffix == ".png"]
    return run.finish(summary)


if __name__ == "__main__":
    main()
