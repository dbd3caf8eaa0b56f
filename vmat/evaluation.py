"""Score one predicted dose against the reference: MAE, gamma (global and per region), DVH metrics,
constraints, OpenKBP terms. Used by validate_vmat.py and by training's whole-volume validation."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from vmat.dvh import DEFAULT_CONSTRAINTS, check_constraints, structure_metrics
from vmat.gamma import compute_gamma, pass_rate
from vmat.scores import openkbp_dose_score, openkbp_dvh_metrics

GAMMA_DEFAULTS = {
    "implementation": "torch",  # torch (vectorized, this package) | pymedphys (reference, slow)
    "criteria": [[3.0, 3.0], [2.0, 2.0]],  # [dose %, distance mm] pairs
    "lower_percent_cutoff": 10.0,  # % of the reference maximum
    "local": False,  # global gamma (normalized to the reference maximum) unless true
    "max_gamma": 2.0,  # search radius = max_gamma x distance; larger gamma are reported as max_gamma
    "interp_fraction": 10,  # lattice step = distance / interp_fraction (pymedphys' default 10)
    "random_subset": None,  # evaluate only this many random voxels (faster, noisier)
    "device": "cpu",  # torch device for the vectorized search
}


def region_masks(masks: np.ndarray, names: Sequence[str], target_doses: Mapping[str, float], body: np.ndarray,
                 oar_names: Sequence[str] | None = None) -> dict:
    """PTV = union of targets, OAR = union of the other structures (or ``oar_names``), rest = body − both."""
    names = list(names)
    ptv = np.zeros(body.shape, bool)
    oar = np.zeros(body.shape, bool)
    for c, name in enumerate(names):
        if name in target_doses:
            ptv |= np.asarray(masks[c], bool)
        elif (oar_names is None and name.lower() not in ("body", "external")) or (oar_names and name in oar_names):
            oar |= np.asarray(masks[c], bool)
    oar &= ~ptv
    return {"ptv": ptv, "oar": oar, "rest": np.asarray(body, bool) & ~ptv & ~oar}


def _flat_dvh(prefix: str, metrics: Mapping) -> dict:
    return {f"{prefix}_{name}_{metric}": value for name, row in metrics.items() for metric, value in row.items()
            if metric not in ("volume_cc",)}


def evaluate_case(case: Mapping, prediction: np.ndarray, gamma_cfg: Mapping = GAMMA_DEFAULTS,
                  constraints: Sequence[Mapping] = DEFAULT_CONSTRAINTS, compute_gamma_maps: bool = True,
                  seed: int = 0) -> tuple[dict, dict]:
    """(row of metrics, {criterion label: gamma map}) for one case dict (vmat.case_io.load_case)."""
    ref = np.asarray(case["dose"], dtype=np.float64)
    pred = np.asarray(prediction, dtype=np.float64)
    names = list(case["structure_names"])
    masks = np.asarray(case["masks"], bool)
    body = np.asarray(case["possible_dose_mask"], bool)
    spacing = tuple(float(s) for s in case["spacing_mm"])
    target_doses = {k: float(v) for k, v in case["meta"].get("target_doses_gy", {}).items()}
    rx = float(case["prescription_gy"])
    regions = region_masks(masks, names, target_doses, body)
    err = np.abs(pred - ref)
    row: dict = {"case": case["case_id"], "prescription_gy": rx,
                 "mae_body_gy": float(err[body].mean()) if body.any() else float("nan"),
                 "mae_ptv_gy": float(err[regions["ptv"]].mean()) if regions["ptv"].any() else float("nan"),
                 "mae_oar_gy": float(err[regions["oar"]].mean()) if regions["oar"].any() else float("nan"),
                 "mae_rest_gy": float(err[regions["rest"]].mean()) if regions["rest"].any() else float("nan"),
                 "bias_body_gy": float((pred - ref)[body].mean()) if body.any() else float("nan")}
    for c, name in enumerate(names):
        if masks[c].any():
            row[f"mae_{name}_gy"] = float(err[masks[c]].mean())
    maps = {}
    if compute_gamma_maps:
        for dose_pct, dist_mm in gamma_cfg["criteria"]:
            label = f"{dose_pct:g}%/{dist_mm:g}mm"
            key = f"gamma_{dose_pct:g}_{dist_mm:g}"
            gamma = compute_gamma(ref, pred, spacing, implementation=gamma_cfg["implementation"],
                                  dose_percent=float(dose_pct), distance_mm=float(dist_mm),
                                  lower_percent_cutoff=float(gamma_cfg["lower_percent_cutoff"]),
                                  local=bool(gamma_cfg["local"]), max_gamma=float(gamma_cfg["max_gamma"]),
                                  interp_fraction=int(gamma_cfg["interp_fraction"]),
                                  random_subset=gamma_cfg["random_subset"], seed=seed,
                                  **({"device": gamma_cfg["device"]} if gamma_cfg["implementation"] == "torch" else {}))
            maps[label] = gamma
            row[f"{key}_pass_pct"] = pass_rate(gamma)
            for region, mask in regions.items():
                row[f"{key}_{region}_pass_pct"] = pass_rate(gamma, mask)
            row[f"{key}_mean"] = float(np.nanmean(gamma)) if np.isfinite(gamma).any() else float("nan")
    dvh_ref = structure_metrics(ref, masks, names, target_doses, spacing, body)
    dvh_pred = structure_metrics(pred, masks, names, target_doses, spacing, body)
    row.update(_flat_dvh("ref", dvh_ref))
    row.update(_flat_dvh("pred", dvh_pred))
    for name, metrics in dvh_ref.items():
        for metric, value in metrics.items():
            if metric != "volume_cc":
                row[f"diff_{name}_{metric}"] = dvh_pred[name][metric] - value
    cons_ref = check_constraints(ref, masks, names, constraints, target_doses, rx, spacing)
    cons_pred = check_constraints(pred, masks, names, constraints, target_doses, rx, spacing)
    if cons_ref:
        row["constraints_pass_pct_ref"] = 100.0 * np.mean([c["passed"] for c in cons_ref])
        row["constraints_pass_pct_pred"] = 100.0 * np.mean([c["passed"] for c in cons_pred])
        row["constraints_agree_pct"] = 100.0 * np.mean([a["passed"] == b["passed"] for a, b in zip(cons_ref, cons_pred)])
        for rule in cons_pred:
            row[f"constraint_{rule['structure']}_{rule['metric']}_pred_pass"] = int(rule["passed"])
    row["openkbp_dose_score"] = openkbp_dose_score(ref, pred, body) if body.any() else float("nan")
    oars = [n for n in names if n not in target_doses and n.lower() not in ("body", "external")]
    kw = {"oars": oars, "targets": list(target_doses)}
    okbp_ref = openkbp_dvh_metrics(ref, masks, names, spacing, **kw)
    okbp_pred = openkbp_dvh_metrics(pred, masks, names, spacing, **kw)
    diffs = [abs(okbp_ref[k] - okbp_pred[k]) for k in okbp_ref]
    row["openkbp_dvh_score"] = float(np.mean(diffs)) if diffs else float("nan")
    row["_openkbp_dvh_diffs"] = diffs  # pooled over cases for the benchmark's DVH score
    return row, maps
