"""The per-case NPZ format shared by preprocessing, training, prediction and validation.

``<case>.npz`` (``np.load(path, allow_pickle=False)`` works: no object arrays):

    ct                  float32 (z, y, x)     Hounsfield units
    dose                float32 (z, y, x)     Gy, on the CT grid (absent for cases without a reference dose)
    masks               uint8 (C, z, y, x)    one channel per name in structure_names
    sdf                 float32 (C, z, y, x)  signed distance / sdf_clip_mm, in [-1, 1], negative inside;
                                              0 for an absent structure (see structure_present)
    structure_names     <U (C,)               canonical names, channel order
    structure_present   uint8 (C,)
    spacing_mm          float64 (3,)          (z, y, x) voxel size
    origin_mm           float64 (3,)          (z, y, x) patient coordinates of voxel (0, 0, 0), DICOM mm
    prescription_gy     float64 ()            prescription of the highest-dose target
    possible_dose_mask  uint8 (z, y, x)       body (where dose can be deposited)
    dose_valid_mask     uint8 (z, y, x)       1 where the reference dose is known (CT voxel centre inside the
                                              RTDOSE grid); 0 voxels hold 0 in ``dose`` but are NOT 0 Gy: the
                                              loss, metrics and DVHs leave them out. Absent in files written
                                              before it existed: load_case reads it as all 1
    contour_points_zyx_mm float64 (N, 3)      optional: every RTSTRUCT polygon vertex, patient mm (z, y, x)
    contour_index       int64 (M, 3)          optional: (channel, first point, end point) of each polygon;
                                              the sub-voxel DVH (vmat.dvh.ContourSampler) samples them
    rtdose_gy           float32 (z', y', x')  optional (DICOM-RT input): the reference dose on its own RTDOSE grid
                                              (canonical axes; the sum when several files share one grid), which
                                              DVHs of the reference read as clinical DVH tools do (vmat.dvh)
    rtdose_origin_mm    float64 (3,)          (z, y, x) patient coordinates of its voxel (0, 0, 0)
    rtdose_spacing_mm   float64 (3,)          (z, y, x) its voxel size
    meta_json           <U ()                 JSON: case_id, uids, target doses, roi sources, warnings ...

Axis convention: index increases toward patient superior (z), posterior (y) and LEFT (x).
Predicted doses (``predict_vmat.py``) are NPZ files with ``dose`` (Gy) and optionally ``dose_std`` and
the same ``spacing_mm``/``origin_mm``.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.errors import InputError
from common.files import load_npz
from common.runlog import save_npz_atomic

REQUIRED_KEYS = ("ct", "masks", "sdf", "structure_names", "spacing_mm", "origin_mm", "prescription_gy",
                 "possible_dose_mask")


class CaseFileError(InputError):
    """A case or prediction file that cannot be used; the message names the file and the key."""


def pack_contours(contours: dict, names) -> tuple[np.ndarray, np.ndarray]:
    """{name: [(z mm, (N, 2) xy mm)]} → (points (P, 3) zyx mm, index (M, 3) channel/start/stop)."""
    points, index, start = [], [], 0
    for c, name in enumerate(names):
        for z, xy in contours.get(name, []):
            xy = np.asarray(xy, np.float64)
            points.append(np.c_[np.full(len(xy), float(z)), xy[:, 1], xy[:, 0]])
            index.append((c, start, start + len(xy)))
            start += len(xy)
    if not points:
        return np.zeros((0, 3)), np.zeros((0, 3), np.int64)
    return np.concatenate(points), np.asarray(index, np.int64)


def unpack_contours(case: dict) -> dict:
    """{channel: [(z mm, (N, 2) xy mm)]} from a loaded case (empty if it has no contours)."""
    if "contour_index" not in case:
        return {}
    points, out = case["contour_points_zyx_mm"], {}
    for c, a, b in np.asarray(case["contour_index"], np.int64):
        p = points[a:b]
        out.setdefault(int(c), []).append((float(p[0, 0]), np.c_[p[:, 2], p[:, 1]]))
    return out


def write_case(path: str | Path, *, ct, dose, masks, sdf, structure_names, spacing_mm, origin_mm,
               prescription_gy, possible_dose_mask, meta: dict, dose_valid_mask=None, contours: dict | None = None,
               rtdose: tuple | None = None) -> Path:
    """Write one case; ``rtdose``: (dose Gy, origin (z, y, x) mm, spacing (z, y, x) mm) on the RTDOSE's own grid."""
    arrays = {
        "ct": np.asarray(ct, dtype=np.float32),
        "masks": np.asarray(masks, dtype=np.uint8),
        "sdf": np.asarray(sdf, dtype=np.float32),
        "structure_names": np.asarray(list(structure_names), dtype=str),
        "structure_present": np.asarray([int(m.any()) for m in masks], dtype=np.uint8),
        "spacing_mm": np.asarray(spacing_mm, dtype=np.float64),
        "origin_mm": np.asarray(origin_mm, dtype=np.float64),
        "prescription_gy": np.asarray(float(prescription_gy), dtype=np.float64),
        "possible_dose_mask": np.asarray(possible_dose_mask, dtype=np.uint8),
        "meta_json": np.asarray(json.dumps(meta, ensure_ascii=False)),
    }
    if dose is not None:
        arrays["dose"] = np.asarray(dose, dtype=np.float32)
        valid = np.ones(arrays["ct"].shape, bool) if dose_valid_mask is None else np.asarray(dose_valid_mask, bool)
        arrays["dose_valid_mask"] = valid.astype(np.uint8)
    if contours:
        arrays["contour_points_zyx_mm"], arrays["contour_index"] = pack_contours(contours, structure_names)
    if rtdose is not None and dose is not None:
        arrays["rtdose_gy"] = np.asarray(rtdose[0], dtype=np.float32)
        arrays["rtdose_origin_mm"] = np.asarray(rtdose[1], dtype=np.float64)
        arrays["rtdose_spacing_mm"] = np.asarray(rtdose[2], dtype=np.float64)
    return save_npz_atomic(path, **arrays)


def _read_npz(path: Path) -> dict:
    try:
        return load_npz(path)
    except InputError as exc:  # truncated or damaged: the message already names the file
        raise CaseFileError(str(exc)) from exc


def load_case(path: str | Path, require_dose: bool = True) -> dict:
    """Read a case NPZ into a dict of arrays (+ ``meta`` dict, ``case_id``); clear errors for bad files."""
    path = Path(path)
    if not path.is_file():
        raise CaseFileError(f"case file not found: {path}")
    out = _read_npz(path)
    needed = REQUIRED_KEYS + (("dose",) if require_dose else ())
    missing = [k for k in needed if k not in out]
    if missing:
        raise CaseFileError(f"{path}: missing key(s) {missing}; found {sorted(out)}")
    shape = out["ct"].shape
    if out["ct"].ndim != 3:
        raise CaseFileError(f"{path}: key 'ct' must be 3D (z, y, x), got shape {shape}")
    if "dose" in out and "dose_valid_mask" not in out:
        out["dose_valid_mask"] = np.ones(shape, np.uint8)  # written before the mask existed
    for key in ("dose", "possible_dose_mask", "dose_valid_mask"):
        if key in out and out[key].shape != shape:
            raise CaseFileError(f"{path}: key '{key}' has shape {out[key].shape}, 'ct' has {shape}")
    for key in ("masks", "sdf"):
        if out[key].shape[1:] != shape or out[key].shape[0] != len(out["structure_names"]):
            raise CaseFileError(f"{path}: key '{key}' has shape {out[key].shape}; expected "
                                f"({len(out['structure_names'])}, *{shape})")
    if "rtdose_gy" in out:
        for key in ("rtdose_origin_mm", "rtdose_spacing_mm"):
            if key not in out or np.shape(out[key]) != (3,):
                raise CaseFileError(f"{path}: 'rtdose_gy' needs key '{key}' with 3 values (z, y, x mm)")
        if out["rtdose_gy"].ndim != 3 or not np.all(np.asarray(out["rtdose_spacing_mm"]) > 0):
            raise CaseFileError(f"{path}: key 'rtdose_gy' must be 3D with positive 'rtdose_spacing_mm'")
        if not np.all(np.isfinite(out["rtdose_gy"])):
            raise CaseFileError(f"{path}: key 'rtdose_gy' contains NaN or infinite values")
    out["structure_names"] = [str(n) for n in out["structure_names"]]
    out["meta"] = json.loads(str(out["meta_json"])) if "meta_json" in out else {}
    out["case_id"] = out["meta"].get("case_id", path.stem)
    out["prescription_gy"] = float(out["prescription_gy"])
    return out


def load_prediction(path: str | Path, expected_shape: tuple | None = None, expected_grid: tuple | None = None,
                    tolerance_mm: float = 1e-3) -> dict:
    """A predicted-dose NPZ: ``dose`` (Gy) required, ``dose_std`` optional; shape checked, and with
    ``expected_grid`` ((spacing, origin) (z, y, x) mm of the reference case) the prediction's own
    ``spacing_mm`` / ``origin_mm`` where it stores them (predict_vmat.py does): a dose of the right shape on
    another grid is refused, not scored voxel by voxel against the wrong anatomy."""
    out = _read_npz(path)
    if "dose" not in out:
        raise CaseFileError(f"{path}: missing key 'dose' (predicted dose in Gy); found {sorted(out)}")
    if expected_shape is not None and tuple(out["dose"].shape) != tuple(expected_shape):
        raise CaseFileError(f"{path}: key 'dose' has shape {out['dose'].shape}, the reference case has "
                            f"{tuple(expected_shape)}")
    for key, expected in zip(("spacing_mm", "origin_mm"), expected_grid or ()):
        if key in out:
            got, want = np.asarray(out[key], np.float64).ravel(), np.asarray(expected, np.float64).ravel()
            if got.shape != want.shape or np.max(np.abs(got - want)) > tolerance_mm:
                raise CaseFileError(f"{path}: key '{key}' is {got.tolist()} (z, y, x mm), the reference case has "
                                    f"{want.tolist()}: the prediction is on another grid (resample it onto the "
                                    "case's CT grid first)")
    if not np.all(np.isfinite(out["dose"])):
        raise CaseFileError(f"{path}: key 'dose' contains NaN or infinite values")
    return out


def list_cases(folder: str | Path) -> list[Path]:
    """Case NPZ files of a folder, sorted (temporary files of an interrupted run are ignored)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise CaseFileError(f"data folder not found: {folder}")
    return sorted(p for p in folder.glob("*.npz") if p.is_file())
