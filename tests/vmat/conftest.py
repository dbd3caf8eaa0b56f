"""Shared fixtures of the vmat tests: small synthetic DICOM-RT patients generated once per session."""

from __future__ import annotations

import copy

import numpy as np
import pytest

from vmat.defaults import PHANTOM_DEFAULTS
from vmat.phantom import generate_case, write_case

# Tiny patients for pipeline tests: the whole pelvis at a very coarse resolution (fast, not accurate).
TINY = copy.deepcopy(PHANTOM_DEFAULTS)
TINY["ct"].update({"shape_zyx": [24, 32, 32], "spacing_zyx_mm": [10.0, 12.0, 12.0]})
TINY["dose_grid"]["spacing_zyx_mm"] = [5.0, 6.0, 6.0]
TINY["plan"]["beams_per_arc"] = 12
TINY["contour_resolution_mm"] = 1.0
TINY["body_contour_resolution_mm"] = 3.0

# The demo resolution (5 x 6 x 6 mm) with non-square pixels (6 x 4 mm) and a non-unit rescale slope.
SMOKE = copy.deepcopy(PHANTOM_DEFAULTS)
SMOKE["ct"].update({"shape_zyx": [40, 64, 96], "spacing_zyx_mm": [5.0, 6.0, 4.0], "rescale_slope": 0.5,
                    "rescale_intercept": -1000.0})


@pytest.fixture(scope="session")
def tiny_cfg() -> dict:
    return copy.deepcopy(TINY)


@pytest.fixture(scope="session")
def smoke_case(tmp_path_factory):
    """(PhantomCase, folder) of one patient at demo resolution, written as DICOM."""
    case = generate_case(copy.deepcopy(SMOKE), 0, 3)
    folder = write_case(case, tmp_path_factory.mktemp("vmat_smoke") / case.case_id, SMOKE, 3)
    return case, folder


@pytest.fixture(scope="session")
def tiny_raw(tmp_path_factory):
    """A raw folder with three tiny patients (train) + the config used."""
    root = tmp_path_factory.mktemp("vmat_tiny_raw")
    for i in range(3):
        case = generate_case(copy.deepcopy(TINY), i, 0)
        write_case(case, root / case.case_id, TINY, 0)
    return root


@pytest.fixture(scope="session")
def tiny_npz(tiny_raw, tmp_path_factory):
    """The tiny patients preprocessed into NPZ files (default channels and required structures)."""
    from vmat.preprocess_vmat import main

    out = tmp_path_factory.mktemp("vmat_tiny_npz")
    summary = main(["--data", str(tiny_raw), "--output-dir", str(out)])
    assert summary["n_ok"] == 3, summary["skipped"]
    return out


def dose_on_ct_grid(case) -> np.ndarray:
    """The generator's dose interpolated at CT voxel centres with scipy (independent of SimpleITK)."""
    from scipy import ndimage

    sp, dsp = np.array(case.ct_spacing_zyx), np.array(case.dose_spacing_zyx)
    zz, yy, xx = np.meshgrid(*[np.arange(n) for n in case.hu.shape], indexing="ij")
    coords = [(case.ct_origin_xyz[2] + zz * sp[0] - case.dose_origin_xyz[2]) / dsp[0],
              (case.ct_origin_xyz[1] + yy * sp[1] - case.dose_origin_xyz[1]) / dsp[1],
              (case.ct_origin_xyz[0] + xx * sp[2] - case.dose_origin_xyz[0]) / dsp[2]]
    return ndimage.map_coordinates(case.dose, coords, order=1, mode="constant")
