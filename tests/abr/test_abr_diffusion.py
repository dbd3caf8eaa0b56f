"""The conditional diffusion generator: a training step as diffusion (v-prediction, cosine schedule),
2-step DDIM sampling with classifier-free guidance, EMA, and the quality metrics' reference values."""

import numpy as np
import pytest
import torch

from abr.generator import sample_waveforms
from abr.models import ABRDiffusionUNet
from abr.quality import nearest_correlation, pair_metrics, quality_report
from common.diffusion import GaussianDiffusion
from common.ensembling import EMA


def make():
    torch.manual_seed(0)
    return ABRDiffusionUNet(n_samples=75, channels=[8, 16], cond_dim=16, static_dim=3, n_classes=5)


def test_training_step_is_diffusion_and_updates_the_weights():
    model = make()
    process = GaussianDiffusion(50, "cosine", "v")
    x0 = torch.randn(6, 1, 75) * 0.3
    cond = torch.randn(6, 3)
    cls = torch.tensor([0, 1, 2, 3, 4, -1])  # the last one unconditional (classifier-free guidance)
    seen_t = []

    def fn(x, t):
        seen_t.append(t)
        assert not torch.allclose(x, x0)  # the network sees noised inputs, not the clean waveform
        return model(x, t, cond, cls)

    loss = process.training_loss(fn, x0, generator=torch.Generator().manual_seed(1))
    assert torch.isfinite(loss)
    before = [p.detach().clone() for p in model.parameters()]
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss.backward()
    opt.step()
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert seen_t[0].shape == (6,)


def test_two_step_ddim_sampling_with_guidance_and_ema():
    model = make()
    ema = EMA(model, decay=0.9)
    ema.update(model)
    process = GaussianDiffusion(50, "cosine", "v")
    cond = np.zeros((4, 3), dtype=np.float32)
    with ema.applied(model):
        a = sample_waveforms(model, process, cond, np.array([0, 1, 2, 3]), steps=2, guidance_scale=2.0, clip=3.0,
                             device="cpu", seed=7)
        b = sample_waveforms(model, process, cond, np.array([0, 1, 2, 3]), steps=2, guidance_scale=2.0, clip=3.0,
                             device="cpu", seed=7)
    assert a.shape == (4, 75) and np.isfinite(a).all()
    np.testing.assert_array_equal(a, b)  # DDIM with eta = 0 is deterministic given the seed
    assert np.abs(a).max() <= 3.0 + 1e-5 or np.isfinite(a).all()


def test_conditioning_changes_the_output_and_null_class_is_shared():
    model = make()
    for p in model.parameters():  # leave the zero-initialized output layer out of the equation
        torch.nn.init.normal_(p, std=0.2)
    x = torch.randn(2, 1, 75)
    t = torch.tensor([10, 10])
    out_a = model(x, t, torch.zeros(2, 3), torch.tensor([0, 0]))
    out_b = model(x, t, torch.zeros(2, 3), torch.tensor([3, 3]))
    assert not torch.allclose(out_a, out_b)
    u1 = model(x, t, torch.zeros(2, 3), torch.tensor([-1, -1]))
    u2 = model(x, t, torch.ones(2, 3), torch.tensor([-1, -1]))
    torch.testing.assert_close(u1, u2)  # unconditional ignores the static conditions


def test_quality_metrics_are_perfect_for_identical_sets_and_flag_memorization():
    rng = np.random.default_rng(0)
    t = np.arange(75) * 0.2
    real = np.stack([np.exp(-0.5 * ((t - 6 - rng.normal(0, 0.1)) / 0.4) ** 2) * 0.3 + rng.normal(0, 0.03, 75)
                     for _ in range(40)])
    levels = np.repeat([40.0, 80.0], 20)
    cfg = {"v_window_80db_ms": [5.0, 7.8], "v_window_slope_ms_per_10db": 0.0}
    same = pair_metrics(real, real, levels, t, 5000.0, cfg)
    assert same["rms_wasserstein_uv"] == 0.0 and same["psd_log_distance_db"] == 0.0
    assert same["condition_mean_r"] == pytest.approx(1.0) and same["wave_v_latency_shift_ms"] == 0.0
    assert nearest_correlation(real[:5], real) == pytest.approx(np.ones(5))
    report = quality_report(real[::-1].copy(), real, levels, real, t, 5000.0, cfg)
    assert report["generated_vs_real"]["nearest_train_r"] == pytest.approx(1.0)  # copies of training data
    assert set(report["real_vs_real"]) >= {"condition_mean_r", "psd_log_distance_db"}
