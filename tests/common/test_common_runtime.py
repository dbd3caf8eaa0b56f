import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from common.demo import SineSumDataset
from common.runtime import (CoolingPause, GracefulInterrupt, ResumableSampler, all_reduce_mean, amp_policy,
                            cpu_threads, dataloader_kwargs, distributed_env, optimizer_step, seed_everything, select_device,
                            unwrap_model, worker_init_fn)

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable


def test_select_device():
    assert select_device("cpu") == torch.device("cpu")
    expected = "cuda" if torch.cuda.is_available() else "mps" if torch.backends.mps.is_available() else "cpu"
    assert select_device("auto").type == expected
    with pytest.raises(ValueError, match="unknown device 'tpu'"):
        select_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="--device cuda was requested"):
            select_device("cuda")


def test_seed_everything_uses_seed_plus_rank():
    seed_everything(5, rank=0)
    a = (random.random(), np.random.rand(), torch.rand(1).item())
    seed_everything(5, rank=0)
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a
    seed_everything(4, rank=1)  # 4 + 1 = 5: the same stream
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == a


def test_dataloader_kwargs_cpu_and_workers():
    kw = dataloader_kwargs(torch.device("cpu"), num_workers=0, seed=3)
    assert kw["pin_memory"] is False and kw["worker_init_fn"] is worker_init_fn and "persistent_workers" not in kw
    kw = dataloader_kwargs(torch.device("cpu"), num_workers=2, start_method="spawn")
    assert kw["persistent_workers"] is True and kw["multiprocessing_context"] == "spawn"


def test_spawned_workers_load_module_level_dataset():
    """What Windows and macOS do: workers are spawned and must pickle dataset and worker_init_fn."""
    dataset = SineSumDataset(64, 3, 0.0, seed=0)
    loader = DataLoader(dataset, batch_size=16, **dataloader_kwargs(torch.device("cpu"), 2, seed=0,
                                                                   start_method="spawn"))
    batches = list(loader)
    assert sum(len(b["input"]) for b in batches) == 64
    assert torch.equal(torch.cat([b["input"] for b in batches]), torch.from_numpy(dataset.x))


def test_resumable_sampler_skips_once():
    class Fixed:
        def set_epoch(self, epoch):
            self.epoch = epoch

        def __iter__(self):
            return iter(range(10))

        def __len__(self):
            return 10

    sampler = ResumableSampler(Fixed())
    sampler.set_epoch(1, skip_samples=4)
    assert len(sampler) == 6 and list(sampler) == [4, 5, 6, 7, 8, 9]
    assert list(sampler) == list(range(10))  # the skip applies to the resumed epoch only
    tagged = ResumableSampler(Fixed(), tag_epoch=True)  # the epoch travels with each index to the workers
    tagged.set_epoch(3, skip_samples=8)
    assert len(tagged) == 2 and list(tagged) == [(3, 8), (3, 9)]


def test_amp_is_off_on_cpu_and_optimizer_step_clips():
    amp = amp_policy(torch.device("cpu"), enabled=True)
    assert not amp.enabled and not amp.scaler.is_enabled()
    with amp.autocast():
        assert torch.ones(1).dtype == torch.float32
    layer = torch.nn.Linear(2, 1)
    optimizer = torch.optim.SGD(layer.parameters(), lr=0.0)
    norm = optimizer_step((layer(torch.full((1, 2), 100.0)) ** 2).sum(), optimizer, amp, grad_clip=1.0)
    assert norm > 1.0 and all(p.grad is None for p in layer.parameters())


def test_cooling_pause_counts_steps():
    slept = []
    pause = CoolingPause(every_steps=3, pause_s=2.5, sleep=slept.append)
    results = [pause.step() for _ in range(7)]
    assert results == [False, False, True, False, False, True, False]
    assert slept == [2.5, 2.5] and pause.total_paused_s == 5.0
    assert not any(CoolingPause(0, 5.0, sleep=slept.append).step() for _ in range(5))


@pytest.mark.skipif(os.name == "nt", reason="SIGINT to self is POSIX-only in this test")
def test_graceful_interrupt_first_ctrl_c_sets_flag():
    with GracefulInterrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGINT)
        assert interrupt.requested
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), signal.SIGINT)


def test_single_process_reductions_and_unwrap():
    assert distributed_env().world_size == int(os.environ.get("WORLD_SIZE", 1))
    assert all_reduce_mean([6.0, 3.0], [3, 0]).tolist() == [2.0, 3.0 / 1e-12]
    model = torch.nn.Linear(1, 1)
    assert unwrap_model(torch.nn.DataParallel(model)) is model


def test_console_output_survives_cp1252(tmp_path):
    """A Windows console (cp1252) cannot encode 'İ' or '✓': printing them must not crash a run."""
    env = {**os.environ, "PYTHONIOENCODING": "cp1252", "PROGRESS": "0"}
    code = ("from common.runtime import make_console_safe, safe_print\n"
            "make_console_safe()\nprint('SNİK İTİK NÖROPATİ ✓')\nsafe_print('µV ≥ 3σ ✓')\n")
    done = subprocess.run([PYTHON, "-c", code], env=env, capture_output=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode("cp1252", "replace")
    out = done.stdout.decode("cp1252")
    assert "SN\\u0130K" in out and "\\u2713" in out and "µV" in out
    # a whole script run through the shared CLI front with a unicode --set value
    done = subprocess.run([PYTHON, "-m", "common.demo", "--config", "configs/common/demo.yaml", "--device", "cpu",
                           "--set", "train.epochs=1", "--set", "data.n_train=64", "--set", "data.n_val=32",
                           "--output-dir", str(tmp_path / "ünïcode_✓")], env=env, capture_output=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr.decode("cp1252", "replace")


def test_torchrun_ddp_two_gloo_processes(tmp_path):
    """2 CPU processes: identical weights on both ranks, and only rank 0 writes files."""
    out = tmp_path / "ddp"
    env = {**os.environ, "PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    cmd = [PYTHON, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "common.demo",
           "--config", str(ROOT / "configs/common/demo.yaml"), "--device", "cpu", "--set", "train.epochs=2",
           "--set", "data.n_train=256", "--set", "data.n_val=64", "--set", "model.dropout=0.1",
           "--output-dir", str(out)]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    import json

    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["ddp_max_weight_spread"] == 0.0
    log_lines = (out / "log.txt").read_text(encoding="utf-8").splitlines()
    assert sum("epoch 2:" in line for line in log_lines) == 1  # one writer, not two
    assert sum(1 for _ in open(out / "metrics.csv", encoding="utf-8")) == 3  # header + 2 epochs
    assert not (tmp_path / "runs").exists()  # rank 1 created no run folder of its own
    assert "DDP rank 0/2" in log_lines[0]


def test_cpu_threads_sets_the_count_for_the_block_only():
    before = torch.get_num_threads()
    target = 1 if before != 1 else 2
    with cpu_threads(target, "cpu"):
        assert torch.get_num_threads() == target
    assert torch.get_num_threads() == before
    with cpu_threads(None, "cpu"), cpu_threads(target, "meta"):  # None and non-CPU devices leave it alone
        assert torch.get_num_threads() == before
    with pytest.raises(ValueError, match="cpu_threads"), cpu_threads(0, "cpu"):
        pass
    assert torch.get_num_threads() == before
