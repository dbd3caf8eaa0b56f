import pytest
import torch
import torch.nn as nn

from common.ensembling import EMA, SWA, ensemble_predict, enable_mc_dropout, mc_dropout_predict, train_members, update_bn


class Constant(nn.Module):
    def __init__(self, value):
        super().__init__()
        self.value = value

    def forward(self, x):
        return {"cbf": torch.full_like(x, self.value), "att": torch.full_like(x, 2 * self.value)}


def test_ensemble_mean_and_population_variance_of_dict_outputs():
    mean, var = ensemble_predict([Constant(1.0), Constant(3.0)], torch.zeros(2))
    assert torch.allclose(mean["cbf"], torch.full((2,), 2.0)) and torch.allclose(var["cbf"], torch.full((2,), 1.0))
    assert torch.allclose(mean["att"], torch.full((2,), 4.0)) and torch.allclose(var["att"], torch.full((2,), 4.0))
    _, single_var = ensemble_predict([Constant(5.0)], torch.zeros(1))
    assert torch.equal(single_var["cbf"], torch.zeros(1))


def test_mc_dropout_needs_dropout_and_keeps_batchnorm_in_eval():
    with pytest.raises(ValueError, match="no dropout layers"):
        mc_dropout_predict(nn.Linear(3, 1), torch.ones(4, 3))
    model = nn.Sequential(nn.Linear(3, 16), nn.BatchNorm1d(16), nn.Dropout(0.5), nn.Linear(16, 1))
    assert enable_mc_dropout(model) == 1 and not model[1].training and model[2].training
    torch.manual_seed(0)
    mean, var = mc_dropout_predict(model, torch.randn(8, 3), n_samples=30)
    assert mean.shape == (8, 1) and bool((var > 0).all()) and not model.training


def test_update_bn_recomputes_running_statistics_from_dict_batches():
    model = nn.Sequential(nn.BatchNorm1d(2))
    data = torch.tensor([[1.0, 10.0], [3.0, 20.0], [5.0, 30.0], [7.0, 40.0]])
    loader = [{"input": data[:2]}, {"input": data[2:]}]
    assert update_bn(loader, model) == 1
    assert torch.allclose(model[0].running_mean, torch.tensor([4.0, 25.0]))
    assert update_bn(loader, nn.Linear(2, 2)) == 0


def test_swa_averages_weights_and_requires_an_averaged_epoch():
    model = nn.Linear(1, 1, bias=False)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    swa = SWA(model, optimizer, start_epoch=2, swa_lr=0.05)
    with pytest.raises(RuntimeError, match="never averaged"):
        swa.finalize([], "cpu")
    for epoch, value in enumerate([1.0, 2.0, 4.0, 6.0]):
        with torch.no_grad():
            model.weight.fill_(value)
        optimizer.step()  # no gradients, so no update; keeps the optimizer-before-scheduler order
        swa.after_epoch(epoch)
    averaged = swa.finalize([], "cpu")
    assert averaged.weight.item() == pytest.approx(5.0)  # epochs 2 and 3 averaged
    assert optimizer.param_groups[0]["lr"] == pytest.approx(0.05)


def test_ema_hand_computed_and_swap():
    model = nn.Linear(1, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(0.0)
    ema = EMA(model, decay=0.5)
    with torch.no_grad():
        model.weight.fill_(1.0)
    ema.update(model)  # decay = min(0.5, 2/11) = 2/11 → 0·2/11 + 1·9/11
    assert ema.shadow["weight"].item() == pytest.approx(9 / 11)
    with ema.applied(model):
        assert model.weight.item() == pytest.approx(9 / 11)
    assert model.weight.item() == 1.0
    restored = EMA(model)
    restored.load_state_dict(ema.state_dict())
    assert restored.shadow["weight"].item() == pytest.approx(9 / 11)


def test_ema_state_read_on_the_cpu_lands_where_the_model_lives():
    """Resuming on a GPU: the checkpoint is read onto the CPU, the shadow must follow the model's device
    (the meta device stands in for a GPU here), else the next update mixes devices."""
    saved = EMA(nn.Linear(2, 2)).state_dict()
    on_device = EMA(nn.Linear(2, 2).to("meta"))
    on_device.load_state_dict(saved)
    assert all(value.device.type == "meta" for value in on_device.shadow.values())


def test_train_members_uses_consecutive_seeds():
    assert train_members(3, 10, lambda index, seed: (index, seed)) == [(0, 10), (1, 11), (2, 12)]
