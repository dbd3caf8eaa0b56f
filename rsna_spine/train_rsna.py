"""Train the two-stage lumbar spine grader on the preprocessed cache, fold by fold.

For each fold of train.train_folds (StratifiedGroupKFold by study, folds.csv from preprocess_rsna.py):
  stage 1: heatmap localizers for the sagittal T2 (spinal canal), sagittal T1 (foramina) and axial T2
           (subarticular, on the slice of the level) points;
  stage 2: the v9 classifier (EfficientNet-V2 per slice → BiGRU → attention-MIL → level and condition
           embeddings → MLP) for all 25 targets, or one per condition group; competition-weighted
           cross-entropy, two learning-rate groups (backbone / rest), warmup + cosine, AMP on CUDA,
           gradient clipping, stage-1-like jitter of slice and centre, SWA that is BN-updated, evaluated
           and saved, dead-class monitoring with the minimum-minority-recall gate on the best checkpoint;
           with ``model.second_view`` the spinal and subarticular targets also see the other series' crop
           at the same patient point (sagittal + axial fusion, rsna_spine/fusion.py).
Validation each epoch uses the held-out fold with crops centred by this fold's stage 1 (as at test time).

Each model is one job, trained in its folder <run>/fold{f}/{localizer_<series>, classifier_<group>}/:
checkpoint_best.pt (+ the classifier's checkpoint_last.pt and checkpoint_swa.pt) and done.json. One
metrics.csv with a ``job`` column. ensemble.json (common.checkpoint.write_ensemble_manifest) lists every
finished model with its fold, stage and series / group; validate_rsna.py and predict_rsna.py take the run
folder as ``--checkpoint``. <run>/checkpoint_last.pt holds the model in training (tagged with its job), also
when stopped in the middle of an epoch (Ctrl+C, SIGTERM, --stop-after-steps N, which counts the optimizer steps
of the job in training): --resume continues that job exactly where it stopped and skips the finished ones.
DDP: torchrun, rank 0 writes.

    python -m rsna_spine.train_rsna --config configs/rsna_spine/smoke.yaml --output-dir runs/x/train
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler

from common.checkpoint import build_model, load_checkpoint, load_model, save_checkpoint, write_ensemble_manifest
from common.cli import make_parser, start_run
from common.ensembling import SWA
from common.errors import InputError, run_cli
from common.losses import weighted_cross_entropy
from common.runfolder import trim_metrics
from common.runlog import progress, write_json
from common.runtime import (
    CoolingPause,
    ResumableSampler,
    all_reduce_mean,
    amp_policy,
    barrier,
    dataloader_kwargs,
    gather_arrays,
    optimizer_step,
    unwrap_model,
    wrap_model,
)
from common.training import CheckpointSaver, StopRequest, TrainState, resume_training
from rsna_spine.data import StackStore
from rsna_spine.fusion import attach_second_views
from rsna_spine.stage_datasets import (
    POINTS,
    AxialPointDataset,
    CropDataset,
    SagittalPointDataset,
    axial_items,
    crop_items,
    output_to_voxel,
    sagittal_items,
)
from rsna_spine.evaluation import grading_report, prediction_table
from rsna_spine.inference import group_conditions, localize_studies
from rsna_spine.metric import class_priors, reweight_probabilities
from rsna_spine.models import decode_heatmaps, heatmap_loss
from rsna_spine.settings import DEFAULTS

DOMAIN = "rsna_spine"
# A --resume may train longer or change the schedule, but not the networks, their inputs or the cache.
FROZEN_ON_RESUME = ("model", "crop", "intensity", "paths.cache_dir", "localizer.channels",
                    "localizer.grid_sagittal", "localizer.grid_axial")


def _loader(dataset, cfg, run, batch_size, shuffle: bool, seed: int):
    """DataLoader over a DistributedSampler (also in one process): the order depends only on (seed, epoch),
    and ResumableSampler skips the batches a run stopped mid-epoch had already trained. The loader's own
    generator keeps iterator creation off the global RNG, which the checkpoint restores for augmentation."""
    sampler = ResumableSampler(DistributedSampler(dataset, num_replicas=run.dist.world_size, rank=run.dist.rank,
                                                  shuffle=shuffle, seed=seed))
    kw = dataloader_kwargs(run.device, cfg["runtime"]["num_workers"], seed=seed + run.dist.rank,
                           start_method="spawn")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **kw), sampler


class JobCheckpointSaver(CheckpointSaver):
    """The checkpoints of one job: checkpoint_last.pt (the model in training, tagged with its job) at the
    run root, where --resume finds it; every other checkpoint in the job's folder."""

    def __init__(self, run, job: str, *args, **kwargs):
        super().__init__(run, *args, **kwargs)
        self.job = job

    def save(self, name: str, state: TrainState, **extra):
        where = name if name == "checkpoint_last.pt" else f"{self.job}/{name}"
        return super().save(where, state, job=self.job, **extra)

    def save_in_job(self, name: str, state: TrainState, **extra):
        """A checkpoint in the job's folder whatever its name (the classifier's final checkpoint_last.pt)."""
        return super().save(f"{self.job}/{name}", state, job=self.job, **extra)


def _start_state(run, job: str, resume: dict | None, model, optimizer, scheduler, scaler) -> TrainState:
    """The resumed state when ``resume`` is this job's checkpoint, else a fresh one."""
    if resume is None:
        return TrainState()
    return resume_training(run, model, optimizer, scheduler, scaler, checkpoint=resume["path"], match={"job": job})


# -------------------------------------------------------------------------------------------- stage 1
def train_localizer_one_epoch(model, loader, optimizer, amp, state: TrainState, stop: StopRequest, cooling,
                              device, lcfg: dict, sigma, desc: str, is_main: bool) -> None:
    """The remaining batches of the epoch; running loss sums in ``state.partial``."""
    model.train()
    for batch in progress(loader, desc=desc, is_main=is_main):
        with amp.autocast():
            logits = model(batch["input"].to(device))
        loss = heatmap_loss(logits, batch["coords"].to(device), batch["mask"].to(device), sigma, lcfg["coord_weight"])
        optimizer_step(loss, optimizer, amp, grad_clip=lcfg["grad_clip"])
        state.add(loss=loss.item(), n=1)
        state.step, state.batches_done = state.step + 1, state.batches_done + 1
        cooling.step()
        if stop.check(state.step):
            return


def train_localizer(run, cfg, job: str, fold: int, key: str, store, labels, train_studies, val_studies,
                    resume: dict | None, stop: StopRequest):
    """One heatmap localizer; returns {"best_val_error_mm", "epochs", ...}, {"interrupted": True} when stopped,
    or None when there is nothing to train on."""
    lcfg, device = cfg["localizer"], run.device
    if key == "axial_t2":
        grid, slice_kernel = list(lcfg["grid_axial"]), 1
        train_items, val_items = axial_items(labels, store, train_studies), axial_items(labels, store, val_studies)
        make = lambda items, aug: AxialPointDataset(items, store, grid, cfg["intensity"], aug)  # noqa: E731
    else:
        grid, slice_kernel = list(lcfg["grid_sagittal"]), 3
        train_items = sagittal_items(labels, store, key, train_studies)
        val_items = sagittal_items(labels, store, key, val_studies)
        make = lambda items, aug: SagittalPointDataset(items, store, key, grid, cfg["intensity"], aug)  # noqa: E731
    if not train_items:
        run.log(f"{job}: no training stack with {key} label points; localizer skipped")
        return None
    job_dir = run.run_dir / job
    if run.is_main:
        job_dir.mkdir(parents=True, exist_ok=True)
    train_loader, sampler = _loader(make(train_items, lcfg["augment"]), cfg, run, lcfg["batch_size"], True, cfg["seed"])
    val_loader, _ = _loader(make(val_items, False), cfg, run, lcfg["batch_size"], False, cfg["seed"])
    model = build_model("rsna_spine.models.HeatmapLocalizer", {"n_points": len(POINTS[key]),
                        "channels": list(lcfg["channels"]), "slice_kernel": slice_kernel}).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lcfg["lr"], weight_decay=lcfg["weight_decay"])
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=lcfg["epochs"])
    amp = amp_policy(device, cfg["runtime"]["amp"])
    preprocessing = {"series_key": key, "fold": int(fold), "grid": grid, "intensity": dict(cfg["intensity"]),
                     "stride": 2, "points": [[c, lv] for c, lv in POINTS[key]]}
    state = _start_state(run, job, resume, model, optimizer, scheduler, amp.scaler)
    saver = JobCheckpointSaver(run, job, model, optimizer, scheduler, amp.scaler, preprocessing=preprocessing,
                               metric_name="val_error_mm")
    ddp_model = wrap_model(model, run.dist, device)
    cooling = CoolingPause(cfg["runtime"]["cooling_every_steps"], cfg["runtime"]["cooling_pause_s"])
    sigma = lcfg["sigma_vox"] if slice_kernel == 3 else [1.0, *lcfg["sigma_vox"][1:]]
    for epoch in range(state.epoch + 1, lcfg["epochs"] + 1):
        sampler.set_epoch(epoch, skip_samples=state.batches_done * lcfg["batch_size"])
        train_localizer_one_epoch(ddp_model, train_loader, optimizer, amp, state, stop, cooling, device, lcfg, sigma,
                                  f"{job} {epoch}", run.is_main)
        if stop.stopped:  # epoch unfinished: checkpoint_last.pt records where to pick up
            saver.save_partial(state)
            return {"interrupted": True}
        scheduler.step()
        err_sum, err_n = evaluate_localizer(model, val_loader, val_items, store, device, lcfg["decode_window"])
        val_mm, train_loss = all_reduce_mean([err_sum, state.partial.get("loss", 0.0)],
                                             [err_n, state.partial.get("n", 0.0)], device)
        state.end_epoch(epoch)
        saver.end_epoch(state, {"job": job, "train_loss": train_loss, "val_error_mm": val_mm,
                                "lr": scheduler.get_last_lr()[0]}, metric=val_mm)
        run.log(f"{job} epoch {epoch}: loss {train_loss:.3f}  val error {val_mm:.2f} mm")
    if run.is_main and not (job_dir / "checkpoint_best.pt").is_file():  # no finite validation error
        saver.save("checkpoint_best.pt", state)
    best = state.best_metric if state.best_metric is not None else math.inf
    return {"best_val_error_mm": best, "epochs": state.epoch, "n_train": len(train_items), "n_val": len(val_items)}


@torch.no_grad()
def evaluate_localizer(model, loader, items, store, device, window: int) -> tuple[float, int]:
    """Σ of 3D errors (mm) over this rank's validation points, and their count."""
    model.eval()
    total, count = 0.0, 0
    for batch in loader:
        coords, _ = decode_heatmaps(model(batch["input"].to(device)), window)
        for b, index in enumerate(batch["index"].tolist()):
            item = items[index]
            stack = store.get(item["study_id"], item["series_id"], item["stack_index"])
            pred = coords[b].cpu().numpy().astype(np.float64)
            true = batch["coords"][b].numpy().astype(np.float64)
            mask = batch["mask"][b].numpy() > 0
            if "kji" in item:  # sagittal: the whole stack on the localizer grid
                to_vox = [output_to_voxel(c, stack.shape, loader.dataset.grid) for c in (pred, true)]
            else:  # axial: one slice
                to_vox = [output_to_voxel(c, stack.shape, loader.dataset.size, item["k"]) for c in (pred, true)]
            d = stack.voxel_to_patient(to_vox[0]) - stack.voxel_to_patient(to_vox[1])
            total += float(np.linalg.norm(d, axis=1)[mask].sum())
            count += int(mask.sum())
    return total, count


# -------------------------------------------------------------------------------------------- stage 2
def _schedule(tcfg, steps_per_epoch: int):
    """Linear warmup over warmup_epochs, then cosine to min_lr_ratio, per optimizer step."""
    warm = max(1, int(tcfg["warmup_epochs"] * steps_per_epoch))
    total = max(warm + 1, int(tcfg["epochs"] * steps_per_epoch))
    floor = float(tcfg["min_lr_ratio"])

    def factor(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        progress_ = min(1.0, (step - warm) / max(1, total - warm))
        return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress_))
    return factor


def _forward(model, batch, device):
    second = {}
    if "second_image" in batch:  # sagittal + axial fusion (rsna_spine/fusion.py)
        second = {"second_images": batch["second_image"].to(device, non_blocking=True),
                  "second_present": batch["second_present"].to(device)}
    return model(batch["image"].to(device, non_blocking=True), batch["level"].to(device),
                 batch["condition"].to(device), **second)


@torch.no_grad()
def evaluate_classifier(model, loader, items, class_weights, device) -> tuple[dict, pd.DataFrame]:
    """Whole-set grading report on ``items`` (gathered over ranks), probabilities re-weighted for the metric."""
    model.eval()
    idx, probs = [], []
    for batch in loader:
        out = _forward(model, batch, device)
        probs.append(torch.softmax(out["logits"].float(), dim=1).cpu().numpy())
        idx.append(batch["index"].numpy())
    idx = gather_arrays(np.concatenate(idx) if idx else np.zeros(0, dtype=np.int64))
    probs = gather_arrays(np.concatenate(probs) if probs else np.zeros((0, 3)))
    _, first = np.unique(idx, return_index=True)  # DistributedSampler pads with repeats
    idx, probs = idx[first], probs[first]
    table = prediction_table([items[i] for i in idx], reweight_probabilities(probs, class_weights))
    return grading_report(table), table


def train_classifier_one_epoch(model, loader, optimizer, scheduler, amp, state: TrainState, stop: StopRequest,
                               cooling, device, tcfg: dict, weights, steps_per_epoch: int, step_scheduler: bool,
                               desc: str, is_main: bool) -> None:
    """The remaining batches of the epoch (at most ``steps_per_epoch`` in all); the warmup-cosine schedule
    steps per batch unless SWA drives the learning rate."""
    model.train()
    remaining = steps_per_epoch - state.batches_done
    if remaining <= 0:  # stopped right after the epoch's last batch
        return
    for batch in progress(loader, desc=desc, is_main=is_main, total=remaining):
        with amp.autocast():
            logits = _forward(model, batch, device)["logits"]
        loss = weighted_cross_entropy(logits.float(), batch["label"].to(device), weights)
        optimizer_step(loss, optimizer, amp, grad_clip=tcfg["grad_clip"])
        if step_scheduler:
            scheduler.step()
        state.add(loss=loss.item(), n=1)
        state.step, state.batches_done = state.step + 1, state.batches_done + 1
        cooling.step()
        if stop.check(state.step) or state.batches_done >= steps_per_epoch:
            return  # return before the loader prepares (and augments) a batch that is not trained


def _swa_state(swa) -> dict:
    return {"swa_state": swa.averaged.state_dict() if swa is not None else None,
            "swa_scheduler": swa.scheduler.state_dict() if swa is not None else None,
            "swa_n": swa.n_averaged if swa is not None else 0}


def train_classifier(run, cfg, job: str, fold: int, group: str, store, labels, train_studies, val_studies, centers,
                     resume: dict | None, stop: StopRequest):
    """One stage-2 classifier; returns its summary, {"interrupted": True} when stopped, or None (no sample)."""
    tcfg, mcfg, device = cfg["train"], cfg["model"], run.device
    conditions = group_conditions(group)
    train_items = crop_items(labels, None, train_studies, conditions)
    val_items = crop_items(labels, centers, val_studies, conditions)
    if not train_items:
        run.log(f"{job}: no training sample; classifier skipped")
        return None
    second_view = bool(mcfg["second_view"])
    if second_view:  # the other series' crop for the spinal and subarticular targets
        tolerance = float(cfg["localizer"]["axial_max_distance_mm"])
        for name, part in (("train", train_items), ("val", val_items)):
            counts = attach_second_views(part, store, tolerance)
            run.log(f"{job}: second view for {counts['fused']} {name} targets; {counts['primary_only']} graded from "
                    f"the primary view alone {counts['reasons']}")
    weights = [float(w) for w in tcfg["class_weights"]]
    freq = np.bincount([it["label"] for it in train_items], minlength=3) + 1.0
    bias = mcfg["bias_init"]
    if bias is None:  # the loss-optimal constant under weighted CE: q ∝ w·p
        q = np.asarray(weights) * freq / freq.sum()
        bias = (np.log(q / q.sum()) - np.log(q / q.sum()).mean()).tolist()
    kwargs = {k: v for k, v in mcfg.items() if k != "bias_init"}
    kwargs.update(bias_init=[float(b) for b in bias], tiny_channels=list(mcfg["tiny_channels"]))
    model = build_model("rsna_spine.models.SpineClassifier", kwargs).to(device)
    model.model_spec["kwargs"]["backbone_weights"] = ""  # weights come from state_dict: no download to rebuild
    run.log(f"{job}: {mcfg['backbone']} backbone, " + (f"pretrained weights '{mcfg['backbone_weights']}'"
            if mcfg["backbone_weights"] else "random init (no pretrained weights configured)")
            + f"; {len(train_items)} train / {len(val_items)} val samples; class weights {weights}; "
            f"bias init {np.round(bias, 3).tolist()}")
    augment = {k: tcfg[k] for k in ("jitter_slices", "jitter_mm", "rotation_deg", "flip_prob", "second_view_dropout")}
    train_set = CropDataset(train_items, store, cfg["crop"], cfg["intensity"], augment=augment,
                            second_view=second_view)
    train_loader, sampler = _loader(train_set, cfg, run, tcfg["batch_size"], True, cfg["seed"])
    val_loader, _ = _loader(CropDataset(val_items, store, cfg["crop"], cfg["intensity"], second_view=second_view),
                            cfg, run, tcfg["batch_size"], False, cfg["seed"])
    core = unwrap_model(model)
    optimizer = torch.optim.AdamW([
        {"params": list(core.backbone_parameters()), "lr": tcfg["backbone_lr"], "weight_decay": tcfg["weight_decay"]},
        {"params": core.head_parameters(), "lr": tcfg["lr"], "weight_decay": tcfg["weight_decay"]}])
    steps_per_epoch = len(train_loader) if not tcfg["max_steps_per_epoch"] else min(len(train_loader),
                                                                                    tcfg["max_steps_per_epoch"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [_schedule(tcfg, steps_per_epoch)] * 2)
    amp = amp_policy(device, cfg["runtime"]["amp"])
    priors = class_priors(labels[labels["study_id"].isin(train_studies)])
    preprocessing = {"conditions": conditions, "group": group, "fold": int(fold), "class_weights": weights,
                     "priors": priors, "crop": json.loads(json.dumps(cfg["crop"])), "intensity": dict(cfg["intensity"]),
                     "val_studies": [int(s) for s in val_studies],
                     "second_view_max_distance_mm": float(cfg["localizer"]["axial_max_distance_mm"])}
    swa_cfg = tcfg["swa"]
    swa = None
    resumed = (resume or {}).get("extra", {})
    if resumed.get("swa_state") is not None:
        # Built before the optimizer is restored: SWALR's set-up step changes the learning rates.
        swa = SWA(model, optimizer, swa_cfg["start_epoch"], swa_cfg["lr"], swa_cfg["anneal_epochs"])
        swa.averaged.load_state_dict(resumed["swa_state"])
        swa.scheduler.load_state_dict(resumed["swa_scheduler"])
        swa.n_averaged = int(resumed["swa_n"])
    state = _start_state(run, job, resume, model, optimizer, scheduler, amp.scaler)
    gate = {"bad_epochs": int(resumed.get("bad_epochs", 0)), "gate_ever": bool(resumed.get("gate_ever", False))}
    saver = JobCheckpointSaver(run, job, model, optimizer, scheduler, amp.scaler, preprocessing=preprocessing,
                               metric_name=tcfg["select_metric"], extra=lambda: {**gate, **_swa_state(swa)})
    ddp_model = wrap_model(model, run.dist, device)
    cooling = CoolingPause(cfg["runtime"]["cooling_every_steps"], cfg["runtime"]["cooling_pause_s"])
    higher = tcfg["select_metric"] == "balanced_accuracy"
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    for epoch in range(state.epoch + 1, tcfg["epochs"] + 1):
        swa_active = swa_cfg["enabled"] and epoch >= swa_cfg["start_epoch"]
        if swa_active and swa is None:  # SWALR takes over the learning rate from here
            swa = SWA(model, optimizer, swa_cfg["start_epoch"], swa_cfg["lr"], swa_cfg["anneal_epochs"])
        sampler.set_epoch(epoch, skip_samples=state.batches_done * tcfg["batch_size"])
        train_classifier_one_epoch(ddp_model, train_loader, optimizer, scheduler, amp, state, stop, cooling, device,
                                   tcfg, weights, steps_per_epoch, not swa_active, f"{job} {epoch}", run.is_main)
        if stop.stopped:  # epoch unfinished: checkpoint_last.pt records where to pick up
            saver.save_partial(state)
            return {"interrupted": True}
        if swa_active:
            swa.after_epoch(epoch)
        report, _ = evaluate_classifier(model, val_loader, val_items, weights, device)
        (train_loss,) = all_reduce_mean([state.partial.get("loss", 0.0)], [state.partial.get("n", 0.0)], device)
        value = report.get("balanced_accuracy", float("nan")) if higher else report["official"]["score"]
        passed = not (report.get("minority_recall", 0.0) < tcfg["min_minority_recall"])  # NaN (no minority) passes
        counts = report.get("prediction_counts", {})
        dead = [c for c, n in counts.items() if n == 0]
        run.log(f"{job} epoch {epoch}: loss {train_loss:.4f}  val official {report['official']['score']:.4f}  "
                f"BA {report.get('balanced_accuracy', float('nan')):.3f}  recall "
                f"{[round(v, 2) for v in report.get('per_class_recall', {}).values()]}  predicted {counts}"
                + (f"  DEAD CLASS {dead}" if dead else ""))
        best = state.best_metric
        improved = passed and np.isfinite(value) and (best is None or better(value, best))
        if passed and not gate["gate_ever"] and np.isfinite(value):  # the first checkpoint that passes the gate wins
            improved, gate["gate_ever"] = True, True
        state.end_epoch(epoch)
        if improved:
            state.best_metric, gate["bad_epochs"] = float(value), 0
            saver.save("checkpoint_best.pt", state, val=report["official"])
        else:
            gate["bad_epochs"] += 1
            if not passed:
                run.log(f"{job} epoch {epoch}: minority recall {report.get('minority_recall', float('nan')):.2f} < "
                        f"{tcfg['min_minority_recall']}: not eligible as best (dead-class gate)")
        row = {"job": job, "train_loss": train_loss, "val_official": report["official"]["score"],
               "val_balanced_accuracy": report.get("balanced_accuracy"),
               "val_minority_recall": report.get("minority_recall"),
               **{f"val_recall_{k}": v for k, v in report.get("per_class_recall", {}).items()},
               "lr_backbone": optimizer.param_groups[0]["lr"], "lr_head": optimizer.param_groups[1]["lr"]}
        saver.end_epoch(state, row)  # best saved above (gated); here checkpoint_last.pt, then the row
        if tcfg["patience"] and gate["bad_epochs"] >= tcfg["patience"] and not swa_active:
            run.log(f"{job}: no better gated checkpoint for {gate['bad_epochs']} epochs; stopping early")
            break
    best = state.best_metric if state.best_metric is not None else (-math.inf if higher else math.inf)
    result = {"best_" + tcfg["select_metric"]: best, "epochs": state.epoch, "gate_passed": gate["gate_ever"],
              "n_train": len(train_items), "n_val": len(val_items)}
    if run.is_main:
        if not gate["gate_ever"]:  # never passed the gate: keep the last model, and say so
            run.log(f"{job}: WARNING no epoch passed the minority-recall gate ({tcfg['min_minority_recall']}); "
                    "checkpoint_best.pt is the last epoch")
            saver.save("checkpoint_best.pt", state, gate_passed=False)
        saver.save_in_job("checkpoint_last.pt", state)
    if swa is not None and swa.n_averaged > 0:
        bn_loader = DataLoader(CropDataset(train_items, store, cfg["crop"], cfg["intensity"], second_view=second_view),
                               batch_size=tcfg["batch_size"], shuffle=False)
        swa_model = swa.finalize(bn_loader, device, batch_input=lambda b: b,
                                 forward=lambda m, b: _forward(m, b, device))
        swa_model.model_spec = core.model_spec
        swa_report, _ = evaluate_classifier(swa_model, val_loader, val_items, weights, device)
        result["swa_val_official"] = swa_report["official"]["score"]
        result["swa_n_averaged"] = swa.n_averaged
        run.log(f"{job}: SWA over {swa.n_averaged} epochs, BN updated: val official "
                f"{swa_report['official']['score']:.4f} (best checkpoint {best:.4f})")
        if run.is_main:
            save_checkpoint(run.run_dir / job / "checkpoint_swa.pt", swa_model, domain=DOMAIN, config=cfg,
                            epoch=state.epoch, step=state.step, best_metric=swa_report["official"]["score"],
                            best_metric_name="official", preprocessing=preprocessing,
                            extra={"val": swa_report["official"]})
    return result


# ------------------------------------------------------------------------------------------------ main
def _run_job(run, job: str, resume: dict | None, stop: StopRequest, train_fn, *fn_args):
    """Train one job, or read the done.json of a job a resumed run had finished; done.json after training."""
    done = run.run_dir / job / "done.json"
    if run.resume_from is not None and done.is_file():
        run.log(f"{job}: already trained ({done}); skipped")
        return json.loads(done.read_text(encoding="utf-8"))
    job_resume = resume if resume is not None and resume["job"] == job else None
    if run.resume_from is not None and job_resume is None and run.is_main:
        trim_metrics(run.run_dir, -1, match={"job": job})  # rows of an attempt that left no checkpoint
    result = train_fn(run, run.cfg, job, *fn_args, job_resume, stop)
    if result is not None and not result.get("interrupted") and run.is_main:
        write_json(done, result)
    barrier()  # other ranks read this job's checkpoints next
    return result


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, train=True, data=True)
    args = parser.parse_args(argv)
    run = start_run(args, domain=DOMAIN, defaults=DEFAULTS, argv=argv, frozen=FROZEN_ON_RESUME,
                    data_key="paths.cache_dir")
    cfg = run.cfg
    cache_dir = Path(cfg["paths"]["cache_dir"])
    store = StackStore(cache_dir, max_mb=cfg["cache"]["memory_mb"])
    labels = pd.read_csv(cache_dir / "labels.csv")
    labels = labels[labels["has_images"]].reset_index(drop=True)
    folds = pd.read_csv(cache_dir / "folds.csv")
    unknown = [f for f in cfg["train"]["train_folds"] if f not in set(folds["fold"])]
    if unknown:
        raise InputError(f"train.train_folds has fold(s) {unknown}; column 'fold' has {sorted(set(folds['fold']))}",
                         cache_dir / "folds.csv")
    run.record_inputs_valid()
    resume = None
    if run.resume_from is not None:
        extra = load_checkpoint(run.resume_from, expected_domain=DOMAIN).get("extra") or {}
        resume = {"path": run.resume_from, "job": extra.get("job"), "extra": extra}
    groups = ["spinal", "foraminal", "subarticular"] if cfg["train"]["split_by_group"] else ["all"]
    results: dict = {}
    members: list[dict] = []  # the ensemble: one entry per finished model

    def add_member(entry: dict) -> None:
        members.append(entry)
        if run.is_main:
            write_ensemble_manifest(run.run_dir, [m["checkpoint"] for m in members], models=members)

    with StopRequest(run) as stop:
        for fold in cfg["train"]["train_folds"]:
            val_studies = set(folds.loc[folds["fold"] == fold, "study_id"].astype(int))
            train_studies = set(folds["study_id"].astype(int)) - val_studies
            localizers: dict = {}
            if "localizer" in cfg["train"]["stages"]:
                for key in cfg["localizer"]["series"]:
                    job = f"fold{fold}/localizer_{key}"
                    res = results[job] = _run_job(run, job, resume, stop, train_localizer, fold, key, store, labels,
                                                  train_studies, val_studies)
                    if stop.stopped:
                        break
                    if res is not None:
                        localizers[key] = f"{job}/checkpoint_best.pt"
                        add_member({"checkpoint": localizers[key], "fold": int(fold), "stage": "localizer",
                                    "series_key": key})
            if "classifier" in cfg["train"]["stages"] and not stop.stopped:
                centers = None
                if cfg["train"]["val_centers"] == "stage1" and localizers:
                    loaded = {k: [load_model(run.run_dir / p, run.device, DOMAIN)] for k, p in localizers.items()}
                    centers = localize_studies(sorted(val_studies), store, loaded, run.device,
                                               cfg["localizer"]["decode_window"],
                                               max_distance_mm=cfg["localizer"]["axial_max_distance_mm"])
                    if run.is_main:
                        centers.to_csv(run.run_dir / f"fold{fold}" / "val_centers.csv", index=False)
                elif cfg["train"]["val_centers"] == "stage1":
                    run.log(f"fold {fold}: no stage-1 localizer in this run; validation crops use label points")
                for group in groups:
                    job = f"fold{fold}/classifier_{group}"
                    res = results[job] = _run_job(run, job, resume, stop, train_classifier, fold, group, store, labels,
                                                  train_studies, val_studies, centers)
                    if stop.stopped:
                        break
                    if res is not None:
                        add_member({"checkpoint": f"{job}/checkpoint_best.pt", "fold": int(fold),
                                    "stage": "classifier", "group": group})
            if stop.stopped:
                break
    return run.finish({"jobs": results, "interrupted": stop.stopped, "ensemble": "ensemble.json" if members else None,
                       "n_models": len(members)})


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
