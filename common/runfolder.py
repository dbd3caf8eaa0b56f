"""Run-folder integrity: one writer at a time, no leftovers from a killed run, honest completion state.

- ``run.lock`` holds the pid and host of the process writing the folder; a second run into the same
  folder fails with a message naming that pid. A lock whose process is gone (killed, power cut) is
  taken over with a note in the log.
- ``run_state.json``: ``status`` is ``running``, ``interrupted`` (with ``reason``, ``epoch``, ``step`` and
  the command that resumes it) or ``completed``. ``summary.json`` is written only by a completed run.
- On ``--resume``, temporary files of an interrupted atomic write (``*.tmp``, ``*.tmp.npz`` ...) are removed
  and metrics.csv is cut back to the step of the checkpoint being resumed.
- :func:`config_differences` lists the keys in which two resolved configs differ, so a resume that
  would change the model or the data can be refused before anything is written.
"""

from __future__ import annotations

import json
import os
import socket
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from common.errors import RunFolderError

LOCK_NAME = "run.lock"
STATE_NAME = "run_state.json"


# ------------------------------------------------------------------------------------------------ lock
def pid_alive(pid: int) -> bool:
    """Whether process ``pid`` exists on this machine (never signals it: os.kill on Windows would end it)."""
    if pid <= 0:
        return False
    if os.name == "nt":  # pragma: no cover - Windows only
        import ctypes

        kernel32 = ctypes.windll.kernel32
        handle = kernel32.OpenProcess(0x1000, False, pid)  # PROCESS_QUERY_LIMITED_INFORMATION
        if not handle:
            return False
        code = ctypes.c_ulong()
        ok = kernel32.GetExitCodeProcess(handle, ctypes.byref(code))
        kernel32.CloseHandle(handle)
        return bool(ok) and code.value == 259  # STILL_ACTIVE
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, owned by someone else
        return True
    return True


class RunLock:
    """``run.lock`` in a run folder, created exclusively; released on :meth:`release` (or left behind by a
    killed process, which the next run detects by the dead pid)."""

    def __init__(self, run_dir: str | Path):
        self.path = Path(run_dir) / LOCK_NAME
        self.held = False
        self.took_over: dict | None = None

    def acquire(self) -> RunLock:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        record = {"pid": os.getpid(), "host": socket.gethostname()}
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666)
            except FileExistsError:
                holder = self._read()
                same_host = holder.get("host") in (None, record["host"])
                pid = int(holder.get("pid", -1) or -1)
                if same_host and pid == os.getpid():
                    self.held = True  # this process already holds it (a script calling another script's main)
                    return self
                if same_host and pid_alive(pid):
                    raise RunFolderError(
                        f"{self.path.parent}: another run (pid {pid}) is writing to this folder; wait for it, "
                        f"stop it, or choose another --output-dir") from None
                if not same_host:
                    raise RunFolderError(
                        f"{self.path.parent}: locked by pid {pid} on host {holder.get('host')}; if that run is "
                        f"over, delete {self.path}") from None
                self.took_over = holder  # the previous holder died without releasing it
                self.path.unlink(missing_ok=True)
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as handle:
                json.dump(record, handle)
            self.held = True
            return self
        raise RunFolderError(f"{self.path}: could not create the run lock")

    def _read(self) -> dict:
        try:
            return json.loads(self.path.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            return {}

    def release(self) -> None:
        if self.held:
            holder = self._read()
            if int(holder.get("pid", -1) or -1) == os.getpid():
                self.path.unlink(missing_ok=True)
            self.held = False


# ------------------------------------------------------------------------------------------- run state
def write_run_state(run_dir: str | Path, status: str, **fields: Any) -> Path:
    from common.runlog import timestamp, write_json

    return write_json(Path(run_dir) / STATE_NAME, {"status": status, "updated": timestamp(), "pid": os.getpid(),
                                                   **fields})


def read_run_state(run_dir: str | Path) -> dict:
    path = Path(run_dir) / STATE_NAME
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


# ------------------------------------------------------------------------------------------ leftovers
def remove_stale_temporaries(run_dir: str | Path) -> list[Path]:
    """Delete what an atomic write killed mid-way leaves: ``<name>.<random>.tmp`` and ``...tmp.<ext>``."""
    removed = []
    for path in Path(run_dir).rglob("*"):
        name = path.name
        if path.is_file() and (name.endswith(".tmp") or ".tmp." in name):
            path.unlink(missing_ok=True)
            removed.append(path)
    return removed


def trim_metrics(run_dir: str | Path, step: int, filename: str = "metrics.csv",
                 match: Mapping[str, Any] | None = None) -> int:
    """Drop metrics rows logged after ``step`` (rows whose ``match`` columns equal the given values, e.g.
    the ensemble member being resumed); rows without a step column are kept. Returns the number dropped."""
    from common.runlog import trim_csv_rows

    match = {k: str(v) for k, v in (match or {}).items()}

    def keep(row: dict) -> bool:
        if any(str(row.get(k)) != v for k, v in match.items()):
            return True
        try:
            return int(float(row.get("step", "") or "nan")) <= step
        except ValueError:
            return True

    return trim_csv_rows(Path(run_dir) / filename, keep)


# -------------------------------------------------------------------------------------------- configs
def config_differences(old: Mapping, new: Mapping, prefix: str = "") -> list[tuple[str, Any, Any]]:
    """(dotted key, old value, new value) for every leaf that differs, including keys only one side has."""
    out: list[tuple[str, Any, Any]] = []
    for key in list(old) + [k for k in new if k not in old]:
        dotted = f"{prefix}{key}"
        a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
        if isinstance(a, Mapping) and isinstance(b, Mapping):
            out += config_differences(a, b, dotted + ".")
        elif _normalise(a) != _normalise(b):
            out.append((dotted, a, b))
    return out


def _normalise(value: Any) -> Any:
    if isinstance(value, (list, tuple)):
        return [_normalise(v) for v in value]
    if isinstance(value, float) and value.is_integer():
        return int(value)
    return value


def frozen_differences(old: Mapping, new: Mapping, frozen: Iterable[str]) -> list[tuple[str, Any, Any]]:
    """The differences under any of the ``frozen`` sections (e.g. "model", "data", "physics"). A key left
    unset (None) in the new config inherits the saved value and is not a difference."""
    frozen = tuple(frozen)
    return [d for d in config_differences(old, new)
            if any(d[0] == f or d[0].startswith(f + ".") for f in frozen) and d[2] is not None]
