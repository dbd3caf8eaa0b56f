"""Figures of the validation report (common.plotting: Agg backend, Okabe-Ito palette, PNG + PDF)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from common.metrics import reliability_curve
from common.plotting import OKABE_ITO, plt, save_figure
from rsna_spine.constants import GRADES, GROUPS, LEVEL_TITLES, SUBMISSION_COLUMNS


def training_figure(curves: Mapping[str, pd.DataFrame], path_stem: Path) -> list[Path]:
    """Training curves of one run in three panels: localizer validation error, classifier loss and
    official score, classifier per-class recall. ``curves``: {job name: its metrics.csv as a frame}."""
    fig, axes = plt.subplots(1, 3, figsize=(10.5, 2.8))
    for (name, frame), color in zip(curves.items(), OKABE_ITO * 3):
        label = name.split("/")[-1]
        if "val_error_mm" in frame:
            axes[0].plot(frame["epoch"], frame["val_error_mm"], marker="o", markersize=2, color=color, label=label)
        if "val_official" in frame:
            axes[1].plot(frame["epoch"], frame["train_loss"], linestyle="--", color=color, label=f"{label} train loss")
            axes[1].plot(frame["epoch"], frame["val_official"], marker="o", markersize=2, color=color,
                         label=f"{label} val official")
            for cls, style in zip(SUBMISSION_COLUMNS, ("-", "--", ":")):
                column = f"val_recall_{cls}"
                if column in frame:
                    axes[2].plot(frame["epoch"], frame[column], linestyle=style, color=color, label=f"{label} {cls}")
    axes[0].set_yscale("log")
    for ax, title in zip(axes, ("stage 1: validation error (mm)", "stage 2: loss / official score",
                                "stage 2: validation recall")):
        ax.set_title(title)
        ax.set_xlabel("epoch")
        if ax.lines:
            ax.legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def evaluation_figure(report: Mapping, table: pd.DataFrame, errors: pd.DataFrame, path_stem: Path) -> list[Path]:
    """Out-of-fold evaluation at a glance: a confusion matrix per condition group (rows = truth), the
    reliability diagram of the top-label probability, and the stage-1 localization error per group."""
    groups = [g for g in GROUPS if g in report.get("per_group", {})]
    fig, axes = plt.subplots(1, len(groups) + 2, figsize=(2.6 * (len(groups) + 2), 2.8), squeeze=False)
    axes = axes[0]
    for ax, group in zip(axes, groups):
        cm = np.asarray(report["per_group"][group]["confusion"], dtype=float)
        norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
        ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
        for r in range(3):
            for c in range(3):
                ax.text(c, r, f"{int(cm[r, c])}", ha="center", va="center",
                        color="white" if norm[r, c] > 0.6 else "black", fontsize=7)
        ax.set_xticks(range(3), ["N/M", "Mod", "Sev"])
        ax.set_yticks(range(3), ["N/M", "Mod", "Sev"])
        ax.set_xlabel("predicted")
        ax.set_ylabel("true")
        ax.set_title(f"{group} (BA {report['per_group'][group]['balanced_accuracy']:.2f})")
    ax = axes[len(groups)]
    scored = table[table["label"] >= 0]
    curve = reliability_curve(scored[list(SUBMISSION_COLUMNS)].to_numpy(float), scored["label"].to_numpy(), n_bins=10)
    ax.plot([0, 1], [0, 1], color="grey", linewidth=0.8, linestyle="--")
    ax.plot(curve["confidence"], curve["accuracy"], marker="o", markersize=3, color=OKABE_ITO[0])
    ax.set_xlabel("top-grade probability")
    ax.set_ylabel("observed frequency")
    ax.set_title(f"calibration (ECE {report.get('ece', float('nan')):.3f})")
    ax = axes[len(groups) + 1]
    if len(errors):
        top = max(float(np.nanpercentile(errors["distance_mm"], 98)), 1.0)
        bins = np.linspace(0, top, 20)
        for color, group in zip(OKABE_ITO, GROUPS):
            sel = errors.loc[errors["group"] == group, "distance_mm"]
            if len(sel):
                ax.hist(sel.clip(upper=top), bins=bins, histtype="step", color=color, linewidth=1.3,
                        label=f"{group} ({sel.median():.1f} mm)")
        ax.legend(fontsize=6, title="median", title_fontsize=6)
    ax.set_xlabel("stage-1 error (mm, 3D)")
    ax.set_ylabel("points")
    ax.set_title("localization")
    fig.tight_layout()
    return save_figure(fig, path_stem)


def attention_figure(examples: Sequence[Mapping], path_stem: Path) -> list[Path]:
    """Attention-MIL weights over the slices of each spinal-canal crop stack, one panel per study, one
    line per level (legend: true / predicted grade).

    ``examples``: dicts with study_id, level, attention (N,), label, pred.
    """
    studies = sorted({e["study_id"] for e in examples})
    fig, axes = plt.subplots(1, len(studies), figsize=(3.3 * len(studies), 2.6), squeeze=False, sharey=True)
    for ax, study in zip(axes[0], studies):
        for e, color in zip(sorted((e for e in examples if e["study_id"] == study), key=lambda e: e["level"]),
                            OKABE_ITO):
            att = np.asarray(e["attention"], dtype=float)
            offsets = np.arange(len(att)) - len(att) // 2
            ax.plot(offsets, att, marker="o", markersize=3, color=color,
                    label=f"{LEVEL_TITLES[e['level']]}: {GRADES[e['label']]} / {GRADES[e['pred']]}")
            ax.set_xticks(offsets)
        ax.set_title(f"study {study}", fontsize=8)
        ax.set_xlabel("slice offset from the stage-1 slice")
        ax.legend(fontsize=5, title="level: true / predicted", title_fontsize=5)
    axes[0, 0].set_ylabel("attention weight")
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
