"""Reading files with errors that name the file: truncated or foreign NPZ / npy / NIfTI / CSV become InputError.

``np.load`` on a half-copied NPZ raises ``zipfile.BadZipFile: File is not a zip file`` (no file name), on a
truncated member ``EOFError`` or ``ValueError`` deep inside a later access. These readers open the file,
read every array eagerly and report ``<path>: <what is wrong>``.
"""

from __future__ import annotations

import zipfile
from collections.abc import Iterable
from pathlib import Path

import numpy as np

from common.errors import InputError

_READ_ERRORS = (zipfile.BadZipFile, EOFError, ValueError, OSError, KeyError, zipfile.LargeZipFile)


def load_npz(path: str | Path, required: Iterable[str] = (), allow_pickle: bool = False) -> dict[str, np.ndarray]:
    """All arrays of an NPZ as a dict, read eagerly. ``required`` names arrays that must be present."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        with np.load(path, allow_pickle=allow_pickle) as npz:
            arrays = {key: npz[key] for key in npz.files}
    except _READ_ERRORS as exc:
        raise InputError(f"not a readable NPZ file, truncated or damaged? ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})", path) from exc
    missing = [key for key in required if key not in arrays]
    if missing:
        raise InputError(f"missing array(s) {missing}; the file has {sorted(arrays)}", path)
    return arrays


def load_npy(path: str | Path, mmap_mode: str | None = None) -> np.ndarray:
    """One ``.npy`` array (optionally memory-mapped); a truncated file is an InputError naming it."""
    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        array = np.load(path, mmap_mode=mmap_mode, allow_pickle=False)
        if mmap_mode is None:
            return np.asarray(array)
        return array
    except _READ_ERRORS as exc:
        raise InputError(f"not a readable .npy file, truncated or damaged? ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})", path) from exc


def load_nifti(path: str | Path, dtype=np.float32):
    """(data array, nibabel image) of a NIfTI file; a truncated or foreign file is an InputError naming it.

    The data are read eagerly so a truncated ``.nii.gz`` fails here, not in a later computation.
    """
    import zlib

    import nibabel as nib
    from nibabel.filebasedimages import ImageFileError

    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        image = nib.load(str(path))
        data = np.asarray(image.get_fdata(dtype=np.float64 if dtype == np.float64 else np.float32))
    except (ImageFileError, EOFError, OSError, ValueError, zlib.error) as exc:
        raise InputError(f"not a readable NIfTI file, truncated or damaged? ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})", path) from exc
    return data.astype(dtype, copy=False), image


def read_csv(path: str | Path, required: Iterable[str] = (), **kwargs):
    """``pandas.read_csv`` whose errors name the file; ``required`` columns must be present."""
    import pandas as pd

    path = Path(path)
    if not path.is_file():
        raise InputError("file not found", path)
    try:
        table = pd.read_csv(path, **kwargs)
    except (pd.errors.ParserError, pd.errors.EmptyDataError, UnicodeDecodeError, ValueError) as exc:
        raise InputError(f"not a readable CSV table ({type(exc).__name__}: "
                         f"{str(exc).splitlines()[0] if str(exc) else ''})", path) from exc
    missing = [c for c in required if c not in table.columns]
    if missing:
        raise InputError(f"missing column(s) {missing}; the table has {list(table.columns)}", path)
    return table
