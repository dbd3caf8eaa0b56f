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
from common.runlog import write_json
from lensing.pipeline_config import with_other_sections
from lensing.catalog import read_catalog, write_catalog
from lensing.splits import DEFAULT_FACTORS, balance_report, stratified_split

DEFAULTS = {
    "seed": 0,  # random seed of the simulation and of the split
    "simulate": {
        "surveys": ["euclid_vis"],  # presets of lensing/surveys.py: euclid_vis hsc hst_acs sdss kids
        "n_per_survey": [1000],  # cutouts per survey: one number for all, or one per survey
        "n_pix": 64,  # cutout size (pixels)
        "supersampling": 1,  # sub-pixels per pixel side when rendering
        "band_mode": "all",  # all | reference (each survey's reference band only, to mix band sets)
        "storage": "npy",  # npy | fits | tiff16
        "dtype": "float32",  # float32 | float64 rendering precision
        "compile": False,  # torch.compile the renderer (faster for large data sets; ~1 min to compile)
        "batch_size": 256,  # scenes rendered per batch
        "truth_grid": 160,  # grid points per axis for Einstein area / image counting
        "population": {  # scene distribution (lensing/population.py)
            "lens_fraction": 0.5,
            "nonlens_neighbour_fraction": 0.5,
            "lens_neighbour_fraction": 0.3,
            "theta_E_range_arcsec": [0.5, 2.0],
            "theta_E_max_fov_fraction": 0.45,
            "lens_mag_range": [19.0, 22.5],
            "source_mag_range": [21.5, 25.0],
            "neighbour_mag_range": [21.0, 25.0],
            "source_offset_max": 0.9,
            "shear_sigma": 0.03,
        },
    },
    "convert": {
        "format": "galaxiesml",  # galaxiesml (HDF5) | folder (FITS/TIFF/NPY cutouts + CSV)
        "input": "",  # HDF5 file or folder (also --input)
        "catalog_name": "catalog.csv",  # folder format: the CSV inside the input folder
        "bands": [],  # galaxiesml: subset of g r i z y (empty = all five)
        "label": -1,  # label for rows without one: -1 unknown (pretraining), 0 negatives, 1 lenses
        "label_source": "obs:other",  # folder format: provenance for rows without label_source
        "label_confidence": 1.0,
        "survey": "hst_acs",  # folder format: survey for rows without a 'survey' column
        "max_rows": 0,  # galaxiesml: convert only the first N (0 = all)
        "target_psf_fwhm": None,  # arcsec; match every cutout to this PSF (null = no matching)
        "psf_regularization": 1.0e-4,  # Fourier-ratio regularization λ (fraction of max |S|^2)
        "storage": "npy",
    },
    "runtime": {"torch_threads": 0},  # 0 = torch default
    "split": {
        "fractions": {"train": 0.7, "val": 0.15, "test": 0.15},
        "factors": list(DEFAULT_FACTORS),  # up to 7 of: label survey redshift magnitude seeing psf_fwhm pixel_scale
        "min_stratum_size": 0,  # 0 = the number of splits
        "enabled": True,  # simulate/convert: split right away
    },
}

DEFAULTS = with_other_sections(DEFAULTS)


def make_splits(df: pd.DataFrame, cfg: dict, seed: int) -> tuple[pd.DataFrame, dict]:
    split, strata = stratified_split(df, cfg["fractions"], cfg["factors"], seed=seed,
                                     min_stratum_size=cfg["min_stratum_size"] or None)
    df = df.copy()
    df["split"] = split.values
    report = balance_report(df, split, cfg["factors"])
    report["n_strata"] = int(strata.nunique())
    return df, report


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__)
    parser.add_argument("command", choices=["simulate", "convert", "split"], help="what to do")
    parser.add_argument("--input", type=Path, default=None, help="convert: HDF5 file or cutout folder")
    parser.add_argument("--data", type=Path, default=None, help="split: data set folder (default --output-dir)")
    args = parser.parse_args(argv)
    data_dir = None
    if args.command == "split":
        data_dir = args.data or args.output_dir
        if data_dir is None:
            parser.error("split needs --data DIR (the data set folder)")
        # the split run records its config/log beside the simulation's, not over them
        args.output_dir = Path(data_dir) / "split_run"
    run = start_run(args, domain="lensing", defaults=DEFAULTS, argv=argv)
    cfg = run.cfg
    out_dir = Path(data_dir) if data_dir is not None else run.run_dir
    if args.command == "simulate":
        from lensing.simulate_data import simulate_dataset

        df = simulate_dataset(cfg["simulate"], out_dir, cfg["seed"], run.log, run.device, run.is_main)
    elif args.command == "convert":
        from lensing.converters import convert_folder, convert_galaxiesml

        source = args.input or (Path(cfg["convert"]["input"]) if cfg["convert"]["input"] else None)
        if source is None:
            raise SystemExit("error: convert needs --input (or convert.input)")
        if cfg["convert"]["format"] == "galaxiesml":
            df = convert_galaxiesml(source, out_dir, cfg["convert"], run.log, run.is_main)
        elif cfg["convert"]["format"] == "folder":
            df = convert_folder(source, out_dir, cfg["convert"], run.log, run.is_main)
        else:
            raise SystemExit(f"error: convert.format must be galaxiesml or folder, got {cfg['convert']['format']!r}")
    else:
        df = read_catalog(out_dir)

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
    main()
