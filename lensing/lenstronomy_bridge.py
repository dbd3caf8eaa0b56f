"""Render the same scenes with lenstronomy 1.14 (the reference implementation) for tests and benchmarks.

lenstronomy is a test/benchmark dependency: it is imported here only, lazily, and this module is not used
by the training or evaluation code path.
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
