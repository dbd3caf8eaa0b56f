"""Train a dose-prediction model (3D U-Net, cascade, or conditional diffusion) on preprocessed NPZ cases.

    python vmat/train_vmat.py --config configs/vmat/baseline_unet.yaml --data data/vmat/npz
    python -m torch.distributed.run --nproc_per_node=2 vmat/train_vmat.py --config configs/vmat/smoke.yaml --data D

Patches are sampled per case (a configured share centred in high dose), augmented by left-right flips of
the patient's left-right axis with left/right channel swaps, small axial rotations and shifts, CT
intensity jitter. AdamW + cosine schedule, AMP on CUDA, gradient clipping, EMA weights. Every
``val.every_epochs`` the EMA model predicts the validation volumes whole (sliding window) and is scored
by the same code and settings as validate_vmat.py (vmat.evaluation.evaluate_case with the ``gamma``,
``dvh`` and ``constraints`` sections; gamma on a random subset of ``val.gamma_subset`` voxels): metrics.csv
gets validate_vmat's overall names prefixed ``val_`` (val_mae_body_gy, val_gamma_3_3_pass_pct,
val_openkbp_dvh_score ...); the best checkpoint follows ``val.best_metric``, one of those names or
train_loss (another name is an error at start-up). Voxels outside the reference RTDOSE grid (the NPZ
``dose_valid_mask``) never enter the loss or the metrics. DDP (torchrun), GPU cooling pauses.
Ctrl+C, SIGTERM or ``--stop-after-steps N`` stop after the current optimizer step with checkpoint_last.pt
recording the position inside the epoch; ``--resume`` then continues exactly where the run stopped (patch
order from (seed, epoch), diffusion noise from (seed, rank, step), optimizer / scheduler / EMA / loss-weight
/ RNG state from the checkpoint). The mean-dose atlas baseline is fitted on the training cases (atlas.json)
and scored on the validation cases for comparison; with ``input.atlas_channel`` it is also an input channel
(fitted on every rank) and, with ``model.residual_over_atlas``, the U-Net's additive base. Checkpoints carry
the input spec (with the atlas and ``grid_factor`` when used), patch size and atlas in ``preprocessing``. Config sections (vmat/defaults.py): data input patch augment model loss constraints
train val runtime.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, DistributedSampler

from common.checkpoint import apply_ema_weights, build_model, load_checkpoint, load_model
from common.cli import make_parser, start_run
from common.config import ConfigError
from common.ensembling import EMA
from common.errors import InputError, run_cli
from common.runlog import progress, write_json
from common.runtime import (
    CoolingPause,
    ResumableSampler,
    all_reduce_mean,
    amp_policy,
    barrier,
    dataloader_kwargs,
    optimizer_step,
    wrap_model,
)
from common.training import CheckpointSaver, StopRequest, TrainState, resume_training
from vmat.atlas import fit_atlas, predict_atlas
from vmat.case_io import list_cases, load_case
from vmat.data import PatchDataset, make_input_spec
from vmat.defaults import VMAT_DEFAULTS
from vmat.dvh import case_samples
from vmat.evaluation import VAL_METRIC_KEYS, evaluate_case, gamma_metric_keys, overall_metrics
from vmat.inference import EnsemblePredictor
from vmat.losses import DoseLoss

MODEL_TARGETS = {"unet": "vmat.models.UNet3D", "cascade": "vmat.models.CascadeUNet3D",
                 "diffusion": "vmat.models.DiffusionDoseModel"}

# Old names of ``val.best_metric`` (before training validation used vmat.evaluation): accepted with a warning.
DEPRECATED_BEST_METRICS = {"val_mae_gy": "val_mae_body_gy", "val_gamma_pass_pct": "val_gamma_3_3_pass_pct"}


def best_metric_names(cfg: dict) -> list[str]:
    """Metrics ``val.best_metric`` may name: the validation metrics this config logs, or the training loss."""
    keys = list(VAL_METRIC_KEYS) + (gamma_metric_keys(cfg["gamma"]["criteria"]) if cfg["val"]["gamma_subset"] else [])
    return [f"val_{k}" for k in keys] + ["train_loss"]


def check_training_config(cfg: dict) -> None:
    """Refuse settings that would otherwise be silently replaced (before anything is trained)."""
    vcfg = cfg["val"]
    if cfg["model"]["type"] not in MODEL_TARGETS:
        raise ConfigError(f"config: 'model.type' must be one of {', '.join(MODEL_TARGETS)}, got {cfg['model']['type']!r}")
    if vcfg["best_metric"] in DEPRECATED_BEST_METRICS:
        new = DEPRECATED_BEST_METRICS[vcfg["best_metric"]]
        print(f"[vmat] 'val.best_metric: {vcfg['best_metric']}' is deprecated: using {new} (the name validate_vmat "
              "reports)")
        vcfg["best_metric"] = new
    allowed = best_metric_names(cfg)
    if vcfg["best_metric"] not in allowed:
        hint = " ('val.gamma_subset' is 0: no gamma)" if "gamma" in str(vcfg["best_metric"]) else ""
        raise ConfigError(f"config: 'val.best_metric' must be one of {', '.join(allowed)}, "
                          f"got {vcfg['best_metric']!r}{hint}")
    if cfg["model"]["residual_over_atlas"] and not (cfg["model"]["type"] == "unet" and cfg["input"]["atlas_channel"]):
        raise ConfigError("config: 'model.residual_over_atlas' needs 'model.type: unet' and 'input.atlas_channel: true' "
                          f"(got type {cfg['model']['type']!r}, atlas_channel {cfg['input']['atlas_channel']!r})")
    if not isinstance(cfg["input"]["grid_factor"], int) or cfg["input"]["grid_factor"] < 1:
        raise ConfigError(f"config: 'input.grid_factor' must be a positive integer, got {cfg['input']['grid_factor']!r}")
    if vcfg["best_mode"] not in ("min", "max"):
        raise ConfigError(f"config: 'val.best_mode' must be min or max, got {vcfg['best_mode']!r}")
    if int(vcfg["every_epochs"]) < 1:
        raise ConfigError(f"config: 'val.every_epochs' must be >= 1, got {vcfg['every_epochs']!r}")


def split_cases(cfg: dict, seed: int) -> tuple[list[Path], list[Path]]:
    dcfg = cfg["data"]
    if not dcfg["train_dir"]:
        raise InputError("no training data: pass --data NPZ_DIR or set data.train_dir")
    train = list_cases(dcfg["train_dir"])
    if dcfg["val_dir"]:
        val = list_cases(dcfg["val_dir"])
    else:
        order = np.random.default_rng(seed).permutation(len(train))
        n_val = max(1, int(round(len(train) * float(dcfg["val_fraction"])))) if len(train) > 1 else 0
        val = sorted(train[i] for i in order[:n_val])
        train = sorted(train[i] for i in order[n_val:])
    if dcfg["max_val_cases"]:
        val = val[: int(dcfg["max_val_cases"])]
    if not train:
        raise InputError("no training cases (<case>.npz) in this folder", dcfg["train_dir"])
    return train, val


def model_spec_from_config(mcfg: dict, spec: dict) -> tuple[str, dict]:
    cond_dim = spec["cond_dim"] if mcfg["film"] else 0
    common_kw = {"channels": list(mcfg["channels"]), "cond_dim": cond_dim, "groups": int(mcfg["groups"]),
                 "blocks_per_level": int(mcfg["blocks_per_level"])}
    kind = mcfg["type"]
    if kind == "unet":
        if mcfg["residual_over_atlas"]:  # the atlas is the last input channel (vmat.data.build_inputs)
            common_kw["residual_input_channel"] = spec["n_channels"] - 1
        return MODEL_TARGETS[kind], {"in_channels": spec["n_channels"], "out_channels": 1, "dropout": float(mcfg["dropout"]),
                                     **common_kw}
    if kind == "cascade":
        return MODEL_TARGETS[kind], {"in_channels": spec["n_channels"], "out_channels": 1,
                                     "refine_channels": mcfg["refine_channels"], "dropout": float(mcfg["dropout"]), **common_kw}
    if kind == "diffusion":
        return MODEL_TARGETS[kind], {"in_channels": spec["n_channels"], "num_steps": int(mcfg["diffusion_steps"]),
                                     "schedule": mcfg["schedule"], "prediction": mcfg["prediction"],
                                     "dose_scale_max": float(mcfg["dose_scale_max"]),
                                     "sampling_steps": int(mcfg["sampling_steps"]), **common_kw}
    raise ConfigError(f"config: 'model.type' must be one of {', '.join(MODEL_TARGETS)}, got {kind!r}")


def dataset_info(train_paths: list[Path]) -> tuple[list[str], dict, float]:
    """Structure names, target doses and SDF clip from the data (preprocessing.json or the first case)."""
    info_path = train_paths[0].parent / "preprocessing.json"
    if info_path.is_file():
        info = json.loads(info_path.read_text(encoding="utf-8"))
        return info["structure_names"], info["target_doses_gy"], float(info["sdf_clip_mm"])
    case = load_case(train_paths[0])
    return case["structure_names"], case["meta"].get("target_doses_gy", {}), float(case["meta"].get("sdf_clip_mm", 50.0))


def val_gamma_config(cfg: dict, device) -> dict:
    """validate_vmat's gamma settings (the ``gamma`` section) on ``val.gamma_subset`` random voxels."""
    gamma = dict(cfg["gamma"], random_subset=int(cfg["val"]["gamma_subset"]) or None)
    if gamma["implementation"] == "torch":
        gamma["device"] = str(device)  # the search runs where the model does (same result to float tolerance)
    return gamma


def score_cases(doses: list, cases: list[dict], cfg: dict, device, seed: int) -> dict:
    """validate_vmat's overall metrics of ``doses`` on ``cases``, prefixed val_ (vmat.evaluation)."""
    rows = []
    for i, (dose, case) in enumerate(zip(doses, cases)):
        if "_dvh_samples" not in case:  # DVH sample points depend on the case only: computed once per run
            case["_dvh_samples"] = case_samples(case, cfg["dvh"])
        row, _ = evaluate_case(case, dose, val_gamma_config(cfg, device), cfg["constraints"],
                               compute_gamma_maps=bool(cfg["val"]["gamma_subset"]), seed=seed + i, dvh_cfg=cfg["dvh"],
                               samples=case["_dvh_samples"])
        rows.append(row)
    overall = overall_metrics(rows)
    keys = list(VAL_METRIC_KEYS) + (gamma_metric_keys(cfg["gamma"]["criteria"]) if cfg["val"]["gamma_subset"] else [])
    return {f"val_{k}": overall.get(k, float("nan")) for k in keys}


def validate(model, prep: dict, cases: list[dict], cfg: dict, device, seed: int) -> dict:
    """Whole-volume predictions of the validation cases, scored as validate_vmat.py scores them."""
    predictor = EnsemblePredictor(cfg=cfg["val"]["inference"], device=device, members=[(model, prep)])
    doses = [predictor.predict(case, seed=seed)["dose"] for case in cases]
    return score_cases(doses, cases, cfg, device, seed)


def evaluate(model, ema: EMA | None, prep: dict, cases: list[dict], cfg: dict, device) -> dict:
    """:func:`validate` with the EMA weights swapped in (when training keeps them)."""
    model.eval()
    if ema is None:
        return validate(model, prep, cases, cfg, device, cfg["seed"])
    with ema.applied(model):
        return validate(model, prep, cases, cfg, device, cfg["seed"])


def training_loss(ddp_model, loss_fn: DoseLoss, batch: dict, kind: str, generator: torch.Generator):
    """(loss, {term: value}) of one batch for the configured model type."""
    if kind == "diffusion":  # the model returns its own denoising loss (DDP sees a forward call)
        known = batch["body"] * batch["valid"]  # no loss where the reference dose is unknown
        loss = ddp_model(batch["input"], batch["cond"], batch["target"], known, generator=generator)
        return loss, {"diffusion": float(loss.detach())}
    if kind == "cascade":  # deep supervision: both stages against the reference
        parts = [loss_fn(stage.float(), batch) for stage in ddp_model(batch["input"], batch["cond"], return_stages=True)]
        return sum(p[0] for p in parts) / len(parts), parts[-1][1]
    return loss_fn(ddp_model(batch["input"], batch["cond"]).float(), batch)


def train_one_epoch(ddp_model, loader, optimizer, scheduler, amp, ema: EMA | None, loss_fn: DoseLoss,
                    state: TrainState, stop: StopRequest, cooling: CoolingPause, cfg: dict, device, rank: int,
                    is_main: bool) -> None:
    """One pass over the (remaining) batches of the epoch; running sums go to ``state.partial``."""
    tcfg = cfg["train"]
    memory_format = torch.channels_last_3d if tcfg["channels_last"] else torch.contiguous_format
    params = [p for group in optimizer.param_groups for p in group["params"]]
    ddp_model.train()
    for batch in progress(loader, desc=f"epoch {state.epoch + 1}", is_main=is_main):
        batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
        batch["input"] = batch["input"].contiguous(memory_format=memory_format)
        # Diffusion noise and timesteps from (seed, rank, step): the same after a resume, different per rank.
        generator = torch.Generator().manual_seed(int(cfg["seed"]) * 1_000_003 + rank * 100_003 + state.step)
        with amp.autocast():
            loss, terms = training_loss(ddp_model, loss_fn, batch, cfg["model"]["type"], generator)
        optimizer_step(loss, optimizer, amp, parameters=params, grad_clip=tcfg["grad_clip"])
        scheduler.step()
        if ema is not None:
            ema.update(ddp_model)
        state.add(loss=float(loss.detach()), n=1, **{f"term_{k}": v for k, v in terms.items()})
        state.step, state.batches_done = state.step + 1, state.batches_done + 1
        cooling.step()
        if stop.check(state.step):
            return


def epoch_means(state: TrainState, device) -> dict:
    """Training loss and loss terms of the epoch, averaged over every batch of every rank."""
    keys = ["loss"] + sorted(k for k in state.partial if k.startswith("term_"))
    count = state.partial.get("n", 0.0)
    means = all_reduce_mean([state.partial.get(k, 0.0) for k in keys], [count] * len(keys), device)
    return {("train_loss" if k == "loss" else "train_" + k[len("term_"):]): float(v) for k, v in zip(keys, means)}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, train=True, data=True)
    parser.add_argument("--val-data", type=Path, default=None, help="validation NPZ folder (overrides data.val_dir)")
    args = parser.parse_args(argv)
    if args.val_data is not None:  # a config key like --data, so a --resume checks it too
        args.set.append(f"data.val_dir={json.dumps(args.val_data.as_posix())}")
    run = start_run(args, domain="vmat", defaults=VMAT_DEFAULTS, argv=argv, data_key="data.train_dir")
    cfg, device, dist = run.cfg, run.device, run.dist
    tcfg, rcfg, pcfg, vcfg = cfg["train"], cfg["runtime"], cfg["patch"], cfg["val"]
    check_training_config(cfg)
    train_paths, val_paths = split_cases(cfg, cfg["seed"])
    names, target_doses, sdf_clip = dataset_info(train_paths)
    targets_present = {n: float(d) for n, d in target_doses.items() if n in names}
    # Every rank needs the atlas when it is an input channel; otherwise only rank 0 scores it.
    atlas = fit_atlas((load_case(p) for p in train_paths), targets_present) \
        if (run.is_main or cfg["input"]["atlas_channel"]) else None
    spec = make_input_spec(names, target_doses, cfg["input"], sdf_clip, atlas=atlas)
    val_cases = [load_case(p) for p in val_paths] if run.is_main else []
    run.log(f"[vmat] {len(train_paths)} training / {len(val_paths)} validation cases; channels {names}")

    dataset = PatchDataset([str(p) for p in train_paths], spec, pcfg["size"], pcfg["per_case_per_epoch"],
                           pcfg["high_dose_fraction"], pcfg["high_dose_threshold"], cfg["augment"], seed=cfg["seed"],
                           cache_mb=float(cfg["data"]["cache_mb"]))
    # Patch order from (seed, epoch) only; a resumed run skips the batches it already trained on.
    # The sampler hands each worker (epoch, index): patches are seeded by (seed, epoch, index) and the workers
    # stay alive across epochs, so their decoded-case caches (data.cache_mb) are reused instead of rebuilt. The
    # loader's own generator keeps iterator creation off the global RNG that the checkpoint restores.
    sampler = ResumableSampler(DistributedSampler(dataset, num_replicas=dist.world_size, rank=dist.rank, shuffle=True,
                                                  seed=cfg["seed"]), tag_epoch=True)
    loader_kw = dataloader_kwargs(device, rcfg["num_workers"], seed=cfg["seed"] + dist.rank, start_method="spawn")
    loader = DataLoader(dataset, batch_size=tcfg["batch_size"], sampler=sampler, drop_last=True, **loader_kw)
    steps_per_epoch = len(loader)
    if steps_per_epoch == 0:
        raise ConfigError(f"config: {len(dataset)} patches per epoch (per process) < 'train.batch_size' "
                          f"{tcfg['batch_size']}; raise 'patch.per_case_per_epoch'")

    target, kwargs = model_spec_from_config(cfg["model"], spec)
    model = build_model(target, kwargs).to(device)
    model = model.to(memory_format=torch.channels_last_3d if tcfg["channels_last"] else torch.contiguous_format)
    loss_fn = DoseLoss(cfg["loss"], spec, cfg["constraints"]).to(device)
    params = list(model.parameters()) + list(loss_fn.parameters())  # uncertainty weights are learned too
    optimizer = torch.optim.AdamW(params, lr=tcfg["lr"], weight_decay=tcfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=max(1, tcfg["epochs"] * steps_per_epoch))
    amp = amp_policy(device, rcfg["amp"])
    ema = EMA(model, tcfg["ema_decay"]) if tcfg["ema_decay"] > 0 else None
    state = resume_training(run, model, optimizer, scheduler, amp.scaler, ema=ema)
    if state.resumed_from is not None:
        loss_state = (load_checkpoint(state.resumed_from, expected_domain="vmat").get("extra") or {}).get("loss_state")
        if loss_state:
            loss_fn.load_state_dict(loss_state)
    prep = {"input_spec": spec, "patch_size": [int(v) for v in pcfg["size"]], "atlas": atlas,
            "model_type": cfg["model"]["type"]}
    saver = CheckpointSaver(run, model, optimizer, scheduler, amp.scaler, ema=ema, preprocessing=prep,
                            extra=lambda: {"loss_state": loss_fn.state_dict()}, metric_name=vcfg["best_metric"],
                            mode=vcfg["best_mode"])
    ddp_model = wrap_model(model, dist, device)
    cooling = CoolingPause(rcfg["cooling_every_steps"], rcfg["cooling_pause_s"])
    run.record_inputs_valid()
    if run.is_main:
        write_json(run.run_dir / "atlas.json", atlas)
        write_json(run.run_dir / "split.json", {"train": [p.stem for p in train_paths], "val": [p.stem for p in val_paths]})
    n_params = sum(p.numel() for p in model.parameters())
    run.log(f"[vmat] {target} with {n_params / 1e6:.2f} M parameters; {len(dataset)} patches/epoch")

    with StopRequest(run) as stop:
        for epoch in range(state.epoch + 1, tcfg["epochs"] + 1):
            sampler.set_epoch(epoch, skip_samples=state.batches_done * tcfg["batch_size"])
            dataset.set_epoch(epoch)
            train_one_epoch(ddp_model, loader, optimizer, scheduler, amp, ema, loss_fn, state, stop, cooling, cfg,
                            device, dist.rank, run.is_main)
            if stop.stopped:  # epoch unfinished: checkpoint_last records where to pick up
                saver.save_partial(state)
                break
            row = {**epoch_means(state, device), "lr": scheduler.get_last_lr()[0]}
            if (epoch % int(vcfg["every_epochs"]) == 0 or epoch == tcfg["epochs"]) and run.is_main and val_cases:
                row.update(evaluate(model, ema, prep, val_cases, cfg, device))
            state.end_epoch(epoch)
            saver.end_epoch(state, row, metric=row.get(vcfg["best_metric"]))
            run.log(f"epoch {epoch}: " + "  ".join(f"{k} {v:.4g}" for k, v in row.items() if isinstance(v, float)))
            barrier()

    summary: dict = {"epochs_completed": state.epoch, "interrupted": stop.stopped, "n_train": len(train_paths),
                     "n_val": len(val_paths), "n_parameters": n_params, "model": target}
    if run.is_main and not stop.stopped:
        ckpt_path = run.run_dir / ("checkpoint_best.pt" if (run.run_dir / "checkpoint_best.pt").is_file() else "checkpoint_last.pt")
        summary.update(final_evaluation(ckpt_path, val_cases, atlas, cfg, device, run))
    return run.finish(summary)


def final_evaluation(ckpt_path: Path, val_cases: list[dict], atlas: dict, cfg: dict, device, run) -> dict:
    """Rebuild the model from the checkpoint alone and score it and the atlas on the validation cases."""
    from common.plotting import plot_training_curves

    out: dict = {"checkpoint": ckpt_path.name}
    figures = []
    if (run.run_dir / "metrics.csv").is_file():
        figures = plot_training_curves(run.run_dir / "metrics.csv", run.run_dir / "figures" / "training_curves")
    if val_cases:
        model, ckpt = load_model(ckpt_path, device=device, expected_domain="vmat")
        if cfg["val"]["inference"]["use_ema"]:
            apply_ema_weights(model, ckpt)
        metrics = validate(model.eval(), ckpt["preprocessing"], val_cases, cfg, device, cfg["seed"])
        atlas_doses = [predict_atlas(atlas, case["masks"], case["structure_names"], case["spacing_mm"],
                                     case["possible_dose_mask"]) for case in val_cases]
        atlas_metrics = {"atlas_" + k: v for k, v in score_cases(atlas_doses, val_cases, cfg, device, cfg["seed"]).items()}
        gamma_key = "val_" + gamma_metric_keys(cfg["gamma"]["criteria"][:1])[0] if cfg["val"]["gamma_subset"] else None
        headline = {"val_mae_body_gy": metrics["val_mae_body_gy"], "atlas_val_mae_body_gy": atlas_metrics["atlas_val_mae_body_gy"],
                    "val_openkbp_dvh_score": metrics["val_openkbp_dvh_score"],
                    "atlas_val_openkbp_dvh_score": atlas_metrics["atlas_val_openkbp_dvh_score"]}
        if gamma_key:
            headline.update({gamma_key: metrics[gamma_key], "atlas_" + gamma_key: atlas_metrics["atlas_" + gamma_key]})
        out.update({"checkpoint_epoch": ckpt["epoch"], "val": metrics, "atlas_val": atlas_metrics, "headline": headline})
        run.log(f"[vmat] {ckpt_path.name} (epoch {ckpt['epoch']}) rebuilt from the checkpoint: val MAE "
                f"{metrics['val_mae_body_gy']:.2f} Gy vs atlas {atlas_metrics['atlas_val_mae_body_gy']:.2f} Gy; DVH score "
                f"{metrics['val_openkbp_dvh_score']:.2f} vs atlas {atlas_metrics['atlas_val_openkbp_dvh_score']:.2f}"
                + (f"; {gamma_key} {metrics[gamma_key]:.1f}%" if gamma_key else ""))
    out["figures"] = [str(p.relative_to(run.run_dir).as_posix()) for p in figures if p.suffix == ".png"]
    return out


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
