"""Fixtures of the rsna_spine tests: tiny DICOM series with known geometry, and one tiny synthetic
Kaggle-layout dataset (generated once per session and shared by the end-to-end tests)."""

from types import SimpleNamespace

import numpy as np
import pytest

from rsna_spine.synthetic import StackGeometry, write_stack

TINY_SYNTHETIC = {
    "n_train_studies": 6, "n_test_studies": 3, "seed": 7, "sag_size_px": 40, "sag_spacing_mm": 4.9,
    "sag_slices": [9, 9], "sag_gap_mm": [6.5, 6.5], "axial_size_px": 32, "axial_spacing_mm": 4.4,
    "axial_gap_mm": 10.0, "workers": 1, "corrupt": True, "two_stack_fraction": 0.4,
}


def make_geometry(kind: str = "sagittal", n: int = 6, rows: int = 8, cols: int = 10, gap: float = 4.0,
                  spacing=(1.5, 2.0), tilt_deg: float = 0.0, origin=(0.0, 0.0, 0.0), flip_rows: bool = False):
    """A stack of n slices; sagittal: normal −x as scanners write it (IOP 0,1,0,0,0,−1)."""
    origin = np.asarray(origin, dtype=float)
    if kind == "sagittal":
        row_dir, col_dir = np.array([0.0, 1.0, 0.0]), np.array([0.0, 0.0, -1.0])
        step = np.array([1.0, 0.0, 0.0])
    else:
        t = np.deg2rad(tilt_deg)
        row_dir, col_dir = np.array([1.0, 0.0, 0.0]), np.array([0.0, np.cos(t), np.sin(t)])
        step = np.cross(row_dir, col_dir)
    if flip_rows:
        col_dir = -col_dir
    positions = origin[None, :] + gap * np.arange(n)[:, None] * step[None, :]
    return StackGeometry(positions, row_dir, col_dir, tuple(spacing), (rows, cols), thickness_mm=gap)


def write_series(folder, geom, pixels=None, numbers=None, syntax="explicit", drop_optional=False,
                 description="Sagittal T2/STIR"):
    """Write ``geom`` as DICOM files; pixel value of slice k, row r, col c = 1000·k + 10·r + c by default."""
    n = len(geom.positions)
    rows, cols = geom.shape_rc
    if pixels is None:
        k, r, c = np.meshgrid(np.arange(n), np.arange(rows), np.arange(cols), indexing="ij")
        pixels = (1000 * k + 10 * r + c + 100).astype(np.uint16)
    numbers = np.arange(1, n + 1) if numbers is None else np.asarray(numbers)
    meta = {"study_id": 1, "study_uid": "1.2.3", "series_uid": "1.2.3.4", "series_number": 1,
            "description": description, "syntax": syntax, "drop_optional": drop_optional}
    write_stack(folder, pixels, geom, numbers, meta)
    return pixels, numbers


@pytest.fixture
def dicom():
    """The helpers above, as a fixture (tests import nothing from conftest)."""
    return SimpleNamespace(make_geometry=make_geometry, write_series=write_series)


@pytest.fixture(scope="session")
def tiny_dataset(tmp_path_factory):
    """A preprocessed tiny synthetic dataset: {"root", "cache", "work"} (preprocess_rsna.main ran once)."""
    from rsna_spine.preprocess_rsna import main as preprocess

    work = tmp_path_factory.mktemp("rsna_tiny")
    root, cache = work / "kaggle", work / "cache"
    args = ["--config", "configs/rsna_spine/smoke.yaml", "--output-dir", str(work / "preprocess"),
            "--set", f"paths.data_root={root.as_posix()}", "--set", f"paths.cache_dir={cache.as_posix()}",
            "--set", "preprocess.n_folds=2"]
    for key, value in TINY_SYNTHETIC.items():
        args += ["--set", f"synthetic.{key}={value}".replace("'", "")]
    summary = preprocess(args)
    return {"root": root, "cache": cache, "work": work, "summary": summary}
