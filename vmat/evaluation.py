"""Score one predicted dose against the reference: MAE, gamma (global and per region), DVH metrics,
constraints, OpenKBP terms. Used by validate_vmat.py and by training's whole-volume validation.

Only voxels where the reference dose is known count (the NPZ ``dose_valid_mask``: inside the RTDOSE
grid): MAE, gamma pass rates, DVHs, constraints and the dose score leave the others out, and each
structure's covered fraction is reported (``dose_coverage_<name>``, ``coverage_flagged``).

Two readings of the reference dose (vmat.dvh.reference_dose): ``ref_*`` DVH metrics and
``constraints_pass_pct_ref`` read the RTDOSE on its own grid where the case carries it (the clinical values;
``dvh_reference_grid`` says which grid was read, ``ct_grid`` for caches without ``rtdose_gy``). A prediction
lives on the CT grid, so its errors (``diff_*`` = ``pred_*`` minus the reference read on the CT grid, and
``constraints_agree_pct``) compare it with the reference read there: the best possible CT-grid prediction,
the reference's own CT-grid copy, scores 0. The gap between the two readings is the CT-grid resampling's
own loss (``refgrid_gap_<name>_<metric>``, RTDOSE reading minus CT-grid reading; a few Gy at steep target
edges on coarse grids, vmat/README.md), which no CT-grid model can remove."""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

from vmat.dvh import (DEFAULT_CONSTRAINTS, DVH_DEFAULTS, case_samples, check_constraints, dose_dvhs, reference_dose,
                      structure_metrics)
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
    "cpu_threads": 1,  # torch threads of the search on a CPU (null: the process setting); see vmat/gamma.py
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


def _mean(rows, key):
    values = [r[key] for r in rows if isinstance(r.get(key), (int, float)) and np.isfinite(r[key])]
    return float(np.mean(values)) if values else float("nan")


def overall_metrics(rows: Sequence[Mapping]) -> dict:
    """Mean over cases of every numeric metric of :func:`evaluate_case` rows; the OpenKBP DVH score pooled
    over all cases' terms, as the competition computes it. validate_vmat.py and training validation both
    report these."""
    keys: list = []
    for r in rows:
        keys += [k for k in r if k not in keys and not k.startswith("_") and k != "case" and not isinstance(r[k], str)]
    out = {k: _mean(rows, k) for k in keys}
    diffs = [d for r in rows for d in r.get("_openkbp_dvh_diffs", [])]
    out["openkbp_dvh_score"] = float(np.mean(diffs)) if diffs else float("nan")  # pooled, as OpenKBP does
    return out


# The overall metrics training validation logs to metrics.csv (prefixed val_), named as in validate_vmat.py.
VAL_METRIC_KEYS = ("mae_body_gy", "mae_ptv_gy", "mae_oar_gy", "mae_rest_gy", "bias_body_gy", "openkbp_dose_score",
                   "openkbp_dvh_score", "constraints_agree_pct")


def gamma_metric_keys(criteria) -> list[str]:
    keys = []
    for dose_pct, dist_mm in criteria:
        key = f"gamma_{dose_pct:g}_{dist_mm:g}"
        keys += [f"{key}_pass_pct"] + [f"{key}_{region}_pass_pct" for region in ("ptv", "oar", "rest")]
    return keys


def _flat_dvh(prefix: str, metrics: Mapping) -> dict:
    return {f"{prefix}_{name}_{metric}": value for name, row in metrics.items() for metric, value in row.items()
            if metric not in ("volume_cc",)}


def evaluate_case(case: Mapping, prediction: np.ndarray, gamma_cfg: Mapping = GAMMA_DEFAULTS,
                  constraints: Sequence[Mapping] = DEFAULT_CONSTRAINTS, compute_gamma_maps: bool = True,
                  seed: int = 0, dvh_cfg: Mapping = DVH_DEFAULTS, samples: Mapping | None = None) -> tuple[dict, dict]:
    """(row of metrics, {criterion label: gamma map}) for one case dict (vmat.case_io.load_case).

    ``samples``: the case's DVH samples (vmat.dvh.case_samples with ``dvh_cfg``), computed here if not
    given (pass them when scoring several doses of one case)."""
    ref = np.asarray(case["dose"], dtype=np.float64)
    pred = np.asarray(prediction, dtype=np.float64)
    names = list(case["structure_names"])
    valid = np.asarray(case.get("dose_valid_mask", np.ones(ref.shape)), bool)
    masks = np.asarray(case["masks"], bool)
    body = np.asarray(case["possible_dose_mask"], bool) & valid
    if samples is None:
        samples = case_samples(case, dvh_cfg)
    spacing = tuple(float(s) for s in case["spacing_mm"])
    target_doses = {k: float(v) for k, v in case["meta"].get("target_doses_gy", {}).items()}
    rx = float(case["prescription_gy"])
    regions = region_masks(masks, names, target_doses, body)
    err = np.abs(pred - ref)
    coverage = {name: float(valid[masks[c]].mean()) for c, name in enumerate(names) if masks[c].any()}
    min_cov = float(case["meta"].get("min_coverage", 0.98))
    row: dict = {"case": case["case_id"], "prescription_gy": rx,
                 "mae_body_gy": float(err[body].mean()) if body.any() else float("nan"),
                 "mae_ptv_gy": float(err[regions["ptv"]].mean()) if regions["ptv"].any() else float("nan"),
                 "mae_oar_gy": float(err[regions["oar"]].mean()) if regions["oar"].any() else float("nan"),
                 "mae_rest_gy": float(err[regions["rest"]].mean()) if regions["rest"].any() else float("nan"),
                 "bias_body_gy": float((pred - ref)[body].mean()) if body.any() else float("nan")}
    for c, name in enumerate(names):
        if (masks[c] & valid).any():
            row[f"mae_{name}_gy"] = float(err[masks[c] & valid].mean())
    row.update({f"dose_coverage_{name}": f for name, f in coverage.items()})
    row["coverage_flagged"] = "; ".join(f"{n} {f:.1%}" for n, f in coverage.items() if f < min_cov)
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
                                  **({"device": gamma_cfg["device"], "cpu_threads": gamma_cfg.get("cpu_threads", 1)}
                                     if gamma_cfg["implementation"] == "torch" else {}))
            gamma = np.where(valid, gamma, np.nan)  # no reference dose outside the RTDOSE grid
            maps[label] = gamma
            row[f"{key}_pass_pct"] = pass_rate(gamma)
            for region, mask in regions.items():
                row[f"{key}_{region}_pass_pct"] = pass_rate(gamma, mask)
            row[f"{key}_mean"] = float(np.nanmean(gamma)) if np.isfinite(gamma).any() else float("nan")
    # once per dose and structure: the reference read on its own RTDOSE grid where the case has it (clinical
    # values), and on the CT grid, the prediction's grid, for the prediction's errors (module docstring)
    ref_dose, ref_grid = reference_dose(case, dvh_cfg)
    row["dvh_reference_grid"] = "ct_grid" if ref_grid is None else "rtdose"
    ref_dvhs, pred_dvhs = dose_dvhs(samples, ref_dose, ref_grid), dose_dvhs(samples, pred)
    same_dvhs = ref_dvhs if ref_grid is None else dose_dvhs(samples, ref)
    kw_dvh = {"samples": samples, "valid": valid, "v_gy": list(dvh_cfg["v_gy"])}
    dvh_ref = structure_metrics(ref, masks, names, target_doses, spacing, body, dvhs=ref_dvhs, **kw_dvh)
    dvh_same = dvh_ref if ref_grid is None else structure_metrics(ref, masks, names, target_doses, spacing, body,
                                                                   dvhs=same_dvhs, **kw_dvh)
    dvh_pred = structure_metrics(pred, masks, names, target_doses, spacing, body, dvhs=pred_dvhs, **kw_dvh)
    row.update(_flat_dvh("ref", dvh_ref))
    row.update(_flat_dvh("pred", dvh_pred))
    for name, metrics in dvh_same.items():
        for metric, value in metrics.items():
            if metric != "volume_cc":
                row[f"diff_{name}_{metric}"] = dvh_pred[name][metric] - value
                if ref_grid is not None:
                    row[f"refgrid_gap_{name}_{metric}"] = dvh_ref[name][metric] - value
        row[f"volume_cc_{name}"] = dvh_ref[name]["volume_cc"]
        row[f"dvh_method_{name}"] = samples[name].method
    cons_ref = check_constraints(ref, masks, names, constraints, target_doses, rx, spacing, samples, valid, ref_dvhs)
    cons_same = cons_ref if ref_grid is None else check_constraints(ref, masks, names, constraints, target_doses, rx,
                                                                     spacing, samples, valid, same_dvhs)
    cons_pred = check_constraints(pred, masks, names, constraints, target_doses, rx, spacing, samples, valid, pred_dvhs)
    if cons_ref:
        row["constraints_pass_pct_ref"] = 100.0 * np.mean([c["passed"] for c in cons_ref])
        row["constraints_pass_pct_pred"] = 100.0 * np.mean([c["passed"] for c in cons_pred])
        row["constraints_agree_pct"] = 100.0 * np.mean([a["passed"] == b["passed"] for a, b in zip(cons_same, cons_pred)])
        for rule in cons_pred:
            row[f"constraint_{rule['structure']}_{rule['metric']}_pred_pass"] = int(rule["passed"])
    row["openkbp_dose_score"] = openkbp_dose_score(np.where(valid, ref, 0.0), np.where(valid, pred, 0.0), body) \
        if body.any() else float("nan")
    oars = [n for n in names if n not in target_doses and n.lower() not in ("body", "external")]
    kw = {"oars": oars, "targets": list(target_doses)}
    okbp_masks = masks & valid  # the competition's voxel definitions, on the known dose
    okbp_ref = openkbp_dvh_metrics(ref, okbp_masks, names, spacing, **kw)
    okbp_pred = openkbp_dvh_metrics(pred, okbp_masks, names, spacing, **kw)
    diffs = [abs(okbp_ref[k] - okbp_pred[k]) for k in okbp_ref]
    row["openkbp_dvh_score"] = float(np.mean(diffs)) if diffs else float("nan")
    row["_openkbp_dvh_diffs"] = diffs  # pooled over cases for the benchmark's DVH score
    return row, maps
