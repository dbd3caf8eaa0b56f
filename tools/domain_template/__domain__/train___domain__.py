"""Train the __domain__ model (resumable mid-epoch; Ctrl+C saves and stops cleanly).

    python __domain__/train___domain__.py --config configs/__domain__/smoke.yaml --output-dir runs/__domain__/smoke
    python __domain__/train___domain__.py --config configs/__domain__/smoke.yaml --output-dir runs/__domain__/smoke --resume
"""

from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from __domain__.data import ArrayDataset, load_split
from __domain__.defaults import defaults
from common.checkpoint import build_model
from common.cli import make_parser, start_run
from common.errors import run_cli
from common.losses import masked_mse
from common.runlog import progress
from common.runtime import ResumableSampler, all_reduce_mean, amp_policy, dataloader_kwargs, optimizer_step, wrap_model
from common.training import CheckpointSaver, StopRequest, TrainState, resume_training


def train_one_epoch(model, loader, optimizer, amp, state: TrainState, stop: StopRequest, device, tcfg,
                    is_main: bool) -> None:
    model.train()
    for batch in progress(loader, desc=f"epoch {state.epoch + 1}", is_main=is_main):
        with amp.autocast():
            loss = masked_mse(model(batch["input"].to(device)).float(), batch["target"].to(device))
        optimizer_step(loss, optimizer, amp, grad_clip=tcfg["grad_clip"])
        state.add(loss=loss.item(), n=1)
        state.step, state.batches_done = state.step + 1, state.batches_done + 1
        if stop.check(state.step):
            return


@torch.no_grad()
def evaluate(model, loader, device) -> dict:
    """Mean squared error over this rank's share, reduced exactly over ranks."""
    model.eval()
    sq, n = 0.0, 0
    for batch in loader:
        pred = model(batch["input"].to(device)).float().cpu()
        sq += float(((pred - batch["target"]) ** 2).sum())
        n += pred.numel()
    (val_mse,) = all_reduce_mean([sq], [n], device)
    return {"val_mse": float(val_mse)}


def main(argv: list[str] | None = None) -> dict:
    args = make_parser(__doc__, train=True, data=True).parse_args(argv)
    run = start_run(args, domain="__domain__", defaults=defaults(), argv=argv, data_key="data.dir")
    cfg, device, dist = run.cfg, run.device, run.dist
    tcfg, dcfg = cfg["train"], cfg["data"]
    train_set = ArrayDataset(load_split(dcfg["dir"], "train", dcfg, cfg["seed"]))
    val_set = ArrayDataset(load_split(dcfg["dir"], "val", dcfg, cfg["seed"]))
    run.record_inputs_valid()
    sampler = ResumableSampler(DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank,
                                                  shuffle=True, seed=cfg["seed"]))
    loader_kw = dataloader_kwargs(device, cfg["runtime"]["num_workers"], seed=cfg["seed"] + dist.rank)
    train_loader = DataLoader(train_set, batch_size=tcfg["batch_size"], sampler=sampler, drop_last=True, **loader_kw)
    val_loader = DataLoader(val_set, batch_size=256, sampler=DistributedSampler(
        val_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=False), **loader_kw)

    n_features = int(train_set.x.shape[1])
    model = build_model("__domain__.models.__Domain__Net", {"n_features": n_features, **cfg["model"]}).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tcfg["epochs"])
    amp = amp_policy(device, cfg["runtime"]["amp"])
    state = resume_training(run, model, optimizer, scheduler, amp.scaler)
    saver = CheckpointSaver(run, model, optimizer, scheduler, amp.scaler, metric_name="val_mse",
                            preprocessing={"n_features": n_features, "target_mean": float(np.mean(train_set.y))})
    ddp_model = wrap_model(model, dist, device)
    with StopRequest(run) as stop:
        for epoch in range(state.epoch + 1, tcfg["epochs"] + 1):
            sampler.set_epoch(epoch, skip_samples=state.batches_done * tcfg["batch_size"])
            train_one_epoch(ddp_model, train_loader, optimizer, amp, state, stop, device, tcfg, run.is_main)
            if stop.stopped:
                saver.save_partial(state)
                break
            scheduler.step()
            metrics = evaluate(model, val_loader, device)
            (train_loss,) = all_reduce_mean([state.partial.get("loss", 0.0)], [state.partial.get("n", 0.0)], device)
            state.end_epoch(epoch)
            saver.end_epoch(state, {"train_loss": train_loss, **metrics, "lr": scheduler.get_last_lr()[0]},
                            metric=metrics["val_mse"])
            run.log(f"epoch {epoch}: train_loss {train_loss:.4f}  val_mse {metrics['val_mse']:.4f}")
    return run.finish({"epochs_completed": state.epoch, "interrupted": stop.stopped, "best_val_mse": state.best_metric,
                       "headline": {"best_val_mse": state.best_metric}})


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
