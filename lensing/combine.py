"""A logistic-regression stack of the network and the non-learned baseline.

The network and the azimuthal-residual baseline fail on different non-lenses (the network rejects edge-on
discs and close pairs, the baseline handles knotty rings better), so a user may score with both. The stack
is a two-feature logistic regression

    combined = w0 + w1 · (logit − μ1) / σ1 + w2 · (log1p(max(baseline, 0)) − μ2) / σ2

fitted by Newton's method (IRLS, small L2 on w1, w2) on the VALIDATION split of the training data set
(``validate_lensing.py --set validate.split=val --set validate.combine_with_baseline=fit``), never on a
test or held-out set: the fit refuses rows of any other split. The baseline is a positive, heavy-tailed sum
of residuals, hence log1p. The fitted stack is a small JSON (:data:`STACK_FILE`) written beside the
checkpoint, with its coefficients, the standardization, the data it was fitted on and the checkpoints it
belongs to (step and epoch of each); ``combine_with_baseline=apply`` reads it and refuses a stack fitted
for other checkpoints.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.errors import InputError
from common.runlog import write_text_atomic

STACK_FILE = "baseline_stack.json"
STACK_FORMAT = "lensing-baseline-stack"


def stack_features(logit, baseline_score) -> np.ndarray:
    """The two raw features [N, 2]: network logit and log1p of the (non-negative) baseline score."""
    logit = np.asarray(logit, dtype=np.float64)
    base = np.log1p(np.clip(np.asarray(baseline_score, dtype=np.float64), 0.0, None))
    return np.stack([logit, base], axis=1)


def fit_stack(labels, logit, baseline_score, l2: float = 1e-3, max_iter: int = 100) -> dict:
    """Fit the stack on labelled rows; returns its coefficients and standardization (plain types)."""
    y = np.asarray(labels, dtype=np.float64)
    x = stack_features(logit, baseline_score)
    keep = np.isfinite(x).all(axis=1) & np.isin(y, (0.0, 1.0))
    x, y = x[keep], y[keep]
    if y.size < 10 or y.min() == y.max():
        raise InputError(f"the stack needs lenses and non-lenses to fit on ({y.size} labelled rows)")
    mean, std = x.mean(axis=0), x.std(axis=0)
    std[std == 0] = 1.0
    design = np.column_stack([np.ones(len(y)), (x - mean) / std])
    w = np.zeros(design.shape[1])
    penalty = np.diag([0.0] + [l2 * len(y)] * (design.shape[1] - 1))
    for _ in range(max_iter):
        p = 1.0 / (1.0 + np.exp(-(design @ w)))
        grad = design.T @ (p - y) + penalty @ w
        hess = (design * (p * (1 - p))[:, None]).T @ design + penalty
        step = np.linalg.solve(hess, grad)
        w -= step
        if np.abs(step).max() < 1e-10:
            break
    return {"features": ["logit", "log1p(baseline_score)"], "mean": mean.tolist(), "std": std.tolist(),
            "intercept": float(w[0]), "weights": w[1:].tolist(), "l2": l2,
            "n_fit": int(len(y)), "n_lenses_fit": int(y.sum())}


def apply_stack(stack: dict, logit, baseline_score) -> np.ndarray:
    """The combined score (a logit) of the fitted stack."""
    x = (stack_features(logit, baseline_score) - np.asarray(stack["mean"])) / np.asarray(stack["std"])
    return stack["intercept"] + x @ np.asarray(stack["weights"], dtype=np.float64)


def stack_path(checkpoint: str | Path) -> Path:
    """Where the stack of ``--checkpoint PATH`` lives: in that folder, or beside that checkpoint file."""
    checkpoint = Path(checkpoint)
    return (checkpoint if checkpoint.is_dir() else checkpoint.parent) / STACK_FILE


def checkpoint_identity(checkpoints: list[dict], paths: list) -> list[dict]:
    """What ties a stack to its model: file name, epoch and step of every member checkpoint."""
    return [{"file": Path(p).name, "epoch": int(c.get("epoch", -1)), "step": int(c.get("step", -1))}
            for p, c in zip(paths, checkpoints)]


def save_stack(path: Path, stack: dict, fitted_on: dict, identity: list[dict]) -> dict:
    record = {"format": STACK_FORMAT, "version": 1, **stack, "fitted_on": fitted_on, "checkpoints": identity}
    write_text_atomic(Path(path), json.dumps(record, indent=2) + "\n")
    return record


def load_stack(path: Path, identity: list[dict]) -> dict:
    """Read a stack and check it belongs to these checkpoints."""
    path = Path(path)
    if not path.is_file():
        raise InputError("no fitted stack here; fit one with --set validate.split=val "
                         "--set validate.combine_with_baseline=fit on the training data set", path)
    try:
        record = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InputError(f"not valid JSON ({exc})", path) from exc
    if record.get("format") != STACK_FORMAT:
        raise InputError(f"format is {record.get('format')!r}, expected {STACK_FORMAT!r}", path)
    if record.get("checkpoints") != identity:
        raise InputError(f"fitted for checkpoints {record.get('checkpoints')}, not {identity}; fit it again", path)
    return record


def combined_report(labels, combined, logit, baseline_score, n_boot: int, seed: int) -> tuple[dict, dict | None, dict]:
    """Bologna metrics of the stack, its paired bootstrap against the baseline and against the network (the
    same seed and class counts as ``bootstrap_comparison(labels, logit, baseline_score)``, so the same
    resamples) and the headline entries ``combined_*`` (CIs as [low, high])."""
    from lensing.metrics import bologna_metrics, bootstrap_comparison

    metrics = bologna_metrics(labels, combined)
    headline = {f"combined_{m}": metrics[m] for m in ("auroc", "tpr0", "tpr10")}
    boot = None
    if n_boot > 0:
        boot = {"vs_baseline": bootstrap_comparison(labels, combined, baseline_score, n_boot, seed),
                "vs_model": bootstrap_comparison(labels, combined, logit, n_boot, seed)}
        if boot["vs_baseline"].get("n_boot"):
            for m in ("auroc", "tpr0", "tpr10"):
                headline[f"combined_{m}_ci95"] = [round(v, 4) for v in boot["vs_baseline"][m]["model"]]
                for other in ("baseline", "model"):
                    headline[f"combined_minus_{other}_{m}_ci95"] = [round(v, 4)
                                                                   for v in boot[f"vs_{other}"][m]["difference"]]
    return metrics, boot, headline


def describe(headline: dict) -> str:
    """One log line of the stack's metrics and CIs."""
    parts = []
    for m in ("auroc", "tpr0", "tpr10"):
        text = f"{m} {headline[f'combined_{m}']:.3f}"
        if f"combined_{m}_ci95" in headline:
            ci, db, dm = (headline[k] for k in (f"combined_{m}_ci95", f"combined_minus_baseline_{m}_ci95",
                                                f"combined_minus_model_{m}_ci95"))
            text += (f" [{ci[0]:.3f}, {ci[1]:.3f}], minus baseline [{db[0]:+.3f}, {db[1]:+.3f}], "
                     f"minus model [{dm[0]:+.3f}, {dm[1]:+.3f}]")
        parts.append(text)
    return "[lensing] network + baseline stack (95 % bootstrap CIs): " + "; ".join(parts)
