"""Spatial networks for CBF/ATT maps: U-Net (SpatialASLNet), amplitude-aware U-Net with FiLM
(AmplitudeAwareSpatialASLNet) and a two-encoder U-Net for PCASL + VSASL (DualEncoderSpatialASLNet).

Input: (B, C, H, W) ΔM/M0 divided by the reference GM signal S_ref (``global_scale``: amplitude kept, GM ≈ 1),
channels [PCASL(PLD1..N), VSASL(PLD1..N)]. ``normalization_mode="per_curve"`` z-scores each voxel's curve
inside the network (this removes CBF·M0 by construction; amplitude must then come from the FiLM features).
Output: dict of (B, 1, H, W) maps ``cbf`` and ``att`` (z-scored targets; the trainer stores their mean/std
in the checkpoint), ``log_var_cbf``/``log_var_att`` (log-variance heads, in the same z units) and, with
``denoise_head``, ``denoised`` (B, C, H, W) for denoising pre-training (exp 20).

Experiment flags (all plain constructor arguments, saved in the checkpoint):
separate_decoders (exp 10), att_conditioning (exp 11: per-voxel PCASL/VSASL ratio, temporal slope and peak
delay fed to the ATT head), features with 5 levels for 128² patches (exp 15), multi_scale_factors + fusion
(exp 16: the same trunk on the input and on 2×-downsampled copies, fused by per-pixel attention),
dropout (exp 17 MC dropout), denoise_head (exp 20).
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F
from common.layers import film, group_norm
from common.checkpoint import register_model

# Range of the log-variance heads' output (normalized units) before it is exponentiated: keeps exp() finite.
LOG_VAR_RANGE = (-20.0, 20.0)


def head_variance(log_var: torch.Tensor) -> torch.Tensor:
    """Variance in normalized target units from a log-variance head (clamped to LOG_VAR_RANGE); × target std² gives
    physical units. One definition for prediction, calibration and the LS blend."""
    return torch.exp(log_var.clamp(*LOG_VAR_RANGE))


class ConvBlock(nn.Module):
    """(3×3 conv → GroupNorm → SiLU) × 2, optional channel dropout between."""

    def __init__(self, c_in: int, c_out: int, n_groups: int = 8, dropout: float = 0.0):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(c_in, c_out, 3, padding=1), group_norm(c_out, n_groups), nn.SiLU(),
            nn.Dropout2d(dropout) if dropout > 0 else nn.Identity(),
            nn.Conv2d(c_out, c_out, 3, padding=1), group_norm(c_out, n_groups), nn.SiLU(),
        )

    def forward(self, x):
        return self.body(x)


class Encoder(nn.Module):
    def __init__(self, c_in: int, features, n_groups: int, dropout: float):
        super().__init__()
        self.blocks = nn.ModuleList()
        for i, f in enumerate(features):
            self.blocks.append(ConvBlock(c_in if i == 0 else features[i - 1], f, n_groups, dropout))

    def forward(self, x):
        skips = []
        for i, block in enumerate(self.blocks):
            x = block(x if i == 0 else F.max_pool2d(x, 2))
            skips.append(x)
        return skips  # the last one is the bottleneck


class Decoder(nn.Module):
    def __init__(self, features, n_groups: int, dropout: float):
        super().__init__()
        self.ups = nn.ModuleList()
        self.blocks = nn.ModuleList()
        for i in range(len(features) - 1, 0, -1):
            self.ups.append(nn.ConvTranspose2d(features[i], features[i - 1], 2, stride=2))
            self.blocks.append(ConvBlock(2 * features[i - 1], features[i - 1], n_groups, dropout))

    def forward(self, skips, film_params=None):
        """``film_params``: optional list (one per decoder level) of (gamma, beta) of shape (B, C)."""
        x = skips[-1]
        for level, (up, block) in enumerate(zip(self.ups, self.blocks)):
            skip = skips[-2 - level]
            x = block(torch.cat([up(x), skip], dim=1))
            if film_params is not None:
                gamma, beta = film_params[level]
                x = film(x, gamma, beta)
        return x


def per_curve_normalize(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """z-score each voxel's curve over channels (removes the voxel's amplitude)."""
    mean = x.mean(dim=1, keepdim=True)
    std = x.std(dim=1, keepdim=True, unbiased=False)
    return (x - mean) / (std + eps)


def amplitude_features(x: torch.Tensor, n_pcasl: int, n_vsasl: int) -> torch.Tensor:
    """Per-sample features of the raw (global-scaled) input: per-channel spatial mean, std and max (3C),
    global power mean(x²), PCASL/VSASL mean ratio (0 when a mode is absent), argmax PLD of the channel
    means (as a fraction of the PLD count). Shape (B, 3C + 3)."""
    mean = x.mean(dim=(2, 3))
    std = x.std(dim=(2, 3), unbiased=False)
    mx = x.amax(dim=(2, 3))
    power = (x**2).mean(dim=(1, 2, 3))[:, None]
    if n_pcasl and n_vsasl:
        ratio = mean[:, :n_pcasl].mean(1, keepdim=True) / (mean[:, n_pcasl:].mean(1, keepdim=True).abs() + 1e-3)
        ratio = ratio.clamp(-10, 10)
    else:
        ratio = torch.zeros_like(power)
    n_pld = max(n_pcasl, n_vsasl)
    first = mean[:, :n_pld]
    peak = first.argmax(dim=1, keepdim=True).to(x.dtype) / max(n_pld - 1, 1)
    return torch.cat([mean, std, mx, power, ratio, peak], dim=1)


def att_feature_maps(x: torch.Tensor, n_pcasl: int, n_vsasl: int) -> torch.Tensor:
    """Per-voxel ATT cues (exp 11): PCASL/VSASL ratio, temporal slope of the (per-voxel normalized) curve,
    and soft-argmax peak delay. (B, 3, H, W)."""
    n_pld = max(n_pcasl, n_vsasl)
    first = x[:, :n_pld]
    if n_pcasl and n_vsasl:
        ratio = (x[:, :n_pcasl].mean(1) / (x[:, n_pcasl:].mean(1).abs() + 0.05)).clamp(-10, 10)
    else:
        ratio = torch.zeros_like(x[:, 0])
    t = torch.linspace(-1, 1, n_pld, device=x.device, dtype=x.dtype)[None, :, None, None]
    centred = first - first.mean(1, keepdim=True)
    scale = first.abs().mean(1, keepdim=True) + 0.05
    slope = (centred * t).mean(1) / scale[:, 0]
    peak = (torch.softmax(first / (first.std(1, keepdim=True) + 0.05), dim=1) * t).sum(1)
    return torch.stack([ratio, slope, peak], dim=1)


@register_model
class SpatialASLNet(nn.Module):
    """U-Net with 1×1 heads for CBF and ATT (z-scored), optional log-variance heads and experiment flags."""

    def __init__(self, n_pcasl: int, n_vsasl: int, features=(32, 64, 128, 256), n_groups: int = 8,
                 dropout: float = 0.0, normalization_mode: str = "global_scale", use_log_var: bool = True,
                 separate_decoders: bool = False, att_conditioning: bool = False,
                 multi_scale_factors=(1,), fusion: str = "attention", denoise_head: bool = False,
                 use_film_at_bottleneck: bool = False, use_film_at_decoder: bool = False,
                 use_amplitude_output_modulation: bool = False, amplitude_hidden: int = 64,
                 physics_features: bool = False, physics: dict | None = None, att_grid_points: int = 40,
                 cbf_kernel_size: int = 0, cbf_mean: float = 0.0, cbf_std: float = 1.0):
        super().__init__()
        if normalization_mode not in ("global_scale", "per_curve"):
            raise ValueError(f"normalization_mode must be 'global_scale' or 'per_curve', got {normalization_mode!r}")
        if fusion not in ("attention", "mean"):
            raise ValueError(f"fusion must be 'attention' or 'mean', got {fusion!r}")
        self.n_pcasl, self.n_vsasl = int(n_pcasl), int(n_vsasl)
        self.in_channels = self.n_pcasl + self.n_vsasl
        if self.in_channels == 0:
            raise ValueError("the network needs at least one input channel (n_pcasl + n_vsasl > 0)")
        self.features = [int(f) for f in features]
        self.normalization_mode = normalization_mode
        self.use_log_var = bool(use_log_var)
        self.separate_decoders = bool(separate_decoders)
        self.att_conditioning = bool(att_conditioning)
        self.scales = [int(s) for s in multi_scale_factors]
        self.fusion = fusion
        self.film_bottleneck = bool(use_film_at_bottleneck)
        self.film_decoder = bool(use_film_at_decoder)
        self.output_modulation = bool(use_amplitude_output_modulation)
        self.physics_features = bool(physics_features)
        if self.physics_features:
            self._init_physics_features(physics, att_grid_points)
        self.encoder = self._make_encoder(n_groups, dropout)
        self.decoders = nn.ModuleList([Decoder(self.features, n_groups, dropout)
                                       for _ in range(2 if self.separate_decoders else 1)])
        f0 = self.features[0]
        if len(self.scales) > 1 and fusion == "attention":
            self.fusion_score = nn.ModuleList([nn.Conv2d(f0, 1, 1) for _ in range(len(self.decoders))])
        att_in = f0
        if self.att_conditioning:
            self.att_cue = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.SiLU())
            att_in += 16
        # Kernel CBF head: CBF = Σ_k softmax(w)_k · CBF_grid(neighbour k) · (1 + g) + b. GroupNorm features are
        # nearly blind to a global amplitude scale, so a CBF read directly from them regresses to the
        # anatomy-typical value; filtering the physics estimate keeps CBF proportional to the signal.
        self.cbf_kernel_size = int(cbf_kernel_size)
        self.cbf_mean, self.cbf_std = float(cbf_mean), float(cbf_std)
        if self.cbf_kernel_size and not self.physics_features:
            raise ValueError("cbf_kernel_size > 0 needs physics_features: true (it filters the grid CBF estimate)")
        if self.cbf_kernel_size and self.cbf_kernel_size % 2 == 0:
            raise ValueError(f"cbf_kernel_size must be odd, got {self.cbf_kernel_size}")
        n_kernel = self.cbf_kernel_size**2 + 2 if self.cbf_kernel_size else 1
        self.cbf_head = nn.Conv2d(f0, n_kernel + (1 if self.use_log_var else 0), 1)
        if self.cbf_kernel_size:
            # Start near the voxel's own estimate (centre weight ≈ 0.7 for 5×5), gain 1, offset 0: the network
            # begins at LS-grid quality and learns where and how much to smooth.
            nn.init.zeros_(self.cbf_head.weight)
            nn.init.zeros_(self.cbf_head.bias)
            with torch.no_grad():
                self.cbf_head.bias[self.cbf_kernel_size**2 // 2] = math.log(2.3 * (self.cbf_kernel_size**2 - 1))
        self.att_head = nn.Conv2d(att_in, 2 if self.use_log_var else 1, 1)
        self.denoise = nn.Conv2d(f0, self.in_channels, 1) if denoise_head else None
        # Amplitude pathway (AmplitudeAware): features of the raw input → MLP → FiLM / output modulation.
        self.uses_amplitude = self.film_bottleneck or self.film_decoder or self.output_modulation
        if self.uses_amplitude:
            n_feat = 3 * self.in_channels + 3
            self.amp_mlp = nn.Sequential(nn.Linear(n_feat, amplitude_hidden), nn.SiLU(),
                                         nn.Linear(amplitude_hidden, amplitude_hidden), nn.SiLU())
            self.film_sizes = []
            if self.film_bottleneck:
                self.film_sizes.append(self.features[-1])
            if self.film_decoder:
                self.film_sizes += [self.features[i - 1] for i in range(len(self.features) - 1, 0, -1)]
            n_out = 2 * sum(self.film_sizes) + (2 if self.output_modulation else 0)
            self.amp_out = nn.Linear(amplitude_hidden, n_out)
            nn.init.zeros_(self.amp_out.weight)  # identity FiLM and modulation at initialization
            nn.init.zeros_(self.amp_out.bias)

    def _init_physics_features(self, physics, att_grid_points):
        """Unit-CBF signal table on an ATT grid under the nominal physics, in network input units (÷ S_ref)."""
        from asl.physics import reference_signal, signal_curves

        if physics is None:
            raise ValueError("physics_features needs the physics section (model_kwargs passes it)")
        grid = torch.linspace(100.0, 4000.0, int(att_grid_points), dtype=torch.float64)
        unit = signal_curves(torch.ones_like(grid), grid, physics) / reference_signal(physics)
        if unit.shape[-1] != self.in_channels:
            raise ValueError(f"physics has {unit.shape[-1]} channels but the network {self.in_channels}")
        self.register_buffer("unit_table", unit.float(), persistent=False)
        self.register_buffer("att_grid", grid.float(), persistent=False)

    def grid_estimates(self, x: torch.Tensor) -> torch.Tensor:
        """Per-voxel closed-form estimates under the nominal physics (the LS grid initialization): for each
        grid ATT the least-squares CBF = ⟨u, y⟩/⟨u, u⟩ ≥ 0, then the grid point of least cost. Returns
        (B, 2, H, W): CBF/50 and (ATT − 1500)/1000. Input features only (no gradient needed)."""
        with torch.no_grad():
            unit = self.unit_table.to(x.dtype)
            num = torch.einsum("bchw,gc->bghw", x, unit)
            den = (unit * unit).sum(1)[None, :, None, None]
            cbf = (num / den).clamp_min(0.0)
            best = (cbf * cbf * den - 2 * cbf * num).argmin(dim=1, keepdim=True)
            cbf_best = cbf.gather(1, best)
            att_best = self.att_grid.to(x.dtype)[best]
        return torch.cat([cbf_best / 50.0, (att_best - 1500.0) / 1000.0], dim=1)

    def _make_encoder(self, n_groups, dropout):
        extra = 2 if self.physics_features else 0
        return Encoder(self.in_channels + extra, self.features, n_groups, dropout)

    def _encode(self, x):
        return self.encoder(x)

    def _amplitude(self, raw):
        """FiLM (gamma, beta) list and output modulation (scale, shift) from the raw input."""
        h = self.amp_mlp(amplitude_features(raw, self.n_pcasl, self.n_vsasl))
        out = self.amp_out(h)
        films, pos = [], 0
        for size in self.film_sizes:
            films.append((out[:, pos:pos + size], out[:, pos + size:pos + 2 * size]))
            pos += 2 * size
        modulation = out[:, pos:pos + 2] if self.output_modulation else None
        return films, modulation

    def _trunk(self, x, films):
        skips = self._encode(x)
        pos = 0
        if self.film_bottleneck:
            gamma, beta = films[0]
            skips[-1] = film(skips[-1], gamma, beta)
            pos = 1
        dec_film = films[pos:] if self.film_decoder else None
        return [decoder(skips, dec_film) for decoder in self.decoders]

    def forward(self, x: torch.Tensor) -> dict:
        raw = x
        films, modulation = self._amplitude(raw) if self.uses_amplitude else ([], None)
        xn = per_curve_normalize(raw) if self.normalization_mode == "per_curve" else raw
        if self.physics_features:
            xn = torch.cat([xn, self.grid_estimates(raw)], dim=1)
        per_scale = []
        for factor in self.scales:
            xs = F.avg_pool2d(xn, factor) if factor > 1 else xn
            feats = self._trunk(xs, films)
            if factor > 1:
                feats = [F.interpolate(f, size=xn.shape[-2:], mode="bilinear", align_corners=False) for f in feats]
            per_scale.append(feats)
        fused = []
        for d in range(len(self.decoders)):
            maps = [scale_feats[d] for scale_feats in per_scale]
            if len(maps) == 1:
                fused.append(maps[0])
            elif self.fusion == "attention":
                scores = torch.cat([self.fusion_score[d](m) for m in maps], dim=1)
                weights = torch.softmax(scores, dim=1)
                fused.append(sum(weights[:, i:i + 1] * m for i, m in enumerate(maps)))
            else:
                fused.append(torch.stack(maps).mean(0))
        feat_cbf, feat_att = fused[0], fused[-1]
        if self.att_conditioning:
            feat_att = torch.cat([feat_att, self.att_cue(att_feature_maps(raw, self.n_pcasl, self.n_vsasl))], 1)
        cbf_out, att_out = self.cbf_head(feat_cbf), self.att_head(feat_att)
        if self.cbf_kernel_size:
            k = self.cbf_kernel_size
            n = k * k
            weights = torch.softmax(cbf_out[:, :n], dim=1)
            grid_cbf = self.grid_estimates(raw)[:, :1] * 50.0  # ml/100g/min
            patches = F.unfold(grid_cbf, k, padding=k // 2).view(raw.shape[0], n, *raw.shape[-2:])
            cbf_phys = (weights * patches).sum(1, keepdim=True) * (1 + cbf_out[:, n:n + 1]) + 10.0 * cbf_out[:, n + 1:n + 2]
            cbf = (cbf_phys - self.cbf_mean) / self.cbf_std
            cbf_out = torch.cat([cbf, cbf_out[:, n + 2:]], dim=1)
        cbf = cbf_out[:, :1]
        if modulation is not None:  # output modulation: per-sample affine rescaling of the CBF map
            cbf = cbf * (1 + modulation[:, :1, None, None]) + modulation[:, 1:2, None, None]
        out = {"cbf": cbf, "att": att_out[:, :1]}
        if self.use_log_var:
            out["log_var_cbf"] = cbf_out[:, 1:2]
            out["log_var_att"] = att_out[:, 1:2]
        if self.denoise is not None:
            out["denoised"] = self.denoise(feat_cbf)
        return out


@register_model
class AmplitudeAwareSpatialASLNet(SpatialASLNet):
    """SpatialASLNet + amplitude features of the raw input → MLP → FiLM (y = (1+γ)x + β, identity init)
    at the bottleneck and/or every decoder level, and optional CBF output modulation; all three on by
    default (the production_v2 lock)."""

    def __init__(self, n_pcasl: int, n_vsasl: int, use_film_at_bottleneck: bool = True,
                 use_film_at_decoder: bool = True, use_amplitude_output_modulation: bool = True, **kwargs):
        super().__init__(n_pcasl, n_vsasl, use_film_at_bottleneck=use_film_at_bottleneck,
                         use_film_at_decoder=use_film_at_decoder,
                         use_amplitude_output_modulation=use_amplitude_output_modulation, **kwargs)


class DualEncoder(nn.Module):
    """Separate PCASL and VSASL encoders; per level the two feature maps are fused by a 1×1 conv."""

    def __init__(self, n_pcasl: int, n_vsasl: int, features, n_groups: int, dropout: float, n_extra: int = 0):
        super().__init__()
        self.n_pcasl, self.n_vsasl = n_pcasl, n_vsasl
        self.pcasl = Encoder(n_pcasl, features, n_groups, dropout)
        self.vsasl = Encoder(n_vsasl + n_extra, features, n_groups, dropout)
        self.fuse = nn.ModuleList([nn.Conv2d(2 * f, f, 1) for f in features])

    def forward(self, x):
        a = self.pcasl(x[:, :self.n_pcasl])
        b = self.vsasl(x[:, self.n_pcasl:])  # VSASL channels + any physics-feature channels
        return [fuse(torch.cat([p, v], 1)) for fuse, p, v in zip(self.fuse, a, b)]


@register_model
class DualEncoderSpatialASLNet(AmplitudeAwareSpatialASLNet):
    """Two encoders (PCASL, VSASL) and a shared decoder; needs both modalities. FiLM flags as
    AmplitudeAwareSpatialASLNet (default off here)."""

    def __init__(self, n_pcasl: int, n_vsasl: int, use_film_at_bottleneck: bool = False,
                 use_film_at_decoder: bool = False, use_amplitude_output_modulation: bool = False, **kwargs):
        if not (n_pcasl and n_vsasl):
            raise ValueError("DualEncoderSpatialASLNet needs both PCASL and VSASL channels "
                             f"(physics.modes), got n_pcasl={n_pcasl}, n_vsasl={n_vsasl}")
        super().__init__(n_pcasl, n_vsasl, use_film_at_bottleneck, use_film_at_decoder,
                         use_amplitude_output_modulation, **kwargs)

    def _make_encoder(self, n_groups, dropout):
        return DualEncoder(self.n_pcasl, self.n_vsasl, self.features, n_groups, dropout,
                           2 if self.physics_features else 0)
