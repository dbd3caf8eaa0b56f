"""Train the conditional diffusion generator of ABR waveforms (trained AS diffusion: noised inputs,
v-prediction on a cosine schedule; the original trained its "diffusion" model as an autoencoder).

Conditions: age, intensity, stimulus rate (FiLM) and hearing-loss class; 10 % of the time they are
dropped for classifier-free guidance. EMA weights are kept for sampling; selection is on the validation
diffusion loss (fixed timesteps and noise, EMA weights). After training, DDIM samples for the
conditions of held-out recordings are compared with those recordings (abr/quality.py), next to the
real-vs-real reference.

Ctrl+C (or --stop-after-steps N) saves checkpoint_last.pt mid-epoch (weights, optimizer, EMA, RNG) and
``--resume`` continues exactly where it stopped.

Config sections used: seed, data (cache_dir), diffusion, runtime, classical (wave V picker for the quality
metrics). ``--data DIR`` is the preprocessing output (default data/abr/<config name>).

    python -m abr.train_diffusion_abr --config configs/abr/diffusion.yaml --data data/abr/diffusion
"""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from abr.dataset import CacheError, load_cache, training_cache_folder
from abr.defaults import abr_defaults
from abr.generator import RecordingDataset, condition_features, make_process, sample_waveforms, target_uv
from abr.quality import quality_report
from common.checkpoint import CheckpointError, apply_ema_weights, build_model, load_model
from common.cli import make_parser, start_run
from common.errors import run_cli
from common.ensembling import EMA
from common.runlog import progress
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

DEFAULTS = abr_defaults()
GENERATOR_TARGET = "abr.models.ABRDiffusionUNet"


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


def train_one_epoch(model, raw_model, loader, optimizer, amp, ema, process, state: TrainState, stop: StopRequest,
                    cooling, device, n_batches: int, epoch: int, dcfg: dict, is_main: bool) -> None:
    """The remaining batches of ``epoch``. Timesteps, noise and condition dropout come from the global RNG,
    which the checkpoint restores, so a resumed epoch draws what the uninterrupted one would have."""
    model.train()
    remaining = n_batches - state.batches_done
    for batch in progress(itertools.islice(loader, remaining), desc=f"epoch {epoch}", total=remaining, is_main=is_main):
        with amp.autocast():
            loss = diffusion_loss(model, process, batch, device, dcfg["p_uncond"])
        optimizer_step(loss, optimizer, amp, grad_clip=dcfg["grad_clip"])
        ema.update(raw_model)
        state.add(loss=float(loss.detach()), n=1)
        state.step, state.batches_done = state.step + 1, state.batches_done + 1
        cooling.step()
        if stop.check(state.step):
            return


def evaluate(model, ema, process, val_set, device, seed: int) -> tuple[float, int]:
    """Validation diffusion loss of the EMA weights (sum, count) on this rank's recordings."""
    with ema.applied(model):
        return validation_loss(model, process, val_set, device, seed=seed)


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, train=True, data=True)
    args = parser.parse_args(argv)
    run = start_run(args, domain="abr", defaults=DEFAULTS, argv=argv, data_key="data.cache_dir")
    cfg, device, dist = run.cfg, run.device, run.dist
    dcfg, rcfg = cfg["diffusion"], cfg["runtime"]
    data_dir = training_cache_folder(run)
    arrays, meta = load_cache(data_dir)
    train_rows, val_rows = split_rows(arrays, 0), split_rows(arrays, 1)
    if train_rows.size == 0 or val_rows.size < dist.world_size:
        raise CacheError(f"{train_rows.size} train / {val_rows.size} val recordings; the generator needs train "
                         f"recordings and at least one val recording per process ({dist.world_size})", data_dir)
    scale = float(np.quantile(np.abs(target_uv(arrays, train_rows, dcfg["target"])), 0.999))
    train_set = build_dataset(arrays, train_rows, meta, dcfg, scale)
    val_set = build_dataset(arrays, val_rows[dist.rank::dist.world_size], meta, dcfg, scale)
    run.log(f"{len(train_set)} train / {len(val_rows)} val recordings; target {dcfg['target']}, "
            f"data scale {scale * 1000:.1f} nV = 1")
    # Epoch order from (seed, epoch) only; the loader's own generator keeps the global RNG for the steps.
    sampler = ResumableSampler(DistributedSampler(train_set, num_replicas=dist.world_size, rank=dist.rank,
                                                  shuffle=True, seed=cfg["seed"]))
    loader = DataLoader(train_set, batch_size=dcfg["batch_size"], sampler=sampler,
                        drop_last=len(train_set) > dcfg["batch_size"],
                        **dataloader_kwargs(device, rcfg["num_workers"], seed=int(cfg["seed"]) + dist.rank,
                                            start_method="spawn" if rcfg["num_workers"] else None))
    n_batches = len(loader) if not dcfg["max_steps_per_epoch"] else min(len(loader), dcfg["max_steps_per_epoch"])
    kwargs = {"n_samples": int(meta["n_samples"]), "channels": list(dcfg["channels"]), "cond_dim": dcfg["cond_dim"],
              "static_dim": 3, "n_classes": len(meta["class_names"]), "dropout": 0.0}
    model = build_model("abr.models.ABRDiffusionUNet", kwargs).to(device)
    process = make_process(dcfg).to(device)
    ema = EMA(model, dcfg["ema_decay"])
    optimizer = torch.optim.AdamW(model.parameters(), lr=dcfg["lr"], weight_decay=dcfg["weight_decay"])
    amp = amp_policy(device, rcfg["amp"])
    state = resume_training(run, model, optimizer, None, amp.scaler, ema=ema)
    preprocessing = {**{k: meta[k] for k in ("n_samples", "model_rate_hz", "time_ms", "class_names", "static_mean",
                                             "static_std", "source_sampling_rate_hz", "window_ms", "pre_stimulus_ms")},
                     "data_scale_uv": scale, "target": dcfg["target"], "cache": Path(data_dir).as_posix(),
                     "condition_features": ["log_age_months", "intensity_01", "rate_per_50s"]}
    saver = CheckpointSaver(run, model, optimizer, None, amp.scaler, ema=ema, preprocessing=preprocessing,
                            metric_name="val_diffusion_loss_ema")
    ddp_model = wrap_model(model, dist, device)
    cooling = CoolingPause(rcfg["cooling_every_steps"], rcfg["cooling_pause_s"])
    run.record_inputs_valid()

    with StopRequest(run) as stop:
        for epoch in range(state.epoch + 1, dcfg["epochs"] + 1):
            sampler.set_epoch(epoch, skip_samples=state.batches_done * dcfg["batch_size"])
            train_one_epoch(ddp_model, model, loader, optimizer, amp, ema, process, state, stop, cooling, device,
                            n_batches, epoch, dcfg, run.is_main)
            if stop.stopped:  # epoch unfinished: checkpoint_last.pt records where to pick up
                saver.save_partial(state)
                break
            val_sum, val_n = evaluate(model, ema, process, val_set, device, seed=int(cfg["seed"]) + 99)
            train_loss, val_loss = all_reduce_mean([state.partial.get("loss", 0.0), val_sum],
                                                   [state.partial.get("n", 0.0), val_n], device)
            state.end_epoch(epoch)
            saver.end_epoch(state, {"train_loss": train_loss, "val_loss_ema": val_loss}, metric=val_loss)
            run.log(f"epoch {epoch}: train {train_loss:.4f}  val (EMA) {val_loss:.4f}")

    summary: dict = {"epochs_completed": state.epoch, "interrupted": stop.stopped,
                     "best_val_loss_ema": state.best_metric}
    if run.is_main and not stop.stopped:
        summary.update(evaluate_generator(run, cfg, arrays, meta, train_rows, val_rows, device))
    return run.finish(summary)


def load_generator(path, device):
    """The generator with its EMA weights (what sampling uses), its diffusion process and checkpoint.
    ``path``: a checkpoint file or run folder."""
    model, ckpt = load_model(path, device=device, expected_domain="abr")
    if ckpt["model"]["target"] != GENERATOR_TARGET:
        raise CheckpointError(f"{path}: holds {ckpt['model']['target']}, not the diffusion generator "
                              f"{GENERATOR_TARGET} (train one with abr.train_diffusion_abr)")
    if not apply_ema_weights(model, ckpt):
        raise CheckpointError(f"{path}: field 'extra.ema' missing: no EMA weights to sample with")
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
    raise SystemExit(run_cli(main))
