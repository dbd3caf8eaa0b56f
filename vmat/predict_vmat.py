"""Predict doses for preprocessed cases with one checkpoint or an ensemble of checkpoints.

    python vmat/predict_vmat.py --checkpoint runs/vmat/smoke/<timestamp> --data OUT_NPZ --output-dir PRED_DIR
    python vmat/predict_vmat.py --checkpoint RUN_A RUN_B RUN_C --data OUT_NPZ --output-dir PRED_DIR --export-rtdose

Sliding-window inference with Gaussian blending, optional left-right flip test-time augmentation
(structure channels swapped), checkpoint ensembles; for diffusion models several DDIM samples. Each case
becomes PRED_DIR/<case>.npz with ``dose`` (Gy, mean over members/flips/samples), ``dose_std`` (Gy,
voxel-wise spread) and the case's ``spacing_mm`` / ``origin_mm``; ``validate_vmat.py --predictions``
scores that folder. ``--export-rtdose`` also writes PRED_DIR/rtdose/<case>_predicted_RD.dcm on the CT's
frame of reference. Cases need no reference dose. Each ``--checkpoint`` PATH is a checkpoint file, a run
folder (checkpoint_best.pt, else _last) or an ensemble folder (ensemble.json, or member_<i>/ folders); all
of them together form the ensemble. PRED_DIR also holds the run files (log.txt, config.yaml, summary.json).
(``--output`` is a deprecated spelling of ``--output-dir``.)
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from common.cli import add_deprecated_alias, make_parser, start_run
from common.errors import InputError, run_cli
from common.runlog import progress, save_npz_atomic
from vmat.case_io import list_cases, load_case
from vmat.defaults import VMAT_DEFAULTS
from vmat.inference import EnsemblePredictor, add_checkpoint_argument, checkpoint_files


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True)
    add_checkpoint_argument(parser, required=True)
    add_deprecated_alias(parser, "--output", "--output-dir", dest="output_dir", type=Path)
    parser.add_argument("--export-rtdose", action="store_true", help="also write RTDOSE DICOM files")
    parser.add_argument("--cases", nargs="*", default=None, help="only these case ids")
    args = parser.parse_args(argv)
    if args.data is None or args.output_dir is None:
        parser.error("--data NPZ_DIR and --output-dir PRED_DIR are required")
    run = start_run(args, domain="vmat", defaults=VMAT_DEFAULTS, argv=argv)
    cfg, out_dir = run.cfg, run.run_dir
    paths = list_cases(args.data)
    if args.cases:
        paths = [p for p in paths if p.stem in set(args.cases)]
    if not paths:
        raise InputError("no case NPZ files here" + (f" named {args.cases}" if args.cases else ""), args.data)
    checkpoints = checkpoint_files(args.checkpoint)
    predictor = EnsemblePredictor(checkpoints, cfg["inference"], run.device)
    run.record_inputs_valid()
    seconds, spreads = [], []
    for index, path in enumerate(progress(paths, desc="predict", total=len(paths))):
        case = load_case(path, require_dose=False)
        start = time.perf_counter()
        out = predictor.predict(case, seed=int(cfg["seed"]) + index)
        seconds.append(time.perf_counter() - start)
        body = np.asarray(case["possible_dose_mask"], bool)
        spreads.append(float(out["dose_std"][body].mean()) if body.any() else 0.0)
        save_npz_atomic(out_dir / f"{case['case_id']}.npz", dose=out["dose"], dose_std=out["dose_std"],
                        spacing_mm=np.asarray(case["spacing_mm"]), origin_mm=np.asarray(case["origin_mm"]),
                        prescription_gy=np.asarray(case["prescription_gy"]))
        if args.export_rtdose:
            from vmat.export import export_rtdose

            export_rtdose(out_dir / "rtdose" / f"{case['case_id']}_predicted_RD.dcm", out["dose"], case)
    summary = {"n_cases": len(paths), "n_members": len(predictor.members), "output": str(out_dir),
               "checkpoints": [p.as_posix() for p in checkpoints],
               "seconds_per_case": float(np.mean(seconds)), "mean_spread_gy": float(np.mean(spreads)),
               "outputs_per_case": out["n_outputs"]}
    run.log(f"[vmat] predicted {len(paths)} cases into {out_dir} ({summary['seconds_per_case']:.1f} s/case, "
            f"{out['n_outputs']} outputs averaged per case)")
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
