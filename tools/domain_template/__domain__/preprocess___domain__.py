"""Write the __domain__ data set folder (train.npz, val.npz) from the synthetic generator.

    python __domain__/preprocess___domain__.py --config configs/__domain__/smoke.yaml --output-dir data/__domain__/smoke
"""

from __future__ import annotations

from __domain__.data import synthetic_arrays
from __domain__.defaults import defaults
from common.cli import make_parser, start_run
from common.errors import run_cli
from common.runlog import save_npz_atomic


def main(argv: list[str] | None = None) -> dict:
    args = make_parser(__doc__).parse_args(argv)
    run = start_run(args, domain="__domain__", defaults=defaults(), argv=argv)
    dcfg = run.cfg["data"]
    run.record_inputs_valid()
    for split, n, offset in (("train", dcfg["n_train"], 0), ("val", dcfg["n_val"], 10_000)):
        save_npz_atomic(run.run_dir / f"{split}.npz",
                        **synthetic_arrays(n, dcfg["n_features"], dcfg["noise_std"], run.cfg["seed"] + offset))
    run.log(f"wrote train.npz ({dcfg['n_train']}) and val.npz ({dcfg['n_val']}) to {run.run_dir}")
    return run.finish({"n_train": dcfg["n_train"], "n_val": dcfg["n_val"]})


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
