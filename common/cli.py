"""The command-line front every script shares, and the run set-up that follows it (common/README.md).

    parser = make_parser(__doc__, train=True, data=True)   # --config --set --output-dir --device --seed
                                                           # --debug --resume --stop-after-steps --data
    args = parser.parse_args(argv)
    run = start_run(args, domain="asl", defaults=DEFAULTS, argv=argv)
    ... validate the inputs ...
    run.record_inputs_valid()                              # config.yaml + env.json (else at first save)
    ... run.cfg, run.device, run.dist, run.logger, run.run_dir, run.resume_from ...
    return run.finish({"metric": value, "interrupted": False})

``if __name__ == "__main__": raise SystemExit(run_cli(main))`` gives the one-line error contract.
"""

from __future__ import annotations

import argparse
import atexit
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.config import ConfigError, load_config
from common.errors import RunFolderError
from common.runfolder import RunLock, frozen_differences, remove_stale_temporaries, write_run_state
from common.runlog import RunLogger, create_run_dir, latest_run_dir
from common.runtime import (
    DistInfo,
    cleanup_distributed,
    describe_device,
    init_distributed,
    make_console_safe,
    seed_everything,
)


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter, argparse.RawDescriptionHelpFormatter):
    pass


def make_parser(description: str | None, *, train: bool = False, data: bool = False,
                checkpoint: bool | str = False, prog: str | None = None) -> argparse.ArgumentParser:
    """ArgumentParser with the shared options (common/README.md). ``train=True`` adds ``--resume`` and
    ``--stop-after-steps``; ``data=True`` adds ``--data DIR``; ``checkpoint=True`` adds ``--checkpoint PATH``
    (``checkpoint="many"``: one or more paths, ``args.checkpoint`` is then a list)."""
    parser = argparse.ArgumentParser(prog=prog, description=(description or "").strip(),
                                     formatter_class=_HelpFormatter)
    common = parser.add_argument_group("shared options")
    common.add_argument("--config", type=Path, default=None,
                        help="YAML config (keys not given keep the script's defaults)")
    common.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a config value, repeatable: --set train.lr=3e-4 --set model.features=[32,64]")
    common.add_argument("--output-dir", type=Path, default=None,
                        help="write here instead of runs/<domain>/<config>/<timestamp>/")
    common.add_argument("--device", default="auto", help="auto | cuda | cuda:N | mps | cpu")
    common.add_argument("--seed", type=int, default=None, help="overrides the config's seed")
    common.add_argument("--debug", action="store_true", help="show full tracebacks instead of one-line errors")
    if data:
        common.add_argument("--data", type=Path, default=None, metavar="DIR",
                            help="input data folder (overrides the config's data folder)")
    if checkpoint:
        many = checkpoint == "many"
        common.add_argument("--checkpoint", type=Path, default=None, metavar="PATH", nargs="+" if many else None,
                            help="a checkpoint file, a run folder, or an ensemble folder (ensemble.json)"
                                 + ("; several paths form an ensemble" if many else ""))
    if train:
        common.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                            help="continue from checkpoint_last.pt: of PATH (run folder or file), of "
                                 "--output-dir, or (no PATH) of the latest run of this config")
        common.add_argument("--stop-after-steps", type=int, default=None, metavar="N",
                            help="stop cleanly once the global optimizer step reaches N, as Ctrl+C would "
                                 "(checkpoint_last.pt mid-epoch; for testing --resume)")
    return parser


class _DeprecatedAlias(argparse.Action):
    def __init__(self, option_strings, dest, new_flag: str = "", **kwargs):
        self.new_flag = new_flag
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        print(f"note: {option_string} is deprecated; use {self.new_flag}", file=sys.stderr)
        setattr(namespace, self.dest, values)


def add_deprecated_alias(parser: argparse.ArgumentParser, old_flag: str, new_flag: str, dest: str,
                         type=None) -> None:  # noqa: A002 - argparse's own name
    """Accept ``old_flag`` as ``new_flag`` with a one-line deprecation notice."""
    parser.add_argument(old_flag, dest=dest, action=_DeprecatedAlias, new_flag=new_flag, type=type,
                        default=argparse.SUPPRESS, help=argparse.SUPPRESS)


@dataclass
class Run:
    """What a script needs after set-up. ``logger`` writes only on rank 0."""

    cfg: dict
    device: torch.device
    dist: DistInfo
    logger: RunLogger
    run_dir: Path | None
    config_name: str
    domain: str
    resume_from: Path | None = None
    args: Any = None
    extras: dict = field(default_factory=dict)
    argv: list | None = None
    lock: RunLock | None = None
    train_state: Any = None  # the latest common.training.TrainState, for run_state.json
    interrupt_reason: str | None = None
    recorded: bool = False
    finished: bool = False

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def log(self, message: str) -> None:
        self.logger.log(message)

    def record_inputs_valid(self) -> None:
        """Write config.yaml and env.json: call once the inputs are validated (done by the first checkpoint,
        metrics row or finish otherwise), so a run refused for bad inputs leaves no config behind."""
        if self.recorded:
            return
        self.recorded = True
        self.logger.save_config(self.cfg)
        self.logger.write_env(list(self.argv) if self.argv is not None else sys.argv[1:],
                              describe_device(self.device),
                              extra={"domain": self.domain, "config_name": self.config_name,
                                     "world_size": self.dist.world_size})

    def finish(self, summary: dict) -> dict:
        """A completed run writes summary.json; one with ``summary["interrupted"]`` true writes only
        run_state.json (status interrupted, reason, epoch, step). Then releases the lock and shuts DDP down."""
        self.record_inputs_valid()
        if self.is_main and self.run_dir is not None:
            if summary.get("interrupted"):
                state = self.train_state
                write_run_state(self.run_dir, "interrupted", reason=self.interrupt_reason or "interrupted",
                                epoch=getattr(state, "epoch", summary.get("epochs_completed")),
                                step=getattr(state, "step", None),
                                resume=f"--resume {self.run_dir.as_posix()}")
                self.log(f"[{self.domain}] run interrupted; no summary.json (see run_state.json)")
            else:
                self.logger.write_summary(summary)
                if self.lock is not None:  # scripts that keep no lock (reused folders) keep no state either
                    write_run_state(self.run_dir, "completed")
        self.close()
        cleanup_distributed()
        return summary

    def close(self, error: BaseException | None = None) -> None:
        """Release the run folder (after an error, run_state.json records it as failed)."""
        if self.finished:
            return
        self.finished = True
        if error is not None and self.lock is not None and self.run_dir is not None and self.run_dir.is_dir():
            write_run_state(self.run_dir, "failed", error=f"{type(error).__name__}: {str(error)[:500]}")
        if self.lock is not None:
            self.lock.release()
        if self in _ACTIVE_RUNS:
            _ACTIVE_RUNS.remove(self)


_ACTIVE_RUNS: list[Run] = []


def close_active_runs(error: BaseException | None = None) -> None:
    """Release every run folder this process holds (used by the error handler and at exit)."""
    for run in list(_ACTIVE_RUNS):
        run.close(error)


atexit.register(close_active_runs)


def run_checkpoint(run_dir: Path) -> Path | None:
    """The checkpoint that resumes the run in ``run_dir``: its ``checkpoint_last.pt`` or, for a run that trains
    an ensemble sequentially into ``member_<i>/`` folders, the newest member's ``checkpoint_last.pt``."""
    run_dir = Path(run_dir)
    if (run_dir / "checkpoint_last.pt").is_file():
        return run_dir / "checkpoint_last.pt"
    members = [p for p in run_dir.glob("member_*/checkpoint_last.pt") if p.is_file()]
    return max(members, key=lambda p: p.stat().st_mtime) if members else None


def run_root(checkpoint: Path) -> Path:
    """The run folder a resume checkpoint belongs to (the parent of ``member_<i>/`` for ensemble members)."""
    parent = Path(checkpoint).parent
    return parent.parent if parent.name.startswith("member_") else parent


def _find_resume_checkpoint(spec: str, domain: str, config_name: str, output_dir: Path | None) -> Path:
    if spec == "auto":
        if output_dir is not None:
            found = run_checkpoint(Path(output_dir))
            if found is None:
                raise FileNotFoundError(f"--resume: {Path(output_dir) / 'checkpoint_last.pt'} does not exist")
            return found
        found = latest_run_dir(domain, config_name, accept=lambda p: run_checkpoint(p) is not None)
        if found is None:
            raise FileNotFoundError(f"--resume: no run of runs/{domain}/{config_name}/ has checkpoint_last.pt")
        return run_checkpoint(found)
    path = Path(spec)
    if path.is_dir():
        found = run_checkpoint(path)
        path = found if found is not None else path / "checkpoint_last.pt"
    if not path.is_file():
        raise FileNotFoundError(f"--resume: checkpoint not found: {path}")
    return path


# Config sections that a --resume may not change: the weights and the data they were trained on.
FROZEN_ON_RESUME = ("model", "data")


def start_run(args: argparse.Namespace, *, domain: str, defaults: dict, argv: list[str] | None = None,
              create_dir: bool = True, frozen: tuple[str, ...] = FROZEN_ON_RESUME,
              data_key: str | None = None) -> Run:
    """Resolve the config, pick the device, init DDP, seed, make and lock the run folder.

    Config errors leave the process with a one-line message (exit code 2), not a traceback. A resume whose
    config changes a ``frozen`` section is refused, listing the keys, before anything is written.
    config.yaml and env.json are written by :meth:`Run.record_inputs_valid`. ``data_key`` (e.g. "data.dir")
    is the config key that ``--data DIR`` sets, so the data folder is recorded and checked like any key.
    """
    make_console_safe()
    try:
        cfg = load_config(args.config, args.set, defaults=defaults)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.seed is not None:
        cfg["seed"] = int(args.seed)
    if data_key is not None and getattr(args, "data", None) is not None:
        _set_dotted(cfg, data_key, Path(args.data).as_posix())
    config_name = Path(args.config).stem if args.config else "default"
    info, device = init_distributed(args.device)

    resume_from = None
    if getattr(args, "resume", None):
        resume_from = _find_resume_checkpoint(args.resume, domain, config_name, args.output_dir)
        saved = _check_resume_config(resume_from, cfg, frozen, domain)
        if data_key is not None and _get_dotted(cfg, data_key) is None:
            # --resume without --data continues on the data the run was trained on
            _set_dotted(cfg, data_key, _get_dotted(saved, data_key))
    if resume_from is not None and args.output_dir is None:
        run_dir: Path | None = run_root(resume_from)
    elif create_dir:
        run_dir = create_run_dir(domain, config_name, args.output_dir, create=info.is_main)
    else:
        run_dir = Path(args.output_dir) if args.output_dir else None

    lock, removed = None, []
    training = hasattr(args, "resume")
    if run_dir is not None and info.is_main and create_dir:
        lock = RunLock(run_dir).acquire()
        if training:
            removed = remove_stale_temporaries(run_dir)
            if resume_from is None:
                # A fresh training run reusing a folder must not append to, or look finished with, old files.
                for stale in ("metrics.csv", "metrics.jsonl"):
                    (run_dir / stale).unlink(missing_ok=True)
        (run_dir / "summary.json").unlink(missing_ok=True)  # only a run that completes writes it anew
        write_run_state(run_dir, "running", resumed_from=resume_from.as_posix() if resume_from else None)
    threads = (cfg.get("runtime") or {}).get("torch_threads") if isinstance(cfg.get("runtime"), dict) else None
    if threads:
        torch.set_num_threads(int(threads))  # on CPUs shared with other jobs 1 thread avoids spin-waiting
    seed_everything(int(cfg.get("seed", 0)), info.rank)
    logger = RunLogger(run_dir if info.is_main else None, is_main=info.is_main)
    run = Run(cfg=cfg, device=device, dist=info, logger=logger, run_dir=run_dir, config_name=config_name,
              domain=domain, resume_from=resume_from, args=args, argv=argv, lock=lock)
    _ACTIVE_RUNS.append(run)
    if lock is not None and lock.took_over:
        logger.log(f"[{domain}] took over the lock of pid {lock.took_over.get('pid')}, which is no longer running")
    if removed:
        logger.log(f"[{domain}] removed {len(removed)} temporary file(s) left by an interrupted write")
    where = f" -> {run_dir}" if run_dir is not None else ""
    ddp = f", DDP rank {info.rank}/{info.world_size}" if info.enabled else ""
    threads_note = f", {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else ""
    logger.log(f"[{domain}] config {config_name} on {describe_device(device)}{threads_note}{ddp}{where}")
    if resume_from is not None:
        logger.log(f"[{domain}] resuming from {resume_from}")
    return run


def _get_dotted(cfg: dict, dotted: str):
    node = cfg
    for key in dotted.split("."):
        if not isinstance(node, dict) or key not in node:
            return None
        node = node[key]
    return node


def _set_dotted(cfg: dict, dotted: str, value) -> None:
    *parents, leaf = dotted.split(".")
    node = cfg
    for key in parents:
        node = node[key]
    node[leaf] = value


def _check_resume_config(checkpoint: Path, cfg: dict, frozen: tuple[str, ...], domain: str) -> dict:
    """Refuse a resume whose config changes the model or the data (listing the keys); nothing is written."""
    from common.checkpoint import load_checkpoint

    saved = load_checkpoint(checkpoint, expected_domain=domain).get("config") or {}
    diffs = frozen_differences(saved, cfg, frozen)
    if diffs:
        listed = "; ".join(f"{key}: {old!r} -> {new!r}" for key, old, new in diffs[:10])
        more = f" (and {len(diffs) - 10} more)" if len(diffs) > 10 else ""
        raise RunFolderError(f"{checkpoint}: --resume with a config that changes {', '.join(frozen)}: "
                             f"{listed}{more}. Start a new run (another --output-dir) or undo these changes")
    return saved
