"""CUDA paths of the lensing pipeline (skipped without a GPU): the batched renderer on CUDA against the CPU
(float64 and float32, direct and FFT convolution, gradients), data-set simulation on CUDA against the CPU,
and training of both models with autocast (bf16, or fp16 with a GradScaler) including a mid-epoch stop
and resume, then validation on CUDA and of the GPU-trained checkpoint on the CPU."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from common.runlog import read_csv_rows
from lensing import preprocess_lensing, train_lensing, validate_lensing
from lensing.population import PopulationConfig, sample_scenes
from lensing.psf import GaussianPSF
from lensing.simulator import render
from lensing.storage import read_array
from lensing.surveys import get_survey

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

SMOKE = "configs/lensing/smoke.yaml"


def _scenes(dtype, device, n: int = 8, n_pix: int = 32):
    survey = get_survey("hsc")  # several bands: per-band PSFs and amplitudes
    params, _ = sample_scenes(n, survey, n_pix, PopulationConfig(), np.random.default_rng(0), dtype)
    params = {g: {k: v.to(device) for k, v in d.items()} for g, d in params.items()}
    psf = GaussianPSF(torch.tensor(survey.psf_fwhm_arcsec, dtype=dtype, device=device))
    return params, psf, survey.pixel_scale_arcsec


@pytest.mark.parametrize("conv_method", ["direct", "fft"])
def test_render_on_cuda_matches_cpu(conv_method):
    reference_params, reference_psf, scale = _scenes(torch.float64, "cpu")
    reference = render(reference_params, 32, scale, reference_psf, supersampling=2, conv_method=conv_method)
    peak = reference.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
    # float32: cuDNN may use TF32 for a direct conv2d by default (10-bit mantissa), hence the looser bound
    for dtype, tolerance in [(torch.float64, 1e-9), (torch.float32, 2e-3)]:
        params, psf, _ = _scenes(dtype, "cuda")
        image = render(params, 32, scale, psf, supersampling=2, conv_method=conv_method)
        assert image.device.type == "cuda" and image.dtype == dtype
        error = ((image.double().cpu() - reference).abs() / peak).max().item()
        assert error < tolerance, (dtype, error)


def test_batch_renderer_on_cuda_is_one_chunk_and_matches_cpu():
    from lensing.batch_renderer import BatchRenderer

    reference_params, reference_psf, scale = _scenes(torch.float64, "cpu")
    reference = render(reference_params, 32, scale, reference_psf, supersampling=3)
    params, _, _ = _scenes(torch.float64, "cuda")
    psf = GaussianPSF(torch.tensor(get_survey("hsc").psf_fwhm_arcsec, dtype=torch.float64))
    fast = BatchRenderer(32, scale, psf, 3, n_bands=reference.shape[1], dtype=torch.float64, device="cuda")
    assert fast.chunk == 0  # the whole batch at once on a GPU
    image = fast(params)
    assert image.device.type == "cuda"
    peak = reference.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
    assert ((image.cpu() - reference).abs() / peak).max().item() < 1e-9


def test_compiled_float32_batch_renderer_on_cuda_matches_cpu_float64():
    """The compiled float32 path that the benchmark times with --device cuda: torch's atan on CUDA (fast_math
    is CPU-only), the whole batch as one chunk written in place; within 1e-4 of the float64 CPU images."""
    from lensing.batch_renderer import BatchRenderer

    reference_params, reference_psf, scale = _scenes(torch.float64, "cpu")
    reference = render(reference_params, 32, scale, reference_psf, supersampling=3)
    params, _, _ = _scenes(torch.float32, "cuda")
    psf = GaussianPSF(torch.tensor(get_survey("hsc").psf_fwhm_arcsec, dtype=torch.float32))
    fast = BatchRenderer(32, scale, psf, 3, n_bands=reference.shape[1], device="cuda", compile=True)
    assert fast.chunk == 0 and not fast.fast_math
    with torch.no_grad():
        image = fast(params)
    assert image.device.type == "cuda" and image.dtype == torch.float32
    peak = reference.abs().amax(dim=(1, 2, 3), keepdim=True).clamp(min=1e-12)
    assert ((image.double().cpu() - reference).abs() / peak).max().item() < 1e-4


def test_render_gradients_on_cuda_match_cpu():
    grads = {}
    for device in ("cpu", "cuda"):
        params, psf, scale = _scenes(torch.float64, device, n=4, n_pix=24)
        theta = params["lens"]["theta_E"].clone().requires_grad_(True)
        params["lens"]["theta_E"] = theta
        render(params, 24, scale, psf).pow(2).sum().backward()
        grads[device] = theta.grad.cpu()
    assert torch.isfinite(grads["cuda"]).all()
    assert torch.allclose(grads["cuda"], grads["cpu"], rtol=1e-7, atol=1e-9)


def test_simulated_dataset_on_cuda_matches_cpu(tmp_path):
    """The noise comes from a CPU generator on every device, so only the rendering may differ."""
    args = ["simulate", "--config", SMOKE, "--set", "simulate.n_per_survey=[16]", "--set", "simulate.n_pix=24",
            "--set", "simulate.batch_size=8", "--set", "simulate.dtype=float64", "--set", "split.enabled=false"]
    cpu = preprocess_lensing.main([*args, "--output-dir", str(tmp_path / "cpu")])
    gpu = preprocess_lensing.main([*args, "--device", "cuda", "--output-dir", str(tmp_path / "gpu")])
    assert gpu["n_rows"] == cpu["n_rows"] == 16 and gpu["n_lenses"] == cpu["n_lenses"]
    for name in sorted(p.name for p in (tmp_path / "cpu" / "images").iterdir()):
        a, b = read_array(tmp_path / "cpu" / "images" / name), read_array(tmp_path / "gpu" / "images" / name)
        assert np.abs(a - b).max() <= 1e-5 * max(np.abs(a).max(), 1e-12), name


@pytest.mark.parametrize("model_args", [
    [],
    ["--set", "model.name=deeplens_params", "--set", "physics.weight=0.01",
     "--set", "physics.param_supervision_weight=1.0", "--set", "model.dropout=0.3"],
], ids=["classifier", "physics_informed"])
def test_train_with_amp_stop_resume_and_validate_on_cuda(dataset, tmp_path, model_args):
    folder, _ = dataset
    out = tmp_path / "train"
    args = ["--config", SMOKE, "--data", str(folder), "--device", "cuda", "--set", "runtime.amp=true",
            "--set", "train.epochs=2", "--set", "train.max_steps_per_epoch=3", "--set", "train.plot_curves=false",
            "--output-dir", str(out), *model_args]
    first = train_lensing.main([*args, "--stop-after-steps", "4"])
    assert first["interrupted"]
    saved = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert saved["step"] == 4 and saved["extra"]["partial_epoch"]["batches_done"] == 1
    second = train_lensing.main([*args, "--resume"])
    assert not second["interrupted"] and second["members"][0]["epochs_completed"] == 2
    rows = read_csv_rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    assert all(math.isfinite(float(r["train_bce"])) and math.isfinite(float(r["val_bce"])) for r in rows)
    if model_args:
        assert all(math.isfinite(float(r["train_physics"])) for r in rows)
    assert json.loads((out / "run_state.json").read_text(encoding="utf-8"))["status"] == "completed"

    validate = ["--config", SMOKE, "--checkpoint", str(out), "--data", str(folder),
                "--set", "validate.figures=false", "--set", "validate.baseline=false"]
    on_gpu = validate_lensing.main([*validate, "--device", "cuda", "--set", "runtime.amp=true",
                                    "--output-dir", str(tmp_path / "val_gpu")])
    on_cpu = validate_lensing.main([*validate, "--device", "cpu", "--output-dir", str(tmp_path / "val_cpu")])
    assert math.isfinite(on_gpu["overall"]["auroc"])
    # autocast on the GPU, float32 on the CPU: the same ranking up to rounding
    assert on_cpu["overall"]["auroc"] == pytest.approx(on_gpu["overall"]["auroc"], abs=0.05)
