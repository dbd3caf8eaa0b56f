"""The data set catalogue (``catalog.csv``): metadata schema v2.0 + truth + file columns, and its validation.

One row per cutout. Columns (``REQUIRED_COLUMNS`` must exist; values may be empty where noted):
- identity and files: ``object_id``, ``image_path``, ``variance_path`` (empty when no variance map),
  ``image_scale``/``image_offset``/``variance_scale``/``variance_offset`` (16-bit TIFF only), ``split``.
- schema v2.0 (the original system's metadata): ``label`` ∈ {−1 unknown, 0, 1}; ``label_source`` ∈
  LABEL_SOURCES (provenance of the label); ``label_confidence`` ∈ [0, 1]; ``z_phot``, ``z_spec``,
  ``z_err``; ``seeing``, ``psf_fwhm`` (arcsec, reference band), ``pixel_scale`` (arcsec/pixel),
  ``instrument``, ``survey``; ``magnitude``, ``snr``, ``sersic_index``, ``half_light_radius`` (arcsec),
  ``axis_ratio``; ``variance_map_available``, ``psf_matched``, ``target_psf_fwhm``; ``schema_version``.
- per band (";"-joined): ``bands``, ``band_psf_fwhm``, ``background_rms`` (counts/s per pixel; may be
  estimated), ``exposure_time_s``.
- truth (0 for non-lenses, empty when unknown): TRUTH_COLUMNS.
Simulated rows add ``sim_kind`` and ``true_*`` lens-model parameters.
"""

from __future__ import annotations

import csv
import math
from pathlib import Path

import numpy as np
import pandas as pd

from common.config import ConfigError
from common.errors import InputError
from lensing.surveys import SURVEYS

SCHEMA_VERSION = "2.0"
# sim:external: labels from any other simulator (lenstronomy scripts, deeplenstronomy, SLSim, paltas, ...),
# e.g. a held-out set rendered independently of sim:torch; name the simulator in the catalogue's
# optional 'simulator' column
LABEL_SOURCES = ("sim:bologna", "sim:deeplens", "sim:torch", "sim:external", "obs:castles", "obs:relics",
                 "obs:other", "weak:gzoo", "pretrain:galaxiesml")
SCHEMA_V2_COLUMNS = ("label", "label_source", "label_confidence", "z_phot", "z_spec", "z_err", "seeing",
                     "psf_fwhm", "pixel_scale", "instrument", "survey", "magnitude", "snr", "sersic_index",
                     "half_light_radius", "axis_ratio", "variance_map_available", "psf_matched",
                     "target_psf_fwhm", "schema_version")
TRUTH_COLUMNS = ("einstein_radius_arcsec", "einstein_area_arcsec2", "lensed_source_flux",
                 "lensed_pixels_above_1sigma", "flux_contrast", "n_images")
FILE_COLUMNS = ("object_id", "image_path", "variance_path", "image_scale", "image_offset", "variance_scale",
                "variance_offset", "bands", "band_psf_fwhm", "background_rms", "exposure_time_s")
REQUIRED_COLUMNS = FILE_COLUMNS + SCHEMA_V2_COLUMNS + TRUTH_COLUMNS
_POSITIVE = ("pixel_scale", "psf_fwhm")


class CatalogError(InputError):
    """A catalogue that does not follow the schema; the message names the file, column and rows."""


def split_bands(value) -> list[str]:
    """"g;r;i" → ["g", "r", "i"] (empty → [])."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return []
    return [part for part in str(value).split(";") if part != ""]


def band_floats(value) -> np.ndarray:
    """"0.7;0.8" → array([0.7, 0.8]) (empty → empty array)."""
    return np.array([float(v) for v in split_bands(value)], dtype=np.float64)


def join_bands(values) -> str:
    return ";".join(f"{v:.6g}" if isinstance(v, (float, np.floating)) else str(v) for v in values)


def _rows(mask: pd.Series, limit: int = 5) -> str:
    idx = list(mask[mask].index[:limit])
    more = int(mask.sum()) - len(idx)
    return f"rows {idx}" + (f" (+{more} more)" if more > 0 else "")


def validate_catalog(df: pd.DataFrame, source: str | Path = "catalog.csv", root: str | Path | None = None,
                     check_files: bool = True) -> None:
    """Raise :class:`CatalogError` (naming ``source``, the column and example rows) unless ``df`` follows the
    schema. With ``root``/``check_files`` every image and variance file must exist."""
    missing = [c for c in REQUIRED_COLUMNS if c not in df.columns]
    if missing:
        raise CatalogError(f"{source}: missing column(s) {missing}; a v{SCHEMA_VERSION} catalogue needs "
                           f"{list(REQUIRED_COLUMNS)}")
    if len(df) == 0:
        raise CatalogError(f"{source}: the catalogue has no rows")
    versions = set(df["schema_version"].astype(str))
    if versions != {SCHEMA_VERSION}:
        raise CatalogError(f"{source}: column 'schema_version' must be {SCHEMA_VERSION!r}, found {sorted(versions)}")
    label = pd.to_numeric(df["label"], errors="coerce")
    bad = ~label.isin([-1, 0, 1])
    if bad.any():
        raise CatalogError(f"{source}: column 'label' must be -1, 0 or 1 ({_rows(bad)})")
    bad = ~df["label_source"].isin(LABEL_SOURCES)
    if bad.any():
        raise CatalogError(f"{source}: column 'label_source' has unknown values "
                           f"{sorted(set(df.loc[bad, 'label_source'].astype(str)))[:5]} ({_rows(bad)}); "
                           f"allowed: {list(LABEL_SOURCES)}")
    conf = pd.to_numeric(df["label_confidence"], errors="coerce")
    bad = ~((conf >= 0) & (conf <= 1))
    if bad.any():
        raise CatalogError(f"{source}: column 'label_confidence' must be in [0, 1] ({_rows(bad)})")
    bad = ~df["survey"].isin(list(SURVEYS))
    if bad.any():
        raise CatalogError(f"{source}: column 'survey' has unknown survey name(s) "
                           f"{sorted(set(df.loc[bad, 'survey'].astype(str)))[:5]} ({_rows(bad)}); "
                           f"known: {sorted(SURVEYS)}")
    for column in _POSITIVE:
        values = pd.to_numeric(df[column], errors="coerce")
        bad = ~(values > 0)
        if bad.any():
            raise CatalogError(f"{source}: column '{column}' must be a positive number ({_rows(bad)})")
    n_bands = df["bands"].map(lambda v: len(split_bands(v)))
    bad = n_bands == 0
    if bad.any():
        raise CatalogError(f"{source}: column 'bands' is empty ({_rows(bad)}); give e.g. 'g;r;i'")
    bad = df["image_path"].isna() | (df["image_path"].astype(str).str.strip() == "")
    if bad.any():
        raise CatalogError(f"{source}: column 'image_path' is empty ({_rows(bad)})")
    if check_files and root is not None:
        root = Path(root)
        exists = df["image_path"].map(lambda p: (root / str(p)).is_file())
        if not exists.all():
            first = df.loc[~exists, "image_path"].iloc[0]
            raise CatalogError(f"{source}: column 'image_path' points to missing files ({_rows(~exists)}), "
                               f"e.g. {root / str(first)}")
        has_var = df["variance_path"].notna() & (df["variance_path"].astype(str).str.strip() != "")
        exists = df["variance_path"].map(lambda p: isinstance(p, str) and p.strip() != "" and (root / p).is_file())
        bad = has_var & ~exists
        if bad.any():
            raise CatalogError(f"{source}: column 'variance_path' points to missing files ({_rows(bad)}), "
                               f"e.g. {root / str(df.loc[bad, 'variance_path'].iloc[0])}")


def read_csv_table(path: str | Path, **kwargs) -> pd.DataFrame:
    """``pd.read_csv`` whose failures on an empty, truncated or binary file name the file (CatalogError).

    pandas fills a row with fewer fields than the header with NaN, so a file cut off in the middle of its
    last row would read silently; every row must have the header's number of fields.
    """
    path = Path(path)
    try:
        df = pd.read_csv(path, **kwargs)
        with path.open("r", encoding="utf-8-sig", newline="") as handle:
            rows = csv.reader(handle)
            n_fields = len(next(rows, []))
            short = next((rows.line_num for row in rows if row and len(row) != n_fields), None)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError, csv.Error) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise CatalogError(f"not a readable CSV table, truncated or damaged? ({first})", path) from exc
    if short is not None:
        raise CatalogError(f"line {short} has fewer or more fields than the header's {n_fields}: the file is "
                           "truncated or damaged", path)
    return df


def read_catalog(folder: str | Path, check_files: bool = True, on_missing_files: str = "error", log=None) -> pd.DataFrame:
    """Read and validate ``folder/catalog.csv``.

    ``on_missing_files``: "error" (default) or "drop" (rows whose files are missing are removed, with a
    log line saying how many).
    """
    folder = Path(folder)
    path = folder / "catalog.csv"
    if not path.is_file():
        raise CatalogError(f"no catalog.csv in {folder} (run `python lensing/preprocess_lensing.py simulate` or "
                           "`convert` to create a data set)")
    df = read_csv_table(path, keep_default_na=True, dtype={"object_id": str, "bands": str, "split": str})
    if on_missing_files not in ("error", "drop"):
        raise ConfigError(f"data.on_missing_files must be 'error' or 'drop', got {on_missing_files!r}")
    if on_missing_files == "drop" and check_files and "image_path" in df.columns:
        ok = df["image_path"].map(lambda p: isinstance(p, str) and (folder / p).is_file())
        if "variance_path" in df.columns:
            var_ok = df["variance_path"].map(lambda p: not isinstance(p, str) or p.strip() == ""
                                             or (folder / p).is_file())
            ok &= var_ok
        if not ok.all():
            message = f"{path}: dropped {int((~ok).sum())} row(s) whose image/variance files are missing"
            (log or print)(message)
            df = df[ok].reset_index(drop=True)
    validate_catalog(df, path, folder, check_files)
    return df


def write_catalog(df: pd.DataFrame, folder: str | Path) -> Path:
    """Write ``catalog.csv`` atomically (temp file, then rename)."""
    from common.runlog import write_text_atomic

    validate_catalog(df, Path(folder) / "catalog.csv", folder, check_files=False)
    return write_text_atomic(Path(folder) / "catalog.csv", df.to_csv(index=False))


def empty_row() -> dict:
    """A row with every required column at its 'unknown' value."""
    row = {c: np.nan for c in REQUIRED_COLUMNS}
    row.update({"variance_path": "", "schema_version": SCHEMA_VERSION, "variance_map_available": False,
                "psf_matched": False, "label_confidence": 1.0})
    return row
