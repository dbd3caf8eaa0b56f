"""Heads' output ranges, the threshold head's local path by hand, masked losses, curriculum weights."""

import math

import numpy as np
import pytest
import torch

from abr.defaults import abr_defaults
from abr.models import ABRMultiTaskNet, RobustThresholdHead, neighbour_correlations
from abr.objectives import LOSS_NAMES, combine_losses, loss_weights, task_losses
from common.losses import UncertaintyWeighting

T_MS = [i * 0.2 for i in range(75)]  # 5 kHz, 15 ms
RANGES = [[0.5, 6.0], [2.0, 9.5], [3.5, 14.0]]


def tiny_net(**kw):
    torch.manual_seed(0)
    args = dict(n_samples=75, time_ms=T_MS, channels=8, width=16, transformer_layers=1, heads=2, series_layers=1,
                dropout=0.0, latency_range_ms=RANGES, amplitude_range_rel=[-1.0, 6.0], threshold_range_db=[0.0, 120.0],
                censor_db=110.0, step_db=20.0)
    args.update(kw)
    return ABRMultiTaskNet(**args)


def fake_batch(b=3, levels=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    mask = torch.ones(b, levels, dtype=torch.bool)
    mask[0, 3] = False  # a padded level
    return {
        "signal": torch.randn(b, levels, 75, generator=g) * 5,
        "clean": torch.randn(b, levels, 75, generator=g),
        "has_clean": mask.clone(),
        "static": torch.randn(b, levels, 4, generator=g),
        "intensity_db": torch.tensor([[20.0, 40.0, 60.0, 80.0]] * b),
        "level_mask": mask,
        "exist": torch.rand(b, levels, 3, generator=g) > 0.5,
        "exist_known": torch.ones(b, levels, 3, dtype=torch.bool),
        "latency_ms": torch.rand(b, levels, 3, generator=g) * 5 + 3,
        "amp_rel": torch.rand(b, levels, 3, generator=g),
        "amp_known": torch.ones(b, levels, 3, dtype=torch.bool),
        "class_idx": torch.tensor([0, 2, 4]),
        "threshold_db": torch.tensor([15.0, 55.0, 110.0]),
        "threshold_known": torch.tensor([True, True, False]),
    }


def test_outputs_stay_inside_the_configured_ranges():
    net = tiny_net().eval()
    batch = fake_batch()
    with torch.no_grad():
        out = net(batch["signal"] * 100, batch["static"] * 10, batch["intensity_db"], batch["level_mask"])
    lat = out["latency_ms"][batch["level_mask"]]
    for w, (lo, hi) in enumerate(RANGES):
        assert (lat[:, w] >= lo - 1e-4).all() and (lat[:, w] <= hi + 1e-4).all()
    amp = out["amp_rel"][batch["level_mask"]]
    assert (amp >= -1.0).all() and (amp <= 6.0).all()
    assert (out["threshold_db"] >= 0).all() and (out["threshold_db"] <= 120).all()
    assert out["class_logits"].shape == (3, 5) and out["denoised"].shape == (3, 4, 75)


def test_latency_range_outside_the_window_is_rejected():
    with pytest.raises(ValueError, match="outside the window"):
        tiny_net(latency_range_ms=[[0.5, 6.0], [2.0, 9.5], [20.0, 30.0]])


def test_threshold_local_path_is_the_expected_end_of_the_run_from_the_top():
    head = RobustThresholdHead(width=4, threshold_range_db=[0, 120], censor_db=110.0, step_db=10.0, dropout=0.0)
    levels = torch.tensor([[10.0, 20.0, 30.0, 0.0]] * 5)
    mask = torch.tensor([[True, True, True, False]] * 5)  # the last slot is padding
    big = 50.0
    logits = torch.tensor([[-big, big, big, -big], [-big, -big, -big, big], [big, -big, big, 0.0],
                           [big, big, 0.0, 0.0], [big, big, big, -big]])
    out = head(torch.zeros(5, 4), levels, mask, logits)
    # responses from 20 dB up → the run from the top ends at 20, minus half the 10-dB gap = 15 dB
    # no response anywhere → censor; an isolated detection at 10 dB below a silent 20 dB → 30 − 5
    # a 50 % top level → 0.5·(10 − 5) + 0.5·110; everything responds → lowest level − step/2 = 5
    expected = torch.tensor([15.0, 110.0, 25.0, 0.5 * 5.0 + 0.5 * 110.0, 5.0])
    torch.testing.assert_close(out["threshold_local_db"], expected, atol=1e-4, rtol=0)


def test_neighbour_correlation_of_identical_levels_is_one():
    t = torch.linspace(0, 15, 75)
    wave = torch.exp(-0.5 * ((t - 6) / 0.4) ** 2)
    signal = torch.stack([wave, torch.roll(wave, 1), -wave])[None]  # level 2 is a 1-sample shift, 3 inverted
    window = ((t >= 1) & (t <= 12)).float()
    corr = neighbour_correlations(signal, torch.ones(1, 3, dtype=torch.bool), window, max_lag=2)
    assert corr[0, 0, 0] == pytest.approx(1.0, abs=1e-5)  # up-neighbour of level 1 (shift found)
    assert corr[0, 1, 1] == pytest.approx(1.0, abs=1e-5)  # its down-neighbour is the same pair
    assert corr[0, 2, 0] == 0.0  # the top level has no higher neighbour
    assert corr[0, 1, 0] < 0.5  # inverted response


def test_padded_levels_do_not_change_any_loss():
    cfg = abr_defaults()["loss"]
    net = tiny_net().eval()
    batch = fake_batch()
    other = {k: v.clone() for k, v in batch.items()}
    other["signal"][0, 3] = 1e3  # garbage in the padded slot
    other["latency_ms"][0, 3] = -50.0
    with torch.no_grad():
        a = task_losses(net(batch["signal"], batch["static"], batch["intensity_db"], batch["level_mask"]), batch, cfg, None)
        b = task_losses(net(other["signal"], other["static"], other["intensity_db"], other["level_mask"]), other, cfg, None)
    for name in LOSS_NAMES:
        assert float(a[name]) == pytest.approx(float(b[name]), rel=1e-5, abs=1e-6), name


def test_masked_losses_are_finite_zero_when_nothing_is_labelled_and_keep_gradients():
    cfg = abr_defaults()["loss"]
    net = tiny_net()
    batch = fake_batch()
    batch["exist"][:] = False  # no wave anywhere: latency/amplitude masks empty
    batch["has_clean"][:] = False
    batch["threshold_known"][:] = False
    losses = task_losses(net(batch["signal"], batch["static"], batch["intensity_db"], batch["level_mask"]), batch, cfg, None)
    for name in ("peak_latency", "peak_amplitude", "signal", "threshold"):
        assert float(losses[name].detach()) == 0.0 and losses[name].requires_grad
    total = combine_losses(losses, loss_weights(cfg, 100))
    total.backward()
    assert math.isfinite(float(total.detach()))
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in net.parameters())


@pytest.mark.parametrize("regression, classification", [("nll", "focal"), ("huber", "weighted_ce")])
def test_loss_variants_and_uncertainty_weighting(regression, classification):
    cfg = dict(abr_defaults()["loss"], regression=regression, classification=classification)
    net = tiny_net()
    batch = fake_batch()
    losses = task_losses(net(batch["signal"], batch["static"], batch["intensity_db"], batch["level_mask"]), batch, cfg,
                         torch.tensor([0.5, 1.0, 1.0, 1.0, 2.0]))
    uw = UncertaintyWeighting({n: "regression" for n in LOSS_NAMES})
    total = combine_losses(losses, loss_weights(cfg, 100), uw)
    total.backward()
    assert all(p.grad is not None for p in uw.parameters())


def test_curriculum_follows_the_seed_phases():
    cfg = abr_defaults()["loss"]
    cfg["curriculum"] = {"peak_latency": [[0, 0.0], [20, 0.0], [50, 2.5]]}
    assert loss_weights(cfg, 10)["peak_latency"] == 0.0
    assert loss_weights(cfg, 35)["peak_latency"] == pytest.approx(1.25)
    assert loss_weights(cfg, 80)["peak_latency"] == 2.5
    assert loss_weights(cfg, 10)["classification"] == 2.0
    cfg["curriculum"] = {"latency": [[0, 1.0]]}
    with pytest.raises(ValueError, match="unknown loss 'latency'"):
        loss_weights(cfg, 1)


def test_temperature_is_a_saved_buffer():
    net = tiny_net()
    assert "classifier.temperature" in net.state_dict()
    assert np.isclose(float(net.classifier.temperature), 1.0)
