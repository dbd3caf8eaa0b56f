"""DICOM image series: find files by content, group and sort slices by geometry, build volumes.

Shared by vmat (CT, RTDOSE) and rsna_spine (MR). What it gets right (notes/vmat.md, notes/rsna_spine.md):
- files are identified by their content (Modality, SeriesInstanceUID), never by name;
- slices are sorted by ImagePositionPatient projected on the slice normal (the cross product of the
  ImageOrientationPatient row and column cosines), not by InstanceNumber;
- PixelSpacing is (row spacing, column spacing) = (Δy between rows, Δx between columns) and may differ;
- stored values become real values through RescaleSlope / RescaleIntercept;
- compressed pixel data without an installed decoder is a clear error naming the file and transfer syntax;
- orientation is never guessed and missing or uneven slices are refused unless the caller asks to keep or
  interpolate them (:mod:`common.slice_geometry`).

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

from common.slice_geometry import (  # also the names vmat and rsna_spine import from here
    DicomSeriesError,
    UnevenSlicesError,
    describe_gaps,
    group_slices,
    interpolate_slices,
    orientation,
    pixel_spacing,
    position,
    sideways_shift_mm,
    slice_normal,
    sort_slices,
    uneven_gaps,
)

log = logging.getLogger(__name__)


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
        uneven_gaps_mm: [(position_lo, position_hi)] gaps that break the uniform spacing as read (kept or
            interpolated on request; see :func:`load_volume`).
        interpolated_k: indices of slices made by interpolation (empty unless asked for).
        sideways_shift_mm: largest slice-to-slice move of the slices as read across the image plane
            (0 for a straight stack, > 0 for a gantry-tilted or sheared one).
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
    uneven_gaps_mm: list[tuple[float, float]] = field(default_factory=list)
    interpolated_k: list[int] = field(default_factory=list)
    sideways_shift_mm: float = 0.0

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(int(v) for v in self.array.shape)

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


SLICE_GAP_POLICIES = ("error", "keep", "interpolate")


def load_volume(paths: Sequence[str | Path], rescale: bool = True, skip_unreadable: bool = False,
                slice_gaps: str = "error", gap_tolerance_mm: float = 0.1) -> Volume:
    """Read a homogeneous stack of single-frame slices (one orientation and size) into a Volume.

    Slices are sorted along the normal and the slice spacing is the median gap. A gap differing from it
    by more than ``gap_tolerance_mm`` (a missing slice, an uneven gap) is handled by ``slice_gaps``:
    ``"error"`` (default) raises UnevenSlicesError naming the folder and the gaps; ``"keep"`` keeps the
    slices as read (the median spacing in ``spacing_mm`` is then nominal: each slice's own position stays
    in ``slice_origins_mm``; use it for anything metric); ``"interpolate"`` resamples linearly onto the
    median spacing and lists the made slices in ``interpolated_k``. The gaps found are in
    ``uneven_gaps_mm`` either way (``sources`` stays the files read). Duplicate positions raise an error naming both files. With
    ``skip_unreadable``, files whose header or pixels cannot be read are left out with a logged reason.
    """
    if slice_gaps not in SLICE_GAP_POLICIES:
        raise ValueError(f"slice_gaps must be one of {SLICE_GAP_POLICIES}, got {slice_gaps!r}")
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
    groups = group_slices(datasets, sources=kept)
    if len(groups) > 1:
        raise DicomSeriesError(f"{kept[0].parent}: slices differ in orientation or size "
                               f"({len(groups)} groups); split them with group_slices first")
    order, along = sort_slices(datasets, kept)
    datasets = [datasets[i] for i in order]
    sources = [kept[i] for i in order]
    array = np.stack([pixels[i] for i in order]).astype(np.float32)
    gaps_found: list[tuple[float, float]] = []
    if len(along) > 1:
        gaps = np.diff(along)
        if np.any(np.isclose(gaps, 0.0, atol=1e-4)):
            dup = int(np.argmax(np.isclose(gaps, 0.0, atol=1e-4)))
            raise DicomSeriesError(f"{sources[dup]} and {sources[dup + 1]}: same ImagePositionPatient "
                                   "(duplicate slice)")
        slice_spacing = float(np.median(gaps))
        gaps_found = uneven_gaps(along, gap_tolerance_mm)
    else:
        slice_spacing = float(getattr(datasets[0], "SliceThickness", 1.0) or 1.0)
    iop = orientation(datasets[0], sources[0])
    row_spacing, col_spacing = pixel_spacing(datasets[0], sources[0])
    origins = [position(ds) for ds in datasets]
    origin = origins[0] if origins[0] is not None else np.zeros(3)
    normal = slice_normal(iop)
    slice_origins = np.array([o if o is not None else origin + normal * (a - along[0])
                              for o, a in zip(origins, along)], dtype=np.float64)
    interpolated: list[int] = []
    shift_mm = sideways_shift_mm(slice_origins, normal)  # of the slices as read, before any interpolation
    if gaps_found:
        described = (f"{sources[0].parent}: slice spacing {slice_spacing:.2f} mm but gap(s) of "
                     f"{describe_gaps(gaps_found)} (positions along the slice normal, mm): missing or uneven slices")
        if slice_gaps == "error":
            raise UnevenSlicesError(described, gaps_found, slice_spacing)
        if slice_gaps == "interpolate":
            array, along, interpolated = interpolate_slices(array, along, slice_spacing)
            slice_origins = origin + np.outer(along - along[0], normal)
            log.warning("%s; %d slice(s) interpolated", described, len(interpolated))
        else:
            log.warning("%s; kept as read", described)
    return Volume(array=array, origin_mm=origin, spacing_mm=(slice_spacing, row_spacing, col_spacing),
                  row_dir=iop[0], col_dir=iop[1], normal=normal, slice_positions_mm=along, sources=sources,
                  slice_origins_mm=slice_origins, uneven_gaps_mm=gaps_found, interpolated_k=interpolated,
                  sideways_shift_mm=shift_mm)
