"""Export a predicted dose as an RTDOSE DICOM on the CT's frame of reference.

The dose grid is the preprocessed CT grid (canonical axes, origin and spacing from the case NPZ), the
FrameOfReferenceUID / StudyInstanceUID / PatientID are the CT's (kept in the NPZ metadata), so a
treatment planning system places it on the planning CT. Cases without DICOM identifiers (OpenKBP, or
synthetic arrays) get new UIDs and a logged warning: such a file still opens, but will not register to
any CT.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path

import numpy as np
from pydicom.uid import generate_uid

from vmat.rt_writer import PatientInfo, write_rtdose

log = logging.getLogger(__name__)


def export_rtdose(path: str | Path, dose_gy: np.ndarray, case: Mapping, description: str = "predicted dose") -> Path:
    uids = dict(case.get("meta", {}).get("uids", {}))
    frame = uids.get("frame_of_reference_uid") or ""
    if not frame:
        log.warning("%s: no CT FrameOfReferenceUID in the case metadata; the RTDOSE gets a new one", case.get("case_id"))
    info = PatientInfo(patient_id=uids.get("patient_id") or str(case.get("case_id", "unknown")),
                       patient_name=uids.get("patient_name") or "ANONYMOUS",
                       study_uid=uids.get("study_instance_uid") or generate_uid(),
                       frame_of_reference_uid=frame or generate_uid())
    origin_xyz = np.asarray(case["origin_mm"], dtype=np.float64)[::-1]
    dose = np.clip(np.nan_to_num(np.asarray(dose_gy, dtype=np.float64)), 0.0, None)
    return write_rtdose(path, dose, origin_xyz, tuple(float(s) for s in case["spacing_mm"]), info,
                        seed=0, description=description, dose_summation_type="PLAN")
