"""Train spatial CBF/ATT networks on on-the-fly simulated ASL phantoms (an ensemble of N members).

Anatomy comes from DataLoader workers; the physics draw (domain randomization), the signals (asl.physics),
misregistration and noise are simulated batched on the device. Loss: L1/L2/Huber/NLL on z-scored CBF and ATT
over the brain mask, + variance_weight × Gaussian NLL of the log-variance heads, + dc_weight × data
consistency through the nominal physics (in input units: ΔM/M0 / S_ref). Curriculum over SNR and
randomization width, adaptive task weighting, denoising pre-training and in-vivo fine-tuning are config flags.
Members are trained one after another into <run>/member_<i>/; <run>/ensemble.json lists them.

Ctrl+C (SIGTERM, SIGBREAK) stops after the current step and saves the member's checkpoint_last.pt mid-epoch;
--resume continues exactly where it stopped (the phantoms of step k depend only on (seed, epoch, k)).
--stop-after-steps N counts optimizer steps over the whole ensemble (member i's follow member i-1's).

    python asl/train_asl.py --config configs/asl/smoke.yaml --data data/asl/smoke --output-dir runs/asl/smoke
    python asl/train_asl.py --config configs/asl/smoke.yaml --data data/asl/smoke --output-dir runs/asl/smoke --resume
    python -m torch.distributed.run --nproc_per_node=2 asl/train_asl.py --config configs/asl/production_v2.yaml
"""

from __future__ import annotations

import gc
import json
import math
import shutil
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
from asl.simulate import EpochSampler, PhantomDataset, PhantomSetError, load_fixed_set, simulate_clean
from common.checkpoint import build_model, load_checkpoint, load_model, save_checkpoint, write_ensemble_manifest
from common.cli import make_parser, start_run
from common.config import ConfigError
from common.errors import run_cli
from common.losses import UncertaintyWeighting, gaussian_nll, masked_huber, masked_l1, masked_mse
from common.runlog import progress, read_csv_rows, write_json
from common.runtime import (
    CoolingPause,
    ResumableSampler,
    all_reduce_mean,
    amp_policy,
    dataloader_kwargs,
    optimizer_step,
    wrap_model,
)
from common.training import CheckpointSaver, StopRequest, TrainState, resume_training

DEFAULTS = defaults()


def check_set_matches(meta: dict, cfg: dict, path) -> None:
    """The saved phantom set must have been simulated with the physics the network is trained for."""
    for key in ("modes", "plds_ms", "pcasl_model"):
        if list(np.atleast_1d(meta["physics"][key])) != list(np.atleast_1d(cfg["physics"][key])):
            raise PhantomSetError(f"field 'physics.{key}' is {meta['physics'][key]} but the config has "
                                  f"{cfg['physics'][key]}; re-run preprocess_asl.py with this config", path)


LOSSES = ("l1", "l2", "huber", "nll")
LOSS_WEIGHTINGS = ("fixed", "inverse_validation_loss", "uncertainty")


def check_train_config(cfg: dict, kwargs: dict) -> None:
    """Refuse training options that cannot work together before anything is written."""
    tcfg = cfg["train"]
    if tcfg["loss"] not in LOSSES:
        raise ConfigError(f"train.loss must be one of {list(LOSSES)}, got {tcfg['loss']!r}")
    if tcfg["loss"] == "nll" and not kwargs["use_log_var"]:
        raise ConfigError("train.loss 'nll' needs model.use_log_var: true")
    if tcfg["loss_weighting"] not in LOSS_WEIGHTINGS:
        raise ConfigError(f"train.loss_weighting must be one of {list(LOSS_WEIGHTINGS)}, got {tcfg['loss_weighting']!r}")
    if tcfg["pretrain_denoise_epochs"] > 0 and not kwargs["denoise_head"]:
        raise ConfigError("train.pretrain_denoise_epochs > 0 needs model.denoise_head: true")
    if cfg["finetune"]["enabled"] and not cfg["finetune"]["data"]:
        raise ConfigError("finetune.enabled is true but finetune.data names no in-vivo data")


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
                raise ConfigError("train.loss 'nll' needs model.use_log_var: true")
            parts[name] = gaussian_nll(pred, out[f"log_var_{name}"].float(), target, mask)
        elif kind == "l1":
            parts[name] = masked_l1(pred, target, mask)
        elif kind == "l2":
            parts[name] = masked_mse(pred, target, mask)
        elif kind == "huber":
            parts[name] = masked_huber(pred, target, mask, float(tcfg["huber_delta"]))
        else:
            raise ConfigError(f"train.loss must be one of {list(LOSSES)}, got {kind!r}")
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


def epoch_plan(cfg: dict, epoch: int) -> dict:
    """What epoch ``epoch`` (1-based, pre-training epochs first) trains: its phase, the randomization width
    and the SNR floor of the curriculum (high SNR and narrow randomization first)."""
    tcfg = cfg["train"]
    pretrain = epoch <= int(tcfg["pretrain_denoise_epochs"])
    width, snr_floor = 1.0, None
    if tcfg["curriculum_epochs"] > 0:
        main_epoch = epoch - int(tcfg["pretrain_denoise_epochs"])
        if not pretrain:
            width = min(1.0, (main_epoch - 1) / float(tcfg["curriculum_epochs"]))
        lo, hi = _snr_bounds(cfg)
        snr_floor = hi * (lo / hi) ** width
    return {"phase": "denoise" if pretrain else "main", "width": width, "snr_floor": snr_floor}


def step_generator(seed: int, step: int, rank: int, device) -> torch.Generator:
    """Noise and misregistration of one step come from (seed, step, rank) alone, so a resumed run draws the same."""
    gen = torch.Generator(device=device)
    gen.manual_seed(seed * 1_000_003 + step * 7919 + rank)
    return gen


def train_one_epoch(model, loader, optimizer, scheduler, amp, state: TrainState, stop: StopRequest, cooling,
                    make_inputs, compute_loss, params, grad_clip: float, desc: str, is_main: bool,
                    step_offset: int = 0) -> None:
    """One pass over the (remaining) batches of the epoch: ``make_inputs(batch, step)`` simulates the network
    input on the device, ``compute_loss(out, inputs)`` scores the output. Running sums go to ``state.partial``.
    ``step_offset``: the steps of the members trained before this one (the stop request counts ensemble steps)."""
    model.train()
    for batch in progress(loader, desc=desc, is_main=is_main):
        inputs = make_inputs(batch, state.step)
        with amp.autocast():
            out = model(inputs["x"])
        loss = compute_loss(out, inputs)
        optimizer_step(loss, optimizer, amp, parameters=params, grad_clip=grad_clip)
        scheduler.step()
        state.add(loss=float(loss.detach()), n=1)
        state.step, state.batches_done = state.step + 1, state.batches_done + 1
        cooling.step()
        if stop.check(step_offset + state.step):
            return


def train_member(run, member: int, seed: int, stats: dict, val: dict, stop: StopRequest) -> dict:
    """Train (or, with --resume, continue) ensemble member ``member`` in <run>/member_<member>/."""
    cfg, device, dist = run.cfg, run.device, run.dist
    tcfg, rcfg = cfg["train"], cfg["runtime"]
    member_dir = run.run_dir / f"member_{member}"
    done_file, last_checkpoint = member_dir / "member_summary.json", member_dir / "checkpoint_last.pt"
    total_epochs = int(tcfg["pretrain_denoise_epochs"]) + int(tcfg["epochs"])
    resuming = run.resume_from is not None and last_checkpoint.is_file()
    if resuming and done_file.is_file():
        done = json.loads(done_file.read_text(encoding="utf-8"))
        if done["epochs_completed"] >= total_epochs:
            run.log(f"member {member}: already complete, skipped")
            return done

    torch.manual_seed(seed)
    target, kwargs = model_kwargs(cfg, stats)
    model = build_model(target, kwargs).to(device)
    uw = None
    params = list(model.parameters())
    if tcfg["loss_weighting"] == "uncertainty":
        uw = UncertaintyWeighting({"cbf": "regression", "att": "regression"}).to(device)
        params += list(uw.parameters())
        if dist.enabled:  # not inside DDP: average its gradients by hand
            for p in uw.parameters():
                p.register_hook(lambda g: _allreduce_grad(g, dist.world_size))
    optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    total_steps = total_epochs * int(tcfg["steps_per_epoch"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(int(tcfg["warmup_steps"]), total_steps))
    amp = amp_policy(device, rcfg["amp"])
    task_weights = {"cbf": float(tcfg["cbf_weight"]), "att": float(tcfg["att_weight"])}
    state = TrainState()
    if resuming:
        state = resume_training(run, model, optimizer, scheduler, amp.scaler, checkpoint=last_checkpoint,
                                match={"member": member})
        extra = load_checkpoint(last_checkpoint, expected_domain="asl").get("extra") or {}
        task_weights.update(extra.get("task_weights", {}))
        if uw is not None and "uncertainty_weighting" in extra:
            uw.load_state_dict(extra["uncertainty_weighting"])

    def member_extra() -> dict:
        extra = {"member": member, "n_members": int(tcfg["n_ensembles"]), "task_weights": dict(task_weights)}
        if uw is not None:
            extra["uncertainty_weighting"] = uw.state_dict()
        return extra

    saver = CheckpointSaver(run, model, optimizer, scheduler, amp.scaler, preprocessing=preprocessing_meta(cfg, stats),
                            extra=member_extra, folder=member_dir)
    ddp_model = wrap_model(model, dist, device, find_unused_parameters=bool(kwargs["denoise_head"]))
    batch_size = int(tcfg["batch_size"])
    per_epoch = int(tcfg["steps_per_epoch"]) * batch_size * dist.world_size
    # New phantoms every epoch, in an order that depends only on (seed, epoch); the ResumableSampler skips
    # the batches a stopped run already trained on. The loader's own generator keeps iterator creation from
    # drawing on the global RNG, which the checkpoint restores for dropout.
    sampler = ResumableSampler(EpochSampler(per_epoch, dist.rank, dist.world_size))
    loader = DataLoader(PhantomDataset(per_epoch, seed, cfg["phantom"]), batch_size=batch_size, sampler=sampler,
                        drop_last=True, **dataloader_kwargs(device, rcfg["num_workers"], seed=seed + dist.rank))
    cooling = CoolingPause(rcfg["cooling_every_steps"], rcfg["cooling_pause_s"])

    for epoch in range(state.epoch + 1, total_epochs + 1):
        plan = epoch_plan(cfg, epoch)
        pretrain = plan["phase"] == "denoise"

        def make_inputs(batch, step, plan=plan):
            return make_batch(batch, cfg, device, step_generator(seed, step, dist.rank, device),
                              width=plan["width"], snr_floor=plan["snr_floor"])

        def compute_loss(out, inputs, pretrain=pretrain):
            if pretrain:
                return masked_mse(out["denoised"].float(), inputs["clean_x"])
            return combine(task_losses(out, inputs, cfg, stats), cfg, task_weights, uw)

        sampler.set_epoch(epoch, skip_samples=state.batches_done * batch_size)
        desc = f"member {member} epoch {epoch}/{total_epochs}" + (" (denoise pre-training)" if pretrain else "")
        train_one_epoch(ddp_model, loader, optimizer, scheduler, amp, state, stop, cooling, make_inputs, compute_loss,
                        params, tcfg["grad_clip"], desc, run.is_main, step_offset=member * total_steps)
        if stop.stopped:  # epoch unfinished: checkpoint_last.pt records where to pick up
            saver.save_partial(state)
            break
        metrics = evaluate(model, val, cfg, stats, device, dist)
        (train_loss,) = all_reduce_mean([state.partial.get("loss", 0.0)], [state.partial.get("n", 0.0)], device)
        if tcfg["loss_weighting"] == "inverse_validation_loss" and not pretrain:
            # Harder task (larger validation error in z units) gets more weight; weights sum to 2.
            z = np.array([metrics["val_cbf_z"], metrics["val_att_z"]])
            w = 2 * z / z.sum()
            task_weights.update(cbf=float(w[0]), att=float(w[1]))
        row = {"member": member, "phase": plan["phase"], "train_loss": train_loss, **metrics,
               "lr": scheduler.get_last_lr()[0], "randomization_width": plan["width"], "snr_floor": plan["snr_floor"],
               "w_cbf": task_weights["cbf"], "w_att": task_weights["att"]}
        if uw is not None:
            row.update({f"uw_{k}": v for k, v in uw.weights().items()})
        state.end_epoch(epoch)
        saver.end_epoch(state, row, metric=None if pretrain else metrics["val_loss"])
        run.log(f"member {member} epoch {epoch}: train_loss {train_loss:.4f}  val_loss {metrics['val_loss']:.4f}  "
                + "  ".join(f"{k[4:]} {v:.2f}" for k, v in metrics.items() if "_mae_" in k))

    summary = {"member": member, "seed": seed, "best_val_loss": state.best_metric, "epochs_completed": state.epoch,
               "interrupted": stop.stopped}
    if stop.stopped:
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
    parser = make_parser(__doc__, train=True, data=True)
    args = parser.parse_args(argv)
    run = start_run(args, domain="asl", defaults=DEFAULTS, argv=argv, data_key="data.dir")
    cfg = run.cfg
    target, kwargs = model_kwargs(cfg)  # checks the physics section
    check_train_config(cfg, kwargs)
    val_path = Path(cfg["data"]["dir"]) / "val.npz"
    val, meta = load_fixed_set(val_path)
    check_set_matches(meta, cfg, val_path)
    stats = target_stats(cfg, int(cfg["train"]["target_stats_phantoms"]))
    run.log(f"target statistics from {cfg['train']['target_stats_phantoms']} training phantoms: "
            + ", ".join(f"{k} {v:.1f}" for k, v in stats.items()))
    target, kwargs = model_kwargs(cfg, stats)
    run.log(f"model {target} with {sum(p.numel() for p in build_model(target, kwargs).parameters()):,} parameters")
    run.record_inputs_valid()

    n_members = int(cfg["train"]["n_ensembles"])
    members: list[dict] = []
    with StopRequest(run) as stop:
        for member in range(n_members):  # one after another: only one model on the GPU at a time
            members.append(train_member(run, member, int(cfg["seed"]) + member, stats, val, stop))
            if stop.stopped:
                break
            gc.collect()
            if torch.cuda.is_available():
                torch.cuda.empty_cache()
    summary: dict = {"members": members, "target_stats": stats, "model": target, "interrupted": stop.stopped}
    if run.is_main and not stop.stopped:
        member_files = [run.run_dir / f"member_{i}" / "checkpoint_best.pt" for i in range(n_members)]
        shutil.copyfile(member_files[0], run.run_dir / "checkpoint_best.pt")  # the run folder's own single model
        write_ensemble_manifest(run.run_dir, member_files, domain="asl", model=target)
        models = [load_model(path, run.device, "asl")[0] for path in member_files]
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
    raise SystemExit(run_cli(main))
