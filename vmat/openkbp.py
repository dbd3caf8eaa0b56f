"""The OpenKBP data layout (Babier et al., Med Phys 2021; github.com/ababier/open-kbp).

One folder per patient ``pt_N/`` with sparse CSV files: header ``,data``, first column a C-order flat
index into the 128³ grid, second the value (empty for masks):
``ct.csv`` (HU + 1024), ``dose.csv`` (Gy), ``possible_dose_mask.csv``, ``voxel_dimensions.csv`` (three
numbers, one per array axis, mm) and one CSV per present ROI (Brainstem, SpinalCord, RightParotid,
LeftParotid, Esophagus, Larynx, Mandible, PTV56, PTV63, PTV70).

Array axes of the OpenKBP grid, as checked on the provided data (LeftParotid lies at larger axis-1 indices
than RightParotid, the larynx at smaller axis-0 and larger axis-2 indices than the parotids, and
voxel_dimensions reads (4.688, 4.688, 2.0)): axis 0 = posterior (y), axis 1 = patient left (x),
axis 2 = inferior (slices, the 2-2.5 mm axis). :func:`to_canonical` turns that into this package's
(z superior, y posterior, x left) order, so the left-right flip and the channel swap of the parotids
stay correct. Positions in patient coordinates are not provided; the origin is set to 0.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from vmat.dicom_rt import CaseError
from vmat.structures import OPENKBP_STRUCTURES, target_dose_from_name

GRID_SHAPE = (128, 128, 128)
CT_OFFSET = 1024.0  # ct.csv stores HU + 1024


def read_sparse_csv(path: Path, shape=GRID_SHAPE) -> tuple[np.ndarray, np.ndarray | None]:
    """(flat indices, values or None for a mask) of one OpenKBP CSV; clear errors for bad files."""
    import pandas as pd

    try:
        frame = pd.read_csv(path, index_col=0)
    except (OSError, ValueError, pd.errors.ParserError) as exc:
        raise CaseError("bad_csv", f"{path}: not a readable OpenKBP CSV ({exc})") from exc
    if "data" not in frame.columns:
        raise CaseError("bad_csv", f"{path}: expected the header ',data', got columns {list(frame.columns)}")
    try:
        indices = frame.index.to_numpy().astype(np.int64)
    except (TypeError, ValueError) as exc:
        raise CaseError("bad_csv", f"{path}: first column must hold integer flat indices ({exc})") from exc
    size = int(np.prod(shape))
    if indices.size and (indices.min() < 0 or indices.max() >= size):
        raise CaseError("bad_csv", f"{path}: flat index {int(indices.max())} outside the {shape} grid")
    values = frame["data"].to_numpy(dtype=np.float64)
    return (indices, None) if np.all(np.isnan(values)) else (indices, values)


def dense(indices: np.ndarray, values: np.ndarray | None, shape=GRID_SHAPE, dtype=np.float32) -> np.ndarray:
    out = np.zeros(int(np.prod(shape)), dtype=dtype)
    out[indices] = 1 if values is None else values
    return out.reshape(shape)


def to_canonical(array: np.ndarray) -> np.ndarray:
    """OpenKBP (y, x, z inferior-ward) → (z superior-ward, y, x), with leading channel axes preserved."""
    moved = np.moveaxis(array, -1, -3)  # (..., z_inf, y, x)
    return np.ascontiguousarray(moved[..., ::-1, :, :])


def from_canonical(array: np.ndarray) -> np.ndarray:
    """Inverse of :func:`to_canonical` (for writing predictions in the OpenKBP layout)."""
    flipped = array[..., ::-1, :, :]
    return np.ascontiguousarray(np.moveaxis(flipped, -3, -1))


def read_patient(folder: str | Path, structures=OPENKBP_STRUCTURES, require_dose: bool = True) -> dict:
    """One ``pt_N`` folder → arrays on the canonical grid (ct HU, dose Gy, masks, body, spacing)."""
    folder = Path(folder)
    needed = ["ct.csv", "possible_dose_mask.csv", "voxel_dimensions.csv"] + (["dose.csv"] if require_dose else [])
    missing = [name for name in needed if not (folder / name).is_file()]
    if missing:
        raise CaseError("missing_file", f"{folder}: missing {missing} (the stored copy of the data lacks some files)")
    try:
        dims = np.loadtxt(folder / "voxel_dimensions.csv", dtype=np.float64).ravel()
    except ValueError as exc:
        raise CaseError("bad_csv", f"{folder / 'voxel_dimensions.csv'}: {exc}") from exc
    if dims.size != 3 or np.any(dims <= 0):
        raise CaseError("bad_csv", f"{folder / 'voxel_dimensions.csv'}: expected 3 positive numbers, got {dims.tolist()}")
    ct = dense(*read_sparse_csv(folder / "ct.csv")) - CT_OFFSET  # absent voxels: 0 stored = -1024 HU (air)
    body = dense(*read_sparse_csv(folder / "possible_dose_mask.csv"), dtype=np.uint8)
    dose = dense(*read_sparse_csv(folder / "dose.csv")) if (folder / "dose.csv").is_file() else None
    masks = np.zeros((len(structures), *GRID_SHAPE), dtype=np.uint8)
    present = []
    for c, name in enumerate(structures):
        path = folder / f"{name}.csv"
        if path.is_file():
            indices, _ = read_sparse_csv(path)
            masks[c] = dense(indices, None, dtype=np.uint8)
            present.append(name)
    targets = {n: target_dose_from_name(n) for n in present if target_dose_from_name(n)}
    if not targets:
        raise CaseError("missing_structure", f"{folder}: no PTV among {present}")
    return {
        "case_id": folder.name,
        "ct": to_canonical(ct).astype(np.float32),
        "dose": None if dose is None else to_canonical(dose).astype(np.float32),
        "masks": to_canonical(masks),
        "possible_dose_mask": to_canonical(body),
        "spacing_zyx": (float(dims[2]), float(dims[0]), float(dims[1])),
        "structure_names": list(structures),
        "target_doses_gy": targets,
        "prescription_gy": max(targets.values()),
    }


def write_patient(folder: str | Path, ct_hu: np.ndarray, dose: np.ndarray | None, masks: dict,
                  possible_dose_mask: np.ndarray, voxel_dimensions=(3.906, 3.906, 2.5)) -> Path:
    """Write arrays already in the OpenKBP axis order as a ``pt_N`` folder (test fixtures, exports)."""
    import pandas as pd

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)

    def sparse(name, array, is_mask=False):
        flat = np.asarray(array).ravel()
        index = np.flatnonzero(flat)
        values = np.full(index.size, np.nan) if is_mask else flat[index]
        pd.DataFrame({"data": values}, index=index).to_csv(folder / f"{name}.csv")

    sparse("ct", np.asarray(ct_hu) + CT_OFFSET)
    if dose is not None:
        sparse("dose", dose)
    sparse("possible_dose_mask", possible_dose_mask, is_mask=True)
    for name, mask in masks.items():
        sparse(name, mask, is_mask=True)
    np.savetxt(folder / "voxel_dimensions.csv", np.asarray(voxel_dimensions, dtype=np.float64))
    return folder


def find_patients(root: str | Path) -> list[Path]:
    """``pt_*`` folders under ``root`` (e.g. provided-data/train-pats), sorted by patient number."""
    root = Path(root)
    found = [p for p in root.rglob("pt_*") if p.is_dir()]

    def number(p: Path) -> int:
        tail = p.name.split("_", 1)[-1]
        return int(tail) if tail.isdigit() else 10**9

    return sorted(found, key=lambda p: (number(p), str(p)))
