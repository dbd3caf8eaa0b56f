"""The simulated smoke data set shared by the lensing pipeline tests (simulated once per session)."""

from __future__ import annotations

import pytest

from lensing import preprocess_lensing

SMOKE = "configs/lensing/smoke.yaml"


@pytest.fixture(scope="session")
def dataset(tmp_path_factory):
    """(folder, preprocess summary) of 96 simulated 24x24 cutouts (16-bit TIFF), split train/val/test.
    Tests that damage files work on a copy."""
    out = tmp_path_factory.mktemp("lensing") / "data"
    summary = preprocess_lensing.main(["simulate", "--config", SMOKE, "--output-dir", str(out),
                                       "--set", "simulate.n_per_survey=[96]", "--set", "simulate.n_pix=24",
                                       "--set", "simulate.storage=tiff16"])
    return out, summary
