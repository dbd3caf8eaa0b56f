"""ABR networks: the multi-task analysis model (seed 003's heads, fixed) and the conditional diffusion
generator. Both are built through common.checkpoint.build_model with plain keyword arguments.

Multi-task model (:class:`ABRMultiTaskNet`), one ear (intensity series) at a time:
  recording → shared encoder (multi-scale convolutions + transformer, FiLM on age/intensity/rate/RMS)
    → RobustPeakHead      waves I/III/V: existence logit; latency by attention over time restricted to
                          the wave's configured latency range (soft-argmax: no tanh squashing, ranges
                          from config that cover the data); amplitude; log-variances (uncertainty)
    → denoising head      the noise-free trace
  levels of one ear → series transformer
    → RobustThresholdHead global path (pooled series features) + local path (per-level detections →
                          expected lowest responding level); gated mix, log-variance, outlier logit
    → RobustClassificationHead residual MLP + one extractor per class; temperature for calibration
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from common.diffusion import timestep_embedding
from common.layers import film, group_norm
from common.checkpoint import register_model


def sinusoidal_positions(length: int, dim: int) -> torch.Tensor:
    """(length, dim) fixed positional encoding (Vaswani et al. 2017)."""
    return timestep_embedding(torch.arange(length), dim)


def mlp(in_dim: int, hidden: int, out_dim: int, dropout: float = 0.0) -> nn.Sequential:
    return nn.Sequential(nn.Linear(in_dim, hidden), nn.GELU(), nn.Dropout(dropout), nn.Linear(hidden, out_dim))


class FiLM(nn.Module):
    """Feature-wise linear modulation x·(1 + γ(c)) + β(c) (Perez et al. 2018); starts as the identity."""

    def __init__(self, cond_dim: int, channels: int):
        super().__init__()
        self.proj = nn.Linear(cond_dim, 2 * channels)
        nn.init.zeros_(self.proj.weight)
        nn.init.zeros_(self.proj.bias)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        gamma, beta = self.proj(cond).chunk(2, dim=-1)
        return film(x, gamma, beta)


class MultiScaleConv(nn.Module):
    """Parallel 1-D convolutions of several kernel sizes, concatenated and fused by a 1×1 convolution."""

    def __init__(self, in_ch: int, out_ch: int, kernels):
        super().__init__()
        branch = max(out_ch // len(kernels), 4)
        self.branches = nn.ModuleList(nn.Conv1d(in_ch, branch, k, padding=k // 2) for k in kernels)
        self.fuse = nn.Conv1d(branch * len(kernels), out_ch, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fuse(torch.cat([b(x) for b in self.branches], dim=1))


class ResidualFiLMBlock(nn.Module):
    def __init__(self, channels: int, cond_dim: int, kernels, dropout: float):
        super().__init__()
        self.conv1 = MultiScaleConv(channels, channels, kernels)
        self.norm1 = group_norm(channels, 4)
        self.film = FiLM(cond_dim, channels)
        self.conv2 = nn.Conv1d(channels, channels, 3, padding=1)
        self.norm2 = group_norm(channels, 4)
        self.dropout = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = F.gelu(self.film(self.norm1(self.conv1(x)), cond))
        h = self.norm2(self.conv2(self.dropout(h)))
        return F.gelu(x + h)


N_CONTEXT = 2  # correlation with the next-higher and the next-lower level


def neighbour_correlations(signal: torch.Tensor, level_mask: torch.Tensor, window: torch.Tensor,
                           max_lag: int) -> torch.Tensor:
    """(B, L, 2): max over lags |k| ≤ max_lag of the Pearson correlation, inside ``window`` (T bool), of
    each recording with the next-higher and the next-lower level of its ear (0 where there is none).

    The repeatability of a response across neighbouring levels is the cue clinicians (and the classical
    baseline) use; giving it to the network as an input costs no parameters. Levels are sorted ascending.
    """
    x = signal * window
    best_up = torch.full(signal.shape[:2], -1.0, device=signal.device, dtype=signal.dtype)
    for lag in range(-max_lag, max_lag + 1):
        shifted = torch.roll(signal, shifts=lag, dims=-1) * window
        a = x[:, :-1] - x[:, :-1].sum(-1, keepdim=True) / window.sum()
        b = shifted[:, 1:] - shifted[:, 1:].sum(-1, keepdim=True) / window.sum()
        r = (a * b * window).sum(-1) / ((a * a * window).sum(-1) * (b * b * window).sum(-1)).clamp_min(1e-12).sqrt()
        best_up[:, :-1] = torch.maximum(best_up[:, :-1], r)
    pair = level_mask[:, :-1] & level_mask[:, 1:]
    up = torch.zeros_like(best_up)
    up[:, :-1] = torch.where(pair, best_up[:, :-1], torch.zeros_like(best_up[:, :-1]))
    down = torch.zeros_like(best_up)
    down[:, 1:] = up[:, :-1]
    return torch.stack([up, down], dim=-1)


class ABREncoder(nn.Module):
    """Waveform (N, T) + static features (N, S) → full-resolution features (N, C, T), low-resolution
    transformer tokens (N, D, T/2) and the conditioning vector (N, D)."""

    def __init__(self, n_samples: int, static_dim: int, channels: int, width: int, layers: int, heads: int,
                 dropout: float):
        super().__init__()
        self.cond = mlp(static_dim, width, width)
        self.stem = nn.Conv1d(1, channels, 7, padding=3)
        self.blocks = nn.ModuleList(ResidualFiLMBlock(channels, width, (3, 5, 9, 15), dropout) for _ in range(2))
        self.down = nn.Conv1d(channels, width, 4, stride=2, padding=1)
        self.film_low = FiLM(width, width)
        n_low = (n_samples + 2 - 4) // 2 + 1
        self.register_buffer("positions", sinusoidal_positions(n_low, width), persistent=False)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.transformer = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.fuse = nn.Conv1d(channels + width, channels, 1)

    def forward(self, signal: torch.Tensor, static: torch.Tensor):
        cond = self.cond(static)
        h = self.stem(signal[:, None, :])
        for block in self.blocks:
            h = block(h, cond)
        low = self.film_low(self.down(h), cond)
        tokens = self.transformer(low.transpose(1, 2) + self.positions[None, :low.shape[-1]])
        low = tokens.transpose(1, 2)
        up = F.interpolate(low, size=signal.shape[-1], mode="linear", align_corners=False)
        return F.gelu(self.fuse(torch.cat([h, up], dim=1))), low, cond


class RobustPeakHead(nn.Module):
    """Waves I/III/V: existence, latency (ms) and relative amplitude, each with a log-variance.

    Latency = Σ_t a_t·t over an attention distribution a (softmax over time) that is zero outside the
    wave's latency range, so predictions always lie inside the configured range and sub-sample values
    are possible. Amplitude is bounded to ``amplitude_range`` (relative to the recording's RMS).
    """

    def __init__(self, channels: int, width: int, scales, time_ms, latency_ranges_ms, amplitude_range,
                 dropout: float):
        super().__init__()
        self.n_waves = len(latency_ranges_ms)
        self.multi = MultiScaleConv(channels, channels, scales)
        self.attention = nn.Conv1d(channels, self.n_waves, 1)
        time = torch.tensor(time_ms, dtype=torch.float32)
        self.register_buffer("time_ms", time, persistent=False)
        allowed = torch.stack([(time >= lo) & (time <= hi) for lo, hi in latency_ranges_ms])
        if not bool(allowed.any(dim=1).all()):
            raise ValueError(f"a latency range {latency_ranges_ms} lies outside the window "
                             f"({float(time[0]):.2f}-{float(time[-1]):.2f} ms)")
        self.register_buffer("allowed", allowed, persistent=False)
        self.amplitude_range = tuple(float(v) for v in amplitude_range)
        feat = 3 * channels + 1 + N_CONTEXT
        self.exist = nn.ModuleList(mlp(feat, width, 1, dropout) for _ in range(self.n_waves))
        self.latency_logvar = nn.ModuleList(mlp(feat, width, 1, dropout) for _ in range(self.n_waves))
        self.amplitude = nn.ModuleList(mlp(feat, width, 2, dropout) for _ in range(self.n_waves))

    def forward(self, features: torch.Tensor, signal: torch.Tensor, context: torch.Tensor) -> dict:
        """``context`` (N, N_CONTEXT): the recording's correlation with its neighbouring levels."""
        f = F.gelu(self.multi(features))
        logits = self.attention(f).masked_fill(~self.allowed[None], float("-inf"))
        weights = torch.softmax(logits.float(), dim=-1).to(f.dtype)
        latency = (weights * self.time_ms).sum(-1)
        pooled = torch.einsum("nwt,nct->nwc", weights, f)
        glob = torch.cat([f.mean(-1), f.amax(-1)], dim=-1)[:, None].expand(-1, self.n_waves, -1)
        at_peak = (weights * signal[:, None, :]).sum(-1, keepdim=True)
        z = torch.cat([pooled, glob, at_peak, context[:, None].expand(-1, self.n_waves, -1)], dim=-1)
        lo, hi = self.amplitude_range
        exist = torch.cat([self.exist[w](z[:, w]) for w in range(self.n_waves)], dim=-1)
        lat_logvar = torch.cat([self.latency_logvar[w](z[:, w]) for w in range(self.n_waves)], dim=-1)
        amp = torch.stack([self.amplitude[w](z[:, w]) for w in range(self.n_waves)], dim=1)
        return {"exist_logit": exist, "latency_ms": latency, "latency_logvar": lat_logvar,
                "amp_rel": lo + (hi - lo) * torch.sigmoid(amp[..., 0]), "amp_logvar": amp[..., 1],
                "attention": weights}


class RobustThresholdHead(nn.Module):
    """Series-level threshold (dB nHL) with two genuinely different paths.

    - global: an MLP on the pooled series features (all levels, all time steps) → bounded threshold;
    - local: per-level wave V detections p_i (from per-time-step features) → the expected end of the
      unbroken run of responses going down from the top level (the clinical reading rule, robust to a
      false detection below threshold): E = Σ_i Π_{j≥i} p_j (1 − p_{i−1})·(I_i − f·Δ_i) + P(top level
      silent)·censor, with Δ_i the gap to the next lower level and f a learned fraction (the true
      threshold lies inside that gap);
    - a learned gate mixes them; a log-variance gives the uncertainty; an outlier logit flags ears
      whose prediction is likely > 10 dB off (trained on the detached error).
    """

    def __init__(self, width: int, threshold_range_db, censor_db: float, step_db: float, dropout: float):
        super().__init__()
        self.lo, self.hi = (float(v) for v in threshold_range_db)
        self.censor_db, self.step_db = float(censor_db), float(step_db)
        self.global_path = mlp(width, width, 2, dropout)
        self.gate = nn.Linear(width, 1)
        self.gap_fraction = nn.Parameter(torch.zeros(()))  # sigmoid(0) = 0.5: mid-gap
        self.outlier = mlp(width + 1, width, 1, dropout)

    def forward(self, pooled: torch.Tensor, intensity_db: torch.Tensor, level_mask: torch.Tensor,
                presence_logit: torch.Tensor) -> dict:
        out = self.global_path(pooled)
        global_db = self.lo + (self.hi - self.lo) * torch.sigmoid(out[:, 0])
        # Levels are sorted ascending with padding last (see ABRSeriesDataset). P(the unbroken run of
        # responses from the top level ends at level i) = Π_{j≥i} p_j · (1 − p_{i−1}); padding counts as
        # "responding" in the product and can never be the end.
        mask = level_mask.float()
        q = torch.where(level_mask, torch.sigmoid(presence_logit.float()), torch.ones_like(mask))
        suffix = torch.flip(torch.cumprod(torch.flip(q, [1]), dim=1), [1])
        below_absent = torch.cat([torch.ones_like(q[:, :1]), 1 - q[:, :-1]], dim=1)
        ends = suffix * below_absent * mask
        none = (1 - ends.sum(1)).clamp_min(0)  # the top level does not respond
        previous = torch.cat([intensity_db[:, :1] - self.step_db, intensity_db[:, :-1]], dim=1)
        estimate = intensity_db - torch.sigmoid(self.gap_fraction) * (intensity_db - previous)
        local_db = ((ends * estimate).sum(1) + none * self.censor_db).clamp(self.lo, self.hi)
        gate = torch.sigmoid(self.gate(pooled)[:, 0])
        final = gate * global_db + (1 - gate) * local_db
        outlier = self.outlier(torch.cat([pooled, ((global_db - local_db).abs() / 10.0)[:, None]], dim=-1))
        return {"threshold_db": final, "threshold_logvar": out[:, 1], "threshold_global_db": global_db,
                "threshold_local_db": local_db, "threshold_gate": gate, "outlier_logit": outlier[:, 0]}


class RobustClassificationHead(nn.Module):
    """Residual MLP trunk, one small extractor per class (each produces its class's logit), and a
    temperature (buffer, fitted on validation after training: calibrated logits = logits / T)."""

    def __init__(self, in_dim: int, width: int, n_classes: int, dropout: float):
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        self.blocks = nn.ModuleList(nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(),
                                                  nn.Dropout(dropout), nn.Linear(width, width)) for _ in range(2))
        self.extractors = nn.ModuleList(mlp(width, max(width // 2, 8), 1, dropout) for _ in range(n_classes))
        self.register_buffer("temperature", torch.ones(()))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        h = self.inp(z)
        for block in self.blocks:
            h = h + block(h)
        return torch.cat([extract(h) for extract in self.extractors], dim=-1)


@register_model
class ABRMultiTaskNet(nn.Module):
    """See the module docstring. Inputs are one batch of ears:

    signal (B, L, T) normalized recordings · static (B, L, S) · intensity_db (B, L) · level_mask (B, L)
    Returns per-recording outputs with shape (B, L, ...) and series outputs with shape (B, ...).
    """

    def __init__(self, n_samples: int, time_ms: list, static_dim: int = 4, channels: int = 32, width: int = 64,
                 transformer_layers: int = 2, heads: int = 4, series_layers: int = 1, dropout: float = 0.1,
                 scales: list = (1, 3, 5, 7), latency_range_ms: list = ((0.5, 6.0), (2.0, 9.5), (3.5, 14.0)),
                 amplitude_range_rel: list = (-1.0, 6.0), threshold_range_db: list = (0.0, 120.0),
                 censor_db: float = 110.0, step_db: float = 10.0, n_classes: int = 5, wave_v_index: int = 2,
                 corr_window_ms: list = (1.0, 12.0), corr_max_lag_ms: float = 0.5):
        super().__init__()
        self.wave_v_index = int(wave_v_index)
        time = torch.tensor(time_ms, dtype=torch.float32)
        self.register_buffer("corr_window", ((time >= corr_window_ms[0]) & (time <= corr_window_ms[1])).float(),
                             persistent=False)
        self.corr_max_lag = int(round(corr_max_lag_ms / float(time[1] - time[0])))
        self.encoder = ABREncoder(n_samples, static_dim, channels, width, transformer_layers, heads, dropout)
        self.peaks = RobustPeakHead(channels, width, scales, time_ms, latency_range_ms, amplitude_range_rel, dropout)
        n_waves = len(latency_range_ms)
        self.denoise = nn.Sequential(nn.Conv1d(channels, channels, 5, padding=2), nn.GELU(), nn.Conv1d(channels, 1, 1))
        self.embed = nn.Linear(2 * channels + 2 * width + 2 * n_waves + N_CONTEXT, width)
        self.level_embed = mlp(1, width, width)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.series = nn.TransformerEncoder(layer, series_layers, enable_nested_tensor=False)
        self.class_query = nn.Linear(width, 1)
        self.threshold = RobustThresholdHead(width, threshold_range_db, censor_db, step_db, dropout)
        self.classifier = RobustClassificationHead(2 * width, width, n_classes, dropout)
        lat_centre = torch.tensor([(lo + hi) / 2 for lo, hi in latency_range_ms], dtype=torch.float32)
        self.register_buffer("latency_centre", lat_centre, persistent=False)

    def forward(self, signal: torch.Tensor, static: torch.Tensor, intensity_db: torch.Tensor,
                level_mask: torch.Tensor) -> dict:
        batch, levels, n_t = signal.shape
        flat_mask = level_mask.reshape(-1)
        x = signal.reshape(-1, n_t)[flat_mask]
        s = static.reshape(batch * levels, -1)[flat_mask]
        context = neighbour_correlations(signal.float(), level_mask, self.corr_window, self.corr_max_lag)
        context = context.reshape(batch * levels, -1)[flat_mask].to(signal.dtype)
        features, low, cond = self.encoder(x, s)
        peaks = self.peaks(features, x, context)
        denoised = self.denoise(features)[:, 0]
        emb = self.embed(torch.cat([features.mean(-1), features.amax(-1), low.mean(-1), cond, context,
                                    torch.sigmoid(peaks["exist_logit"]),
                                    (peaks["latency_ms"] - self.latency_centre) / 2.0], dim=-1))

        def scatter(values: torch.Tensor) -> torch.Tensor:
            out = values.new_zeros((batch * levels,) + values.shape[1:])
            out[flat_mask] = values
            return out.reshape((batch, levels) + values.shape[1:])

        out = {k: scatter(v) for k, v in peaks.items() if k != "attention"}
        out["denoised"] = scatter(denoised)
        tokens = scatter(emb) + self.level_embed(intensity_db[..., None] / 100.0)
        tokens = self.series(tokens, src_key_padding_mask=~level_mask)
        m = level_mask[..., None].to(tokens.dtype)
        pooled = (tokens * m).sum(1) / m.sum(1).clamp_min(1.0)
        attn = self.class_query(tokens).masked_fill(~level_mask[..., None], float("-inf")).softmax(dim=1)
        class_pooled = (attn * tokens).sum(1)
        out.update(self.threshold(pooled, intensity_db, level_mask, out["exist_logit"][..., self.wave_v_index]))
        out["class_logits"] = self.classifier(torch.cat([pooled, class_pooled], dim=-1))
        return out


# ---------------------------------------------------------------------------------------- diffusion
class DiffusionResBlock(nn.Module):
    def __init__(self, in_ch: int, out_ch: int, cond_dim: int, dropout: float):
        super().__init__()
        self.norm1 = group_norm(in_ch)
        self.conv1 = nn.Conv1d(in_ch, out_ch, 3, padding=1)
        self.film = FiLM(cond_dim, out_ch)
        self.norm2 = group_norm(out_ch)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv1d(out_ch, out_ch, 3, padding=1)
        self.skip = nn.Conv1d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, cond: torch.Tensor) -> torch.Tensor:
        h = self.film(self.conv1(F.silu(self.norm1(x))), cond)
        h = self.conv2(self.dropout(F.silu(self.norm2(h))))
        return self.skip(x) + h


@register_model
class ABRDiffusionUNet(nn.Module):
    """1-D U-Net denoiser for conditional ABR generation (v-prediction is set by the diffusion process).

    Conditioning = timestep embedding + (static features [age, intensity, rate] + hearing-loss class)
    through FiLM in every block. A class index of −1 marks an unconditional sample (classifier-free
    guidance): its static/class conditioning is replaced by a learned null vector.
    """

    def __init__(self, n_samples: int, channels: list = (32, 64, 64), cond_dim: int = 128, static_dim: int = 3,
                 n_classes: int = 5, dropout: float = 0.0):
        super().__init__()
        self.n_samples = int(n_samples)
        self.factor = 2 ** (len(channels) - 1)
        self.cond_dim = int(cond_dim)
        self.time_mlp = nn.Sequential(nn.Linear(cond_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.static_mlp = nn.Sequential(nn.Linear(static_dim, cond_dim), nn.SiLU(), nn.Linear(cond_dim, cond_dim))
        self.class_embed = nn.Embedding(n_classes, cond_dim)
        self.null_cond = nn.Parameter(torch.zeros(cond_dim))
        self.stem = nn.Conv1d(1, channels[0], 3, padding=1)
        self.down = nn.ModuleList()
        self.downsample = nn.ModuleList()
        prev = channels[0]
        for i, ch in enumerate(channels):
            self.down.append(DiffusionResBlock(prev, ch, cond_dim, dropout))
            self.downsample.append(nn.Conv1d(ch, ch, 4, stride=2, padding=1) if i < len(channels) - 1 else nn.Identity())
            prev = ch
        self.mid = nn.ModuleList([DiffusionResBlock(prev, prev, cond_dim, dropout) for _ in range(2)])
        self.up = nn.ModuleList()
        self.upsample = nn.ModuleList()
        for i, ch in reversed(list(enumerate(channels))):
            self.up.append(DiffusionResBlock(prev + ch, ch, cond_dim, dropout))
            self.upsample.append(nn.ConvTranspose1d(ch, ch, 4, stride=2, padding=1) if i > 0 else nn.Identity())
            prev = ch
        self.out_norm = group_norm(prev)
        self.out = nn.Conv1d(prev, 1, 3, padding=1)
        nn.init.zeros_(self.out.weight)
        nn.init.zeros_(self.out.bias)

    def condition(self, t: torch.Tensor, static: torch.Tensor, class_idx: torch.Tensor) -> torch.Tensor:
        uncond = class_idx < 0
        cond = self.static_mlp(static) + self.class_embed(class_idx.clamp_min(0))
        cond = torch.where(uncond[:, None], self.null_cond[None].expand_as(cond), cond)
        return self.time_mlp(timestep_embedding(t, self.cond_dim)) + cond

    def forward(self, x: torch.Tensor, t: torch.Tensor, static: torch.Tensor, class_idx: torch.Tensor) -> torch.Tensor:
        n = x.shape[-1]
        padded = math.ceil(n / self.factor) * self.factor
        h = F.pad(x, (0, padded - n), mode="replicate") if padded != n else x
        cond = self.condition(t, static, class_idx)
        h = self.stem(h)
        skips = []
        for block, down in zip(self.down, self.downsample):
            h = block(h, cond)
            skips.append(h)
            h = down(h)
        for block in self.mid:
            h = block(h, cond)
        for block, up in zip(self.up, self.upsample):
            h = block(torch.cat([h, skips.pop()], dim=1), cond)
            h = up(h)
        return self.out(F.silu(self.out_norm(h)))[..., :n]
