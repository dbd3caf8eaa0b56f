"""CUDA paths of the vmat pipeline (skipped without a GPU): each trainer (U-Net, cascade, diffusion) with
autocast and channels_last, stopped mid-epoch and resumed on the GPU, validated with the CUDA gamma; a model
trained on the GPU predicting on the CPU and on the GPU alike; the CUDA gamma against the CPU gamma."""

import json
import math

import numpy as np
import pytest
import torch
import yaml

from common.runlog import read_csv_rows

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

CUDA_TRAIN = {
    "patch": {"size": [8, 16, 16], "per_case_per_epoch": 3},
    "model": {"channels": [8, 16], "groups": 2},
    "train": {"epochs": 2, "batch_size": 2, "lr": 1e-3, "ema_decay": 0.9, "channels_last": True},
    "val": {"gamma_subset": 500, "inference": {"window_zyx": [24, 32, 32], "tta_flip": False,
                                               "diffusion_samples": 1, "diffusion_steps": 2}},
    "runtime": {"amp": True},
}
MODELS = {"unet": {"type": "unet"}, "cascade": {"type": "cascade"},
          "diffusion": {"type": "diffusion", "diffusion_steps": 20, "sampling_steps": 2}}


def finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_train_with_amp_stop_and_resume_on_cuda(kind, tiny_npz, tmp_path):
    from vmat.predict_vmat import main as predict
    from vmat.train_vmat import main as train

    cfg = json.loads(json.dumps(CUDA_TRAIN))
    cfg["model"].update(MODELS[kind])
    config = tmp_path / "cuda.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    args = ["--config", str(config), "--data", str(tiny_npz), "--device", "cuda", "--output-dir", str(tmp_path / "run")]
    first = train(args + ["--stop-after-steps", "4"])  # 3 steps per epoch: one batch into epoch 2
    assert first["interrupted"]
    second = train(args + ["--resume"])
    assert not second["interrupted"] and second["epochs_completed"] == 2
    rows = read_csv_rows(tmp_path / "run" / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(finite(r["train_loss"]) for r in rows)
    assert finite(second["val"]["val_mae_body_gy"]) and finite(second["val"]["val_gamma_3_3_pass_pct"])

    # the GPU-trained checkpoint predicts on the GPU and on the CPU alike
    outs = {}
    for device in ("cuda", "cpu"):
        outs[device] = predict(["--checkpoint", str(tmp_path / "run"), "--data", str(tiny_npz), "--device", device,
                                "--cases", "synth_000", "--output-dir", str(tmp_path / f"pred_{device}"),
                                "--set", "inference.window_zyx=[24,32,32]", "--set", "inference.diffusion_samples=1",
                                "--set", "inference.diffusion_steps=2"])
    doses = [np.load(tmp_path / f"pred_{d}" / "synth_000.npz")["dose"] for d in ("cuda", "cpu")]
    assert all(np.isfinite(d).all() for d in doses)
    tolerance = 1.0 if kind == "diffusion" else 0.05  # Gy; diffusion noise is drawn on the CPU in both cases
    assert np.abs(doses[0] - doses[1]).mean() < tolerance


def test_gamma_on_cuda_matches_cpu():
    from vmat.gamma import gamma_index

    rng = np.random.default_rng(0)
    zz, yy, xx = np.meshgrid(*[np.arange(n, dtype=np.float32) for n in (12, 20, 20)], indexing="ij")
    reference = 60.0 * np.exp(-((zz - 6) ** 2 / 20 + (yy - 10) ** 2 / 30 + (xx - 10) ** 2 / 30))
    evaluated = reference * (1 + 0.02 * rng.standard_normal(reference.shape)).astype(np.float32)
    kw = {"spacing_mm": (3.0, 2.5, 2.5), "dose_percent": 3.0, "distance_mm": 3.0, "interp_fraction": 5,
          "max_gamma": 2.0}
    cpu = gamma_index(reference, evaluated, device="cpu", **kw)
    cuda = gamma_index(reference, evaluated, device="cuda", **kw)
    valid = np.isfinite(cpu)
    assert valid.sum() > 100 and np.array_equal(valid, np.isfinite(cuda))
    np.testing.assert_allclose(cuda[valid], cpu[valid], atol=1e-4)
