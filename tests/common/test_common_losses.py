import math

import numpy as np
import pytest
import torch
from sklearn.metrics import log_loss

from common.losses import (PiecewiseLinear, UncertaintyWeighting, curriculum_weights, focal_loss, gaussian_nll,
                           masked_huber, masked_l1, masked_mean, masked_mse, weighted_cross_entropy)


def test_masked_mean_ignores_nan_outside_mask_and_empty_mask_is_connected_zero():
    values = torch.tensor([1.0, 3.0, float("nan")], requires_grad=True)
    mask = torch.tensor([True, True, False])
    assert masked_mean(values, mask).item() == pytest.approx(2.0)
    empty = masked_mean(values, torch.zeros(3, dtype=torch.bool))
    assert empty.item() == 0.0
    empty.backward()
    assert values.grad is not None and torch.all(values.grad == 0)


@pytest.mark.parametrize("fn, expected", [
    (masked_l1, (1 + 2) / 2),
    (masked_mse, (1 + 4) / 2),
    (lambda p, t, m: masked_huber(p, t, m, delta=1.0), (0.5 * 1 + (2 - 0.5)) / 2),
])
def test_masked_regression_losses(fn, expected):
    pred = torch.tensor([[1.0, 2.0, 10.0]])
    target = torch.tensor([[0.0, 4.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0]])
    assert fn(pred, target, mask).item() == pytest.approx(expected)


def test_gaussian_nll_hand_value_and_gradient_sign():
    mean = torch.tensor([1.0], requires_grad=True)
    log_var = torch.tensor([math.log(4.0)], requires_grad=True)
    loss = gaussian_nll(mean, log_var, torch.tensor([3.0]))
    assert loss.item() == pytest.approx(0.5 * (math.log(4.0) + 4.0 / 4.0))
    assert gaussian_nll(mean, log_var, torch.tensor([3.0]), full=True).item() == pytest.approx(
        loss.item() + 0.5 * math.log(2 * math.pi))
    loss.backward()
    assert mean.grad.item() < 0  # moving the mean toward 3 lowers the loss
    assert torch.nn.functional.gaussian_nll_loss(torch.tensor([1.0]), torch.tensor([3.0]),
                                                 torch.tensor([4.0])).item() == pytest.approx(loss.item())


def test_weighted_cross_entropy_equals_sklearn_weighted_log_loss():
    rng = np.random.default_rng(0)
    logits = torch.tensor(rng.normal(size=(40, 3)), dtype=torch.float64)
    y = torch.tensor(rng.integers(0, 3, size=40))
    weights = [1.0, 2.0, 4.0]
    loss = weighted_cross_entropy(logits, y, weights)
    probs = torch.softmax(logits, dim=1).numpy()
    expected = log_loss(y.numpy(), probs, sample_weight=np.array(weights)[y.numpy()], labels=[0, 1, 2])
    assert loss.item() == pytest.approx(expected)


def test_cross_entropy_all_ignored_is_zero_not_nan():
    logits = torch.zeros(2, 3, requires_grad=True)
    assert weighted_cross_entropy(logits, torch.tensor([-100, -100])).item() == 0.0


def test_focal_loss_gamma_zero_is_weighted_ce_and_hand_value():
    logits = torch.tensor([[2.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    y = torch.tensor([0, 1, 0])
    alpha = [0.25, 0.75]
    assert focal_loss(logits, y, gamma=0.0, alpha=alpha).item() == pytest.approx(
        weighted_cross_entropy(logits, y, alpha).item())
    p = torch.softmax(logits, dim=1)[torch.arange(3), y]
    expected = (-(1 - p) ** 2 * torch.log(p)).mean()
    assert focal_loss(logits, y, gamma=2.0).item() == pytest.approx(expected.item())


def test_uncertainty_weighting_initial_value_and_learning():
    weighting = UncertaintyWeighting({"reg": "regression", "cls": "classification"})
    losses = {"reg": torch.tensor(2.0), "cls": torch.tensor(3.0)}
    assert weighting(losses).item() == pytest.approx(0.5 * 2.0 + 3.0)  # s = 0 at init
    # d/ds [0.5 e^{-s} L + 0.5 s] = 0 at s = log L: the optimum weight is 1/L
    optimizer = torch.optim.SGD(weighting.parameters(), lr=0.1)
    for _ in range(500):
        optimizer.zero_grad()
        weighting({"reg": torch.tensor(4.0)}).backward()
        optimizer.step()
    assert weighting.log_vars["reg"].item() == pytest.approx(math.log(4.0), abs=1e-2)
    with pytest.raises(KeyError, match="no uncertainty weight"):
        weighting({"other": torch.tensor(1.0)})
    with pytest.raises(ValueError, match="kind must be"):
        UncertaintyWeighting({"x": "ranking"})


@pytest.mark.parametrize("epoch, expected", [(0, 0.0), (20, 0.0), (35, 0.5), (50, 1.0), (80, 1.0), (-5, 0.0)])
def test_piecewise_linear_schedule(epoch, expected):
    assert PiecewiseLinear([(0, 0.0), (20, 0.0), (50, 1.0)])(epoch) == pytest.approx(expected)


def test_curriculum_table_with_constants():
    weights = curriculum_weights({"exist": 1.2, "latency": [[0, 0.0], [20, 0.0], [50, 2.5]]}, epoch=35)
    assert weights == {"exist": pytest.approx(1.2), "latency": pytest.approx(1.25)}
