"""Figures of the validation report (common.plotting: Agg backend, Okabe-Ito palette, PNG + PDF)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.metrics import reliability_curve
from common.plotting import OKABE_ITO, plt, save_figure
from rsna_spine.constants import GRADES, GROUPS, LEVEL_TITLES, SUBMISSION_COLUMNS


def confusion_figure(report: Mapping, path_stem: Path) -> list[Path]:
    """One confusion matrix (rows = truth, columns = prediction) per condition group."""
    groups = [g for g in GROUPS if g in report.get("per_group", {})]
    fig, axes = plt.subplots(1, max(len(groups), 1), figsize=(3.2 * max(len(groups), 1), 3.0), squeeze=False)
    for ax, group in zip(axes[0], groups):
        cm = np.asarray(report["per_group"][group]["confusion"], dtype=float)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for r in range(3):
            for c in range(3):
                ax.text(c, r, f"{int(cm[r, c])}", ha="center", va="center",
                        color="white" if norm[r, c] > 0.6 else "black", fontsize=8)
        ax.set_xticks(range(3), ["N/M", "Mod", "Sev"])
        ax.set_yticks(range(3), ["N/M", "Mod", "Sev"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(group)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def reliability_figure(table: pd.DataFrame, path_stem: Path) -> list[Path]:
    """Reliability diagram of the top-label probability (metric-weighted probabilities)."""
    table = table[table["label"] >= 0]
    curve = reliability_curve(table[list(SUBMISSION_COLUMNS)].to_numpy(float), table["label"].to_numpy(), n_bins=10)
    fig, ax = plt.subplots(figsize=(3.4, 3.2))
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    ax.plot(curve["confidence"], curve["accuracy"], marker="o", color=OKABE_ITO[0])
    ax.set_xlabel("predicted probability of the top grade")
    ax.set_ylabel("observed frequency")
    ax.set_title("calibration (out of fold)")
    fig.tight_layout()
    return save_figure(fig, path_stem)


def localization_figure(errors: pd.DataFrame, path_stem: Path) -> list[Path]:
    """Histogram of stage-1 3D errors (mm) per condition group."""
    fig, ax = plt.subplots(figsize=(4.2, 3.0))
    top = float(np.nanpercentile(errors["distance_mm"], 98)) if len(errors) else 1.0
    bins = np.linspace(0, max(top, 1.0), 25)
    for color, group in zip(OKABE_ITO, GROUPS):
        sel = errors.loc[errors["group"] == group, "distance_mm"]
        if len(sel):
            ax.hist(sel.clip(upper=bins[-1]), bins=bins, histtype="step", color=color, linewidth=1.4,
                    label=f"{group} (median {sel.median():.1f} mm)")
    ax.set_xlabel("stage-1 error (mm, 3D)")
    ax.set_ylabel("points")
    ax.legend()
    fig.tight_layout()
    return save_figure(fig, path_stem)


def attention_figure(examples: Sequence[Mapping], path_stem: Path) -> list[Path]:
    """Attention over the slices of each crop stack, for the spinal levels of a few studies.

    ``examples``: dicts with study_id, level, attention (N,), label, pred.
    """
    studies = sorted({e["study_id"] for e in examples})
    levels = list(LEVEL_TITLES)
    fig, axes = plt.subplots(len(studies), len(levels), figsize=(1.9 * len(levels), 1.6 * len(studies)),
                             squeeze=False, sharey=True)
    for r, study in enumerate(studies):
        for c, level in enumerate(levels):
            ax = axes[r, c]
            match = [e for e in examples if e["study_id"] == study and e["level"] == level]
            if not match:
                ax.axis("off")
                continue
            e = match[0]
            att = np.asarray(e["attention"], dtype=float)
            offsets = np.arange(len(att)) - len(att) // 2
            ax.bar(offsets, att, color=OKABE_ITO[0])
            ax.set_title(f"{study} {LEVEL_TITLES[level]}\ntrue {GRADES[e['label']]} / pred {GRADES[e['pred']]}",
                         fontsize=6)
            ax.set_xticks(offsets)
            ax.tick_params(labelsize=6)
            if c == 0:
                ax.set_ylabel("attention")
            if r == len(studies) - 1:
                ax.set_xlabel("slice offset")
    fig.suptitle("spinal canal stenosis: attention-MIL weights per slice", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def crops_figure(examples: Sequence[Mapping], path_stem: Path, per_row: int = 5) -> list[Path]:
    """The centre slice of stage-2 crops with true and predicted grades (green: right, orange: wrong)."""
    n = len(examples)
    rows = int(np.ceil(n / per_row))
    fig, axes = plt.subplots(rows, per_row, figsize=(1.6 * per_row, 1.8 * rows), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for ax, e in zip(axes.ravel(), examples):
        image = np.asarray(e["image"])
        ax.imshow(image[image.shape[0] // 2, 0], cmap="gray", vmin=0, vmax=1)
        color = OKABE_ITO[2] if e["label"] == e["pred"] else OKABE_ITO[3]
        short = e["condition"].replace("_neural_foraminal_narrowing", " foramen").replace(
            "_subarticular_stenosis", " subart.").replace("spinal_canal_stenosis", "canal")
        ax.set_title(f"{short} {LEVEL_TITLES[e['level']]}\ntrue {GRADES[e['label']]}\npred {GRADES[e['pred']]} "
                     f"({e['p_pred']:.2f})", fontsize=6, color=color)
    fig.tight_layout()
    return save_figure(fig, path_stem)
