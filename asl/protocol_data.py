"""Data for protocol-conditioned networks: training slabs of 3D brain subjects with random protocols, the
batch simulation on the device, held-out test subjects with fixed protocols, and whole-volume inference.

A training item is a slab of K adjacent slices (asl.brain_volume.generate_brain with ``z_slices``) cropped
in-plane, a protocol (asl.protocol.draw_protocol: the nominal values a sidecar would state and the subject's
true ones), an SNR, and whether GM/WM partial-volume maps are "available" (else the GM weight input is 1, as
for data without a segmentation). Everything depends on (base seed, index) only, so resumed runs repeat.
Noise: σ = S_ref / SNR on every valid measurement (the project's SNR definition with the protocol's S_ref).
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import numpy as np
import torch
from torch.utils.data import Dataset

from asl.brain_volume import generate_brain
from asl.fitting import fit_batched_protocols, protocol_fit_group
from asl.ls_inputs import LN_VAR_INVALID, LS_CHANNELS, ls_input_channels, nominal_physics, tissue_t1_from_gm_weight
from asl.models import head_variance
from asl.protocol import M_MAX, draw_protocol, protocol_arrays, protocol_signals, reference_scale
from asl.simulate import item_seed

PROTOCOL_NET_DEFAULTS = {
    "context_slices": 3,  # K adjacent slices in (2.5D); the centre slice is predicted
    "set_features": 16,  # width of the per-measurement set encoder
    "features": [16, 32, 64],  # U-Net widths per level
    "n_groups": 8,
    "dropout": 0.0,
    "cbf_kernel_size": 5,  # CBF = learned k×k filter of the grid CBF estimate × gain + offset
    "crop_px": 32,  # in-plane training crop (the network is fully convolutional; inference uses the full slice)
    "p_pv_maps": 0.5,  # share of training items whose GM weight input is the true GM/(GM+WM) (else 1)
    "snr_range": [2.0, 20.0],  # log-uniform training SNR
    "n_val": 12,  # validation slabs (model selection), from val_seed
    "val_seed": 3_000_003,
    "val_snrs": [3.0, 10.0],
    "ls_inputs": False,  # blend with the voxel-wise LS estimate and its CRLB (asl/ls_inputs.py, asl/protocol_net.py)
    "init_weights": "",  # checkpoint to warm-start from (common.checkpoint.warm_start: matching tensors only)
    "init_min_fraction": 0.9,  # refuse the warm start when fewer of the model's tensors match
}


def log_uniform_snr(u: float, lo_hi) -> float:
    """SNR log-uniform in [lo, hi] from u in [0, 1], as training draws it."""
    lo, hi = math.log(float(lo_hi[0])), math.log(float(lo_hi[1]))
    return float(math.exp(lo + u * (hi - lo)))


def make_item(seed: int, brain_cfg: Mapping, phantom_cfg: Mapping, proto_cfg: Mapping, train_cfg: Mapping) -> dict:
    """One training/validation slab (numpy), deterministic from ``seed``."""
    rng = np.random.default_rng([seed, 11])
    k, crop = int(train_cfg["context_slices"]), int(train_cfg["crop_px"])
    nx, ny, nz = (int(s) for s in brain_cfg["shape"])
    z0 = int(rng.integers(nz // 6, nz - nz // 6 - k + 1))
    cx = int(rng.integers(0, nx - crop + 1))
    cy = int(rng.integers(0, ny - crop + 1))
    vol = generate_brain(seed, brain_cfg, phantom_cfg, (z0, z0 + k), (cx, cy, crop))
    to_kxy = lambda a: np.ascontiguousarray(np.moveaxis(a, -1, 0))  # noqa: E731 (X, Y, K) → (K, X, Y)
    item = {key: to_kxy(vol[key]) for key in ("cbf", "att", "t1_tissue_ms", "gm", "wm", "abv", "aatt_ms", "mask",
                                             "label")}
    tissue = item["gm"] + item["wm"]
    gm_weight = np.where(tissue > 1e-6, item["gm"] / np.maximum(tissue, 1e-6), 1.0).astype(np.float32)
    item["gm_weight"] = gm_weight if rng.uniform() < float(train_cfg["p_pv_maps"]) else np.ones_like(gm_weight)
    protocol = draw_protocol(rng, proto_cfg)
    item.update({f"nominal_{k_}": v for k_, v in protocol_arrays(protocol).items()})
    item.update({f"true_{k_}": v for k_, v in protocol_arrays(protocol, true=True).items()})
    item["snr"] = np.float32(log_uniform_snr(rng.uniform(), train_cfg["snr_range"]))
    return item


class BrainSlabDataset(Dataset):
    """Item ``i`` = :func:`make_item` of seed(base_seed, i); indices beyond ``len`` give new slabs
    (asl.simulate.EpochSampler hands out epoch·n + i)."""

    def __init__(self, n_per_epoch: int, base_seed: int, brain_cfg: Mapping, phantom_cfg: Mapping,
                 proto_cfg: Mapping, train_cfg: Mapping):
        self.n, self.base_seed = int(n_per_epoch), int(base_seed)
        self.cfgs = (dict(brain_cfg), dict(phantom_cfg), dict(proto_cfg), dict(train_cfg))

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        item = make_item(item_seed(self.base_seed, index), *self.cfgs)
        return {k: torch.from_numpy(np.asarray(v)) for k, v in item.items()}


def _proto(batch: Mapping, prefix: str, device) -> dict:
    return {k[len(prefix):]: v.to(device) for k, v in batch.items() if k.startswith(prefix)}


def simulate_batch(batch: Mapping, device, generator: torch.Generator | None = None, snr=None,
                   ls_fit_cfg: Mapping | None = None) -> dict:
    """Network inputs and targets of a collated batch: clean signals under the true protocol physics
    (macrovascular term included), noise σ = S_ref/SNR on valid measurements, inputs ÷ S_ref of the nominal
    protocol. ``snr`` overrides the items' SNRs. Returns the model's input dict plus cbf/att/mask (B,1,H,W)
    of the centre slice and label (B,H,W). With ``ls_fit_cfg`` (asl.fitting settings) also ``ls`` (B, K, 5, H, W):
    :func:`ls_slab_inputs`."""
    f32 = lambda key: batch[key].to(device, torch.float32)  # noqa: E731
    true, nominal = _proto(batch, "true_", device), _proto(batch, "nominal_", device)
    clean = protocol_signals(f32("cbf"), f32("att"), f32("t1_tissue_ms"), true, f32("abv"), f32("aatt_ms"))
    clean = clean.movedim(1, 2)  # (B, K, M, H, W)
    s_ref = reference_scale(nominal)
    snr = f32("snr") if snr is None else torch.full_like(s_ref, float(snr))
    sigma = (s_ref / snr)[:, None, None, None, None]
    noise = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    valid = nominal["valid"][:, None, :, None, None]
    x = (clean + sigma * noise * valid) / s_ref[:, None, None, None, None]
    c = batch["cbf"].shape[1] // 2
    extra = {}
    if ls_fit_cfg is not None:
        extra["ls"] = ls_slab_inputs(x, s_ref, nominal, f32("gm_weight"), batch["mask"].to(device), ls_fit_cfg)
    return {"x": x, **extra, **nominal, "s_ref": s_ref, "gm_weight": f32("gm_weight"),
            "cbf": f32("cbf")[:, c:c + 1], "att": f32("att")[:, c:c + 1],
            "mask": batch["mask"][:, c:c + 1].to(device), "label": batch["label"][:, c].to(device)}


def _empty_ls(shape, device) -> torch.Tensor:
    ls = torch.zeros(*shape, LS_CHANNELS, dtype=torch.float32, device=device)
    ls[..., 2:4] = LN_VAR_INVALID
    return ls


def ls_slab_inputs(x: torch.Tensor, s_ref: torch.Tensor, nominal: Mapping, gm_weight: torch.Tensor,
                   mask: torch.Tensor, fit_cfg: Mapping, joint: bool | None = None) -> torch.Tensor:
    """LS channels (asl.ls_inputs) of each item's brain voxels (all K slices; σ pooled over the item's slab):
    x (B, K, M, H, W) ÷ S_ref, gm_weight and mask (B, K, H, W) → (B, K, LS_CHANNELS, H, W).

    ``joint`` (default: on CUDA): the items' voxels are fitted in one batched fit over their different protocols
    (asl.fitting.fit_batched_protocols, equal to the per-item fits to rounding) instead of one fit per item: on a
    GPU each of the fit's ~100 iterations costs about the same for one item as for all, while on a CPU the
    per-item fits are faster (their grid start has a closed form for one protocol)."""
    b, k, _, h, w = x.shape
    out = _empty_ls((b, k, h, w), x.device)
    joint = x.device.type == "cuda" if joint is None else joint
    items = []
    for i in range(b):
        arrays = {key: v[i] for key, v in nominal.items()}
        valid = arrays["valid"] > 0.5
        sel = mask[i].bool()
        signals = (x[i].movedim(1, -1)[sel][:, valid] * s_ref[i]).double().cpu().numpy()  # (N, C) ΔM/M0
        items.append((i, sel, signals, gm_weight[i][sel].double().cpu().numpy(), nominal_physics(arrays)))
    fits: dict[int, dict] = {}
    if joint:  # one fit per group of items that share modes (etc.); items with <= 2 measurements are not fitted
        groups: dict[tuple, list] = {}
        for item in items:
            if item[2].shape[0] and item[2].shape[1] > 2:
                groups.setdefault(protocol_fit_group(item[4]), []).append(item)
        for group in groups.values():
            results = fit_batched_protocols([it[2] for it in group], [it[4] for it in group],
                                            [{"t1_tissue_ms": tissue_t1_from_gm_weight(it[3])} for it in group],
                                            fit_cfg, device=x.device)
            fits.update({it[0]: res for it, res in zip(group, results)})
    for i, sel, signals, gm, physics in items:
        channels, _ = ls_input_channels(signals, gm, physics, fit_cfg, device=x.device, fit=fits.get(i))
        out[i][sel] = torch.from_numpy(channels).to(x.device)
    return out.permute(0, 1, 4, 2, 3).contiguous()


def validation_items(brain_cfg, phantom_cfg, proto_cfg, train_cfg) -> dict:
    """The fixed validation slabs (seeds of ``val_seed``, disjoint from the training stream), collated."""
    items = [make_item(item_seed(int(train_cfg["val_seed"]), i), brain_cfg, phantom_cfg, proto_cfg, train_cfg)
             for i in range(int(train_cfg["n_val"]))]
    return {k: torch.from_numpy(np.stack([np.asarray(it[k]) for it in items])) for k in items[0]}


@torch.inference_mode()
def predict_volume(models, signals: np.ndarray, protocol: Mapping, gm_weight: np.ndarray | None, stats: Mapping,
                   device="cpu", batch_slices: int = 8, mask: np.ndarray | None = None,
                   fit_cfg: Mapping | None = None, ls_fit: Mapping | None = None,
                   channels_last: bool | None = None) -> dict:
    """CBF/ATT maps (X, Y, Z) of ΔM/M0 signals (X, Y, Z, M) acquired with ``protocol`` (nominal values:
    asl.protocol.protocol_from_physics), mean over the ensemble; ``gm_weight`` GM/(GM+WM) (X, Y, Z) or None.
    Each slice sees its K neighbours (edge slices repeated). Returns cbf, att, cbf_var, att_var (log-variance
    heads, each × its member's σ scale² (asl.protocol_net step 5), averaged, plus member disagreement). Models with
    ``ls_inputs`` get the LS channels of
    asl.ls_inputs over ``mask`` (X, Y, Z; None: every voxel with a nonzero signal), fitted with ``fit_cfg`` (the
    checkpoint's ``preprocessing.fit``), σ pooled over the whole volume; ``ls_fit``: that fit already made (the
    asl.fitting.fit_batched result over the ``mask`` voxels, as predict_asl.py shares it with its LS maps).
    ``channels_last`` (default: on the CPU) runs the U-Net on channels-last windows: oneDNN convolutions without a
    layout conversion, maps equal to the channels-first ones to float32 rounding (asl/README.md, "Speed (measured)")."""
    arrays = {k: torch.from_numpy(np.asarray(v))[None].to(device) for k, v in protocol_arrays(protocol).items()}
    s_ref = reference_scale(arrays)
    nx, ny, nz, m = signals.shape
    x_full = np.zeros((nz, M_MAX, nx, ny), np.float32)
    x_full[:, :m] = np.moveaxis(signals, (2, 3), (0, 1)) / float(s_ref)
    w_full = np.ones((nz, nx, ny), np.float32) if gm_weight is None else np.moveaxis(gm_weight, 2, 0).astype(np.float32)
    ls_full = None
    if any(getattr(mdl, "ls_inputs", False) for mdl in models):
        if fit_cfg is None:
            raise ValueError("a network with ls_inputs needs fit_cfg (its checkpoint's preprocessing.fit)")
        vox = np.any(signals != 0, axis=-1) if mask is None else np.asarray(mask, bool)
        w_vox = np.ones(vox.sum()) if gm_weight is None else np.asarray(gm_weight, np.float64)[vox]
        physics = nominal_physics(protocol_arrays(protocol))
        channels, _ = ls_input_channels(np.asarray(signals, np.float64)[vox][:, :m], w_vox, physics, fit_cfg,
                                        device=device, fit=ls_fit)
        ls_xyz = _empty_ls((nx, ny, nz), "cpu").numpy()
        ls_xyz[vox] = channels
        ls_full = np.ascontiguousarray(np.moveaxis(ls_xyz, (2, 3), (0, 1)))  # (Z, 5, X, Y)
    k = models[0].k
    mult = 2 ** (len(models[0].features) - 1)
    ph, pw = (-nx) % mult, (-ny) % mult
    x_all = torch.nn.functional.pad(torch.from_numpy(x_full).to(device), (0, pw, 0, ph))
    w_all = torch.nn.functional.pad(torch.from_numpy(w_full).to(device), (0, pw, 0, ph), value=1.0)
    ls_all = None
    if ls_full is not None:
        ls_all = torch.nn.functional.pad(torch.from_numpy(ls_full).to(device), (0, pw, 0, ph))
        ls_all[..., nx:, :][:, 2:4] = LN_VAR_INVALID
        ls_all[..., :, ny:][:, 2:4] = LN_VAR_INVALID
    if channels_last is None:
        channels_last = torch.device(device).type == "cpu"
    out = {key: np.zeros((nz, nx, ny)) for key in ("cbf", "att", "cbf_var", "att_var")}
    sums = {key: torch.zeros((nz, nx, ny), dtype=torch.float64, device=device)
            for key in ("cbf", "att", "var_c", "var_a", "cbf2", "att2")}
    for model in models:
        model.eval()
        # Each slice is encoded once (steps 1-2 of asl.protocol_net), then every window of K slices decoded.
        parts = []
        for start in range(0, nz, batch_slices):
            xs, ws = x_all[start:start + batch_slices], w_all[start:start + batch_slices]
            n = xs.shape[0]
            parts.append(model.encode_slices(xs, ws, {key: v.expand(n, *v.shape[1:]) for key, v in arrays.items()},
                                             s_ref.expand(n).to(device)))
        feats = torch.cat(parts)
        if channels_last:  # (Z, H, W, C): each window below is gathered straight into channels-last order
            feats = feats.permute(0, 2, 3, 1).contiguous()
        for start in range(0, nz, batch_slices):
            zs = list(range(start, min(nz, start + batch_slices)))
            idx = torch.from_numpy(np.clip(np.array(zs)[:, None] + np.arange(k)[None] - k // 2, 0, nz - 1)).to(device)
            slab = feats[idx]
            if channels_last:  # (B, K, H, W, C) → a (B, K, C, H, W) view whose K·C channels are the innermost axis
                b_, k_, h_, w_, c_ = slab.shape
                slab = slab.permute(0, 2, 3, 1, 4).reshape(b_, h_, w_, k_ * c_)
                slab = slab.permute(0, 3, 1, 2).unflatten(1, (k_, c_))
            o = model.decode(slab, None if ls_all is None else ls_all[idx])
            cbf = (o["cbf"][:, 0, :nx, :ny] * stats["cbf_std"] + stats["cbf_mean"]).double()
            att = (o["att"][:, 0, :nx, :ny] * stats["att_std"] + stats["att_mean"]).double()
            sums["cbf"][zs] += cbf
            sums["att"][zs] += att
            sums["cbf2"][zs] += cbf * cbf
            sums["att2"][zs] += att * att
            # the log-variance heads' variance in physical units, × the member's σ scale² (asl.protocol_net step 5)
            sums["var_c"][zs] += (head_variance(o["log_var_cbf"][:, 0, :nx, :ny]).double()
                                  * (stats["cbf_std"] * model.sigma_scale["cbf"]) ** 2)
            sums["var_a"][zs] += (head_variance(o["log_var_att"][:, 0, :nx, :ny]).double()
                                  * (stats["att_std"] * model.sigma_scale["att"]) ** 2)
    n_models = len(models)
    for key, var_key, sq in (("cbf", "var_c", "cbf2"), ("att", "var_a", "att2")):
        mean = sums[key] / n_models
        # log-variance heads averaged plus the members' disagreement (population variance over the ensemble)
        out[key] = mean.cpu().numpy()
        out[f"{key}_var"] = (sums[var_key] / n_models + (sums[sq] / n_models - mean * mean).clamp_min(0)).cpu().numpy()
    return {key: np.moveaxis(v, 0, 2) for key, v in out.items()}
