"""Train spatial CBF/ATT networks on on-the-fly simulated ASL phantoms (an ensemble of N members).

Anatomy comes from DataLoader workers; the physics draw (domain randomization), the signals (asl.physics),
misregistration and noise are simulated batched on the device. Loss: L1/L2/Huber/NLL on z-scored CBF and ATT
over the brain mask, + variance_weight × Gaussian NLL of the log-variance heads, + dc_weight × data
consistency through the nominal physics (in input units: ΔM/M0 / S_ref). Curriculum over SNR and
randomization width, adaptive task weighting, denoising pre-training and in-vivo fine-tuning are config flags.
Members go to <run>/member_<i>/; --resume continues the interrupted member.

    python asl/train_asl.py --config configs/asl/smoke.yaml --output-dir runs/asl/smoke
    python -m torch.distributed.run --nproc_per_node=2 asl/train_asl.py --config configs/asl/production_v2.yaml
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from asl.data import (
    make_batch,
    model_kwargs,
    normalize_targets,
    predict_maps,
    preprocessing_meta,
    target_stats,
)
from asl.defaults import defaults
from asl.finetune import finetune_model
from asl.physics import reference_signal
from asl.simulate import EpochSampler, PhantomDataset, load_fixed_set, simulate_clean
from common.checkpoint import build_model, load_checkpoint, load_model, restore_training_state, save_checkpoint
from common.cli import make_parser, start_run
from common.ensembling import train_members
from common.losses import UncertaintyWeighting, gaussian_nll, masked_huber, masked_l1, masked_mse
from common.runlog import progress, read_csv_rows, write_json
from common.runtime import (
    CoolingPause,
    GracefulInterrupt,
    all_reduce_mean,
    amp_policy,
    dataloader_kwargs,
    optimizer_step,
    wrap_model,
)

DEFAULTS = defaults()


def check_set_matches(meta: dict, cfg: dict, path) -> None:
    """The saved phantom set must have been simulated with the physics the network is trained for."""
    for key in ("modes", "plds_ms", "pcasl_model"):
        if list(np.atleast_1d(meta["physics"][key])) != list(np.atleast_1d(cfg["physics"][key])):
            raise ValueError(f"{path}: field 'physics.{key}' is {meta['physics'][key]} but the config has "
                             f"{cfg['physics'][key]}; re-run preprocess_asl.py with this config")


def task_losses(out: dict, batch: dict, cfg: dict, stats: dict) -> dict:
    """Per-task losses (CBF, ATT point/NLL terms) and the data-consistency term, all masked to the brain."""
    tcfg = cfg["train"]
    mask = batch["mask"].float()
    z_cbf, z_att = normalize_targets(batch["cbf"], batch["att"], stats)
    kind = tcfg["loss"]
    parts = {}
    for name, target in (("cbf", z_cbf), ("att", z_att)):
        pred = out[name].float()
        if kind == "nll":
            if f"log_var_{name}" not in out:
                raise ValueError("train.loss 'nll' needs model.use_log_var: true")
            parts[name] = gaussian_nll(pred, out[f"log_var_{name}"].float(), target, mask)
        elif kind == "l1":
            parts[name] = masked_l1(pred, target, mask)
        elif kind == "l2":
            parts[name] = masked_mse(pred, target, mask)
        elif kind == "huber":
            parts[name] = masked_huber(pred, target, mask, float(tcfg["huber_delta"]))
        else:
            raise ValueError(f"train.loss must be l1, l2, huber or nll, got {kind!r}")
        if kind != "nll" and f"log_var_{name}" in out and tcfg["variance_weight"] > 0:
            # The variance heads learn the error of a detached mean: they do not bend the point estimate.
            parts[f"nll_{name}"] = gaussian_nll(pred.detach(), out[f"log_var_{name}"].float(), target, mask)
    if tcfg["dc_weight"] > 0:
        cbf = (out["cbf"].float() * stats["cbf_std"] + stats["cbf_mean"]).clamp(0, 200)[:, 0]
        att = (out["att"].float() * stats["att_std"] + stats["att_mean"]).clamp(100, 4000)[:, 0]
        predicted = simulate_clean(cbf, att, cfg["physics"], None) / reference_signal(cfg["physics"])
        parts["dc"] = masked_l1(predicted, batch["x"], batch["mask"].float())
    return parts


def combine(parts: dict, cfg: dict, weights: dict, uw: UncertaintyWeighting | None) -> torch.Tensor:
    tcfg = cfg["train"]
    if uw is not None:
        total = uw({"cbf": parts["cbf"], "att": parts["att"]})
    else:
        total = weights["cbf"] * parts["cbf"] + weights["att"] * parts["att"]
    for name in ("cbf", "att"):
        if f"nll_{name}" in parts:
            total = total + tcfg["variance_weight"] * parts[f"nll_{name}"]
    if "dc" in parts:
        total = total + tcfg["dc_weight"] * parts["dc"]
    return total


@torch.no_grad()
def evaluate(model, val: dict, cfg: dict, stats: dict, device, dist) -> dict:
    """Brain-mask MAE of CBF/ATT on the saved validation set at each of its SNRs (exact over DDP ranks)."""
    s_ref = reference_signal(cfg["physics"])
    n = val["cbf"].shape[0]
    limit = int(cfg["train"]["val_max_phantoms"]) or n
    idx = np.arange(min(n, limit))[dist.rank::dist.world_size]
    result = {}
    totals = []
    for k, snr in enumerate(val["snrs"]):
        x = torch.from_numpy(val["noisy"][k][idx]) / s_ref
        maps = predict_maps([model], x, stats, batch_size=16)
        m = val["mask"][idx]
        sums = [np.abs(maps["cbf"] - val["cbf"][idx])[m].sum(), np.abs(maps["att"] - val["att"][idx])[m].sum()]
        mae_cbf, mae_att = all_reduce_mean(sums, [m.sum(), m.sum()], device)
        result[f"val_cbf_mae_snr{snr:g}"] = float(mae_cbf)
        result[f"val_att_mae_snr{snr:g}"] = float(mae_att)
        totals.append((mae_cbf / stats["cbf_std"], mae_att / stats["att_std"]))
    totals = np.asarray(totals).mean(0)
    result.update({"val_cbf_z": float(totals[0]), "val_att_z": float(totals[1]), "val_loss": float(totals.sum())})
    model.train()
    return result


def lr_lambda_factory(warmup: int, total: int):
    def fn(step: int) -> float:
        if step < warmup:
            return (step + 1) / max(warmup, 1)
        progress_frac = (step - warmup) / max(total - warmup, 1)
        return 0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * min(progress_frac, 1.0)))
    return fn


def train_member(run, member: int, seed: int, stats: dict, val: dict, resume: bool) -> dict:
    cfg, device, dist = run.cfg, run.device, run.dist
    tcfg, rcfg = cfg["train"], cfg["runtime"]
    member_dir = run.run_dir / f"member_{member}"
    done_file = member_dir / "member_summary.json"
    total_epochs = int(tcfg["pretrain_denoise_epochs"]) + int(tcfg["epochs"])
    if resume and done_file.is_file():
        import json

        done = json.loads(done_file.read_text(encoding="utf-8"))
        if done["epochs_completed"] >= total_epochs:
            run.log(f"member {member}: already complete, skipped")
            return done
    torch.manual_seed(seed)
    target, kwargs = model_kwargs(cfg, stats)
    model = build_model(target, kwargs).to(device)
    if tcfg["pretrain_denoise_epochs"] > 0 and not kwargs["denoise_head"]:
        raise ValueError("train.pretrain_denoise_epochs > 0 needs model.denoise_head: true")
    uw = None
    params = list(model.parameters())
    if tcfg["loss_weighting"] == "uncertainty":
        uw = UncertaintyWeighting({"cbf": "regression", "att": "regression"}).to(device)
        params += list(uw.parameters())
        if dist.enabled:  # not inside DDP: average its gradients by hand
            for p in uw.parameters():
                p.register_hook(lambda g: _allreduce_grad(g, dist.world_size))
    elif tcfg["loss_weighting"] not in ("fixed", "inverse_validation_loss"):
        raise ValueError(f"train.loss_weighting must be fixed, inverse_validation_loss or uncertainty, "
                         f"got {tcfg['loss_weighting']!r}")
    optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    n_pre = int(tcfg["pretrain_denoise_epochs"])
    total_steps = total_epochs * int(tcfg["steps_per_epoch"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(int(tcfg["warmup_steps"]), total_steps))
    amp = amp_policy(device, rcfg["amp"])
    weights = {"cbf": float(tcfg["cbf_weight"]), "att": float(tcfg["att_weight"])}
    start_epoch, step, best = 1, 0, math.inf
    last_path = member_dir / "checkpoint_last.pt"
    if resume and last_path.is_file():
        ckpt = load_checkpoint(last_path, expected_domain="asl")
        state = restore_training_state(ckpt, model, optimizer, scheduler, amp.scaler)
        start_epoch, step = state["epoch"] + 1, state["step"]
        best = state["best_metric"] if state["best_metric"] is not None else math.inf
        weights = dict(ckpt["extra"].get("task_weights", weights))
        if uw is not None and "uncertainty_weighting" in ckpt["extra"]:
            uw.load_state_dict(ckpt["extra"]["uncertainty_weighting"])
        run.log(f"member {member}: resumed at epoch {start_epoch}")
    ddp_model = wrap_model(model, dist, device, find_unused_parameters=bool(kwargs["denoise_head"]))
    per_epoch = int(tcfg["steps_per_epoch"]) * int(tcfg["batch_size"]) * dist.world_size
    dataset = PhantomDataset(per_epoch, seed, cfg["phantom"])
    sampler = EpochSampler(per_epoch, dist.rank, dist.world_size)
    loader = DataLoader(dataset, batch_size=int(tcfg["batch_size"]), sampler=sampler, drop_last=True,
                        **dataloader_kwargs(device, rcfg["num_workers"]))
    cooling = CoolingPause(rcfg["cooling_every_steps"], rcfg["cooling_pause_s"])
    meta = preprocessing_meta(cfg, stats)

    def save(path: Path, epoch: int) -> None:
        if run.is_main:
            extra = {"member": member, "n_members": int(tcfg["n_ensembles"]), "task_weights": weights}
            if uw is not None:
                extra["uncertainty_weighting"] = uw.state_dict()
            save_checkpoint(path, model, domain="asl", config=cfg, optimizer=optimizer, scheduler=scheduler,
                            scaler=amp.scaler, epoch=epoch, step=step, best_metric=best,
                            best_metric_name="val_loss", preprocessing=meta, extra=extra)

    epoch = start_epoch - 1
    with GracefulInterrupt() as interrupt:
        for epoch in range(start_epoch, total_epochs + 1):
            pretrain = epoch <= n_pre
            main_epoch = epoch - n_pre
            frac = 1.0
            if tcfg["curriculum_epochs"] > 0 and not pretrain:
                frac = min(1.0, (main_epoch - 1) / float(tcfg["curriculum_epochs"]))
            lo, hi = _snr_bounds(cfg)
            snr_floor = hi * (lo / hi) ** frac if tcfg["curriculum_epochs"] > 0 else None
            sampler.set_epoch(epoch)
            ddp_model.train()
            loss_sum, n_batches = 0.0, 0
            desc = f"member {member} epoch {epoch}/{total_epochs}" + (" (denoise pre-training)" if pretrain else "")
            for batch in progress(loader, desc=desc, is_main=run.is_main):
                gen = torch.Generator(device=device)
                gen.manual_seed(seed * 1_000_003 + step * 7919 + dist.rank)
                b = make_batch(batch, cfg, device, gen, width=frac, snr_floor=snr_floor)
                with amp.autocast():
                    out = ddp_model(b["x"])
                if pretrain:
                    loss = masked_mse(out["denoised"].float(), b["clean_x"])
                else:
                    loss = combine(task_losses(out, b, cfg, stats), cfg, weights, uw)
                optimizer_step(loss, optimizer, amp, parameters=params, grad_clip=tcfg["grad_clip"])
                scheduler.step()
                loss_sum, n_batches, step = loss_sum + float(loss.detach()), n_batches + 1, step + 1
                cooling.step()
                if interrupt.requested:
                    break
            metrics = evaluate(model, val, cfg, stats, device, dist)
            (train_loss,) = all_reduce_mean([loss_sum], [n_batches], device)
            if tcfg["loss_weighting"] == "inverse_validation_loss" and not pretrain:
                # Harder task (larger validation error in z units) gets more weight; weights sum to 2.
                z = np.array([metrics["val_cbf_z"], metrics["val_att_z"]])
                w = 2 * z / z.sum()
                weights = {"cbf": float(w[0]), "att": float(w[1])}
            row = {"member": member, "epoch": epoch, "step": step, "phase": "denoise" if pretrain else "main",
                   "train_loss": train_loss, **metrics, "lr": scheduler.get_last_lr()[0],
                   "randomization_width": frac, "snr_floor": snr_floor, "w_cbf": weights["cbf"], "w_att": weights["att"]}
            if uw is not None:
                row.update({f"uw_{k}": v for k, v in uw.weights().items()})
            run.logger.log_metrics(row)
            run.log(f"member {member} epoch {epoch}: train_loss {train_loss:.4f}  val_loss {metrics['val_loss']:.4f}  "
                    + "  ".join(f"{k[4:]} {v:.2f}" for k, v in metrics.items() if "_mae_" in k))
            if not pretrain and metrics["val_loss"] < best:
                best = float(metrics["val_loss"])
                save(member_dir / "checkpoint_best.pt", epoch)
            save(last_path, epoch)  # --resume RUN finds the newest member_<i>/checkpoint_last.pt
            if interrupt.requested:
                run.log(f"stopped by the user in member {member} epoch {epoch}; resume with --resume {run.run_dir}")
                break
    summary = {"member": member, "seed": seed, "best_val_loss": best, "epochs_completed": epoch,
               "interrupted": interrupt.requested}
    if interrupt.requested:
        return summary
    if cfg["finetune"]["enabled"] and run.is_main:
        summary["finetune"] = finetune_member(run, member_dir, stats)
    if run.is_main:
        write_json(done_file, summary)
    return summary


def _allreduce_grad(grad: torch.Tensor, world: int) -> torch.Tensor:
    grad = grad.clone()
    torch.distributed.all_reduce(grad)
    return grad / world


def _snr_bounds(cfg: dict) -> tuple[float, float]:
    values = cfg["noise"]["train_snr_values"]
    if values:
        return float(min(values)), float(max(values))
    lo, hi = cfg["noise"]["train_snr_range"]
    return float(lo), float(hi)


def finetune_member(run, member_dir: Path, stats: dict) -> dict:
    """Exp 14: self-supervised fine-tuning of the member's best model on in-vivo data; the fine-tuned
    weights become checkpoint_best.pt (the original is kept as checkpoint_pre_finetune.pt)."""
    import shutil

    cfg = run.cfg
    best = member_dir / "checkpoint_best.pt"
    shutil.copyfile(best, member_dir / "checkpoint_pre_finetune.pt")
    model, ckpt = load_model(best, device=run.device, expected_domain="asl")
    result = finetune_model(model, ckpt["preprocessing"], cfg["finetune"], run.device, run.log)
    save_checkpoint(best, model, domain="asl", config=cfg, epoch=ckpt["epoch"], step=ckpt["step"],
                    best_metric=ckpt["best_metric"], best_metric_name="val_loss",
                    preprocessing=ckpt["preprocessing"], extra={**ckpt["extra"], "finetuned": result})
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, train=True)
    args = parser.parse_args(argv)
    run = start_run(args, domain="asl", defaults=DEFAULTS, argv=argv)
    cfg = run.cfg
    val_path = Path(cfg["data"]["dir"]) / "val.npz"
    val, meta = load_fixed_set(val_path)
    check_set_matches(meta, cfg, val_path)
    stats = target_stats(cfg, int(cfg["train"]["target_stats_phantoms"]))
    run.log(f"target statistics from {cfg['train']['target_stats_phantoms']} training phantoms: "
            + ", ".join(f"{k} {v:.1f}" for k, v in stats.items()))
    target, kwargs = model_kwargs(cfg, stats)
    run.log(f"model {target} with {sum(p.numel() for p in build_model(target, kwargs).parameters()):,} parameters")
    resume = run.resume_from is not None
    if not resume and run.is_main and (run.run_dir / "metrics.csv").is_file():
        (run.run_dir / "metrics.csv").unlink()  # a fresh run into a reused folder starts a fresh log
    members = train_members(int(cfg["train"]["n_ensembles"]), int(cfg["seed"]),
                            lambda i, seed: train_member(run, i, seed, stats, val, resume))
    summary: dict = {"members": members, "target_stats": stats, "model": target,
                     "interrupted": any(m.get("interrupted") for m in members)}
    if run.is_main and not summary["interrupted"]:
        import shutil

        shutil.copyfile(run.run_dir / "member_0" / "checkpoint_best.pt", run.run_dir / "checkpoint_best.pt")
        models = [load_model(run.run_dir / f"member_{i}" / "checkpoint_best.pt", run.device, "asl")[0]
                  for i in range(len(members))]
        ens = _ensemble_val(models, val, cfg, stats)
        summary["val_ensemble"] = ens
        from common.plotting import plot_training_curves

        rows = read_csv_rows(run.run_dir / "metrics.csv")
        keys = [k for k in ("train_loss", "val_loss") + tuple(k for k in rows[0] if "_mae_" in k) if k in rows[0]]
        figs = plot_training_curves(run.run_dir / "metrics.csv", run.run_dir / "figures" / "training_curves",
                                    x_key="step", keys=keys)
        summary["figures"] = [p.relative_to(run.run_dir).as_posix() for p in figs if p.suffix == ".png"]
        summary["headline"] = {f"val_{k}": v for k, v in ens.items() if "_mae_" in k}
        run.log("ensemble on the validation set: " + ", ".join(f"{k} {v:.2f}" for k, v in ens.items()))
    return run.finish(summary)


def _ensemble_val(models, val: dict, cfg: dict, stats: dict) -> dict:
    s_ref = reference_signal(cfg["physics"])
    out = {}
    for k, snr in enumerate(val["snrs"]):
        maps = predict_maps(models, torch.from_numpy(val["noisy"][k]) / s_ref, stats)
        m = val["mask"]
        out[f"cbf_mae_snr{snr:g}"] = float(np.abs(maps["cbf"] - val["cbf"])[m].mean())
        out[f"att_mae_snr{snr:g}"] = float(np.abs(maps["att"] - val["att"])[m].mean())
    return out


if __name__ == "__main__":
    main()
