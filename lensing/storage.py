"""Image files of the data set layout: float32 ``.npy``, float32 ``.fits`` (astropy), or 16-bit ``.tif``.

Arrays are channels-first [C, H, W] in physical units (counts/s per pixel; variance in (counts/s)²).
16-bit TIFF stores round((value − offset)/scale) with offset = min and scale = (max − min)/65535; the
catalogue keeps ``*_scale``/``*_offset`` so ``value = stored·scale + offset`` restores physical units (to
within scale/2). The original system min-max scaled image and variance separately *without* recording
the scale, which destroyed the units; this layout never does.
"""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np

from common.errors import InputError
from common.files import load_npy
from common.runlog import atomic_path

FORMATS = {"npy": ".npy", "fits": ".fits", "tiff16": ".tif"}
UINT16_MAX = 65535


class ImageFileError(InputError):
    """An image or variance file that is missing, truncated or unreadable; the message names the file."""


def _atomic_write(path: Path, writer) -> None:
    with atomic_path(path) as tmp:
        writer(tmp)


def write_array(path: str | Path, array: np.ndarray, fmt: str) -> tuple[float, float]:
    """Write [C, H, W] ``array`` as ``fmt`` (npy | fits | tiff16); returns (scale, offset) (1, 0 unless tiff16)."""
    path = Path(path)
    array = np.asarray(array, dtype=np.float32)
    if fmt == "npy":
        def writer(tmp):
            with open(tmp, "wb") as handle:
                np.save(handle, array)
        _atomic_write(path, writer)
        return 1.0, 0.0
    if fmt == "fits":
        from astropy.io import fits

        _atomic_write(path, lambda tmp: fits.PrimaryHDU(array).writeto(tmp, overwrite=True))
        return 1.0, 0.0
    if fmt == "tiff16":
        import tifffile

        low, high = float(np.nanmin(array)), float(np.nanmax(array))
        scale = (high - low) / UINT16_MAX if high > low else 1.0
        stored = np.clip(np.round((array - low) / scale), 0, UINT16_MAX).astype(np.uint16)
        _atomic_write(path, lambda tmp: tifffile.imwrite(tmp, stored, photometric="minisblack"))
        return scale, low
    raise ValueError(f"unknown storage format {fmt!r}; use one of {sorted(FORMATS)}")


def _read_fits(path: Path) -> np.ndarray:
    """The first HDU with data. astropy only warns about a truncated file (and may then fail to reshape):
    that warning becomes the error, so the user reads one line naming the file and the cause."""
    from astropy.io import fits

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            with fits.open(path, memmap=False) as hdul:
                hdu = next((h for h in hdul if getattr(h, "data", None) is not None), None)
                if hdu is None:
                    raise ImageFileError("no HDU with image data", path)
                array = np.asarray(hdu.data)
        except ImageFileError:
            raise
        except Exception as exc:
            truncated = [str(w.message) for w in caught if "truncated" in str(w.message)]
            raise ImageFileError(f"cannot read ({'; '.join(truncated) or f'{type(exc).__name__}: {exc}'})",
                                 path) from exc
    for w in caught:
        if "truncated" in str(w.message):
            raise ImageFileError(f"damaged FITS file ({w.message})", path)
        warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return array


def read_array(path: str | Path, scale: float | None = None, offset: float | None = None) -> np.ndarray:
    """Read an image file as float32 [C, H, W] (a 2-D file becomes one band).

    Integer TIFFs need ``scale`` and ``offset`` (from the catalogue) to return physical units; without
    them they are refused rather than silently read as raw counts.
    """
    path = Path(path)
    if not path.is_file():
        raise ImageFileError("image file not found", path)
    suffix = path.suffix.lower()
    try:
        if suffix == ".npy":
            array = load_npy(path)
        elif suffix in (".fits", ".fit", ".fz"):
            array = _read_fits(path)
        elif suffix in (".tif", ".tiff"):
            import tifffile

            array = tifffile.imread(path)
        else:
            raise ImageFileError(f"{path}: unsupported image format '{suffix}' (use .npy, .fits or .tif)")
    except ImageFileError:
        raise
    except InputError as exc:  # a truncated .npy (common.files names the file)
        raise ImageFileError(str(exc), path) from exc
    except Exception as exc:  # truncated files, bad headers
        raise ImageFileError(f"cannot read, truncated or damaged? ({type(exc).__name__}: {exc})", path) from exc
    if np.issubdtype(array.dtype, np.integer):
        if scale is None or offset is None or not np.isfinite(scale) or not np.isfinite(offset):
            raise ImageFileError(f"{path}: integer image without scale/offset in the catalogue: cannot restore "
                                 "physical units (give the image_scale/image_offset columns)")
        array = array.astype(np.float64) * float(scale) + float(offset)
    array = np.asarray(array, dtype=np.float32)
    if array.ndim == 2:
        array = array[None]
    if array.ndim != 3:
        raise ImageFileError(f"{path}: expected an image [C, H, W] or [H, W], got shape {array.shape}")
    return array
