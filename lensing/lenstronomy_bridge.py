"""Render the same scenes with lenstronomy 1.14 (the reference implementation) for tests, benchmarks and
held-out data sets rendered by an independent simulator (``simulate.renderer: lenstronomy``).

lenstronomy is imported here only, lazily; the training and evaluation code path never uses this module.
"""

from __future__ import annotations

import numpy as np


def _float(t, i):
    return float(t[i])


def lenstronomy_kwargs(params: dict, i: int, band: int = 0) -> tuple[list, list, list]:
    """kwargs_lens (SIE, SHEAR), kwargs_source and kwargs_lens_light (SERSIC_ELLIPSE) of scene ``i``."""
    lens, shear, src, light = params["lens"], params["shear"], params["source"], params["lens_light"]
    kwargs_lens = [{k: _float(lens[k], i) for k in ("theta_E", "e1", "e2", "center_x", "center_y")},
                   {"gamma1": _float(shear["gamma1"], i), "gamma2": _float(shear["gamma2"], i)}]

    def sersic(group):
        amp = group["amp"]
        out = {"amp": float(amp[i, band] if amp.ndim == 2 else amp[i])}
        out.update({k: _float(group[k], i) for k in ("R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y")})
        return [out]

    return kwargs_lens, sersic(src), sersic(light)


class LenstronomyRenderer:
    """lenstronomy ImageModel for an N×N grid (data_configure_simple, inverse=False: x to the right) with a
    Gaussian PSF (truncation 5, lenstronomy's default) or none, and the given supersampling."""

    def __init__(self, n_pix: int, pixel_scale_arcsec: float, psf_fwhm_arcsec: float | None,
                 supersampling: int = 1):
        from lenstronomy.Data.imaging_data import ImageData
        from lenstronomy.Data.psf import PSF
        from lenstronomy.ImSim.image_model import ImageModel
        from lenstronomy.LensModel.lens_model import LensModel
        from lenstronomy.LightModel.light_model import LightModel
        from lenstronomy.Util.simulation_util import data_configure_simple

        data = ImageData(**data_configure_simple(n_pix, pixel_scale_arcsec, exposure_time=1.0, background_rms=1.0))
        psf = PSF(psf_type="GAUSSIAN", fwhm=psf_fwhm_arcsec, pixel_size=pixel_scale_arcsec) \
            if psf_fwhm_arcsec else PSF(psf_type="NONE")
        self.model = ImageModel(data, psf, LensModel(["SIE", "SHEAR"]), LightModel(["SERSIC_ELLIPSE"]),
                                LightModel(["SERSIC_ELLIPSE"]),
                                kwargs_numerics={"supersampling_factor": int(supersampling)})

    def render(self, params: dict, i: int, band: int = 0) -> np.ndarray:
        kwargs_lens, kwargs_source, kwargs_light = lenstronomy_kwargs(params, i, band)
        return self.model.image(kwargs_lens, kwargs_source, kwargs_light)


def sie_alpha(x, y, theta_E, e1, e2, center_x, center_y):
    from lenstronomy.LensModel.Profiles.sie import SIE

    return SIE().derivatives(x, y, theta_E, e1, e2, center_x, center_y)


def sersic_ellipse(x, y, amp, R_sersic, n_sersic, e1, e2, center_x, center_y):
    from lenstronomy.LightModel.Profiles.sersic import SersicElliptic

    return SersicElliptic().function(x, y, amp, R_sersic, n_sersic, e1, e2, center_x, center_y)


def _sersic_list(group: dict | None, i: int, band: int) -> list[dict]:
    """SERSIC_ELLIPSE kwargs of scene ``i`` for a [B] group or every non-zero slot of a [B, K] group."""
    if group is None:
        return []
    amp = np.asarray(group["amp"][i], dtype=np.float64)
    keys = ("R_sersic", "n_sersic", "e1", "e2", "center_x", "center_y")
    if np.asarray(group["R_sersic"][i]).ndim == 0:  # one component, amp [C] (or a scalar)
        return [{"amp": float(amp[band] if amp.ndim else amp), **{k: float(group[k][i]) for k in keys}}]
    return [{"amp": float(amp[slot, band]), **{k: float(group[k][i][slot]) for k in keys}}
            for slot in range(amp.shape[0]) if amp[slot, band] != 0]


def render_scene_lenstronomy(params: dict, i: int, n_pix: int, pixel_scale_arcsec: float, psf_fwhm_arcsec,
                             supersampling: int = 1) -> np.ndarray:
    """Noiseless image [C, N, N] (counts/s per pixel) of scene ``i`` rendered by lenstronomy alone: SIE + SHEAR
    lensing the source and its ``source_knots`` (one SERSIC_ELLIPSE each), the lens light and every
    ``neighbours`` slot as unlensed SERSIC_ELLIPSEs, Gaussian PSF of ``psf_fwhm_arcsec[band]`` per band (the
    parameters are numpy arrays here). Used to render held-out data sets with an independent simulator."""
    from lenstronomy.Data.imaging_data import ImageData
    from lenstronomy.Data.psf import PSF
    from lenstronomy.ImSim.image_model import ImageModel
    from lenstronomy.LensModel.lens_model import LensModel
    from lenstronomy.LightModel.light_model import LightModel
    from lenstronomy.Util.simulation_util import data_configure_simple

    kwargs_lens, _, _ = lenstronomy_kwargs(params, i)
    data = ImageData(**data_configure_simple(n_pix, pixel_scale_arcsec, exposure_time=1.0, background_rms=1.0))
    bands = []
    for band, fwhm in enumerate(psf_fwhm_arcsec):
        source = _sersic_list(params["source"], i, band) + _sersic_list(params.get("source_knots"), i, band)
        light = _sersic_list(params["lens_light"], i, band) + _sersic_list(params.get("neighbours"), i, band)
        psf = PSF(psf_type="GAUSSIAN", fwhm=float(fwhm), pixel_size=pixel_scale_arcsec)
        model = ImageModel(data, psf, LensModel(["SIE", "SHEAR"]), LightModel(["SERSIC_ELLIPSE"] * len(source)),
                           LightModel(["SERSIC_ELLIPSE"] * len(light)),
                           kwargs_numerics={"supersampling_factor": int(supersampling)})
        bands.append(model.image(kwargs_lens, source, light))
    return np.stack(bands)


def lenstronomy_noise(image: np.ndarray, background_rms: np.ndarray, exposure_time_s: np.ndarray) -> np.ndarray:
    """lenstronomy 1.14's noise (Util/image_util: add_poisson, Gaussian of variance |image|/t, then
    add_background), per band; draws from numpy's global generator, as lenstronomy does."""
    from lenstronomy.Util.image_util import add_background, add_poisson

    return np.stack([image[b] + add_poisson(image[b], float(exposure_time_s[b])) + add_background(image[b], float(background_rms[b]))
                     for b in range(image.shape[0])])


def lenstronomy_version() -> str:
    import lenstronomy

    return f"lenstronomy {lenstronomy.__version__}"
