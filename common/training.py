"""Pieces of a training loop (torchvision-reference style: each ``train_<d>.py`` writes its own loop).

    state = resume_training(run, model, optimizer, scheduler, amp.scaler, ema=ema)   # fresh or --resume
    saver = CheckpointSaver(run, model, optimizer, scheduler, amp.scaler, ema=ema, preprocessing=meta)
    with StopRequest(run) as stop:                        # Ctrl+C / SIGTERM / SIGBREAK, reduced over ranks
        for epoch in range(state.epoch + 1, epochs + 1):
            sampler.set_epoch(epoch, skip_samples=state.batches_done * batch_size)
            train_one_epoch(model, loader, optimizer, state, stop, ...)      # the script's own function
            if stop.stopped:
                saver.save_partial(state)                 # checkpoint_last.pt mid-epoch; resumes exactly
                break
            metrics = evaluate(...)                       # the script's own function
            state.end_epoch(epoch)
            saver.end_epoch(state, {"epoch": epoch, "step": state.step, **metrics}, metric=metrics["val_loss"])
    return run.finish({..., "interrupted": stop.stopped})

Inside ``train_one_epoch`` after each optimizer step: ``state.step += 1; state.batches_done += 1``, running sums
in ``state.partial`` (they survive a mid-epoch stop), and ``if stop.check(state.step): break``.
Sequential ensembles (``member_<i>/``) pass ``checkpoint=`` / ``folder=`` per member and ``fresh=True`` for a
member not started yet; ``--stop-after-steps`` compares with the step the loop passes to ``stop.check``, so an
ensemble that wants one step count over all members passes its running total (asl and lensing do).

What makes the resume exact: the checkpoint carries the optimizer / scheduler / scaler / EMA / RNG state,
``batches_done`` and the partial sums; the data order must depend only on (seed, epoch), e.g.
:class:`common.runtime.ResumableSampler` over a DistributedSampler, and per-step randomness must come from
the restored RNG or from generators seeded by (seed, step).
The metrics row of an epoch is written after the checkpoint it describes and is also stored in it, so a
process killed between the two gets the row back on resume; rows after the checkpoint's step are cut.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from common.checkpoint import load_checkpoint, restore_training_state, save_checkpoint
from common.runtime import GracefulInterrupt, any_rank


@dataclass
class TrainState:
    """Where training stands. ``epoch`` counts completed epochs; ``batches_done`` the batches already
    trained in epoch ``epoch + 1`` (non-zero only after a mid-epoch stop); ``partial`` the loop's running
    sums for those batches (plain floats / ints)."""

    epoch: int = 0
    step: int = 0
    best_metric: float | None = None
    batches_done: int = 0
    partial: dict = field(default_factory=dict)
    resumed_from: Path | None = None
    extra: dict = field(default_factory=dict)  # the resumed checkpoint's ``extra`` (domain training state)

    def improved(self, value: float, mode: str = "min") -> bool:
        """True (and ``best_metric`` updated) when ``value`` beats the best so far."""
        value = float(value)
        if not math.isfinite(value):
            return False
        best = self.best_metric
        better = best is None or (value < best if mode == "min" else value > best)
        if better:
            self.best_metric = value
        return better

    def end_epoch(self, epoch: int) -> None:
        """Mark ``epoch`` complete: the next one starts from its first batch with empty sums."""
        self.epoch = int(epoch)
        self.batches_done = 0
        self.partial = {}

    def add(self, **values: float) -> None:
        """Accumulate running sums for the current epoch (``state.add(loss=0.3, n=1)``)."""
        for key, value in values.items():
            self.partial[key] = self.partial.get(key, 0.0) + float(value)

    def mean(self, key: str, count_key: str = "n") -> float:
        count = self.partial.get(count_key, 0.0)
        return self.partial.get(key, 0.0) / count if count else float("nan")


class StopRequest(GracefulInterrupt):
    """Ctrl+C / SIGTERM / SIGBREAK, and ``--stop-after-steps N`` (stop once the global step reaches N, as a
    signal would; used to test resuming), reduced over DDP ranks so every rank stops at the same step."""

    def __init__(self, run=None, device: torch.device | None = None, stop_after_steps: int | None = None):
        super().__init__()
        self.device = device if device is not None else getattr(run, "device", None)
        if stop_after_steps is None and run is not None:
            stop_after_steps = getattr(getattr(run, "args", None), "stop_after_steps", None)
        self.stop_after_steps = int(stop_after_steps) if stop_after_steps else None
        self.stopped = False
        self._run = run

    def check(self, step: int) -> bool:
        """Call once per optimizer step on every rank; True when the loop must stop now."""
        if self.stop_after_steps is not None and step >= self.stop_after_steps:
            self.request("--stop-after-steps")
        self.stopped = any_rank(self.requested, self.device)
        if self.stopped and self.reason is None:
            self.reason = "another rank"
        return self.stopped

    def __exit__(self, *exc):
        if self._run is not None and self.stopped:
            self._run.interrupt_reason = self.reason
        return super().__exit__(*exc)


def resume_training(run, model: torch.nn.Module, optimizer=None, scheduler=None, scaler=None, ema=None,
                    checkpoint: str | Path | None = None, match: Mapping[str, Any] | None = None,
                    restore_rng: bool = True, metrics_file: str = "metrics.csv", fresh: bool = False) -> TrainState:
    """A fresh :class:`TrainState` (no ``--resume``, or ``fresh=True``, e.g. an ensemble member not started
    yet), or the state of ``checkpoint`` (default ``run.resume_from``) with the
    model, optimizer, scheduler, scaler, EMA and RNG restored, metrics.csv cut back to its step (rows whose
    ``match`` columns equal the given values, e.g. ``{"member": 2}``) and its own metrics row restored."""
    path = Path(checkpoint) if checkpoint is not None else run.resume_from
    if fresh or path is None:
        return TrainState()
    ckpt = load_checkpoint(path, expected_domain=run.domain)
    info = restore_training_state(ckpt, model, optimizer, scheduler, scaler, restore_rng=restore_rng)
    extra = ckpt.get("extra") or {}
    if ema is not None and extra.get("ema"):
        ema.load_state_dict(extra["ema"])
    partial = extra.get("partial_epoch") or {}
    sums = partial.get("sums", {})
    per_rank = partial.get("sums_per_rank")
    if per_rank and len(per_rank) == run.dist.world_size:  # each rank continues its own running sums
        sums = per_rank[run.dist.rank]
    state = TrainState(epoch=info["epoch"], step=info["step"], best_metric=info["best_metric"],
                       batches_done=int(partial.get("batches_done", 0)), partial=dict(sums),
                       resumed_from=Path(path), extra=dict(extra))
    if run.is_main and run.run_dir is not None:
        from common.runfolder import trim_metrics

        dropped = trim_metrics(run.run_dir, state.step, filename=metrics_file, match=match)
        if dropped:
            run.log(f"{metrics_file}: dropped {dropped} row(s) logged after the checkpoint's step {state.step}")
        row = extra.get("metrics_row")
        if row and not _has_row(run.run_dir / metrics_file, row, match):
            run.logger.log_metrics(row, filename=metrics_file)  # killed between checkpoint and row: write it now
    where = f", {state.batches_done} batches into epoch {state.epoch + 1}" if state.batches_done else ""
    run.log(f"resumed from {path}: epoch {state.epoch} complete, step {state.step}{where}")
    return state


def _has_row(path: Path, row: Mapping, match: Mapping | None) -> bool:
    if not path.is_file():
        return False
    from common.runlog import read_csv_rows

    keys = {"step": str(row.get("step")), **{k: str(v) for k, v in (match or {}).items()}}
    return any(all(str(r.get(k)) == v for k, v in keys.items()) for r in read_csv_rows(path))


class CheckpointSaver:
    """Writes the training checkpoints of one model (rank 0 only): ``checkpoint_best.pt`` when the metric
    improves, ``checkpoint_last.pt`` every epoch and at a mid-epoch stop, then the epoch's metrics row.

    ``extra`` may be a dict or a function returning one (state that changes during training, e.g. task
    weights); EMA state goes into ``extra["ema"]``; ``folder`` defaults to the run folder.
    """

    def __init__(self, run, model: torch.nn.Module, optimizer=None, scheduler=None, scaler=None, ema=None,
                 preprocessing: Mapping | None = None, extra: Mapping | Callable[[], Mapping] | None = None,
                 folder: str | Path | None = None, metric_name: str = "val_loss", mode: str = "min",
                 metrics_file: str = "metrics.csv"):
        self.run = run
        self.model, self.optimizer, self.scheduler, self.scaler, self.ema = model, optimizer, scheduler, scaler, ema
        self.preprocessing = preprocessing
        self.extra = extra
        self.folder = Path(folder) if folder is not None else run.run_dir
        self.metric_name, self.mode, self.metrics_file = metric_name, mode, metrics_file

    def _extra(self) -> dict:
        extra = self.extra() if callable(self.extra) else dict(self.extra or {})
        if self.ema is not None:
            extra["ema"] = self.ema.state_dict()
        return extra

    def save(self, name: str, state: TrainState, **extra: Any) -> Path | None:
        if not self.run.is_main:
            return None
        self.run.record_inputs_valid()
        return save_checkpoint(self.folder / name, self.model, domain=self.run.domain, config=self.run.cfg,
                               optimizer=self.optimizer, scheduler=self.scheduler, scaler=self.scaler,
                               epoch=state.epoch, step=state.step, best_metric=state.best_metric,
                               best_metric_name=self.metric_name, preprocessing=self.preprocessing,
                               extra={**self._extra(), **extra})

    def save_partial(self, state: TrainState) -> Path | None:
        """checkpoint_last.pt in the middle of epoch ``state.epoch + 1``; records the run as interrupted.
        Call it on every rank: under DDP each rank's running sums are gathered into the checkpoint."""
        partial = {"batches_done": state.batches_done, "sums": dict(state.partial)}
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            gathered: list = [None] * torch.distributed.get_world_size()
            torch.distributed.all_gather_object(gathered, dict(state.partial))
            partial["sums_per_rank"] = gathered
        path = self.save("checkpoint_last.pt", state, partial_epoch=partial)
        self.run.train_state = state
        self.run.log(f"stopped in epoch {state.epoch + 1} after {state.batches_done} batches (step {state.step}); "
                     f"continue with --resume {self.run.run_dir}")
        return path

    def end_epoch(self, state: TrainState, row: Mapping[str, Any], metric: float | None = None) -> bool:
        """After a completed epoch: best (if ``metric`` improved), last, then the metrics row. Returns
        whether this epoch is the new best."""
        row = {"epoch": state.epoch, "step": state.step, **row}
        is_best = metric is not None and state.improved(metric, self.mode)
        if is_best:
            self.save("checkpoint_best.pt", state)
        self.save("checkpoint_last.pt", state, metrics_row=_plain_row(row))
        self.run.logger.log_metrics(row, filename=self.metrics_file)
        self.run.train_state = state
        return is_best


def _plain_row(row: Mapping[str, Any]) -> dict:
    from common.runlog import to_jsonable

    return {str(k): to_jsonable(v) for k, v in row.items()}
