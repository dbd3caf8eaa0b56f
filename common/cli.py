"""The command-line front every script shares, and the run set-up that follows it.

    parser = make_parser(__doc__, train=True)          # --config --set --output-dir --device --seed --resume
    parser.add_argument("--data", ...)                 # the script's own arguments
    args = parser.parse_args(argv)
    run = start_run(args, domain="asl", defaults=DEFAULTS, argv=argv)
    ... run.cfg, run.device, run.dist, run.logger, run.run_dir, run.resume_from ...
    return run.finish({"metric": value})               # summary.json, DDP shutdown
"""

from __future__ import annotations

import argparse
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.config import ConfigError, load_config
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


def make_parser(description: str | None, *, train: bool = False, prog: str | None = None) -> argparse.ArgumentParser:
    """ArgumentParser with the shared options; ``train=True`` adds ``--resume``."""
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
    if train:
        common.add_argument("--resume", nargs="?", const="auto", default=None, metavar="PATH",
                            help="continue from checkpoint_last.pt: of PATH (run folder or file), of "
                                 "--output-dir, or (no PATH) of the latest run of this config")
    return parser


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

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def log(self, message: str) -> None:
        self.logger.log(message)

    def finish(self, summary: dict) -> dict:
        """Write summary.json (rank 0), shut DDP down, and return the summary."""
        self.logger.write_summary(summary)
        cleanup_distributed()
        return summary


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


def start_run(args: argparse.Namespace, *, domain: str, defaults: dict, argv: list[str] | None = None,
              create_dir: bool = True) -> Run:
    """Resolve the config, pick the device, init DDP, seed, make the run folder and record it.

    Config errors leave the process with a one-line message (exit code 2), not a traceback.
    """
    make_console_safe()
    try:
        cfg = load_config(args.config, args.set, defaults=defaults)
    except ConfigError as exc:
        raise SystemExit(f"error: {exc}") from None
    if args.seed is not None:
        cfg["seed"] = int(args.seed)
    config_name = Path(args.config).stem if args.config else "default"
    info, device = init_distributed(args.device)

    resume_from = None
    if getattr(args, "resume", None):
        resume_from = _find_resume_checkpoint(args.resume, domain, config_name, args.output_dir)
    if resume_from is not None and args.output_dir is None:
        run_dir: Path | None = run_root(resume_from)
    elif create_dir:
        run_dir = create_run_dir(domain, config_name, args.output_dir, create=info.is_main)
    else:
        run_dir = Path(args.output_dir) if args.output_dir else None

    if hasattr(args, "resume") and resume_from is None and run_dir is not None and info.is_main:
        # A fresh training run reusing a folder must not append to, or look finished with, an old run's files.
        for stale in ("metrics.csv", "metrics.jsonl", "summary.json"):
            (run_dir / stale).unlink(missing_ok=True)
    threads = (cfg.get("runtime") or {}).get("torch_threads") if isinstance(cfg.get("runtime"), dict) else None
    if threads:
        torch.set_num_threads(int(threads))  # on CPUs shared with other jobs 1 thread avoids spin-waiting
    seed_everything(int(cfg.get("seed", 0)), info.rank)
    logger = RunLogger(run_dir if info.is_main else None, is_main=info.is_main)
    logger.save_config(cfg)
    logger.write_env(list(argv) if argv is not None else sys.argv[1:], describe_device(device),
                     extra={"domain": domain, "config_name": config_name, "world_size": info.world_size})
    where = f" -> {run_dir}" if run_dir is not None else ""
    ddp = f", DDP rank {info.rank}/{info.world_size}" if info.enabled else ""
    threads_note = f", {torch.get_num_threads()} CPU thread(s)" if device.type == "cpu" else ""
    logger.log(f"[{domain}] config {config_name} on {describe_device(device)}{threads_note}{ddp}{where}")
    if resume_from is not None:
        logger.log(f"[{domain}] resuming from {resume_from}")
    return Run(cfg=cfg, device=device, dist=info, logger=logger, run_dir=run_dir, config_name=config_name,
               domain=domain, resume_from=resume_from, args=args)
