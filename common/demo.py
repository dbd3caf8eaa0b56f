"""End-to-end demo of the common library on a tiny regression task.

Config → run folder → training (DDP-aware, AMP on CUDA, progress bars, Ctrl+C-safe, resumable) →
checkpoints → a model rebuilt from checkpoint_best.pt alone → whole-set metrics against a baseline →
figures and summary.json. It is also the reference training loop the domain scripts follow.

    python -m common.demo --config configs/common/demo.yaml
    python -m torch.distributed.run --standalone --nproc_per_node=2 -m common.demo --config configs/common/demo.yaml
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn as nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from common.checkpoint import build_model, load_model, register_model
from common.cli import make_parser, start_run
from common.losses import masked_mse
from common.errors import run_cli
from common.metrics import regression_metrics
from common.runlog import progress
from common.runtime import (
    RUNTIME_DEFAULTS,
    CoolingPause,
    ResumableSampler,
    all_reduce_mean,
    amp_policy,
    dataloader_kwargs,
    optimizer_step,
    wrap_model,
)
from common.training import CheckpointSaver, StopRequest, TrainState, resume_training

DEFAULTS = {
    "seed": 0,
    "data": {"n_train": 2048, "n_val": 256, "n_features": 8, "noise_std": 0.1},
    "model": {"hidden": [64, 64], "dropout": 0.0},
    "train": {"epochs": 20, "batch_size": 32, "lr": 1e-2, "weight_decay": 1e-4, "grad_clip": 1.0},
    "runtime": dict(RUNTIME_DEFAULTS),
}


class SineSumDataset(Dataset):
    """y = Σ_i w_i·sin(x_i) + ε with fixed w (from ``seed``); x ~ U(−π, π)^d, ε ~ N(0, noise_std²).

    Module-level so DataLoader workers can pickle it under the spawn start method.
    """

    def __init__(self, n: int, n_features: int, noise_std: float, seed: int):
        rng = np.random.default_rng(seed)
        weights = np.random.default_rng(12345).normal(size=n_features)  # the task is the same for every split
        self.x = rng.uniform(-math.pi, math.pi, size=(n, n_features)).astype(np.float32)
        clean = np.sin(self.x) @ weights
        self.y = (clean + rng.normal(scale=noise_std, size=n)).astype(np.float32)[:, None]

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, index: int) -> dict:
        return {"input": torch.from_numpy(self.x[index]), "target": torch.from_numpy(self.y[index])}


@register_model
class TinyRegressor(nn.Module):
    """MLP: Linear-SiLU(-Dropout) blocks and a linear output."""

    def __init__(self, n_features: int, hidden: list[int], dropout: float = 0.0):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.SiLU()]
            if dropout > 0:
                layers.append(nn.Dropout(dropout))
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


@torch.no_grad()
def predict(model: nn.Module, loader: DataLoader, device: torch.device) -> tuple[np.ndarray, np.ndarray]:
    model.eval()
    preds, targets = [], []
    for batch in loader:
        preds.append(model(batch["input"].to(device)).float().cpu().numpy())
        targets.append(batch["target"].numpy())
    return np.concatenate(preds).ravel(), np.concatenate(targets).ravel()


def weight_spread_across_ranks(model: nn.Module) -> float:
    """max over parameters of (max over ranks − min over ranks); 0.0 when all ranks agree."""
    import torch.distributed as tdist

    flat = torch.cat([p.detach().float().ravel() for p in model.parameters()])  # on the DDP device (nccl: CUDA)
    high, low = flat.clone(), flat.clone()
    tdist.all_reduce(high, op=tdist.ReduceOp.MAX)
    tdist.all_reduce(low, op=tdist.ReduceOp.MIN)
    return float((high - low).max())


def train_one_epoch(model, loader, optimizer, amp, state: TrainState, stop: StopRequest, cooling, device,
                    tcfg: dict, is_main: bool) -> None:
    """One pass over the (remaining) batches of the epoch; running sums go to ``state.partial``."""
    model.train()
    for batch in progress(loader, desc=f"epoch {state.epoch + 1}", is_main=is_main):
        with amp.autocast():
            pred = model(batch["input"].to(device, non_blocking=True))
            loss = masked_mse(pred.float(), batch["target"].to(device))
        optimizer_step(loss, optimizer, amp, grad_clip=tcfg["grad_clip"])
        state.add(loss=loss.item(), n=1)
        state.step, state.batches_done = state.step + 1, state.batches_done + 1
        cooling.step()
        if stop.check(state.step):
            return


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, train=True)
    args = parser.parse_args(argv)
    run = start_run(args, domain="common", defaults=DEFAULTS, argv=argv)
    cfg, device, dist = run.cfg, run.device, run.dist
    dcfg, tcfg, rcfg = cfg["data"], cfg["train"], cfg["runtime"]

    train_set = SineSumDataset(dcfg["n_train"], dcfg["n_features"], dcfg["noise_std"], seed=cfg["seed"])
    val_set = SineSumDataset(dcfg["n_val"], dcfg["n_features"], dcfg["noise_std"], seed=cfg["seed"] + 10_000)
    # DistributedSampler also in a single process: shuffling depends only on (seed, epoch), so a resumed
    # run sees exactly the batches an uninterrupted one would (ResumableSampler skips those already done).
    sampler = ResumableSampler(DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank,
                                                  shuffle=True, seed=cfg["seed"]))
    # The loaders get their own generator so creating an iterator never draws from the global RNG
    # (which the checkpoint restores for dropout): resuming mid-epoch is then exact.
    loader_kw = dataloader_kwargs(device, rcfg["num_workers"], seed=cfg["seed"] + dist.rank)
    train_loader = DataLoader(train_set, batch_size=tcfg["batch_size"], sampler=sampler, drop_last=True, **loader_kw)
    val_sampler = DistributedSampler(val_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=False)
    val_loader = DataLoader(val_set, batch_size=256, sampler=val_sampler, **loader_kw)

    model = build_model("common.demo.TinyRegressor", {"n_features": dcfg["n_features"], **cfg["model"]}).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=tcfg["epochs"])
    amp = amp_policy(device, rcfg["amp"])
    state = resume_training(run, model, optimizer, scheduler, amp.scaler)
    saver = CheckpointSaver(run, model, optimizer, scheduler, amp.scaler, metric_name="val_mse")
    ddp_model = wrap_model(model, dist, device)
    cooling = CoolingPause(rcfg["cooling_every_steps"], rcfg["cooling_pause_s"])
    run.record_inputs_valid()

    with StopRequest(run) as stop:
        for epoch in range(state.epoch + 1, tcfg["epochs"] + 1):
            sampler.set_epoch(epoch, skip_samples=state.batches_done * tcfg["batch_size"])
            train_one_epoch(ddp_model, train_loader, optimizer, amp, state, stop, cooling, device, tcfg, run.is_main)
            if stop.stopped:  # epoch unfinished: checkpoint_last records where to pick up
                saver.save_partial(state)
                break
            scheduler.step()
            # Exact global means over all ranks: sums and counts are reduced, not per-rank means.
            pred, target = predict(model, val_loader, device)
            val_mse, train_loss = all_reduce_mean([np.sum((pred - target) ** 2), state.partial.get("loss", 0.0)],
                                                  [pred.size, state.partial.get("n", 0.0)], device)
            state.end_epoch(epoch)
            saver.end_epoch(state, {"train_loss": train_loss, "val_mse": val_mse, "lr": scheduler.get_last_lr()[0]},
                            metric=val_mse)
            run.log(f"epoch {epoch}: train_loss {train_loss:.4f}  val_mse {val_mse:.4f}")
    epoch, stopped = state.epoch, stop.stopped

    summary: dict = {"epochs_completed": epoch, "interrupted": stopped}
    if dist.enabled:  # DDP must keep every rank's weights identical; measure it instead of assuming it
        summary["ddp_max_weight_spread"] = weight_spread_across_ranks(model)
    if run.is_main and not stopped:
        # Validation rebuilds the model from the checkpoint alone (no class named here).
        rebuilt, ckpt = load_model(run.run_dir, device=device, expected_domain="common")
        full_val = DataLoader(val_set, batch_size=256)
        pred, target = predict(rebuilt, full_val, device)
        model_metrics = regression_metrics(pred, target)
        baseline = regression_metrics(np.full_like(target, train_set.y.mean()), target)
        from common.plotting import plot_training_curves

        figures = plot_training_curves(run.run_dir / "metrics.csv", run.run_dir / "figures" / "training_curves")
        summary.update({
            "checkpoint_epoch": ckpt["epoch"],
            "val": model_metrics,
            "baseline_mean_predictor": baseline,
            "headline": {"val_mae": model_metrics["mae"], "val_r2": model_metrics["r2"],
                         "baseline_mae": baseline["mae"]},
            "figures": [str(p.relative_to(run.run_dir).as_posix()) for p in figures if p.suffix == ".png"],
        })
        run.log(f"rebuilt {ckpt['model']['target']} from checkpoint (epoch {ckpt['epoch']}): "
                f"MAE {model_metrics['mae']:.4f} vs mean-predictor {baseline['mae']:.4f}, R² {model_metrics['r2']:.3f}")
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
