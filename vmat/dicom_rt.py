"""Read one DICOM-RT case (CT + RTSTRUCT + RTDOSE + RTPLAN) into arrays on the CT grid.

What it gets right (notes/vmat.md, "what it must get right"):
- files are found by content (Modality), in any folder layout and with any names;
- CT: RescaleSlope/RescaleIntercept → HU; slices sorted by ImagePositionPatient projected on the normal
  (common.dicom_series); non-square pixels; the volume is reoriented to the canonical grid (z, y, x)
  with axes along +z, +y, +x (patient superior, posterior, LEFT) so a left-right flip is ``[..., ::-1]``;
- RTDOSE: pixel_array × DoseGridScaling; frame positions IPP + GridFrameOffsetVector (relative, or
  absolute when its first value equals the IPP z); the dose is resampled onto the CT grid with SimpleITK
  (never the masks onto the dose grid: the original's v2.2 mixed grids and lost ~10 Gy of PTV D95);
- RTSTRUCT: each ContourData polygon is rasterized on the CT slice it lies in, several polygons of one
  ROI on one slice combine by XOR (holes), world→pixel uses the slice geometry per axis;
- prescription from RTPLAN: max TargetPrescriptionDose over the dose references, else Σ BeamDose ×
  NumberOfFractionsPlanned, else the config fallback with a warning;
- every inconsistency that makes a case unusable raises :class:`CaseError` with a short reason code,
  so batch preprocessing can skip the case and list why.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom

from common.dicom_series import (
    DicomSeriesError,
    find_dicom_files,
    group_slices,
    index_by_modality,
    load_volume,
    orientation,
    pixel_data,
    pixel_spacing,
    position,
    slice_normal,
)
from common.errors import InputError
from common.slice_geometry import UnevenSlicesError, describe_gaps
from vmat.geometry import (
    grid_bounds_xyz,
    overlap_fraction,
    rasterize_slice_polygons,
    resample_to_grid,
    world_to_voxel,
)
from vmat.structures import StructureMap

log = logging.getLogger(__name__)


class CaseError(InputError):
    """A case that cannot be used; ``code`` is a short reason for the manifest."""

    def __init__(self, code: str, message: str):
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


@dataclass
class Grid:
    """Canonical axis-aligned grid: arrays (z, y, x); origin = patient (x, y, z) of voxel (0, 0, 0)."""

    origin_xyz: np.ndarray
    spacing_zyx: tuple[float, float, float]
    shape_zyx: tuple[int, int, int]
    interpolated_k: tuple = ()  # slice indices made by interpolation (``ct_slice_gaps: interpolate``)

    def bounds(self):
        return grid_bounds_xyz(self.origin_xyz, self.spacing_zyx, self.shape_zyx)

    def to_voxel(self, xyz: np.ndarray) -> np.ndarray:
        return world_to_voxel(xyz, self.origin_xyz, self.spacing_zyx, np.array([1.0, 0, 0]),
                              np.array([0, 1.0, 0]), np.array([0, 0, 1.0]))


@dataclass
class RTCase:
    case_id: str
    ct_hu: np.ndarray
    grid: Grid
    masks: dict  # canonical name -> bool (z, y, x)
    roi_sources: dict  # canonical name -> [ROI names united into it]
    unmatched_rois: list
    dose_gy: np.ndarray | None
    prescription_gy: float
    prescription_source: str
    target_doses_gy: dict
    uids: dict
    warnings: list = field(default_factory=list)
    dose_valid: np.ndarray | None = None  # bool (z, y, x): CT voxels inside the RTDOSE grid
    repairs: list = field(default_factory=list)  # geometry repairs that change numbers (manifest)
    contours: dict = field(default_factory=dict)  # canonical name -> [(z mm, (N, 2) xy mm)] on the CT planes
    # the reference dose on its own RTDOSE grid: (dose Gy (z, y, x) canonical, origin (z, y, x) mm, spacing
    # (z, y, x) mm), for DVHs that read the dose as clinical DVH tools do; None when several RTDOSE files on
    # different grids were summed (then only the CT-grid sum exists)
    rtdose_native: tuple | None = None


# ------------------------------------------------------------------------------------------ orientation
def canonicalize(array: np.ndarray, origin_xyz, spacing_kji, row_dir, col_dir, normal, source: str = ""):
    """Reorient a (k, j, i) volume with axis-aligned direction cosines to canonical (z, y, x), axes along
    +z, +y, +x. Returns (array, origin_xyz, spacing_zyx). Oblique orientations raise CaseError."""
    dirs = [np.asarray(normal, float), np.asarray(col_dir, float), np.asarray(row_dir, float)]  # of axes k, j, i
    patient_axis, signs = [], []
    for d in dirs:
        a = int(np.argmax(np.abs(d)))
        if abs(d[a]) < 0.99:
            raise CaseError("oblique_orientation", f"{source}: direction cosines {np.round(d, 3).tolist()} are not "
                                                   "axis-aligned; oblique CT/dose grids are not supported")
        patient_axis.append(a)
        signs.append(1 if d[a] > 0 else -1)
    if sorted(patient_axis) != [0, 1, 2]:
        raise CaseError("bad_orientation", f"{source}: degenerate ImageOrientationPatient")
    affine = np.eye(4)
    for axis, d, s in zip((2, 1, 0), dirs, spacing_kji):  # column of ijk: i=0, j=1, k=2
        affine[:3, axis] = d * s
    affine[:3, 3] = origin_xyz
    # Canonical axis c (0=z, 1=y, 2=x) comes from array axis with patient_axis == 2 - c.
    order = [patient_axis.index(2 - c) for c in range(3)]
    out = np.transpose(array, order)
    start = [0, 0, 0]
    for c, src_axis in enumerate(order):
        if signs[src_axis] < 0:
            out = np.flip(out, axis=c)
            start[src_axis] = array.shape[src_axis] - 1
    k, j, i = start
    new_origin = (affine @ np.array([i, j, k, 1.0]))[:3]
    spacing = tuple(float(spacing_kji[a]) for a in order)
    return np.ascontiguousarray(out), new_origin, spacing


# ------------------------------------------------------------------------------------------------ files
def find_case_files(folder: str | Path) -> dict:
    """{Modality: [(path, header)]} for every DICOM file under ``folder`` (recursive, by content)."""
    try:
        files = find_dicom_files(folder)
    except DicomSeriesError as exc:
        raise CaseError("no_folder", str(exc)) from exc
    if not files:
        raise CaseError("no_dicom", f"{folder}: no DICOM files found")
    return index_by_modality(files)


def _referenced_series_uid(struct_ds) -> str | None:
    try:
        return str(struct_ds.ReferencedFrameOfReferenceSequence[0].RTReferencedStudySequence[0]
                   .RTReferencedSeriesSequence[0].SeriesInstanceUID)
    except (AttributeError, IndexError):
        return None


def read_ct(entries: Sequence, preferred_series: str | None = None, warnings: list | None = None,
            slice_gaps: str = "error", gap_tolerance_mm: float = 0.1, repairs: list | None = None):
    """CT entries [(path, header)] → (HU array (z, y, x), Grid, frame of reference UID, series UID).

    Geometry is refused rather than guessed (CaseError): several CT series of which the RTSTRUCT
    references none (``ambiguous_ct_series``), slices of different orientation or size in the series
    (``mixed_ct_orientation``), a gantry tilt (``gantry_tilt``: GantryDetectorTilt ≠ 0 or slice positions
    not along the slice normal), missing or uneven slices (``uneven_slices``, naming the series and the
    gaps). ``slice_gaps="interpolate"`` instead interpolates the CT linearly onto the median spacing and
    records the repair in ``repairs`` (the manifest)."""
    warnings = warnings if warnings is not None else []
    repairs = repairs if repairs is not None else []
    if not entries:
        raise CaseError("no_ct", "no CT images found")
    if slice_gaps not in ("error", "interpolate"):
        raise ValueError(f"slice_gaps must be error or interpolate, got {slice_gaps!r}")
    series: dict[str, list] = {}
    for path, ds in entries:
        series.setdefault(str(getattr(ds, "SeriesInstanceUID", "")), []).append((path, ds))
    if preferred_series in series:
        chosen = series[preferred_series]
        if len(series) > 1:
            warnings.append(f"{len(series)} CT series; using {preferred_series}, the one the RTSTRUCT references")
    elif len(series) > 1:
        raise CaseError("ambiguous_ct_series", f"{Path(entries[0][0]).parent}: {len(series)} CT series "
                                               f"({', '.join(f'{uid} ({len(v)} slices)' for uid, v in series.items())}) "
                                               "and the RTSTRUCT references none of them; keep one per case folder")
    else:
        chosen = next(iter(series.values()))
    uid = str(getattr(chosen[0][1], "SeriesInstanceUID", ""))
    label = f"CT series {uid} ({Path(chosen[0][0]).parent})"
    groups = group_slices([ds for _, ds in chosen])
    if len(groups) > 1:
        raise CaseError("mixed_ct_orientation", f"{label}: slices of {len(groups)} different orientations or image "
                                                f"sizes ({[len(g) for g in groups]} slices); a localizer or a second "
                                                "stack in the series? keep one axial stack")
    tilts = {float(getattr(ds, "GantryDetectorTilt", 0.0) or 0.0) for _, ds in chosen}
    if any(abs(t) > 1e-3 for t in tilts):
        raise CaseError("gantry_tilt", f"{label}: GantryDetectorTilt {sorted(tilts)} deg; tilted (sheared) CT "
                                       "stacks are not supported: reconstruct without tilt")
    paths = [chosen[i][0] for i in groups[0]]
    try:
        volume = load_volume(paths, slice_gaps=slice_gaps, gap_tolerance_mm=gap_tolerance_mm)
    except UnevenSlicesError as exc:
        raise CaseError("uneven_slices", f"{label}: slice spacing {exc.step_mm:.2f} mm but gap(s) of "
                                         f"{describe_gaps(exc.gaps_mm)} (positions along the slice normal, mm): "
                                         "missing or uneven slices; set preprocess.ct.slice_gaps: interpolate "
                                         "to interpolate them") from exc
    except DicomSeriesError as exc:
        raise CaseError("ct_unreadable", str(exc)) from exc
    worst = volume.sideways_shift_mm
    if worst > gap_tolerance_mm:
        raise CaseError("gantry_tilt", f"{label}: slice positions move {worst:.2f} mm across the image plane "
                                       "from slice to slice (gantry tilt or sheared stack); not supported")
    first = pydicom.dcmread(str(volume.sources[0]), stop_before_pixels=True)
    array, spacing_kji, interpolated = volume.array, volume.spacing_mm, list(volume.interpolated_k)
    if interpolated:
        repairs.append(f"CT slices interpolated to {volume.spacing_mm[0]:.3f} mm over gap(s) of "
                       f"{describe_gaps(volume.uneven_gaps_mm)} ({len(interpolated)} slice(s) made)")
    hu, origin, spacing = canonicalize(array, volume.origin_mm, spacing_kji, volume.row_dir,
                                       volume.col_dir, volume.normal, str(volume.sources[0].parent))
    if interpolated and float(np.dot(volume.normal, [0, 0, 1])) < 0:  # the slice axis was flipped
        interpolated = [hu.shape[0] - 1 - k for k in interpolated]
    grid = Grid(origin_xyz=np.asarray(origin, float), spacing_zyx=spacing, shape_zyx=tuple(hu.shape),
                interpolated_k=tuple(sorted(interpolated)))
    return hu.astype(np.float32), grid, str(getattr(first, "FrameOfReferenceUID", "")), str(first.SeriesInstanceUID)


# --------------------------------------------------------------------------------------------- RTSTRUCT
def _frame_of_reference_of_struct(ds) -> set[str]:
    uids = set()
    for item in getattr(ds, "StructureSetROISequence", []):
        if getattr(item, "ReferencedFrameOfReferenceUID", None):
            uids.add(str(item.ReferencedFrameOfReferenceUID))
    for item in getattr(ds, "ReferencedFrameOfReferenceSequence", []):
        if getattr(item, "FrameOfReferenceUID", None):
            uids.add(str(item.FrameOfReferenceUID))
    return uids


def rasterize_roi(contour_items, grid: Grid, roi_name: str, source: str, warnings: list,
                  plane_tol_vox: float = 0.3, contours_out: list | None = None) -> np.ndarray:
    """All CLOSED_PLANAR contours of one ROI → bool mask on ``grid`` (XOR per slice).

    ``contours_out`` receives each polygon as (plane z mm, (N, 2) xy mm) for the sub-voxel DVH
    (vmat.dvh.ContourSampler). Slices made by CT slice interpolation that carry no contour of the ROI
    take the mask interpolated between the nearest original slices (threshold 0.5)."""
    nz, ny, nx = grid.shape_zyx
    per_slice: dict[int, list] = {}
    for item in contour_items:
        kind = str(getattr(item, "ContourGeometricType", "CLOSED_PLANAR")).upper()
        data = getattr(item, "ContourData", None)
        if kind != "CLOSED_PLANAR":
            warnings.append(f"ROI '{roi_name}': ignored a {kind} contour")
            continue
        if data is None or len(data) < 9:
            continue  # fewer than 3 points: no area
        points = np.asarray([float(v) for v in data], dtype=np.float64).reshape(-1, 3)
        kji = grid.to_voxel(points)
        k_mean = float(kji[:, 0].mean())
        if np.ptp(kji[:, 0]) > 2 * plane_tol_vox:
            warnings.append(f"ROI '{roi_name}': a contour is not planar in z; rasterized on its mean slice")
        k = int(round(k_mean))
        if k < 0 or k >= nz or abs(k - k_mean) > 0.5 + 1e-6:
            raise CaseError("contour_outside_ct", f"{source}: ROI '{roi_name}' has a contour at z = "
                                                  f"{points[0, 2]:.1f} mm, outside the CT slices "
                                                  f"({grid.origin_xyz[2]:.1f} .. "
                                                  f"{grid.origin_xyz[2] + (nz - 1) * grid.spacing_zyx[0]:.1f} mm)")
        if abs(k - k_mean) > plane_tol_vox:
            warnings.append(f"ROI '{roi_name}': contour at z = {points[0, 2]:.2f} mm lies between CT slices; "
                            "assigned to the nearest")
        j, i = kji[:, 1], kji[:, 2]
        if j.max() < -0.5 or j.min() > ny - 0.5 or i.max() < -0.5 or i.min() > nx - 0.5:
            raise CaseError("contour_outside_ct", f"{source}: ROI '{roi_name}' has a contour outside the CT image "
                                                  f"at z = {points[0, 2]:.1f} mm")
        if j.min() < -0.5 or j.max() > ny - 0.5 or i.min() < -0.5 or i.max() > nx - 0.5:
            warnings.append(f"ROI '{roi_name}': contour partly outside the CT image; clipped")
        per_slice.setdefault(k, []).append((i, j))
        if contours_out is not None:
            contours_out.append((float(points[:, 2].mean()), points[:, :2].copy()))
    mask = np.zeros(grid.shape_zyx, dtype=bool)
    for k, polygons in per_slice.items():
        mask[k] = rasterize_slice_polygons(polygons, (ny, nx))
    made = set(grid.interpolated_k)
    if made:
        original = np.array([k for k in range(nz) if k not in made])
        for k in sorted(made - set(per_slice)):
            lo, hi = original[original < k], original[original > k]
            if len(lo) and len(hi):
                lo, hi = int(lo[-1]), int(hi[0])
                w = (k - lo) / (hi - lo)
                mask[k] = (mask[lo] * (1 - w) + mask[hi] * w) >= 0.5
    return mask


def read_rtstruct(path: Path, grid: Grid, structure_map: StructureMap, ct_frame_uid: str, warnings: list):
    """Masks of every matched ROI (union of ROIs mapped to one canonical name), ROI sources, unmatched."""
    ds = pydicom.dcmread(str(path))
    frames = _frame_of_reference_of_struct(ds)
    if ct_frame_uid and frames and ct_frame_uid not in frames:
        raise CaseError("mixed_frame_of_reference", f"{path}: RTSTRUCT frame of reference {sorted(frames)} differs "
                                                    f"from the CT's {ct_frame_uid}")
    names = {int(item.ROINumber): str(item.ROIName) for item in getattr(ds, "StructureSetROISequence", [])}
    contours_by_number = {int(item.ReferencedROINumber): list(getattr(item, "ContourSequence", []))
                          for item in getattr(ds, "ROIContourSequence", [])}
    groups, unmatched = structure_map.assign(names.values())
    number_of = {}
    for number, name in names.items():
        number_of.setdefault(name, []).append(number)
    masks, sources, contours = {}, {}, {}
    for canonical, roi_names in groups.items():
        union = np.zeros(grid.shape_zyx, dtype=bool)
        polygons: list = []
        for roi_name in roi_names:
            for number in number_of[roi_name]:
                items = contours_by_number.get(number, [])
                roi_mask = rasterize_roi(items, grid, roi_name, str(path), warnings, contours_out=polygons)
                if not roi_mask.any():
                    warnings.append(f"ROI '{roi_name}' ({canonical}) is empty")
                union |= roi_mask
        if union.any():
            masks[canonical] = union
            sources[canonical] = roi_names
            if len(roi_names) == 1 and len(number_of[roi_names[0]]) == 1:
                contours[canonical] = polygons  # (a union of several ROIs has no single contour set)
        else:
            sources[canonical] = roi_names
            warnings.append(f"structure {canonical} has no voxels (ROIs {roi_names})")
    return masks, sources, unmatched, contours


# ----------------------------------------------------------------------------------------------- RTDOSE
def read_rtdose(path: Path, warnings: list | None = None):
    """RTDOSE file → (dose Gy (z, y, x) canonical, origin_xyz, spacing_zyx, frame of reference UID)."""
    warnings = warnings if warnings is not None else []
    ds = pydicom.dcmread(str(path))
    scaling = getattr(ds, "DoseGridScaling", None)
    if scaling is None:
        raise CaseError("bad_rtdose", f"{path}: missing field DoseGridScaling")
    units = str(getattr(ds, "DoseUnits", "GY")).upper()
    try:
        frames = pixel_data(ds, path, rescale=False) * float(scaling)
    except DicomSeriesError as exc:
        raise CaseError("rtdose_unreadable", str(exc)) from exc
    if units == "RELATIVE":
        raise CaseError("bad_rtdose", f"{path}: DoseUnits RELATIVE cannot be converted to Gy")
    if frames.ndim == 2:
        frames = frames[None]
    ipp = position(ds)
    if ipp is None:
        raise CaseError("bad_rtdose", f"{path}: missing field ImagePositionPatient")
    iop = orientation(ds)
    normal = slice_normal(iop)
    offsets = getattr(ds, "GridFrameOffsetVector", None)
    n_frames = frames.shape[0]
    if offsets is None or len(offsets) != n_frames:
        if n_frames > 1:
            raise CaseError("bad_rtdose", f"{path}: GridFrameOffsetVector has "
                                          f"{0 if offsets is None else len(offsets)} values for {n_frames} frames")
        offsets = [0.0]
    offsets = np.asarray([float(v) for v in offsets])
    if abs(offsets[0]) > 1e-6:
        if abs(offsets[0] - float(np.dot(ipp, normal))) < 1e-3:  # absolute positions (PS3.3 C.8.8.3.2)
            offsets = offsets - offsets[0]
        else:
            raise CaseError("bad_rtdose", f"{path}: GridFrameOffsetVector starts at {offsets[0]} (neither 0 nor "
                                          "the ImagePositionPatient z)")
    order = np.argsort(offsets)
    offsets, frames = offsets[order], frames[order]
    origin = ipp + offsets[0] * normal
    gaps = np.diff(offsets)
    if len(gaps) and np.ptp(gaps) > 1e-3 * max(abs(gaps.mean()), 1e-6):
        # Uneven frame spacing: interpolate onto the smallest gap (linear along the normal).
        step = float(gaps.min())
        uniform = np.arange(offsets[0], offsets[-1] + 1e-6, step)
        idx = np.clip(np.searchsorted(offsets, uniform, side="right") - 1, 0, len(offsets) - 2)
        w = ((uniform - offsets[idx]) / (offsets[idx + 1] - offsets[idx]))[:, None, None]
        frames = frames[idx] * (1 - w) + frames[idx + 1] * w
        warnings.append(f"RTDOSE frames unevenly spaced; interpolated to {step:.3f} mm")
        gaps = np.array([step])
    slice_step = float(gaps.mean()) if len(gaps) else float(getattr(ds, "SliceThickness", 1.0) or 1.0)
    dr, dc = pixel_spacing(ds, path)
    dose, origin_xyz, spacing = canonicalize(frames.astype(np.float32), origin, (slice_step, dr, dc),
                                             iop[0], iop[1], normal, str(path))
    if units == "CGY":
        dose = dose / 100.0
    return dose, origin_xyz, spacing, str(getattr(ds, "FrameOfReferenceUID", ""))


def _summation_type(ds) -> str:
    return str(getattr(ds, "DoseSummationType", "PLAN") or "PLAN").upper()


def _referenced_beam(ds) -> tuple[str | None, int | None]:
    """(referenced RTPLAN SOP UID, referenced beam number) of a BEAM dose, None where absent."""
    try:
        plan = ds.ReferencedRTPlanSequence[0]
    except (AttributeError, IndexError):
        return None, None
    try:
        beam = int(plan.ReferencedFractionGroupSequence[0].ReferencedBeamSequence[0].ReferencedBeamNumber)
    except (AttributeError, IndexError, TypeError, ValueError):
        beam = None
    return str(getattr(plan, "ReferencedSOPInstanceUID", "") or "") or None, beam


def _plan_beams(plan_entries: Sequence) -> dict:
    """{RTPLAN SOP UID: set of treatment beam numbers}."""
    out = {}
    for path, header in plan_entries:
        ds = header if hasattr(header, "BeamSequence") else pydicom.dcmread(str(path), stop_before_pixels=True)
        out[str(ds.SOPInstanceUID)] = {int(b.BeamNumber) for b in getattr(ds, "BeamSequence", [])
                                       if str(getattr(b, "TreatmentDeliveryType", "TREATMENT")).upper() == "TREATMENT"}
    return out


def choose_dose_files(entries: Sequence, plan_entries: Sequence = (), warnings: list | None = None) -> list:
    """The RTDOSE file(s) that make the planned total dose, by DoseSummationType (PS3.3 C.8.8.3).

    - one PLAN (or MULTI_PLAN) dose: used; other RTDOSE files beside it are ignored with a warning;
    - several PLAN doses: refused (``ambiguous_rtdose``);
    - only BEAM doses: summed when each references its beam and together they are exactly the treatment
      beams of the RTPLAN they reference (else refused: ``incomplete_beam_doses``); the sum is recorded;
    - FRACTION (one fraction), BRACHY, CONTROL_POINT, RECORD or other types: refused
      (``rtdose_summation``): the total planned dose cannot be read from them without guessing.
    """
    warnings = warnings if warnings is not None else []
    if not entries:
        return []
    by_type: dict[str, list] = {}
    for entry in entries:
        by_type.setdefault(_summation_type(entry[1]), []).append(entry)
    for kind in ("PLAN", "MULTI_PLAN"):
        chosen = by_type.get(kind, [])
        if len(chosen) > 1:
            raise CaseError("ambiguous_rtdose", f"{len(chosen)} RTDOSE files of type {kind}: "
                                                f"{[str(p.name) for p, _ in chosen]}; keep one per case folder")
        if chosen:
            others = [f"{p.name} ({_summation_type(ds)})" for p, ds in entries if (p, ds) not in chosen]
            if others:
                warnings.append(f"using the {kind} RTDOSE {chosen[0][0].name}; ignored {others}")
            if kind == "MULTI_PLAN":
                warnings.append(f"{chosen[0][0].name}: DoseSummationType MULTI_PLAN (a sum of several plans) used "
                                "as the reference dose")
            return chosen
    beams = by_type.get("BEAM", [])
    if beams and set(by_type) == {"BEAM"}:
        refs = [_referenced_beam(ds) for _, ds in beams]
        names = [str(p.name) for p, _ in beams]
        if any(plan is None or beam is None for plan, beam in refs):
            raise CaseError("incomplete_beam_doses", f"{len(beams)} BEAM RTDOSE files {names}, not all naming their "
                                                     "RTPLAN and beam number (ReferencedRTPlanSequence): cannot check "
                                                     "that they sum to the plan")
        plans = {plan for plan, _ in refs}
        numbers = [beam for _, beam in refs]
        if len(plans) > 1 or len(set(numbers)) != len(numbers):
            raise CaseError("incomplete_beam_doses", f"BEAM RTDOSE files {names} reference plans {sorted(plans)} and "
                                                     f"beams {numbers}: not one plan's beams, each once")
        planned = _plan_beams(plan_entries).get(next(iter(plans)))
        if planned is None:
            raise CaseError("incomplete_beam_doses", f"BEAM RTDOSE files {names} reference RTPLAN {next(iter(plans))}, "
                                                     "which is not in the case folder: cannot check that they are all "
                                                     "its beams")
        if set(numbers) != planned:
            raise CaseError("incomplete_beam_doses", f"BEAM RTDOSE files cover beams {sorted(numbers)} of the plan's "
                                                     f"treatment beams {sorted(planned)}: missing "
                                                     f"{sorted(planned - set(numbers))}")
        warnings.append(f"reference dose = sum of {len(beams)} BEAM RTDOSE files (beams {sorted(numbers)})")
        return beams
    kinds = {k: [str(p.name) for p, _ in v] for k, v in by_type.items()}
    raise CaseError("rtdose_summation", f"RTDOSE DoseSummationType {kinds}: no PLAN dose and no complete set of BEAM "
                                        "doses (a FRACTION dose is one fraction's dose); export the plan's total "
                                        "(PLAN) dose")


def dose_and_coverage_on_grid(dose_files: Sequence, grid: Grid, ct_frame_uid: str, interpolation: str,
                              warnings: list, native: list | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(dose Gy, valid) on the CT grid: the sum of the RTDOSE files, and where it is known.
    ``native``: a list that receives (dose Gy, origin zyx mm, spacing zyx mm) of the sum on the RTDOSE
    grid itself when every file shares one grid (nothing is appended otherwise).

    A CT voxel is covered when its centre lies within the box of every RTDOSE grid's voxel centres (1 µm
    tolerance), where the dose is interpolated; the half voxel beyond the outermost dose centres would be
    extrapolation (SimpleITK repeats the edge value there) and counts as not covered. Outside, the dose is
    unknown: the array holds 0 there but ``valid`` is False, and every consumer (training loss, metrics,
    DVHs) leaves such voxels out."""
    total = np.zeros(grid.shape_zyx, dtype=np.float32)
    valid = np.ones(grid.shape_zyx, dtype=bool)
    own_grid, own_sum = None, None
    for path, _ in dose_files:
        dose, origin, spacing, frame_uid = read_rtdose(path, warnings)
        key = (dose.shape, tuple(np.round(np.asarray(origin, float), 4)), tuple(np.round(np.asarray(spacing, float), 4)))
        if own_sum is None or key == own_grid:
            own_grid, own_sum = key, (dose.astype(np.float32) if own_sum is None else own_sum + dose)
        else:
            own_grid = "mixed"
        if ct_frame_uid and frame_uid and frame_uid != ct_frame_uid:
            raise CaseError("mixed_frame_of_reference", f"{path}: RTDOSE frame of reference {frame_uid} differs "
                                                        f"from the CT's {ct_frame_uid}")
        dose_bounds = grid_bounds_xyz(origin, spacing, dose.shape)
        covered = overlap_fraction(grid.bounds(), dose_bounds)
        if covered <= 0.0:
            raise CaseError("dose_outside_ct", f"{path}: the dose grid ({np.round(dose_bounds[0], 1).tolist()} .. "
                                               f"{np.round(dose_bounds[1], 1).tolist()} mm) does not overlap the CT")
        kw = {"src_origin_xyz": origin, "src_spacing_zyx": spacing, "dst_origin_xyz": grid.origin_xyz,
              "dst_spacing_zyx": grid.spacing_zyx, "dst_shape_zyx": grid.shape_zyx}
        resampled = resample_to_grid(dose, interpolation=interpolation, default=0.0, **kw)
        total += np.clip(resampled, 0.0, None)  # B-spline can undershoot below 0 Gy
        axes = []  # canonical axes z, y, x: CT centres within the dose centres' range
        for c, xyz in enumerate((2, 1, 0)):
            centres = grid.origin_xyz[xyz] + np.arange(grid.shape_zyx[c]) * grid.spacing_zyx[c]
            axes.append((centres >= dose_bounds[0][xyz] - 1e-3) & (centres <= dose_bounds[1][xyz] + 1e-3))
        valid &= axes[0][:, None, None] & axes[1][None, :, None] & axes[2][None, None, :]
    total[~valid] = 0.0
    if native is not None and own_grid not in (None, "mixed"):
        native.append((np.clip(own_sum, 0.0, None), np.asarray(own_grid[1], float)[::-1].copy(),
                       np.asarray(own_grid[2], float)))
    return total, valid


def dose_on_grid(dose_files: Sequence, grid: Grid, ct_frame_uid: str, interpolation: str, warnings: list) -> np.ndarray:
    """Sum of the RTDOSE files resampled onto the CT grid (0 where unknown: see dose_and_coverage_on_grid)."""
    return dose_and_coverage_on_grid(dose_files, grid, ct_frame_uid, interpolation, warnings)[0]


# ----------------------------------------------------------------------------------------------- RTPLAN
def read_prescription(plan_entries: Sequence, fallback_gy: float | None, warnings: list) -> tuple[float, str, dict]:
    """(prescription Gy, source, {target description: Gy})."""
    for path, _ in plan_entries:
        ds = pydicom.dcmread(str(path), stop_before_pixels=True)
        targets = {}
        for ref in getattr(ds, "DoseReferenceSequence", []):
            dose = getattr(ref, "TargetPrescriptionDose", None)
            if dose is not None and float(dose) > 0:
                name = str(getattr(ref, "DoseReferenceDescription", "") or f"ref{getattr(ref, 'DoseReferenceNumber', '')}")
                targets[name] = float(dose)
        if targets:
            return max(targets.values()), "RTPLAN TargetPrescriptionDose", targets
        for group in getattr(ds, "FractionGroupSequence", []):
            n_fx = getattr(group, "NumberOfFractionsPlanned", None)
            beam_doses = [float(b.BeamDose) for b in getattr(group, "ReferencedBeamSequence", [])
                          if getattr(b, "BeamDose", None) is not None]
            if n_fx and beam_doses:
                return float(sum(beam_doses) * int(n_fx)), "RTPLAN BeamDose x NumberOfFractionsPlanned", {}
    if fallback_gy is None:
        raise CaseError("no_prescription", "no RTPLAN prescription and no prescription fallback configured")
    warnings.append(f"no prescription in an RTPLAN; using the configured fallback {fallback_gy} Gy")
    return float(fallback_gy), "config fallback", {}


# ---------------------------------------------------------------------------------------------- a case
def load_rt_case(folder: str | Path, structure_map: StructureMap, *, required: Sequence[str] = (),
                 fallback_prescription_gy: float | None = 70.0, dose_interpolation: str = "linear",
                 require_dose: bool = True, ct_slice_gaps: str = "error", gap_tolerance_mm: float = 0.1) -> RTCase:
    """Read everything of one case folder onto the CT grid; raises CaseError with a reason code.

    ``ct_slice_gaps``: "error" (default) refuses missing or uneven CT slices; "interpolate" interpolates
    them and records the repair in ``RTCase.repairs``."""
    folder = Path(folder)
    warnings: list[str] = []
    repairs: list[str] = []
    by_modality = find_case_files(folder)
    structs = by_modality.get("RTSTRUCT", [])
    if not structs:
        raise CaseError("no_rtstruct", f"{folder}: no RTSTRUCT file")
    if len(structs) > 1:
        warnings.append(f"{len(structs)} RTSTRUCT files; using {structs[0][0].name}")
    struct_path, struct_header = structs[0]
    ct_hu, grid, ct_frame, ct_series = read_ct(by_modality.get("CT", []), _referenced_series_uid(struct_header), warnings,
                                               slice_gaps=ct_slice_gaps, gap_tolerance_mm=gap_tolerance_mm,
                                               repairs=repairs)
    masks, sources, unmatched, contours = read_rtstruct(struct_path, grid, structure_map, ct_frame, warnings)
    missing = [name for name in required if name not in sources]
    if missing:
        hint = " (non-SIB case?)" if any(n.upper().startswith("PTV") for n in missing) else ""
        raise CaseError("missing_structure", f"{folder}: required structure(s) {missing} not found{hint}; "
                                             f"ROI names: {sorted(set(sum(sources.values(), [])) | set(unmatched))}")
    empty = [name for name in required if name not in masks]
    if empty:
        raise CaseError("empty_contour", f"{folder}: required structure(s) {empty} have no contour voxels "
                                         f"(ROIs {[sources[n] for n in empty]})")
    dose_files = choose_dose_files(by_modality.get("RTDOSE", []), by_modality.get("RTPLAN", []), warnings)
    if not dose_files and require_dose:
        raise CaseError("no_rtdose", f"{folder}: no RTDOSE file")
    native: list = []
    dose, dose_valid = (dose_and_coverage_on_grid(dose_files, grid, ct_frame, dose_interpolation, warnings, native)
                        if dose_files else (None, None))
    rx, rx_source, targets = read_prescription(by_modality.get("RTPLAN", []), fallback_prescription_gy, warnings)
    first_ct = by_modality["CT"][0][1]
    uids = {"frame_of_reference_uid": ct_frame, "study_instance_uid": str(getattr(first_ct, "StudyInstanceUID", "")),
            "ct_series_instance_uid": ct_series, "patient_id": str(getattr(first_ct, "PatientID", "")),
            "patient_name": str(getattr(first_ct, "PatientName", ""))}
    for message in warnings:
        log.info("%s: %s", folder.name, message)
    if unmatched:
        log.info("%s: unmatched ROI names %s", folder.name, unmatched)
    return RTCase(case_id=folder.name, ct_hu=ct_hu, grid=grid, masks=masks, roi_sources=sources,
                  unmatched_rois=unmatched, dose_gy=dose, prescription_gy=rx, prescription_source=rx_source,
                  target_doses_gy=targets, uids=uids, warnings=warnings, dose_valid=dose_valid, repairs=repairs,
                  rtdose_native=native[0] if native else None,
                  contours=contours)
