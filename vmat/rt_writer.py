"""Write DICOM-RT objects with pydicom: CT series, RTSTRUCT, RTDOSE, RTPLAN.

Used by the synthetic patient generator (vmat.phantom) and by ``--export-rtdose`` (a predicted dose as an
RTDOSE on the CT's frame of reference, which treatment planning systems import next to the plan).
All objects are Part-10 files (preamble + file meta), Explicit VR Little Endian, with the IODs' key
attributes (PS3.3 A.3 CT Image, A.19 RT Dose, A.19 RT Structure Set, A.20 RT Plan).

Grids are the package's canonical ones: arrays (z, y, x), axis-aligned, ImageOrientationPatient
[1, 0, 0, 0, 1, 0]; ``origin_xyz`` is the patient position of voxel (0, 0, 0).
"""

from __future__ import annotations

import datetime as _dt
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as DicomSequence
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_IMAGE_STORAGE = "1.2.840.10008.5.1.4.1.1.2"
RT_DOSE_STORAGE = "1.2.840.10008.5.1.4.1.1.481.2"
RT_STRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"
RT_PLAN_STORAGE = "1.2.840.10008.5.1.4.1.1.481.5"
IDENTITY_IOP = [1.0, 0.0, 0.0, 0.0, 1.0, 0.0]


@dataclass
class PatientInfo:
    """Identifiers shared by all objects of one case (a study with one frame of reference)."""

    patient_id: str
    patient_name: str = "SYNTHETIC^PATIENT"
    study_uid: str = field(default_factory=generate_uid)
    frame_of_reference_uid: str = field(default_factory=generate_uid)
    study_date: str = "20240101"

    @classmethod
    def deterministic(cls, patient_id: str, seed: int) -> PatientInfo:
        """UIDs derived from (patient_id, seed) so regenerated cases are byte-identical."""
        return cls(patient_id=patient_id,
                   study_uid=generate_uid(entropy_srcs=[patient_id, str(seed), "study"]),
                   frame_of_reference_uid=generate_uid(entropy_srcs=[patient_id, str(seed), "for"]))


def _base_dataset(sop_class: str, sop_uid: str, modality: str, info: PatientInfo, series_uid: str,
                  series_number: int) -> Dataset:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = pydicom.uid.PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.preamble = b"\x00" * 128
    ds.SOPClassUID = sop_class
    ds.SOPInstanceUID = sop_uid
    ds.Modality = modality
    ds.PatientName = info.patient_name
    ds.PatientID = info.patient_id
    ds.PatientBirthDate = ""
    ds.PatientSex = "M"
    ds.StudyInstanceUID = info.study_uid
    ds.StudyDate = info.study_date
    ds.StudyTime = "120000"
    ds.StudyID = "1"
    ds.AccessionNumber = ""
    ds.ReferringPhysicianName = ""
    ds.SeriesInstanceUID = series_uid
    ds.SeriesNumber = int(series_number)
    ds.Manufacturer = "imaging-pipelines vmat"
    ds.SpecificCharacterSet = "ISO_IR 192"
    return ds


def _save(ds: Dataset, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)
    return path


# --------------------------------------------------------------------------------------------------- CT
def write_ct_series(folder: str | Path, hu: np.ndarray, origin_xyz, spacing_zyx, info: PatientInfo,
                    rescale_slope: float = 1.0, rescale_intercept: float = -1024.0,
                    file_names: Sequence[str] | None = None, instance_numbers: Sequence[int] | None = None,
                    seed: int = 0) -> list[dict]:
    """One file per slice. Stored values = round((HU − intercept) / slope) as unsigned 16 bit.

    Returns, per slice in z order, {"path", "sop_uid", "z"} (RTSTRUCT references them).
    ``file_names`` / ``instance_numbers`` let tests write misleading names and orders on purpose.
    """
    folder = Path(folder)
    nz, ny, nx = hu.shape
    dz, dy, dx = (float(s) for s in spacing_zyx)
    series_uid = generate_uid(entropy_srcs=[info.patient_id, str(seed), "ct-series"])
    stored = np.clip(np.round((hu - rescale_intercept) / rescale_slope), 0, 65535).astype(np.uint16)
    out = []
    for k in range(nz):
        sop_uid = generate_uid(entropy_srcs=[info.patient_id, str(seed), "ct", str(k)])
        ds = _base_dataset(CT_IMAGE_STORAGE, sop_uid, "CT", info, series_uid, 1)
        z = float(origin_xyz[2]) + k * dz
        ds.FrameOfReferenceUID = info.frame_of_reference_uid
        ds.PositionReferenceIndicator = ""
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.InstanceNumber = int(instance_numbers[k]) if instance_numbers is not None else k + 1
        ds.ImagePositionPatient = [float(origin_xyz[0]), float(origin_xyz[1]), z]
        ds.ImageOrientationPatient = IDENTITY_IOP
        ds.PatientPosition = "HFS"
        ds.SliceThickness = dz
        ds.SliceLocation = z
        ds.PixelSpacing = [dy, dx]  # (row spacing, column spacing)
        ds.Rows, ds.Columns = ny, nx
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit = 16, 16, 15
        ds.PixelRepresentation = 0
        ds.RescaleSlope = float(rescale_slope)
        ds.RescaleIntercept = float(rescale_intercept)
        ds.RescaleType = "HU"
        ds.KVP = 120
        ds.PixelData = stored[k].tobytes()
        name = file_names[k] if file_names is not None else f"CT_{k:04d}.dcm"
        out.append({"path": _save(ds, folder / name), "sop_uid": sop_uid, "z": z})
    return out


# ---------------------------------------------------------------------------------------------- RTSTRUCT
ROI_COLORS = [[255, 0, 0], [255, 128, 0], [0, 160, 255], [139, 69, 19], [255, 255, 0], [0, 200, 0],
              [0, 120, 0], [200, 0, 200], [128, 128, 128]]


def write_rtstruct(path: str | Path, rois: Sequence[Mapping], ct_slices: Sequence[Mapping], info: PatientInfo,
                   seed: int = 0, frame_of_reference_uid: str | None = None) -> Path:
    """RT Structure Set with closed planar contours.

    Args:
        rois: [{"name", "type" (PTV/ORGAN/EXTERNAL...), "contours": [(N, 3) xyz mm arrays]}]; several
            contours of one ROI on one plane are written as separate items (holes by XOR).
        ct_slices: output of :func:`write_ct_series` (each contour references the slice at its z).
        frame_of_reference_uid: override (tests write a mismatched frame of reference on purpose).
    """
    sop_uid = generate_uid(entropy_srcs=[info.patient_id, str(seed), "rtstruct"])
    series_uid = generate_uid(entropy_srcs=[info.patient_id, str(seed), "rtstruct-series"])
    ds = _base_dataset(RT_STRUCT_STORAGE, sop_uid, "RTSTRUCT", info, series_uid, 2)
    for_uid = frame_of_reference_uid or info.frame_of_reference_uid
    ds.StructureSetLabel = "synthetic"
    ds.StructureSetDate = info.study_date
    ds.StructureSetTime = "120000"
    z_values = np.array([float(s["z"]) for s in ct_slices])

    contour_images = []
    for s in ct_slices:
        item = Dataset()
        item.ReferencedSOPClassUID = CT_IMAGE_STORAGE
        item.ReferencedSOPInstanceUID = s["sop_uid"]
        contour_images.append(item)
    series = Dataset()
    series.SeriesInstanceUID = generate_uid(entropy_srcs=[info.patient_id, str(seed), "ct-series"])
    series.ContourImageSequence = DicomSequence(contour_images)
    study = Dataset()
    study.ReferencedSOPClassUID = "1.2.840.10008.3.1.2.3.1"  # Detached Study Management (retired, customary)
    study.ReferencedSOPInstanceUID = info.study_uid
    study.RTReferencedSeriesSequence = DicomSequence([series])
    frame = Dataset()
    frame.FrameOfReferenceUID = for_uid
    frame.RTReferencedStudySequence = DicomSequence([study])
    ds.ReferencedFrameOfReferenceSequence = DicomSequence([frame])

    roi_items, contour_items, observations = [], [], []
    for number, roi in enumerate(rois, start=1):
        item = Dataset()
        item.ROINumber = number
        item.ReferencedFrameOfReferenceUID = for_uid
        item.ROIName = str(roi["name"])
        item.ROIGenerationAlgorithm = "MANUAL"
        roi_items.append(item)
        contours = []
        for points in roi["contours"]:
            points = np.asarray(points, dtype=np.float64)
            contour = Dataset()
            contour.ContourGeometricType = "CLOSED_PLANAR"
            contour.NumberOfContourPoints = int(len(points))
            contour.ContourData = [f"{v:.3f}" for v in points.ravel()]
            if len(points):
                nearest = int(np.argmin(np.abs(z_values - points[0, 2])))
                if abs(z_values[nearest] - points[0, 2]) < 1e-3:
                    ref = Dataset()
                    ref.ReferencedSOPClassUID = CT_IMAGE_STORAGE
                    ref.ReferencedSOPInstanceUID = ct_slices[nearest]["sop_uid"]
                    contour.ContourImageSequence = DicomSequence([ref])
            contours.append(contour)
        roi_contour = Dataset()
        roi_contour.ReferencedROINumber = number
        roi_contour.ROIDisplayColor = ROI_COLORS[(number - 1) % len(ROI_COLORS)]
        roi_contour.ContourSequence = DicomSequence(contours)
        contour_items.append(roi_contour)
        obs = Dataset()
        obs.ObservationNumber = number
        obs.ReferencedROINumber = number
        obs.RTROIInterpretedType = str(roi.get("type", "ORGAN"))
        obs.ROIInterpreter = ""
        observations.append(obs)
    ds.StructureSetROISequence = DicomSequence(roi_items)
    ds.ROIContourSequence = DicomSequence(contour_items)
    ds.RTROIObservationsSequence = DicomSequence(observations)
    return _save(ds, Path(path))


# ------------------------------------------------------------------------------------------------ RTDOSE
def write_rtdose(path: str | Path, dose_gy: np.ndarray, origin_xyz, spacing_zyx, info: PatientInfo,
                 seed: int = 0, frame_of_reference_uid: str | None = None, bits: int = 32,
                 referenced_plan_uid: str | None = None, description: str = "",
                 dose_summation_type: str = "PLAN") -> Path:
    """Multi-frame RT Dose: stored integers × DoseGridScaling = Gy; frame z = IPP z + GridFrameOffsetVector.

    The scaling maps the maximum dose to the largest stored value, so quantization error is at most
    max/(2·(2^bits − 1)).
    """
    dose = np.asarray(dose_gy, dtype=np.float64)
    if dose.ndim != 3:
        raise ValueError(f"dose must be (z, y, x), got shape {dose.shape}")
    if np.any(~np.isfinite(dose)) or dose.min() < 0:
        raise ValueError("dose must be finite and non-negative to be written as RTDOSE")
    nz, ny, nx = dose.shape
    dz, dy, dx = (float(s) for s in spacing_zyx)
    top = float(2**bits - 1)
    scaling = max(float(dose.max()), 1e-6) / top
    stored = np.round(dose / scaling).astype(np.uint32 if bits == 32 else np.uint16)
    sop_uid = generate_uid(entropy_srcs=[info.patient_id, str(seed), "rtdose", description])
    series_uid = generate_uid(entropy_srcs=[info.patient_id, str(seed), "rtdose-series", description])
    ds = _base_dataset(RT_DOSE_STORAGE, sop_uid, "RTDOSE", info, series_uid, 3)
    ds.FrameOfReferenceUID = frame_of_reference_uid or info.frame_of_reference_uid
    ds.PositionReferenceIndicator = ""
    ds.SeriesDescription = description
    ds.InstanceNumber = 1
    ds.ImagePositionPatient = [float(v) for v in origin_xyz]
    ds.ImageOrientationPatient = IDENTITY_IOP
    ds.PixelSpacing = [dy, dx]
    ds.SliceThickness = dz
    ds.NumberOfFrames = nz
    ds.FrameIncrementPointer = pydicom.tag.Tag(0x3004, 0x000C)
    ds.GridFrameOffsetVector = [round(k * dz, 4) for k in range(nz)]
    ds.Rows, ds.Columns = ny, nx
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = bits
    ds.HighBit = bits - 1
    ds.PixelRepresentation = 0
    ds.DoseUnits = "GY"
    ds.DoseType = "PHYSICAL"
    ds.DoseSummationType = dose_summation_type
    ds.DoseGridScaling = f"{scaling:.10g}"
    if referenced_plan_uid:
        ref = Dataset()
        ref.ReferencedSOPClassUID = RT_PLAN_STORAGE
        ref.ReferencedSOPInstanceUID = referenced_plan_uid
        ds.ReferencedRTPlanSequence = DicomSequence([ref])
    ds.PixelData = stored.tobytes()
    return _save(ds, Path(path))


# ------------------------------------------------------------------------------------------------ RTPLAN
def write_rtplan(path: str | Path, info: PatientInfo, targets: Mapping[str, float], n_fractions: int,
                 arcs: Sequence[tuple[float, float]], isocenter_xyz, seed: int = 0,
                 include_prescription: bool = True) -> tuple[Path, str]:
    """RT Plan with one dose reference per target (TargetPrescriptionDose, Gy), one fraction group and
    one VMAT arc per (start, stop) gantry angle pair. ``include_prescription=False`` leaves out the
    dose references (the reader must then fall back to beam doses or the config)."""
    sop_uid = generate_uid(entropy_srcs=[info.patient_id, str(seed), "rtplan"])
    series_uid = generate_uid(entropy_srcs=[info.patient_id, str(seed), "rtplan-series"])
    ds = _base_dataset(RT_PLAN_STORAGE, sop_uid, "RTPLAN", info, series_uid, 4)
    ds.FrameOfReferenceUID = info.frame_of_reference_uid
    ds.RTPlanLabel = "VMAT_SIB"
    ds.RTPlanDate = info.study_date
    ds.RTPlanTime = "120000"
    ds.RTPlanGeometry = "PATIENT"
    if include_prescription:
        refs = []
        for number, (name, dose) in enumerate(targets.items(), start=1):
            ref = Dataset()
            ref.DoseReferenceNumber = number
            ref.DoseReferenceUID = generate_uid(entropy_srcs=[info.patient_id, str(seed), "doseref", name])
            ref.DoseReferenceStructureType = "VOLUME"
            ref.DoseReferenceDescription = name
            ref.DoseReferenceType = "TARGET"
            ref.TargetPrescriptionDose = f"{float(dose):.4g}"
            refs.append(ref)
        ds.DoseReferenceSequence = DicomSequence(refs)
    max_dose = max(targets.values()) if targets else 0.0
    beams, ref_beams = [], []
    for number, (start, stop) in enumerate(arcs, start=1):
        beam = Dataset()
        beam.BeamNumber = number
        beam.BeamName = f"ARC{number}"
        beam.BeamType = "DYNAMIC"
        beam.RadiationType = "PHOTON"
        beam.TreatmentDeliveryType = "TREATMENT"
        beam.NumberOfWedges = beam.NumberOfCompensators = beam.NumberOfBoli = beam.NumberOfBlocks = 0
        beam.FinalCumulativeMetersetWeight = "1"
        points = []
        for index, angle in enumerate((start, stop)):
            cp = Dataset()
            cp.ControlPointIndex = index
            cp.CumulativeMetersetWeight = str(index)
            cp.GantryAngle = f"{angle % 360:.1f}"
            if index == 0:
                cp.GantryRotationDirection = "CW" if stop >= start else "CC"
                cp.NominalBeamEnergy = "6"
                cp.IsocenterPosition = [f"{v:.2f}" for v in isocenter_xyz]
            points.append(cp)
        beam.NumberOfControlPoints = len(points)
        beam.ControlPointSequence = DicomSequence(points)
        beams.append(beam)
        rb = Dataset()
        rb.ReferencedBeamNumber = number
        rb.BeamDose = f"{max_dose / max(n_fractions, 1) / max(len(arcs), 1):.6g}"  # Gy per fraction
        rb.BeamMeterset = "250"
        ref_beams.append(rb)
    ds.BeamSequence = DicomSequence(beams)
    group = Dataset()
    group.FractionGroupNumber = 1
    group.NumberOfFractionsPlanned = int(n_fractions)
    group.NumberOfBeams = len(beams)
    group.NumberOfBrachyApplicationSetups = 0
    group.ReferencedBeamSequence = DicomSequence(ref_beams)
    ds.FractionGroupSequence = DicomSequence([group])
    return _save(ds, Path(path)), sop_uid


def today() -> str:
    return _dt.date.today().strftime("%Y%m%d")
