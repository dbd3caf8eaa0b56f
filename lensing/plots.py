"""Figures of the lens-finder validation: ROC, stratified TPR curves, cutout grids, reliability diagram."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.plotting import OKABE_ITO, plt, save_figure
from lensing.metrics import roc_curve_counts


def plot_roc(y_true, scores: dict, path_stem: Path) -> list[Path]:
    """ROC as TPR against false-positive COUNT (log axis; Bologna TPR0/TPR10 read off at 0 and 9) and
    against the false-positive rate."""
    fig, axes = plt.subplots(1, 2, figsize=(7.5, 3.2))
    for (name, score), colour in zip(scores.items(), OKABE_ITO):
        roc = roc_curve_counts(y_true, score)
        axes[0].step(np.maximum(roc["fp_count"], 0.5), roc["tpr"], where="post", color=colour, label=name)
        axes[1].plot(roc["fpr"], roc["tpr"], color=colour, label=name)
    axes[0].axvline(9.5, color="grey", linestyle=":", linewidth=0.8)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("false positives (count; 0 drawn at 0.5)")
    axes[0].set_ylabel("true-positive rate")
    axes[0].set_title("TPR vs false-positive count")
    axes[1].plot([0, 1], [0, 1], color="grey", linestyle="--", linewidth=0.8)
    axes[1].set_xlabel("false-positive rate")
    axes[1].set_title("ROC")
    axes[1].legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path_stem)


def plot_stratified(curves: dict, path_stem: Path, labels: dict | None = None) -> list[Path]:
    """One panel per truth quantity: AUROC, TPR10 and TPR0 when lenses below the threshold are dropped."""
    names = [k for k, rows in curves.items() if rows]
    if not names:
        return []
    fig, axes = plt.subplots(1, len(names), figsize=(3.3 * len(names), 3.0), squeeze=False)
    for ax, name in zip(axes[0], names):
        rows = curves[name]
        x = [r["threshold"] for r in rows]
        for metric, colour in zip(("auroc", "tpr10", "tpr0"), OKABE_ITO):
            ax.plot(x, [r[metric] for r in rows], marker="o", markersize=3, color=colour, label=metric)
        ax.set_xlabel(f"{(labels or {}).get(name, name)} ≥ threshold")
        ax.set_ylim(-0.02, 1.02)
        ax.set_title("lenses kept above threshold;\nall non-lenses kept", fontsize=8)
    axes[0][0].set_ylabel("metric")
    axes[0][0].legend(loc="lower right")
    fig.tight_layout()
    return save_figure(fig, path_stem)


def plot_cutout_grid(images: Sequence[np.ndarray], titles: Sequence[str], path_stem: Path, suptitle: str,
                     ncols: int = 8) -> list[Path]:
    """Cutouts (first band, arcsinh stretch of the noise-normalized input)."""
    n = max(len(images), 1)
    nrows = int(np.ceil(n / ncols))
    fig, axes = plt.subplots(nrows, ncols, figsize=(1.3 * ncols, 1.45 * nrows + 0.4), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, image, title in zip(axes.ravel(), images, titles):
        ax.imshow(np.arcsinh(np.asarray(image)[0]), origin="lower", cmap="gray")
        ax.set_title(title, fontsize=6)
    fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def plot_reliability(reliability: dict, path_stem: Path, ece: float) -> list[Path]:
    """Reliability diagram of the top-label confidence (common.metrics.reliability_curve)."""
    fig, ax = plt.subplots(figsize=(3.4, 3.2))
    conf = np.array(reliability["confidence"], dtype=float)
    acc = np.array(reliability["accuracy"], dtype=float)
    ok = np.isfinite(conf) & np.isfinite(acc)
    ax.plot([0.5, 1], [0.5, 1], color="grey", linestyle="--", linewidth=0.8)
    ax.plot(conf[ok], acc[ok], marker="o", color=OKABE_ITO[0])
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_title(f"calibration (ECE {ece:.3f})")
    fig.tight_layout()
    return save_figure(fig, path_stem)
