"""Brain-like 2D phantoms, domain-randomized physics, noise, and the training / fixed evaluation sets.

Phantom (one 2D slice, deterministic from a seed):
- brain mask: an ellipse with a smoothly warped boundary;
- tissue: a cortical GM ribbon of varying thickness with sulcal CSF, WM inside, ventricles (CSF) and deep
  GM nuclei (``style: anatomical``), or the original's Voronoi partition (``style: voronoi``, GM/WM/CSF
  with p 0.5/0.4/0.1); hard labels are blurred into partial-volume fractions;
- per-tissue CBF/ATT means drawn per phantom, with smooth within-tissue variation (multiplicative CBF
  field, an ATT gradient plus a smooth ATT field) and small per-pixel jitter, so regions are not
  piecewise constant (a spatial CNN must not be able to just average a flat region);
- pathology blobs: tumour (hyper-perfused rim, low-flow core) and stroke (core, penumbra), each with its
  own CBF/ATT ranges;
- voxel CBF = Σ_t fraction_t·CBF_t; voxel ATT = Σ_t fraction_t·CBF_t·ATT_t / Σ_t fraction_t·CBF_t (the
  flow-weighted arrival); the signal of the voxel is the single-compartment model at these values, so the
  least-squares model is correctly specified and "truth" is well defined.

Physics randomization (one draw per phantom, ranges in ``randomization:``) reaches the simulated signals
through :func:`asl.physics.signal_curves` params. The SNR definition is :func:`asl.physics.noise_sigma`.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from scipy import ndimage
from torch.utils.data import Dataset, Sampler

from asl.physics import noise_sigma, signal_curves
from common.errors import InputError
from common.files import load_npz
from common.runlog import save_npz_atomic

LABELS = {"background": 0, "gm": 1, "wm": 2, "csf": 3, "pathology": 4}

PHANTOM_DEFAULTS = {
    "size": 64,  # image side in pixels (64 or 128 in the experiments)
    "voronoi_fraction": 0.25,  # share of phantoms with the original's Voronoi tissue partition
    "voronoi_seeds": [15, 30],  # number of Voronoi regions (min, max)
    "partial_volume_sigma_px": 0.8,  # Gaussian blur of hard tissue labels → partial-volume fractions
    "cbf_global_scale": [0.6, 1.6],  # per-phantom factor on every tissue's CBF (subjects differ globally;
    # without it a CNN can read CBF off the anatomy instead of the signal amplitude)
    "gm_cbf": [40.0, 70.0],  # per-phantom GM CBF mean range (ml/100g/min)
    "wm_cbf": [15.0, 30.0],  # WM CBF mean range
    "csf_cbf": [0.0, 2.0],  # CSF CBF (no perfusion)
    "gm_att_ms": [800.0, 1600.0],  # GM ATT mean range
    "wm_att_ms": [1200.0, 2400.0],  # WM ATT mean range (longer, watershed)
    "csf_att_ms": [1500.0, 2500.0],  # value used only where CSF carries residual flow
    "cbf_field_rel": 0.2,  # amplitude of the smooth multiplicative CBF variation (±)
    "att_gradient_ms": 300.0,  # amplitude of a smooth ATT gradient across the slice
    "att_field_ms": 150.0,  # amplitude of a smooth ATT variation
    "field_sigma_px": 6.0,  # smoothness of the within-tissue fields (at 64 px; scaled with size)
    "pixel_jitter_rel": 0.03,  # per-pixel CBF jitter (relative), ATT jitter is 30 ms × this / 0.03
    "p_tumor": 0.25,  # probability of a tumour in a phantom
    "p_stroke": 0.25,  # probability of a stroke in a phantom
    "tumor_rim_cbf": [70.0, 140.0],
    "tumor_core_cbf": [5.0, 25.0],
    "tumor_att_ms": [700.0, 1500.0],
    "stroke_core_cbf": [0.0, 10.0],
    "stroke_core_att_ms": [2500.0, 3800.0],
    "stroke_penumbra_cbf": [10.0, 25.0],
    "stroke_penumbra_att_ms": [2000.0, 3000.0],
    "lesion_radius_frac": [0.08, 0.2],  # lesion radius as a fraction of the image side
}

# Ranges are centred on the nominal physics (asl.physics.PHYSICS_DEFAULTS) with the original's widths: the
# original drew T1b from 1550-2150 ms and α_BS1 from 0.85-1.0 around a nominal 1650 ms / 1.0, so that
# "nominal-physics LS" was biased by construction (α_BS1^4 alone averaged 0.76 instead of 1).
RANDOMIZATION_DEFAULTS = {
    "enabled": True,  # per-phantom physics draw (reaches the simulated signals)
    "t1_blood_ms": [1350.0, 1950.0],  # nominal 1650 ± 300 (the original's 600 ms width)
    "alpha_pcasl": [0.75, 0.95],
    "alpha_vsasl": [0.41, 0.71],
    "alpha_bs1": [0.90, 1.0],
    "tau_rel": [0.9, 1.1],  # τ multiplied by this
    "m0_scale": [0.9, 1.1],  # M0 calibration error (multiplies ΔM/M0)
    "pld_offset_ms": [0.0, 0.0],  # slice-timing delay added to all PLDs (exp 13: e.g. [0, 150])
    "motion_shift_px": 0.0,  # std of a random sub-pixel shift per channel (misregistration; exp 13)
}
RANDOMIZED = ("t1_blood_ms", "alpha_pcasl", "alpha_vsasl", "alpha_bs1", "tau_rel", "m0_scale", "pld_offset_ms")


# ------------------------------------------------------------------------------------------ helpers
def _smooth_field(rng: np.random.Generator, size: int, sigma_px: float) -> np.ndarray:
    """Zero-mean, unit-max-abs smooth random field (Gaussian-filtered white noise)."""
    field = ndimage.gaussian_filter(rng.standard_normal((size, size)), sigma_px, mode="reflect")
    return field / max(np.abs(field).max(), 1e-12)


def _uniform(rng: np.random.Generator, lo_hi) -> float:
    lo, hi = float(lo_hi[0]), float(lo_hi[1])
    return float(rng.uniform(lo, hi)) if hi > lo else lo


def _anatomical_labels(rng: np.random.Generator, size: int, cfg: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """Hard labels (0 bg, 1 GM, 2 WM, 3 CSF) of a brain-like slice and the brain mask."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    cy, cx = size / 2 + rng.normal(0, size * 0.02), size / 2 + rng.normal(0, size * 0.02)
    ry, rx = size * rng.uniform(0.38, 0.46), size * rng.uniform(0.32, 0.42)
    r = np.sqrt(((yy - cy) / ry) ** 2 + ((xx - cx) / rx) ** 2)
    scale = size / 64.0
    r_warp = r * (1 + 0.05 * _smooth_field(rng, size, 8 * scale))
    mask = r_warp < 1.0
    # Cortical ribbon: inner boundary folded by a finer field (gyri), thickness 10-20 % of the radius.
    fold = _smooth_field(rng, size, 2.5 * scale)
    inner = rng.uniform(0.78, 0.86) + 0.08 * fold
    labels = np.where(mask, 2, 0)
    labels[mask & (r_warp >= inner)] = 1
    # Sulcal CSF: thin outer parts of the ribbon where the fold field is low.
    labels[mask & (r_warp >= 0.93) & (fold < -0.3)] = 3
    # Deep GM nuclei: two blobs lateral to the midline.
    for side in (-1, 1):
        ny, nx = cy + rng.normal(0, 0.03) * ry, cx + side * rng.uniform(0.25, 0.35) * rx
        rad = rng.uniform(0.12, 0.18)
        labels[mask & ((((yy - ny) / ry) ** 2 + ((xx - nx) / rx) ** 2) < rad**2)] = 1
    # Ventricles: two small ellipses near the centre.
    for side in (-1, 1):
        vy, vx = cy - rng.uniform(0.0, 0.1) * ry, cx + side * rng.uniform(0.06, 0.12) * rx
        ay, ax = rng.uniform(0.15, 0.3) * ry, rng.uniform(0.04, 0.08) * rx
        labels[mask & ((((yy - vy) / ay) ** 2 + ((xx - vx) / ax) ** 2) < 1.0)] = 3
    return labels, mask


def _voronoi_labels(rng: np.random.Generator, size: int, cfg: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """The original's partition: Voronoi regions (15-30 seeds) labelled GM/WM/CSF with p 0.5/0.4/0.1."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    r = np.sqrt(((yy - size / 2) / (0.45 * size)) ** 2 + ((xx - size / 2) / (0.4 * size)) ** 2)
    mask = r * (1 + 0.05 * _smooth_field(rng, size, 8 * size / 64)) < 1.0
    lo, hi = cfg["voronoi_seeds"]
    n = int(rng.integers(int(lo), int(hi) + 1))
    seeds = rng.uniform(0, size, size=(n, 2))
    dist = (yy[..., None] - seeds[:, 0]) ** 2 + (xx[..., None] - seeds[:, 1]) ** 2
    region = dist.argmin(axis=-1)
    region_label = rng.choice([1, 2, 3], size=n, p=[0.5, 0.4, 0.1])
    return np.where(mask, region_label[region], 0), mask


def _lesion(rng: np.random.Generator, size: int, mask: np.ndarray, cfg: Mapping) -> tuple[np.ndarray, np.ndarray]:
    """A smooth-edged blob inside the brain: (weight in [0,1], normalized radius r/R)."""
    inside = np.argwhere(mask)
    cy, cx = inside[rng.integers(len(inside))]
    radius = size * _uniform(rng, cfg["lesion_radius_frac"])
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    aspect = rng.uniform(0.7, 1.3)
    rr = np.sqrt(((yy - cy) / (radius * aspect)) ** 2 + ((xx - cx) / (radius / aspect)) ** 2)
    rr = rr * (1 + 0.15 * _smooth_field(rng, size, 3 * size / 64))
    weight = np.clip((1.15 - rr) / 0.3, 0.0, 1.0) * mask
    return weight, rr


# ------------------------------------------------------------------------------------------ phantom
def generate_phantom(seed: int, cfg: Mapping) -> dict:
    """One 2D phantom as float32 numpy maps (deterministic from ``seed``).

    Returns cbf (ml/100g/min), att_ms, mask (bool brain), label (LABELS; pathology where the lesion
    weight > 0.5, else the dominant tissue), gm/wm/csf fractions.
    """
    rng = np.random.default_rng(seed)
    size = int(cfg["size"])
    scale = size / 64.0
    if rng.uniform() < float(cfg["voronoi_fraction"]):
        hard, mask = _voronoi_labels(rng, size, cfg)
    else:
        hard, mask = _anatomical_labels(rng, size, cfg)
    fractions = []
    for lab in (1, 2, 3):
        frac = ndimage.gaussian_filter((hard == lab).astype(np.float64), cfg["partial_volume_sigma_px"] * scale)
        fractions.append(frac)
    fractions = np.stack(fractions) * mask
    fractions /= np.maximum(fractions.sum(axis=0), 1e-12)
    fractions *= mask

    sigma_f = float(cfg["field_sigma_px"]) * scale
    jitter = float(cfg["pixel_jitter_rel"])
    cbf_t, att_t = [], []
    gradient_dir = rng.uniform(0, 2 * math.pi)
    yy, xx = np.mgrid[0:size, 0:size] / size - 0.5
    gradient = (np.cos(gradient_dir) * xx + np.sin(gradient_dir) * yy) * 2  # in [-1, 1]
    for name in ("gm", "wm", "csf"):
        cbf_mean = _uniform(rng, cfg[f"{name}_cbf"])
        att_mean = _uniform(rng, cfg[f"{name}_att_ms"])
        cbf_map = cbf_mean * (1 + float(cfg["cbf_field_rel"]) * _smooth_field(rng, size, sigma_f))
        cbf_map *= 1 + jitter * rng.standard_normal((size, size))
        att_map = (att_mean + float(cfg["att_gradient_ms"]) * gradient
                   + float(cfg["att_field_ms"]) * _smooth_field(rng, size, sigma_f)
                   + 30.0 * (jitter / 0.03 if jitter > 0 else 0.0) * rng.standard_normal((size, size)))
        cbf_t.append(np.clip(cbf_map, 0, None))
        att_t.append(att_map)
    cbf_t, att_t = np.stack(cbf_t), np.stack(att_t)

    cbf_t *= _uniform(rng, cfg["cbf_global_scale"])
    lesion_weight = np.zeros((size, size))
    for kind in ("tumor", "stroke"):
        if rng.uniform() >= float(cfg[f"p_{kind}"]) or not mask.any():
            continue
        weight, rr = _lesion(rng, size, mask, cfg)
        if kind == "tumor":
            rim = _uniform(rng, cfg["tumor_rim_cbf"])
            core = _uniform(rng, cfg["tumor_core_cbf"])
            # Enhancing rim (r/R ≈ 0.6-1) around a low-flow core.
            les_cbf = core + (rim - core) * np.clip((rr - 0.3) / 0.4, 0, 1)
            les_att = np.full_like(rr, _uniform(rng, cfg["tumor_att_ms"]))
        else:
            c_cbf, p_cbf = _uniform(rng, cfg["stroke_core_cbf"]), _uniform(rng, cfg["stroke_penumbra_cbf"])
            c_att, p_att = _uniform(rng, cfg["stroke_core_att_ms"]), _uniform(rng, cfg["stroke_penumbra_att_ms"])
            core_w = np.clip((0.6 - rr) / 0.2, 0, 1)
            les_cbf = core_w * c_cbf + (1 - core_w) * p_cbf
            les_att = core_w * c_att + (1 - core_w) * p_att
        les_cbf = les_cbf * (1 + 0.5 * jitter * rng.standard_normal((size, size)))
        # Blend the lesion into all tissue compartments (lesions replace tissue values).
        cbf_t = cbf_t * (1 - weight) + np.clip(les_cbf, 0, None) * weight
        att_t = att_t * (1 - weight) + les_att * weight
        lesion_weight = np.maximum(lesion_weight, weight)

    flow = fractions * cbf_t
    cbf = flow.sum(axis=0)
    att = np.where(cbf > 1e-6, (flow * att_t).sum(axis=0) / np.maximum(cbf, 1e-6), (fractions * att_t).sum(axis=0))
    cbf = np.clip(cbf, 0.0, 200.0) * mask
    att = np.clip(att, 300.0, 3900.0)
    att = np.where(mask, att, 0.0)
    label = np.where(mask, fractions.argmax(axis=0) + 1, 0)
    label[(lesion_weight > 0.5) & mask] = LABELS["pathology"]
    return {"cbf": cbf.astype(np.float32), "att": att.astype(np.float32), "mask": mask,
            "label": label.astype(np.int64), "gm": fractions[0].astype(np.float32),
            "wm": fractions[1].astype(np.float32), "csf": fractions[2].astype(np.float32)}


# ------------------------------------------------------------------------------------------ physics
def physics_params_from_uniforms(u: torch.Tensor, physics: Mapping, rand: Mapping, width: float = 1.0) -> dict:
    """Per-phantom physics from uniforms ``u`` (B, len(RANDOMIZED)) in [0, 1).

    value = nominal + width·(draw − nominal), draw uniform in the configured range: ``width`` 0 gives the
    nominal physics, 1 the full randomization (curriculum). Disabled randomization → nominal.
    Returns tensors (B,) for signal_curves params (tau_ms, not tau_rel).
    """
    nominal = {"t1_blood_ms": physics["t1_blood_ms"], "alpha_pcasl": physics["alpha_pcasl"],
               "alpha_vsasl": physics["alpha_vsasl"], "alpha_bs1": physics["alpha_bs1"], "tau_rel": 1.0,
               "m0_scale": 1.0, "pld_offset_ms": 0.0}
    if not rand["enabled"]:
        width = 0.0
    out = {}
    for i, name in enumerate(RANDOMIZED):
        lo, hi = (float(v) for v in rand[name])
        draw = lo + u[:, i] * (hi - lo)
        out[name] = nominal[name] + width * (draw - nominal[name])
    out["tau_ms"] = out.pop("tau_rel") * float(physics["tau_ms"])
    return out


def simulate_clean(cbf: torch.Tensor, att: torch.Tensor, physics: Mapping, params: Mapping | None) -> torch.Tensor:
    """Noise-free ΔM/M0 images (B, C, H, W) from maps (B, H, W) and per-phantom params (B,)."""
    p = None if params is None else {k: v.to(cbf)[:, None, None] for k, v in params.items()}
    return signal_curves(cbf, att, physics, p).permute(0, 3, 1, 2).contiguous()


def add_noise(clean: torch.Tensor, sigma: torch.Tensor, kind: str = "gaussian",
              generator: torch.Generator | None = None) -> torch.Tensor:
    """Gaussian: clean + σ·n. Rician: |clean + σ(n1 + i n2)| (magnitude data). σ: (B,) or scalar."""
    sigma = torch.as_tensor(sigma, dtype=clean.dtype, device=clean.device)
    if sigma.ndim == 1:
        sigma = sigma[:, None, None, None]
    n1 = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
    if kind == "gaussian":
        return clean + sigma * n1
    if kind == "rician":
        n2 = torch.randn(clean.shape, generator=generator, device=clean.device, dtype=clean.dtype)
        return torch.sqrt((clean + sigma * n1) ** 2 + (sigma * n2) ** 2)
    raise ValueError(f"noise kind must be 'gaussian' or 'rician', got {kind!r}")


def motion_shift(images: torch.Tensor, shift_std_px: float, generator: torch.Generator | None = None) -> torch.Tensor:
    """Misregistration between PLD volumes: each channel translated by a random sub-pixel shift."""
    if shift_std_px <= 0:
        return images
    b, c, h, w = images.shape
    shifts = torch.randn((b * c, 2), generator=generator, device=images.device, dtype=images.dtype) * shift_std_px
    theta = torch.zeros((b * c, 2, 3), device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = theta[:, 1, 1] = 1.0
    theta[:, 0, 2] = shifts[:, 0] * 2 / w
    theta[:, 1, 2] = shifts[:, 1] * 2 / h
    grid = F.affine_grid(theta, (b * c, 1, h, w), align_corners=False)
    out = F.grid_sample(images.reshape(b * c, 1, h, w), grid, align_corners=False, padding_mode="border")
    return out.reshape(b, c, h, w)


def snr_from_uniform(u: torch.Tensor, snr_range, snr_values=None) -> torch.Tensor:
    """Training SNR per phantom: log-uniform in ``snr_range`` or uniform over the list ``snr_values``."""
    if snr_values:
        values = torch.as_tensor(list(snr_values), dtype=u.dtype, device=u.device)
        idx = (u * len(values)).long().clamp(0, len(values) - 1)
        return values[idx]
    lo, hi = math.log(float(snr_range[0])), math.log(float(snr_range[1]))
    return torch.exp(lo + u * (hi - lo))


# ------------------------------------------------------------------------------------- training data
def item_seed(base_seed: int, index: int) -> int:
    return int(np.random.SeedSequence([int(base_seed) & 0xFFFFFFFF, int(index)]).generate_state(1)[0])


class PhantomDataset(Dataset):
    """On-the-fly phantoms. Item ``i`` is the anatomy of phantom ``seed(base_seed, i)`` plus uniforms for its
    physics and SNR draws; physics, signals and noise are applied batched on the device by the trainer.

    Indices may exceed ``len``: :class:`EpochSampler` hands out ``epoch·n + i`` so every epoch sees new
    phantoms. Module-level and picklable (spawn workers).
    """

    def __init__(self, n_per_epoch: int, base_seed: int, phantom_cfg: Mapping):
        self.n = int(n_per_epoch)
        self.base_seed = int(base_seed)
        self.cfg = dict(phantom_cfg)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> dict:
        seed = item_seed(self.base_seed, index)
        ph = generate_phantom(seed, self.cfg)
        u = np.random.default_rng(seed + 1).uniform(size=len(RANDOMIZED) + 1)
        return {"cbf": torch.from_numpy(ph["cbf"]), "att": torch.from_numpy(ph["att"]),
                "mask": torch.from_numpy(ph["mask"]), "label": torch.from_numpy(ph["label"]),
                "u_phys": torch.from_numpy(u[:-1].astype(np.float32)),
                "u_snr": torch.tensor(float(u[-1]), dtype=torch.float32)}


class EpochSampler(Sampler):
    """Indices ``epoch·n + i`` of this rank's shard (i ≡ rank mod world): new phantoms every epoch,
    disjoint across DDP ranks, and exactly reproducible on resume (depends only on epoch)."""

    def __init__(self, n_per_epoch: int, rank: int = 0, world_size: int = 1):
        self.n, self.rank, self.world = int(n_per_epoch), int(rank), int(world_size)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __iter__(self):
        start = self.epoch * self.n
        return iter(range(start + self.rank, start + self.n, self.world))

    def __len__(self) -> int:
        return len(range(self.rank, self.n, self.world))


# --------------------------------------------------------------------------------- fixed eval sets
def build_fixed_set(n: int, seed: int, phantom_cfg: Mapping, physics: Mapping, rand: Mapping,
                    snrs, noise_kind: str = "gaussian") -> dict:
    """A saved evaluation set: anatomy, per-phantom true physics, clean signals and one fixed noise
    realization per SNR. Arrays: cbf/att/mask/label/gm/wm (n,H,W), clean (n,C,H,W) float32,
    noisy (n_snr,n,C,H,W), snrs (n_snr,), sigma (n_snr,), params_<name> (n,)."""
    items = [generate_phantom(item_seed(seed, i), phantom_cfg) for i in range(int(n))]
    stack = {k: np.stack([it[k] for it in items]) for k in ("cbf", "att", "mask", "label", "gm", "wm")}
    u = torch.from_numpy(np.random.default_rng([int(seed), 7]).uniform(size=(int(n), len(RANDOMIZED))))
    params = physics_params_from_uniforms(u, physics, rand, 1.0)
    cbf = torch.from_numpy(stack["cbf"]).double()
    att = torch.from_numpy(stack["att"]).double()
    clean = simulate_clean(cbf, att, physics, params)
    gen = torch.Generator().manual_seed(int(seed) + 99)
    shift = float(rand.get("motion_shift_px", 0.0)) if rand["enabled"] else 0.0
    noisy, sigmas = [], []
    for snr in snrs:
        sigma = noise_sigma(float(snr), physics)
        moved = motion_shift(clean, shift, gen)
        noisy.append(add_noise(moved, torch.full((int(n),), sigma, dtype=torch.float64), noise_kind, gen))
        sigmas.append(sigma)
    out = {**stack, "clean": clean.float().numpy(), "noisy": torch.stack(noisy).float().numpy(),
           "snrs": np.asarray(snrs, dtype=np.float64), "sigma": np.asarray(sigmas, dtype=np.float64)}
    out.update({f"params_{k}": v.numpy() for k, v in params.items()})
    return out


def save_fixed_set(path: str | Path, data: Mapping, meta: Mapping) -> Path:
    """npz with the arrays plus ``meta_json`` (physics, phantom config, noise kind), written atomically."""
    import json

    return save_npz_atomic(path, meta_json=np.asarray(json.dumps(dict(meta))), **dict(data))


class PhantomSetError(InputError):
    """A saved phantom set that is missing, damaged, or not the one the run needs; names the file and field."""


PHANTOM_SET_FIELDS = ("cbf", "att", "mask", "label", "noisy", "snrs", "sigma", "meta_json")


def load_fixed_set(path: str | Path) -> tuple[dict, dict]:
    """(arrays, meta) of a set written by :func:`save_fixed_set`; a clear error names a missing field."""
    import json

    path = Path(path)
    if not path.is_file():
        raise PhantomSetError("phantom set not found (run preprocess_asl.py first)", path)
    data = load_npz(path)  # a truncated or foreign file is an InputError naming it
    for key in PHANTOM_SET_FIELDS:
        if key not in data:
            raise PhantomSetError(f"field '{key}' is missing; not a phantom set written by preprocess_asl.py", path)
    meta = json.loads(str(data.pop("meta_json")))
    return data, meta


def params_of(data: Mapping, index=slice(None)) -> dict:
    """The true per-phantom physics stored in a fixed set, as tensors (selected by ``index``)."""
    return {k[len("params_"):]: torch.as_tensor(np.asarray(v)[index]) for k, v in data.items() if k.startswith("params_")}
