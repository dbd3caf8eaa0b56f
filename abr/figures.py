"""Figures of the ABR validation: waveform stacks with peaks, latency-intensity functions, threshold
agreement, confusion matrix and reliability diagram (common.plotting: Agg, Okabe-Ito, PNG + PDF)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from abr.labels import CLASS_ASCII
from abr.levels import model_level_reference
from common.plotting import OKABE_ITO, plt, save_figure


def pick_figure_ears(arrays: dict, series: np.ndarray, n: int, seed: int = 0) -> list[int]:
    """Up to ``n`` ears, one per class first (most interesting), then at random."""
    rng = np.random.default_rng(seed)
    chosen = []
    for c in np.unique(arrays["series_class"][series]):
        candidates = series[arrays["series_class"][series] == c]
        chosen.append(int(rng.choice(candidates)))
    rest = [int(s) for s in rng.permutation(series) if int(s) not in chosen]
    return (chosen + rest)[:n]


def waveform_stacks(arrays: dict, meta: dict, pred: dict, classical: dict, ears: list[int], path_stem: Path,
                    model_threshold: dict, prob_cut: float = 0.5) -> list[Path]:
    """One panel per ear: recordings stacked by intensity (µV), true wave V (black ▼), model's wave V
    (orange ●, when its existence probability ≥ ``prob_cut``), classical pick (blue ×, when the level is
    accepted); the three thresholds in the title. No ears (``validate.figure_ears: 0``): no figure."""
    if not len(ears):
        return []
    t_ms = np.asarray(meta["time_ms"])
    v = meta["waves"].index("V")
    row_pos = {int(r): i for i, r in enumerate(pred["rows"])}
    cls_pos = {int(r): i for i, r in enumerate(classical["rows"])}
    ser_pos = {int(s): i for i, s in enumerate(classical["series"])}
    fig, axes = plt.subplots(1, len(ears), figsize=(3.0 * len(ears), 5.0), squeeze=False)
    for ax, s in zip(axes[0], ears):
        rows = arrays["series_rows"][s]
        rows = rows[rows >= 0]
        spacing = max(float(np.abs(arrays["signal"][rows] * arrays["scale_uv"][rows, None]).max()) * 0.9, 0.15)
        for k, r in enumerate(rows):
            trace = arrays["signal"][r] * arrays["scale_uv"][r]
            offset = k * spacing
            ax.plot(t_ms, trace + offset, color="0.2", linewidth=0.7)
            ax.text(t_ms[-1], offset, f"{arrays['intensity_db'][r]:.0f}", fontsize=6, va="center")
            if arrays["exist"][r, v]:
                ax.plot(arrays["latency_ms"][r, v], arrays["amplitude_uv"][r, v] + offset, "v", color="black", ms=4)
            i = row_pos.get(int(r))
            if i is not None and pred["exist_prob"][i, v] >= prob_cut:
                amp = pred["amp_rel"][i, v] * arrays["scale_uv"][r]
                ax.plot(pred["latency_ms"][i, v], amp + offset, "o", color=OKABE_ITO[1], ms=3.5, alpha=0.9)
            j = cls_pos.get(int(r))
            if j is not None and classical["response"][j]:
                ax.plot(classical["latency_ms"][j], classical["amplitude_uv"][j] + offset, "x", color=OKABE_ITO[0], ms=4)
        name = meta["class_names"][int(arrays["series_class"][s])] if arrays["series_class"][s] >= 0 else "unknown"
        true = arrays["series_threshold_db"][s]
        ax.set_title(f"{arrays['series_patient'][s]} {arrays['series_ear'][s]} {name}\n"
                     f"true {true:.0f} | model {model_threshold.get(s, np.nan):.0f} | "
                     f"classical {classical['threshold_db'][ser_pos[s]]:.0f} dB", fontsize=7)
        ax.set_xlabel("time (ms)")
        ax.set_yticks([])
    axes[0][0].set_ylabel(f"intensity ({model_level_reference(meta)}), µV offsets")
    fig.tight_layout()
    return save_figure(fig, path_stem)


def latency_intensity(arrays: dict, meta: dict, pred: dict, path_stem: Path, prob_cut: float = 0.5) -> list[Path]:
    """Wave V latency against intensity per class: labels (grey) and model predictions (colour) for
    recordings where the wave truly exists, with per-level medians."""
    v = meta["waves"].index("V")
    rows = pred["rows"]
    present = arrays["exist"][rows, v]
    names = meta["class_names"]
    classes = [c for c in range(len(names)) if np.any(present & (arrays["class_idx"][rows] == c))]
    fig, axes = plt.subplots(1, max(len(classes), 1), figsize=(2.8 * max(len(classes), 1), 3.0), squeeze=False,
                             sharey=True)
    for ax, c in zip(axes[0], classes):
        sel = present & (arrays["class_idx"][rows] == c)
        level = arrays["intensity_db"][rows[sel]]
        true = arrays["latency_ms"][rows[sel], v]
        model = pred["latency_ms"][sel, v]
        ax.scatter(level - 1, true, s=5, color="0.6", label="label", rasterized=True)
        ax.scatter(level + 1, model, s=5, color=OKABE_ITO[c % len(OKABE_ITO)], label="model", rasterized=True)
        for lv in np.unique(level):
            ax.plot([lv - 2, lv + 2], [np.median(true[level == lv])] * 2, color="black", linewidth=1)
        ax.set_title(names[c])
        ax.set_xlabel(f"intensity ({model_level_reference(meta)})")
    axes[0][0].set_ylabel("wave V latency (ms)")
    axes[0][0].legend(fontsize=6)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def threshold_agreement(true_db: np.ndarray, model_db: np.ndarray, classical_db: np.ndarray, path_stem: Path,
                        level_reference: str = "dB nHL") -> list[Path]:
    """Predicted against true threshold for the model and the classical baseline, ±10 dB band."""
    fig, ax = plt.subplots(figsize=(3.6, 3.4))
    lim = [min(-5, float(np.nanmin(true_db)) - 5), float(np.nanmax(np.r_[true_db, model_db, classical_db])) + 5]
    ax.fill_between(lim, [lim[0] - 10, lim[1] - 10], [lim[0] + 10, lim[1] + 10], color="0.9", label="±10 dB")
    ax.plot(lim, lim, color="0.5", linewidth=0.8)
    ax.scatter(true_db, classical_db, s=10, marker="x", color=OKABE_ITO[0], label="classical")
    ax.scatter(true_db, model_db, s=10, color=OKABE_ITO[1], label="model")
    ax.set_xlabel(f"true threshold ({level_reference})")
    ax.set_ylabel(f"estimated threshold ({level_reference})")
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def confusion_matrix(confusion, names, path_stem: Path) -> list[Path]:
    cm = np.asarray(confusion, dtype=np.float64)
    share = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig, ax = plt.subplots(figsize=(3.8, 3.4))
    ax.imshow(share, vmin=0, vmax=1, cmap="Blues")
    for i in range(cm.shape[0]):
        for j in range(cm.shape[1]):
            ax.text(j, i, f"{int(cm[i, j])}", ha="center", va="center", fontsize=7,
                    color="white" if share[i, j] > 0.6 else "black")
    labels = [CLASS_ASCII.get(n, n) for n in names]  # ASCII tick labels render with any font
    ax.set_xticks(range(len(names)), labels, rotation=30)
    ax.set_yticks(range(len(names)), labels)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    fig.tight_layout()
    return save_figure(fig, path_stem)


def reliability_diagram(before: dict, after: dict, path_stem: Path) -> list[Path]:
    """Top-label accuracy against confidence, before and after temperature scaling."""
    fig, ax = plt.subplots(figsize=(3.4, 3.2))
    ax.plot([0, 1], [0, 1], color="0.6", linewidth=0.8)
    for curve, label, color in ((before, "raw", OKABE_ITO[0]), (after, "temperature-scaled", OKABE_ITO[1])):
        conf, acc = np.asarray(curve["confidence"], float), np.asarray(curve["accuracy"], float)
        ok = np.isfinite(conf) & np.isfinite(acc)
        ax.plot(conf[ok], acc[ok], "o-", color=color, label=label, markersize=3)
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path_stem)


def generated_vs_real(generated: np.ndarray, real: np.ndarray, levels: np.ndarray, t_ms: np.ndarray,
                      path_stem: Path, max_levels: int = 4) -> list[Path]:
    """Per intensity: mean ± SD of generated (orange) and real (grey) traces, and one example of each."""
    unique = np.unique(levels)
    if unique.size > max_levels:
        unique = unique[np.linspace(0, unique.size - 1, max_levels).round().astype(int)]
    fig, axes = plt.subplots(2, unique.size, figsize=(2.8 * unique.size, 4.4), squeeze=False, sharex=True)
    for k, level in enumerate(unique):
        sel = levels == level
        for data, color, label in ((real[sel], "0.45", "real"), (generated[sel], OKABE_ITO[1], "generated")):
            mean, sd = data.mean(0), data.std(0)
            axes[0][k].plot(t_ms, mean, color=color, label=label, linewidth=1)
            axes[0][k].fill_between(t_ms, mean - sd, mean + sd, color=color, alpha=0.2, linewidth=0)
            axes[1][k].plot(t_ms, data[0], color=color, linewidth=0.8)
        axes[0][k].set_title(f"{level:.0f} dB nHL (n={int(sel.sum())})")
        axes[1][k].set_xlabel("time (ms)")
    axes[0][0].set_ylabel("mean ± SD (µV)")
    axes[1][0].set_ylabel("one example (µV)")
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    return save_figure(fig, path_stem)
