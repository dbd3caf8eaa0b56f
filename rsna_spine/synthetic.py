"""A synthetic RSNA 2024 dataset in the competition's exact layout, with real DICOM files.

    <root>/train.csv  train_label_coordinates.csv  train_series_descriptions.csv
    <root>/train_images/{study_id}/{series_id}/{instance_number}.dcm
    <root>/test_series_descriptions.csv  test_images/...  sample_submission.csv
    <root>/solution/test_solution.csv      (hidden truth of the test studies, Kaggle solution format)

Each study has the three series types (Sagittal T1, Sagittal T2/STIR, Axial T2) rendered from one 3D
phantom (:mod:`rsna_spine.phantom`) with correct geometry tags (ImagePositionPatient,
ImageOrientationPatient, PixelSpacing), 16-bit MR pixels, an arbitrary per-series intensity scale, a bias
field and Rician noise. The grades live only in the anatomy; no header carries them.

Realism knobs that exercise the loader: instance numbers ascending, descending or shuffled relative to
position; slice counts and spacings that vary; some axial series with two stacks (the lower one tilted
along the lumbosacral disc and of another image size) or two axial series; compressed transfer syntaxes
(JPEG 2000 lossless, RLE lossless); optional tags left out. With ``corrupt=True`` it also writes the bad
input the pipeline must survive: a study in train.csv without images, an unknown series description,
truncated and unreadable files, a missing series and a listed-but-absent series in the test set, and
empty (NaN) labels.
"""

from __future__ import annotations

import os
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

import numpy as np
import pandas as pd
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import (
    PYDICOM_IMPLEMENTATION_UID,
    ExplicitVRLittleEndian,
    JPEG2000Lossless,
    MRImageStorage,
    RLELossless,
    generate_uid,
)

from rsna_spine.constants import (
    CONDITION_TITLES,
    CONDITIONS,
    GRADES,
    GROUP_OF_CONDITION,
    LEVEL_TITLES,
    LEVELS,
    TARGET_COLUMNS,
)
from rsna_spine.phantom import SpineAnatomy, render, sample_anatomy

SYNTHETIC_DEFAULTS = {
    "n_train_studies": 40,  # studies with labels (train_images/)
    "n_test_studies": 8,  # studies without labels (test_images/), truth in solution/test_solution.csv
    "seed": 2024,
    "sag_size_px": 112,  # sagittal rows = columns
    "sag_spacing_mm": 1.75,  # sagittal pixel spacing
    "sag_slices": [15, 17],  # min, max number of sagittal slices
    "sag_gap_mm": [3.6, 4.2],  # min, max sagittal slice spacing
    "axial_size_px": 80,
    "axial_spacing_mm": 1.75,
    "axial_gap_mm": 5.0,  # axial slice spacing
    # class priors per condition group (normal/mild, moderate, severe); boosted minority classes relative
    # to the real data (~0.80/0.13/0.07 spinal) so a few dozen studies hold enough moderate/severe cases
    "class_priors": {"spinal": [0.62, 0.22, 0.16], "foraminal": [0.58, 0.28, 0.14],
                     "subarticular": [0.55, 0.29, 0.16]},
    "propensity_sd": 0.5,  # per-study degeneration propensity (correlates grades within a study)
    "nan_label_fraction": 0.015,  # share of train targets left empty
    "compressed_fraction": 0.25,  # share of series written JPEG 2000 / RLE lossless
    "shuffled_fraction": 0.2,  # share of series whose instance numbers are shuffled vs position
    "two_stack_fraction": 0.3,  # share of studies with two axial stacks (one series or two)
    "corrupt": True,  # also write the bad input listed in the module docstring
    "workers": 2,  # processes writing studies
}

LEVEL_BIAS = np.array([-0.6, -0.3, 0.0, 0.45, 0.35])  # degeneration is commonest at L4/L5 and L5/S1


# ------------------------------------------------------------------------------------------- geometry
@dataclass
class StackGeometry:
    """One stack of parallel slices: pixel (r, c) of slice k sits at origin_k + c·Δc·row_dir + r·Δr·col_dir."""

    positions: np.ndarray  # (n, 3) ImagePositionPatient of each slice, in slice order
    row_dir: np.ndarray
    col_dir: np.ndarray
    spacing_rc: tuple[float, float]  # (Δr, Δc)
    shape_rc: tuple[int, int]
    thickness_mm: float

    @property
    def normal(self) -> np.ndarray:
        n = np.cross(self.row_dir, self.col_dir)
        return n / np.linalg.norm(n)

    def locate(self, point: np.ndarray) -> tuple[int, float, float, float]:
        """Nearest slice k, its distance along the normal (mm), and the pixel (column x, row y)."""
        along = (self.positions - point[None, :]) @ self.normal
        k = int(np.argmin(np.abs(along)))
        rel = point - self.positions[k]
        return k, float(abs(along[k])), float(rel @ self.row_dir / self.spacing_rc[1]), \
            float(rel @ self.col_dir / self.spacing_rc[0])


def sagittal_stack(anat: SpineAnatomy, rng: np.random.Generator, cfg: dict) -> StackGeometry:
    n = int(rng.integers(cfg["sag_slices"][0], cfg["sag_slices"][1] + 1))
    gap = float(rng.uniform(*cfg["sag_gap_mm"]))
    size, spacing = int(cfg["sag_size_px"]), float(cfg["sag_spacing_mm"])
    x_c = anat.center_mm[0] + rng.uniform(-2.0, 2.0)
    y_c = anat.center_mm[1] - 12.0 + rng.uniform(-6, 6)
    z_c = anat.center_mm[2] + rng.uniform(-8, 8)
    half = (size - 1) / 2 * spacing
    xs = x_c + (np.arange(n) - (n - 1) / 2) * gap
    positions = np.stack([xs, np.full(n, y_c - half), np.full(n, z_c + half)], axis=1)
    return StackGeometry(positions, np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0]),
                         (spacing, spacing), (size, size), thickness_mm=gap * 0.9)


def axial_stack(anat: SpineAnatomy, rng: np.random.Generator, cfg: dict, z_top: float, z_bottom: float,
                tilt_deg: float = 0.0, size: int | None = None, spacing: float | None = None) -> StackGeometry:
    """Axial slices from z_top down to z_bottom (along the tilted normal), centred on the canal."""
    size = int(size or cfg["axial_size_px"])
    spacing = float(spacing or cfg["axial_spacing_mm"])
    theta = np.deg2rad(tilt_deg)
    row_dir = np.array([1.0, 0.0, 0.0])
    col_dir = np.array([0.0, np.cos(theta), np.sin(theta)])
    normal = np.cross(row_dir, col_dir)
    z_mid = 0.5 * (z_top + z_bottom)
    center = np.array([anat.center_mm[0] + rng.uniform(-3, 3),
                       float(anat.canal_y(np.array([z_mid]))[0]) - 12.0 + rng.uniform(-4, 4), z_mid])
    gap = float(cfg["axial_gap_mm"])
    n = int(np.ceil((z_top - z_bottom) / gap)) + 1
    t = (np.arange(n) - (n - 1) / 2) * gap
    t = t[::-1]  # superior slice first, as scanners usually number them
    half = (size - 1) / 2 * spacing
    centers = center[None, :] + t[:, None] * normal[None, :]
    positions = centers - half * row_dir[None, :] - half * col_dir[None, :]
    return StackGeometry(positions, row_dir, col_dir, (spacing, spacing), (size, size), thickness_mm=gap * 0.9)


# ---------------------------------------------------------------------------------------- rendering
def render_stack(anat: SpineAnatomy, geom: StackGeometry, sequence: str, rng: np.random.Generator) -> np.ndarray:
    """uint16 (n, rows, cols) sampled at the slice centres: bias field, per-series scale, Rician noise."""
    rows, cols = geom.shape_rc
    n = len(geom.positions)
    r, c = np.meshgrid(np.arange(rows, dtype=np.float32), np.arange(cols, dtype=np.float32), indexing="ij")
    in_plane = (c.reshape(-1, 1) * geom.spacing_rc[1]) * geom.row_dir[None, :] + (
        r.reshape(-1, 1) * geom.spacing_rc[0]) * geom.col_dir[None, :]
    points = (geom.positions[:, None, :] + in_plane[None, :, :]).reshape(-1, 3)
    image = render(anat, points, sequence).reshape(n, rows, cols)
    # smooth multiplicative bias field (receive-coil sensitivity), in patient coordinates
    grad = rng.normal(0, 0.0012, 3)
    image *= (1.0 + (points - points.mean(axis=0)) @ grad).reshape(n, rows, cols).astype(np.float32)
    sigma = np.float32(rng.uniform(0.015, 0.035) * 800.0)
    noise = rng.standard_normal((2, *image.shape), dtype=np.float32) * sigma
    noisy = np.sqrt((image + noise[0]) ** 2 + noise[1] ** 2)
    scale = float(np.exp(rng.uniform(np.log(0.5), np.log(3.0))))  # MR units are arbitrary per series
    return np.clip(noisy * scale, 0, 65535).astype(np.uint16)


# ------------------------------------------------------------------------------------------ DICOM
def series_template(meta: dict, geom: StackGeometry) -> Dataset:
    """The tags shared by every slice of a stack (MR Image Storage, 16-bit unsigned, MONOCHROME2)."""
    file_meta = FileMetaDataset()
    file_meta.MediaStorageSOPClassUID = MRImageStorage
    file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    file_meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = file_meta
    ds.SOPClassUID = MRImageStorage
    ds.Modality = "MR"
    ds.PatientID = str(meta["study_id"])
    ds.StudyInstanceUID = meta["study_uid"]
    ds.SeriesInstanceUID = meta["series_uid"]
    ds.SeriesNumber = int(meta["series_number"])
    ds.SeriesDescription = meta["description"]
    ds.StudyDate = "20240101"
    ds.ImageOrientationPatient = [f"{v:.6f}" for v in np.r_[geom.row_dir, geom.col_dir]]
    ds.PixelSpacing = [f"{geom.spacing_rc[0]:.4f}", f"{geom.spacing_rc[1]:.4f}"]
    if not meta.get("drop_optional"):
        ds.SliceThickness = f"{geom.thickness_mm:.3f}"
        ds.RescaleSlope = "1"
        ds.RescaleIntercept = "0"
        ds.WindowCenter = "500"
        ds.WindowWidth = "1000"
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows, ds.Columns = int(geom.shape_rc[0]), int(geom.shape_rc[1])
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    return ds


def write_stack(folder: Path, pixels: np.ndarray, geom: StackGeometry, numbers: np.ndarray, meta: dict) -> None:
    """Write each slice as ``{instance_number}.dcm`` (explicit VR little endian, or compressed)."""
    folder.mkdir(parents=True, exist_ok=True)
    ds = series_template(meta, geom)
    syntax = meta.get("syntax", "explicit")
    for k in range(len(geom.positions)):
        ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID = generate_uid()
        ds.InstanceNumber = int(numbers[k])
        ds.ImagePositionPatient = [f"{v:.4f}" for v in geom.positions[k]]
        if not meta.get("drop_optional"):
            ds.SliceLocation = f"{float(geom.positions[k] @ geom.normal):.4f}"
        raw = np.ascontiguousarray(pixels[k], dtype=np.uint16)
        ds.PixelData = raw.tobytes()
        if syntax == "jpeg2000" and min(raw.shape) >= 64:  # openjpeg's 6 resolution levels need >= 64 px
            ds.compress(JPEG2000Lossless, raw)
        elif syntax in ("rle", "jpeg2000"):
            ds.compress(RLELossless, raw)
        ds.save_as(str(folder / f"{int(numbers[k])}.dcm"), enforce_file_format=True)


def instance_order(n: int, rng: np.random.Generator, shuffled_fraction: float) -> np.ndarray:
    """Instance number of each slice (slice order = position order): ascending, descending or shuffled."""
    numbers = np.arange(1, n + 1)
    u = rng.uniform()
    if u < shuffled_fraction:
        return rng.permutation(numbers)
    return numbers if u < 0.5 + shuffled_fraction / 2 else numbers[::-1]


# ------------------------------------------------------------------------------------------- studies
def sample_grades(rng: np.random.Generator, priors: dict, propensity_sd: float) -> dict:
    """Grades per condition and level: the group prior tilted by a study propensity and a level bias,
    p ∝ prior·[1, m, m²] with m = exp(u + bias_level)."""
    u = rng.normal(0.0, propensity_sd)
    grades = {}
    for condition in CONDITIONS:
        prior = np.asarray(priors[GROUP_OF_CONDITION[condition]], dtype=np.float64)
        grades[condition] = {}
        for li, level in enumerate(LEVELS):
            m = np.exp(u + LEVEL_BIAS[li])
            p = prior * np.array([1.0, m, m * m])
            grades[condition][level] = int(rng.choice(3, p=p / p.sum()))
    return grades


def _series_plan(rng: np.random.Generator, cfg: dict, anat: SpineAnatomy) -> list[dict]:
    """The series of one study: description, stacks (geometry) and sequence."""
    discs = anat.disc_z()
    plans = [{"description": "Sagittal T1", "sequence": "T1", "stacks": [sagittal_stack(anat, rng, cfg)]},
             {"description": "Sagittal T2/STIR", "sequence": "T2", "stacks": [sagittal_stack(anat, rng, cfg)]}]
    margin = 12.0
    if rng.uniform() < cfg["two_stack_fraction"]:
        upper = axial_stack(anat, rng, cfg, discs[0] + margin, discs[2] - margin)
        lower = axial_stack(anat, rng, cfg, discs[3] + margin, discs[4] - margin,
                            tilt_deg=float(rng.uniform(8, 16)), size=int(cfg["axial_size_px"]) - 8,
                            spacing=float(cfg["axial_spacing_mm"]) * 1.1)
        if rng.uniform() < 0.5:  # one series holding two stacks of different orientation and size
            plans.append({"description": "Axial T2", "sequence": "T2", "stacks": [upper, lower]})
        else:  # two axial series
            plans.append({"description": "Axial T2", "sequence": "T2", "stacks": [upper]})
            plans.append({"description": "Axial T2", "sequence": "T2", "stacks": [lower]})
    else:
        plans.append({"description": "Axial T2", "sequence": "T2",
                      "stacks": [axial_stack(anat, rng, cfg, discs[0] + margin, discs[4] - margin)]})
    return plans


def generate_study(task: dict) -> dict:
    """Write one study's DICOM files; return its CSV rows. Module-level (picklable for spawn pools)."""
    cfg, study_id, split, seed = task["cfg"], task["study_id"], task["split"], task["seed"]
    rng = np.random.default_rng(seed)
    grades = sample_grades(rng, cfg["class_priors"], cfg["propensity_sd"])
    anat = sample_anatomy(rng, grades)
    root = Path(task["root"]) / f"{split}_images" / str(study_id)
    study_uid = generate_uid()
    series_rows, coord_rows = [], []
    located: dict = {}
    for number, plan in enumerate(_series_plan(rng, cfg, anat), start=1):
        series_id = int(rng.integers(10**8, 4 * 10**9))
        syntax = "explicit"
        if rng.uniform() < cfg["compressed_fraction"]:
            syntax = "jpeg2000" if rng.uniform() < 0.6 else "rle"
        drop_optional = bool(rng.uniform() < 0.2)
        series_uid = generate_uid()
        series_rows.append({"study_id": study_id, "series_id": series_id,
                            "series_description": plan["description"]})
        next_instance = 1
        for geom in plan["stacks"]:
            pixels = render_stack(anat, geom, plan["sequence"], rng)
            numbers = instance_order(len(geom.positions), rng, cfg["shuffled_fraction"]) + next_instance - 1
            next_instance += len(geom.positions)
            meta = {"study_id": study_id, "study_uid": study_uid, "series_uid": series_uid,
                    "series_number": number, "description": plan["description"], "syntax": syntax,
                    "drop_optional": drop_optional}
            write_stack(root / str(series_id), pixels, geom, numbers, meta)
            located.setdefault(plan["description"], []).append((series_id, geom, numbers))
    # label coordinates: the instance nearest each landmark, in the series type the grade is read from
    which = {"spinal": "Sagittal T2/STIR", "foraminal": "Sagittal T1", "subarticular": "Axial T2"}
    for condition in CONDITIONS:
        for level in LEVELS:
            point = anat.landmark(condition, level)
            best = None
            for series_id, geom, numbers in located[which[GROUP_OF_CONDITION[condition]]]:
                k, dist, col, row = geom.locate(point)
                inside = 0 <= col < geom.shape_rc[1] and 0 <= row < geom.shape_rc[0]
                if inside and (best is None or dist < best[0]):
                    best = (dist, series_id, int(numbers[k]), col, row)
            if best is not None:
                coord_rows.append({"study_id": study_id, "series_id": best[1], "instance_number": best[2],
                                   "condition": CONDITION_TITLES[condition], "level": LEVEL_TITLES[level],
                                   "x": round(best[3], 3), "y": round(best[4], 3)})
    label_row = {"study_id": study_id}
    for condition in CONDITIONS:
        for level in LEVELS:
            label_row[f"{condition}_{level}"] = GRADES[grades[condition][level]]
    return {"study_id": study_id, "split": split, "series": series_rows, "coords": coord_rows,
            "labels": label_row}


# ------------------------------------------------------------------------------------------ dataset
def _corrupt(root: Path, results: list[dict], rng: np.random.Generator) -> list[str]:
    """Damage the written dataset in the ways real data is damaged; returns what was done (for logs)."""
    done = []
    train = [r for r in results if r["split"] == "train"]
    test = [r for r in results if r["split"] == "test"]
    if len(train) >= 3:
        # a truncated file in one series of the second train study
        series = train[1]["series"][0]
        files = sorted((root / "train_images" / str(train[1]["study_id"]) / str(series["series_id"])).glob("*.dcm"))
        if files:
            data = files[len(files) // 2].read_bytes()
            files[len(files) // 2].write_bytes(data[: len(data) // 3])
            done.append(f"truncated {files[len(files) // 2]}")
        # an unknown series description (a coronal series) in the third train study
        train[2]["series"].append({"study_id": train[2]["study_id"], "series_id": 999000001,
                                   "series_description": "Coronal STIR"})
        folder = root / "train_images" / str(train[2]["study_id"]) / "999000001"
        folder.mkdir(parents=True, exist_ok=True)
        src = sorted((root / "train_images" / str(train[2]["study_id"]) /
                      str(train[2]["series"][0]["series_id"])).glob("*.dcm"))[0]
        (folder / "1.dcm").write_bytes(src.read_bytes())
        done.append(f"unknown series description 'Coronal STIR' in study {train[2]['study_id']}")
    if len(test) >= 3:
        # test study 0: its Sagittal T1 series is absent (neither listed nor on disk)
        t1 = [s for s in test[0]["series"] if s["series_description"] == "Sagittal T1"][0]
        folder = root / "test_images" / str(test[0]["study_id"]) / str(t1["series_id"])
        for f in folder.glob("*.dcm"):
            f.unlink()
        folder.rmdir()
        test[0]["series"].remove(t1)
        done.append(f"test study {test[0]['study_id']}: no Sagittal T1")
        # test study 1: an axial series listed in the CSV but missing on disk
        ax = [s for s in test[1]["series"] if s["series_description"] == "Axial T2"][0]
        folder = root / "test_images" / str(test[1]["study_id"]) / str(ax["series_id"])
        for f in folder.glob("*.dcm"):
            f.unlink()
        folder.rmdir()
        done.append(f"test study {test[1]['study_id']}: Axial T2 listed but missing")
        # test study 2: one unreadable file in its sagittal T2 series
        t2 = [s for s in test[2]["series"] if s["series_description"] == "Sagittal T2/STIR"][0]
        folder = root / "test_images" / str(test[2]["study_id"]) / str(t2["series_id"])
        (folder / "9999.dcm").write_bytes(rng.bytes(4096))
        done.append(f"test study {test[2]['study_id']}: unreadable file 9999.dcm")
    return done


def generate_dataset(root: str | Path, cfg: dict | None = None, log=print) -> dict:
    """Write the whole Kaggle-layout dataset under ``root``; returns counts and what was corrupted."""
    cfg = {**SYNTHETIC_DEFAULTS, **(cfg or {})}
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(cfg["seed"])
    n_train, n_test = int(cfg["n_train_studies"]), int(cfg["n_test_studies"])
    # study ids: 7- to 9-digit numbers as in the competition, drawn without materializing the range (an
    # np.arange(10**6, 10**9) population is an 8 GB array; an integer population gives the same draw)
    ids = 10**6 + rng.choice(10**9 - 10**6, size=n_train + n_test + 1, replace=False)
    tasks = [{"cfg": cfg, "study_id": int(ids[i]), "split": "train" if i < n_train else "test",
              "seed": int(cfg["seed"]) * 100003 + i, "root": str(root)} for i in range(n_train + n_test)]
    workers = max(1, int(cfg["workers"]))
    if workers > 1 and len(tasks) > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            results = list(pool.map(generate_study, tasks))
    else:
        results = [generate_study(t) for t in tasks]
    corrupted = _corrupt(root, results, rng) if cfg["corrupt"] else []

    train = [r for r in results if r["split"] == "train"]
    test = [r for r in results if r["split"] == "test"]
    labels = pd.DataFrame([r["labels"] for r in train], columns=["study_id", *TARGET_COLUMNS])
    if cfg["corrupt"] and len(train) >= 3:
        # empty labels (as in the real train.csv) ...
        n_nan = int(round(cfg["nan_label_fraction"] * labels.shape[0] * len(TARGET_COLUMNS)))
        for _ in range(n_nan):
            i, j = int(rng.integers(len(labels))), int(rng.integers(len(TARGET_COLUMNS)))
            labels.iat[i, j + 1] = np.nan
        # ... and a study listed in train.csv (and its series CSV) that has no images at all
        ghost = int(ids[-1])
        labels.loc[len(labels)] = [ghost] + ["Normal/Mild"] * len(TARGET_COLUMNS)
        train[0]["series"].append({"study_id": ghost, "series_id": 111, "series_description": "Sagittal T1"})
        corrupted.append(f"study {ghost} in train.csv without images")
    coords = pd.DataFrame([c for r in train for c in r["coords"]])
    # coordinates exist only where a label exists (as in the competition files)
    long = labels.melt(id_vars="study_id", var_name="target", value_name="grade").dropna()
    keep = {(int(s), t) for s, t in zip(long["study_id"], long["target"])}
    title_to_cond = {v: k for k, v in CONDITION_TITLES.items()}
    title_to_level = {v: k for k, v in LEVEL_TITLES.items()}
    coords = coords[[(int(s), f"{title_to_cond[c]}_{title_to_level[lv]}") in keep
                     for s, c, lv in zip(coords["study_id"], coords["condition"], coords["level"])]]

    labels.to_csv(root / "train.csv", index=False)
    coords.to_csv(root / "train_label_coordinates.csv", index=False)
    pd.DataFrame([s for r in train for s in r["series"]]).to_csv(root / "train_series_descriptions.csv",
                                                                  index=False)
    pd.DataFrame([s for r in test for s in r["series"]]).to_csv(root / "test_series_descriptions.csv",
                                                                 index=False)
    rows = [f"{r['study_id']}_{t}" for r in test for t in TARGET_COLUMNS]
    pd.DataFrame({"row_id": rows, "normal_mild": 1 / 3, "moderate": 1 / 3, "severe": 1 / 3}).to_csv(
        root / "sample_submission.csv", index=False)
    solution = []
    for r in test:
        for target in TARGET_COLUMNS:
            grade = GRADES.index(r["labels"][target])
            onehot = np.eye(3)[grade]
            solution.append({"row_id": f"{r['study_id']}_{target}", "normal_mild": onehot[0],
                             "moderate": onehot[1], "severe": onehot[2], "sample_weight": [1, 2, 4][grade]})
    (root / "solution").mkdir(exist_ok=True)
    pd.DataFrame(solution).to_csv(root / "solution" / "test_solution.csv", index=False)
    for line in corrupted:
        log(f"synthetic: {line}")
    n_files = sum(1 for _ in root.rglob("*.dcm"))
    return {"n_train_studies": len(train), "n_test_studies": len(test), "n_dicom_files": n_files,
            "corrupted": corrupted, "root": os.fspath(root)}
