"""The ABR trainers on CUDA with mixed precision (bf16 autocast, and fp16 with a GradScaler as on GPUs
without bf16), then validation and sampling on CUDA. Skipped without a CUDA device."""

import math

import pytest
import torch

from abr import generate_abr, train_abr, train_diffusion_abr, validate_abr
from common.runlog import read_csv_rows

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


@pytest.fixture(params=["bf16", "fp16"])
def amp_dtype(request, monkeypatch):
    """bf16 where the GPU has it; "fp16" pretends it has not, so float16 autocast with loss scaling runs."""
    if request.param == "fp16":
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    elif not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    return request.param


def finite_losses(run_dir, columns) -> None:
    rows = read_csv_rows(run_dir / "metrics.csv")
    assert rows
    for row in rows:
        for column in columns:
            assert math.isfinite(float(row[column])), (column, row)
    ckpt = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    assert all(torch.isfinite(v.float()).all() for v in ckpt["state_dict"].values() if v.is_floating_point())


def test_multitask_trains_and_validates_on_cuda_with_amp(amp_dtype, tiny_config, tiny_cache, tmp_path):
    run_dir = tmp_path / "train"
    summary = train_abr.main(["--config", str(tiny_config), "--data", str(tiny_cache), "--device", "cuda",
                              "--output-dir", str(run_dir), "--set", "runtime.amp=true", "--set", "train.epochs=2",
                              "--set", "loss.uncertainty_weighting=true", "--set", "loss.dynamic_class_weights=true"])
    assert not summary["interrupted"] and summary["epochs_completed"] == 2
    finite_losses(run_dir, ["train_loss", "val_loss"])
    scaler = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (amp_dtype == "fp16")  # GradScaler state only when float16 needs loss scaling
    val = validate_abr.main(["--config", str(tiny_config), "--checkpoint", str(run_dir), "--data", str(tiny_cache),
                             "--device", "cuda", "--output-dir", str(tmp_path / "val")])
    assert val["headline"]["n_ears"] > 0 and math.isfinite(val["headline"]["threshold_mae_db"])


def test_multitask_resumes_mid_epoch_on_cuda(tiny_config, tiny_cache, tmp_path):
    base = ["--config", str(tiny_config), "--data", str(tiny_cache), "--device", "cuda", "--set", "runtime.amp=true",
            "--set", "train.batch_size=4", "--set", "train.max_steps_per_epoch=3", "--output-dir", str(tmp_path)]
    first = train_abr.main(base + ["--stop-after-steps", "4"])
    assert first["interrupted"] and not (tmp_path / "summary.json").exists()
    second = train_abr.main(base + ["--resume"])
    assert not second["interrupted"] and second["epochs_completed"] == 2
    assert [r["epoch"] for r in read_csv_rows(tmp_path / "metrics.csv")] == ["1", "2"]
    finite_losses(tmp_path, ["train_loss", "val_loss"])


def test_diffusion_trains_and_samples_on_cuda_with_amp(amp_dtype, tiny_config, tiny_cache, tmp_path):
    run_dir = tmp_path / "diffusion"
    summary = train_diffusion_abr.main(["--config", str(tiny_config), "--data", str(tiny_cache), "--device", "cuda",
                                        "--output-dir", str(run_dir), "--set", "runtime.amp=true",
                                        "--set", "diffusion.epochs=2"])
    assert not summary["interrupted"] and math.isfinite(summary["best_val_loss_ema"])
    finite_losses(run_dir, ["train_loss", "val_loss_ema"])
    gen = generate_abr.main(["--config", str(tiny_config), "--checkpoint", str(run_dir), "--device", "cuda",
                             "--output-dir", str(tmp_path / "generate")])
    assert gen["n_generated"] == 8
