"""Survey presets: pixel scale, bands, PSF FWHM and depth (zero point, sky, exposure, read noise).

Depth follows lenstronomy's SimulationAPI (Util/data_util.bkg_noise): with total exposure T = n_exp·t,
sky counts S = 10^(−0.4(m_sky − zp))·Δ² per pixel per second, background σ (counts/s per pixel) =
√(n_exp·RN² + T·S) / T. Images are in counts/s (electrons/s); Poisson variance = model / T.

Numbers are "-like" approximations for simulation, not calibrations:
- euclid_vis: lenstronomy ObservationConfig/Euclid.py (VIS: 566 s × 4, sky 22.3, zp 25.72, RN 4.2 e, seeing
  0.16"; Euclid Collaboration 2024); pixel 0.101". (The Bologna space set used 0.1"/px, FWHM 0.18".)
- hsc: HSC-SSP Wide (Aihara et al. 2018, PASJ 70, S4): g r i 0.168"/px, seeing ≈ 0.77/0.76/0.58", g r 10 min,
  i 20 min; zp 27.0 (coadd counts); Mauna Kea dark sky 22.0/21.2/20.4 mag/arcsec².
- hst_acs: ACS/WFC F814W as in COSMOS (Koekemoer et al. 2007): 0.05"/px, PSF ≈ 0.1", 4 × 507 s, zp 25.94,
  sky ≈ 22.5, RN 5 e.
- sdss: SDSS imaging (Gunn et al. 1998; York et al. 2000): g r i 0.396"/px, seeing ≈ 1.5/1.4/1.3", 53.9 s;
  zp and sky approximate (24.8/24.8/24.4; 22.0/21.0/20.3).
- kids: KiDS (de Jong et al. 2013; Kuijken et al. 2019): u g r i at 0.2"/px (the Bologna ground set),
  seeing ≈ 1.0/0.86/0.7/0.8", 1000/900/1800/1200 s; zp and sky approximate.
Each preset names a reference band (r-like) used when surveys with different band sets share a dataset.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class Survey:
    name: str
    instrument: str
    pixel_scale_arcsec: float
    bands: tuple[str, ...]
    psf_fwhm_arcsec: tuple[float, ...]
    zero_point_mag: tuple[float, ...]  # magnitude giving 1 count (e-) per second
    sky_mag_arcsec2: tuple[float, ...]
    exposure_time_s: tuple[float, ...]  # per exposure
    num_exposures: tuple[int, ...]
    read_noise_e: float
    reference_band: str

    def band_index(self, band: str) -> int:
        return self.bands.index(band)

    def total_exposure_s(self, band: int) -> float:
        return self.exposure_time_s[band] * self.num_exposures[band]

    def background_rms(self, band: int) -> float:
        """σ_bkg in counts/s per pixel (lenstronomy data_util.bkg_noise)."""
        total = self.total_exposure_s(band)
        sky_cps_per_pixel = 10 ** (-0.4 * (self.sky_mag_arcsec2[band] - self.zero_point_mag[band])) \
            * self.pixel_scale_arcsec**2
        return math.sqrt(self.num_exposures[band] * self.read_noise_e**2 + total * sky_cps_per_pixel) / total

    def select(self, band_mode: str) -> Survey:
        """``"all"`` bands, or only the ``"reference"`` band (so surveys with other band sets can be mixed)."""
        if band_mode == "all":
            return self
        if band_mode != "reference":
            raise ValueError(f"band_mode must be 'all' or 'reference', got {band_mode!r}")
        i = self.band_index(self.reference_band)
        return Survey(self.name, self.instrument, self.pixel_scale_arcsec, (self.bands[i],),
                      (self.psf_fwhm_arcsec[i],), (self.zero_point_mag[i],), (self.sky_mag_arcsec2[i],),
                      (self.exposure_time_s[i],), (self.num_exposures[i],), self.read_noise_e, self.reference_band)


SURVEYS: dict[str, Survey] = {
    "euclid_vis": Survey("euclid_vis", "Euclid/VIS", 0.101, ("VIS",), (0.16,), (25.72,), (22.3,), (566.0,), (4,),
                         4.2, "VIS"),
    "hsc": Survey("hsc", "Subaru/HSC", 0.168, ("g", "r", "i"), (0.77, 0.76, 0.58), (27.0, 27.0, 27.0),
                  (22.0, 21.2, 20.4), (150.0, 150.0, 200.0), (4, 4, 6), 4.5, "r"),
    "hst_acs": Survey("hst_acs", "HST/ACS-WFC", 0.05, ("F814W",), (0.10,), (25.94,), (22.5,), (507.0,), (4,),
                      5.0, "F814W"),
    "sdss": Survey("sdss", "SDSS/imaging", 0.396, ("g", "r", "i"), (1.5, 1.4, 1.3), (24.8, 24.8, 24.4),
                   (22.0, 21.0, 20.3), (53.9, 53.9, 53.9), (1, 1, 1), 5.0, "r"),
    "kids": Survey("kids", "VST/OmegaCAM", 0.2, ("u", "g", "r", "i"), (1.0, 0.86, 0.7, 0.8),
                   (23.9, 25.1, 25.2, 24.7), (22.6, 22.0, 21.0, 20.0), (250.0, 180.0, 360.0, 240.0),
                   (4, 5, 5, 5), 5.0, "r"),
}

# Colours (mag in band − mag in the reference band) of an early-type lens and a star-forming source;
# VIS and F814W are broad red bands, treated as the reference (r-like). Approximate SEDs at z ~ 0.5 / 1.5.
LENS_COLOURS = {"u": 2.6, "g": 1.3, "r": 0.0, "i": -0.45, "z": -0.75, "y": -0.9, "VIS": 0.0, "F814W": 0.0}
SOURCE_COLOURS = {"u": 0.5, "g": 0.25, "r": 0.0, "i": -0.1, "z": -0.15, "y": -0.2, "VIS": 0.0, "F814W": 0.0}


def get_survey(name: str) -> Survey:
    """The preset called ``name``; an unknown name is an error listing the known ones."""
    try:
        return SURVEYS[name]
    except KeyError:
        raise ValueError(f"unknown survey '{name}'; known surveys: {', '.join(sorted(SURVEYS))}") from None
