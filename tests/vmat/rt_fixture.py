"""A small DICOM-RT patient written with pydicom directly (independent of vmat.rt_writer), the way real
exports come: non-square pixels, slice files with shuffled names and reversed InstanceNumbers, an RTDOSE
on a grid of its own (here deliberately SHORTER than the body in z), an RTPLAN with two beams.

Geometry (patient mm): CT 20 slices z = -30 .. 27 (3 mm), 40 rows of 4 mm (y from -80), 48 columns of
3 mm (x from -72). Dose = 20 + 0.5 (x + 72) / 3 + 0.2 (z + 30) Gy: linear, so the trilinear dose on the
CT grid is exact where it is known. Structures are circles (contours on every CT plane they span).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence as Seq
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

CT_CLASS, DOSE_CLASS = "1.2.840.10008.5.1.4.1.1.2", "1.2.840.10008.5.1.4.1.1.481.2"
STRUCT_CLASS, PLAN_CLASS = "1.2.840.10008.5.1.4.1.1.481.3", "1.2.840.10008.5.1.4.1.1.481.5"
NZ, NY, NX = 20, 40, 48
DZ, DY, DX = 3.0, 4.0, 3.0
X0, Y0, Z0 = -72.0, -80.0, -30.0
CT_Z = Z0 + DZ * np.arange(NZ)
# name -> (centre x, centre y, radius, z lo, z hi)
STRUCTURES = {
    "Body": (0.0, 0.0, 62.0, -30.0, 27.0),
    "PTV_70": (0.0, 0.0, 15.0, -9.0, 9.0),
    "PTV_56": (0.0, 0.0, 22.0, -12.0, 12.0),
    "Prostate": (0.0, 0.0, 9.0, -6.0, 6.0),
    "Rectum": (0.0, 30.0, 8.0, -15.0, 15.0),
    "Bladder": (0.0, -30.0, 12.0, -9.0, 15.0),
    "Femur_L": (45.0, 0.0, 10.0, -24.0, 24.0),  # 17 planes; the dose grid covers 11 of them
    "Femur_R": (-45.0, 0.0, 10.0, -24.0, 24.0),
}


def linear_dose(x, y, z):
    return 20.0 + 0.5 * (x - X0) / 3.0 + 0.2 * (z - Z0)


def _base(sop_class, modality, study, frame, series_uid, sop_uid=None):
    sop_uid = sop_uid or generate_uid()
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID, ds.SOPInstanceUID, ds.Modality = sop_class, sop_uid, modality
    ds.PatientID, ds.PatientName = "FIXTURE", "FIXTURE^RT"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series_uid
    ds.FrameOfReferenceUID = frame
    return ds


def _save(ds, path: Path):
    path.parent.mkdir(parents=True, exist_ok=True)
    ds.save_as(str(path), enforce_file_format=True)


def write_patient(folder, *, drop_slice: int | None = None, tilt: bool = False, odd_slice_orientation: bool = False,
                  second_series: bool = False, struct_frame: str | None = None, dose_files=("PLAN",),
                  dose_z=(-15.0, 15.0), rename: dict | None = None, seed: int = 0) -> Path:
    """Write the patient; the keyword arguments make the broken variants the geometry tests need.

    dose_files: DoseSummationType of each RTDOSE written ("PLAN", "FRACTION", "BEAM1", "BEAM2": a beam
    dose of beam 1 / 2 carrying half the dose each); rename: {ROI name: new name, or None to leave it out}."""
    folder = Path(folder)
    rng = np.random.default_rng(seed)
    study, frame = generate_uid(), generate_uid()
    series = generate_uid()
    yy, xx = np.meshgrid(Y0 + DY * np.arange(NY), X0 + DX * np.arange(NX), indexing="ij")
    cx, cy, r = STRUCTURES["Body"][:3]
    hu = np.where((xx - cx) ** 2 + (yy - cy) ** 2 <= r * r, 0.0, -1000.0)
    slices = []
    keep = [k for k in range(NZ) if k != drop_slice]
    names = rng.permutation(len(keep))
    for n, k in enumerate(keep):
        ds = _base(CT_CLASS, "CT", study, frame, series)
        ds.InstanceNumber = NZ - k
        shift_y = 2.0 * k if tilt else 0.0
        ds.ImagePositionPatient = [X0, Y0 + shift_y, float(CT_Z[k])]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        if odd_slice_orientation and k == 5:
            ds.ImageOrientationPatient = [0, 1, 0, 0, 0, -1]  # a sagittal image in the axial series
        if tilt:
            ds.GantryDetectorTilt = 15.0
        ds.PixelSpacing = [DY, DX]
        ds.SliceThickness = DZ
        ds.Rows, ds.Columns = NY, NX
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
        ds.RescaleSlope, ds.RescaleIntercept = 1.0, -1024.0
        ds.PixelData = (hu + 1024).astype(np.uint16).tobytes()
        _save(ds, folder / "img" / f"{names[n]:08x}")
        slices.append(ds)
    if second_series:  # the same images again as another series (e.g. a second reconstruction)
        other = generate_uid()
        for n, ds in enumerate(slices):
            copy = pydicom.Dataset(ds)
            copy.file_meta = ds.file_meta
            copy.SeriesInstanceUID, copy.SOPInstanceUID = other, generate_uid()
            _save(copy, folder / "img2" / f"{n:04d}")
    _write_struct(folder / "rs.dcm", study, struct_frame or frame, generate_uid() if second_series else series,
                  rename or {})
    plan_uid = _write_plan(folder / "rp.dcm", study, frame)
    for n, kind in enumerate(dose_files):
        _write_dose(folder / f"dose_{n}.dcm", study, frame, kind, plan_uid, dose_z)
    return folder


def circle_polygon(cx, cy, r, n=64):
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    return np.c_[cx + r * np.cos(t), cy + r * np.sin(t)]


def _write_struct(path, study, frame, series_ref, rename):
    ds = _base(STRUCT_CLASS, "RTSTRUCT", study, frame, generate_uid())
    del ds.FrameOfReferenceUID
    ref_series = Dataset()
    ref_series.SeriesInstanceUID = series_ref
    ref_study = Dataset()
    ref_study.RTReferencedSeriesSequence = Seq([ref_series])
    ref_frame = Dataset()
    ref_frame.FrameOfReferenceUID = frame
    ref_frame.RTReferencedStudySequence = Seq([ref_study])
    ds.ReferencedFrameOfReferenceSequence = Seq([ref_frame])
    rois, contours = [], []
    structures = {rename.get(name, name): geometry for name, geometry in STRUCTURES.items()
                  if rename.get(name, name) is not None}
    for number, (name, (cx, cy, r, zlo, zhi)) in enumerate(structures.items(), start=1):
        roi = Dataset()
        roi.ROINumber, roi.ROIName, roi.ReferencedFrameOfReferenceUID = number, name, frame
        rois.append(roi)
        items = []
        for z in CT_Z[(CT_Z >= zlo - 1e-6) & (CT_Z <= zhi + 1e-6)]:
            poly = circle_polygon(cx, cy, r)
            item = Dataset()
            item.ContourGeometricType = "CLOSED_PLANAR"
            item.NumberOfContourPoints = len(poly)
            item.ContourData = [f"{v:.2f}" for v in np.c_[poly, np.full(len(poly), z)].ravel()]
            items.append(item)
        rc = Dataset()
        rc.ReferencedROINumber = number
        rc.ContourSequence = Seq(items)
        contours.append(rc)
    ds.StructureSetROISequence = Seq(rois)
    ds.ROIContourSequence = Seq(contours)
    _save(ds, path)


def _write_plan(path, study, frame) -> str:
    ds = _base(PLAN_CLASS, "RTPLAN", study, frame, generate_uid())
    ref = Dataset()
    ref.DoseReferenceNumber, ref.DoseReferenceDescription, ref.TargetPrescriptionDose = 1, "PTV70", 70.0
    ds.DoseReferenceSequence = Seq([ref])
    beams = []
    for number in (1, 2):
        beam = Dataset()
        beam.BeamNumber, beam.BeamName, beam.TreatmentDeliveryType = number, f"ARC{number}", "TREATMENT"
        beams.append(beam)
    ds.BeamSequence = Seq(beams)
    _save(ds, path)
    return ds.SOPInstanceUID


def _write_dose(path, study, frame, kind, plan_uid, dose_z):
    """Dose grid of its own: 2.5 mm in z over ``dose_z``, 5 x 6 mm in-plane over the whole body."""
    dz, dy, dx = 2.5, 5.0, 6.0
    z = np.arange(dose_z[0], dose_z[1] + 1e-6, dz)
    y = np.arange(-82.5, 80.0, dy)  # centres -82.5 .. 77.5: every CT row (-80 .. 76) inside
    x = np.arange(-74.0, 76.0, dx)  # centres -74 .. 70: every CT column (-72 .. 69) inside
    zz, yy, xx = np.meshgrid(z, y, x, indexing="ij")
    dose = linear_dose(xx, yy, zz)
    ds = _base(DOSE_CLASS, "RTDOSE", study, frame, generate_uid())
    summation = "BEAM" if kind.startswith("BEAM") else kind
    if summation == "BEAM":
        dose = dose / 2
        beam = Dataset()
        beam.ReferencedBeamNumber = int(kind[4:])
        group = Dataset()
        group.ReferencedBeamSequence = Seq([beam])
        plan = Dataset()
        plan.ReferencedSOPClassUID, plan.ReferencedSOPInstanceUID = PLAN_CLASS, plan_uid
        plan.ReferencedFractionGroupSequence = Seq([group])
        ds.ReferencedRTPlanSequence = Seq([plan])
    scaling = float(dose.max()) / 60000
    ds.ImagePositionPatient = [float(x[0]), float(y[0]), float(z[0])]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing = [dy, dx]
    ds.NumberOfFrames = len(z)
    ds.GridFrameOffsetVector = [float(v - z[0]) for v in z]
    ds.Rows, ds.Columns = len(y), len(x)
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    ds.DoseUnits, ds.DoseType, ds.DoseSummationType = "GY", "PHYSICAL", summation
    ds.DoseGridScaling = f"{scaling:.10g}"
    ds.PixelData = np.round(dose / scaling).astype(np.uint16).tobytes()
    _save(ds, path)
