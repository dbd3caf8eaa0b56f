"""Dose-volume histograms and the metrics read from them, plus clinical constraint checks.

Definitions (voxel counting, no interpolation; each voxel is an equal volume element):
- cumulative DVH V(d) = fraction of the structure's voxels with dose ≥ d;
- D_x% = the dose that the hottest x % of the volume receives at least: with doses sorted descending,
  the value at position ceil(x/100 · N) (1-based). D100% = minimum, D→0% = maximum;
- D_xcc = the same with n = ceil(x cc / voxel volume) voxels; Dmax is reported as D_0.1cc (a point
  maximum depends on one voxel; ICRU 83 recommends a near-maximum);
- V_xGy = percentage of the volume with dose ≥ x Gy;
- homogeneity index HI = (D2% − D98%) / D50% (ICRU Report 83, 2010);
- conformity: RTOG CI = PIV / TV (Shaw et al. 1993) and Paddick CI = TV_PIV² / (TV · PIV) (Paddick 2000),
  with PIV the body volume receiving ≥ the target's dose and TV_PIV the part of the target inside it.

Constraint table entries: ``{"structure": "Rectum", "metric": "V50Gy", "op": "<", "value": 50, "unit": "%"}``;
``unit`` "%" (of volume, for V metrics), "Gy", or "%Rx" (of the structure's own target dose for targets,
else of the prescription). Defaults: QUANTEC (Michalski et al. 2010; Viswanathan et al. 2010) and RTOG 0415
prostate limits, as listed in notes/vmat.md.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping, Sequence

import numpy as np

DEFAULT_CONSTRAINTS = [
    {"structure": "Rectum", "metric": "V50Gy", "op": "<", "value": 50.0, "unit": "%"},
    {"structure": "Rectum", "metric": "V60Gy", "op": "<", "value": 35.0, "unit": "%"},
    {"structure": "Rectum", "metric": "V65Gy", "op": "<", "value": 25.0, "unit": "%"},
    {"structure": "Rectum", "metric": "V70Gy", "op": "<", "value": 20.0, "unit": "%"},
    {"structure": "Rectum", "metric": "V75Gy", "op": "<", "value": 15.0, "unit": "%"},
    {"structure": "Bladder", "metric": "V65Gy", "op": "<", "value": 50.0, "unit": "%"},
    {"structure": "Bladder", "metric": "V70Gy", "op": "<", "value": 35.0, "unit": "%"},
    {"structure": "Bladder", "metric": "V75Gy", "op": "<", "value": 25.0, "unit": "%"},
    {"structure": "Bladder", "metric": "V80Gy", "op": "<", "value": 15.0, "unit": "%"},
    {"structure": "Femur_L", "metric": "V50Gy", "op": "<", "value": 10.0, "unit": "%"},
    {"structure": "Femur_R", "metric": "V50Gy", "op": "<", "value": 10.0, "unit": "%"},
    {"structure": "PTV70", "metric": "D95%", "op": ">=", "value": 95.0, "unit": "%Rx"},
    {"structure": "PTV70", "metric": "D2%", "op": "<", "value": 107.0, "unit": "%Rx"},
    {"structure": "PTV56", "metric": "D95%", "op": ">=", "value": 95.0, "unit": "%Rx"},
]

_OPS = {"<": lambda a, b: a < b, "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def _doses(values) -> np.ndarray:
    return np.asarray(values, dtype=np.float64).ravel()


def cumulative_dvh(doses_in_structure, bin_width_gy: float = 0.1, max_dose_gy: float | None = None):
    """(dose bin edges d_i, V(d_i) in %) with V(d) = % of voxels receiving ≥ d."""
    d = np.sort(_doses(doses_in_structure))
    top = float(max_dose_gy if max_dose_gy is not None else (d.max() if d.size else 0.0))
    edges = np.arange(0.0, top + bin_width_gy, bin_width_gy)
    if d.size == 0:
        return edges, np.zeros_like(edges)
    at_least = d.size - np.searchsorted(d, edges, side="left")
    return edges, 100.0 * at_least / d.size


def dose_at_volume_percent(doses_in_structure, percent: float) -> float:
    """D_x%: minimum dose of the hottest ``percent`` % of the voxels (NaN for an empty structure)."""
    d = np.sort(_doses(doses_in_structure))[::-1]
    if d.size == 0:
        return float("nan")
    n = min(max(int(math.ceil(percent / 100.0 * d.size - 1e-9)), 1), d.size)
    return float(d[n - 1])


def dose_at_volume_cc(doses_in_structure, volume_cc: float, voxel_cc: float) -> float:
    """D_xcc: minimum dose of the hottest ``volume_cc`` (at least one voxel; the whole structure if smaller)."""
    d = np.sort(_doses(doses_in_structure))[::-1]
    if d.size == 0:
        return float("nan")
    n = min(max(int(math.ceil(volume_cc / voxel_cc - 1e-9)), 1), d.size)
    return float(d[n - 1])


def volume_at_dose_percent(doses_in_structure, dose_gy: float) -> float:
    """V_xGy in % of the structure volume (NaN for an empty structure)."""
    d = _doses(doses_in_structure)
    return float(100.0 * np.mean(d >= dose_gy)) if d.size else float("nan")


def homogeneity_index(doses_in_target) -> float:
    """(D2% − D98%) / D50% (ICRU 83)."""
    d50 = dose_at_volume_percent(doses_in_target, 50)
    return (dose_at_volume_percent(doses_in_target, 2) - dose_at_volume_percent(doses_in_target, 98)) / d50 \
        if d50 and np.isfinite(d50) else float("nan")


def conformity_indices(dose: np.ndarray, target: np.ndarray, body: np.ndarray, reference_gy: float) -> dict:
    """RTOG CI = PIV/TV and Paddick CI = TV_PIV²/(TV·PIV), in voxels (volume units cancel)."""
    target = np.asarray(target, bool)
    piv_mask = (np.asarray(dose) >= reference_gy) & np.asarray(body, bool)
    tv, piv = float(target.sum()), float(piv_mask.sum())
    tv_piv = float((piv_mask & target).sum())
    return {"ci_rtog": piv / tv if tv else float("nan"),
            "ci_paddick": tv_piv**2 / (tv * piv) if tv and piv else float("nan")}


_METRIC = re.compile(r"^(?:(?P<v>V)(?P<vx>\d+(?:\.\d+)?)Gy|(?P<d>D)(?P<dx>\d+(?:\.\d+)?)(?P<du>%|cc)|"
                     r"(?P<name>Dmean|Dmax|Dmin|Dmax_point))$")


def metric_value(doses_in_structure, metric: str, voxel_cc: float) -> float:
    """Evaluate "V50Gy" (%), "D95%" / "D0.1cc" (Gy), "Dmean", "Dmax" (= D0.1cc), "Dmin", "Dmax_point"."""
    match = _METRIC.match(metric)
    if not match:
        raise ValueError(f"unknown DVH metric {metric!r}: use VxGy, Dx%, Dxcc, Dmean, Dmax, Dmin or Dmax_point")
    d = _doses(doses_in_structure)
    if d.size == 0:
        return float("nan")
    if match.group("v"):
        return volume_at_dose_percent(d, float(match.group("vx")))
    if match.group("d"):
        x = float(match.group("dx"))
        return dose_at_volume_percent(d, x) if match.group("du") == "%" else dose_at_volume_cc(d, x, voxel_cc)
    name = match.group("name")
    if name == "Dmean":
        return float(d.mean())
    if name == "Dmax":
        return dose_at_volume_cc(d, 0.1, voxel_cc)
    if name == "Dmin":
        return float(d.min())
    return float(d.max())


def structure_metrics(dose: np.ndarray, masks: np.ndarray, names: Sequence[str], target_doses: Mapping[str, float],
                      spacing_mm: Sequence[float], body: np.ndarray | None = None,
                      extra_metrics: Sequence[tuple[str, str]] = ()) -> dict:
    """{structure: {metric: value}} for present structures: targets D98/D95/D50/D2/Dmean/V95%/HI/CI,
    OARs Dmean/Dmax (D0.1cc)/Dmax_point, plus ``extra_metrics`` [(structure, metric)]."""
    voxel_cc = float(np.prod(spacing_mm)) / 1000.0
    out: dict = {}
    for c, name in enumerate(names):
        mask = np.asarray(masks[c], bool)
        if not mask.any():
            continue
        d = np.asarray(dose)[mask]
        row = {"volume_cc": float(mask.sum()) * voxel_cc, "Dmean": float(d.mean()),
               "Dmax": dose_at_volume_cc(d, 0.1, voxel_cc), "Dmax_point": float(d.max())}
        if name in target_doses:
            ref = float(target_doses[name])
            row.update({"D98%": dose_at_volume_percent(d, 98), "D95%": dose_at_volume_percent(d, 95),
                        "D50%": dose_at_volume_percent(d, 50), "D2%": dose_at_volume_percent(d, 2),
                        "V95%Rx": volume_at_dose_percent(d, 0.95 * ref), "HI": homogeneity_index(d)})
            if body is not None:
                row.update(conformity_indices(dose, mask, body, ref))
        out[name] = row
    for name, metric in extra_metrics:
        if name in out:
            out[name][metric] = metric_value(np.asarray(dose)[np.asarray(masks[list(names).index(name)], bool)],
                                             metric, voxel_cc)
    return out


def check_constraints(dose: np.ndarray, masks: np.ndarray, names: Sequence[str], constraints: Sequence[Mapping],
                      target_doses: Mapping[str, float], prescription_gy: float, spacing_mm: Sequence[float]) -> list[dict]:
    """One row per applicable constraint: structure, metric, value, limit (in the metric's unit), passed."""
    voxel_cc = float(np.prod(spacing_mm)) / 1000.0
    rows = []
    for i, rule in enumerate(constraints):
        for key in ("structure", "metric", "op", "value"):
            if key not in rule:
                raise ValueError(f"constraint #{i} {dict(rule)} lacks '{key}'")
        if rule["op"] not in _OPS:
            raise ValueError(f"constraint #{i}: op must be one of {sorted(_OPS)}, got {rule['op']!r}")
        name = rule["structure"]
        if name not in names or not np.asarray(masks[list(names).index(name)]).any():
            continue
        value = metric_value(np.asarray(dose)[np.asarray(masks[list(names).index(name)], bool)], rule["metric"], voxel_cc)
        unit = rule.get("unit", "%" if rule["metric"].startswith("V") else "Gy")
        limit = float(rule["value"])
        if unit == "%Rx":
            limit = limit / 100.0 * float(target_doses.get(name, prescription_gy))
        rows.append({"structure": name, "metric": rule["metric"], "op": rule["op"], "value": value, "limit": limit,
                     "unit": "%" if unit == "%" else "Gy", "passed": bool(_OPS[rule["op"]](value, limit))})
    return rows
