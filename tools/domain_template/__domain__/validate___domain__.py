"""Validate a __domain__ model (checkpoint file, run folder or ensemble folder) against a mean predictor.

    python __domain__/validate___domain__.py --config configs/__domain__/smoke.yaml --checkpoint runs/__domain__/smoke
"""

from __future__ import annotations

import numpy as np
import torch

from __domain__.data import load_split
from __domain__.defaults import defaults
from common.checkpoint import load_model, resolve_checkpoints
from common.cli import make_parser, start_run
from common.errors import InputError, run_cli
from common.metrics import regression_metrics


def main(argv: list[str] | None = None) -> dict:
    args = make_parser(__doc__, data=True, checkpoint=True).parse_args(argv)
    if args.checkpoint is None:
        raise InputError("--checkpoint is required (a checkpoint file, run folder or ensemble folder)")
    run = start_run(args, domain="__domain__", defaults=defaults(), argv=argv, data_key="data.dir")
    paths = resolve_checkpoints(args.checkpoint)
    models = [load_model(p, run.device, expected_domain="__domain__") for p in paths]
    arrays = load_split(run.cfg["data"]["dir"], "val", run.cfg["data"], run.cfg["seed"])
    run.record_inputs_valid()
    with torch.no_grad():
        x = torch.from_numpy(arrays["x"]).to(run.device)
        pred = np.mean([m(x).float().cpu().numpy().ravel() for m, _ in models], axis=0)
    target = arrays["y"].ravel()
    metrics = regression_metrics(pred, target)
    baseline = regression_metrics(np.full_like(target, models[0][1]["preprocessing"]["target_mean"]), target)
    run.log(f"{len(models)} model(s): MAE {metrics['mae']:.4f} vs mean predictor {baseline['mae']:.4f}")
    return run.finish({"n_models": len(models), "val": metrics, "baseline_mean_predictor": baseline,
                       "headline": {"val_mae": metrics["mae"], "baseline_mae": baseline["mae"]}})


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
