"""Dose prediction networks: a 3D U-Net with FiLM conditioning, a two-stage cascade, a conditional
diffusion model. All are built by common.checkpoint.build_model from plain kwargs.

- :class:`UNet3D` — the seed's BaselineUNet3D: residual blocks Conv3d-GroupNorm-SiLU, channels per level
  (default 48/96/192/384/384, four poolings), trilinear upsampling with skip concatenation, FiLM
  (Perez et al. 2018: per-channel scale and shift) from a conditioning vector (prescription, structure
  presence, target dose ratios; plus a timestep embedding when used inside the diffusion model).
- :class:`CascadeUNet3D` — two U-Nets, the second refining the first from (inputs, first prediction),
  as the OpenKBP winner C3D (Liu et al., 2021); ``return_stages`` gives both outputs for deep supervision.
- :class:`DiffusionDoseModel` — conditional denoising diffusion on dose / Rx scaled to [−1, 1]
  (DoseDiff, Feng et al., IEEE TMI 2024), ε- or v-prediction, cosine schedule, DDIM sampling with few
  steps and several samples for a voxel-wise spread (common.diffusion).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.diffusion import GaussianDiffusion, scale_to_unit, timestep_embedding, unscale_from_unit
from common.layers import film, group_norm
from common.checkpoint import register_model


class ResBlock3D(nn.Module):
    """x → Conv-GN-SiLU → Conv-GN → FiLM (1 + γ, β) → + skip → SiLU."""

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int = 0, groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.conv1 = nn.Conv3d(in_ch, out_ch, 3, padding=1)
        self.norm1 = group_norm(out_ch, groups)
        self.conv2 = nn.Conv3d(out_ch, out_ch, 3, padding=1)
        self.norm2 = group_norm(out_ch, groups)
        self.film = nn.Linear(emb_dim, 2 * out_ch) if emb_dim else None
        if self.film is not None:  # start as identity modulation
            nn.init.zeros_(self.film.weight)
            nn.init.zeros_(self.film.bias)
        self.dropout = nn.Dropout3d(dropout) if dropout > 0 else nn.Identity()
        self.skip = nn.Conv3d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        h = F.silu(self.norm1(self.conv1(x)))
        h = self.norm2(self.conv2(self.dropout(h)))
        if self.film is not None and emb is not None:
            gamma, beta = self.film(emb).chunk(2, dim=1)
            h = film(h, gamma, beta)
        return F.silu(h + self.skip(x))


@register_model
class UNet3D(nn.Module):
    """3D U-Net. Input spatial sizes must be divisible by 2**(len(channels) − 1).

    Args:
        in_channels, out_channels: image channels in and out.
        channels: width per level; len(channels) − 1 poolings.
        cond_dim: length of the FiLM conditioning vector (0: no FiLM).
        time_embedding: add a sinusoidal timestep embedding to the FiLM input (diffusion).
        blocks_per_level: residual blocks per level in encoder and decoder.
        residual_input_channel: if given, the output is that input channel plus the network's correction
            (a prediction of the residual over a baseline fed as input, e.g. the mean-dose atlas; the head
            starts at zero, so the untrained model reproduces the baseline exactly).
    """

    def __init__(self, in_channels: int, out_channels: int = 1, channels: Sequence[int] = (48, 96, 192, 384, 384),
                 cond_dim: int = 0, groups: int = 8, blocks_per_level: int = 1, dropout: float = 0.0,
                 time_embedding: bool = False, emb_dim: int = 128, residual_input_channel: int | None = None):
        super().__init__()
        channels = [int(c) for c in channels]
        if residual_input_channel is not None and not (0 <= int(residual_input_channel) < in_channels
                                                       and out_channels == 1):
            raise ValueError(f"residual_input_channel {residual_input_channel} must index one of the {in_channels} "
                             "input channels, with out_channels 1")
        self.residual_input_channel = None if residual_input_channel is None else int(residual_input_channel)
        self.n_pool = len(channels) - 1
        self.time_embedding = bool(time_embedding)
        self.emb_dim = emb_dim if (cond_dim or time_embedding) else 0
        if self.emb_dim:
            self.cond_mlp = nn.Sequential(nn.Linear(max(cond_dim, 1), emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            self.time_mlp = nn.Sequential(nn.Linear(emb_dim, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim)) \
                if time_embedding else None
        self.cond_dim = int(cond_dim)
        self.stem = nn.Conv3d(in_channels, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        width = channels[0]
        for c in channels:
            blocks = nn.ModuleList([ResBlock3D(width if b == 0 else c, c, self.emb_dim, groups, dropout)
                                    for b in range(blocks_per_level)])
            self.down.append(blocks)
            width = c
        self.up = nn.ModuleList()
        for level in range(self.n_pool - 1, -1, -1):
            c = channels[level]
            blocks = nn.ModuleList([ResBlock3D((width + c) if b == 0 else c, c, self.emb_dim, groups, dropout)
                                    for b in range(blocks_per_level)])
            self.up.append(blocks)
            width = c
        self.head = nn.Conv3d(width, out_channels, 1)
        if self.residual_input_channel is not None:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def embed(self, cond: torch.Tensor | None, t: torch.Tensor | None, batch: int, device) -> torch.Tensor | None:
        if not self.emb_dim:
            return None
        if cond is None or self.cond_dim == 0:
            cond = torch.zeros(batch, max(self.cond_dim, 1), device=device)
        emb = self.cond_mlp(cond.float())
        if self.time_mlp is not None:
            if t is None:
                raise ValueError("this U-Net was built with a timestep embedding: pass t")
            emb = emb + self.time_mlp(timestep_embedding(t, self.emb_dim))
        return emb

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, t: torch.Tensor | None = None) -> torch.Tensor:
        factor = 2**self.n_pool
        if any(s % factor for s in x.shape[2:]):
            raise ValueError(f"input size {tuple(x.shape[2:])} must be divisible by {factor} "
                             f"({self.n_pool} poolings); pad the volume or use sliding-window inference")
        emb = self.embed(cond, t, x.shape[0], x.device)
        h = self.stem(x)
        skips = []
        for level, blocks in enumerate(self.down):
            if level > 0:
                h = F.max_pool3d(h, 2)
            for block in blocks:
                h = block(h, emb)
            skips.append(h)
        skips.pop()  # the bottleneck output is h itself
        for blocks in self.up:
            skip = skips.pop()
            h = F.interpolate(h, size=skip.shape[2:], mode="trilinear", align_corners=False)
            h = torch.cat([h, skip], dim=1)
            for block in blocks:
                h = block(h, emb)
        out = self.head(h)
        if self.residual_input_channel is not None:
            c = self.residual_input_channel
            out = out + x[:, c:c + 1]
        return out


@register_model
class CascadeUNet3D(nn.Module):
    """Two U-Nets (C3D-like): stage 1 predicts a coarse dose, stage 2 refines it from (inputs, stage 1)."""

    def __init__(self, in_channels: int, out_channels: int = 1, channels: Sequence[int] = (32, 64, 128, 256),
                 refine_channels: Sequence[int] | None = None, cond_dim: int = 0, groups: int = 8,
                 blocks_per_level: int = 1, dropout: float = 0.0):
        super().__init__()
        refine = list(refine_channels) if refine_channels is not None else list(channels)
        if len(refine) != len(channels):
            raise ValueError("refine_channels must have as many levels as channels (same input divisibility)")
        self.stage1 = UNet3D(in_channels, out_channels, channels, cond_dim, groups, blocks_per_level, dropout)
        self.stage2 = UNet3D(in_channels + out_channels, out_channels, refine, cond_dim, groups, blocks_per_level, dropout)
        self.n_pool = self.stage1.n_pool

    def forward(self, x: torch.Tensor, cond: torch.Tensor | None = None, return_stages: bool = False):
        first = self.stage1(x, cond)
        second = self.stage2(torch.cat([x, first], dim=1), cond)
        return [first, second] if return_stages else second


@register_model
class DiffusionDoseModel(nn.Module):
    """Conditional diffusion over dose / Rx, scaled from [0, dose_scale_max] to [−1, 1].

    ``forward(image, cond, target, mask)`` returns the training loss (so DDP sees a forward call);
    :meth:`sample` draws doses with DDIM (η = 0: deterministic given the seed).
    """

    is_diffusion = True

    def __init__(self, in_channels: int, cond_dim: int = 0, channels: Sequence[int] = (32, 64, 128, 256),
                 groups: int = 8, blocks_per_level: int = 1, num_steps: int = 1000, schedule: str = "cosine",
                 prediction: str = "v", dose_scale_max: float = 1.2, sampling_steps: int = 10):
        super().__init__()
        self.net = UNet3D(in_channels + 1, 1, channels, cond_dim, groups, blocks_per_level, time_embedding=True)
        self.diffusion = GaussianDiffusion(num_steps, schedule, prediction)
        self.dose_scale_max = float(dose_scale_max)
        self.sampling_steps = int(sampling_steps)
        self.n_pool = self.net.n_pool

    def denoise(self, x_t, t, image, cond):
        return self.net(torch.cat([x_t, image], dim=1), cond, t)

    def forward(self, image: torch.Tensor, cond: torch.Tensor | None, target: torch.Tensor,
                mask: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        x0 = scale_to_unit(target.clamp(0, self.dose_scale_max), 0.0, self.dose_scale_max)
        return self.diffusion.training_loss(lambda x_t, t: self.denoise(x_t, t, image, cond), x0, mask, generator)

    @torch.no_grad()
    def sample(self, image: torch.Tensor, cond: torch.Tensor | None = None, n_samples: int = 1,
               steps: int | None = None, generator: torch.Generator | None = None, eta: float = 0.0) -> torch.Tensor:
        """(n_samples, B, 1, *spatial) doses / Rx in [0, dose_scale_max]."""
        out = []
        for _ in range(int(n_samples)):
            x = self.diffusion.ddim_sample(lambda x_t, t: self.denoise(x_t, t, image, cond),
                                           (image.shape[0], 1, *image.shape[2:]), steps or self.sampling_steps,
                                           eta=eta, device=image.device, generator=generator)
            out.append(unscale_from_unit(x, 0.0, self.dose_scale_max).clamp(0, self.dose_scale_max))
        return torch.stack(out)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
