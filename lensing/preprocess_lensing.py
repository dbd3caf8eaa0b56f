"""Build a lens-finding data set: simulate one, convert real cutouts, or (re)make its stratified splits.

    python lensing/preprocess_lensing.py simulate --config configs/lensing/smoke.yaml --output-dir data/lensing/smoke
    python lensing/preprocess_lensing.py convert --input GalaxiesML_testing.hdf5 --set convert.format=galaxiesml \
        --output-dir data/lensing/galaxiesml
    python lensing/preprocess_lensing.py convert --input castles_folder --set convert.format=folder \
        --set convert.label=1 --set convert.label_source=obs:castles --output-dir data/lensing/castles
    python lensing/preprocess_lensing.py split --data data/lensing/smoke --config configs/lensing/smoke.yaml

The data set folder gets ``catalog.csv`` (schema v2.0 + truth + file columns; see lensing/catalog.py),
``images/`` and ``variance/`` (float32 .npy/.fits or 16-bit .tif with scale/offset in the catalogue),
``split_report.json`` (balance of every stratification factor per split) and this run's config/log.
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from common.cli import make_parser, start_run
from common.config import ConfigError
from common.errors import NothingProcessedError, run_cli
from common.runlog import write_json
from lensing.catalog import read_catalog, write_catalog
from lensing.defaults import lensing_defaults
from lensing.splits import balance_report, stratified_split

DEFAULTS = lensing_defaults()  # sections read here: seed, simulate, convert, split, runtime


def make_splits(df: pd.DataFrame, cfg: dict, seed: int) -> tuple[pd.DataFrame, dict]:
    split, strata = stratified_split(df, cfg["fractions"], cfg["factors"], seed=seed,
                                     min_stratum_size=cfg["min_stratum_size"] or None)
    df = df.copy()
    df["split"] = split.values
    report = balance_report(df, split, cfg["factors"])
    report["n_strata"] = int(strata.nunique())
    return df, report


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True)
    parser.add_argument("command", choices=["simulate", "convert", "split"], help="what to do")
    parser.add_argument("--input", type=Path, default=None, help="convert: HDF5 file or cutout folder")
    args = parser.parse_args(argv)
    data_dir = None
    if args.command == "split":
        data_dir = args.data or args.output_dir
        if data_dir is None:
            parser.error("split needs --data DIR (the data set folder)")
        args.data = Path(data_dir)
        # the split run records its config/log beside the simulation's, not over them
        args.output_dir = Path(data_dir) / "split_run"
    elif args.data is not None:
        parser.error(f"--data names the data set to split; {args.command} writes a new one into --output-dir")
    run = start_run(args, domain="lensing", defaults=DEFAULTS, argv=argv, data_key="data.dir")
    cfg = run.cfg
    out_dir = Path(data_dir) if data_dir is not None else run.run_dir
    if args.command == "simulate":
        from lensing.simulate_data import simulate_dataset

        df = simulate_dataset(cfg["simulate"], out_dir, cfg["seed"], run.log, run.device, run.is_main)
    elif args.command == "convert":
        from lensing.converters import convert_folder, convert_galaxiesml

        source = args.input or (Path(cfg["convert"]["input"]) if cfg["convert"]["input"] else None)
        if source is None:
            raise ConfigError("convert needs --input (or convert.input)")
        if cfg["convert"]["format"] == "galaxiesml":
            df = convert_galaxiesml(source, out_dir, cfg["convert"], run.log, run.is_main)
        elif cfg["convert"]["format"] == "folder":
            df = convert_folder(source, out_dir, cfg["convert"], run.log, run.is_main)
        else:
            raise ConfigError(f"convert.format must be galaxiesml or folder, got {cfg['convert']['format']!r}")
    else:
        df = read_catalog(out_dir)
    if len(df) == 0:  # the readers refuse bad inputs; an empty result must not look like a data set
        raise NothingProcessedError(f"{args.command}: 0 cutouts written, no catalog.csv", out_dir)

    summary: dict = {"command": args.command, "n_rows": int(len(df)), "data_dir": str(out_dir)}
    if args.command == "split" or cfg["split"]["enabled"]:
        df, report = make_splits(df, cfg["split"], cfg["seed"])
        write_json(out_dir / "split_report.json", report)
        summary["split_sizes"] = report["split_sizes"]
        summary["n_strata"] = report["n_strata"]
        summary["max_abs_deviation"] = {f: v["max_abs_deviation"] for f, v in report["factors"].items()}
        run.log(f"[lensing] splits {report['split_sizes']} over {report['n_strata']} strata; worst share "
                f"deviation per factor {summary['max_abs_deviation']}")
    write_catalog(df, out_dir)
    labels = pd.to_numeric(df["label"])
    summary.update({"n_lenses": int((labels == 1).sum()), "n_nonlenses": int((labels == 0).sum()),
                    "n_unlabelled": int((labels == -1).sum()), "surveys": sorted(df["survey"].unique().tolist())})
    run.log(f"[lensing] wrote {out_dir / 'catalog.csv'}: {len(df)} rows ({summary['n_lenses']} lenses, "
            f"{summary['n_nonlenses']} non-lenses, {summary['n_unlabelled']} unlabelled)")
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
