"""Train the two-stage lumbar spine grader on the preprocessed cache, fold by fold.

For each fold of train.train_folds (StratifiedGroupKFold by study, folds.csv from preprocess_rsna.py):
  stage 1: heatmap localizers for the sagittal T2 (spinal canal), sagittal T1 (foramina) and axial T2
           (subarticular, on the slice of the level) points;
  stage 2: the v9 classifier (EfficientNet-V2 per slice → BiGRU → attention-MIL → level and condition
           embeddings → MLP) for all 25 targets, or one per condition group; competition-weighted
           cross-entropy, two learning-rate groups (backbone / rest), warmup + cosine, AMP on CUDA,
           gradient clipping, stage-1-like jitter of slice and centre, SWA that is BN-updated, evaluated
           and saved, dead-class monitoring with the minimum-minority-recall gate on the best checkpoint.
Validation each epoch uses the held-out fold with crops centred by this fold's stage 1 (as at test time).

Writes <run>/fold{f}/{localizer_<series>, classifier_<group>}/checkpoint_best.pt (+ checkpoint_swa.pt,
metrics.csv, done.json) and models.json; <run>/checkpoint_last.pt always holds the model in training, so
--resume continues exactly (finished models are skipped). DDP: torchrun, rank 0 writes.

    python rsna_spine/train_rsna.py --config configs/rsna_spine/smoke.yaml --output-dir runs/x/train
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader, DistributedSampler

from common.checkpoint import build_model, load_checkpoint, load_model, restore_training_state, save_checkpoint
from common.cli import make_parser, start_run
from common.ensembling import SWA
from common.losses import weighted_cross_entropy
from common.runlog import append_csv_row, progress, write_json
from common.runtime import (
    CoolingPause,
    GracefulInterrupt,
    all_reduce_mean,
    amp_policy,
    barrier,
    dataloader_kwargs,
    gather_arrays,
    optimizer_step,
    unwrap_model,
    wrap_model,
)
from rsna_spine.data import StackStore
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


def _loader(dataset, cfg, run, batch_size, shuffle: bool, seed: int):
    sampler = DistributedSampler(dataset, num_replicas=run.dist.world_size, rank=run.dist.rank, shuffle=shuffle,
                                 seed=seed)
    kw = dataloader_kwargs(run.device, cfg["runtime"]["num_workers"], start_method="spawn")
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, drop_last=False, **kw), sampler


def _save_last(run, model, job: str, epoch: int, step: int, best: float, optimizer, scheduler, amp, cfg,
               preprocessing, extra: dict) -> None:
    """Top-level checkpoint_last.pt: the model in training, with the job it belongs to (for --resume)."""
    if run.is_main:
        save_checkpoint(run.run_dir / "checkpoint_last.pt", model, domain=DOMAIN, config=cfg, optimizer=optimizer,
                        scheduler=scheduler, scaler=amp.scaler, epoch=epoch, step=step, best_metric=best,
                        preprocessing=preprocessing, extra={"job": job, **extra})


# -------------------------------------------------------------------------------------------- stage 1
def train_localizer(run, cfg, job: str, key: str, store, labels, train_studies, val_studies, resume, interrupt):
    """One heatmap localizer; returns {"best_mm", "epochs"} or None when there is nothing to train on."""
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
    preprocessing = {"series_key": key, "grid": grid, "intensity": dict(cfg["intensity"]), "stride": 2,
                     "points": [[c, lv] for c, lv in POINTS[key]]}
    start, step, best = 1, 0, math.inf
    if resume is not None:
        state = restore_training_state(resume, model, optimizer, scheduler, amp.scaler)
        start, step = state["epoch"] + 1, state["step"]
        best = state["best_metric"] if state["best_metric"] is not None else math.inf
    ddp_model = wrap_model(model, run.dist, device)
    cooling = CoolingPause(cfg["runtime"]["cooling_every_steps"], cfg["runtime"]["cooling_pause_s"])
    sigma = lcfg["sigma_vox"] if slice_kernel == 3 else [1.0, *lcfg["sigma_vox"][1:]]
    epoch = start - 1
    for epoch in range(start, lcfg["epochs"] + 1):
        sampler.set_epoch(epoch)
        ddp_model.train()
        loss_sum, n_batches = 0.0, 0
        for batch in progress(train_loader, desc=f"{job} {epoch}", is_main=run.is_main):
            with amp.autocast():
                logits = ddp_model(batch["input"].to(device))
            loss = heatmap_loss(logits, batch["coords"].to(device), batch["mask"].to(device), sigma,
                                lcfg["coord_weight"])
            optimizer_step(loss, optimizer, amp, grad_clip=lcfg["grad_clip"])
            loss_sum, n_batches, step = loss_sum + loss.item(), n_batches + 1, step + 1
            cooling.step()
            if interrupt.requested:
                break
        scheduler.step()
        err_sum, err_n = _localizer_val_error(model, val_loader, val_items, store, device, lcfg["decode_window"])
        val_mm, train_loss = all_reduce_mean([err_sum, loss_sum], [err_n, n_batches], device)
        if run.is_main:
            append_csv_row(job_dir / "metrics.csv", {"epoch": epoch, "train_loss": train_loss, "val_error_mm": val_mm,
                                                      "lr": scheduler.get_last_lr()[0]})
        run.log(f"{job} epoch {epoch}: loss {train_loss:.3f}  val error {val_mm:.2f} mm")
        if val_mm < best or not np.isfinite(best):
            best = float(val_mm) if np.isfinite(val_mm) else best
            if run.is_main:
                save_checkpoint(job_dir / "checkpoint_best.pt", model, domain=DOMAIN, config=cfg, epoch=epoch, step=step,
                                best_metric=best, best_metric_name="val_error_mm", preprocessing=preprocessing)
        _save_last(run, model, job, epoch, step, best, optimizer, scheduler, amp, cfg, preprocessing, {})
        if interrupt.requested:
            return {"interrupted": True}
    if run.is_main and not (job_dir / "checkpoint_best.pt").is_file():  # no finite validation error
        save_checkpoint(job_dir / "checkpoint_best.pt", model, domain=DOMAIN, config=cfg, epoch=epoch, step=step,
                        preprocessing=preprocessing)
    return {"best_val_error_mm": best, "epochs": epoch, "n_train": len(train_items), "n_val": len(val_items)}


@torch.no_grad()
def _localizer_val_error(model, loader, items, store, device, window: int) -> tuple[float, int]:
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
    return model(batch["image"].to(device, non_blocking=True), batch["level"].to(device), batch["condition"].to(device))


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


def train_classifier(run, cfg, job: str, group: str, store, labels, train_studies, val_studies, centers, resume,
                     interrupt):
    tcfg, mcfg, device = cfg["train"], cfg["model"], run.device
    conditions = group_conditions(group)
    train_items = crop_items(labels, None, train_studies, conditions)
    val_items = crop_items(labels, centers, val_studies, conditions)
    if not train_items:
        run.log(f"{job}: no training sample; classifier skipped")
        return None
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
    augment = {k: tcfg[k] for k in ("jitter_slices", "jitter_mm", "rotation_deg", "flip_prob")}
    train_set = CropDataset(train_items, store, cfg["crop"], cfg["intensity"], augment=augment)
    train_loader, sampler = _loader(train_set, cfg, run, tcfg["batch_size"], True, cfg["seed"])
    val_loader, _ = _loader(CropDataset(val_items, store, cfg["crop"], cfg["intensity"]), cfg, run,
                            tcfg["batch_size"], False, cfg["seed"])
    core = unwrap_model(model)
    optimizer = torch.optim.AdamW([
        {"params": list(core.backbone_parameters()), "lr": tcfg["backbone_lr"], "weight_decay": tcfg["weight_decay"]},
        {"params": core.head_parameters(), "lr": tcfg["lr"], "weight_decay": tcfg["weight_decay"]}])
    steps_per_epoch = len(train_loader) if not tcfg["max_steps_per_epoch"] else min(len(train_loader),
                                                                                    tcfg["max_steps_per_epoch"])
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, [_schedule(tcfg, steps_per_epoch)] * 2)
    amp = amp_policy(device, cfg["runtime"]["amp"])
    priors = class_priors(labels[labels["study_id"].isin(train_studies)])
    preprocessing = {"conditions": conditions, "group": group, "class_weights": weights, "priors": priors,
                     "crop": json.loads(json.dumps(cfg["crop"])), "intensity": dict(cfg["intensity"]),
                     "val_studies": [int(s) for s in val_studies]}
    higher = tcfg["select_metric"] == "balanced_accuracy"
    start, step, best, bad_epochs, swa, gate_ever = 1, 0, (-math.inf if higher else math.inf), 0, None, False
    swa_cfg = tcfg["swa"]
    if resume is not None:
        state = restore_training_state(resume, model, optimizer, scheduler, amp.scaler)
        start, step = state["epoch"] + 1, state["step"]
        best = state["best_metric"] if state["best_metric"] is not None else best
        bad_epochs, gate_ever = int(resume["extra"].get("bad_epochs", 0)), bool(resume["extra"].get("gate_ever"))
        if resume["extra"].get("swa_state") is not None:
            swa = SWA(model, optimizer, swa_cfg["start_epoch"], swa_cfg["lr"], swa_cfg["anneal_epochs"])
            swa.averaged.load_state_dict(resume["extra"]["swa_state"])
            swa.scheduler.load_state_dict(resume["extra"]["swa_scheduler"])
            swa.n_averaged = int(resume["extra"]["swa_n"])
    ddp_model = wrap_model(model, run.dist, device)
    cooling = CoolingPause(cfg["runtime"]["cooling_every_steps"], cfg["runtime"]["cooling_pause_s"])
    job_dir = run.run_dir / job
    if run.is_main:
        job_dir.mkdir(parents=True, exist_ok=True)
    better = (lambda a, b: a > b) if higher else (lambda a, b: a < b)
    epoch = start - 1
    for epoch in range(start, tcfg["epochs"] + 1):
        swa_active = swa_cfg["enabled"] and epoch >= swa_cfg["start_epoch"]
        if swa_active and swa is None:  # SWALR takes over the learning rate from here
            swa = SWA(model, optimizer, swa_cfg["start_epoch"], swa_cfg["lr"], swa_cfg["anneal_epochs"])
        sampler.set_epoch(epoch)
        ddp_model.train()
        loss_sum, n_batches = 0.0, 0
        for i, batch in enumerate(progress(train_loader, desc=f"{job} {epoch}", is_main=run.is_main,
                                           total=steps_per_epoch)):
            if i >= steps_per_epoch:
                break
            with amp.autocast():
                logits = _forward(ddp_model, batch, device)["logits"]
            loss = weighted_cross_entropy(logits.float(), batch["label"].to(device), weights)
            optimizer_step(loss, optimizer, amp, grad_clip=tcfg["grad_clip"])
            if not swa_active:
                scheduler.step()
            loss_sum, n_batches, step = loss_sum + loss.item(), n_batches + 1, step + 1
            cooling.step()
            if interrupt.requested:
                break
        if swa_active:
            swa.after_epoch(epoch)
        report, _ = evaluate_classifier(model, val_loader, val_items, weights, device)
        (train_loss,) = all_reduce_mean([loss_sum], [n_batches], device)
        value = report.get("balanced_accuracy", float("nan")) if higher else report["official"]["score"]
        gate = not (report.get("minority_recall", 0.0) < tcfg["min_minority_recall"])  # NaN (no minority) passes
        counts = report.get("prediction_counts", {})
        dead = [c for c, n in counts.items() if n == 0]
        row = {"epoch": epoch, "train_loss": train_loss, "val_official": report["official"]["score"],
               "val_balanced_accuracy": report.get("balanced_accuracy"), "val_minority_recall": report.get("minority_recall"),
               **{f"val_recall_{k}": v for k, v in report.get("per_class_recall", {}).items()},
               "lr_backbone": optimizer.param_groups[0]["lr"], "lr_head": optimizer.param_groups[1]["lr"]}
        if run.is_main:
            append_csv_row(job_dir / "metrics.csv", row)
        run.log(f"{job} epoch {epoch}: loss {train_loss:.4f}  val official {report['official']['score']:.4f}  "
                f"BA {report.get('balanced_accuracy', float('nan')):.3f}  recall "
                f"{[round(v, 2) for v in report.get('per_class_recall', {}).values()]}  predicted {counts}"
                + (f"  DEAD CLASS {dead}" if dead else ""))
        improved = gate and np.isfinite(value) and better(value, best)
        if gate and not gate_ever and np.isfinite(value):  # the first checkpoint that passes the gate wins
            improved, gate_ever = True, True
        if improved:
            best, bad_epochs = float(value), 0
            if run.is_main:
                save_checkpoint(job_dir / "checkpoint_best.pt", model, domain=DOMAIN, config=cfg, epoch=epoch,
                                step=step, best_metric=best, best_metric_name=tcfg["select_metric"],
                                preprocessing=preprocessing, extra={"val": report["official"]})
        else:
            bad_epochs += 1
            if not gate:
                run.log(f"{job} epoch {epoch}: minority recall {report.get('minority_recall', float('nan')):.2f} < "
                        f"{tcfg['min_minority_recall']}: not eligible as best (dead-class gate)")
        extra = {"bad_epochs": bad_epochs, "gate_ever": gate_ever,
                 "swa_state": swa.averaged.state_dict() if swa is not None else None,
                 "swa_scheduler": swa.scheduler.state_dict() if swa is not None else None,
                 "swa_n": swa.n_averaged if swa is not None else 0}
        _save_last(run, model, job, epoch, step, best, optimizer, scheduler, amp, cfg, preprocessing, extra)
        if interrupt.requested:
            return {"interrupted": True}
        if tcfg["patience"] and bad_epochs >= tcfg["patience"] and not swa_active:
            run.log(f"{job}: no better gated checkpoint for {bad_epochs} epochs; stopping early")
            break
    result = {"best_" + tcfg["select_metric"]: best, "epochs": epoch, "gate_passed": gate_ever,
              "n_train": len(train_items), "n_val": len(val_items)}
    if run.is_main:
        if not gate_ever:  # never passed the gate: keep the last model, and say so
            run.log(f"{job}: WARNING no epoch passed the minority-recall gate ({tcfg['min_minority_recall']}); "
                    "checkpoint_best.pt is the last epoch")
            save_checkpoint(job_dir / "checkpoint_best.pt", model, domain=DOMAIN, config=cfg, epoch=epoch, step=step,
                            preprocessing=preprocessing, extra={"gate_passed": False})
        save_checkpoint(job_dir / "checkpoint_last.pt", model, domain=DOMAIN, config=cfg, epoch=epoch, step=step,
                        preprocessing=preprocessing)
    if swa is not None and swa.n_averaged > 0:
        bn_loader = DataLoader(CropDataset(train_items, store, cfg["crop"], cfg["intensity"]),
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
            save_checkpoint(job_dir / "checkpoint_swa.pt", swa_model, domain=DOMAIN, config=cfg, epoch=epoch,
                            step=step, best_metric=swa_report["official"]["score"], best_metric_name="official",
                            preprocessing=preprocessing, extra={"val": swa_report["official"]})
    return result


# ------------------------------------------------------------------------------------------------ main
def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, train=True)
    args = parser.parse_args(argv)
    run = start_run(args, domain=DOMAIN, defaults=DEFAULTS, argv=argv)
    cfg = run.cfg
    cache_dir = Path(cfg["paths"]["cache_dir"])
    store = StackStore(cache_dir)
    labels = pd.read_csv(cache_dir / "labels.csv")
    labels = labels[labels["has_images"]].reset_index(drop=True)
    folds = pd.read_csv(cache_dir / "folds.csv")
    resume = load_checkpoint(run.resume_from, expected_domain=DOMAIN) if run.resume_from else None
    manifest_path = run.run_dir / "models.json"
    resuming = resume is not None
    manifest = (json.loads(manifest_path.read_text(encoding="utf-8")) if resuming and manifest_path.is_file()
                else {"folds": {}})
    groups = ["spinal", "foraminal", "subarticular"] if cfg["train"]["split_by_group"] else ["all"]
    results: dict = {}
    interrupted = False

    def run_job(job: str, fn, *fn_args):
        done = run.run_dir / job / "done.json"
        if resuming and done.is_file():
            run.log(f"{job}: already trained ({done}); skipped")
            return json.loads(done.read_text(encoding="utf-8"))
        state = resume if (resume is not None and resume["extra"].get("job") == job) else None
        result = fn(run, cfg, job, *fn_args, state, interrupt)
        if result is not None and not result.get("interrupted") and run.is_main:
            write_json(done, result)
        barrier()  # other ranks read this job's checkpoints next
        return result

    with GracefulInterrupt() as interrupt:
        for fold in cfg["train"]["train_folds"]:
            if fold not in set(folds["fold"]):
                raise SystemExit(f"error: train.train_folds has fold {fold}, folds.csv has {sorted(set(folds['fold']))}")
            val_studies = set(folds.loc[folds["fold"] == fold, "study_id"].astype(int))
            train_studies = set(folds["study_id"].astype(int)) - val_studies
            entry = manifest["folds"].setdefault(str(fold), {"localizer": {}, "classifier": {}})
            if "localizer" in cfg["train"]["stages"]:
                for key in cfg["localizer"]["series"]:
                    job = f"fold{fold}/localizer_{key}"
                    res = run_job(job, train_localizer, key, store, labels, train_studies, val_studies)
                    results[job] = res
                    if res and res.get("interrupted"):
                        interrupted = True
                        break
                    if res is not None:
                        entry["localizer"][key] = f"{job}/checkpoint_best.pt"
            if "classifier" in cfg["train"]["stages"] and not interrupted:
                centers = None
                if cfg["train"]["val_centers"] == "stage1" and entry["localizer"]:
                    localizers = {k: [load_model(run.run_dir / p, run.device, DOMAIN)] for k, p in entry["localizer"].items()}
                    centers = localize_studies(sorted(val_studies), store, localizers, run.device,
                                               cfg["localizer"]["decode_window"])
                    if run.is_main:
                        centers.to_csv(run.run_dir / f"fold{fold}" / "val_centers.csv", index=False)
                elif cfg["train"]["val_centers"] == "stage1":
                    run.log(f"fold {fold}: no stage-1 localizer in this run; validation crops use label points")
                for group in groups:
                    job = f"fold{fold}/classifier_{group}"
                    res = run_job(job, train_classifier, group, store, labels, train_studies, val_studies, centers)
                    results[job] = res
                    if res and res.get("interrupted"):
                        interrupted = True
                        break
                    if res is not None:
                        paths = {"best": f"{job}/checkpoint_best.pt", "last": f"{job}/checkpoint_last.pt"}
                        if "swa_val_official" in res:
                            paths["swa"] = f"{job}/checkpoint_swa.pt"
                        entry["classifier"][group] = paths
            if run.is_main:
                write_json(manifest_path, manifest)
            if interrupted:
                run.log(f"stopped by the user; resume with --resume {run.run_dir}")
                break
    return run.finish({"jobs": results, "interrupted": interrupted, "manifest": "models.json"})


if __name__ == "__main__":
    main()
