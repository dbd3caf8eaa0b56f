"""Train the conditional diffusion generator of ABR waveforms (trained AS diffusion: noised inputs,
v-prediction on a cosine schedule; the original trained its "diffusion" model as an autoencoder).

Conditions: age, intensity, stimulus rate (FiLM) and hearing-loss class; 10 % of the time they are
dropped for classifier-free guidance. EMA weights are kept for sampling; selection is on the validation
diffusion loss (fixed timesteps and noise, EMA weights). After training, DDIM samples for the
conditions of held-out recordings are compared with those recordings (abr/quality.py), next to the
real-vs-real reference.

Config sections used: seed, diffusion, runtime, classical (wave V picker for the quality metrics).

    python -m abr.train_diffusion_abr --config configs/abr/diffusion.yaml --data runs/abr/data/diffusion
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from abr.dataset import load_cache
from abr.defaults import abr_defaults
from abr.generator import RecordingDataset, condition_features, make_process, sample_waveforms, target_uv
from abr.quality import quality_report
from common.checkpoint import build_model, load_checkpoint, load_model, restore_training_state, save_checkpoint
from common.cli import make_parser, start_run
from common.ensembling import EMA
from common.runlog import progress
from common.runtime import (
    CoolingPause,
    GracefulInterrupt,
    all_reduce_mean,
    amp_policy,
    dataloader_kwargs,
    optimizer_step,
    wrap_model,
)

DEFAULTS = abr_defaults()


def split_rows(arrays: dict, split: int) -> np.ndarray:
    return np.flatnonzero(arrays["series_split"][arrays["series_of_row"]] == split)


def build_dataset(arrays: dict, rows: np.ndarray, meta: dict, dcfg: dict, scale: float) -> RecordingDataset:
    x = target_uv(arrays, rows, dcfg["target"]) / scale
    cond = condition_features(arrays["age_years"][rows], arrays["intensity_db"][rows], arrays["rate_per_s"][rows], meta)
    return RecordingDataset(x, cond, arrays["class_idx"][rows])


def diffusion_loss(model, process, batch, device, p_uncond: float, generator=None) -> torch.Tensor:
    x0 = batch["x"].to(device)
    cond = batch["cond"].to(device)
    cls = batch["class_idx"].to(device)
    if p_uncond > 0:
        drop = torch.rand(cls.shape, generator=generator).to(device) < p_uncond
        cls = torch.where(drop, torch.full_like(cls, -1), cls)
    return process.training_loss(lambda x, t: model(x, t, cond, cls), x0, generator=generator)


@torch.no_grad()
def validation_loss(model, process, dataset, device, seed: int) -> tuple[float, int]:
    """Mean diffusion loss over the validation recordings with fixed timesteps/noise (seeded)."""
    model.eval()
    generator = torch.Generator().manual_seed(seed)
    total, count = 0.0, 0
    for batch in DataLoader(dataset, batch_size=256, shuffle=False):
        n = batch["x"].shape[0]
        total += float(diffusion_loss(model, process, batch, device, 0.0, generator)) * n
        count += n
    return total, count


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, train=True)
    parser.add_argument("--data", type=Path, required=True, help="preprocessing output folder (abr_cache.npz)")
    args = parser.parse_args(argv)
    run = start_run(args, domain="abr", defaults=DEFAULTS, argv=argv)
    cfg, device, dist = run.cfg, run.device, run.dist
    dcfg, rcfg = cfg["diffusion"], cfg["runtime"]
    arrays, meta = load_cache(args.data)
    train_rows, val_rows = split_rows(arrays, 0), split_rows(arrays, 1)
    scale = float(np.quantile(np.abs(target_uv(arrays, train_rows, dcfg["target"])), 0.999))
    train_set = build_dataset(arrays, train_rows, meta, dcfg, scale)
    val_set = build_dataset(arrays, val_rows[dist.rank::dist.world_size], meta, dcfg, scale)
    run.log(f"{len(train_set)} train / {len(val_rows)} val recordings; target {dcfg['target']}, "
            f"data scale {scale * 1000:.1f} nV = 1")
    sampler = DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank, shuffle=True, seed=cfg["seed"])
    loader = DataLoader(train_set, batch_size=dcfg["batch_size"], sampler=sampler, drop_last=len(train_set) > dcfg["batch_size"],
                        **dataloader_kwargs(device, rcfg["num_workers"], start_method="spawn" if rcfg["num_workers"] else None))
    kwargs = {"n_samples": int(meta["n_samples"]), "channels": list(dcfg["channels"]), "cond_dim": dcfg["cond_dim"],
              "static_dim": 3, "n_classes": len(meta["class_names"]), "dropout": 0.0}
    model = build_model("abr.models.ABRDiffusionUNet", kwargs).to(device)
    process = make_process(dcfg).to(device)
    ema = EMA(model, dcfg["ema_decay"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=dcfg["lr"], weight_decay=dcfg["weight_decay"])
    amp = amp_policy(device, rcfg["amp"])
    start_epoch, step, best = 1, 0, math.inf
    if run.resume_from is not None:
        ckpt = load_checkpoint(run.resume_from, expected_domain="abr")
        state = restore_training_state(ckpt, model, optimizer, None, amp.scaler)
        ema.load_state_dict(ckpt["extra"]["ema"])
        start_epoch, step = state["epoch"] + 1, state["step"]
        best = state["best_metric"] if state["best_metric"] is not None else math.inf
    ddp_model = wrap_model(model, dist, device)
    cooling = CoolingPause(rcfg["cooling_every_steps"], rcfg["cooling_pause_s"])
    preprocessing = {**{k: meta[k] for k in ("n_samples", "model_rate_hz", "time_ms", "class_names", "static_mean",
                                             "static_std", "source_sampling_rate_hz", "window_ms", "pre_stimulus_ms")},
                     "data_scale_uv": scale, "target": dcfg["target"], "cache": Path(args.data).as_posix(),
                     "condition_features": ["log_age_months", "intensity_01", "rate_per_50s"]}

    def save(name: str, epoch: int) -> None:
        if run.is_main:
            save_checkpoint(run.run_dir / name, model, domain="abr", config=cfg, optimizer=optimizer, scaler=amp.scaler,
                            epoch=epoch, step=step, best_metric=best, best_metric_name="val_diffusion_loss_ema",
                            preprocessing=preprocessing, extra={"ema": ema.state_dict()})

    n_batches = len(loader) if not dcfg["max_steps_per_epoch"] else min(len(loader), dcfg["max_steps_per_epoch"])
    epoch = start_epoch - 1
    with GracefulInterrupt() as interrupt:
        for epoch in range(start_epoch, dcfg["epochs"] + 1):
            sampler.set_epoch(epoch)
            ddp_model.train()
            loss_sum, seen = 0.0, 0
            for i, batch in enumerate(progress(loader, desc=f"epoch {epoch}", total=n_batches, is_main=run.is_main)):
                if i >= n_batches:
                    break
                with amp.autocast():
                    loss = diffusion_loss(ddp_model, process, batch, device, dcfg["p_uncond"])
                optimizer_step(loss, optimizer, amp, grad_clip=dcfg["grad_clip"])
                ema.update(model)
                loss_sum, seen, step = loss_sum + float(loss.detach()), seen + 1, step + 1
                cooling.step()
                if interrupt.requested:
                    break
            with ema.applied(model):
                val_sum, val_n = validation_loss(model, process, val_set, device, seed=int(cfg["seed"]) + 99)
            train_loss, val_loss = all_reduce_mean([loss_sum, val_sum], [seen, val_n], device)
            run.logger.log_metrics({"epoch": epoch, "step": step, "train_loss": train_loss, "val_loss_ema": val_loss})
            run.log(f"epoch {epoch}: train {train_loss:.4f}  val (EMA) {val_loss:.4f}")
            if val_loss < best:
                best = float(val_loss)
                save("checkpoint_best.pt", epoch)
            save("checkpoint_last.pt", epoch)
            if interrupt.requested:
                run.log(f"stopped by the user after epoch {epoch}; resume with --resume {run.run_dir}")
                break

    summary: dict = {"epochs_completed": epoch, "interrupted": interrupt.requested, "best_val_loss_ema": best}
    if run.is_main:
        summary.update(evaluate_generator(run, cfg, arrays, meta, train_rows, val_rows, device))
    return run.finish(summary)


def load_generator(path, device):
    """The generator with its EMA weights (what sampling uses), its diffusion process and checkpoint."""
    model, ckpt = load_model(path, device=device, expected_domain="abr")
    ema = EMA(model)
    ema.load_state_dict(ckpt["extra"]["ema"])
    ema.copy_to(model)
    dcfg = ckpt["config"]["diffusion"]
    return model.eval(), make_process(dcfg).to(device), ckpt


def evaluate_generator(run, cfg, arrays, meta, train_rows, val_rows, device) -> dict:
    """Sample for the conditions of held-out recordings and compare (quality metrics + figure)."""
    from abr.figures import generated_vs_real

    model, process, ckpt = load_generator(run.run_dir / "checkpoint_best.pt", device)
    dcfg = cfg["diffusion"]
    pre = ckpt["preprocessing"]
    rng = np.random.default_rng(int(cfg["seed"]))
    rows = rng.choice(val_rows, size=min(int(dcfg["eval_samples"]), val_rows.size), replace=False)
    cond = condition_features(arrays["age_years"][rows], arrays["intensity_db"][rows], arrays["rate_per_s"][rows], pre)
    generated = sample_waveforms(model, process, cond, arrays["class_idx"][rows], dcfg["sampling_steps"],
                                 dcfg["guidance_scale"], dcfg["clip_x0"], device, seed=int(cfg["seed"])) * pre["data_scale_uv"]
    real = target_uv(arrays, rows, dcfg["target"])
    train_real = target_uv(arrays, train_rows, dcfg["target"])
    t_ms = np.asarray(meta["time_ms"])
    report = quality_report(generated, real, arrays["intensity_db"][rows], train_real, t_ms, meta["model_rate_hz"],
                            cfg["classical"], seed=int(cfg["seed"]))
    figures = generated_vs_real(generated, real, arrays["intensity_db"][rows], t_ms, run.run_dir / "figures" / "generated_vs_real")
    g, r = report["generated_vs_real"], report["real_vs_real"]
    run.log(f"quality (generated vs real | real vs real): condition-mean r {g['condition_mean_r']:.3f} | "
            f"{r.get('condition_mean_r', float('nan')):.3f}; PSD distance {g['psd_log_distance_db']:.2f} | "
            f"{r.get('psd_log_distance_db', float('nan')):.2f} dB; wave V latency shift "
            f"{g['wave_v_latency_shift_ms']:.3f} | {r.get('wave_v_latency_shift_ms', float('nan')):.3f} ms")
    headline = {"generated_condition_mean_r": g["condition_mean_r"], "real_vs_real_condition_mean_r": r.get("condition_mean_r"),
                "generated_psd_distance_db": g["psd_log_distance_db"], "real_vs_real_psd_distance_db": r.get("psd_log_distance_db"),
                "generated_wave_v_latency_shift_ms": g["wave_v_latency_shift_ms"],
                "real_vs_real_wave_v_latency_shift_ms": r.get("wave_v_latency_shift_ms"),
                "generated_nearest_train_r": g["nearest_train_r"], "real_nearest_train_r": r.get("nearest_train_r")}
    return {"quality": report, "quality_summary": headline, "best_epoch": ckpt["epoch"],
            "figures": [p.relative_to(run.run_dir).as_posix() for p in figures if p.suffix == ".png"]}


if __name__ == "__main__":
    main()
