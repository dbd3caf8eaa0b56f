"""Scoring data sets with a trained run: one checkpoint, an ensemble (members loaded one at a time), or
MC dropout. Shared by train_lensing.py (validation each epoch) and validate_lensing.py."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader

from common.checkpoint import load_model, resolve_checkpoints
from common.ensembling import mc_dropout_predict
from common.runlog import progress
from common.runtime import AmpPolicy


@torch.no_grad()
def predict_logits(model: torch.nn.Module, loader: DataLoader, device: torch.device, amp: AmpPolicy | None = None,
                   is_main: bool = True, desc: str = "predict") -> tuple[np.ndarray, np.ndarray]:
    """Logits and dataset indices over a loader (eval mode)."""
    model.eval()
    logits, indices = [], []
    for batch in progress(loader, desc=desc, is_main=is_main):
        x = batch["input"].to(device, non_blocking=True)
        if amp is not None:
            with amp.autocast():
                out = model(x)
        else:
            out = model(x)
        logits.append(out["logit"].float().cpu().numpy())
        indices.append(batch["index"].numpy())
    return np.concatenate(logits), np.concatenate(indices)


@torch.no_grad()
def predict_mc_dropout(model: torch.nn.Module, loader: DataLoader, device: torch.device, n_samples: int,
                       is_main: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean logit, logit variance over ``n_samples`` dropout passes (common.ensembling), and indices."""
    means, variances, indices = [], [], []
    forward = lambda m, x: m(x)["logit"]  # noqa: E731
    for batch in progress(loader, desc="mc dropout", is_main=is_main):
        mean, var = mc_dropout_predict(model, batch["input"].to(device), n_samples=n_samples, forward=forward)
        means.append(mean.float().cpu().numpy())
        variances.append(var.float().cpu().numpy())
        indices.append(batch["index"].numpy())
    return np.concatenate(means), np.concatenate(variances), np.concatenate(indices)


def score_run(checkpoint: str | Path, loader: DataLoader, device: torch.device, amp: AmpPolicy | None = None,
              mc_dropout_samples: int = 0, is_main: bool = True, log=print) -> dict:
    """Score every item of ``loader`` with every model ``checkpoint`` names (a checkpoint file, a run folder
    or an ensemble folder: common.checkpoint.resolve_checkpoints), one model in memory at a time.

    Returns logit (member mean), logit_member_std, mc_dropout logit std (when requested), indices,
    probability = sigmoid(mean logit), the first checkpoint (for its preprocessing metadata) and member count.
    """
    paths = resolve_checkpoints(checkpoint)
    member_logits, mc_std, indices, first_ckpt = [], None, None, None
    for i, path in enumerate(paths):
        model, ckpt = load_model(path, device=device, expected_domain="lensing")
        first_ckpt = first_ckpt or ckpt
        if mc_dropout_samples > 0:
            mean, var, idx = predict_mc_dropout(model, loader, device, mc_dropout_samples, is_main)
            member_logits.append(mean)
            mc_std = np.sqrt(var) if mc_std is None else mc_std + np.sqrt(var)
        else:
            logits, idx = predict_logits(model, loader, device, amp, is_main, desc=f"member {i + 1}/{len(paths)}")
            member_logits.append(logits)
        if indices is not None and not np.array_equal(indices, idx):
            raise RuntimeError("loader order changed between ensemble members; use a loader without shuffling")
        indices = idx
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        log(f"[lensing] scored {len(idx)} cutouts with {path}")
    stacked = np.stack(member_logits)
    mean_logit = stacked.mean(axis=0)
    out = {"logit": mean_logit, "probability": 1.0 / (1.0 + np.exp(-mean_logit)), "index": indices,
           "logit_member_std": stacked.std(axis=0), "n_members": len(paths), "checkpoint": first_ckpt,
           "checkpoint_paths": [str(p) for p in paths]}
    if mc_std is not None:
        out["logit_mc_dropout_std"] = mc_std / len(paths)
    return out
