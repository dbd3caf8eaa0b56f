"""Score predicted doses against the reference doses of preprocessed cases.

    python vmat/validate_vmat.py --data OUT_NPZ --predictions PRED_DIR [--atlas RUN/atlas.json]
    python vmat/validate_vmat.py --data OUT_NPZ --checkpoint runs/vmat/smoke/<timestamp> [--export-rtdose]

``--checkpoint`` takes checkpoint files, run folders or ensemble folders (several = one ensemble).

``--predictions`` scores any folder of <case>.npz files holding ``dose`` (Gy, on the case's grid), so
external models and ensembles can be scored; ``--checkpoint`` predicts first (vmat.inference, sliding
window, optional flip TTA). Per case and overall: MAE (Gy) in the body, PTVs, OARs and the rest; gamma
pass rates (3%/3 mm and 2%/2 mm global, 10 % cutoff by default) over all voxels and restricted to
PTV / OAR / rest; DVH metrics of reference and prediction and their differences; clinical constraint
pass rates; OpenKBP dose and DVH scores. With ``--atlas`` the mean-dose-atlas baseline is scored the
same way. Writes metrics.csv, summary.json, report.md, dvh/<case>.csv (cumulative DVHs of reference,
prediction and atlas per structure) and figures/ (dose slices with isodose lines and structure outlines,
DVH curves, gamma maps; 300 DPI PNG + PDF); ``--export-rtdose`` writes each prediction as an RTDOSE on
the CT's frame of reference into rtdose/.

DVHs (vmat/dvh.py, ``dvh`` section): sub-voxel samples of the RTSTRUCT contours where the case carries
them (in-plane supersampling, trilinear dose, half-slice end caps), else voxel counting; only where the
reference dose is known (``dose_valid_mask``); each structure's covered fraction is in metrics.csv
(``dose_coverage_<name>``) and a structure below ``preprocess.dose.min_coverage`` is listed in
``coverage_flagged`` (row, summary, log). Per structure: targets D99/D98/D95/D50/D2 %, Dmean, D0.03cc,
Dmax_point, V95%Rx, HI, RTOG and Paddick CI; OARs Dmean, D95 %, D2 %, D0.03cc, Dmax_point, V_xGy.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from common.cli import make_parser, start_run
from common.errors import InputError, run_cli
from common.runlog import progress, write_text_atomic
from vmat.case_io import CaseFileError, list_cases, load_case, load_prediction
from vmat.defaults import VMAT_DEFAULTS
from vmat.dvh import case_samples, reference_dose
from vmat.evaluation import evaluate_case, overall_metrics
from vmat.inference import add_checkpoint_argument, checkpoint_files

def _report(path: Path, overall: dict, baseline: dict | None, rows: list[dict], figures: list[str], source: str) -> None:
    keys = ["mae_body_gy", "mae_ptv_gy", "mae_oar_gy", "mae_rest_gy", "gamma_3_3_pass_pct", "gamma_3_3_ptv_pass_pct",
            "gamma_3_3_oar_pass_pct", "gamma_3_3_rest_pass_pct", "gamma_2_2_pass_pct", "constraints_pass_pct_ref",
            "constraints_pass_pct_pred", "constraints_agree_pct", "openkbp_dose_score", "openkbp_dvh_score"]
    lines = ["# VMAT dose evaluation", "", f"Predictions: {source}; {len(rows)} cases.", "",
             "| metric | model |" + (" atlas baseline |" if baseline else ""),
             "|---|---|" + ("---|" if baseline else "")]
    for key in keys:
        if key in overall:
            cell = f" {baseline.get(key, float('nan')):.3f} |" if baseline else ""
            lines.append(f"| {key} | {overall[key]:.3f} |{cell}")
    lines += ["", "## Per case", "", "| case | MAE body (Gy) | gamma 3%/3mm (%) | gamma 2%/2mm (%) | PTV70 D95 ref / pred (Gy) |",
              "|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['case']} | {r.get('mae_body_gy', float('nan')):.2f} | {r.get('gamma_3_3_pass_pct', float('nan')):.1f} "
                     f"| {r.get('gamma_2_2_pass_pct', float('nan')):.1f} | {r.get('ref_PTV70_D95%', float('nan')):.1f} / "
                     f"{r.get('pred_PTV70_D95%', float('nan')):.1f} |")
    flagged = [f"{r['case']}: {r['coverage_flagged']}" for r in rows if r.get("coverage_flagged")]
    if flagged:
        lines += ["", "## Structures partly outside the RTDOSE grid (metrics of the covered part)", ""]
        lines += [f"- {line}" for line in flagged]
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in figures]
    write_text_atomic(path, "\n".join(lines) + "\n")


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True)
    source = parser.add_mutually_exclusive_group(required=True)
    add_checkpoint_argument(parser, group=source)
    source.add_argument("--predictions", type=Path, help="folder of predicted <case>.npz files with key 'dose' (Gy)")
    parser.add_argument("--atlas", type=Path, default=None, help="atlas.json (or a checkpoint) for the atlas baseline")
    parser.add_argument("--export-rtdose", action="store_true", help="write each prediction as RTDOSE DICOM")
    parser.add_argument("--cases", nargs="*", default=None, help="only these case ids")
    args = parser.parse_args(argv)
    if args.data is None:
        parser.error("--data NPZ_DIR (preprocessed cases with reference dose) is required")
    run = start_run(args, domain="vmat", defaults=VMAT_DEFAULTS, argv=argv)
    cfg = run.cfg
    if (run.run_dir / "metrics.csv").is_file():
        (run.run_dir / "metrics.csv").unlink()  # one row per case of this evaluation only
    paths = list_cases(args.data)
    if args.cases:
        paths = [p for p in paths if p.stem in set(args.cases)]
    if not paths:
        raise InputError("no case NPZ files here" + (f" named {args.cases}" if args.cases else ""), args.data)
    predictor = None
    if args.checkpoint:
        from vmat.inference import EnsemblePredictor

        predictor = EnsemblePredictor(checkpoint_files(args.checkpoint), cfg["inference"], run.device)
    atlas = _load_atlas(args.atlas) if args.atlas else None
    run.record_inputs_valid()
    rows, base_rows, figures = [], [], []
    fig_dir = run.run_dir / "figures"
    for index, path in enumerate(progress(paths, desc="cases", total=len(paths))):
        case = load_case(path)
        if predictor is not None:
            prediction = predictor.predict(case)["dose"]
        else:
            pred_path = args.predictions / path.name
            if not pred_path.is_file():
                raise CaseFileError(f"no prediction for case {path.stem}: {pred_path} does not exist")
            prediction = load_prediction(pred_path, case["dose"].shape, (case["spacing_mm"], case["origin_mm"]))["dose"]
        samples = case_samples(case, cfg["dvh"])  # once per case: the prediction and the atlas share them
        row, maps = evaluate_case(case, prediction, cfg["gamma"], cfg["constraints"], seed=cfg["seed"] + index,
                                  dvh_cfg=cfg["dvh"], samples=samples)
        if cfg["dvh"].get("reference_dose", "rtdose") == "rtdose" and row["dvh_reference_grid"] == "ct_grid":
            run.log(f"[vmat] {case['case_id']}: {path.name} has no 'rtdose_gy' (written before the RTDOSE grid was "
                    "stored, or not DICOM-RT): its reference DVHs read the CT-grid copy of the dose "
                    "(dvh_reference_grid ct_grid in metrics.csv)")
        if row["coverage_flagged"]:
            run.log(f"[vmat] {case['case_id']}: RTDOSE grid covers only {row['coverage_flagged']} of these "
                    "structures; their metrics describe the covered part")
        base = None
        if atlas is not None:
            from vmat.atlas import predict_atlas

            base = predict_atlas(atlas, case["masks"], case["structure_names"], case["spacing_mm"],
                                 case["possible_dose_mask"])
            base_row, _ = evaluate_case(case, base, cfg["gamma"], cfg["constraints"], seed=cfg["seed"] + index,
                                        dvh_cfg=cfg["dvh"], samples=samples)
            base_rows.append(base_row)
            row["atlas_mae_body_gy"] = base_row["mae_body_gy"]
        rows.append(row)
        ref_reading = reference_dose(case, cfg["dvh"])
        write_dvh_csv(run.run_dir / "dvh" / f"{case['case_id']}.csv", case, samples,
                      {"reference": ref_reading, **({"reference_ct_grid": case["dose"]} if ref_reading[1] is not None
                                                     else {}), "prediction": prediction,
                       **({"atlas": base} if base is not None else {})})
        if args.export_rtdose:
            from vmat.export import export_rtdose

            export_rtdose(run.run_dir / "rtdose" / f"{case['case_id']}_predicted_RD.dcm", prediction, case)
        if index < int(cfg["figures"]["n_cases"]):
            figures += _case_figures(fig_dir, case, prediction, maps, base, cfg, samples)
    overall = overall_metrics(rows)
    baseline = overall_metrics(base_rows) if base_rows else None
    for r in rows:
        run.logger.log_metrics({k: v for k, v in r.items() if not k.startswith("_")})
    from vmat.figures import metric_bars

    figures += [str(p.relative_to(run.run_dir).as_posix()) for p in
                metric_bars(fig_dir / "mae_per_case", rows, "mae_body_gy", "MAE in body (Gy)",
                            "atlas_mae_body_gy" if base_rows else None) if p.suffix == ".png"]
    headline = {"mae_body_gy": overall["mae_body_gy"], "gamma_3%/3mm_pass_pct": overall.get("gamma_3_3_pass_pct"),
                "gamma_2%/2mm_pass_pct": overall.get("gamma_2_2_pass_pct"),
                "openkbp_dose_score": overall["openkbp_dose_score"], "openkbp_dvh_score": overall["openkbp_dvh_score"]}
    if baseline:
        headline.update({"atlas_mae_body_gy": baseline["mae_body_gy"],
                         "atlas_gamma_3%/3mm_pass_pct": baseline.get("gamma_3_3_pass_pct"),
                         "beats_atlas_on_mae": bool(overall["mae_body_gy"] < baseline["mae_body_gy"])})
    source_label = str(args.predictions or [str(c) for c in args.checkpoint])
    _report(run.run_dir / "report.md", overall, baseline, rows, figures, source_label)
    run.log(f"[vmat] {len(rows)} cases: MAE {overall['mae_body_gy']:.2f} Gy, gamma 3%/3mm "
            f"{overall.get('gamma_3_3_pass_pct', float('nan')):.1f}%"
            + (f"; atlas MAE {baseline['mae_body_gy']:.2f} Gy" if baseline else ""))
    summary = {"n_cases": len(rows), "overall": overall, "atlas_baseline": baseline, "headline": headline,
               "coverage_flagged": {r["case"]: r["coverage_flagged"] for r in rows if r["coverage_flagged"]},
               "dvh": cfg["dvh"], "dvh_reference_grid": {r["case"]: r["dvh_reference_grid"] for r in rows},
               "figures": figures, "source": source_label, "gamma": cfg["gamma"]}
    return run.finish(summary)


def write_dvh_csv(path: Path, case: dict, samples: dict, doses: dict, bin_gy: float = 0.1) -> Path:
    """Cumulative DVHs of one case (the same samples as its metrics): structure, dose_gy, then the volume %
    receiving at least that dose for each of ``doses`` ({label: dose array on the case grid, or (dose, its
    grid) as vmat.dvh.reference_dose returns}). validate writes ``reference`` (the RTDOSE on its own grid where
    the case has it) and, then, ``reference_ct_grid`` (the copy on the CT grid, which the prediction's errors
    are measured against: vmat.evaluation)."""
    doses = {k: v if isinstance(v, tuple) else (v, None) for k, v in doses.items()}
    top = max(float(np.max(d)) for d, _ in doses.values())
    edges = np.arange(0.0, top + bin_gy, bin_gy)
    lines = ["structure,dose_gy," + ",".join(f"{label}_volume_pct" for label in doses)]
    for name, smp in samples.items():
        curves = [smp.dvh(dose, grid).curve(edges) for dose, grid in doses.values()]
        lines += [f"{name},{e:.2f}," + ",".join(f"{c[i]:.4f}" for c in curves) for i, e in enumerate(edges)]
    path.parent.mkdir(parents=True, exist_ok=True)
    return write_text_atomic(path, "\n".join(lines) + "\n")


def _load_atlas(path: Path) -> dict:
    if path.suffix == ".json" and path.is_file():
        return json.loads(path.read_text(encoding="utf-8"))
    from common.checkpoint import load_checkpoint

    ckpt = load_checkpoint(path, expected_domain="vmat")
    atlas = ckpt.get("preprocessing", {}).get("atlas")
    if not atlas:
        raise InputError("field 'preprocessing.atlas' is missing: pass the training run's atlas.json", path)
    return atlas


def _case_figures(fig_dir: Path, case: dict, prediction: np.ndarray, maps: dict, base, cfg,
                  samples: dict | None = None) -> list[str]:
    from vmat.figures import dose_slices, dvh_curves, gamma_map

    cid = case["case_id"]
    names, masks = case["structure_names"], case["masks"]
    target = None
    for name in case["meta"].get("target_doses_gy", {}):
        if name in names:
            target = np.asarray(masks[names.index(name)], bool)
            break
    out = []
    out += dose_slices(fig_dir / f"{cid}_dose", case["dose"], prediction, masks, names, case["spacing_mm"],
                       case["prescription_gy"], title=f"{cid}: reference vs prediction", centre_mask=target)
    known = np.asarray(masks, bool) & np.asarray(case["dose_valid_mask"], bool)  # DVHs of the known dose only
    out += dvh_curves(fig_dir / f"{cid}_dvh", case["dose"], prediction, known, names, title=f"{cid}: DVH",
                      extra={"atlas": base} if base is not None else None, samples=samples,
                      reference_grid=reference_dose(case, cfg["dvh"]))
    if maps:
        label, gamma = next(iter(maps.items()))
        out += gamma_map(fig_dir / f"{cid}_gamma", gamma, case["dose"], case["spacing_mm"],
                         title=f"{cid}: gamma {label}", centre_mask=target, max_gamma=cfg["gamma"]["max_gamma"])
    return [str(p.relative_to(fig_dir.parent).as_posix()) for p in out if p.suffix == ".png"]


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
