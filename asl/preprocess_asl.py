"""Build the fixed ASL phantom sets, or convert an in-vivo subject to the network's input.

Phantom sets (default): ``val.npz`` (model selection) and ``test.npz`` (held-out evaluation) with anatomy,
per-phantom true physics (domain-randomized), clean signals and one fixed noise realization per SNR
(noise.val_snrs / noise.eval_snrs), plus (data.synthetic_subject) a synthetic subject in BIDS and in the
original's per-PLD layout under ``synthetic_subject/`` for the in-vivo path. Output folder: --output-dir,
else --data DIR, else data.dir.

In-vivo (--invivo PATH): a BIDS ASL folder (asl.nii.gz + aslcontext.tsv + asl.json [+ m0scan]), a
per-PLD folder (r_normdiff_alldyn_<PCASL|VSASL>_<PLD>.nii* + r_M0.nii*) or a .npz → ``<output>/<name>.npz``
(label/control pairs subtracted and averaged per PLD, divided by M0; NaN voxels masked).

    python asl/preprocess_asl.py --config configs/asl/smoke.yaml --data data/asl/smoke
    python asl/preprocess_asl.py --config configs/asl/smoke.yaml --invivo /data/sub-01 --output-dir data/asl/invivo
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from asl.defaults import defaults
from asl.invivo import assemble, load_subject, save_subject_npz
from asl.physics import check_physics, reference_signal
from asl.simulate import build_fixed_set, save_fixed_set
from asl.synthetic_subject import write_synthetic_subject
from common.cli import make_parser, start_run
from common.errors import run_cli

DEFAULTS = defaults()


def build_sets(cfg: dict, out_dir: Path, log) -> dict:
    physics, phantom, rand, noise, dcfg = cfg["physics"], cfg["phantom"], cfg["randomization"], cfg["noise"], cfg["data"]
    meta = {"physics": physics, "phantom": phantom, "randomization": rand, "noise_kind": noise["kind"],
            "s_ref": reference_signal(physics),
            "snr_definition": "sigma = S_ref / SNR, S_ref = mean nominal GM signal (CBF 60, ATT 1300 ms)"}
    written = {}
    for name, n, seed, snrs in (("val", dcfg["n_val"], dcfg["val_seed"], noise["val_snrs"]),
                                ("test", dcfg["n_test"], dcfg["test_seed"], noise["eval_snrs"])):
        data = build_fixed_set(int(n), int(seed), phantom, physics, rand, [float(s) for s in snrs], noise["kind"])
        path = save_fixed_set(out_dir / f"{name}.npz", data, {**meta, "seed": int(seed), "name": name})
        frac = float(data["mask"].mean())
        log(f"{name}: {n} phantoms {data['cbf'].shape[1]}×{data['cbf'].shape[2]}, brain {frac:.0%}, SNRs {list(snrs)} -> {path}")
        written[name] = {"path": str(path), "n": int(n), "snrs": [float(s) for s in snrs],
                         "pathology_voxels": int((data["label"] == 4).sum())}
    if dcfg["synthetic_subject"]:
        paths = write_synthetic_subject(out_dir / "synthetic_subject", phantom, physics, int(dcfg["synthetic_slices"]),
                                        int(dcfg["test_seed"]) + 17, float(dcfg["synthetic_snr"]),
                                        int(dcfg["synthetic_repeats"]))
        log(f"synthetic subject (BIDS + per-PLD layouts) -> {out_dir / 'synthetic_subject'}")
        written["synthetic_subject"] = paths
    return written


def convert_invivo(cfg: dict, source: Path, out_dir: Path, log) -> dict:
    subject = load_subject(source)
    signals, mask = assemble(subject, cfg["physics"], cfg["predict"]["mask_threshold"])  # validates PLDs/modes
    name = source.stem if source.is_file() else source.name
    path = save_subject_npz(subject, out_dir / f"{name}.npz")
    log(f"{source}: {signals.shape[:3]} voxels, {signals.shape[3]} channels, brain mask {int(mask.sum())} voxels -> {path}")
    return {"invivo": str(path), "shape": list(signals.shape), "mask_voxels": int(mask.sum()),
            "modes": sorted(subject["signals"]), "plds_ms": {m: sorted(v) for m, v in subject["signals"].items()}}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True)
    parser.add_argument("--invivo", type=Path, default=None,
                        help="convert this BIDS / per-PLD folder (or .npz) instead of building phantom sets")
    args = parser.parse_args(argv)
    if args.output_dir is None and args.data is not None:
        args.output_dir = args.data
    elif args.output_dir is None:
        from common.config import ConfigError, load_config

        try:
            args.output_dir = Path(load_config(args.config, args.set, defaults=DEFAULTS)["data"]["dir"])
        except ConfigError as exc:
            raise SystemExit(f"error: {exc}") from None  # as start_run reports config errors
    run = start_run(args, domain="asl", defaults=DEFAULTS, argv=argv, data_key="data.dir")
    check_physics(run.cfg["physics"])
    out_dir = Path(run.run_dir)
    if args.invivo is not None:
        result = convert_invivo(run.cfg, args.invivo, out_dir, run.log)
    else:
        result = build_sets(run.cfg, out_dir, run.log)
        result["s_ref"] = reference_signal(run.cfg["physics"])
    return run.finish({k: (v if not isinstance(v, np.generic) else v.item()) for k, v in result.items()})


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
