"""Random scenes for the simulated data set: lenses and (non-trivial) non-lenses.

Every scene has a lens galaxy (Sérsic, early-type colours). Kinds:
- ``lens`` (label 1): SIE + external shear and a lensed Sérsic source (star-forming colours) placed within
  ``source_offset_max`` θ_E of the lens, so most produce 2-4 images; a fraction also has neighbours.
- ``galaxy`` (label 0): the lens galaxy alone.
- ``galaxy+neighbours`` (label 0): 1-3 unlensed neighbours, often blue and elongated tangentially around
  the galaxy (arc-like confusers), at 0.6-2.5 θ_E-like distances, with source-like magnitudes.
So colour, faint blue structure or elongation alone does not identify a lens.

Optional confusers (``confuser_fraction`` > 0; off by default, and then not a single extra random number
is drawn, so data sets of earlier versions are reproduced): that share of the non-lenses gets one of
CONFUSER_KINDS, built from the same Sérsic components (``CONFUSER_KNOTS`` extra neighbour slots):
- ``ring``: 6-8 blue star-forming knots on an ellipse at 0.6-1.6 × (half-light-radius-scaled) radius, the
  arc-like structure of a ring galaxy or a collisional ring;
- ``spiral``: knots along two logarithmic arms (pitch 12-25°), blue;
- ``pair``: a second early-type galaxy 0.3-1.2" from the centre, about 0-1.5 mag fainter (close pair / merger);
- ``edge_on``: the central galaxy becomes a disc (Sérsic n 0.8-1.5, axis ratio 0.1-0.25) with a dusty-blue
  colour.
Their ``sim_kind`` is ``galaxy+<kind>``.

Optional realism (each off at 0, and then, like the confusers, draws nothing, so earlier data sets are
reproduced; drawn after the confusers, in this order):
- ``source_knots_max`` > 0: every lensed source gets 0-``source_knots_max`` extra lensed components
  (``source_knots`` [B, K]): compact star-forming knots (R 0.02-0.12", Sérsic n 0.5-1.5, bluer than the
  disc by 0-0.3 mag per band step) scattered within 2 R_sersic of the source centre, holding 10-60 % of the
  source flux, and with probability 1/2 slot 0 is a second, broader offset disc (R 0.5-1.5 × the source's),
  so sources are clumpy, multi-component and irregular rather than one smooth Sérsic.
- ``los_companions_max`` > 0: 0-``los_companions_max`` line-of-sight galaxies anywhere in the cutout, in
  front of or behind the lens (unlensed, in ``neighbours``), any colour (early-type or star-forming with
  scatter), magnitudes from ``neighbour_mag_range``, sizes 0.1-0.8"; lenses and non-lenses alike.

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
CONFUSER_KINDS = ("ring", "spiral", "pair", "edge_on")
CONFUSER_KNOTS = 8  # extra neighbour slots used by the confusers


@dataclass
class PopulationConfig:
    lens_fraction: float = 0.5
    nonlens_neighbour_fraction: float = 0.5  # of non-lenses, the share with neighbours
    lens_neighbour_fraction: float = 0.3  # of lenses, the share that also has neighbours
    theta_E_range_arcsec: tuple[float, float] = (0.5, 2.0)
    # optional explicit cap: θ_E ≤ this × half the cutout width (None = draw from theta_E_range_arcsec as
    # configured); when it truncates the configured range, simulate_data logs a WARNING with the range drawn
    theta_E_max_fov_fraction: float | None = None
    lens_mag_range: tuple[float, float] = (19.0, 22.5)
    source_mag_range: tuple[float, float] = (21.5, 25.0)
    neighbour_mag_range: tuple[float, float] = (21.0, 25.0)
    source_offset_max: float = 0.9  # source centre within this × θ_E of the lens centre
    shear_sigma: float = 0.03
    confuser_fraction: float = 0.0  # of non-lenses, the share with a ring / spiral / pair / edge-on confuser
    source_knots_max: int = 0  # extra lensed components per source (star-forming knots, a second disc)
    los_companions_max: int = 0  # unlensed line-of-sight galaxies anywhere in the cutout
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
        if known.get("theta_E_max_fov_fraction") is not None:
            cap = float(known["theta_E_max_fov_fraction"])
            if not cap > 0:
                raise ValueError(f"simulate.population.theta_E_max_fov_fraction must be > 0 or null, got {cap}")
            known["theta_E_max_fov_fraction"] = cap
        return cls(**known)


def theta_e_range(cfg: PopulationConfig, survey: Survey, n_pix: int) -> tuple[float, float, bool]:
    """(low, high, capped): the θ_E range (arcsec) drawn for ``survey`` at ``n_pix``.

    The configured ``theta_E_range_arcsec``, truncated above only when ``theta_E_max_fov_fraction`` is set
    (``capped`` then says whether the cap cut the range). A cap below the configured low end is an error
    naming both keys (never a silent change of the distribution)."""
    lo, hi = cfg.theta_E_range_arcsec
    if cfg.theta_E_max_fov_fraction is None:
        return lo, hi, False
    cap = cfg.theta_E_max_fov_fraction * 0.5 * n_pix * survey.pixel_scale_arcsec
    if cap < lo:
        raise ValueError(f"simulate.population.theta_E_max_fov_fraction {cfg.theta_E_max_fov_fraction} caps theta_E at "
                         f"{cap:.3g}\" for {survey.name} at {n_pix} px, below theta_E_range_arcsec's low end {lo}: "
                         "raise n_pix or the fraction, or lower the range")
    return lo, min(hi, cap), cap < hi


def _ellipticity(rng, n, q_low, q_high, phi=None):
    q = rng.uniform(q_low, q_high, n)
    phi = rng.uniform(0, math.pi, n) if phi is None else phi
    e1, e2 = phi_q_to_ellipticity(phi, q)
    return e1, e2, q, phi


def _amp(mag, zero_point, r_sersic, n_sersic):
    """Sérsic amp (counts/s/arcsec² at R_sersic) of total magnitude ``mag``."""
    flux = 10 ** (-0.4 * (mag - zero_point))
    return flux / sersic_total_flux(1.0, r_sersic, n_sersic)


def _mixed_colours(rng: np.random.Generator, survey: Survey, ref: int, shape: tuple, blue_fraction: float,
                   scatter_mag: float) -> np.ndarray:
    """Colours (mag relative to the reference band, ``shape`` + (bands,)) of field galaxies: a share
    ``blue_fraction`` with source-like (star-forming) colours, the rest lens-like (red), each scattered."""
    blue = rng.uniform(0, 1, shape) < blue_fraction
    base = np.where(blue[..., None], np.array([SOURCE_COLOURS.get(b, 0.0) for b in survey.bands]),
                    np.array([LENS_COLOURS.get(b, 0.0) for b in survey.bands]))
    colour = base + rng.normal(0, scatter_mag, (*shape, len(survey.bands)))
    colour[..., ref] = 0.0
    return colour


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

    # mass: SIE aligned with the light (scatter), θ_E ~ U(configured range; explicit cap only), external shear
    te_lo, te_hi, _ = theta_e_range(cfg, survey, n_pix)
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
    nb_colour = _mixed_colours(rng, survey, ref, (n, k), blue_fraction=0.7, scatter_mag=0.15)
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
    sim_kind = np.array(KINDS)[kind]
    if cfg.confuser_fraction > 0:  # drawn after everything else: without confusers the stream is unchanged
        params, sim_kind = _add_confusers(params, sim_kind, is_lens, survey, cfg, rng, dtype, half_fov)
    if cfg.source_knots_max > 0:
        params = dict(params, source_knots=_source_knots(params["source"], is_lens, survey, cfg, rng, dtype))
    if cfg.los_companions_max > 0:
        params = _add_los_companions(params, survey, cfg, rng, dtype, half_fov)
    z_lens = rng.uniform(0.2, 0.9, n)
    z_err = 0.05 * (1 + z_lens)
    meta = {
        "sim_kind": sim_kind,
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


def _add_confusers(params: dict, sim_kind: np.ndarray, is_lens: np.ndarray, survey: Survey, cfg: PopulationConfig,
                   rng: np.random.Generator, dtype, half_fov: float) -> tuple[dict, np.ndarray]:
    """Give ``cfg.confuser_fraction`` of the non-lenses a ring, spiral arms, a close companion or an edge-on
    disc (module docstring); appends CONFUSER_KNOTS neighbour slots to every scene (zero amplitude where
    unused) so one batched render call still serves all scenes."""
    n, n_bands = len(is_lens), len(survey.bands)
    zp = np.array(survey.zero_point_mag)
    ref = survey.band_index(survey.reference_band)
    k = CONFUSER_KNOTS
    chosen = (~is_lens) & (rng.uniform(0, 1, n) < cfg.confuser_fraction)
    which = rng.integers(0, len(CONFUSER_KINDS), n)
    ring, spiral = chosen & (which == 0), chosen & (which == 1)
    pair, edge_on = chosen & (which == 2), chosen & (which == 3)
    light = params["lens_light"]
    cx, cy = light["center_x"].double().numpy(), light["center_y"].double().numpy()
    scale = np.clip(half_fov / 3.0, 0.3, 1.0)
    # ring: knots on an ellipse; spiral: knots along two log arms r = r0·exp(t·tan(pitch))
    radius = rng.uniform(0.6, 1.6, n) * scale
    ell_q = rng.uniform(0.6, 1.0, n)
    ell_phi = rng.uniform(0, math.pi, n)
    t = np.linspace(0, 2 * math.pi, k, endpoint=False)[None, :] + rng.uniform(0, 2 * math.pi, (n, 1))
    t = t + rng.normal(0, 0.15, (n, k))
    ring_x, ring_y = radius[:, None] * np.cos(t), radius[:, None] * ell_q[:, None] * np.sin(t)
    pitch = np.radians(rng.uniform(12, 25, n))
    arm = np.arange(k)[None, :] % 2
    s_param = np.tile(np.linspace(0, 1.6, k // 2 + k % 2), 2)[None, :k]
    s_param = np.sort(s_param, axis=1)
    r_sp = 0.35 * scale * np.exp(s_param * math.tau * np.tan(pitch)[:, None] / 2)
    ang = s_param * math.pi * 1.4 + arm * math.pi + rng.uniform(0, 2 * math.pi, (n, 1))
    sp_x, sp_y = r_sp * np.cos(ang), r_sp * np.sin(ang) * ell_q[:, None]
    rot_c, rot_s = np.cos(ell_phi)[:, None], np.sin(ell_phi)[:, None]
    kx = np.where(ring[:, None], ring_x, sp_x)
    ky = np.where(ring[:, None], ring_y, sp_y)
    kx, ky = cx[:, None] + kx * rot_c - ky * rot_s, cy[:, None] + kx * rot_s + ky * rot_c
    n_knots = np.where(ring, rng.integers(6, k + 1, n), np.where(spiral, k, 0))
    knot_present = np.arange(k)[None, :] < n_knots[:, None]
    knot_r = rng.uniform(0.04, 0.15, (n, k))
    knot_n = rng.uniform(0.8, 1.5, (n, k))
    ke1, ke2 = phi_q_to_ellipticity(rng.uniform(0, math.pi, (n, k)), rng.uniform(0.5, 1.0, (n, k)))
    total_mag = rng.uniform(*cfg.source_mag_range, n) - 0.5
    knot_mag = total_mag[:, None] + 2.5 * np.log10(np.maximum(n_knots, 1))[:, None] + rng.normal(0, 0.3, (n, k))
    colour = np.array([SOURCE_COLOURS.get(b, 0.0) for b in survey.bands])[None, None, :] \
        + rng.normal(0, 0.15, (n, k, n_bands))
    colour[..., ref] = 0.0
    knot_amp = _amp(knot_mag[..., None] + colour, zp, knot_r[..., None], knot_n[..., None]) * knot_present[..., None]
    # pair: slot 0 holds a second early-type galaxy instead of a knot
    pd_ = rng.uniform(0.3, 1.2, n)
    pa = rng.uniform(0, 2 * math.pi, n)
    lens_r = light["R_sersic"].double().numpy()
    pair_r, pair_n = lens_r * rng.uniform(0.5, 1.0, n), rng.uniform(2.5, 5.0, n)
    pe1, pe2 = phi_q_to_ellipticity(rng.uniform(0, math.pi, n), rng.uniform(0.6, 1.0, n))
    lens_amp = light["amp"].double().numpy()
    pair_amp = lens_amp * 10 ** (-0.4 * rng.uniform(0.0, 1.5, n))[:, None] * (lens_r / pair_r)[:, None] ** 2
    slot0 = pair
    kx[:, 0] = np.where(slot0, cx + pd_ * np.cos(pa), kx[:, 0])
    ky[:, 0] = np.where(slot0, cy + pd_ * np.sin(pa), ky[:, 0])
    knot_r[:, 0] = np.where(slot0, pair_r, knot_r[:, 0])
    knot_n[:, 0] = np.where(slot0, pair_n, knot_n[:, 0])
    ke1[:, 0], ke2[:, 0] = np.where(slot0, pe1, ke1[:, 0]), np.where(slot0, pe2, ke2[:, 0])
    knot_amp[:, 0] = np.where(slot0[:, None], pair_amp, knot_amp[:, 0])
    knot_amp = knot_amp * (ring | spiral | pair)[:, None, None]
    # edge-on disc: the central galaxy itself, same total flux in the reference band
    q_disc, n_disc = rng.uniform(0.1, 0.25, n), rng.uniform(0.8, 1.5, n)
    de1, de2 = phi_q_to_ellipticity(rng.uniform(0, math.pi, n), q_disc)
    disc_colour = 10 ** (-0.4 * rng.normal(-0.3, 0.1, (n, n_bands)))
    disc_colour[:, ref] = 1.0
    old_n = light["n_sersic"].double().numpy()
    flux = sersic_total_flux(lens_amp, lens_r[:, None], old_n[:, None])
    disc_amp = flux / sersic_total_flux(1.0, lens_r[:, None], n_disc[:, None]) * disc_colour
    t_ = lambda a: torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=dtype)  # noqa: E731
    light = dict(light)
    light["amp"] = t_(np.where(edge_on[:, None], disc_amp, lens_amp))
    light["n_sersic"] = t_(np.where(edge_on, n_disc, old_n))
    light["e1"] = t_(np.where(edge_on, de1, light["e1"].double().numpy()))
    light["e2"] = t_(np.where(edge_on, de2, light["e2"].double().numpy()))
    nb = params["neighbours"]
    extra = {"amp": knot_amp, "R_sersic": knot_r, "n_sersic": knot_n, "e1": ke1, "e2": ke2, "center_x": kx,
             "center_y": ky}
    params = dict(params, lens_light=light,
                  neighbours={key: torch.cat([nb[key], t_(extra[key])], dim=1) for key in nb})
    kinds = np.where(chosen, np.char.add("galaxy+", np.array(CONFUSER_KINDS)[which]), sim_kind)
    return params, kinds


def _tensor(a, dtype) -> torch.Tensor:
    return torch.as_tensor(np.asarray(a, dtype=np.float64), dtype=dtype)


def _source_knots(source: dict, is_lens: np.ndarray, survey: Survey, cfg: PopulationConfig,
                  rng: np.random.Generator, dtype) -> dict:
    """Extra lensed components [B, K = source_knots_max] of each lensed source (module docstring)."""
    n, k, n_bands = len(is_lens), int(cfg.source_knots_max), len(survey.bands)
    ref = survey.band_index(survey.reference_band)
    src = {key: value.double().numpy() for key, value in source.items()}
    n_knots = np.where(is_lens, rng.integers(0, k + 1, n), 0)
    present = np.arange(k)[None, :] < n_knots[:, None]
    src_r = src["R_sersic"][:, None]
    dist = 2.0 * src_r * np.sqrt(rng.uniform(0, 1, (n, k)))
    angle = rng.uniform(0, 2 * math.pi, (n, k))
    knot_x = src["center_x"][:, None] + dist * np.cos(angle)
    knot_y = src["center_y"][:, None] + dist * np.sin(angle)
    knot_r = rng.uniform(0.02, 0.12, (n, k))
    knot_n = rng.uniform(0.5, 1.5, (n, k))
    ke1, ke2 = phi_q_to_ellipticity(rng.uniform(0, math.pi, (n, k)), rng.uniform(0.5, 1.0, (n, k)))
    # slot 0: half of the time a second, broader disc offset from the first (an irregular / merging source)
    second_disc = rng.uniform(0, 1, n) < 0.5
    knot_r[:, 0] = np.where(second_disc, src["R_sersic"] * rng.uniform(0.5, 1.5, n), knot_r[:, 0])
    knot_n[:, 0] = np.where(second_disc, rng.uniform(0.7, 1.5, n), knot_n[:, 0])
    # flux: the knots together hold a fraction f of the disc's reference-band flux, split at random
    disc_flux = sersic_total_flux(src["amp"], src["R_sersic"][:, None], src["n_sersic"][:, None])  # [B, C]
    fraction = rng.uniform(0.1, 0.6, n)
    share = rng.dirichlet(np.ones(k), n) * present
    share = share / np.maximum(share.sum(axis=1, keepdims=True), 1e-12)
    # star-forming knots are bluer than the disc: Δmag = −b·(band offset from the reference band), b ∈ [0, 0.3]
    band_step = np.arange(n_bands)[None, None, :] - ref
    bluer = 10 ** (0.4 * rng.uniform(0, 0.3, (n, k, 1)) * (-band_step))
    flux = (fraction[:, None, None] * share[..., None]) * disc_flux[:, None, :] * bluer
    amp = flux / sersic_total_flux(1.0, knot_r[..., None], knot_n[..., None]) * present[..., None]
    return {"amp": _tensor(amp, dtype), "R_sersic": _tensor(knot_r, dtype), "n_sersic": _tensor(knot_n, dtype),
            "e1": _tensor(ke1, dtype), "e2": _tensor(ke2, dtype), "center_x": _tensor(knot_x, dtype),
            "center_y": _tensor(knot_y, dtype)}


def _add_los_companions(params: dict, survey: Survey, cfg: PopulationConfig, rng: np.random.Generator, dtype,
                        half_fov: float) -> dict:
    """Append ``los_companions_max`` unlensed neighbour slots: galaxies anywhere in the cutout (docstring)."""
    nb = params["neighbours"]
    n, k = nb["amp"].shape[0], int(cfg.los_companions_max)
    zp = np.array(survey.zero_point_mag)
    ref = survey.band_index(survey.reference_band)
    present = np.arange(k)[None, :] < rng.integers(0, k + 1, n)[:, None]
    x, y = rng.uniform(-half_fov, half_fov, (n, k)), rng.uniform(-half_fov, half_fov, (n, k))
    r = rng.uniform(0.1, 0.8, (n, k))
    sersic_n = rng.uniform(0.7, 4.0, (n, k))
    e1, e2 = phi_q_to_ellipticity(rng.uniform(0, math.pi, (n, k)), rng.uniform(0.3, 1.0, (n, k)))
    mag = rng.uniform(*cfg.neighbour_mag_range, (n, k))
    colour = _mixed_colours(rng, survey, ref, (n, k), blue_fraction=0.5, scatter_mag=0.2)
    amp = _amp(mag[..., None] + colour, zp, r[..., None], sersic_n[..., None]) * present[..., None]
    extra = {"amp": amp, "R_sersic": r, "n_sersic": sersic_n, "e1": e1, "e2": e2, "center_x": x, "center_y": y}
    return dict(params, neighbours={key: torch.cat([nb[key], _tensor(extra[key], dtype)], dim=1) for key in nb})


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
