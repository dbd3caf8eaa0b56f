import math

import numpy as np
import pytest
import torch

from common.diffusion import (GaussianDiffusion, cosine_alpha_bar, guided, scale_to_unit, timestep_embedding,
                              unscale_from_unit)


def test_cosine_schedule_matches_nichol_dhariwal():
    ab = cosine_alpha_bar(1000)
    f = lambda t: math.cos((t / 1000 + 0.008) / 1.008 * math.pi / 2) ** 2  # noqa: E731
    assert ab[0] == pytest.approx(f(1) / f(0))
    assert ab[499] == pytest.approx(f(500) / f(0), rel=1e-6)
    assert np.all(np.diff(ab) < 0) and ab[-1] < 1e-4


@pytest.mark.parametrize("prediction", ["eps", "v", "x0"])
def test_parameterizations_invert(prediction):
    diffusion = GaussianDiffusion(100, "cosine", prediction)
    x0 = torch.rand(3, 1, 8) * 2 - 1
    noise = torch.randn_like(x0)
    t = torch.tensor([0, 50, 98])
    x_t = diffusion.q_sample(x0, t, noise)
    x0_hat, eps_hat = diffusion.split_prediction(diffusion.training_target(x0, noise, t), x_t, t)
    assert torch.allclose(x0_hat, x0, atol=1e-4) and torch.allclose(eps_hat, noise, atol=1e-3)


def test_v_target_hand_value():
    diffusion = GaussianDiffusion(10, "linear", "v")
    ab = diffusion.alpha_bar[4]
    v = diffusion.training_target(torch.ones(1, 1), torch.full((1, 1), 2.0), torch.tensor([4]))
    assert v.item() == pytest.approx((ab.sqrt() * 2 - (1 - ab).sqrt()).item())


def test_ddim_with_oracle_recovers_data_in_two_steps():
    diffusion = GaussianDiffusion(1000, "cosine", "eps")
    target = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 16)

    def oracle(x, t):  # the exact ε for a data distribution concentrated on ``target``
        ab = diffusion.alpha_bar[t].reshape(-1, 1, 1)
        return (x - ab.sqrt() * target) / (1 - ab).sqrt()

    generator = torch.Generator().manual_seed(0)
    sample = diffusion.ddim_sample(oracle, (2, 1, 16), num_sampling_steps=2, generator=generator)
    assert torch.allclose(sample, target.expand(2, 1, 16), atol=1e-5)
    assert diffusion.ddim_timesteps(2) == [999, 0]
    stochastic = diffusion.ddim_sample(oracle, (2, 1, 16), num_sampling_steps=4, eta=1.0, generator=generator)
    assert torch.allclose(stochastic, target.expand(2, 1, 16), atol=1e-4)


def test_training_loss_has_gradients_and_respects_mask():
    diffusion = GaussianDiffusion(50, "cosine", "v")
    net = torch.nn.Conv1d(1, 1, 3, padding=1)
    x0 = torch.rand(4, 1, 12) * 2 - 1
    loss = diffusion.training_loss(lambda x, t: net(x), x0, generator=torch.Generator().manual_seed(1))
    loss.backward()
    assert torch.isfinite(loss) and net.weight.grad.abs().sum() > 0
    zero_mask = torch.zeros_like(x0)
    assert diffusion.training_loss(lambda x, t: net(x), x0, mask=zero_mask).item() == 0.0


def test_guidance_and_helpers():
    fn = guided(lambda x, t, c: x + c, cond=torch.tensor(2.0), uncond=torch.tensor(0.0), guidance_scale=3.0)
    assert fn(torch.tensor(1.0), None).item() == pytest.approx(1 + 3 * 2)
    emb = timestep_embedding(torch.tensor([0, 10]), 7)
    assert emb.shape == (2, 7) and torch.allclose(emb[0, :3], torch.ones(3))
    x = torch.tensor([0.0, 35.0, 70.0])
    assert torch.allclose(scale_to_unit(x, 0, 70), torch.tensor([-1.0, 0.0, 1.0]))
    assert torch.allclose(unscale_from_unit(scale_to_unit(x, 0, 70), 0, 70), x)
    with pytest.raises(ValueError, match="prediction must be"):
        GaussianDiffusion(10, prediction="score")
