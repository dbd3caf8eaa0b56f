"""Write a simulated data set (lenses and non-lenses of several survey presets) in the data set layout."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from common.config import ConfigError
from common.errors import NothingProcessedError
from common.runlog import progress
from lensing.artefacts import add_artefacts
from lensing.batch_renderer import BatchRenderer
from lensing.catalog import SCHEMA_VERSION, join_bands
from lensing.population import PopulationConfig, params_to_columns, sample_scenes, theta_e_range
from lensing.psf import GaussianPSF
from lensing.simulator import add_noise, variance_map
from lensing.storage import FORMATS, write_array
from lensing.surveys import Survey, get_survey
from lensing.truth import lens_truth

DTYPES = {"float32": torch.float32, "float64": torch.float64}
# torch: this package's simulator; lenstronomy: the same scenes rendered and noised by lenstronomy alone
# (ImageModel per image, Util/image_util noise), written with label_source sim:external, for held-out sets
RENDERERS = ("torch", "lenstronomy")


def observing_conditions(survey: Survey, n: int, seeing_scatter: float, depth_scatter_mag: float,
                         rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per-image PSF FWHM (arcsec), background σ (counts/s per pixel) and total exposure (s), each [n, C].

    Seeing: the preset's FWHM of every band times one factor exp(N(0, ``seeing_scatter``)) per image (the
    atmosphere broadens all bands together). Depth: the 5σ depth of the image shifts by Δm ~
    U(−``depth_scatter_mag``, +``depth_scatter_mag``), as if the number of exposures were scaled by
    f = 10^(0.8 Δm) (σ_bkg ∝ T^−1/2, so Δm = 1.25 log10 f; Util/data_util.bkg_noise of lenstronomy with n_exp·f
    exposures): total exposure × f, background σ / √f. Both off at 0: the preset's values, no random draw.
    """
    n_bands = len(survey.bands)
    fwhm = np.tile(np.asarray(survey.psf_fwhm_arcsec, dtype=np.float64), (n, 1))
    bkg = np.tile([survey.background_rms(b) for b in range(n_bands)], (n, 1))
    t_exp = np.tile([survey.total_exposure_s(b) for b in range(n_bands)], (n, 1))
    if seeing_scatter > 0:
        fwhm = fwhm * np.exp(rng.normal(0.0, seeing_scatter, n))[:, None]
    if depth_scatter_mag > 0:
        factor = 10 ** (0.8 * rng.uniform(-depth_scatter_mag, depth_scatter_mag, n))[:, None]
        t_exp, bkg = t_exp * factor, bkg / np.sqrt(factor)
    return fwhm, bkg, t_exp


def survey_renderer(survey: Survey, n_pix: int, cfg: dict, dtype, device) -> BatchRenderer:
    """The fused renderer of one survey preset (``render``'s physics to rounding, tested) for the ``simulate``
    section ``cfg`` (``supersampling``; ``compile``: torch.compile'd, needs a C++ compiler on a CPU); each
    batch passes its own pixel scale and per-image seeing per call."""
    return BatchRenderer(n_pix, survey.pixel_scale_arcsec, GaussianPSF(torch.as_tensor(survey.psf_fwhm_arcsec)),
                         int(cfg["supersampling"]), n_bands=len(survey.bands), dtype=dtype, device=device,
                         compile=bool(cfg["compile"]))


def batch_survey(survey: Survey, pixel_scale_scatter: float, rng: np.random.Generator) -> Survey:
    """The preset with its pixel scale times exp(U(−``pixel_scale_scatter``, +``pixel_scale_scatter``)), one draw per
    render batch (domain randomization: the same scenes sampled by another detector, so a survey whose pixel scale
    lies between the presets is inside the training range). Everything derived from the pixel scale follows it:
    the sky per pixel, hence the background σ (Survey.background_rms), the field of view and the catalogue's
    ``pixel_scale``. Off at 0: the preset itself, no random draw (earlier data sets are reproduced)."""
    if pixel_scale_scatter <= 0:
        return survey
    factor = float(np.exp(rng.uniform(-pixel_scale_scatter, pixel_scale_scatter)))
    return dataclasses.replace(survey, pixel_scale_arcsec=survey.pixel_scale_arcsec * factor)


def simulate_dataset(cfg: dict, out_dir: str | Path, seed: int, log: Callable[[str], None] = print,
                     device: torch.device | str = "cpu", is_main: bool = True) -> pd.DataFrame:
    """Simulate ``cfg['n_per_survey']`` cutouts for each of ``cfg['surveys']`` into ``out_dir``.

    ``cfg['renderer']`` lenstronomy renders (and noises) each image with lenstronomy instead (RENDERERS); the
    truth columns then still come from this package's rendering of the same scenes.

    Returns the catalogue rows (not yet split). Images and variance maps are written as ``cfg['storage']``.
    """
    out_dir = Path(out_dir)
    try:
        surveys = [get_survey(name).select(cfg["band_mode"]) for name in cfg["surveys"]]
    except ValueError as exc:
        raise ConfigError(f"simulate.surveys / simulate.band_mode: {exc}") from None
    band_counts = {s.name: len(s.bands) for s in surveys}
    if len(set(band_counts.values())) > 1:
        raise ConfigError(f"simulate.surveys {band_counts} have different numbers of bands: one data set needs one band "
                         "count (set simulate.band_mode: reference to keep each survey's reference band)")
    for key in ("seeing_scatter", "depth_scatter_mag", "pixel_scale_scatter", "artefact_fraction"):
        if not float(cfg[key]) >= 0:
            raise ConfigError(f"simulate.{key} must be >= 0, got {cfg[key]}")
    if cfg["storage"] not in FORMATS:
        raise ConfigError(f"simulate.storage must be one of {sorted(FORMATS)}, got {cfg['storage']!r}")
    dtype = DTYPES[cfg["dtype"]]
    population = PopulationConfig.from_dict(cfg["population"])
    rng = np.random.default_rng(seed)
    generator = torch.Generator(device="cpu").manual_seed(seed)
    suffix = FORMATS[cfg["storage"]]
    n_pix, batch_size = int(cfg["n_pix"]), int(cfg["batch_size"])
    counts = [int(c) for c in cfg["n_per_survey"]]
    if len(counts) == 1:
        counts = counts * len(surveys)
    if len(counts) != len(surveys):
        raise ConfigError(f"simulate.n_per_survey {cfg['n_per_survey']} must hold one number or one per survey "
                         f"({len(surveys)})")
    if sum(counts) <= 0:
        raise NothingProcessedError(f"simulate.n_per_survey {cfg['n_per_survey']}: 0 cutouts to simulate")
    if cfg["renderer"] not in RENDERERS:
        raise ConfigError(f"simulate.renderer must be one of {list(RENDERERS)}, got {cfg['renderer']!r}")
    external = cfg["renderer"] == "lenstronomy"
    label_source = "sim:external" if external else "sim:torch"
    if external:
        from lensing.lenstronomy_bridge import lenstronomy_noise, lenstronomy_version, render_scene_lenstronomy

        simulator = lenstronomy_version()
        np.random.seed(seed % 2**32)  # lenstronomy's noise draws from numpy's global generator
    else:
        simulator = "lensing.simulator (torch)"
    rows: list[dict] = []
    for preset, total in zip(surveys, counts):
        survey = preset
        te_lo, te_hi, capped = theta_e_range(population, survey, n_pix)
        if capped:
            log(f"[lensing] WARNING: {survey.name}: theta_E drawn from U({te_lo:.3g}, {te_hi:.3g})\" instead of the "
                f"configured {list(population.theta_E_range_arcsec)} (simulate.population.theta_E_max_fov_fraction "
                f"{population.theta_E_max_fov_fraction} of the {n_pix}-px half width)")
        fused = survey_renderer(survey, n_pix, cfg, dtype, device)
        bkg = np.array([survey.background_rms(b) for b in range(len(survey.bands))])
        ref_band = survey.band_index(survey.reference_band)
        bar = progress(total=total, desc=f"simulate {survey.name}", is_main=is_main)
        for start in range(0, total, batch_size):
            n = min(batch_size, total - start)
            survey = batch_survey(preset, float(cfg["pixel_scale_scatter"]), rng)
            params, meta = sample_scenes(n, survey, n_pix, population, rng, dtype)
            params = {g: {k: v.to(device) for k, v in d.items()} for g, d in params.items()}
            fwhm, bkg_i, t_exp_i = observing_conditions(survey, n, float(cfg["seeing_scatter"]),
                                                        float(cfg["depth_scatter_mag"]), rng)
            with torch.no_grad():
                comps = fused.components(params, psf_fwhm_arcsec=torch.from_numpy(fwhm),
                                         pixel_scale_arcsec=survey.pixel_scale_arcsec)
                is_lens = torch.as_tensor(meta["label"] == 1, device=device)
                truth = lens_truth(params, comps, torch.as_tensor(bkg_i, dtype=dtype, device=device),
                                   survey.pixel_scale_arcsec, is_lens, int(cfg["truth_grid"]))
                if external:  # the image from lenstronomy alone; truth above still from the scene parameters
                    cpu_params = {g: {k: v.cpu() for k, v in d.items()} for g, d in params.items()}
                    model = torch.as_tensor(np.stack([render_scene_lenstronomy(
                        cpu_params, i, n_pix, survey.pixel_scale_arcsec, fwhm[i], int(cfg["supersampling"]))
                        for i in range(n)]), dtype=dtype, device=device)
                else:
                    model = comps["total"]
                model, artefacts = add_artefacts(model, bkg_i, fwhm, survey.pixel_scale_arcsec,
                                                 float(cfg["artefact_fraction"]), rng)
                if external:
                    noisy = torch.as_tensor(np.stack([lenstronomy_noise(model[i].double().cpu().numpy(), bkg_i[i],
                                                                        t_exp_i[i]) for i in range(n)]), dtype=dtype,
                                            device=device)
                    var = variance_map(model, bkg_i, t_exp_i)
                else:
                    noisy, var = add_noise(model, bkg_i, t_exp_i, generator=generator)
                snr = torch.sqrt((model.clamp(min=0) ** 2 / var).sum(dim=(1, 2, 3)))
            truth = {k: v.cpu().numpy() for k, v in truth.items()}
            true_cols = params_to_columns(params)
            noisy, var = noisy.cpu().numpy(), var.cpu().numpy()
            for i in range(n):
                object_id = f"{survey.name}_{start + i:06d}"
                image_rel = f"images/{object_id}{suffix}"
                var_rel = f"variance/{object_id}{suffix}"
                img_scale, img_offset = write_array(out_dir / image_rel, noisy[i], cfg["storage"])
                var_scale, var_offset = write_array(out_dir / var_rel, var[i], cfg["storage"])
                tiff = cfg["storage"] == "tiff16"
                row = {
                    "object_id": object_id, "image_path": image_rel, "variance_path": var_rel,
                    "image_scale": img_scale if tiff else np.nan, "image_offset": img_offset if tiff else np.nan,
                    "variance_scale": var_scale if tiff else np.nan,
                    "variance_offset": var_offset if tiff else np.nan,
                    "bands": ";".join(survey.bands), "band_psf_fwhm": join_bands(fwhm[i]),
                    "background_rms": join_bands(bkg_i[i]), "exposure_time_s": join_bands(t_exp_i[i]),
                    "label": int(meta["label"][i]), "label_source": label_source, "label_confidence": 1.0,
                    "z_phot": meta["z_phot"][i], "z_spec": meta["z_spec"][i], "z_err": meta["z_err"][i],
                    "seeing": fwhm[i, ref_band], "psf_fwhm": fwhm[i, ref_band],
                    "pixel_scale": survey.pixel_scale_arcsec, "instrument": survey.instrument,
                    "survey": survey.name, "magnitude": meta["magnitude"][i], "snr": float(snr[i]),
                    "sersic_index": meta["sersic_index"][i], "half_light_radius": meta["half_light_radius"][i],
                    "axis_ratio": meta["axis_ratio"][i], "variance_map_available": True, "psf_matched": False,
                    "target_psf_fwhm": np.nan, "schema_version": SCHEMA_VERSION,
                    "sim_kind": meta["sim_kind"][i], "n_neighbours": int(meta["n_neighbours"][i]),
                    "z_source": meta["z_source"][i], "source_magnitude": meta["source_magnitude"][i],
                    "simulator": simulator, "artefacts": bool(artefacts[i]),
                }
                row.update({k: float(v[i]) for k, v in truth.items()})
                row.update({k: float(v[i]) for k, v in true_cols.items()})
                rows.append(row)
            bar.update(n)
        bar.close()
        log(f"[lensing] simulated {total} {survey.name} cutouts ({n_pix}x{n_pix}, bands {','.join(survey.bands)}, "
            f"background sigma {', '.join(f'{b:.3g}' for b in bkg)} counts/s at nominal depth; per-image seeing "
            f"scatter {cfg['seeing_scatter']}, depth scatter +-{cfg['depth_scatter_mag']} mag, pixel-scale scatter "
            f"exp(+-{cfg['pixel_scale_scatter']}) per batch of {batch_size})")
    df = pd.DataFrame(rows)
    df["n_images"] = df["n_images"].astype(int)
    df["lensed_pixels_above_1sigma"] = df["lensed_pixels_above_1sigma"].astype(int)
    return df
