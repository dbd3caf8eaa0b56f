"""Figures for dose evaluation: dose slices with isodose lines and structure outlines, DVH curves, gamma maps.

All saved through common.plotting.save_figure (300 DPI PNG + PDF). Images are drawn in radiological
convention: axial slices with the patient's right on the image left (array column 0 = patient right,
since x increases toward the patient's left) and anterior at the top.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from common.plotting import OKABE_ITO, plt, save_figure
from vmat.dvh import cumulative_dvh

ISODOSE_FRACTIONS = (0.3, 0.5, 0.8, 0.95, 1.0)


def _centre(mask: np.ndarray, shape) -> tuple[int, int, int]:
    if mask is not None and mask.any():
        return tuple(int(v) for v in np.round(np.argwhere(mask).mean(axis=0)))
    return tuple(s // 2 for s in shape)


def _planes(volume: np.ndarray, centre):
    k, j, i = centre
    return {"axial": volume[k], "coronal": volume[:, j, :][::-1], "sagittal": volume[:, :, i][::-1]}


def _aspect(spacing, plane: str) -> float:
    dz, dy, dx = spacing
    return {"axial": dy / dx, "coronal": dz / dx, "sagittal": dz / dy}[plane]


def dose_slices(path_stem: str | Path, reference: np.ndarray, prediction: np.ndarray, masks: np.ndarray,
                names: Sequence[str], spacing_mm, prescription_gy: float, title: str = "",
                centre_mask: np.ndarray | None = None) -> list[Path]:
    """3 × 3 panels: axial/coronal/sagittal planes through the target centroid; reference, prediction
    (both with isodose lines at fractions of the prescription and structure outlines) and difference."""
    centre = _centre(centre_mask, reference.shape)
    vmax = float(max(reference.max(), prediction.max(), 1e-6))
    diff = prediction - reference
    dlim = float(max(np.abs(diff).max(), 1e-6))
    fig, axes = plt.subplots(3, 3, figsize=(10, 9.5))
    levels = [f * prescription_gy for f in ISODOSE_FRACTIONS]
    colors = plt.cm.plasma(np.linspace(0.1, 0.9, len(levels)))
    for row, plane in enumerate(("axial", "coronal", "sagittal")):
        aspect = _aspect(spacing_mm, plane)
        for col, (label, volume) in enumerate((("reference", reference), ("prediction", prediction))):
            ax = axes[row, col]
            ax.imshow(_planes(volume, centre)[plane], cmap="gray", vmin=0, vmax=vmax, aspect=aspect)
            ax.contour(_planes(volume, centre)[plane], levels=levels, colors=colors, linewidths=0.8)
            for c in range(len(names)):
                outline = _planes(np.asarray(masks[c], float), centre)[plane]
                if outline.any():
                    ax.contour(outline, levels=[0.5], colors=[OKABE_ITO[c % len(OKABE_ITO)]], linewidths=0.6,
                               linestyles="dashed")
            ax.set_title(f"{plane} – {label}")
            ax.axis("off")
        ax = axes[row, 2]
        im = ax.imshow(_planes(diff, centre)[plane], cmap="RdBu_r", vmin=-dlim, vmax=dlim, aspect=aspect)
        ax.set_title(f"{plane} – prediction − reference")
        ax.axis("off")
        fig.colorbar(im, ax=ax, fraction=0.046, label="Gy")
    handles = [plt.Line2D([], [], color=colors[i], label=f"{int(round(100 * f))}% Rx")
               for i, f in enumerate(ISODOSE_FRACTIONS)]
    handles += [plt.Line2D([], [], color=OKABE_ITO[c % len(OKABE_ITO)], linestyle="dashed", label=n)
                for c, n in enumerate(names) if np.asarray(masks[c]).any()]
    fig.legend(handles=handles, loc="lower center", ncol=min(len(handles), 7), fontsize=7)
    fig.suptitle(title or "dose")
    fig.tight_layout(rect=(0, 0.05, 1, 0.97))
    return save_figure(fig, path_stem)


def dvh_curves(path_stem: str | Path, reference: np.ndarray, prediction: np.ndarray, masks: np.ndarray,
               names: Sequence[str], title: str = "", extra: dict | None = None,
               samples: dict | None = None, reference_grid: tuple | None = None) -> list[Path]:
    """Cumulative DVHs: reference solid, prediction dashed (``extra``: {label: dose} dotted). With
    ``samples`` ({name: vmat.dvh.StructureSamples}) the curves are those of the metrics (sub-voxel);
    ``reference_grid``: (reference dose, its grid) as vmat.dvh.reference_dose returns, read by the
    sub-voxel curves instead of ``reference`` (the RTDOSE on its own grid); ``reference`` is then drawn thin,
    the CT-grid reading the prediction's DVH errors are measured against (vmat.evaluation)."""
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    top = float(max(reference.max(), prediction.max())) * 1.05
    edges = np.arange(0.0, top + 0.25, 0.25)
    for c, name in enumerate(names):
        mask = np.asarray(masks[c], bool)
        if not mask.any():
            continue
        color = OKABE_ITO[c % len(OKABE_ITO)]

        def curve(dose, mask=mask, name=name, own=None):
            if samples is not None and name in samples and len(samples[name].weights):
                if own is not None:
                    return edges, samples[name].dvh(*own).curve(edges)
                return edges, samples[name].dvh(dose).curve(edges)
            return cumulative_dvh(dose[mask], 0.25, top)
        ax.plot(*curve(reference, own=reference_grid), color=color, label=name)
        if reference_grid is not None:  # the CT-grid copy, which the prediction's errors are measured against
            ax.plot(*curve(reference), color=color, linewidth=0.6, alpha=0.6)
        ax.plot(*curve(prediction), color=color, linestyle="--")
        for dose in (extra or {}).values():
            ax.plot(*curve(dose), color=color, linestyle=":", linewidth=0.8)
    ax.set_xlabel("dose (Gy)")
    ax.set_ylabel("volume (%)")
    ax.set_ylim(0, 102)
    ax.set_xlim(0, top)
    style = [plt.Line2D([], [], color="k", label="reference" + (" (RTDOSE grid)" if reference_grid is not None else ""))]
    if reference_grid is not None:
        style.append(plt.Line2D([], [], color="k", linewidth=0.6, alpha=0.6, label="reference (CT grid)"))
    style.append(plt.Line2D([], [], color="k", linestyle="--", label="prediction"))
    style += [plt.Line2D([], [], color="k", linestyle=":", label=label) for label in (extra or {})]
    first = ax.legend(loc="upper right", fontsize=7)
    ax.add_artist(first)
    ax.legend(handles=style, loc="lower left", fontsize=7)
    ax.set_title(title or "cumulative DVH")
    fig.tight_layout()
    return save_figure(fig, path_stem)


def gamma_map(path_stem: str | Path, gamma: np.ndarray, reference: np.ndarray, spacing_mm, title: str = "",
              centre_mask: np.ndarray | None = None, max_gamma: float = 2.0) -> list[Path]:
    """Gamma on the three planes through the target centroid (γ > 1 fails; grey: not evaluated)."""
    centre = _centre(centre_mask, reference.shape)
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.8))
    cmap = plt.get_cmap("RdYlGn_r").with_extremes(bad="0.85")
    for ax, plane in zip(axes, ("axial", "coronal", "sagittal")):
        g = np.ma.masked_invalid(_planes(gamma, centre)[plane])
        im = ax.imshow(g, cmap=cmap, vmin=0, vmax=max_gamma, aspect=_aspect(spacing_mm, plane))
        ax.contour(np.nan_to_num(_planes(gamma, centre)[plane], nan=0.0), levels=[1.0], colors="k", linewidths=0.5)
        ax.set_title(plane)
        ax.axis("off")
    fig.colorbar(im, ax=axes, fraction=0.025, label="gamma")
    fig.suptitle(title or "gamma")
    return save_figure(fig, path_stem)


def metric_bars(path_stem: str | Path, rows: Sequence[dict], key: str, label: str, baseline_key: str | None = None) -> list[Path]:
    """Per-case bar chart of one metric (and of its baseline counterpart when given)."""
    cases = [r["case"] for r in rows]
    x = np.arange(len(cases))
    fig, ax = plt.subplots(figsize=(max(4.0, 0.5 * len(cases) + 2), 3.2))
    width = 0.4 if baseline_key else 0.7
    ax.bar(x - (width / 2 if baseline_key else 0), [r.get(key, np.nan) for r in rows], width, label="model")
    if baseline_key:
        ax.bar(x + width / 2, [r.get(baseline_key, np.nan) for r in rows], width, label="atlas baseline")
        ax.legend(fontsize=7)
    ax.set_xticks(x, cases, rotation=45, ha="right", fontsize=7)
    ax.set_ylabel(label)
    fig.tight_layout()
    return save_figure(fig, path_stem)
