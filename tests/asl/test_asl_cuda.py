"""CUDA paths of the asl pipeline (skipped without a GPU): training with autocast (bf16, or fp16 with a
GradScaler where bf16 is missing) and on-device simulation, a mid-epoch stop and resume on the GPU, validation
and benchmark on CUDA (the batched LS fit and the CUDA timing path), and the batched LS fit on CUDA against
the same fit on the CPU."""

import json
import math

import numpy as np
import pytest
import torch

from asl import benchmark_asl, train_asl, validate_asl
from asl.fitting import fit_batched
from asl.physics import PHYSICS_DEFAULTS, noise_sigma, signal_curves_np
from common.runlog import read_csv_rows

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]


def finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def test_train_with_amp_stop_resume_validate_and_benchmark_on_cuda(pipeline, tmp_path):
    root, cfg, _, _ = pipeline
    args = [*cfg, "--device", "cuda", "--set", "runtime.amp=true", "--set", "train.n_ensembles=1",
            "--set", "train.epochs=2", "--set", "train.steps_per_epoch=3"]
    out = tmp_path / "train"
    first = train_asl.main([*args, "--output-dir", str(out), "--stop-after-steps", "4"])
    assert first["interrupted"]
    saved = torch.load(out / "member_0" / "checkpoint_last.pt", weights_only=True)
    assert saved["step"] == 4 and saved["extra"]["partial_epoch"]["batches_done"] == 1
    second = train_asl.main([*args, "--output-dir", str(out), "--resume"])
    assert not second["interrupted"] and second["members"][0]["epochs_completed"] == 2
    rows = read_csv_rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"] and all(finite(r["train_loss"]) for r in rows)
    assert all(finite(v) for v in second["headline"].values())
    assert json.loads((out / "run_state.json").read_text(encoding="utf-8"))["status"] == "completed"

    val = validate_asl.main(["--checkpoint", str(out), *cfg, "--device", "cuda", "--output-dir", str(tmp_path / "val")])
    assert finite(val["headline"]["cbf_mae_nn_snr3"]) and finite(val["headline"]["cbf_mae_ls_nominal_snr3"])
    bench = benchmark_asl.main(["--checkpoint", str(out), *cfg, "--device", "cuda", "--output-dir", str(tmp_path / "b")])
    assert bench["device"].startswith("cuda") and all(finite(v) and v > 0 for v in bench["rates"].values())
    # a checkpoint trained on the GPU validates on the CPU
    cpu = validate_asl.main(["--checkpoint", str(out), *cfg, "--output-dir", str(tmp_path / "val_cpu")])
    assert cpu["headline"]["cbf_mae_nn_snr3"] == pytest.approx(val["headline"]["cbf_mae_nn_snr3"], rel=0.05)


def test_batched_ls_on_cuda_matches_cpu():
    rng = np.random.default_rng(0)
    cbf, att = rng.uniform(10, 90, 200), rng.uniform(500, 3500, 200)
    clean = signal_curves_np(cbf, att, PHYSICS_DEFAULTS)
    y = clean + rng.standard_normal(clean.shape) * noise_sigma(5.0, PHYSICS_DEFAULTS)
    on_cpu, on_gpu = fit_batched(y, PHYSICS_DEFAULTS), fit_batched(y, PHYSICS_DEFAULTS, device="cuda")
    both = on_cpu["converged"] & on_gpu["converged"]
    assert both.mean() > 0.9
    # float64 on both devices; a voxel may stop at a different kink of the piecewise model, hence a share
    assert np.mean(np.abs(on_gpu["cbf"] - on_cpu["cbf"])[both] < 1e-3) >= 0.99
    assert np.mean(np.abs(on_gpu["att"] - on_cpu["att"])[both] < 0.1) >= 0.99


def test_training_ls_channels_on_cuda_equal_the_per_item_cpu_fits():
    """On CUDA the training batch's LS channels come from one fit over all items' protocols
    (asl.protocol_data.ls_slab_inputs' default there); they equal the CPU's per-item fits to rounding."""
    from torch.utils.data import default_collate

    from asl.defaults import defaults
    from asl.protocol_data import BrainSlabDataset, ls_slab_inputs, simulate_batch
    from common.config import load_config

    cfg = load_config("configs/asl/protocol_smoke.yaml", defaults=defaults())
    dataset = BrainSlabDataset(6, 5, cfg["brain"], cfg["phantom"], cfg["protocol"], {**cfg["protocol_net"], "crop_px": 16})
    batch = default_collate([dataset[i] for i in range(6)])
    inputs = simulate_batch(batch, "cpu", torch.Generator().manual_seed(0), snr=8.0)
    nominal = {k[len("nominal_"):]: v for k, v in batch.items() if k.startswith("nominal_")}
    args = (inputs["x"], inputs["s_ref"], nominal, inputs["gm_weight"], batch["mask"], cfg["fit"])
    on_cpu = ls_slab_inputs(*args)
    on_gpu = ls_slab_inputs(inputs["x"].cuda(), inputs["s_ref"].cuda(), {k: v.cuda() for k, v in nominal.items()},
                            inputs["gm_weight"].cuda(), batch["mask"].cuda(), cfg["fit"]).cpu()
    valid = on_cpu[:, :, 4] > 0.5
    assert valid.sum() > 200 and torch.equal(valid, on_gpu[:, :, 4] > 0.5)
    assert float((on_cpu - on_gpu).abs().amax(2)[valid].median()) < 1e-5

