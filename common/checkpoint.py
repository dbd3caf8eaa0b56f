"""Checkpoints that rebuild their model on their own (nnU-Net style), written atomically.

A checkpoint is a dict of plain Python types and tensors, loadable with ``torch.load(weights_only=True)``:

    project, format_version, domain, created, git_sha, versions
    model: {"target": "asl.models.SpatialASLNet", "kwargs": {...}}   # class path + constructor arguments
    state_dict                                                       # unwrapped from DDP / torch.compile
    optimizer, scheduler, scaler, rng                                # full training state (optional)
    epoch, step, best_metric, best_metric_name
    config, preprocessing, extra                                     # resolved config, data metadata

Models are built with :func:`build_model`, which records ``model_spec`` on the instance so that
:func:`save_checkpoint` stores the class path and arguments without the caller repeating them.
Validation calls :func:`load_model` and never names a model class.
"""

from __future__ import annotations

import datetime as _dt
import importlib
import math
import random
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch

from common.runtime import unwrap_model

PROJECT_TAG = "imaging-pipelines"
FORMAT_VERSION = 1
ENSEMBLE_MANIFEST = "ensemble.json"
ENSEMBLE_FORMAT = "imaging-pipelines-ensemble"

# Classes a checkpoint may name, filled by @register_model in each domain's model modules. Nothing else
# is ever instantiated from a checkpoint, whatever package it lives in.
_MODEL_REGISTRY: dict[str, type] = {}


class CheckpointError(RuntimeError):
    """A file that is not a usable checkpoint of this project; the message names the file and why."""


# ----------------------------------------------------------------------------------------- model spec
def _check_plain(value: Any, where: str) -> None:
    """Model kwargs must be plain data (they are saved and must rebuild the model without code)."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return
    if isinstance(value, (list, tuple)):
        for i, item in enumerate(value):
            _check_plain(item, f"{where}[{i}]")
        return
    if isinstance(value, Mapping):
        for key, item in value.items():
            if not isinstance(key, str):
                raise TypeError(f"{where}: keys must be str, got {type(key).__name__}")
            _check_plain(item, f"{where}.{key}")
        return
    raise TypeError(f"{where}: {type(value).__name__} is not plain data (use int/float/str/bool/list/dict)")


def register_model(cls=None, *, name: str | None = None):
    """Class decorator: allow checkpoints to rebuild ``cls`` (an ``nn.Module``) as ``module.ClassName``.

        @register_model
        class SpatialASLNet(nn.Module): ...
    """
    def add(klass):
        if not (isinstance(klass, type) and issubclass(klass, torch.nn.Module)):
            raise TypeError(f"register_model: {klass!r} is not an nn.Module class")
        module = klass.__module__
        if module == "__main__":  # a script run directly: register under its importable name as well
            module = getattr(__import__("__main__"), "__spec__", None)
            module = module.name if module is not None else "__main__"
        _MODEL_REGISTRY[name or f"{module}.{klass.__qualname__}"] = klass
        return klass
    return add(cls) if cls is not None else add


def registered_models() -> dict[str, type]:
    return dict(_MODEL_REGISTRY)


# Folders whose top-level packages are this project's (tests may add a generated domain's root).
PROJECT_ROOTS = [Path(__file__).resolve().parent.parent]


def project_packages() -> tuple[str, ...]:
    """Top-level packages of this project: folders beside ``common/`` with an ``__init__.py`` (a new domain
    is found without editing anything here)."""
    return tuple(sorted({p.name for root in PROJECT_ROOTS for p in Path(root).iterdir()
                         if p.is_dir() and (p / "__init__.py").is_file() and p.name not in ("tests", "tools")}))


def _import_target(target: str):
    """The registered class named ``target``. The target's own module may be imported (project packages
    only; importing runs no code of a checkpoint's choosing), but only a class that module registered
    with :func:`register_model` is returned: any other callable is refused before anything is called."""
    if not isinstance(target, str) or "." not in target:
        raise CheckpointError(f"model target must be 'package.module.Class', got {target!r}")
    if target in _MODEL_REGISTRY:
        return _MODEL_REGISTRY[target]
    module_name, _, class_name = target.rpartition(".")
    if module_name.split(".")[0] not in project_packages():
        raise CheckpointError(
            f"model target '{target}' is outside this project's packages {project_packages()}")
    try:
        importlib.import_module(module_name)
    except ImportError as exc:
        raise CheckpointError(f"cannot import the module of model class '{target}': {exc}") from exc
    if target not in _MODEL_REGISTRY:
        raise CheckpointError(f"model target '{target}' is not a registered model class "
                              "(common.checkpoint.register_model); refusing to call it")
    return _MODEL_REGISTRY[target]


def build_model(target: str, kwargs: Mapping | None = None) -> torch.nn.Module:
    """Instantiate ``target`` (a class path) with plain ``kwargs`` and record the spec on the model."""
    kwargs = dict(kwargs or {})
    _check_plain(kwargs, f"{target} kwargs")
    cls = _import_target(target)
    model = cls(**kwargs)
    model.model_spec = {"target": target, "kwargs": kwargs}
    return model


def model_spec(model: torch.nn.Module) -> dict:
    """The {target, kwargs} recorded by :func:`build_model` (or set by hand on the model)."""
    spec = getattr(unwrap_model(model), "model_spec", None)
    if spec is None:
        raise CheckpointError(
            f"{type(unwrap_model(model)).__name__} has no model_spec: create it with "
            "common.checkpoint.build_model(target, kwargs) so the checkpoint can rebuild it")
    return spec


def clean_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """Strip the 'module.' (DDP) and '_orig_mod.' (torch.compile) prefixes."""
    out = {}
    for key, value in state_dict.items():
        for prefix in ("module.", "_orig_mod."):
            while key.startswith(prefix):
                key = key[len(prefix):]
        out[key] = value
    return out


# ------------------------------------------------------------------------------------------ rng state
def capture_rng_state() -> dict:
    """torch / numpy / python RNG states as tensors and plain types (weights_only-loadable)."""
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"keys": torch.from_numpy(np_state[1].astype(np.int64)), "pos": int(np_state[2]),
                  "has_gauss": int(np_state[3]), "cached_gaussian": float(np_state[4])},
        "python": _python_state_to_plain(random.getstate()),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _python_state_to_plain(state):
    version, internal, gauss = state
    return {"version": version, "internal": list(internal), "gauss": gauss}


def restore_rng_state(state: Mapping) -> None:
    if not state:
        return
    torch.set_rng_state(state["torch"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32), np_state["pos"],
                         np_state["has_gauss"], np_state["cached_gaussian"]))
    py = state["python"]
    random.setstate((py["version"], tuple(py["internal"]), py["gauss"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ----------------------------------------------------------------------------------------------- save
def environment_versions() -> dict:
    import platform
    import sys
    return {"python": sys.version.split()[0], "torch": str(torch.__version__), "numpy": str(np.__version__),
            "platform": platform.platform()}


def git_sha(cwd: str | Path | None = None) -> str | None:
    """Commit of the working tree (None outside git); reads .git directly so git need not be installed."""
    start = Path(cwd or Path(__file__).resolve().parent)
    for folder in [start, *start.parents]:
        git_dir = folder / ".git"
        if git_dir.is_file():  # a worktree or submodule: ".git" names the real folder ("gitdir: PATH")
            text = git_dir.read_text().strip()
            if not text.startswith("gitdir: "):
                return None
            git_dir = (folder / text[8:]).resolve()
        if git_dir.is_dir():
            head = (git_dir / "HEAD").read_text().strip()
            # a worktree keeps its HEAD; branches and packed refs live in the main repository ("commondir")
            common = git_dir / (git_dir / "commondir").read_text().strip() if (git_dir / "commondir").is_file() else git_dir
            if head.startswith("ref: "):
                ref = head[5:]
                for ref_file in (git_dir / ref, common / ref):
                    if ref_file.is_file():
                        return ref_file.read_text().strip()
                packed = common / "packed-refs"
                if packed.is_file():
                    for line in packed.read_text().splitlines():
                        if line.endswith(" " + ref):
                            return line.split()[0]
                return None
            return head
    return None


def _to_plain_number(value):
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def atomic_torch_save(obj: Any, path: str | Path) -> Path:
    """torch.save through :func:`common.runlog.atomic_open` (temporary file, fsync, rename).

    A crash mid-write leaves the previous file intact and no half-written checkpoint under ``path``.
    """
    from common.runlog import atomic_open

    from common.errors import is_disk_full

    try:
        with atomic_open(path) as handle:
            torch.save(obj, handle)
    except (RuntimeError, OSError) as exc:
        if is_disk_full(exc) or "inline_container" in str(exc):
            raise OSError(28, f"disk full (or write error) while saving the checkpoint: "
                              f"{str(exc).splitlines()[0][:200]}", str(path)) from exc
        raise
    return Path(path)


def save_checkpoint(path: str | Path, model: torch.nn.Module, *, domain: str, config: Mapping | None = None,
                    optimizer=None, scheduler=None, scaler=None, epoch: int = 0, step: int = 0,
                    best_metric: float | None = None, best_metric_name: str | None = None,
                    preprocessing: Mapping | None = None, extra: Mapping | None = None,
                    include_rng: bool = True, spec: Mapping | None = None) -> Path:
    """Write a checkpoint atomically (see the module docstring for its contents)."""
    spec = dict(spec) if spec is not None else model_spec(model)
    state = {
        "project": PROJECT_TAG,
        "format_version": FORMAT_VERSION,
        "domain": domain,
        "created": _dt.datetime.now().isoformat(timespec="seconds"),
        "git_sha": git_sha(),
        "versions": environment_versions(),
        "model": {"target": spec["target"], "kwargs": dict(spec["kwargs"])},
        "state_dict": clean_state_dict(unwrap_model(model).state_dict()),
        "optimizer": optimizer.state_dict() if optimizer is not None else None,
        "scheduler": scheduler.state_dict() if scheduler is not None else None,
        "scaler": scaler.state_dict() if scaler is not None else None,
        "rng": capture_rng_state() if include_rng else None,
        "epoch": int(epoch),
        "step": int(step),
        "best_metric": _to_plain_number(best_metric),
        "best_metric_name": best_metric_name,
        "config": dict(config) if config is not None else {},
        "preprocessing": dict(preprocessing) if preprocessing is not None else {},
        "extra": dict(extra) if extra is not None else {},
    }
    return atomic_torch_save(state, path)


# ----------------------------------------------------------------------------------------------- load
def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    expected_domain: str | None = None) -> dict:
    """Load and validate a checkpoint (``weights_only=True``: no arbitrary code runs).

    Accepts a checkpoint file or a run folder (then ``checkpoint_best.pt``, else ``checkpoint_last.pt``).
    """
    path = resolve_checkpoint_path(path)
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as exc:  # pickle errors, truncated zip, unsafe globals ...
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        reason = next((line for line in lines if "error" in line.lower()), lines[0] if lines else "")
        raise CheckpointError(f"{path}: not a readable checkpoint of this project "
                              f"({type(exc).__name__}: {reason[:300]})") from exc
    if not isinstance(ckpt, dict) or ckpt.get("project") != PROJECT_TAG:
        raise CheckpointError(f"{path}: not a checkpoint of this project (no '{PROJECT_TAG}' tag)")
    version = ckpt.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{path}: checkpoint format version {version} is not supported "
                              f"(this code reads version {FORMAT_VERSION})")
    if expected_domain is not None and ckpt.get("domain") != expected_domain:
        raise CheckpointError(f"{path}: field 'domain' is '{ckpt.get('domain')}', but a '{expected_domain}' "
                              "checkpoint is needed here")
    for field in ("model", "state_dict"):
        if field not in ckpt:
            raise CheckpointError(f"{path}: missing field '{field}'")
    return ckpt


def resolve_checkpoint_path(path: str | Path) -> Path:
    """A checkpoint file, or the best (else last) checkpoint of a run folder."""
    path = Path(path)
    if path.is_dir():
        for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
            if (path / name).is_file():
                return path / name
        raise CheckpointError(f"{path}: folder holds neither checkpoint_best.pt nor checkpoint_last.pt")
    if not path.is_file():
        raise CheckpointError(f"checkpoint not found: {path}")
    return path


def model_from_checkpoint(ckpt: Mapping, device: str | torch.device = "cpu") -> torch.nn.Module:
    """Rebuild the model class recorded in ``ckpt`` and load its weights (strict)."""
    spec = ckpt["model"]
    model = build_model(spec["target"], spec.get("kwargs", {}))
    try:
        model.load_state_dict(ckpt["state_dict"], strict=True)
    except RuntimeError as exc:
        raise CheckpointError(f"weights do not fit {spec['target']}: {exc}") from exc
    return model.to(device).eval()


def load_model(path: str | Path, device: str | torch.device = "cpu",
               expected_domain: str | None = None) -> tuple[torch.nn.Module, dict]:
    """Load a checkpoint file or run folder and rebuild its model, in eval mode on ``device``."""
    ckpt = load_checkpoint(path, expected_domain=expected_domain)
    return model_from_checkpoint(ckpt, device), ckpt


def restore_training_state(ckpt: Mapping, model: torch.nn.Module, optimizer=None, scheduler=None,
                           scaler=None, restore_rng: bool = True) -> dict:
    """Load weights and optimizer/scheduler/scaler/RNG state into live objects for ``--resume``.

    Returns {"epoch", "step", "best_metric"}; training continues at ``epoch + 1``.
    """
    unwrap_model(model).load_state_dict(ckpt["state_dict"], strict=True)
    if optimizer is not None and ckpt.get("optimizer") is not None:
        optimizer.load_state_dict(ckpt["optimizer"])
    if scheduler is not None and ckpt.get("scheduler") is not None:
        scheduler.load_state_dict(ckpt["scheduler"])
    if scaler is not None and ckpt.get("scaler") is not None:
        scaler.load_state_dict(ckpt["scaler"])
    if restore_rng and ckpt.get("rng"):
        restore_rng_state(ckpt["rng"])
    return {"epoch": int(ckpt.get("epoch", 0)), "step": int(ckpt.get("step", 0)),
            "best_metric": ckpt.get("best_metric")}


# --------------------------------------------------------------------------------------- ensembles
def write_ensemble_manifest(folder: str | Path, members: list[str | Path], **info: Any) -> Path:
    """``ensemble.json`` (one format for every domain): member checkpoints relative to ``folder``."""
    from common.runlog import write_json

    folder = Path(folder)

    def relative(member) -> str:
        member = Path(member)
        if not member.is_absolute() and (folder / member).is_file():
            return member.as_posix()  # already relative to the folder
        try:
            return member.resolve().relative_to(folder.resolve()).as_posix()
        except ValueError:
            raise CheckpointError(f"{folder / ENSEMBLE_MANIFEST}: member {member} is not inside {folder}") from None

    rel = [relative(m) for m in members]
    return write_json(folder / ENSEMBLE_MANIFEST, {"format": ENSEMBLE_FORMAT, "version": 1, "members": rel, **info})


def resolve_checkpoints(path: str | Path) -> list[Path]:
    """What ``--checkpoint PATH`` names, as a list of checkpoint files:

    - a checkpoint file: itself;
    - a folder with ``ensemble.json``: its members, in order;
    - a run folder with ``checkpoint_best.pt`` / ``checkpoint_last.pt``: that one;
    - a run folder of a sequential ensemble: every ``member_<i>/`` checkpoint, by member index.
    """
    import json

    path = Path(path)
    if path.is_file():
        return [path]
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    manifest = path / ENSEMBLE_MANIFEST
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text(encoding="utf-8"))
        except ValueError as exc:
            raise CheckpointError(f"{manifest}: not valid JSON ({exc})") from exc
        if data.get("format") != ENSEMBLE_FORMAT or not isinstance(data.get("members"), list):
            raise CheckpointError(f"{manifest}: field 'format' must be '{ENSEMBLE_FORMAT}' with a 'members' list")
        members = [path / m for m in data["members"]]
        missing = [m for m in members if not m.is_file()]
        if missing:
            raise CheckpointError(f"{manifest}: member checkpoint(s) missing: {[str(m) for m in missing]}")
        if not members:
            raise CheckpointError(f"{manifest}: field 'members' is empty")
        return members
    for name in ("checkpoint_best.pt", "checkpoint_last.pt"):
        if (path / name).is_file():
            return [path / name]
    members = []
    for member in path.glob("member_*"):
        suffix = member.name[len("member_"):]
        if member.is_dir() and suffix.isdigit():
            found = next((member / n for n in ("checkpoint_best.pt", "checkpoint_last.pt") if (member / n).is_file()),
                         None)
            if found is not None:
                members.append((int(suffix), found))
    if members:
        return [p for _, p in sorted(members)]
    raise CheckpointError(f"{path}: no checkpoint here (neither a .pt file, {ENSEMBLE_MANIFEST}, "
                          "checkpoint_best.pt / checkpoint_last.pt, nor member_<i>/ folders)")


# ---------------------------------------------------------------------------------------- warm start
def warm_start(model: torch.nn.Module, path: str | Path, min_fraction: float = 0.9, log=print,
               expected_domain: str | None = None) -> dict:
    """Initialise ``model`` from another checkpoint's weights, tensor by tensor where name and shape match.

    Reports matched / missing / unexpected / shape-mismatched keys and refuses (CheckpointError) when fewer
    than ``min_fraction`` of the model's tensors are matched: a checkpoint of another model loads nothing
    useful and must not be reported as a warm start.
    """
    ckpt = load_checkpoint(path, expected_domain=expected_domain)
    source = ckpt["state_dict"]
    target = unwrap_model(model).state_dict()
    matched = [k for k in target if k in source and tuple(source[k].shape) == tuple(target[k].shape)]
    shape_mismatch = [k for k in target if k in source and k not in matched]
    missing = [k for k in target if k not in source]
    unexpected = [k for k in source if k not in target]
    fraction = len(matched) / max(len(target), 1)
    report = {"checkpoint": str(resolve_checkpoint_path(path)), "matched": len(matched), "total": len(target),
              "fraction": fraction, "missing": missing, "unexpected": unexpected, "shape_mismatch": shape_mismatch}
    if fraction < min_fraction:
        raise CheckpointError(
            f"{report['checkpoint']}: only {len(matched)} of {len(target)} tensors fit this model "
            f"({fraction:.0%} < required {min_fraction:.0%}; model {ckpt['model'].get('target')}); "
            f"first missing: {missing[:3]}, shape mismatch: {shape_mismatch[:3]}")
    unwrap_model(model).load_state_dict({k: source[k] for k in matched}, strict=False)
    log(f"initialised {len(matched)}/{len(target)} tensors from {report['checkpoint']} "
        f"({len(missing)} missing, {len(unexpected)} unexpected, {len(shape_mismatch)} shape mismatches)")
    return report


def apply_ema_weights(model: torch.nn.Module, ckpt: Mapping) -> bool:
    """Load the EMA shadow weights a checkpoint carries in ``extra.ema`` (as written by
    :class:`common.ensembling.EMA`) into ``model``; returns False when it has none."""
    ema = (ckpt.get("extra") or {}).get("ema")
    if not ema or not ema.get("shadow"):
        return False
    state = unwrap_model(model).state_dict()
    shadow = ema["shadow"]
    missing = [k for k in state if k not in shadow and state[k].is_floating_point()]
    if missing:
        raise CheckpointError(f"EMA weights in the checkpoint lack {len(missing)} tensors, e.g. {missing[:3]}")
    unwrap_model(model).load_state_dict(
        {k: (shadow[k].to(v.dtype) if k in shadow else v) for k, v in state.items()}, strict=True)
    return True
