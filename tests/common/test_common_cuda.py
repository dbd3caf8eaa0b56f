"""CUDA-only paths of common/ (run by `make test-gpu`; skipped without CUDA): mixed precision with loss
scaling and bfloat16, channels_last, the demo trainer on CUDA, nccl with two processes."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from common.runtime import amp_policy, choose_backend, optimizer_step

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]
ROOT = Path(__file__).resolve().parents[2]


def _conv_model(device):
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.GroupNorm(2, 8), torch.nn.SiLU(),
                               torch.nn.Conv2d(8, 1, 3, padding=1)).to(device)


@pytest.mark.parametrize("prefer_bf16", [False, True], ids=["fp16+GradScaler", "bf16"])
def test_autocast_step_changes_weights_and_stays_finite(prefer_bf16):
    device = torch.device("cuda")
    if prefer_bf16 and not torch.cuda.is_bf16_supported():
        pytest.skip("bfloat16 not supported on this GPU")
    model = _conv_model(device)
    amp = amp_policy(device, enabled=True, prefer_bf16=prefer_bf16)
    assert amp.enabled and amp.dtype == (torch.bfloat16 if prefer_bf16 else torch.float16)
    assert amp.scaler.is_enabled() == (not prefer_bf16)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    before = [p.detach().clone() for p in model.parameters()]
    x, y = torch.randn(4, 3, 16, 16, device=device), torch.randn(4, 1, 16, 16, device=device)
    for _ in range(3):
        with amp.autocast():
            out = model(x)
            assert out.dtype == amp.dtype
            loss = torch.nn.functional.mse_loss(out.float(), y)
        norm = optimizer_step(loss, optimizer, amp, grad_clip=1.0)
        assert torch.isfinite(loss) and norm is not None
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))


def test_channels_last_matches_contiguous():
    device = torch.device("cuda")
    model = _conv_model(device).eval()
    x = torch.randn(2, 3, 32, 32, device=device)
    reference = model(x)
    model_cl = model.to(memory_format=torch.channels_last)
    out = model_cl(x.to(memory_format=torch.channels_last))
    torch.testing.assert_close(out, reference, rtol=1e-3, atol=1e-4)


def test_demo_trains_and_resumes_on_cuda(tmp_path):
    import common.demo as demo

    args = ["--config", "configs/common/demo.yaml", "--device", "cuda", "--set", "data.n_train=256",
            "--set", "data.n_val=64", "--set", "train.epochs=2", "--output-dir", str(tmp_path)]
    first = demo.main(args + ["--stop-after-steps", "11"])
    assert first["interrupted"]
    summary = demo.main(args + ["--resume"])
    assert summary["epochs_completed"] == 2 and summary["val"]["mae"] < summary["baseline_mean_predictor"]["mae"]


def test_nccl_is_the_backend_on_cuda():
    assert choose_backend(torch.device("cuda", 0)) == ("nccl" if torch.distributed.is_nccl_available() else "gloo")


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 GPUs")
def test_torchrun_two_gpus_nccl(tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "common.demo",
           "--config", str(ROOT / "configs/common/demo.yaml"), "--device", "cuda", "--set", "train.epochs=2",
           "--set", "data.n_train=256", "--set", "data.n_val=64", "--output-dir", str(out)]
    done = subprocess.run(cmd, env={**os.environ, "PROGRESS": "0"}, capture_output=True, text=True, cwd=ROOT,
                          timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text(encoding="utf-8"))
    assert summary["ddp_max_weight_spread"] == 0.0
