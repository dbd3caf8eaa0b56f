"""Device, seeding, DataLoader settings, mixed precision, torchrun DDP, console safety, GPU cooling.

Everything a training script needs from its environment, as plain functions and two small classes.
DDP follows pytorch/vision references: torchrun sets RANK / WORLD_SIZE / LOCAL_RANK; the backend is
nccl on CUDA and gloo otherwise; rank 0 alone logs and writes.
"""

from __future__ import annotations

import contextlib
import itertools
import os
import random
import signal
import sys
import time
from dataclasses import dataclass

import numpy as np
import torch
import torch.distributed as dist

# Shared block for the ``runtime:`` section of every training config (scripts embed it in DEFAULTS).
RUNTIME_DEFAULTS = {
    "num_workers": 0,  # DataLoader worker processes (spawned on Windows/macOS)
    "amp": True,  # mixed precision; only ever active on CUDA
    "cooling_every_steps": 0,  # workstation GPUs that overheat: pause every K optimizer steps (0 = off)
    "cooling_pause_s": 0.0,  # ... for this many seconds
    "torch_threads": 0,  # intra-op CPU threads (0 = torch's default; 1 helps on CPUs shared with other jobs)
}


# --------------------------------------------------------------------------------------------- console
def make_console_safe() -> None:
    """Let stdout/stderr replace characters their encoding lacks instead of raising.

    A Windows console (cp1252) cannot encode "İ" or "✓"; without this a print would crash a run.
    """
    for stream in (sys.stdout, sys.stderr):
        reconfigure = getattr(stream, "reconfigure", None)
        if reconfigure is not None:
            with contextlib.suppress(Exception):
                reconfigure(errors="backslashreplace")


def safe_print(*args, file=None, **kwargs) -> None:
    """print() that never raises UnicodeEncodeError, whatever the console encoding."""
    stream = file or sys.stdout
    text = kwargs.pop("sep", " ").join(str(a) for a in args)
    end = kwargs.pop("end", "\n")
    try:
        print(text, end=end, file=stream, **kwargs)
    except UnicodeEncodeError:
        encoding = getattr(stream, "encoding", None) or "ascii"
        print(text.encode(encoding, "backslashreplace").decode(encoding), end=end, file=stream, **kwargs)


# ---------------------------------------------------------------------------------------------- device
def select_device(name: str = "auto", local_rank: int | None = None) -> torch.device:
    """Choose the compute device. ``auto``: CUDA, then Apple MPS, then CPU.

    Raises a clear error when a requested accelerator is not available.
    """
    name = (name or "auto").lower()
    cuda_ok = torch.cuda.is_available()
    mps_ok = bool(getattr(torch.backends, "mps", None)) and torch.backends.mps.is_available()
    if name == "auto":
        name = "cuda" if cuda_ok else "mps" if mps_ok else "cpu"
    if name.startswith("cuda"):
        if not cuda_ok:
            raise RuntimeError("--device cuda was requested but torch.cuda.is_available() is False")
        if name == "cuda" and local_rank is not None:
            return torch.device("cuda", local_rank)
        return torch.device(name)
    if name == "mps":
        if not mps_ok:
            raise RuntimeError("--device mps was requested but the MPS backend is not available")
        return torch.device("mps")
    if name == "cpu":
        return torch.device("cpu")
    raise ValueError(f"unknown device '{name}': use auto, cuda, cuda:N, mps or cpu")


def describe_device(device: torch.device) -> str:
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return f"cuda:{index} ({torch.cuda.get_device_name(index)})"
    return device.type


# ------------------------------------------------------------------------------------------------ seed
@contextlib.contextmanager
def cpu_threads(n: int | None, device: torch.device | str = "cpu"):
    """Run the block with ``n`` torch intra-op threads when computing on a CPU, restoring the process setting
    afterwards (None, or a non-CPU device: unchanged). Batched searches and fits issue many short operations,
    each ending in a thread barrier; on cores shared with other jobs one thread avoids stalling at each."""
    if n is None or torch.device(device).type != "cpu":
        yield
        return
    if int(n) < 1:
        raise ValueError(f"cpu_threads must be >= 1 or None, got {n}")
    before = torch.get_num_threads()
    torch.set_num_threads(int(n))
    try:
        yield
    finally:
        torch.set_num_threads(before)


def seed_everything(seed: int, rank: int = 0) -> int:
    """Seed python, numpy and torch with ``seed + rank`` (different streams per DDP rank); returns it."""
    effective = int(seed) + int(rank)
    random.seed(effective)
    np.random.seed(effective % 2**32)
    torch.manual_seed(effective)
    return effective


def worker_init_fn(worker_id: int) -> None:
    """DataLoader worker seeding (numpy and random follow torch's per-worker seed), in a process group of its own.

    Module-level (picklable under the spawn start method used on Windows and macOS).
    """
    worker_seed = torch.initial_seed() % 2**32
    np.random.seed(worker_seed)
    random.seed(worker_seed)
    # A stop signal sent to the whole process group (`timeout`, a batch scheduler, a closing terminal) would
    # also reach the workers, and torch's worker handler dies on a SIGTERM from anyone but the parent; the
    # main process then raises "DataLoader worker ... killed by signal" mid-step instead of saving and
    # stopping. In their own group the workers are stopped by the main process alone (on POSIX).
    if hasattr(os, "setpgrp"):
        with contextlib.suppress(OSError):
            os.setpgrp()


def dataloader_kwargs(device: torch.device, num_workers: int = 0, seed: int | None = None,
                      start_method: str | None = None, persistent_workers: bool = True) -> dict:
    """Keyword arguments for ``torch.utils.data.DataLoader``.

    pin_memory only on CUDA; persistent workers when there are workers (pass ``persistent_workers=False``
    when the dataset changes per epoch, e.g. epoch-seeded augmentation set by ``set_epoch``, since
    persistent workers keep their own copy of the dataset); ``worker_init_fn`` reseeds
    numpy/random in each worker; ``seed`` fixes the shuffling generator; ``start_method`` (e.g.
    "spawn") selects the multiprocessing context.
    """
    kwargs: dict = {
        "num_workers": int(num_workers),
        "pin_memory": device.type == "cuda",
        "worker_init_fn": worker_init_fn,
    }
    if num_workers > 0:
        kwargs["persistent_workers"] = bool(persistent_workers)
        if start_method:
            kwargs["multiprocessing_context"] = start_method
    if seed is not None:
        generator = torch.Generator()
        generator.manual_seed(int(seed))
        kwargs["generator"] = generator
    return kwargs


class ResumableSampler(torch.utils.data.Sampler):
    """Wraps a sampler with ``set_epoch`` (e.g. DistributedSampler, also in one process) so a run resumed
    in the middle of an epoch skips the samples it already trained on.

    The wrapped order depends only on (seed, epoch), so the resumed run sees exactly the batches the
    uninterrupted run would have (exact with num_workers=0; with workers, augmentation randomness differs).
    With ``tag_epoch`` it yields ``(epoch, index)`` pairs: a dataset that seeds its randomness by epoch then
    reads the epoch from the index itself, so its DataLoader workers can be persistent (and keep their
    caches across epochs) instead of being restarted each epoch to see a ``set_epoch`` on the dataset.
    """

    def __init__(self, sampler, tag_epoch: bool = False):
        self.sampler = sampler
        self.skip = 0
        self.epoch = 0
        self.tag_epoch = bool(tag_epoch)

    def set_epoch(self, epoch: int, skip_samples: int = 0) -> None:
        self.sampler.set_epoch(epoch)
        self.epoch = int(epoch)
        self.skip = int(skip_samples)

    def __iter__(self):
        skip, self.skip = self.skip, 0
        indices = itertools.islice(iter(self.sampler), skip, None)
        if self.tag_epoch:
            epoch = self.epoch
            return ((epoch, int(i)) for i in indices)
        return indices

    def __len__(self) -> int:
        return max(len(self.sampler) - self.skip, 0)


# ------------------------------------------------------------------------------------------------- amp
@dataclass
class AmpPolicy:
    """Mixed-precision settings: active only on CUDA; bfloat16 where supported (no loss scaling needed),
    else float16 with a GradScaler."""

    enabled: bool
    dtype: torch.dtype | None
    scaler: torch.amp.GradScaler

    def autocast(self):
        if not self.enabled:
            return contextlib.nullcontext()
        return torch.autocast(device_type="cuda", dtype=self.dtype)


def amp_policy(device: torch.device, enabled: bool = True, prefer_bf16: bool = True) -> AmpPolicy:
    use = bool(enabled) and device.type == "cuda"
    dtype = None
    if use:
        dtype = torch.bfloat16 if prefer_bf16 and torch.cuda.is_bf16_supported() else torch.float16
    scaler = torch.amp.GradScaler("cuda", enabled=use and dtype == torch.float16)
    return AmpPolicy(enabled=use, dtype=dtype, scaler=scaler)


def optimizer_step(loss: torch.Tensor, optimizer: torch.optim.Optimizer, amp: AmpPolicy,
                   parameters=None, grad_clip: float | None = None) -> float | None:
    """Backward, optional gradient clipping (after unscaling), step, zero_grad.

    Returns the gradient norm before clipping when clipping is on.
    """
    scaler = amp.scaler
    scaler.scale(loss).backward()
    grad_norm = None
    if grad_clip and grad_clip > 0:
        scaler.unscale_(optimizer)
        params = parameters if parameters is not None else [
            p for group in optimizer.param_groups for p in group["params"]]
        grad_norm = float(torch.nn.utils.clip_grad_norm_(params, grad_clip))
    scaler.step(optimizer)
    scaler.update()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


# ------------------------------------------------------------------------------------------------- ddp
@dataclass
class DistInfo:
    rank: int = 0
    local_rank: int = 0
    world_size: int = 1

    @property
    def enabled(self) -> bool:
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def distributed_env() -> DistInfo:
    """Read torchrun's RANK / LOCAL_RANK / WORLD_SIZE (single process when absent)."""
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
    )


def init_distributed(device_name: str = "auto") -> tuple[DistInfo, torch.device]:
    """Initialise torchrun DDP when WORLD_SIZE > 1 and pick this process's device.

    Backend: :func:`choose_backend` (nccl on CUDA when available, else gloo; CPU DDP works for tests).
    """
    info = distributed_env()
    device = select_device(device_name, local_rank=info.local_rank if info.enabled else None)
    if info.enabled and not dist.is_initialized():
        if device.type == "cuda":
            torch.cuda.set_device(device)
        dist.init_process_group(backend=choose_backend(device), rank=info.rank, world_size=info.world_size)
    return info, device


def choose_backend(device: torch.device) -> str:
    """nccl for CUDA devices where this torch build has it; gloo otherwise (CPU, and Windows builds of
    torch, which ship without nccl). ``DIST_BACKEND`` in the environment overrides the choice."""
    forced = os.environ.get("DIST_BACKEND")
    if forced:
        return forced
    if device.type == "cuda" and dist.is_nccl_available():
        return "nccl"
    return "gloo"


def cleanup_distributed() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def wrap_model(model: torch.nn.Module, info: DistInfo, device: torch.device,
               find_unused_parameters: bool = False) -> torch.nn.Module:
    """Wrap in DistributedDataParallel when running under torchrun, else return the model."""
    if not info.enabled:
        return model
    device_ids = [device.index] if device.type == "cuda" else None
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=device_ids, find_unused_parameters=find_unused_parameters)


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The plain module inside DDP / DataParallel / torch.compile wrappers."""
    while True:
        if isinstance(model, (torch.nn.parallel.DistributedDataParallel, torch.nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod"):
            model = model._orig_mod
        else:
            return model


def all_reduce_sum(values, device: torch.device | None = None) -> np.ndarray:
    """Sum numbers (or an array) across ranks; identity in a single process. Returns float64 numpy."""
    array = np.asarray(values, dtype=np.float64)
    if not (dist.is_available() and dist.is_initialized()):
        return array
    backend = dist.get_backend()
    target = device if (device is not None and backend == "nccl") else torch.device("cpu")
    tensor = torch.as_tensor(array, dtype=torch.float64, device=target)
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor.cpu().numpy()


def all_reduce_mean(sums, counts, device: torch.device | None = None) -> np.ndarray:
    """Global mean = (Σ over ranks of sums) / (Σ over ranks of counts): exact, not a mean of means."""
    total = all_reduce_sum(np.concatenate([np.atleast_1d(sums), np.atleast_1d(counts)]), device)
    n = np.atleast_1d(sums).size
    return total[:n] / np.maximum(total[n:], 1e-12)


def any_rank(flag: bool, device: torch.device | None = None) -> bool:
    """True when ``flag`` is true on any rank (so all ranks stop together, e.g. after Ctrl+C)."""
    if not (dist.is_available() and dist.is_initialized()):
        return bool(flag)
    return bool(all_reduce_sum([1.0 if flag else 0.0], device)[0] > 0)


def gather_arrays(array: np.ndarray) -> np.ndarray:
    """Concatenate a per-rank numpy array (first axis) over all ranks, in rank order."""
    if not (dist.is_available() and dist.is_initialized()):
        return array
    parts: list = [None] * dist.get_world_size()
    dist.all_gather_object(parts, np.asarray(array))
    return np.concatenate(parts, axis=0)


# -------------------------------------------------------------------------------- cooling / interrupts
class CoolingPause:
    """Sleep ``pause_s`` seconds every ``every_steps`` calls of :meth:`step` (0 disables).

    Lets workstation GPUs that throttle or crash from heat cool down during long runs.
    """

    def __init__(self, every_steps: int = 0, pause_s: float = 0.0, sleep=time.sleep):
        self.every_steps = int(every_steps or 0)
        self.pause_s = float(pause_s or 0.0)
        self.count = 0
        self.total_paused_s = 0.0
        self._sleep = sleep

    def step(self) -> bool:
        """Count one step; returns True when it paused."""
        self.count += 1
        if self.every_steps > 0 and self.pause_s > 0 and self.count % self.every_steps == 0:
            self._sleep(self.pause_s)
            self.total_paused_s += self.pause_s
            return True
        return False


def _stop_signals() -> list:
    """Signals that ask a run to stop cleanly: Ctrl+C, SIGTERM (kill, schedulers such as SLURM), and on
    Windows Ctrl+Break (SIGBREAK)."""
    names = ["SIGINT", "SIGTERM", "SIGBREAK"]
    return [getattr(signal, name) for name in names if hasattr(signal, name)]


class GracefulInterrupt:
    """Context manager: the first Ctrl+C / SIGTERM / SIGBREAK sets ``requested`` (and ``reason``) so the loop
    can save and stop cleanly; a second Ctrl+C raises KeyboardInterrupt as usual."""

    def __init__(self):
        self.requested = False
        self.reason: str | None = None
        self._previous: dict = {}

    def request(self, reason: str) -> None:
        """Ask for a clean stop (what a signal does; also used by ``--stop-after-steps``)."""
        if not self.requested:
            self.requested = True
            self.reason = reason

    def _handler(self, signum, frame):
        if self.requested and signum == getattr(signal, "SIGINT", None):
            raise KeyboardInterrupt
        name = signal.Signals(signum).name if hasattr(signal, "Signals") else str(signum)
        if not self.requested:
            safe_print(f"\n{name} received: finishing this step, saving checkpoint_last.pt, then stopping "
                       "(press Ctrl+C again to abort at once).", file=sys.stderr)
        self.request(name)

    def __enter__(self):
        for sig in _stop_signals():
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except (ValueError, OSError):  # not in the main thread, or not settable on this platform
                pass
        return self

    def __exit__(self, *exc):
        for sig, previous in self._previous.items():
            with contextlib.suppress(ValueError, OSError, TypeError):
                signal.signal(sig, previous)
        self._previous = {}
        return False
