"""Converters from real data into the data set layout: GalaxiesML HDF5 and a generic folder of cutouts.

GalaxiesML (Do et al. 2024; Zenodo 10.5281/zenodo.11117528): ``5x64x64_{training,validation,testing}_
with_morphology.hdf5`` with ``image`` (N, 5, 64, 64) channels-first in bands g r i z y, ``object_id``,
``specz_redshift`` and ``{g,r,i,z,y}_cmodel_mag``; HSC-SSP cutouts at 0.168"/px without lens labels
(pretraining data, label −1, or assumed non-lenses, label 0). The original converter read other keys and
assumed channels-last; a channels-last file is refused here with a message saying so.

Generic folder: a CSV (``file`` column, relative to the folder; optional ``variance_file``, ``label``,
``survey``, ``pixel_scale``, ``psf_fwhm``, ``bands``, ``z_spec``, ``z_phot``, ``magnitude``, ``object_id``,
``image_scale``/``image_offset`` for integer TIFFs) next to FITS/TIFF/NPY cutouts, e.g. CASTLES-like known
lenses.

Both can match every cutout to a target PSF (Gaussian closed form, else the regularized Fourier ratio;
sharpening refused) and estimate the per-band background σ (border MAD) used for noise normalization.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import ConfigError
from common.errors import InputError, NothingProcessedError
from common.runlog import progress
from lensing.catalog import SCHEMA_VERSION, CatalogError, empty_row, join_bands, read_csv_table
from lensing.data import border_mad_sigma
from lensing.psf import match_psf
from lensing.storage import FORMATS, ImageFileError, read_array, write_array
from lensing.surveys import get_survey

GALAXIESML_BANDS = ("g", "r", "i", "z", "y")
# HSC-SSP Wide median seeing per band (Aihara et al. 2018, PASJ 70, S8, table 1)
HSC_SEEING_ARCSEC = {"g": 0.77, "r": 0.76, "i": 0.58, "z": 0.68, "y": 0.68}
HSC_PIXEL_SCALE = 0.168


def _psf_match_if_requested(image, variance, pixel_scale, band_fwhm, target, regularization, where: str):
    if target is None:
        return image, variance, False
    try:
        out, var, _ = match_psf(image, variance, pixel_scale, source_fwhm_arcsec=np.asarray(band_fwhm),
                                target_fwhm_arcsec=float(target), regularization=regularization)
    except ValueError as exc:  # e.g. a target PSF sharper than the cutout's
        raise InputError(f"{where}: {exc}") from exc
    return out.astype(np.float32), None if var is None else var.astype(np.float32), True


def convert_galaxiesml(h5_path: str | Path, out_dir: str | Path, cfg: dict, log: Callable[[str], None] = print,
                       is_main: bool = True) -> pd.DataFrame:
    """GalaxiesML HDF5 → data set rows (labels from ``cfg['label']``: −1 pretraining or 0 negatives)."""
    import h5py

    h5_path, out_dir = Path(h5_path), Path(out_dir)
    if not h5_path.is_file():
        raise FileNotFoundError(f"GalaxiesML file not found: {h5_path}")
    bands = list(cfg["bands"]) or list(GALAXIESML_BANDS)
    unknown = [b for b in bands if b not in GALAXIESML_BANDS]
    if unknown:
        raise ConfigError(f"convert.bands {unknown} are not GalaxiesML bands {list(GALAXIESML_BANDS)}")
    band_idx = [GALAXIESML_BANDS.index(b) for b in bands]
    rows = []
    try:
        handle = h5py.File(h5_path, "r")
    except OSError as exc:  # truncated or not HDF5: h5py's message names no file
        raise ImageFileError(f"not a readable HDF5 file, truncated or damaged? ({exc})", h5_path) from exc
    with handle:
        for key in ("image", "object_id"):
            if key not in handle:
                raise ImageFileError(f"no dataset '{key}' (GalaxiesML files have 'image', 'object_id', "
                                     f"'specz_redshift', '<band>_cmodel_mag'); found {sorted(handle.keys())[:12]}",
                                     h5_path)
        images = handle["image"]
        if images.ndim != 4 or images.shape[1] != len(GALAXIESML_BANDS):
            hint = " (it looks channels-last)" if images.ndim == 4 and images.shape[-1] == 5 else ""
            raise ImageFileError(f"'image' must be (N, 5, H, W) channels-first in bands g r i z y, "
                                 f"got {images.shape}{hint}", h5_path)
        n = images.shape[0] if not cfg["max_rows"] else min(int(cfg["max_rows"]), images.shape[0])
        if n == 0:
            raise NothingProcessedError("0 of 0 cutouts converted: dataset 'image' is empty", h5_path)
        try:
            object_ids = handle["object_id"][:n]
            specz = handle["specz_redshift"][:n] if "specz_redshift" in handle else np.full(n, np.nan)
            mags = {b: handle[f"{b}_cmodel_mag"][:n] if f"{b}_cmodel_mag" in handle else np.full(n, np.nan)
                    for b in GALAXIESML_BANDS}
        except OSError as exc:
            raise ImageFileError(f"cannot read the catalogue datasets, truncated? ({exc})", h5_path) from exc
        band_fwhm = [HSC_SEEING_ARCSEC[b] for b in bands]
        target = cfg["target_psf_fwhm"]
        for i in progress(range(n), desc="convert GalaxiesML", is_main=is_main):
            try:
                image = np.asarray(images[i], dtype=np.float32)[band_idx]
            except OSError as exc:
                raise ImageFileError(f"cannot read 'image' row {i}, truncated? ({exc})", h5_path) from exc
            image, _, matched = _psf_match_if_requested(image, None, HSC_PIXEL_SCALE, band_fwhm, target,
                                                        cfg["psf_regularization"], f"{h5_path} row {i}")
            oid = object_ids[i].decode() if isinstance(object_ids[i], bytes) else str(object_ids[i])
            rel = f"images/galaxiesml_{oid}{FORMATS[cfg['storage']]}"
            scale, offset = write_array(out_dir / rel, image, cfg["storage"])
            tiff = cfg["storage"] == "tiff16"
            row = empty_row()
            row.update({
                "object_id": oid, "image_path": rel, "image_scale": scale if tiff else np.nan,
                "image_offset": offset if tiff else np.nan, "bands": ";".join(bands),
                "band_psf_fwhm": join_bands([target] * len(bands) if matched else band_fwhm),
                "background_rms": join_bands(border_mad_sigma(image)), "label": int(cfg["label"]),
                "label_source": "pretrain:galaxiesml", "label_confidence": float(cfg["label_confidence"]),
                "z_spec": float(specz[i]), "seeing": HSC_SEEING_ARCSEC["r"],
                "psf_fwhm": float(target) if matched else HSC_SEEING_ARCSEC["r"] if "r" in bands else band_fwhm[0],
                "pixel_scale": HSC_PIXEL_SCALE, "instrument": "Subaru/HSC", "survey": "hsc",
                "magnitude": float(mags["i"][i]), "psf_matched": matched,
                "target_psf_fwhm": float(target) if matched else np.nan,
            })
            row.update({c: np.nan for c in ("einstein_radius_arcsec", "einstein_area_arcsec2", "lensed_source_flux",
                                            "lensed_pixels_above_1sigma", "flux_contrast", "n_images")})
            rows.append(row)
    log(f"[lensing] converted {len(rows)} GalaxiesML cutouts from {h5_path} (bands {','.join(bands)}, "
        f"label {cfg['label']})")
    return pd.DataFrame(rows)


def convert_folder(folder: str | Path, out_dir: str | Path, cfg: dict, log: Callable[[str], None] = print,
                   is_main: bool = True) -> pd.DataFrame:
    """A folder of FITS/TIFF/NPY cutouts + CSV catalogue → data set rows (see the module docstring)."""
    folder, out_dir = Path(folder), Path(out_dir)
    csv_path = folder / cfg["catalog_name"]
    if not csv_path.is_file():
        raise FileNotFoundError(f"no catalogue {csv_path} (set convert.catalog_name)")
    src = read_csv_table(csv_path)
    if len(src) == 0:
        raise NothingProcessedError("0 of 0 cutouts converted: the catalogue has no rows", csv_path)
    if "file" not in src.columns:
        raise CatalogError(f"{csv_path}: needs a 'file' column with the cutout path (columns: {list(src.columns)})")
    rows = []
    for i, rec in progress(list(src.iterrows()), desc="convert folder", is_main=is_main):
        where = f"{csv_path} row {i}"
        survey_name = rec.get("survey") if isinstance(rec.get("survey"), str) else cfg["survey"]
        try:
            survey = get_survey(str(survey_name))
        except ValueError as exc:
            raise CatalogError(f"{where}: column 'survey': {exc}") from None
        image = read_array(folder / str(rec["file"]), rec.get("image_scale"), rec.get("image_offset"))
        variance = None
        if isinstance(rec.get("variance_file"), str) and rec["variance_file"].strip():
            variance = read_array(folder / rec["variance_file"], rec.get("variance_scale"), rec.get("variance_offset"))
        bands = str(rec["bands"]).split(";") if isinstance(rec.get("bands"), str) else list(survey.bands)
        if len(bands) != image.shape[0]:
            raise CatalogError(f"{where}: {folder / str(rec['file'])} has {image.shape[0]} band(s) but 'bands' "
                               f"is {';'.join(bands)} ({len(bands)}); give a 'bands' column")
        pixel_scale = float(rec["pixel_scale"]) if pd.notna(rec.get("pixel_scale")) else survey.pixel_scale_arcsec
        if pd.notna(rec.get("psf_fwhm")):
            band_fwhm = [float(rec["psf_fwhm"])] * len(bands)
        elif all(b in survey.bands for b in bands):
            band_fwhm = [survey.psf_fwhm_arcsec[survey.band_index(b)] for b in bands]
        else:
            raise CatalogError(f"{where}: no 'psf_fwhm' and bands {bands} are not all in survey {survey.name}")
        target = cfg["target_psf_fwhm"]
        image, variance, matched = _psf_match_if_requested(image, variance, pixel_scale, band_fwhm, target,
                                                           cfg["psf_regularization"], where)
        oid = str(rec["object_id"]) if pd.notna(rec.get("object_id")) else Path(str(rec["file"])).stem
        suffix = FORMATS[cfg["storage"]]
        rel, var_rel = f"images/{oid}{suffix}", f"variance/{oid}{suffix}" if variance is not None else ""
        scale, offset = write_array(out_dir / rel, image, cfg["storage"])
        v_scale, v_offset = write_array(out_dir / var_rel, variance, cfg["storage"]) if variance is not None \
            else (np.nan, np.nan)
        tiff = cfg["storage"] == "tiff16"
        label = int(rec["label"]) if pd.notna(rec.get("label")) else int(cfg["label"])
        row = empty_row()
        row.update({
            "object_id": oid, "image_path": rel, "variance_path": var_rel,
            "image_scale": scale if tiff else np.nan, "image_offset": offset if tiff else np.nan,
            "variance_scale": v_scale if tiff else np.nan, "variance_offset": v_offset if tiff else np.nan,
            "bands": ";".join(bands), "band_psf_fwhm": join_bands([target] * len(bands) if matched else band_fwhm),
            "background_rms": join_bands(border_mad_sigma(image)), "label": label,
            "label_source": str(rec["label_source"]) if pd.notna(rec.get("label_source")) else cfg["label_source"],
            "label_confidence": float(rec["label_confidence"]) if pd.notna(rec.get("label_confidence"))
            else float(cfg["label_confidence"]),
            "z_spec": rec.get("z_spec", np.nan), "z_phot": rec.get("z_phot", np.nan), "z_err": rec.get("z_err", np.nan),
            "seeing": band_fwhm[0], "psf_fwhm": float(target) if matched else band_fwhm[0],
            "pixel_scale": pixel_scale, "instrument": survey.instrument, "survey": survey.name,
            "magnitude": rec.get("magnitude", np.nan), "variance_map_available": variance is not None,
            "psf_matched": matched, "target_psf_fwhm": float(target) if matched else np.nan,
            "schema_version": SCHEMA_VERSION,
        })
        rows.append(row)
    log(f"[lensing] converted {len(rows)} cutouts from {folder}")
    return pd.DataFrame(rows)
