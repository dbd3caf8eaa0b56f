"""Run folders and what goes in them: config.yaml, env.json, log.txt, metrics.csv, summary.json.

``runs/<domain>/<config name>/<timestamp>/`` unless ``--output-dir`` is given. Under torchrun only rank
0 writes; other ranks get a logger that prints nothing and writes nothing. ``summary.json`` is written
last and atomically, so a run folder without it is visibly incomplete.
"""

from __future__ import annotations

import contextlib
import csv
import datetime as _dt
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from common.runtime import safe_print


def timestamp() -> str:
    return _dt.datetime.now().strftime("%Y%m%d-%H%M%S")


def create_run_dir(domain: str, config_name: str, output_dir: str | Path | None = None,
                   root: str | Path = "runs", create: bool = True) -> Path:
    """``output_dir`` if given, else a new ``root/domain/config_name/<timestamp>`` (suffixed if taken)."""
    if output_dir is not None:
        run_dir = Path(output_dir)
    else:
        base = Path(root) / domain / config_name
        run_dir = base / timestamp()
        suffix = 1
        while run_dir.exists():
            run_dir = base / f"{timestamp()}-{suffix}"
            suffix += 1
    if create:
        run_dir.mkdir(parents=True, exist_ok=True)
    return run_dir


def latest_run_dir(domain: str, config_name: str, root: str | Path = "runs",
                   accept: Callable[[Path], bool] | None = None) -> Path | None:
    """Most recent run folder of this domain/config that ``accept`` takes (default: holds checkpoint_last.pt),
    for ``--resume`` without a path."""
    base = Path(root) / domain / config_name
    if not base.is_dir():
        return None
    accept = accept or (lambda p: (p / "checkpoint_last.pt").is_file())
    candidates = sorted((p for p in base.iterdir() if p.is_dir() and accept(p)), key=lambda p: p.name)
    return candidates[-1] if candidates else None


# ---------------------------------------------------------------------------------------- json / csv
def to_jsonable(value: Any) -> Any:
    """numpy / torch scalars and arrays to plain types; NaN and ±inf become null (JSON has no NaN)."""
    if isinstance(value, Mapping):
        return {str(k): to_jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [to_jsonable(v) for v in value]
    if isinstance(value, Path):
        return value.as_posix()
    if hasattr(value, "detach") and hasattr(value, "cpu"):  # torch tensor
        value = value.detach().cpu().numpy()
    if isinstance(value, np.ndarray):
        return to_jsonable(value.tolist())
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def _current_umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _follow_umask(name: str | Path) -> None:
    """mkstemp creates files 0600; give them the mode an ordinary open() would (0666 less the umask), so
    a group can read run folders on shared servers."""
    with contextlib.suppress(OSError):
        os.chmod(name, 0o666 & ~_current_umask())


@contextlib.contextmanager
def atomic_path(path: str | Path):
    """Yield a temporary path beside ``path`` with the same suffixes (``.nii.gz``, ``.npz``, ``.fits``) for
    libraries that write by file name; on success it is renamed over ``path``, on error deleted."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    suffix = "".join(path.suffixes[-2:]) if path.name.endswith(".gz") else path.suffix
    fd, tmp_name = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp" + suffix, dir=path.parent)
    os.close(fd)
    _follow_umask(tmp_name)
    tmp = Path(tmp_name)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


@contextlib.contextmanager
def atomic_open(path: str | Path, mode: str = "wb", **kwargs):
    """Open a temporary file beside ``path`` for writing; on success it is flushed to disk and renamed
    over ``path``, on any error (or Ctrl+C) it is deleted. A reader never sees a half-written file.

        with atomic_open(out / "case.npz") as handle:
            np.savez_compressed(handle, **arrays)
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    _follow_umask(tmp)
    try:
        with os.fdopen(fd, mode, **kwargs) as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def write_text_atomic(path: str | Path, text: str) -> Path:
    with atomic_open(path, "w", encoding="utf-8", newline="\n") as handle:
        handle.write(text)
    return Path(path)


def save_npz_atomic(path: str | Path, compressed: bool = True, **arrays) -> Path:
    """``np.savez(_compressed)`` through :func:`atomic_open`: never a partial NPZ under ``path``."""
    with atomic_open(path) as handle:
        (np.savez_compressed if compressed else np.savez)(handle, **arrays)
    return Path(path)


def write_json(path: str | Path, obj: Any) -> Path:
    """Atomic, UTF-8, indented JSON with NaN written as null."""
    return write_text_atomic(path, json.dumps(to_jsonable(obj), indent=2, ensure_ascii=False) + "\n")


def append_csv_row(path: str | Path, row: Mapping[str, Any], retries: int = 20, wait_s: float = 0.5) -> None:
    """Append one row; when the row brings new columns the file is rewritten with the wider header.

    A file held open by another program (a spreadsheet on Windows locks it) is retried for
    ``retries * wait_s`` seconds, then a :class:`common.errors.RunFolderError` names the file.
    """
    path = Path(path)
    row = {k: to_jsonable(v) for k, v in row.items()}
    for attempt in range(retries + 1):
        try:
            _append_csv_row(path, row)
            return
        except PermissionError as exc:
            if attempt == retries:
                from common.errors import RunFolderError

                raise RunFolderError(f"{path}: cannot write ({exc.strerror}); is it open in another program? "
                                     "Close it and resume with --resume") from exc
            time.sleep(wait_s)


def _append_csv_row(path: Path, row: dict) -> None:
    if not path.is_file():
        with path.open("w", newline="", encoding="utf-8") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(row))
            writer.writeheader()
            writer.writerow(row)
        return
    with path.open("r", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        rows = list(reader) if any(k not in fields for k in row) else None
    if rows is None:
        with path.open("a", newline="", encoding="utf-8") as handle:
            csv.DictWriter(handle, fieldnames=fields).writerow(row)
        return
    fields += [k for k in row if k not in fields]
    rows.append(row)
    _write_rows(path, fields, rows)


def _write_rows(path: Path, fields: list[str], rows: list[dict]) -> None:
    with atomic_open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.DictWriter(handle, fieldnames=fields)
        writer.writeheader()
        writer.writerows(rows)


def trim_csv_rows(path: str | Path, keep: Callable[[dict], bool]) -> int:
    """Rewrite ``path`` keeping the rows for which ``keep(row)`` is true; returns how many were dropped."""
    path = Path(path)
    if not path.is_file():
        return 0
    with path.open("r", newline="", encoding="utf-8") as handle:
        reader = csv.DictReader(handle)
        fields = list(reader.fieldnames or [])
        rows = list(reader)
    kept = [row for row in rows if keep(row)]
    if len(kept) != len(rows):
        _write_rows(path, fields, kept)
    return len(rows) - len(kept)


def read_csv_rows(path: str | Path) -> list[dict]:
    with Path(path).open("r", newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


# -------------------------------------------------------------------------------------------- progress
def progress_enabled(is_main: bool = True) -> bool:
    """Bars only on rank 0 and only on a terminal (CI logs stay readable); PROGRESS=1/0 forces it."""
    forced = os.environ.get("PROGRESS")
    if forced is not None:
        return forced not in ("0", "", "false", "False") and is_main
    return is_main and sys.stderr.isatty()


def progress(iterable: Iterable | None = None, desc: str = "", total: int | None = None,
             is_main: bool = True, leave: bool = False, **kwargs):
    """A tqdm bar that stays quiet when output is not a terminal or on ranks other than 0."""
    from tqdm import tqdm  # not tqdm.auto: its asyncio class calls iter() in __init__, which starts a
    # DataLoader's workers twice per epoch

    return tqdm(iterable, desc=desc, total=total, disable=not progress_enabled(is_main), leave=leave,
                dynamic_ncols=True, ascii=os.name == "nt", **kwargs)


# ------------------------------------------------------------------------------------------- the logger
class RunLogger:
    """Prints and records one run. On ranks other than 0 every method is a no-op."""

    def __init__(self, run_dir: str | Path | None, is_main: bool = True, quiet: bool = False):
        self.run_dir = Path(run_dir) if run_dir is not None else None
        self.is_main = is_main
        self.quiet = quiet
        if self.active:
            self.run_dir.mkdir(parents=True, exist_ok=True)  # figures/ appears with the first figure

    @property
    def active(self) -> bool:
        return self.is_main and self.run_dir is not None

    def path(self, name: str) -> Path:
        if self.run_dir is None:
            raise RuntimeError("this logger has no run folder")
        return self.run_dir / name

    def log(self, message: str) -> None:
        """Print (console-safe) and append a timestamped line to log.txt."""
        if not self.is_main:
            return
        if not self.quiet:
            safe_print(message)
        if self.active:
            stamp = _dt.datetime.now().strftime("%Y-%m-%d %H:%M:%S")
            with self.path("log.txt").open("a", encoding="utf-8") as handle:
                for line in str(message).splitlines() or [""]:
                    handle.write(f"{stamp} {line}\n")

    def log_metrics(self, row: Mapping[str, Any], filename: str = "metrics.csv") -> None:
        """One row per evaluation (epoch, step, losses, metrics) in metrics.csv."""
        if self.active:
            append_csv_row(self.path(filename), row)

    def write_json(self, name: str, obj: Any) -> Path | None:
        return write_json(self.path(name), obj) if self.active else None

    def write_env(self, argv: list[str] | None, device: Any, extra: Mapping | None = None) -> None:
        """env.json: argv, versions, device, git sha, time."""
        if not self.active:
            return
        from common.checkpoint import environment_versions, git_sha

        info = {"argv": list(argv) if argv is not None else sys.argv[1:], "device": str(device),
                "versions": environment_versions(), "git_sha": git_sha(), "started": timestamp(),
                "cwd": os.getcwd(), "cpu_count": os.cpu_count()}
        if hasattr(os, "getloadavg"):  # machine load when the run started (benchmarks quote it; not on Windows)
            info["load_average_1_5_15min"] = [round(v, 2) for v in os.getloadavg()]
        try:
            import torch
            info["cuda_available"] = torch.cuda.is_available()
            if torch.cuda.is_available():
                info["cuda_devices"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        except Exception:  # torch import problems are reported elsewhere
            pass
        if extra:
            info.update(extra)
        self.write_json("env.json", info)

    def save_config(self, cfg: Mapping) -> None:
        if self.active:
            from common.config import save_config

            save_config(cfg, self.path("config.yaml"))

    def write_summary(self, summary: Mapping[str, Any]) -> Path | None:
        """summary.json, written atomically; call it last, once the run is complete."""
        return self.write_json("summary.json", {**summary, "completed": timestamp()})
