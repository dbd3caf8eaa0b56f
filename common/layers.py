"""Small building blocks shared by the domains' networks."""

from __future__ import annotations

import torch
import torch.nn as nn


def group_count(channels: int, max_groups: int = 8) -> int:
    """The largest number of GroupNorm groups ≤ ``max_groups`` that divides ``channels``."""
    groups = max(1, min(int(max_groups), int(channels)))
    while channels % groups:
        groups -= 1
    return groups


def group_norm(channels: int, max_groups: int = 8) -> nn.GroupNorm:
    """GroupNorm (Wu & He 2018) with :func:`group_count` groups, so any width works."""
    return nn.GroupNorm(group_count(channels, max_groups), channels)


def film(x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Feature-wise linear modulation (Perez et al. 2018) around identity: (1 + γ)·x + β.

    ``x`` is (B, C, *spatial); ``gamma`` and ``beta`` are (B, C) and broadcast over the spatial axes, so a
    zero-initialized conditioning network starts as the identity.
    """
    shape = gamma.shape + (1,) * (x.ndim - gamma.ndim)
    return x * (1 + gamma.reshape(shape)) + beta.reshape(shape)
