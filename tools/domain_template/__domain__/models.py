"""__domain__ models. Every class a checkpoint may rebuild is registered (common/README.md §4)."""

from __future__ import annotations

import torch
import torch.nn as nn

from common.checkpoint import register_model


@register_model
class __Domain__Net(nn.Module):
    """MLP: Linear-SiLU blocks and a linear output (replace with the domain's model)."""

    def __init__(self, n_features: int, hidden: list[int]):
        super().__init__()
        layers: list[nn.Module] = []
        width = n_features
        for size in hidden:
            layers += [nn.Linear(width, size), nn.SiLU()]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)
