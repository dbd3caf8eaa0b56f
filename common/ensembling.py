"""Ensembles, MC dropout and stochastic weight averaging.

- :func:`ensemble_predict`: mean and variance of several models' outputs (tensors or dicts of tensors).
- :func:`mc_dropout_predict`: the same over stochastic passes of one model with only dropout active.
- :class:`SWA`: torch.optim.swa_utils.AveragedModel + SWALR, with a BatchNorm update that accepts the
  project's dict batches (swa_utils.update_bn only understands tensors or lists).
- :class:`EMA`: exponential moving average of weights (evaluation and diffusion sampling).
- :func:`train_members`: train ensemble members one after another with seeds ``seed + i`` so only
  one model occupies the GPU at a time.
"""

from __future__ import annotations

import contextlib
import gc
from collections.abc import Callable, Iterable, Sequence

import torch
import torch.nn as nn
from torch.optim.swa_utils import SWALR, AveragedModel

from common.runtime import unwrap_model


def _stack_outputs(outputs: list):
    first = outputs[0]
    if isinstance(first, dict):
        return {key: _stack_outputs([o[key] for o in outputs]) for key in first}
    if isinstance(first, (tuple, list)):
        return type(first)(_stack_outputs([o[i] for o in outputs]) for i in range(len(first)))
    return torch.stack([o.float() for o in outputs], dim=0)


def _mean_var(stacked):
    if isinstance(stacked, dict):
        pairs = {k: _mean_var(v) for k, v in stacked.items()}
        return {k: p[0] for k, p in pairs.items()}, {k: p[1] for k, p in pairs.items()}
    if isinstance(stacked, (tuple, list)):
        pairs = [_mean_var(v) for v in stacked]
        return type(stacked)(p[0] for p in pairs), type(stacked)(p[1] for p in pairs)
    var = stacked.var(dim=0, unbiased=False) if stacked.shape[0] > 1 else torch.zeros_like(stacked[0])
    return stacked.mean(dim=0), var


def _default_forward(model, inputs):
    return model(inputs)


@torch.no_grad()
def ensemble_predict(models: Sequence[nn.Module], inputs, forward: Callable = _default_forward):
    """Run every model (eval mode) on ``inputs``; returns (mean, variance) over members.

    Variance is the population variance across members (0 for a single member). ``forward(model,
    inputs)`` adapts models whose call signature differs.
    """
    if not models:
        raise ValueError("an ensemble needs at least one model")
    outputs = []
    for model in models:
        model.eval()
        outputs.append(forward(model, inputs))
    return _mean_var(_stack_outputs(outputs))


def enable_mc_dropout(model: nn.Module) -> int:
    """Eval mode everywhere except dropout layers (BatchNorm keeps its running statistics).

    Returns the number of dropout layers switched on; 0 means MC dropout would be deterministic.
    """
    model.eval()
    count = 0
    for module in model.modules():
        if isinstance(module, nn.modules.dropout._DropoutNd):
            module.train()
            count += 1
    return count


@torch.no_grad()
def mc_dropout_predict(model: nn.Module, inputs, n_samples: int = 20, forward: Callable = _default_forward):
    """Mean and variance over ``n_samples`` stochastic forward passes with dropout active (Gal & Ghahramani
    2016). Raises if the model has no dropout layer (the "uncertainty" would be zero)."""
    if enable_mc_dropout(model) == 0:
        raise ValueError(f"{type(model).__name__} has no dropout layers: MC dropout needs dropout > 0")
    try:
        outputs = [forward(model, inputs) for _ in range(int(n_samples))]
    finally:
        model.eval()
    return _mean_var(_stack_outputs(outputs))


def _default_batch_input(batch):
    if isinstance(batch, dict):
        return batch["input"]
    if isinstance(batch, (list, tuple)):
        return batch[0]
    return batch


@torch.no_grad()
def update_bn(loader: Iterable, model: nn.Module, device: torch.device | str = "cpu",
              batch_input: Callable = _default_batch_input, forward: Callable = _default_forward) -> int:
    """Recompute BatchNorm running statistics of ``model`` with one pass over ``loader``.

    Needed after weight averaging (Izmailov et al. 2018): averaged weights do not match the running
    statistics of any single model. Returns the number of BatchNorm layers reset (0: nothing to do).
    """
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms:
        return 0
    momenta = {}
    for bn in norms:
        bn.reset_running_stats()
        momenta[bn] = bn.momentum
        bn.momentum = None  # cumulative average over the pass
    was_training = model.training
    model.train()
    for batch in loader:
        inputs = batch_input(batch)
        if isinstance(inputs, torch.Tensor):
            inputs = inputs.to(device)
        forward(model, inputs)
    for bn, momentum in momenta.items():
        bn.momentum = momentum
    model.train(was_training)
    return len(norms)


class SWA:
    """Stochastic weight averaging from ``start_epoch`` on, with SWALR annealing to ``swa_lr``.

        swa = SWA(model, optimizer, start_epoch=18, swa_lr=5e-6)
        ... after each epoch: swa.after_epoch(epoch)   # averages and steps SWALR once active
        swa.finalize(train_loader, device)             # BN update; then evaluate and save swa.module
    """

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer, start_epoch: int,
                 swa_lr: float | Sequence[float], anneal_epochs: int = 1):
        self.averaged = AveragedModel(model)
        self.model = model
        self.start_epoch = int(start_epoch)
        self.scheduler = SWALR(optimizer, swa_lr=swa_lr, anneal_epochs=anneal_epochs)
        self.n_averaged = 0

    def active(self, epoch: int) -> bool:
        return epoch >= self.start_epoch

    def after_epoch(self, epoch: int) -> bool:
        """Average the current weights in (when active) and step the SWA learning rate."""
        if not self.active(epoch):
            return False
        self.averaged.update_parameters(self.model)
        self.scheduler.step()
        self.n_averaged += 1
        return True

    def finalize(self, loader: Iterable, device, batch_input: Callable = _default_batch_input,
                 forward: Callable = _default_forward) -> nn.Module:
        """BN-update the averaged model and return the plain averaged module (ready to evaluate/save)."""
        if self.n_averaged == 0:
            raise RuntimeError("SWA never averaged a model: training ended before swa start_epoch")
        update_bn(loader, self.averaged.module, device, batch_input, forward)
        return self.averaged.module


def train_members(n_members: int, base_seed: int, train_one: Callable[[int, int], object]) -> list:
    """Train ``n_members`` models sequentially: ``train_one(member_index, seed)`` with seed = base + index.

    Memory is released between members so only one model lives on the GPU at a time.
    """
    results = []
    for index in range(int(n_members)):
        results.append(train_one(index, int(base_seed) + index))
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return results


class EMA:
    """Exponential moving average of a model's weights (Polyak averaging), for evaluation and sampling.

    shadow ← decay·shadow + (1 − decay)·weights after each optimizer step; the effective decay ramps up
    as min(decay, (1 + n)/(10 + n)) so early averages are not dominated by the random init. Buffers
    (e.g. BatchNorm statistics) are copied, not averaged.

        ema = EMA(model, decay=0.999)
        ... after optimizer.step(): ema.update(model)
        with ema.applied(model): evaluate(model)       # swaps the EMA weights in, then back
    """

    def __init__(self, model: nn.Module, decay: float = 0.999):
        self.decay = float(decay)
        self.num_updates = 0
        model = unwrap_model(model)
        self.shadow = {k: v.detach().clone().float() if v.dtype.is_floating_point else v.detach().clone()
                       for k, v in model.state_dict().items()}
        self._params = {name for name, _ in model.named_parameters()}

    @torch.no_grad()
    def update(self, model: nn.Module) -> None:
        self.num_updates += 1
        decay = min(self.decay, (1 + self.num_updates) / (10 + self.num_updates))
        for name, value in unwrap_model(model).state_dict().items():
            if name in self._params and value.dtype.is_floating_point:
                self.shadow[name].mul_(decay).add_(value.detach().float(), alpha=1 - decay)
            else:
                self.shadow[name].copy_(value.detach())

    def copy_to(self, model: nn.Module) -> None:
        target = unwrap_model(model)
        state = target.state_dict()
        target.load_state_dict({k: self.shadow[k].to(dtype=state[k].dtype, device=state[k].device) for k in state})

    def applied(self, model: nn.Module):
        """Context manager: EMA weights inside, the live weights restored on exit."""
        @contextlib.contextmanager
        def _swap():
            backup = {k: v.detach().clone() for k, v in unwrap_model(model).state_dict().items()}
            self.copy_to(model)
            try:
                yield model
            finally:
                unwrap_model(model).load_state_dict(backup)
        return _swap()

    def state_dict(self) -> dict:
        return {"decay": self.decay, "num_updates": self.num_updates, "shadow": dict(self.shadow)}

    def load_state_dict(self, state: dict) -> None:
        self.decay = float(state["decay"])
        self.num_updates = int(state["num_updates"])
        for key, value in state["shadow"].items():
            # a checkpoint is read onto the CPU; the shadow stays where the model lives (a GPU on resume)
            current = self.shadow.get(key)
            self.shadow[key] = value.to(current.device).clone() if current is not None else value.clone()
