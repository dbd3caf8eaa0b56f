"""Shared pytest set-up: headless plotting, quiet progress bars, CUDA skip marker."""

import os

import matplotlib
import pytest
import torch

matplotlib.use("Agg")
os.environ.setdefault("PROGRESS", "0")
os.environ.setdefault("PLOT_FORMATS", "png")  # PDFs are exercised in test_common_runlog


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords:
            item.add_marker(skip_cuda)
