"""Train a protocol-conditioned CBF/ATT network (asl/protocol_net.py) on slabs of 3D brain subjects
(asl/brain_volume.py) acquired with randomized protocols (asl/protocol.py: PCASL, VSASL or both, 1-8 PLDs,
labeling duration, blood T1, background suppression). One model; its checkpoint records the protocol range it
covers (``preprocessing.protocol_range``), which predict_asl.py checks before using it.

Loss: L1 (or the configured ``train.loss``) on z-scored CBF and ATT of the centre slice over the brain mask,
+ variance_weight × Gaussian NLL of the log-variance heads (as train_asl.py). Validation: brain-mask MAE on
fixed slabs of the ``protocol_net.val_seed`` family at ``protocol_net.val_snrs``.
Ctrl+C / SIGTERM / --stop-after-steps stop cleanly mid-epoch; --resume continues exactly (the slabs, protocols
and noise of step k depend only on (seed, epoch, k)).

σ calibration (Laves et al. 2020, MIDL, "Well-calibrated regression uncertainty in medical imaging with deep
learning"): after the last epoch the kept checkpoint (checkpoint_best.pt) is reloaded and one scale per output
(CBF, ATT) of its log-variance σ is fitted by maximum likelihood on the validation slabs (``protocol_net.val_seed``
family, never the test subjects of ``brain_test``), each with ``train.calibration_draws`` noise draws at SNRs
log-uniform in ``protocol_net.snr_range`` (the training SNR mix: one scale over all SNRs, since predict does not
know the SNR); it is stored in checkpoint_best.pt (``extra.sigma_scale``) and applied wherever σ is produced
(asl.protocol_data.predict_volume: predict, validate, benchmark). For an existing checkpoint, without training:
``--calibrate CHECKPOINT --output-dir NEW`` writes NEW/checkpoint_best.pt = that checkpoint with its scale (fitted
on the validation slabs of the checkpoint's own config); the source is never overwritten.

    python asl/train_protocol_asl.py --config configs/asl/protocol_general.yaml --output-dir runs/asl/general
    python asl/train_protocol_asl.py --config configs/asl/protocol_smoke.yaml --output-dir runs/asl/psmoke --resume
    python asl/train_protocol_asl.py --calibrate runs/asl/protocol_pcasl --output-dir runs/asl/protocol_pcasl_cal
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from asl.defaults import defaults
from asl.evaluation import coverage
from asl.models import head_variance
from asl.protocol import protocol_range
from asl.protocol_data import BrainSlabDataset, log_uniform_snr, simulate_batch, validation_items
from asl.simulate import EpochSampler, item_seed
from asl.train_asl import LOSSES, combine, lr_lambda_factory, step_generator, task_losses
from common.checkpoint import (CheckpointError, atomic_torch_save, build_model, load_checkpoint, load_model,
                               resolve_checkpoints, warm_start)
from common.cli import FROZEN_ON_RESUME, make_parser, start_run
from common.config import ConfigError
from common.errors import run_cli
from common.metrics import sigma_scale
from common.runlog import progress
from common.runtime import ResumableSampler, amp_policy, dataloader_kwargs, optimizer_step
from common.training import CheckpointSaver, StopRequest, resume_training

DEFAULTS = defaults()
FROZEN = FROZEN_ON_RESUME + ("brain", "protocol", "protocol_net")


def model_kwargs(cfg: dict, stats: dict) -> tuple[str, dict]:
    net = cfg["protocol_net"]
    return "asl.protocol_net.ProtocolASLNet", {
        "context_slices": int(net["context_slices"]), "set_features": int(net["set_features"]),
        "features": [int(f) for f in net["features"]], "n_groups": int(net["n_groups"]),
        "dropout": float(net["dropout"]), "cbf_kernel_size": int(net["cbf_kernel_size"]),
        "att_grid_points": int(cfg["fit"]["att_grid_points"]), "att_grid_ms": [float(v) for v in cfg["fit"]["att_bounds_ms"]],
        "cbf_mean": stats["cbf_mean"], "cbf_std": stats["cbf_std"], "ls_inputs": bool(net["ls_inputs"]),
        "att_mean": stats["att_mean"], "att_std": stats["att_std"]}


def ls_fit_cfg(cfg: dict) -> dict | None:
    """The fit settings of the LS inputs (asl/ls_inputs.py), None for a network without them."""
    return dict(cfg["fit"]) if cfg["protocol_net"]["ls_inputs"] else None


def slab_target_stats(cfg: dict) -> dict:
    """Mean/std of CBF and ATT over brain voxels of the first training slabs (z-scoring of the targets)."""
    ds = BrainSlabDataset(1, int(cfg["seed"]), cfg["brain"], cfg["phantom"], cfg["protocol"], cfg["protocol_net"])
    cbf, att = [], []
    for i in range(int(cfg["train"]["target_stats_phantoms"])):
        item = ds[i]
        m = item["mask"].numpy()
        cbf.append(item["cbf"].numpy()[m])
        att.append(item["att"].numpy()[m])
    cbf, att = np.concatenate(cbf), np.concatenate(att)
    return {"cbf_mean": float(cbf.mean()), "cbf_std": float(cbf.std()), "att_mean": float(att.mean()),
            "att_std": float(att.std())}


def preprocessing_meta(cfg: dict, stats: dict) -> dict:
    """Everything predict/validate need: physics defaults (λ, α_BS1, tissue T1), the covered protocol range,
    input scaling (S_ref of each protocol), target statistics, the fit bounds."""
    return {"physics": dict(cfg["physics"]), "protocol_range": protocol_range(cfg["protocol"]),
            "input_scale": "protocol S_ref (asl.protocol.reference_scale)", "target_stats": dict(stats),
            "context_slices": int(cfg["protocol_net"]["context_slices"]), "fit": dict(cfg["fit"]),
            "brain": dict(cfg["brain"]),
            "ls_inputs": ("asl.ls_inputs.ls_input_channels with preprocessing.fit, nominal physics, tissue T1 from "
                          "the GM weight, σ pooled over the brain mask" if cfg["protocol_net"]["ls_inputs"] else None)}


@torch.no_grad()
def evaluate(model, val: dict, cfg: dict, stats: dict, device) -> dict:
    """Brain-mask MAE of CBF/ATT on the fixed validation slabs at each validation SNR."""
    model.eval()
    out, z = {}, []
    for snr in cfg["protocol_net"]["val_snrs"]:
        gen = torch.Generator(device=device).manual_seed(int(cfg["protocol_net"]["val_seed"]) + int(snr * 100))
        inputs = simulate_batch(val, device, gen, snr=float(snr), ls_fit_cfg=ls_fit_cfg(cfg))
        pred = model(inputs)
        m = inputs["mask"]
        cbf = pred["cbf"] * stats["cbf_std"] + stats["cbf_mean"]
        att = pred["att"] * stats["att_std"] + stats["att_mean"]
        mae_c = float((cbf - inputs["cbf"]).abs()[m].mean())
        mae_a = float((att - inputs["att"]).abs()[m].mean())
        out[f"val_cbf_mae_snr{snr:g}"], out[f"val_att_mae_snr{snr:g}"] = mae_c, mae_a
        z.append(mae_c / stats["cbf_std"] + mae_a / stats["att_std"])
    out["val_loss"] = float(np.mean(z))
    model.train()
    return out


@torch.no_grad()
def calibration_errors(model, cfg: dict, stats: dict, draws: int, device) -> dict:
    """Errors (estimate − true) and the log-variance heads' unscaled variances (physical units) of CBF and ATT over
    the brain voxels of the validation slabs' centre slices, ``draws`` noise draws each at SNRs log-uniform in
    ``protocol_net.snr_range`` (drawn from ``protocol_net.val_seed``); also the SNRs. ``cfg``: the config the model
    was trained with (its validation slabs)."""
    net = cfg["protocol_net"]
    val = validation_items(cfg["brain"], cfg["phantom"], cfg["protocol"], net)
    n_val = len(val["snr"])
    rng = np.random.default_rng([int(net["val_seed"]), 29])
    snrs = np.array([[log_uniform_snr(u, net["snr_range"]) for u in rng.uniform(size=n_val)] for _ in range(draws)])
    model.eval()
    out: dict = {"cbf_err": [], "cbf_var": [], "att_err": [], "att_var": []}
    for d in range(draws):
        gen = torch.Generator(device=device).manual_seed(int(net["val_seed"]) + 500 + d)
        inputs = simulate_batch({**val, "snr": torch.from_numpy(snrs[d]).float()}, device, gen,
                                ls_fit_cfg=ls_fit_cfg(cfg))
        pred = model(inputs)
        m = inputs["mask"]
        for key in ("cbf", "att"):
            std = stats[f"{key}_std"]
            est = pred[key] * std + stats[f"{key}_mean"]
            var = head_variance(pred[f"log_var_{key}"]) * std**2  # as predict_volume, before the scale
            out[f"{key}_err"].append((est - inputs[key])[m].double().cpu().numpy())
            out[f"{key}_var"].append(var[m].double().cpu().numpy())
    result = {k: np.concatenate(v) for k, v in out.items()}
    result["snrs"] = snrs
    return result


CALIBRATION_SECTIONS = ("brain", "phantom", "protocol", "protocol_net", "fit")


def calibration_config(ckpt: dict, source: Path) -> dict:
    """The config sections that define a checkpoint's validation slabs (its own config; keys added to the defaults
    since it was trained take their default). Refuses a checkpoint that is not a protocol-conditioned network."""
    if "protocol_range" not in (ckpt.get("preprocessing") or {}):
        raise CheckpointError(f"{source}: field 'preprocessing.protocol_range' is missing: not a protocol-conditioned "
                              "network (train_protocol_asl.py)")
    saved = ckpt.get("config") or {}
    missing = [k for k in CALIBRATION_SECTIONS if k not in saved]
    if missing:
        raise CheckpointError(f"{source}: field 'config' lacks {missing} (needed for its validation slabs)")
    return {k: {**DEFAULTS[k], **saved[k]} for k in CALIBRATION_SECTIONS}


def calibrate_checkpoint(source: Path, target: Path, draws: int, device, log) -> dict:
    """Fit the σ scale of the checkpoint ``source`` on its validation slabs (:func:`calibration_errors`) and write
    it with ``extra.sigma_scale`` to ``target`` (atomically). Returns the scale record (also logged): scales,
    voxels, SNR range and the coverage of the ±1.96 σ interval on those voxels before and after."""
    model, ckpt = load_model(source, device=device, expected_domain="asl")
    cfg = calibration_config(ckpt, source)
    err = calibration_errors(model, cfg, ckpt["preprocessing"]["target_stats"], draws, device)
    record = {"fitted_on": f"{len(err['cbf_err'])} brain voxels of {err['snrs'].shape[1]} validation slabs × {draws} "
                           f"noise draws, SNR {err['snrs'].min():.1f}-{err['snrs'].max():.1f}, val_seed "
                           f"{cfg['protocol_net']['val_seed']}",
              "method": "Laves et al. 2020 σ scaling: s² = mean(error² / σ²)", "draws": int(draws),
              "snr_range": [float(err["snrs"].min()), float(err["snrs"].max())]}
    for key in ("cbf", "att"):
        scale, n = sigma_scale(err[f"{key}_err"], err[f"{key}_var"])
        record[key], record[f"{key}_voxels"] = scale, n
        zero = np.zeros_like(err[f"{key}_err"])  # coverage() of the errors: estimate = error, truth = 0
        record[f"{key}_val_coverage95_before"] = coverage(err[f"{key}_err"], err[f"{key}_var"], zero)
        record[f"{key}_val_coverage95_after"] = coverage(err[f"{key}_err"], err[f"{key}_var"] * scale**2, zero)
    ckpt["extra"] = {**(ckpt.get("extra") or {}), "sigma_scale": record}
    atomic_torch_save(ckpt, target)
    log(f"σ scale (Laves et al. 2020) CBF {record['cbf']:.3f}, ATT {record['att']:.3f}, fitted on "
        f"{record['fitted_on']}; validation ±1.96σ coverage CBF {record['cbf_val_coverage95_before']:.1%} -> "
        f"{record['cbf_val_coverage95_after']:.1%}, ATT {record['att_val_coverage95_before']:.1%} -> "
        f"{record['att_val_coverage95_after']:.1%}; stored in {target}")
    return record


def calibrate_only(args, parser, argv: list[str] | None) -> dict:
    """``--calibrate CHECKPOINT``: the σ scale of an existing checkpoint, written to --output-dir (no training)."""
    sources = resolve_checkpoints(args.calibrate)
    if len(sources) != 1:
        parser.error(f"--calibrate {args.calibrate}: names {len(sources)} checkpoints; give one checkpoint file")
    if args.output_dir is None:
        parser.error("--calibrate needs --output-dir (a new folder: the source checkpoint is never overwritten)")
    if args.resume or args.stop_after_steps is not None:
        parser.error("--calibrate does not train: drop --resume / --stop-after-steps")
    if Path(args.output_dir).resolve() == sources[0].parent.resolve():
        parser.error(f"--output-dir {args.output_dir} is the folder of {sources[0]}; give a new folder")
    calibration_config(load_checkpoint(sources[0], expected_domain="asl"), sources[0])  # refuse before writing
    run = start_run(args, domain="asl", defaults=DEFAULTS, argv=argv, frozen=FROZEN)
    draws = int(run.cfg["train"]["calibration_draws"])
    if draws < 1:
        raise ConfigError(f"train.calibration_draws must be ≥ 1 with --calibrate, got {draws}")
    run.record_inputs_valid()
    record = calibrate_checkpoint(sources[0], run.run_dir / "checkpoint_best.pt", draws, run.device, run.log)
    return run.finish({"calibrated_from": str(sources[0]), "sigma_scale": record,
                       "headline": {"sigma_scale_cbf": record["cbf"], "sigma_scale_att": record["att"]}})


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, train=True)
    parser.add_argument("--calibrate", type=Path, default=None, metavar="CHECKPOINT",
                        help="do not train: fit the σ scale of this existing checkpoint (file or run folder) on its "
                             "validation slabs and write it with the scale to --output-dir/checkpoint_best.pt")
    args = parser.parse_args(argv)
    if args.calibrate is not None:
        return calibrate_only(args, parser, argv)
    run = start_run(args, domain="asl", defaults=DEFAULTS, argv=argv, frozen=FROZEN)
    cfg, device, tcfg = run.cfg, run.device, run.cfg["train"]
    if tcfg["loss"] not in LOSSES or tcfg["loss"] == "nll":
        raise ConfigError(f"train.loss must be one of {[x for x in LOSSES if x != 'nll']} here, got {tcfg['loss']!r}")
    if tcfg["dc_weight"] > 0:
        raise ConfigError("train.dc_weight > 0 is not supported by train_protocol_asl.py (the protocol varies)")
    stats = slab_target_stats(cfg)
    target, kwargs = model_kwargs(cfg, stats)
    seed = int(cfg["seed"])
    torch.manual_seed(seed)
    model = build_model(target, kwargs).to(device)
    if cfg["protocol_net"]["init_weights"] and not args.resume:
        warm_start(model, cfg["protocol_net"]["init_weights"], float(cfg["protocol_net"]["init_min_fraction"]),
                   log=run.log, expected_domain="asl")
    run.log(f"model {target} with {sum(p.numel() for p in model.parameters()):,} parameters; target statistics "
            + ", ".join(f"{k} {v:.1f}" for k, v in stats.items()))
    val = validation_items(cfg["brain"], cfg["phantom"], cfg["protocol"], cfg["protocol_net"])
    run.record_inputs_valid()
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    total_steps = int(tcfg["epochs"]) * int(tcfg["steps_per_epoch"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda_factory(int(tcfg["warmup_steps"]), total_steps))
    amp = amp_policy(device, cfg["runtime"]["amp"])
    state = resume_training(run, model, optimizer, scheduler, amp.scaler)
    saver = CheckpointSaver(run, model, optimizer, scheduler, amp.scaler, preprocessing=preprocessing_meta(cfg, stats))
    batch_size = int(tcfg["batch_size"])
    per_epoch = int(tcfg["steps_per_epoch"]) * batch_size
    sampler = ResumableSampler(EpochSampler(per_epoch))
    dataset = BrainSlabDataset(per_epoch, item_seed(seed, 17), cfg["brain"], cfg["phantom"], cfg["protocol"],
                               cfg["protocol_net"])
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=True,
                        **dataloader_kwargs(device, cfg["runtime"]["num_workers"], seed=seed))
    weights = {"cbf": float(tcfg["cbf_weight"]), "att": float(tcfg["att_weight"])}
    metrics: dict = {}
    with StopRequest(run) as stop:
        for epoch in range(state.epoch + 1, int(tcfg["epochs"]) + 1):
            sampler.set_epoch(epoch, skip_samples=state.batches_done * batch_size)
            model.train()
            for batch in progress(loader, desc=f"epoch {epoch}/{tcfg['epochs']}", is_main=run.is_main):
                inputs = simulate_batch(batch, device, step_generator(seed, state.step, 0, device),
                                        ls_fit_cfg=ls_fit_cfg(cfg))
                with amp.autocast():
                    out = model(inputs)
                loss = combine(task_losses(out, inputs, cfg, stats), cfg, weights, None)
                optimizer_step(loss, optimizer, amp, parameters=list(model.parameters()), grad_clip=tcfg["grad_clip"])
                scheduler.step()
                state.add(loss=float(loss.detach()), n=1)
                state.step, state.batches_done = state.step + 1, state.batches_done + 1
                if stop.check(state.step):
                    break
            if stop.stopped:
                saver.save_partial(state)
                break
            metrics = evaluate(model, val, cfg, stats, device)
            train_loss = state.mean("loss")
            state.end_epoch(epoch)
            saver.end_epoch(state, {"train_loss": train_loss, **metrics, "lr": scheduler.get_last_lr()[0]},
                            metric=metrics["val_loss"])
            run.log(f"epoch {epoch}: train_loss {train_loss:.4f}  " + "  ".join(
                f"{k[4:]} {v:.2f}" for k, v in metrics.items() if "_mae_" in k))
    summary = {"target_stats": stats, "model": target, "protocol_range": protocol_range(cfg["protocol"]),
               "epochs_completed": state.epoch, "best_val_loss": state.best_metric, "interrupted": stop.stopped}
    if not stop.stopped:
        summary["headline"] = {k: v for k, v in metrics.items() if "_mae_" in k}
        best = run.run_dir / "checkpoint_best.pt" if run.run_dir is not None else None
        draws = int(tcfg["calibration_draws"])
        if run.is_main and best is not None and best.is_file() and draws > 0:
            summary["sigma_scale"] = calibrate_checkpoint(best, best, draws, device, run.log)
        elif run.is_main:
            run.log("no σ scale fitted (train.calibration_draws 0, or no checkpoint_best.pt): σ scale 1")
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
