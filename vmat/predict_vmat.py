"""Predict doses for preprocessed cases with one checkpoint or an ensemble of checkpoints.

    python vmat/predict_vmat.py --checkpoint runs/vmat/smoke/<timestamp> --data OUT_NPZ --output PRED_DIR
    python vmat/predict_vmat.py --checkpoint RUN_A RUN_B RUN_C --data OUT_NPZ --output PRED_DIR --export-rtdose

Sliding-window inference with Gaussian blending, optional left-right flip test-time augmentation
(structure channels swapped), checkpoint ensembles; for diffusion models several DDIM samples. Each case
becomes PRED_DIR/<case>.npz with ``dose`` (Gy, mean over members/flips/samples), ``dose_std`` (Gy,
voxel-wise spread) and the case's ``spacing_mm`` / ``origin_mm``; ``validate_vmat.py --predictions``
scores that folder. ``--export-rtdose`` also writes PRED_DIR/rtdose/<case>_predicted_RD.dcm on the CT's
frame of reference. Cases need no reference dose.
"""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from common.cli import make_parser, start_run
from common.runlog import progress
from common.runlog import save_npz_atomic
from vmat.case_io import list_cases, load_case
from vmat.inference import INFERENCE_DEFAULTS, EnsemblePredictor

DEFAULTS = {
    "seed": 0,
    "inference": dict(INFERENCE_DEFAULTS),  # see vmat/inference.py
}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__)
    parser.add_argument("--checkpoint", type=Path, nargs="+", required=True,
                        help="run folder(s) (checkpoint_best.pt, else _last) or checkpoint file(s)")
    parser.add_argument("--data", type=Path, required=True, help="folder of preprocessed <case>.npz")
    parser.add_argument("--output", type=Path, required=True, help="folder for predicted <case>.npz")
    parser.add_argument("--export-rtdose", action="store_true", help="also write RTDOSE DICOM files")
    parser.add_argument("--cases", nargs="*", default=None, help="only these case ids")
    args = parser.parse_args(argv)
    run = start_run(args, domain="vmat", defaults=DEFAULTS, argv=argv, create_dir=args.output_dir is not None)
    cfg = run.cfg
    paths = list_cases(args.data)
    if args.cases:
        paths = [p for p in paths if p.stem in set(args.cases)]
    if not paths:
        raise SystemExit(f"error: no case NPZ files in {args.data}")
    predictor = EnsemblePredictor(args.checkpoint, cfg["inference"], run.device)
    args.output.mkdir(parents=True, exist_ok=True)
    seconds, spreads = [], []
    for index, path in enumerate(progress(paths, desc="predict", total=len(paths))):
        case = load_case(path, require_dose=False)
        start = time.perf_counter()
        out = predictor.predict(case, seed=int(cfg["seed"]) + index)
        seconds.append(time.perf_counter() - start)
        body = np.asarray(case["possible_dose_mask"], bool)
        spreads.append(float(out["dose_std"][body].mean()) if body.any() else 0.0)
        save_npz_atomic(args.output / f"{case['case_id']}.npz", dose=out["dose"], dose_std=out["dose_std"],
                        spacing_mm=np.asarray(case["spacing_mm"]), origin_mm=np.asarray(case["origin_mm"]),
                        prescription_gy=np.asarray(case["prescription_gy"]))
        if args.export_rtdose:
            from vmat.export import export_rtdose

            export_rtdose(args.output / "rtdose" / f"{case['case_id']}_predicted_RD.dcm", out["dose"], case)
    summary = {"n_cases": len(paths), "n_members": len(predictor.members), "output": str(args.output),
               "seconds_per_case": float(np.mean(seconds)), "mean_spread_gy": float(np.mean(spreads)),
               "outputs_per_case": out["n_outputs"]}
    run.log(f"[vmat] predicted {len(paths)} cases into {args.output} ({summary['seconds_per_case']:.1f} s/case, "
            f"{out['n_outputs']} outputs averaged per case)")
    return run.finish(summary)


if __name__ == "__main__":
    main()
