"""ProtocolASLNet: a CBF/ATT network that takes the acquisition protocol as input (any PCASL / VSASL / both
protocol with 1-8 PLDs), with 2.5D context (K adjacent slices).

Input: a dict (see asl.protocol) with ``x`` (B, K, M, H, W) = ΔM/M0 ÷ S_ref of the protocol (padded
measurements are 0), the protocol tensors (``pld_ms``, ``is_vsasl``, ``valid`` (B, M); ``tau_ms``,
``t1_blood_ms``, ``alpha_eff_*``, ``lambda_blood`` (B,); nominal values, as a sidecar states them), ``s_ref``
(B,) and ``gm_weight`` (B, K, H, W) = GM / (GM + WM) from partial-volume maps (1 where none are given).

Per slice and voxel:
1. a set encoder (Deep Sets, Zaheer et al. NeurIPS 2017): each measurement → [signal, PLD, τ, mode, expected
   GM signal at that measurement] → shared MLP → mean over the valid measurements (order- and
   count-independent);
2. the closed-form grid estimate under the protocol's nominal physics (the least-squares initialization of
   asl.fitting.grid_init): for each ATT on a grid, CBF = ⟨u, y⟩/⟨u, u⟩ with u the unit-CBF signal, whose
   tissue T1 is interpolated between GM and WM by ``gm_weight``, then the grid point of least cost;
3. the K slices' features are stacked and a 2D U-Net maps them to the centre slice's CBF and ATT; CBF is a
   learned per-pixel k×k filter of the grid CBF estimate times a gain plus an offset (as the kernel CBF head of
   asl.models), so it stays proportional to the signal amplitude; ATT is regressed (z-scored); both with
   log-variance heads.
4. with ``ls_inputs`` (asl.ls_inputs): the voxel-wise least-squares estimate of the centre slice and its
   Cramér-Rao bound (``inputs["ls"]`` (B, K, 5, H, W)) are blended with the network's estimate per voxel,
   θ = (1 − g)·θ_net + g·θ_LS with g = sigmoid(ln v_net − ln v_LS + Δ), v_net the network's predicted variance
   (its log-variance head, not back-propagated through the gate), v_LS the CRLB and Δ a correction learned
   from the decoder features and the LS channels (zero-initialized). At Δ = 0, g = v_net / (v_net + v_LS): the
   inverse-variance weighting of two independent unbiased estimates (minimum-variance linear combination;
   e.g. Kay, Fundamentals of Statistical Signal Processing I, 1993). The two estimates see the same noise and
   LS is biased at low SNR, so Δ learns where that weighting is off. Where the fit is invalid g = 0.
5. σ scaling (Laves et al. 2020, MIDL): the variance of the log-variance heads is multiplied by s² per output
   (``sigma_scale``: CBF, ATT), s fitted on the validation slabs after training (train_protocol_asl.py) and stored
   in the checkpoint's ``extra["sigma_scale"]``; :meth:`ProtocolASLNet.load_sigma_scale` sets it when a checkpoint
   is loaded (asl.data.load_ensemble), and asl.protocol_data.predict_volume applies it. ``forward`` returns the
   unscaled log-variances (the LS blend of step 4 weighs those, as in training). A checkpoint without one: s = 1.
Steps 1-2 depend on one slice only (:meth:`ProtocolASLNet.encode_slices`), steps 3-4 on a window of K slices
(:meth:`ProtocolASLNet.decode`): whole-volume inference (asl.protocol_data.predict_volume) encodes each slice once.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch
import torch.nn as nn
import torch.nn.functional as F

from asl.brain_volume import T1_GM_MS, T1_WM_MS
from asl.ls_inputs import LS_CHANNELS
from asl.models import LOG_VAR_RANGE, Decoder, Encoder
from asl.protocol import protocol_signals
from common.checkpoint import register_model

PROTOCOL_KEYS = ("pld_ms", "is_vsasl", "valid", "tau_ms", "t1_blood_ms", "alpha_eff_pcasl", "alpha_eff_vsasl",
                 "lambda_blood")
N_MEASUREMENT_FEATURES = 5


@register_model
class ProtocolASLNet(nn.Module):
    def __init__(self, context_slices: int = 3, set_features: int = 16, features=(16, 32, 64), n_groups: int = 8,
                 dropout: float = 0.0, use_log_var: bool = True, cbf_kernel_size: int = 5, att_grid_points: int = 40,
                 att_grid_ms=(100.0, 4000.0), cbf_mean: float = 0.0, cbf_std: float = 1.0, ls_inputs: bool = False,
                 att_mean: float = 0.0, att_std: float = 1.0, gate_features: int = 16):
        super().__init__()
        if context_slices < 1 or context_slices % 2 == 0:
            raise ValueError(f"context_slices must be odd and ≥ 1, got {context_slices}")
        if cbf_kernel_size < 1 or cbf_kernel_size % 2 == 0:
            raise ValueError(f"cbf_kernel_size must be odd and ≥ 1, got {cbf_kernel_size}")
        self.k, self.features = int(context_slices), [int(f) for f in features]
        self.use_log_var, self.kernel = bool(use_log_var), int(cbf_kernel_size)
        self.cbf_mean, self.cbf_std = float(cbf_mean), float(cbf_std)
        self.att_mean, self.att_std = float(att_mean), float(att_std)
        self.ls_inputs = bool(ls_inputs)
        self.sigma_scale = {"cbf": 1.0, "att": 1.0}  # step 5 of the module docstring; set by load_sigma_scale
        self.sigma_scale_source = "none stored with the checkpoint: σ scale 1"
        if self.ls_inputs and not self.use_log_var:
            raise ValueError("ls_inputs needs use_log_var (the blend weighs the network's predicted variance)")
        self.register_buffer("att_grid", torch.linspace(float(att_grid_ms[0]), float(att_grid_ms[1]),
                                                        int(att_grid_points)), persistent=False)
        self.set_in = nn.Linear(N_MEASUREMENT_FEATURES, set_features)
        self.set_hidden = nn.Linear(set_features, set_features)
        per_slice = set_features + 3  # set features, grid CBF/ATT, GM weight
        self.encoder = Encoder(per_slice * self.k, self.features, n_groups, dropout)
        self.decoder = Decoder(self.features, n_groups, dropout)
        f0 = self.features[0]
        n_kernel = self.kernel**2
        self.cbf_head = nn.Conv2d(f0, n_kernel + 2 + (1 if self.use_log_var else 0), 1)
        nn.init.zeros_(self.cbf_head.weight)  # start at the voxel's own grid estimate (centre weight ≈ 0.7)
        nn.init.zeros_(self.cbf_head.bias)
        with torch.no_grad():
            self.cbf_head.bias[n_kernel // 2] = math.log(2.3 * max(n_kernel - 1, 1))
        self.att_head = nn.Conv2d(f0, 2 if self.use_log_var else 1, 1)
        if self.ls_inputs:  # Δ of the blend weights (CBF, ATT) from decoder features + LS channels
            self.gate_hidden = nn.Conv2d(f0 + LS_CHANNELS, int(gate_features), 3, padding=1)
            self.gate_out = nn.Conv2d(int(gate_features), 2, 1)
            nn.init.zeros_(self.gate_out.weight)
            nn.init.zeros_(self.gate_out.bias)

    def load_sigma_scale(self, ckpt: Mapping) -> str:
        """Set ``sigma_scale`` from a checkpoint's ``extra["sigma_scale"]`` (1 for both outputs when it has none:
        trained before the scale existed, or stopped before it was fitted). Returns where it came from; raises
        ValueError naming the field for a scale that is not a positive finite number."""
        stored = (ckpt.get("extra") or {}).get("sigma_scale")
        if stored is None:
            self.sigma_scale = {"cbf": 1.0, "att": 1.0}
            self.sigma_scale_source = ("none stored with the checkpoint: σ scale 1 (fit one with "
                                       "train_protocol_asl.py --calibrate)")
            return self.sigma_scale_source
        scale = {}
        for key in ("cbf", "att"):
            value = stored.get(key) if isinstance(stored, Mapping) else None
            if not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"field 'extra.sigma_scale.{key}' must be a positive number, got {value!r}")
            scale[key] = float(value)
        self.sigma_scale = scale
        self.sigma_scale_source = (f"σ scale CBF {scale['cbf']:.3f}, ATT {scale['att']:.3f} "
                                   f"({stored.get('fitted_on', 'fitted after training')})")
        return self.sigma_scale_source

    # ------------------------------------------------------------------------------------ features
    def unit_tables(self, proto: dict, s_ref: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Unit-CBF signals ÷ S_ref on the ATT grid for GM and WM tissue T1: two (B, G, M) tables."""
        b, g = s_ref.shape[0], self.att_grid.numel()
        p64 = {k: v.double() for k, v in proto.items()}
        ones = torch.ones((b, g), dtype=torch.float64, device=s_ref.device)
        grid = self.att_grid.double()[None].expand(b, g)
        tables = [protocol_signals(ones, grid, t1, p64).transpose(1, 2) / s_ref.double()[:, None, None]
                  for t1 in (T1_GM_MS, T1_WM_MS)]
        return tables[0].float(), tables[1].float()

    @torch.no_grad()
    def grid_estimates(self, x: torch.Tensor, w: torch.Tensor, u_gm: torch.Tensor, u_wm: torch.Tensor) -> torch.Tensor:
        """x (B, M, H, W), w (B, H, W) GM weight → (B, 2, H, W): grid CBF/50 and (ATT − 1500)/1000.
        The voxel's unit signal is w·u_GM + (1 − w)·u_WM, so ⟨u, y⟩ and ⟨u, u⟩ are mixtures of table products:
        num = w·⟨u_GM, y⟩ + (1 − w)·⟨u_WM, y⟩, den = w²·⟨u_GM, u_GM⟩ + 2w(1 − w)·⟨u_GM, u_WM⟩ + (1 − w)²·⟨u_WM, u_WM⟩,
        CBF = num / den, cost − |y|² = CBF²·den − 2·CBF·num. The (B, G, H, W) arrays are updated in place (the
        same floating-point operations, hence the same result to the bit, without a new array per operation)."""
        n_gm = torch.einsum("bmhw,bgm->bghw", x, u_gm)
        n_wm = torch.einsum("bmhw,bgm->bghw", x, u_wm)
        d_gg, d_gw, d_ww = ((a * c).sum(-1)[..., None, None] for a, c in ((u_gm, u_gm), (u_gm, u_wm), (u_wm, u_wm)))
        wv = w[:, None]
        vw = 1 - wv
        num = n_gm.mul_(wv).add_(n_wm.mul_(vw))
        scratch = n_wm  # free from here on
        den = torch.mul(wv**2, d_gg)
        den.add_(torch.mul(2 * wv * vw, d_gw, out=scratch)).add_(torch.mul(vw**2, d_ww, out=scratch)).clamp_min_(1e-12)
        cbf = torch.div(num, den).clamp_(0.0, 200.0)
        cost = torch.mul(cbf, cbf, out=scratch).mul_(den).sub_(num.mul_(2 * cbf))
        # argmin on a copy with the grid axis last (contiguous): the same index, faster than along a strided axis
        best = cost.permute(0, 2, 3, 1).contiguous().argmin(dim=-1)[:, None]
        return torch.cat([cbf.gather(1, best) / 50.0, (self.att_grid[best] - 1500.0) / 1000.0], dim=1)

    def measurement_features(self, x: torch.Tensor, proto: dict, ref: torch.Tensor) -> torch.Tensor:
        """x (B, M, H, W) → (B, set_features, H, W): mean of the shared MLP over valid measurements. The first
        layer splits into the signal term and a per-measurement protocol term computed once per measurement."""
        b, m = x.shape[:2]
        per_m = torch.stack([proto["pld_ms"] / 1000.0, proto["tau_ms"][:, None].expand(b, m) / 1000.0
                             * (1 - proto["is_vsasl"]), proto["is_vsasl"], ref], dim=-1)  # (B, M, 4)
        weight = self.set_in.weight  # (F, 5): column 0 multiplies the signal
        protocol_term = per_m @ weight[:, 1:].T + self.set_in.bias  # (B, M, F)
        h = F.silu(x[..., None] * weight[:, 0] + protocol_term[:, :, None, None, :])  # (B, M, H, W, F)
        h = F.silu(self.set_hidden(h))
        valid = proto["valid"][:, :, None, None, None]
        pooled = (h * valid).sum(1) / valid.sum(1).clamp_min(1.0)  # (B, H, W, F)
        return pooled.permute(0, 3, 1, 2)

    # ------------------------------------------------------------------------------------- forward
    def encode_slices(self, x: torch.Tensor, w: torch.Tensor, proto: dict, s_ref: torch.Tensor) -> torch.Tensor:
        """Per-slice features (steps 1-2), independent of the neighbouring slices: x (N, M, H, W) ÷ S_ref, w (N, H, W)
        GM weight, protocol tensors and s_ref with a leading N → (N, set_features + 3, H, W) = [set features, grid
        CBF/50, grid (ATT − 1500)/1000, GM weight]. The set encoder runs only on measurements valid in some slice
        (padding is excluded from its mean, so the result is the same); the grid sums keep every slot, so that their
        float32 rounding, which decides near-ties of the grid argmin in noisy voxels, stays as trained."""
        proto = {key: proto[key].float() for key in PROTOCOL_KEYS}
        s_ref = s_ref.float()
        n = x.shape[0]
        u_gm, u_wm = self.unit_tables(proto, s_ref)
        # Expected GM signal per measurement (÷ S_ref): the reference voxel's curve, a shape cue for the encoder.
        ref = protocol_signals(torch.full((n,), 60.0, device=x.device), torch.full((n,), 1300.0, device=x.device),
                               T1_GM_MS, proto) / s_ref[:, None]
        grid = self.grid_estimates(x, w, u_gm, u_wm)
        keep = proto["valid"].amax(0) > 0.5
        if not bool(keep.all()):
            x, ref = x[:, keep], ref[:, keep]
            proto = {key: (v[:, keep] if v.ndim == 2 else v) for key, v in proto.items()}
        sets = self.measurement_features(x, proto, ref)
        return torch.cat([sets, grid, w[:, None]], dim=1)

    def forward(self, inputs: dict) -> dict:
        x = inputs["x"].float()  # (B, K, M, H, W)
        b, k, m, h, w = x.shape
        if k != self.k:
            raise ValueError(f"the network takes {self.k} context slices, got {k}")
        rep = lambda t: t.repeat_interleave(k, dim=0)  # noqa: E731 (per-sample → per-slice)
        feats = self.encode_slices(x.reshape(b * k, m, h, w), inputs["gm_weight"].float().reshape(b * k, h, w),
                                   {key: rep(inputs[key]) for key in PROTOCOL_KEYS}, rep(inputs["s_ref"]))
        return self.decode(feats.reshape(b, k, -1, h, w), inputs.get("ls"))

    def decode(self, slab: torch.Tensor, ls: torch.Tensor | None = None) -> dict:
        """Steps 3-4 from the K slices' :meth:`encode_slices` features slab (B, K, set_features + 3, H, W) and, for
        ``ls_inputs``, the LS channels ``ls`` (B, K, 5, H, W). Returns the outputs of :meth:`forward`."""
        b, k, c, h, w = slab.shape
        if k != self.k:
            raise ValueError(f"the network takes {self.k} context slices, got {k}")
        feat = self.decoder(self.encoder(slab.reshape(b, k * c, h, w)))
        cbf_out, att_out = self.cbf_head(feat), self.att_head(feat)
        n = self.kernel**2
        weights = torch.softmax(cbf_out[:, :n], dim=1)
        grid_cbf = slab[:, k // 2, c - 3:c - 2] * 50.0  # centre slice's grid CBF, ml/100g/min
        patches = F.unfold(grid_cbf, self.kernel, padding=self.kernel // 2).view(b, n, h, w)
        cbf_phys = (weights * patches).sum(1, keepdim=True) * (1 + cbf_out[:, n:n + 1]) + 10.0 * cbf_out[:, n + 1:n + 2]
        out = {"cbf": (cbf_phys - self.cbf_mean) / self.cbf_std, "att": att_out[:, :1]}
        if self.ls_inputs:
            if ls is None:
                raise ValueError("this network blends with least squares: inputs need 'ls' (asl.ls_inputs)")
            out.update(self.blend_with_ls(out, feat, ls.float()[:, k // 2], cbf_out[:, n + 2:n + 3], att_out[:, 1:2]))
        if self.use_log_var:
            out["log_var_cbf"] = cbf_out[:, n + 2:n + 3]
            out["log_var_att"] = att_out[:, 1:2]
        return out

    def blend_with_ls(self, out: dict, feat: torch.Tensor, ls: torch.Tensor, log_var_cbf: torch.Tensor,
                      log_var_att: torch.Tensor) -> dict:
        """θ = (1 − g)·θ_net + g·θ_LS per voxel (module docstring, step 4); ls (B, 5, H, W) centre slice."""
        ls_cbf, ls_att = ls[:, 0:1] * 50.0, ls[:, 1:2] * 1000.0 + 1500.0
        ln_v_ls_cbf, ln_v_ls_att, valid = ls[:, 2:3], ls[:, 3:4], ls[:, 4:5] > 0.5
        # the network's variances in physical units: ln v = log_var(z) + 2 ln std
        ln_v_net_cbf = log_var_cbf.detach().clamp(*LOG_VAR_RANGE) + 2 * math.log(self.cbf_std)
        ln_v_net_att = log_var_att.detach().clamp(*LOG_VAR_RANGE) + 2 * math.log(self.att_std)
        scaled = torch.cat([ls[:, :2], ls[:, 2:4] / 10.0, ls[:, 4:5]], dim=1)
        delta = self.gate_out(F.silu(self.gate_hidden(torch.cat([feat, scaled], dim=1))))
        g_cbf = torch.sigmoid(ln_v_net_cbf - ln_v_ls_cbf + delta[:, 0:1]) * valid
        g_att = torch.sigmoid(ln_v_net_att - ln_v_ls_att + delta[:, 1:2]) * valid
        net_cbf = out["cbf"] * self.cbf_std + self.cbf_mean
        net_att = out["att"] * self.att_std + self.att_mean
        cbf = (1 - g_cbf) * net_cbf + g_cbf * torch.where(valid, ls_cbf, net_cbf)
        att = (1 - g_att) * net_att + g_att * torch.where(valid, ls_att, net_att)
        return {"cbf": (cbf - self.cbf_mean) / self.cbf_std, "att": (att - self.att_mean) / self.att_std,
                "ls_weight_cbf": g_cbf, "ls_weight_att": g_att}
