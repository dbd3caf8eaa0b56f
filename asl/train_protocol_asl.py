"""Train a protocol-conditioned CBF/ATT network (asl/protocol_net.py) on slabs of 3D brain subjects
(asl/brain_volume.py) acquired with randomized protocols (asl/protocol.py: PCASL, VSASL or both, 1-8 PLDs,
labeling duration, blood T1, background suppression). One model; its checkpoint records the protocol range it
covers (``preprocessing.protocol_range``), which predict_asl.py checks before using it.

Loss: L1 (or the configured ``train.loss``) on z-scored CBF and ATT of the centre slice over the brain mask,
+ variance_weight × Gaussian NLL of the log-variance heads (as train_asl.py). Validation: brain-mask MAE on
fixed slabs of the ``protocol_net.val_seed`` family at ``protocol_net.val_snrs``.
Ctrl+C / SIGTERM / --stop-after-steps stop cleanly mid-epoch; --resume continues exactly (the slabs, protocols
and noise of step k depend only on (seed, epoch, k)).

    python asl/train_protocol_asl.py --config configs/asl/protocol_general.yaml --output-dir runs/asl/general
    python asl/train_protocol_asl.py --config configs/asl/protocol_smoke.yaml --output-dir runs/asl/psmoke --resume
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader

from asl.defaults import defaults
from asl.protocol import protocol_range
from asl.protocol_data import BrainSlabDataset, simulate_batch, validation_items
from asl.simulate import EpochSampler, item_seed
from asl.train_asl import LOSSES, combine, lr_lambda_factory, step_generator, task_losses
from common.checkpoint import build_model, warm_start
from common.cli import FROZEN_ON_RESUME, make_parser, start_run
from common.config import ConfigError
from common.errors import run_cli
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


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, train=True)
    args = parser.parse_args(argv)
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
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
