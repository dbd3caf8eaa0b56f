"""Two-stage inference shared by training (validation centres), validate_rsna.py and predict_rsna.py.

Stage 1 (:func:`localize_study`): the sagittal localizers give, per level, the spinal-canal point on the
sagittal T2 stack and the left / right foramina on the sagittal T1 stack (slice + in-plane). For the
subarticular points, the sagittal level point (patient mm) is projected into every axial stack (exact
per-slice geometry, tilted stacks included); the stack that contains it gives the slice, and the axial
localizer finds the left / right points on that slice. Fold models are ensembled by averaging heatmap
probabilities.

Stage 2 (:func:`classify`): crops around each centre → every classifier of the ensemble (folds), with
left-right flip TTA (crop mirrored, condition mirrored: the left output of the flipped crop is the right
output of the original) → probabilities re-weighted to the metric's class weights when a model was trained
with others → averaged.
"""

from __future__ import annotations

import json
import time
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.utils.data import DataLoader

from common.checkpoint import ENSEMBLE_MANIFEST, CheckpointError, load_checkpoint, load_model, resolve_checkpoints
from common.errors import InputError
from rsna_spine.constants import CONDITIONS, GROUP_OF_CONDITION, LEVELS
from rsna_spine.crops import resample_slice, resample_volume
from rsna_spine.data import Stack, StackStore
from rsna_spine.fusion import attach_for_ensemble, attach_second_views, uses_second_view
from rsna_spine.stage_datasets import POINTS, CropDataset, output_to_voxel
from rsna_spine.metric import reweight_probabilities
from rsna_spine.models import decode_heatmaps
from rsna_spine.stacks import assign_level_slice, choose_stack

CENTER_COLUMNS = ["study_id", "condition", "level", "series_id", "stack_index", "k", "j", "i", "x_mm", "y_mm",
                  "z_mm", "confidence", "source", "slice_distance_mm"]


# ------------------------------------------------------------------------------------------ loading
LEGACY_MANIFEST = "models.json"  # the manifest of train_rsna.py runs made before ensemble.json
LOCALIZER_CLASS = "rsna_spine.models.HeatmapLocalizer"


def ensemble_members(path: str | Path) -> list[dict]:
    """The models ``--checkpoint PATH`` names, each {"path", "stage", "fold", "series_key" | "group"}.

    PATH: a train_rsna.py run folder (its ensemble.json lists every fold's localizers and classifiers), an
    older run folder with models.json, or anything :func:`common.checkpoint.resolve_checkpoints` accepts (a
    checkpoint file ...), whose stage, fold and series are then read from each checkpoint.
    """
    path = Path(path)
    if path.is_dir() and not (path / ENSEMBLE_MANIFEST).is_file() and (path / LEGACY_MANIFEST).is_file():
        return _legacy_members(path)
    files = resolve_checkpoints(path)
    described: dict = {}
    if path.is_dir() and (path / ENSEMBLE_MANIFEST).is_file():
        manifest = json.loads((path / ENSEMBLE_MANIFEST).read_text(encoding="utf-8"))
        described = {(path / m["checkpoint"]).resolve(): m for m in manifest.get("models", []) if "checkpoint" in m}
    members = []
    for file in files:
        info = described.get(file.resolve())
        if info is None:  # no manifest entry: the checkpoint says what it is
            ckpt = load_checkpoint(file, expected_domain="rsna_spine")
            pre = ckpt.get("preprocessing") or {}
            localizer = ckpt["model"]["target"] == LOCALIZER_CLASS
            info = {"stage": "localizer" if localizer else "classifier", "fold": pre.get("fold"),
                    **({"series_key": pre.get("series_key")} if localizer else {"group": pre.get("group")})}
        members.append({**{k: v for k, v in info.items() if k != "checkpoint"}, "path": file})
    return members


def _legacy_members(train_dir: Path) -> list[dict]:
    """Members of a run folder written before ensemble.json (models.json: {"folds": {fold: {...}}})."""
    manifest = json.loads((train_dir / LEGACY_MANIFEST).read_text(encoding="utf-8"))
    members = []
    for fold, entry in manifest.get("folds", {}).items():
        for key, rel in entry.get("localizer", {}).items():
            members.append({"path": train_dir / rel, "stage": "localizer", "fold": int(fold), "series_key": key})
        for group, paths in entry.get("classifier", {}).items():
            members.append({"path": train_dir / paths["best"], "stage": "classifier", "fold": int(fold),
                            "group": group})
    return members


def find_run_dir(explicit, configured, config_name: str, marker: str, what: str = "train_rsna.py") -> Path:
    """``explicit`` (a CLI option), else ``configured`` (paths.*), else the latest
    runs/rsna_spine/<config>/* holding ``marker``; a clear error when none qualifies."""
    for candidate in (explicit, configured):
        if candidate:
            path = Path(candidate)
            if not (path / marker).is_file():
                raise InputError(f"{path / marker} not found (is {path} a finished {what} run?)", path / marker)
            return path
    base = Path("runs") / "rsna_spine" / config_name
    runs = sorted(p for p in base.glob("*") if (p / marker).is_file()) if base.is_dir() else []
    if not runs:
        raise InputError(f"no {what} run with {marker} under {base}; pass its folder explicitly", base)
    return runs[-1]


def find_train_dir(explicit, cfg, config_name: str) -> Path:
    """--checkpoint (a run folder, an ensemble folder or a checkpoint file), else paths.train_dir, else the
    latest train_rsna.py run of this config (with ensemble.json)."""
    for candidate in (explicit, cfg["paths"]["train_dir"]):
        if candidate:
            path = Path(candidate)
            if not path.exists():
                raise CheckpointError(f"{path}: checkpoint not found")
            return path
    return find_run_dir(None, None, config_name, ENSEMBLE_MANIFEST)


def load_ensemble(members: Sequence[Mapping], folds: Sequence[int] | None, device, checkpoint: str = "best",
                  logger=None) -> dict:
    """{"localizer": {key: [(model, ckpt), ...]}, "classifier": [(model, ckpt), ...]} of the ``members`` of
    ``folds`` (None: all). ``checkpoint`` best | swa | last picks the classifier file of each job folder
    (the best one, with a log line, where that file does not exist)."""
    out: dict = {"localizer": {}, "classifier": []}
    for member in members:
        if folds is not None and member.get("fold") not in folds:
            continue
        path = Path(member["path"])
        if member["stage"] == "classifier" and checkpoint != "best" and path.name == "checkpoint_best.pt":
            chosen = path.with_name(f"checkpoint_{checkpoint}.pt")
            if chosen.is_file():
                path = chosen
            elif logger is not None:
                logger(f"predict.checkpoint={checkpoint}: {chosen} not found; using {path}")
        model, ckpt = load_model(path, device, "rsna_spine")
        if member["stage"] == "localizer":
            out["localizer"].setdefault(ckpt["preprocessing"]["series_key"], []).append((model, ckpt))
        else:
            out["classifier"].append((model, ckpt))
    return out


# ---------------------------------------------------------------------------------------- stage 1
@torch.no_grad()
def _heatmap_mean(models: list, volume: np.ndarray, device) -> torch.Tensor:
    """Mean heatmap probability over the ensemble, returned as log-probabilities (decodable as logits)."""
    x = torch.from_numpy(np.ascontiguousarray(volume, dtype=np.float32))[None, None].to(device)
    probs = None
    for model, _ in models:
        logits = model(x).float()
        p = torch.softmax(logits.flatten(2), dim=-1).view_as(logits)
        probs = p if probs is None else probs + p
    return torch.log(probs / len(models) + 1e-12)


def _sagittal_points(models: list, stack: Stack, device, window: int) -> tuple[np.ndarray, np.ndarray]:
    """(P, 3) canonical voxel coordinates and (P,) confidences from the sagittal localizers."""
    ckpt = models[0][1]
    volume, _ = resample_volume(stack, ckpt["preprocessing"]["grid"], ckpt["preprocessing"]["intensity"])
    coords, conf = decode_heatmaps(_heatmap_mean(models, volume, device), window)
    return output_to_voxel(coords[0].cpu().numpy(), stack.shape, ckpt["preprocessing"]["grid"]), conf[0].cpu().numpy()


def choose_axial_slice(stacks: list[Stack], point_mm: np.ndarray,
                       max_distance_mm: float = 0.0) -> tuple[Stack, int, float] | None:
    """The axial stack and slice nearest to a patient point (exact slice-plane distance in mm, in-plane
    inside, within the tolerance of :func:`rsna_spine.stacks.slice_tolerance_mm`); None if no slice is
    that close. Returns (stack, k, distance in mm). :func:`rsna_spine.stacks.assign_level_slice` says why not."""
    found = assign_level_slice(stacks, point_mm, max_distance_mm)
    return (found["stack"], found["k"], found["distance_mm"]) if found["ok"] else None


def localize_study(study_id: int, store: StackStore, localizers: Mapping, device, window: int = 2,
                   max_distance_mm: float = 0.0, misses: list | None = None, logger=None) -> pd.DataFrame:
    """Stage-1 centres of one study: a row per (condition, level) that could be located.

    Among several sagittal series (or stacks) of one description the localizer runs on the one chosen by
    :func:`rsna_spine.stacks.choose_stack` (coverage of the levels, then pixel size). Each level's axial slice
    carries its distance in mm (``slice_distance_mm``); a level with no axial slice within tolerance is
    appended to ``misses`` as {study_id, level, reason, distance_mm} (its subarticular rows fall back to
    class priors)."""
    rows = []
    level_anchor: dict = {}
    for key in ("sag_t2", "sag_t1"):
        stacks = store.stacks_of(study_id, key)
        if key not in localizers or not stacks:
            continue
        stack = choose_stack(stacks, logger=logger)
        kji, conf = _sagittal_points(localizers[key], stack, device, window)
        xyz = stack.voxel_to_patient(kji)
        for p, (condition, level) in enumerate(POINTS[key]):
            rows.append({"study_id": study_id, "condition": condition, "level": level, "series_id": stack.series_id,
                         "stack_index": stack.stack_index, "k": kji[p, 0], "j": kji[p, 1], "i": kji[p, 2],
                         "x_mm": xyz[p, 0], "y_mm": xyz[p, 1], "z_mm": xyz[p, 2], "confidence": conf[p],
                         "source": key, "slice_distance_mm": float("nan")})
            level_anchor.setdefault((key, level), []).append(xyz[p])
    axial = store.stacks_of(study_id, "axial_t2")
    if "axial_t2" in localizers and axial:
        models = localizers["axial_t2"]
        size = models[0][1]["preprocessing"]["grid"]
        intensity = models[0][1]["preprocessing"]["intensity"]
        for level in LEVELS:
            # anchor: the spinal-canal point of this level; else the midpoint of the two foramina
            anchors = level_anchor.get(("sag_t2", level)) or level_anchor.get(("sag_t1", level))
            if not anchors:
                continue
            found = assign_level_slice(axial, np.mean(anchors, axis=0), max_distance_mm)
            if not found["ok"]:
                if misses is not None:
                    misses.append({"study_id": study_id, "level": level, "reason": found["reason"],
                                   "distance_mm": found["distance_mm"]})
                continue
            stack, k, distance = found["stack"], found["k"], found["distance_mm"]
            plane, _ = resample_slice(stack, k, size, intensity)
            coords, conf = decode_heatmaps(_heatmap_mean(models, plane[None], device), window)
            kji = output_to_voxel(coords[0].cpu().numpy(), stack.shape, size, k)
            ji = kji[:, 1:]
            xyz = stack.voxel_to_patient(kji)
            for p, (condition, _) in enumerate(POINTS["axial_t2"]):
                rows.append({"study_id": study_id, "condition": condition, "level": level,
                             "series_id": stack.series_id, "stack_index": stack.stack_index, "k": float(k),
                             "j": ji[p, 0], "i": ji[p, 1], "x_mm": xyz[p, 0], "y_mm": xyz[p, 1], "z_mm": xyz[p, 2],
                             "confidence": float(conf[0, p]), "source": "axial_t2", "slice_distance_mm": distance})
    return pd.DataFrame(rows, columns=CENTER_COLUMNS)


def localize_studies(study_ids, store: StackStore, localizers: Mapping, device, window: int = 2,
                     logger=None, max_distance_mm: float = 0.0, misses: list | None = None) -> pd.DataFrame:
    """Stage-1 centres of ``study_ids``. Every level without an axial slice within tolerance is logged and
    appended to ``misses`` (when given) so the caller can count the rows that fall back to class priors."""
    for models in localizers.values():
        for model, _ in models:
            model.eval()
    frames = []
    misses = [] if misses is None else misses
    for study in study_ids:
        before = len(misses)
        frame = localize_study(int(study), store, localizers, device, window, max_distance_mm, misses, logger)
        if logger is not None:
            for miss in misses[before:]:
                logger(f"study {study} {miss['level']}: no axial slice for the subarticular points "
                       f"({miss['reason']}); class priors used")
            if len(frame) < len(CONDITIONS) * len(LEVELS):
                logger(f"study {study}: stage 1 located {len(frame)} of 25 points (missing series or no axial "
                       "stack at a level); the rest fall back to class priors")
        frames.append(frame)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(columns=CENTER_COLUMNS)


# ---------------------------------------------------------------------------------------- stage 2
def _collate(batch: list[dict]) -> dict:
    out = {"image": torch.stack([b["image"] for b in batch]),
           "level": torch.tensor([b["level"] for b in batch], dtype=torch.long),
           "condition": torch.tensor([b["condition"] for b in batch], dtype=torch.long),
           "label": torch.tensor([b["label"] for b in batch], dtype=torch.long),
           "index": torch.tensor([b["index"] for b in batch], dtype=torch.long)}
    if "second_image" in batch[0]:
        out["second_image"] = torch.stack([b["second_image"] for b in batch])
        out["second_present"] = torch.tensor([b["second_present"] for b in batch], dtype=torch.float32)
    return out


@torch.no_grad()
def run_classifier(model, items: list[dict], store: StackStore, ckpt: Mapping, device, batch_size: int,
                   flip: bool = False, timings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Softmax probabilities (n, 3) and attention (n, N) of one model, in the order of ``items``.

    A model trained with the second view (:mod:`rsna_spine.fusion`) gets it for the items of the fused
    groups (attached here when the caller has not). ``timings`` (optional) accumulates the seconds spent
    making crops (``crops_s``) and in the model (``model_s``)."""
    pre = ckpt["preprocessing"]
    second_view = uses_second_view(ckpt)
    if second_view and any("second_view" not in it for it in items):
        items = [dict(it) for it in items]
        attach_second_views(items, store, float(pre.get("second_view_max_distance_mm", 0.0)))
    dataset = CropDataset(items, store, pre["crop"], pre["intensity"], augment=None, flip=flip,
                          second_view=second_view)
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=_collate)
    model.eval()
    probs, attention = [], []
    timings = {} if timings is None else timings
    batches = iter(loader)
    while True:
        start = time.perf_counter()
        batch = next(batches, None)
        made = time.perf_counter()
        timings["crops_s"] = timings.get("crops_s", 0.0) + made - start
        if batch is None:
            break
        second = {}
        if second_view:
            second = {"second_images": batch["second_image"].to(device), "second_present": batch["second_present"]}
        out = model(batch["image"].to(device), batch["level"].to(device), batch["condition"].to(device), **second)
        probs.append(torch.softmax(out["logits"].float(), dim=1).cpu().numpy())
        attention.append(out["attention"].float().cpu().numpy())
        if device is not None and torch.device(device).type == "cuda":
            torch.cuda.synchronize(device)
        timings["model_s"] = timings.get("model_s", 0.0) + time.perf_counter() - made
    if not probs:
        return np.zeros((0, 3)), np.zeros((0, int(pre["crop"]["num_slices"])))
    return np.concatenate(probs), np.concatenate(attention)


def classify(items: list[dict], store: StackStore, classifiers: list, device, batch_size: int = 16,
             tta_flip: bool = True, timings: dict | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Ensemble (+ flip TTA) probabilities re-weighted for the metric, and mean attention weights.

    Each model only answers for the conditions it was trained on (``preprocessing.conditions``).
    Items no model covers get NaN rows. ``timings``: see :func:`run_classifier`.
    """
    if any("second_view" not in it for it in items):  # once for the ensemble, not per model and flip
        items = [dict(it) for it in items]
        attach_for_ensemble(items, store, classifiers)
    n = len(items)
    total, count = np.zeros((n, 3)), np.zeros(n)
    att_total, att_count = None, np.zeros(n)
    for model, ckpt in classifiers:
        pre = ckpt["preprocessing"]
        covered = np.array([it["condition"] in pre["conditions"] for it in items], dtype=bool)
        subset = [it for it, c in zip(items, covered) if c]
        if not subset:
            continue
        for flip in ([False, True] if tta_flip else [False]):
            p, a = run_classifier(model, subset, store, ckpt, device, batch_size, flip=flip, timings=timings)
            total[covered] += reweight_probabilities(p, pre["class_weights"])
            count[covered] += 1
            if not flip:  # attention of the unflipped view (slice order as stored)
                att_total = np.zeros((n, a.shape[1])) if att_total is None else att_total
                att_total[covered] += a
                att_count[covered] += 1
    with np.errstate(invalid="ignore", divide="ignore"):
        probs = total / count[:, None]
        attention = att_total / att_count[:, None] if att_total is not None else np.zeros((n, 0))
    probs[count == 0] = np.nan
    return probs, attention


def center_items(centers: pd.DataFrame, labels: pd.DataFrame | None = None) -> list[dict]:
    """Stage-2 items from stage-1 centres (label −1 when unknown)."""
    table = centers
    if labels is not None:
        table = centers.merge(labels[["study_id", "condition", "level", "label"]], how="left",
                              on=["study_id", "condition", "level"])
    items = []
    for r in table.itertuples():
        label = getattr(r, "label", -1)
        items.append({"study_id": int(r.study_id), "condition": r.condition, "level": r.level,
                      "label": int(label) if pd.notna(label) else -1, "series_id": int(r.series_id),
                      "stack_index": int(r.stack_index), "kji": (r.k, r.j, r.i)})
    return items


def group_conditions(group: str) -> list[str]:
    """Conditions a classifier of ``group`` answers for ("all" or a metric group)."""
    return list(CONDITIONS) if group == "all" else [c for c in CONDITIONS if GROUP_OF_CONDITION[c] == group]
