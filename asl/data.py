"""From phantoms to network batches and from network outputs to maps.

- :func:`model_kwargs` / :func:`preprocessing_meta`: what goes into a checkpoint so that inference needs
  nothing else (physics, S_ref input scale, target statistics).
- :func:`make_batch`: on-device physics draw, signals, noise and input scaling for a batch of anatomies.
- :func:`predict_maps`: ensemble / MC-dropout inference returning CBF/ATT in physical units with variances.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from asl.models import head_variance
from asl.physics import check_physics, reference_signal
from asl.simulate import (
    PhantomDataset,
    add_noise,
    motion_shift,
    physics_params_from_uniforms,
    simulate_clean,
    snr_from_uniform,
)
from common.ensembling import enable_mc_dropout


def model_kwargs(cfg: Mapping, stats: Mapping | None = None) -> tuple[str, dict]:
    """(class path, plain kwargs) of the configured network; channel counts come from the physics, the
    CBF statistics (kernel CBF head) from ``stats``."""
    physics = cfg["physics"]
    check_physics(physics)
    n_pld = len(physics["plds_ms"])
    model = dict(cfg["model"])
    target = model.pop("target")
    model["n_pcasl"] = n_pld if "pcasl" in physics["modes"] else 0
    model["n_vsasl"] = n_pld if "vsasl" in physics["modes"] else 0
    model["features"] = [int(f) for f in model["features"]]
    model["multi_scale_factors"] = [int(f) for f in model["multi_scale_factors"]]
    if model["physics_features"]:
        model["physics"] = dict(physics)
    if stats is not None:
        model["cbf_mean"], model["cbf_std"] = float(stats["cbf_mean"]), float(stats["cbf_std"])
    return target, model


def target_stats(cfg: Mapping, n_phantoms: int) -> dict:
    """Mean/std of CBF and ATT over brain voxels of the first training phantoms (z-scoring of targets)."""
    ds = PhantomDataset(n_phantoms, int(cfg["seed"]), cfg["phantom"])
    cbf, att = [], []
    for i in range(int(n_phantoms)):
        item = ds[i]
        m = item["mask"].numpy()
        cbf.append(item["cbf"].numpy()[m])
        att.append(item["att"].numpy()[m])
    cbf, att = np.concatenate(cbf), np.concatenate(att)
    return {"cbf_mean": float(cbf.mean()), "cbf_std": float(cbf.std()),
            "att_mean": float(att.mean()), "att_std": float(att.std())}


def preprocessing_meta(cfg: Mapping, stats: Mapping) -> dict:
    """Checkpoint ``preprocessing`` field: everything inference needs besides the weights."""
    physics = dict(cfg["physics"])
    return {"physics": physics, "input_scale": reference_signal(physics), "target_stats": dict(stats),
            "channels": [f"{m}_{int(p)}" for m in physics["modes"] for p in physics["plds_ms"]],
            "fit": dict(cfg["fit"]), "normalization_mode": cfg["model"]["normalization_mode"]}


def make_batch(batch: Mapping, cfg: Mapping, device: torch.device, generator: torch.Generator,
               width: float = 1.0, snr_floor: float | None = None) -> dict:
    """Simulate a training batch on ``device``: per-phantom physics (randomization ``width``), clean
    signals, optional misregistration, noise at the drawn SNR; inputs scaled by S_ref (nominal).

    Returns x (B,C,H,W) network input, clean_x (noise-free input), cbf/att (B,1,H,W), mask (B,1,H,W) bool,
    params (per-phantom physics), snr (B,).
    """
    physics, rand, noise = cfg["physics"], cfg["randomization"], cfg["noise"]
    cbf = batch["cbf"].to(device, torch.float32)
    att = batch["att"].to(device, torch.float32)
    mask = batch["mask"].to(device)
    params = physics_params_from_uniforms(batch["u_phys"].to(device, torch.float32), physics, rand, width)
    clean = simulate_clean(cbf, att, physics, params)
    s_ref = reference_signal(physics)
    snr = snr_from_uniform(batch["u_snr"].to(device, torch.float32), noise["train_snr_range"],
                           noise["train_snr_values"])
    if snr_floor is not None:  # curriculum: high SNR first
        snr = snr.clamp_min(float(snr_floor))
    shift = float(rand["motion_shift_px"]) * width if rand["enabled"] else 0.0
    moved = motion_shift(clean, shift, generator)
    noisy = add_noise(moved, s_ref / snr, noise["kind"], generator)
    return {"x": noisy / s_ref, "clean_x": clean / s_ref, "cbf": cbf[:, None], "att": att[:, None],
            "mask": mask[:, None], "params": params, "snr": snr}


def normalize_targets(cbf, att, stats: Mapping):
    return (cbf - stats["cbf_mean"]) / stats["cbf_std"], (att - stats["att_mean"]) / stats["att_std"]


def pad_to_multiple(x: torch.Tensor, multiple: int) -> tuple[torch.Tensor, tuple[int, int]]:
    """Zero-pad H and W at the bottom/right to a multiple (U-Net pooling); returns the original size."""
    h, w = x.shape[-2:]
    ph, pw = (-h) % multiple, (-w) % multiple
    return (F.pad(x, (0, pw, 0, ph)) if ph or pw else x), (h, w)


def required_multiple(model: torch.nn.Module) -> int:
    levels = len(getattr(model, "features", [1]))
    return (2 ** (levels - 1)) * max(getattr(model, "scales", [1]))


@torch.no_grad()
def _forward_maps(model, x: torch.Tensor, stats: Mapping) -> dict:
    xp, (h, w) = pad_to_multiple(x, required_multiple(model))
    out = model(xp)
    res = {"cbf": out["cbf"][..., :h, :w] * stats["cbf_std"] + stats["cbf_mean"],
           "att": out["att"][..., :h, :w] * stats["att_std"] + stats["att_mean"]}
    if "log_var_cbf" in out:
        res["aleatoric_var_cbf"] = head_variance(out["log_var_cbf"][..., :h, :w]) * stats["cbf_std"] ** 2
        res["aleatoric_var_att"] = head_variance(out["log_var_att"][..., :h, :w]) * stats["att_std"] ** 2
    return {k: v[:, 0].float() for k, v in res.items()}


@torch.no_grad()
def predict_maps(models: Sequence[torch.nn.Module], x: torch.Tensor, stats: Mapping, batch_size: int = 16,
                 mc_samples: int = 0, mc_rate: float | None = None) -> dict:
    """CBF/ATT maps (physical units) of x (N,C,H,W) from an ensemble (mean over members).

    Returns numpy arrays (N,H,W): cbf, att; ``epistemic_var_*`` = variance across members (0 for one
    member) or, with ``mc_samples`` > 0, across MC-dropout passes of every member; ``aleatoric_var_*`` =
    mean predicted variance of the log-variance heads (when present); ``total_var_*`` their sum.
    """
    outs: dict[str, list] = {}
    device = next(models[0].parameters()).device
    for start in range(0, x.shape[0], batch_size):
        xb = x[start:start + batch_size].to(device, torch.float32)
        samples = []
        for model in models:
            if mc_samples > 0:
                old = {}
                if enable_mc_dropout(model) == 0:
                    raise ValueError("MC dropout needs a model trained with model.dropout > 0")
                if mc_rate is not None:
                    for mod in model.modules():
                        if isinstance(mod, torch.nn.modules.dropout._DropoutNd):
                            old[mod] = mod.p
                            mod.p = float(mc_rate)
                try:
                    samples += [_forward_maps(model, xb, stats) for _ in range(int(mc_samples))]
                finally:
                    for mod, p in old.items():
                        mod.p = p
                    model.eval()
            else:
                model.eval()
                samples.append(_forward_maps(model, xb, stats))
        res = {}
        for key in ("cbf", "att"):
            stack = torch.stack([s[key] for s in samples])
            res[key] = stack.mean(0)
            res[f"epistemic_var_{key}"] = stack.var(0, unbiased=False) if len(samples) > 1 else torch.zeros_like(stack[0])
            if f"aleatoric_var_{key}" in samples[0]:
                res[f"aleatoric_var_{key}"] = torch.stack([s[f"aleatoric_var_{key}"] for s in samples]).mean(0)
                res[f"total_var_{key}"] = res[f"epistemic_var_{key}"] + res[f"aleatoric_var_{key}"]
            else:
                res[f"total_var_{key}"] = res[f"epistemic_var_{key}"]
        for k, v in res.items():
            outs.setdefault(k, []).append(v.cpu().numpy())
    return {k: np.concatenate(v) for k, v in outs.items()}


def load_ensemble(paths, device="cpu") -> tuple[list[torch.nn.Module], list[dict]]:
    """Models of one or more ``--checkpoint`` paths: a checkpoint file, a run folder (its ensemble.json members,
    else its checkpoint, else every ``member_<i>/`` checkpoint) or an ensemble folder
    (common.checkpoint.resolve_checkpoints). Each is rebuilt from its checkpoint alone (the class recorded in
    the file, never one named here); a checkpoint of another domain is refused. All members must share the
    physics and input scale."""
    from pathlib import Path

    from common.checkpoint import CheckpointError, load_model, resolve_checkpoints

    paths = paths if isinstance(paths, (list, tuple)) else [paths]
    files = [f for path in paths for f in resolve_checkpoints(Path(path))]
    models, ckpts = [], []
    for f in files:
        model, ckpt = load_model(f, device=device, expected_domain="asl")
        if "physics" not in ckpt.get("preprocessing", {}):
            raise CheckpointError(f"{f}: field 'preprocessing.physics' is missing (not written by train_asl.py)")
        if hasattr(model, "load_sigma_scale"):  # protocol-conditioned networks: post-hoc σ scale (asl.protocol_net)
            try:
                model.load_sigma_scale(ckpt)
            except ValueError as exc:
                raise CheckpointError(f"{f}: {exc}") from None
        models.append(model)
        ckpts.append(ckpt)
    first = ckpts[0]["preprocessing"]
    for f, ckpt in zip(files[1:], ckpts[1:]):
        prep = ckpt["preprocessing"]
        for key in ("physics", "input_scale", "target_stats"):
            if prep[key] != first[key]:
                raise CheckpointError(f"{f}: field 'preprocessing.{key}' differs from {files[0]}; "
                                      "ensemble members must share it")
    return models, ckpts


def checkpoint_paths(args, parser) -> list:
    """The models named on the command line: ``--checkpoint PATH`` (file, run folder or ensemble folder) and,
    still accepted with a deprecation note, the old positional run folders / checkpoint files."""
    import sys

    old = list(getattr(args, "checkpoints", None) or [])
    if old:
        print("note: positional checkpoints are deprecated; use --checkpoint PATH", file=sys.stderr)
    paths = ([args.checkpoint] if args.checkpoint is not None else []) + old
    if not paths:
        parser.error("--checkpoint PATH is required (a checkpoint file, a run folder or an ensemble folder)")
    return paths


def fixed_set_from_args(args):
    """``--data`` names the data folder (holding test.npz). The old ``--data FILE.npz`` still names the test
    set itself, with a deprecation note; it is then taken off ``args.data`` so data.dir keeps its value."""
    import sys

    if args.data is not None and args.data.suffix == ".npz":
        print("note: --data FILE.npz is deprecated; use --data DIR (the folder holding test.npz)", file=sys.stderr)
        path, args.data = args.data, None
        return path
    return None
