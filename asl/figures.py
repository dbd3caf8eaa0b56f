"""Validation figures: maps (truth / NN / LS / errors), scatter and Bland-Altman plots, error vs SNR curves,
uncertainty calibration. All saved through common.plotting.save_figure (300 DPI PNG + PDF)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from common.plotting import OKABE_ITO, plt, save_figure

METHOD_NAMES = {"nn": "Network", "ls_nominal": "LS (nominal physics)", "ls_oracle": "LS (true physics)"}


def plot_maps(truth: Mapping, estimates: Mapping, mask: np.ndarray, path: Path, snr: float) -> list[Path]:
    """One phantom: rows CBF and ATT; columns truth, each method, |error| of each method."""
    methods = list(estimates)
    cols = 1 + 2 * len(methods)
    fig, axes = plt.subplots(2, cols, figsize=(1.9 * cols, 4.0), squeeze=False)
    for r, (param, unit, vmax, emax) in enumerate((("cbf", "ml/100g/min", 100, 30), ("att", "ms", 3500, 800))):
        show = lambda ax, img, title, cmap, vmin, vm: (ax.imshow(np.where(mask, img, np.nan).T, cmap=cmap, vmin=vmin,  # noqa: E731
                                                                  vmax=vm, origin="lower"), ax.set_title(title, fontsize=7))
        im = show(axes[r, 0], truth[param], f"true {param.upper()}", "viridis", 0, vmax)[0]
        for i, m in enumerate(methods):
            show(axes[r, 1 + i], estimates[m][param], METHOD_NAMES.get(m, m), "viridis", 0, vmax)
            em = show(axes[r, 1 + len(methods) + i], np.abs(estimates[m][param] - truth[param]),
                      f"|error| {METHOD_NAMES.get(m, m)}", "magma", 0, emax)[0]
        fig.colorbar(im, ax=axes[r, :1 + len(methods)].tolist(), shrink=0.8, label=f"{param.upper()} ({unit})")
        fig.colorbar(em, ax=axes[r, 1 + len(methods):].tolist(), shrink=0.8, label=f"|error| ({unit})")
    for ax in axes.ravel():
        ax.axis("off")
    fig.suptitle(f"Test phantom at SNR {snr:g}", fontsize=9)
    return save_figure(fig, path)


def plot_scatter_ba(truth: Mapping, estimates: Mapping, valid: np.ndarray, path: Path, snr: float,
                    max_points: int, seed: int = 0) -> list[Path]:
    """Top: estimate vs truth per method; bottom: Bland-Altman (difference vs mean) of CBF per method."""
    idx = np.flatnonzero(valid.ravel())
    if idx.size > max_points:
        idx = np.random.default_rng(seed).choice(idx, max_points, replace=False)
    methods = list(estimates)
    fig, axes = plt.subplots(3, len(methods), figsize=(3.0 * len(methods), 8.4), squeeze=False)
    for c, m in enumerate(methods):
        for r, (param, lim) in enumerate((("cbf", 160), ("att", 4000))):
            t, e = truth[param].ravel()[idx], estimates[m][param].ravel()[idx]
            ax = axes[r, c]
            ax.scatter(t, e, s=2, alpha=0.3, color=OKABE_ITO[c])
            ax.plot([0, lim], [0, lim], color="k", lw=0.8)
            ax.set_xlim(0, lim)
            ax.set_ylim(0, lim)
            ax.set_xlabel(f"true {param.upper()}")
            ax.set_ylabel(f"{METHOD_NAMES.get(m, m)}")
        t, e = truth["cbf"].ravel()[idx], estimates[m]["cbf"].ravel()[idx]
        diff, mean = e - t, (e + t) / 2
        bias, sd = float(np.nanmean(diff)), float(np.nanstd(diff, ddof=1))
        ax = axes[2, c]
        ax.scatter(mean, diff, s=2, alpha=0.3, color=OKABE_ITO[c])
        for y, style in ((bias, "-"), (bias + 1.96 * sd, "--"), (bias - 1.96 * sd, "--")):
            ax.axhline(y, color="k", lw=0.8, ls=style)
        ax.set_xlabel("mean of estimate and truth (CBF)")
        ax.set_ylabel("estimate − truth (CBF)")
        ax.set_title(f"bias {bias:.2f}, LoA ±{1.96 * sd:.1f}", fontsize=8)
    fig.suptitle(f"Brain voxels of the test phantoms, SNR {snr:g}", fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_error_vs_snr(rows: Sequence[Mapping], crlb_rmse: Mapping, path: Path, tissue: str = "brain") -> list[Path]:
    """MAE of CBF and ATT vs SNR per method; dashed: √mean CRLB (RMSE floor of unbiased voxel-wise fits)."""
    fig, axes = plt.subplots(1, 2, figsize=(7.0, 2.8))
    for ax, param, unit in ((axes[0], "cbf", "ml/100g/min"), (axes[1], "att", "ms")):
        for c, method in enumerate(("nn", "ls_nominal", "ls_oracle")):
            pts = sorted((r["snr"], r["mae"]) for r in rows if r["method"] == method and r["param"] == param
                         and r["tissue"] == tissue)
            if pts:
                ax.plot(*zip(*pts), marker="o", ms=3, color=OKABE_ITO[c], label=METHOD_NAMES[method])
        pts = sorted(crlb_rmse[param].items())
        if pts:
            ax.plot(*zip(*pts), ls="--", color="k", lw=0.8, label="√CRLB (RMSE floor)")
        ax.set_xscale("log")
        ax.set_xlabel("SNR")
        ax.set_ylabel(f"{param.upper()} MAE ({unit})")
    axes[0].legend(frameon=False)
    fig.tight_layout()
    return save_figure(fig, path)


def plot_calibration(levels: Sequence[float], observed: Mapping, path: Path) -> list[Path]:
    """Observed share of truths inside the central interval vs its nominal level."""
    fig, ax = plt.subplots(figsize=(3.2, 3.0))
    ax.plot([0, 1], [0, 1], color="k", lw=0.8)
    for c, (name, values) in enumerate(observed.items()):
        ax.plot(levels, values, marker="o", ms=3, color=OKABE_ITO[c], label=name)
    ax.set_xlabel("nominal interval level")
    ax.set_ylabel("share of truths inside")
    ax.legend(frameon=False, fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path)
