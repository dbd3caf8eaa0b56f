"""Publication figures: headless (Agg), colour-blind-safe palette, 300 DPI PNG + vector PDF.

Import this module before pyplot anywhere in the project so the Agg backend is set on machines
without a display (CI, SSH sessions, Windows services).
"""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

# Okabe & Ito (2008) colour-blind-safe palette.
OKABE_ITO = ["#0072B2", "#E69F00", "#009E73", "#D55E00", "#CC79A7", "#56B4E9", "#F0E442", "#000000"]


def setup_style() -> None:
    """rcParams for readable, consistent figures."""
    plt.rcParams.update({
        "figure.dpi": 100,
        "savefig.dpi": 300,
        "savefig.bbox": "tight",
        "font.size": 9,
        "axes.titlesize": 10,
        "axes.labelsize": 9,
        "legend.fontsize": 8,
        "axes.spines.top": False,
        "axes.spines.right": False,
        "axes.prop_cycle": matplotlib.cycler(color=OKABE_ITO),
        "image.cmap": "viridis",
        "pdf.fonttype": 42,  # editable text in Illustrator/Inkscape
    })


setup_style()


def default_formats() -> tuple[str, ...]:
    """Figure formats: ``PLOT_FORMATS`` (e.g. "png" in tests, where PDFs only cost time), else PNG + PDF."""
    text = os.environ.get("PLOT_FORMATS", "png,pdf")
    formats = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    return formats or ("png", "pdf")


def save_figure(fig, path_stem: str | Path, formats: Sequence[str] | None = None) -> list[Path]:
    """Save ``fig`` as ``<stem>.png`` (300 DPI) and ``<stem>.pdf`` (see :func:`default_formats`), close it,
    and return the paths."""
    formats = default_formats() if formats is None else formats
    stem = Path(path_stem)
    if stem.suffix in (".png", ".pdf"):
        stem = stem.with_suffix("")
    stem.parent.mkdir(parents=True, exist_ok=True)
    paths = []
    for fmt in formats:
        path = stem.with_suffix(f".{fmt}")
        fig.savefig(path, dpi=300)
        paths.append(path)
    plt.close(fig)
    return paths


def _numeric(values) -> list[float]:
    out = []
    for v in values:
        try:
            out.append(float(v))
        except (TypeError, ValueError):
            out.append(float("nan"))
    return out


def plot_training_curves(metrics_csv: str | Path, path_stem: str | Path, x_key: str = "epoch",
                         keys: Sequence[str] | None = None, log_y_for: Sequence[str] = ("loss",)) -> list[Path]:
    """One panel per metric column of ``metrics.csv`` against ``x_key``; columns whose name contains a
    word of ``log_y_for`` get a log axis when all values are positive."""
    from common.runlog import read_csv_rows

    rows = read_csv_rows(metrics_csv)
    if not rows:
        raise ValueError(f"{metrics_csv}: no rows to plot")
    columns = [c for c in rows[0] if c != x_key]
    if keys is not None:
        missing = [k for k in keys if k not in rows[0]]
        if missing:
            raise KeyError(f"{metrics_csv}: no column(s) {missing}; columns are {list(rows[0])}")
        columns = list(keys)
    series = {}
    for column in columns:
        values = _numeric(r.get(column) for r in rows)
        if any(math.isfinite(v) for v in values):
            series[column] = values
    x = _numeric(r.get(x_key, i) for i, r in enumerate(rows))
    n = max(len(series), 1)
    ncols = min(3, n)
    nrows = math.ceil(n / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.4 * nrows), squeeze=False)
    for ax, (column, values) in zip(axes.ravel(), series.items()):
        points = [(xi, yi) for xi, yi in zip(x, values) if math.isfinite(yi) and math.isfinite(xi)]
        ax.plot([p[0] for p in points], [p[1] for p in points], marker="o", markersize=2, linewidth=1)
        ax.set_title(column)
        ax.set_xlabel(x_key)
        if any(w in column for w in log_y_for) and points and all(p[1] > 0 for p in points):
            ax.set_yscale("log")
    for ax in axes.ravel()[len(series):]:
        ax.axis("off")
    fig.tight_layout()
    return save_figure(fig, path_stem)
