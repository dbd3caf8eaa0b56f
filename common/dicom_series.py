"""DICOM image series: find files by content, group and sort slices by geometry, build volumes.

Shared by vmat (CT, RTDOSE) and rsna_spine (MR). What it gets right (notes/vmat.md, notes/rsna_spine.md):
- files are identified by their content (Modality, SeriesInstanceUID), never by name;
- slices are sorted by ImagePositionPatient projected on the slice normal (the cross product of the
  ImageOrientationPatient row and column cosines), not by InstanceNumber;
- PixelSpacing is (row spacing, column spacing) = (Δy between rows, Δx between columns) and may differ;
- stored values become real values through RescaleSlope / RescaleIntercept;
- compressed pixel data without an installed decoder is a clear error naming the file and transfer syntax.

Geometry convention: volumes are indexed (slice k, row j, column i). Patient coordinates (mm) of voxel
(k, j, i) are ``origin + i·Δc·row_dir + j·Δr·col_dir + k·Δs·normal`` (DICOM PS3.3 C.7.6.2.1.1), where
row_dir is the direction along a row (increasing column index).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.errors import InvalidDicomError

from common.errors import InputError

log = logging.getLogger(__name__)


class DicomSeriesError(InputError):
    """A series that cannot be turned into a volume; the message names the file(s) and the field."""


# ------------------------------------------------------------------------------------------------ files
def is_dicom_file(path: str | Path) -> bool:
    """True for Part-10 files (preamble + "DICM"); raw files without a preamble are found by reading."""
    try:
        with open(path, "rb") as handle:
            handle.seek(128)
            return handle.read(4) == b"DICM"
    except OSError:
        return False


def read_header(path: str | Path, force: bool = False) -> pydicom.Dataset:
    """Read a DICOM header without pixel data; a clear error for files that are not DICOM or truncated."""
    try:
        return pydicom.dcmread(str(path), stop_before_pixels=True, force=force)
    except (InvalidDicomError, EOFError, OSError, ValueError) as exc:
        raise DicomSeriesError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc


def find_dicom_files(folder: str | Path, recursive: bool = True) -> list[Path]:
    """All DICOM files under ``folder`` whatever their names (checked by content)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise DicomSeriesError(f"{folder}: folder not found")
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and is_dicom_file(p))


def index_by_modality(paths: Iterable[str | Path]) -> dict[str, list[tuple[Path, pydicom.Dataset]]]:
    """{Modality: [(path, header), ...]}; unreadable files are logged and skipped."""
    out: dict[str, list[tuple[Path, pydicom.Dataset]]] = {}
    for path in paths:
        try:
            ds = read_header(path)
        except DicomSeriesError as exc:
            log.warning("skipping %s", exc)
            continue
        out.setdefault(str(getattr(ds, "Modality", "UNKNOWN")), []).append((Path(path), ds))
    return out


# --------------------------------------------------------------------------------------------- geometry
def orientation(ds: pydicom.Dataset) -> np.ndarray:
    """ImageOrientationPatient as a (2, 3) array (row cosine, column cosine); axial identity if absent."""
    iop = getattr(ds, "ImageOrientationPatient", None)
    if iop is None or len(iop) != 6:
        return np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    return np.asarray([float(v) for v in iop], dtype=np.float64).reshape(2, 3)


def slice_normal(iop: np.ndarray) -> np.ndarray:
    """Unit normal = row cosine × column cosine."""
    normal = np.cross(iop[0], iop[1])
    return normal / np.linalg.norm(normal)


def position(ds: pydicom.Dataset) -> np.ndarray | None:
    ipp = getattr(ds, "ImagePositionPatient", None)
    return None if ipp is None or len(ipp) != 3 else np.asarray([float(v) for v in ipp], dtype=np.float64)


def pixel_spacing(ds: pydicom.Dataset, source: str | Path = "") -> tuple[float, float]:
    """(row spacing Δr, column spacing Δc) in mm."""
    spacing = getattr(ds, "PixelSpacing", None)
    if spacing is None or len(spacing) != 2:
        raise DicomSeriesError(f"{source}: missing field PixelSpacing")
    return float(spacing[0]), float(spacing[1])


def sort_slices(datasets: Sequence[pydicom.Dataset], sources: Sequence[str | Path] | None = None) -> tuple[list[int], np.ndarray]:
    """Order of ``datasets`` along the slice normal, and each slice's position on it (mm), ascending.

    Falls back to SliceLocation, then InstanceNumber, with a logged warning, when ImagePositionPatient
    is missing on any slice.
    """
    if not datasets:
        return [], np.zeros(0)
    sources = list(sources) if sources is not None else [""] * len(datasets)
    normal = slice_normal(orientation(datasets[0]))
    positions = [position(ds) for ds in datasets]
    if all(p is not None for p in positions):
        along = np.array([float(np.dot(p, normal)) for p in positions])
    elif all(getattr(ds, "SliceLocation", None) is not None for ds in datasets):
        log.warning("%s: ImagePositionPatient missing; sorting by SliceLocation", sources[0])
        along = np.array([float(ds.SliceLocation) for ds in datasets])
    else:
        log.warning("%s: ImagePositionPatient and SliceLocation missing; sorting by InstanceNumber", sources[0])
        along = np.array([float(getattr(ds, "InstanceNumber", i) or i) for i, ds in enumerate(datasets)])
    order = [int(i) for i in np.argsort(along, kind="stable")]
    return order, along[order]


def group_slices(datasets: Sequence[pydicom.Dataset], angle_tol_deg: float = 1.0) -> list[list[int]]:
    """Split a series into stacks of the same orientation and image size (several axial stacks, scouts,
    mixed sizes). Returns lists of indices into ``datasets``, largest group first."""
    groups: list[tuple[np.ndarray, tuple, list[int]]] = []
    cos_tol = np.cos(np.deg2rad(angle_tol_deg))
    for index, ds in enumerate(datasets):
        normal = slice_normal(orientation(ds))
        size = (int(getattr(ds, "Rows", 0)), int(getattr(ds, "Columns", 0)))
        for ref_normal, ref_size, members in groups:
            if ref_size == size and abs(float(np.dot(ref_normal, normal))) >= cos_tol:
                members.append(index)
                break
        else:
            groups.append((normal, size, [index]))
    return [members for _, _, members in sorted(groups, key=lambda g: -len(g[2]))]


# ------------------------------------------------------------------------------------------------ pixels
def pixel_data(ds: pydicom.Dataset, source: str | Path = "", rescale: bool = True) -> np.ndarray:
    """Pixel array as float32, with RescaleSlope/RescaleIntercept applied when ``rescale``.

    A compressed transfer syntax without an installed decoder raises DicomSeriesError naming the file
    and the transfer syntax (install pylibjpeg + pylibjpeg-openjpeg/-libjpeg, or gdcm).
    """
    try:
        array = ds.pixel_array
    except Exception as exc:  # pydicom raises RuntimeError/NotImplementedError/ValueError by handler
        syntax = getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)
        name = getattr(syntax, "name", str(syntax))
        raise DicomSeriesError(f"{source}: cannot decode pixel data (transfer syntax {name} {syntax}): "
                               f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from exc
    array = np.asarray(array, dtype=np.float32)
    if rescale:
        slope = float(getattr(ds, "RescaleSlope", 1.0) or 1.0)
        intercept = float(getattr(ds, "RescaleIntercept", 0.0) or 0.0)
        array = array * slope + intercept
    return array


@dataclass
class Volume:
    """A 3D image with its patient-space geometry.

    Attributes:
        array: (slices, rows, columns) float32.
        origin_mm: patient position of voxel (0, 0, 0).
        spacing_mm: (Δs between slices, Δr between rows, Δc between columns).
        row_dir, col_dir, normal: unit vectors of increasing column, row and slice index.
        slice_positions_mm: each slice's position along ``normal``.
        sources: file of each slice, in slice order.
        slice_origins_mm: (K, 3) ImagePositionPatient of each slice (exact even with uneven gaps).
    """

    array: np.ndarray
    origin_mm: np.ndarray
    spacing_mm: tuple[float, float, float]
    row_dir: np.ndarray
    col_dir: np.ndarray
    normal: np.ndarray
    slice_positions_mm: np.ndarray
    sources: list[Path] = field(default_factory=list)
    slice_origins_mm: np.ndarray | None = None

    @property
    def affine(self) -> np.ndarray:
        """4×4 matrix mapping (i column, j row, k slice, 1) to patient (x, y, z, 1) in mm."""
        ds, dr, dc = self.spacing_mm
        out = np.eye(4)
        out[:3, 0] = self.row_dir * dc
        out[:3, 1] = self.col_dir * dr
        out[:3, 2] = self.normal * ds
        out[:3, 3] = self.origin_mm
        return out

    def voxel_to_patient(self, kji: np.ndarray) -> np.ndarray:
        """(N, 3) voxel indices (k, j, i) → (N, 3) patient mm."""
        kji = np.atleast_2d(np.asarray(kji, dtype=np.float64))
        ijk1 = np.c_[kji[:, 2], kji[:, 1], kji[:, 0], np.ones(len(kji))]
        return (ijk1 @ self.affine.T)[:, :3]

    def patient_to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        """(N, 3) patient mm → (N, 3) fractional voxel indices (k, j, i)."""
        xyz = np.atleast_2d(np.asarray(xyz, dtype=np.float64))
        ijk = (np.c_[xyz, np.ones(len(xyz))] @ np.linalg.inv(self.affine).T)[:, :3]
        return ijk[:, ::-1]


def load_volume(paths: Sequence[str | Path], rescale: bool = True, spacing_tol: float = 0.05,
                skip_unreadable: bool = False) -> Volume:
    """Read a homogeneous stack of single-frame slices (one orientation and size) into a Volume.

    Slices are sorted along the normal; slice spacing is the median gap, and gaps that deviate by more
    than ``spacing_tol`` (relative) are logged (the volume is still built on the median spacing; each
    slice's own ImagePositionPatient stays in ``slice_origins_mm``). Duplicate positions raise an error
    naming both files. With ``skip_unreadable``, files whose header or pixels cannot be read are left
    out with a logged reason (file and transfer syntax) instead of failing the stack.
    """
    if not paths:
        raise DicomSeriesError("no slices given")
    datasets, kept, pixels = [], [], []
    for path in paths:
        try:
            ds = pydicom.dcmread(str(path), force=True)
            pixels.append(pixel_data(ds, path, rescale))
        except (DicomSeriesError, InvalidDicomError, EOFError, OSError, ValueError, AttributeError) as exc:
            if not skip_unreadable:
                raise exc if isinstance(exc, DicomSeriesError) else DicomSeriesError(
                    f"{path}: not a readable DICOM slice ({type(exc).__name__}: {exc})") from exc
            log.warning("skipping unreadable slice: %s", exc)
            continue
        datasets.append(ds)
        kept.append(Path(path))
    if not datasets:
        raise DicomSeriesError(f"{Path(paths[0]).parent}: no readable slices among {len(paths)} files")
    groups = group_slices(datasets)
    if len(groups) > 1:
        raise DicomSeriesError(f"{kept[0].parent}: slices differ in orientation or size "
                               f"({len(groups)} groups); split them with group_slices first")
    order, along = sort_slices(datasets, kept)
    datasets = [datasets[i] for i in order]
    sources = [kept[i] for i in order]
    pixels = [pixels[i] for i in order]
    if len(along) > 1:
        gaps = np.diff(along)
        if np.any(np.isclose(gaps, 0.0, atol=1e-4)):
            dup = int(np.argmax(np.isclose(gaps, 0.0, atol=1e-4)))
            raise DicomSeriesError(f"{sources[dup]} and {sources[dup + 1]}: same ImagePositionPatient "
                                   "(duplicate slice)")
        slice_spacing = float(np.median(gaps))
        if np.any(np.abs(gaps - slice_spacing) > spacing_tol * abs(slice_spacing)):
            log.warning("%s: uneven slice spacing (%.3f-%.3f mm); using the median %.3f mm",
                        sources[0].parent, gaps.min(), gaps.max(), slice_spacing)
    else:
        slice_spacing = float(getattr(datasets[0], "SliceThickness", 1.0) or 1.0)
    iop = orientation(datasets[0])
    row_spacing, col_spacing = pixel_spacing(datasets[0], sources[0])
    origins = [position(ds) for ds in datasets]
    origin = origins[0] if origins[0] is not None else np.zeros(3)
    normal = slice_normal(iop)
    slice_origins = np.array([o if o is not None else origin + normal * (a - along[0])
                              for o, a in zip(origins, along)], dtype=np.float64)
    return Volume(array=np.stack(pixels).astype(np.float32), origin_mm=origin,
                  spacing_mm=(slice_spacing, row_spacing, col_spacing), row_dir=iop[0], col_dir=iop[1],
                  normal=normal, slice_positions_mm=along, sources=sources, slice_origins_mm=slice_origins)
