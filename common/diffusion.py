"""Gaussian diffusion for conditional generation: cosine schedule, ε/v/x0 parameterizations, DDIM sampling.

Shared by the dose model (vmat) and the ABR generator (abr). Data must be scaled to about [-1, 1]
before diffusion (DoseDiff, IEEE TMI 2024: the original dose DDPM failed partly because it was not).

References:
- Ho, Jain & Abbeel (2020) DDPM: q(x_t | x_0) = N(√ᾱ_t x_0, (1 − ᾱ_t) I).
- Nichol & Dhariwal (2021) cosine schedule: ᾱ(t) = f(t)/f(0), f(t) = cos²(((t/T) + s)/(1 + s) · π/2).
- Salimans & Ho (2022) v-prediction: v = √ᾱ ε − √(1 − ᾱ) x_0.
- Song, Meng & Ermon (2021) DDIM: deterministic (η = 0) sampling with few steps.
- Ho & Salimans (2022) classifier-free guidance: ε̂ = ε_u + w (ε_c − ε_u).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import torch
import torch.nn as nn

PREDICTION_TYPES = ("eps", "v", "x0")


def cosine_alpha_bar(num_steps: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """ᾱ_t for t = 0..T−1 of the cosine schedule, with β_t clipped at ``max_beta`` (float64)."""
    steps = np.arange(num_steps + 1, dtype=np.float64)
    f = np.cos(((steps / num_steps) + s) / (1 + s) * math.pi / 2) ** 2
    alpha_bar = f / f[0]
    betas = np.clip(1 - alpha_bar[1:] / alpha_bar[:-1], 0, max_beta)
    return np.cumprod(1 - betas)


def linear_alpha_bar(num_steps: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """ᾱ_t of the DDPM linear β schedule (Ho et al. 2020)."""
    betas = np.linspace(beta_start, beta_end, num_steps, dtype=np.float64)
    return np.cumprod(1 - betas)


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of (possibly fractional) timesteps, shape (B, dim) (Vaswani et al. 2017)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=t.device, dtype=torch.float32) / half)
    args = t.float()[:, None] * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


def _extract(values: torch.Tensor, t: torch.Tensor, ndim: int) -> torch.Tensor:
    """values[t] reshaped to broadcast over a batch of ``ndim``-dimensional samples."""
    return values.to(t.device)[t].reshape(-1, *([1] * (ndim - 1)))


class GaussianDiffusion(nn.Module):
    """Noise schedule and the conversions between x_0, ε and v. Holds no learnable parameters.

    Args:
        num_steps: T, training timesteps.
        schedule: "cosine" or "linear".
        prediction: what the network outputs: "eps", "v" or "x0".
    """

    def __init__(self, num_steps: int = 1000, schedule: str = "cosine", prediction: str = "v"):
        super().__init__()
        if prediction not in PREDICTION_TYPES:
            raise ValueError(f"prediction must be one of {PREDICTION_TYPES}, got {prediction!r}")
        if schedule == "cosine":
            alpha_bar = cosine_alpha_bar(num_steps)
        elif schedule == "linear":
            alpha_bar = linear_alpha_bar(num_steps)
        else:
            raise ValueError(f"schedule must be 'cosine' or 'linear', got {schedule!r}")
        self.num_steps = int(num_steps)
        self.schedule = schedule
        self.prediction = prediction
        self.register_buffer("alpha_bar", torch.tensor(alpha_bar, dtype=torch.float32), persistent=False)

    # --------------------------------------------------------------------------------------- forward
    def sample_timesteps(self, batch_size: int, device, generator: torch.Generator | None = None) -> torch.Tensor:
        return torch.randint(0, self.num_steps, (batch_size,), device="cpu", generator=generator).to(device)

    def q_sample(self, x0: torch.Tensor, t: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
        """x_t = √ᾱ_t x_0 + √(1 − ᾱ_t) ε."""
        ab = _extract(self.alpha_bar, t, x0.ndim)
        return ab.sqrt() * x0 + (1 - ab).sqrt() * noise

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if self.prediction == "eps":
            return noise
        if self.prediction == "x0":
            return x0
        ab = _extract(self.alpha_bar, t, x0.ndim)
        return ab.sqrt() * noise - (1 - ab).sqrt() * x0

    def split_prediction(self, model_out: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor):
        """(x̂_0, ε̂) from the network output at timestep t."""
        ab = _extract(self.alpha_bar, t, x_t.ndim)
        sqrt_ab, sqrt_1m = ab.sqrt(), (1 - ab).sqrt()
        if self.prediction == "eps":
            eps = model_out
            x0 = (x_t - sqrt_1m * eps) / sqrt_ab
        elif self.prediction == "x0":
            x0 = model_out
            eps = (x_t - sqrt_ab * x0) / sqrt_1m.clamp_min(1e-8)
        else:  # v: x0 = √ᾱ x_t − √(1−ᾱ) v ; ε = √(1−ᾱ) x_t + √ᾱ v
            x0 = sqrt_ab * x_t - sqrt_1m * model_out
            eps = sqrt_1m * x_t + sqrt_ab * model_out
        return x0, eps

    def training_loss(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], x0: torch.Tensor,
                      mask: torch.Tensor | None = None, generator: torch.Generator | None = None) -> torch.Tensor:
        """MSE between the network output and its target at a random timestep per sample.

        ``model_fn(x_t, t)`` closes over the conditioning; ``mask`` restricts the loss (e.g. to the body).
        """
        t = self.sample_timesteps(x0.shape[0], x0.device, generator)
        noise = torch.randn(x0.shape, generator=generator, device="cpu").to(x0.device) if generator is not None \
            else torch.randn_like(x0)
        out = model_fn(self.q_sample(x0, t, noise), t)
        err = (out.float() - self.training_target(x0, noise, t).float()) ** 2
        if mask is None:
            return err.mean()
        weights = mask.to(err.dtype).expand_as(err)
        return (err * weights).sum() / weights.sum().clamp_min(1.0)

    # -------------------------------------------------------------------------------------- sampling
    def ddim_timesteps(self, num_sampling_steps: int) -> list[int]:
        """Evenly spaced timesteps from T−1 down to 0 (Song et al. 2021, "uniform" skipping)."""
        n = max(1, min(int(num_sampling_steps), self.num_steps))
        return sorted({int(round(x)) for x in np.linspace(self.num_steps - 1, 0, n)}, reverse=True)

    @torch.no_grad()
    def ddim_sample(self, model_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor], shape: tuple,
                    num_sampling_steps: int = 20, eta: float = 0.0, clip_x0: tuple[float, float] | None = (-1.0, 1.0),
                    device=None, generator: torch.Generator | None = None, x_T: torch.Tensor | None = None,
                    progress: Callable | None = None) -> torch.Tensor:
        """Draw samples with DDIM. ``eta=0`` is deterministic given x_T; ``clip_x0`` clamps x̂_0 each step."""
        device = device if device is not None else self.alpha_bar.device

        def noise_like():
            return torch.randn(shape, generator=generator, device="cpu").to(device) if generator is not None \
                else torch.randn(shape, device=device)

        x = x_T.to(device) if x_T is not None else noise_like()
        steps = self.ddim_timesteps(num_sampling_steps)
        iterator = progress(steps) if progress is not None else steps
        alpha_bar = self.alpha_bar.to(device)
        for i, step in enumerate(iterator):
            t = torch.full((shape[0],), step, device=device, dtype=torch.long)
            x0, eps = self.split_prediction(model_fn(x, t).float(), x, t)
            if clip_x0 is not None:
                x0 = x0.clamp(*clip_x0)
                eps = (x - alpha_bar[step].sqrt() * x0) / (1 - alpha_bar[step]).sqrt().clamp_min(1e-8)
            prev = steps[i + 1] if i + 1 < len(steps) else -1
            ab_t = alpha_bar[step]
            ab_prev = alpha_bar[prev] if prev >= 0 else torch.tensor(1.0, device=device)
            sigma = eta * ((1 - ab_prev) / (1 - ab_t)).sqrt() * (1 - ab_t / ab_prev).sqrt()
            direction = (1 - ab_prev - sigma**2).clamp_min(0).sqrt() * eps
            x = ab_prev.sqrt() * x0 + direction
            if eta > 0 and prev >= 0:
                x = x + sigma * noise_like()
        return x


def guided(model_fn: Callable, cond, uncond, guidance_scale: float) -> Callable:
    """Classifier-free guidance: ``model_fn(x, t, c)`` combined as out_u + w·(out_c − out_u).

    ``guidance_scale`` 1 is the plain conditional model; 0 the unconditional one.
    """
    def fn(x, t):
        if guidance_scale == 1.0:
            return model_fn(x, t, cond)
        out_c = model_fn(x, t, cond)
        out_u = model_fn(x, t, uncond)
        return out_u + guidance_scale * (out_c - out_u)
    return fn


def scale_to_unit(x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Map [low, high] linearly to [-1, 1]."""
    return 2 * (x - low) / (high - low) - 1


def unscale_from_unit(y: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """Inverse of :func:`scale_to_unit`."""
    return (y + 1) / 2 * (high - low) + low
