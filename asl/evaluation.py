"""Metrics of CBF/ATT estimators on phantoms (definitions here; the generic ones come from common.metrics).

Per method (NN, LS with nominal physics, LS with the true "oracle" physics), parameter and tissue:
- mae, rmse, bias (mean pred − true), r2, pearson_r (common.metrics.regression_metrics), over all voxels of
  the tissue with a finite estimate;
- icc: ICC(2,1) of the (truth, estimate) pairs, absolute agreement (Shrout & Fleiss 1979, common.metrics.icc):
  a systematic bias lowers it, unlike the original's formula (ICC 0.9999 next to a +27 bias);
- failure_rate: share of voxels whose estimate failed: LS not converged / non-finite / on a bound; NN
  non-finite or outside the LS bounds (CBF 0-200, ATT 100-4000 ms);
- crlb_ratio: RMSE / √mean(CRLB variance) at the true parameters, true physics and the set's σ; < 1 means
  better than any unbiased voxel-wise estimator could be (possible with spatial priors);
- win_rate (NN vs LS): share of voxels where |NN − true| < |LS − true|, over voxels where both are finite
  (common.metrics.win_rate);
- ci95_coverage: share of truths inside NN mean ± 1.96·√(predicted variance) (ensemble / MC dropout
  disagreement + log-variance heads); uncertainty_auroc: how well the predicted std ranks the voxels whose
  error exceeds the error_quantile of the errors (0.5 = no information).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from asl.simulate import LABELS
from common.metrics import icc, regression_metrics, roc_auc, win_rate

TISSUES = ("brain", "gm", "wm", "pathology")


def tissue_masks(label: np.ndarray, mask: np.ndarray) -> dict:
    return {"brain": mask.astype(bool), "gm": label == LABELS["gm"], "wm": label == LABELS["wm"],
            "pathology": label == LABELS["pathology"]}


def nn_failed(cbf: np.ndarray, att: np.ndarray, fit_cfg: Mapping) -> np.ndarray:
    lo_c, hi_c = fit_cfg["cbf_bounds"]
    lo_a, hi_a = fit_cfg["att_bounds_ms"]
    return ~np.isfinite(cbf) | ~np.isfinite(att) | (cbf < lo_c) | (cbf > hi_c) | (att < lo_a) | (att > hi_a)


def estimator_metrics(pred: np.ndarray, true: np.ndarray, failed: np.ndarray, crlb_var: np.ndarray | None) -> dict:
    """Metrics of one estimator over one voxel set (flat arrays)."""
    out = regression_metrics(pred, true)
    finite = np.isfinite(pred) & np.isfinite(true)
    out["icc"] = icc(np.stack([true[finite], pred[finite]], axis=1), "2,1") if finite.sum() > 2 else float("nan")
    out["failure_rate"] = float(np.mean(failed)) if failed.size else float("nan")
    if crlb_var is not None:
        bound = crlb_var[np.isfinite(crlb_var) & finite]
        out["crlb_ratio"] = float(out["rmse"] / np.sqrt(bound.mean())) if bound.size and bound.mean() > 0 else float("nan")
    return out


def coverage(mean: np.ndarray, var: np.ndarray, true: np.ndarray, z: float = 1.96) -> float:
    ok = np.isfinite(mean) & np.isfinite(var) & np.isfinite(true)
    if not ok.any():
        return float("nan")
    return float(np.mean(np.abs(mean[ok] - true[ok]) <= z * np.sqrt(np.maximum(var[ok], 0))))


def uncertainty_auroc(var: np.ndarray, err: np.ndarray, quantile: float) -> float:
    ok = np.isfinite(var) & np.isfinite(err)
    if ok.sum() < 10:
        return float("nan")
    bad = (err[ok] > np.quantile(err[ok], quantile)).astype(int)
    if bad.min() == bad.max():
        return float("nan")
    return float(roc_auc(bad, var[ok]))


def snr_rows(snr: float, truth: Mapping, estimates: Mapping, failed: Mapping, crlb: Mapping,
             tissues: Mapping) -> tuple[list[dict], dict]:
    """Metric rows (one per method × parameter × tissue) and NN-vs-LS win rates at one SNR.

    ``truth``/``crlb``: {"cbf": (N,H,W), "att": ...}; ``estimates``: {method: {"cbf", "att"}};
    ``failed``: {method: (N,H,W) bool}; ``tissues``: {name: (N,H,W) bool}.
    """
    rows, wins = [], {}
    for param in ("cbf", "att"):
        for tissue, tmask in tissues.items():
            if not tmask.any():
                continue
            t = truth[param][tmask]
            for method, est in estimates.items():
                m = estimator_metrics(est[param][tmask], t, failed[method][tmask], crlb[param][tmask])
                rows.append({"snr": snr, "method": method, "param": param, "tissue": tissue, **m})
            for ls in [k for k in estimates if k.startswith("ls")]:
                w = win_rate(estimates["nn"][param][tmask], estimates[ls][param][tmask], t)
                wins[f"{param}_{tissue}_vs_{ls}"] = w["win_rate"]
    return rows, wins


def find(rows: list[dict], **match) -> dict:
    for row in rows:
        if all(row.get(k) == v for k, v in match.items()):
            return row
    return {}
