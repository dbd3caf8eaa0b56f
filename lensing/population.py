"""Random scenes for the simulated data set: lenses and (non-trivial) non-lenses.

Every scene has a lens galaxy (Sérsic, early-type colours). Kinds:
- ``lens`` (label 1): SIE + external shear and a lensed Sérsic source (star-forming colours) placed within
  ``source_offset_max`` θ_E of the lens, so most produce 2-4 images; a fraction also has neighbours.
- ``galaxy`` (label 0): the lens galaxy alone.
- ``galaxy+neighbours`` (label 0): 1-3 unlensed neighbours, often blue and elongated tangentially around
  the galaxy (arc-like confusers), at 0.6-2.5 θ_E-like distances, with source-like magnitudes.
So colour, faint blue structure or elongation alone does not identify a lens.

Magnitudes are converted to Sérsic ``amp`` through the total flux (lensing.profiles.sersic_total_flux) and
the survey zero point. Redshifts are nuisance metadata for stratification (θ_E is drawn directly; no
cosmology): z_lens ~ U(0.2, 0.9), photometric error 0.05(1 + z).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch

from lensing.profiles import phi_q_to_ellipticity, sersic_total_flux
from lensing.surveys import LENS_COLOURS, SOURCE_COLOURS, Survey

KINDS = ("lens", "galaxy", "galaxy+neighbours")
MAX_NEIGHBOURS = 3


@dataclass
class PopulationConfig:
    lens_fraction: float = 0.5
    nonlens_neighbour_fraction: float = 0.5  # of non-lenses, the share with neighbours
    lens_neighbour_fraction: float = 0.3  # of lenses, the share that also has neighbours
    theta_E_range_arcsec: tuple[float, float] = (0.5, 2.0)
    theta_E_max_fov_fraction: float = 0.45  # θ_E ≤ this × half the cutout width
    lens_mag_range: tuple[float, float] = (19.0, 22.5)
    source_mag_range: tuple[float, float] = (21.5, 25.0)
    neighbour_mag_range: tuple[float, float] = (21.0, 25.0)
    source_offset_max: float = 0.9  # source centre within this × θ_E of the lens centre
    shear_sigma: float = 0.03
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, cfg: dict) -> PopulationConfig:
        known = {k: v for k, v in cfg.items() if k in cls.__dataclass_fields__}
        for key in ("theta_E_range_arcsec", "lens_mag_range", "source_mag_range", "neighbour_mag_range"):
            if key in known:
                lo, hi = known[key]
                if not lo <= hi:
                    raise ValueError(f"simulate.{key} must be [low, high] with low <= high, got {known[key]}")
                known[key] = (float(lo), float(hi))
        return cls(**known)


def _ellipticity(rng, n, q_low, q_high, phi=None):
    q = rng.uniform(q_low, q_high, n)
    phi = rng.uniform(0, math.pi, n) if phi is None else phi
    e1, e2 = phi_q_to_ellipticity(phi, q)
    return e1, e2, q, phi


def _amp(mag, zero_point, r_sersic, n_sersic):
    """Sérsic amp (counts/s/arcsec² at R_sersic) of total magnitude ``mag``."""
    flux = 10 ** (-0.4 * (mag - zero_point))
    return flux / sersic_total_flux(1.0, r_sersic, n_sersic)


def sample_scenes(n: int, survey: Survey, n_pix: int, cfg: PopulationConfig, rng: np.random.Generator,
                  dtype=torch.float32) -> tuple[dict, dict]:
    """Draw ``n`` scenes for ``survey``. Returns (simulator params of torch tensors, metadata of numpy arrays).

    The params always contain every component (non-lenses get θ_E = 0 and a zero-amplitude source) so one
    batched render call serves all kinds.
    """
    n_bands = len(survey.bands)
    zp = np.array(survey.zero_point_mag)
    ref = survey.band_index(survey.reference_band)
    kind = rng.choice(3, size=n, p=[cfg.lens_fraction, (1 - cfg.lens_fraction) * (1 - cfg.nonlens_neighbour_fraction),
                                    (1 - cfg.lens_fraction) * cfg.nonlens_neighbour_fraction])
    is_lens = kind == 0
    half_fov = 0.5 * n_pix * survey.pixel_scale_arcsec

    # lens galaxy light
    lens_mag = rng.uniform(*cfg.lens_mag_range, n)
    lens_r = rng.uniform(0.4, 1.5, n) * min(1.0, half_fov / 3.0)
    lens_n = rng.uniform(2.5, 5.0, n)
    le1, le2, lens_q, lens_phi = _ellipticity(rng, n, 0.6, 1.0)
    cx, cy = rng.normal(0, 0.05, n), rng.normal(0, 0.05, n)
    lens_colour = np.array([LENS_COLOURS.get(b, 0.0) for b in survey.bands])[None, :] + rng.normal(0, 0.1, (n, n_bands))
    lens_colour[:, ref] = 0.0
    lens_amp = _amp(lens_mag[:, None] + lens_colour, zp[None, :], lens_r[:, None], lens_n[:, None])

    # mass: SIE aligned with the light (scatter), θ_E capped by the field of view, external shear
    te_hi = min(cfg.theta_E_range_arcsec[1], cfg.theta_E_max_fov_fraction * half_fov)
    te_lo = min(cfg.theta_E_range_arcsec[0], te_hi)
    theta_e = np.where(is_lens, rng.uniform(te_lo, te_hi, n), 0.0)
    mass_q = np.clip(lens_q + rng.normal(0, 0.05, n), 0.5, 1.0)
    me1, me2 = phi_q_to_ellipticity(lens_phi + rng.normal(0, math.radians(10), n), mass_q)
    g1, g2 = rng.normal(0, cfg.shear_sigma, n), rng.normal(0, cfg.shear_sigma, n)

    # source (zero amplitude for non-lenses)
    src_mag = rng.uniform(*cfg.source_mag_range, n)
    src_r = rng.uniform(0.1, 0.5, n)
    src_n = rng.uniform(0.7, 2.5, n)
    se1, se2, _, _ = _ellipticity(rng, n, 0.4, 1.0)
    radius = cfg.source_offset_max * np.maximum(theta_e, 1e-3) * np.sqrt(rng.uniform(0, 1, n))
    angle = rng.uniform(0, 2 * math.pi, n)
    sx, sy = cx + radius * np.cos(angle), cy + radius * np.sin(angle)
    src_colour = np.array([SOURCE_COLOURS.get(b, 0.0) for b in survey.bands])[None, :] + rng.normal(0, 0.15, (n, n_bands))
    src_colour[:, ref] = 0.0
    src_amp = _amp(src_mag[:, None] + src_colour, zp[None, :], src_r[:, None], src_n[:, None]) * is_lens[:, None]

    # neighbours: galaxy+neighbours always, lenses sometimes; tangential elongation half of the time
    has_nb = (kind == 2) | (is_lens & (rng.uniform(0, 1, n) < cfg.lens_neighbour_fraction))
    n_nb = np.where(has_nb, rng.integers(1, MAX_NEIGHBOURS + 1, n), 0)
    k = MAX_NEIGHBOURS
    nb_dist = rng.uniform(0.6, 2.5, (n, k)) * np.clip(half_fov / 3.0, 0.3, 1.0)
    nb_angle = rng.uniform(0, 2 * math.pi, (n, k))
    nb_x, nb_y = cx[:, None] + nb_dist * np.cos(nb_angle), cy[:, None] + nb_dist * np.sin(nb_angle)
    tangential = rng.uniform(0, 1, (n, k)) < 0.5
    nb_phi = np.where(tangential, nb_angle + math.pi / 2, rng.uniform(0, math.pi, (n, k)))
    nb_q = np.where(tangential, rng.uniform(0.15, 0.5, (n, k)), rng.uniform(0.4, 1.0, (n, k)))
    ne1, ne2 = phi_q_to_ellipticity(nb_phi, nb_q)
    nb_r = rng.uniform(0.1, 0.5, (n, k))
    nb_n = rng.uniform(0.7, 2.5, (n, k))
    nb_mag = rng.uniform(*cfg.neighbour_mag_range, (n, k))
    blue = rng.uniform(0, 1, (n, k)) < 0.7
    base = np.where(blue[..., None], np.array([SOURCE_COLOURS.get(b, 0.0) for b in survey.bands]),
                    np.array([LENS_COLOURS.get(b, 0.0) for b in survey.bands]))
    nb_colour = base + rng.normal(0, 0.15, (n, k, n_bands))
    nb_colour[..., ref] = 0.0
    present = np.arange(k)[None, :] < n_nb[:, None]
    nb_amp = _amp(nb_mag[..., None] + nb_colour, zp, nb_r[..., None], nb_n[..., None]) * present[..., None]

    t = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=dtype)  # noqa: E731
    params = {
        "lens": {"theta_E": t(theta_e), "e1": t(me1), "e2": t(me2), "center_x": t(cx), "center_y": t(cy)},
        "shear": {"gamma1": t(g1 * is_lens), "gamma2": t(g2 * is_lens)},
        "source": {"amp": t(src_amp), "R_sersic": t(src_r), "n_sersic": t(src_n), "e1": t(se1), "e2": t(se2),
                   "center_x": t(sx), "center_y": t(sy)},
        "lens_light": {"amp": t(lens_amp), "R_sersic": t(lens_r), "n_sersic": t(lens_n), "e1": t(le1),
                       "e2": t(le2), "center_x": t(cx), "center_y": t(cy)},
        "neighbours": {"amp": t(nb_amp), "R_sersic": t(nb_r), "n_sersic": t(nb_n), "e1": t(ne1), "e2": t(ne2),
                       "center_x": t(nb_x), "center_y": t(nb_y)},
    }
    z_lens = rng.uniform(0.2, 0.9, n)
    z_err = 0.05 * (1 + z_lens)
    meta = {
        "sim_kind": np.array(KINDS)[kind],
        "label": is_lens.astype(int),
        "n_neighbours": n_nb,
        "z_spec": z_lens,
        "z_phot": z_lens + rng.normal(0, 1, n) * z_err,
        "z_err": z_err,
        "z_source": np.where(is_lens, z_lens + rng.uniform(0.5, 2.0, n), np.nan),
        "magnitude": lens_mag,
        "source_magnitude": np.where(is_lens, src_mag, np.nan),
        "sersic_index": lens_n,
        "half_light_radius": lens_r,
        "axis_ratio": lens_q,
    }
    return params, meta


def params_to_columns(params: dict, prefix: str = "true_") -> dict:
    """Flatten the lens-model parameters into catalogue columns (``true_theta_E``, ``true_source_R_sersic`` …).

    Per-band amplitudes are left out (they are determined by the magnitudes and colours)."""
    cols = {}
    for group in ("lens", "shear", "source", "lens_light"):
        for key, value in params[group].items():
            if key == "amp":
                continue
            name = key if group in ("lens", "shear") else f"{group}_{key}"
            if group == "lens" and key in ("e1", "e2", "center_x", "center_y"):
                name = f"lens_{key}"
            cols[f"{prefix}{name}"] = value.detach().cpu().double().numpy()
    return cols
