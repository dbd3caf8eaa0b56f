"""In-vivo inference: CBF, ATT and uncertainty maps as NIfTI in the input's geometry, plus LS maps.

Input: a BIDS ASL folder (asl.nii.gz + aslcontext.tsv + asl.json, m0scan), the original's per-PLD folder
(r_normdiff_alldyn_<PCASL|VSASL>_<PLD>.nii* + r_M0.nii*) or a .npz from preprocess_asl.py --invivo. The
network (--checkpoint: a checkpoint file, a training run folder or an ensemble folder) is rebuilt from its
checkpoint; its physics decides which modes/PLDs are read. Writes <out>/cbf.nii.gz, att.nii.gz, cbf_std.nii.gz, att_std.nii.gz,
ls_cbf.nii.gz, ls_att.nii.gz, ls_failed.nii.gz, mask.nii.gz and summary.json (GM/WM means and their ratio
when GM/WM probability maps are found beside the data or given).

    python asl/predict_asl.py data/asl/smoke/synthetic_subject/bids --checkpoint runs/asl/smoke --output-dir runs/asl/pred
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from asl.data import checkpoint_paths, load_ensemble, predict_maps
from asl.defaults import defaults
from asl.fitting import fit_batched
from asl.invivo import InvivoError, read_nifti, assemble, load_subject
from common.cli import make_parser, start_run
from common.errors import run_cli
from common.runlog import atomic_path

DEFAULTS = defaults()


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> str:
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), affine), tmp)
    return path.name


def _tissue_means(maps: dict, region: np.ndarray) -> dict:
    return {k: (float(np.nanmean(v[region])) if region.any() else None) for k, v in maps.items()}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, checkpoint=True)
    parser.add_argument("input", type=Path, help="BIDS ASL folder, per-PLD folder, or preprocessed .npz")
    parser.add_argument("--gm", type=Path, default=None, help="GM probability NIfTI (default: found beside the data)")
    parser.add_argument("--wm", type=Path, default=None, help="WM probability NIfTI (default: found beside the data)")
    parser.add_argument("--reference-cbf", type=Path, default=None, help="optional reference CBF NIfTI to compare with")
    parser.add_argument("--reference-att", type=Path, default=None, help="optional reference ATT NIfTI to compare with")
    args = parser.parse_args(argv)
    checkpoints = checkpoint_paths(args, parser)
    run = start_run(args, domain="asl", defaults=DEFAULTS, argv=argv)
    cfg, device, pcfg = run.cfg, run.device, run.cfg["predict"]
    models, ckpts = load_ensemble(checkpoints, device)
    prep = ckpts[0]["preprocessing"]
    physics = prep["physics"]
    subject = load_subject(args.input)
    signals, mask = assemble(subject, physics, float(pcfg["mask_threshold"]))
    signals = signals / float(pcfg["m0_scale"])
    run.log(f"{args.input}: {signals.shape[:3]} voxels, {signals.shape[3]} channels, brain mask {int(mask.sum())}")
    x = torch.from_numpy(np.transpose(signals, (2, 3, 0, 1)) / prep["input_scale"]).float()
    mc = int(cfg["validate"]["mc_dropout_samples"])
    maps = predict_maps(models, x, prep["target_stats"], mc_samples=mc, mc_rate=cfg["validate"]["mc_dropout_rate"])
    to_xyz = lambda a: np.transpose(a, (1, 2, 0))  # noqa: E731 (Z, X, Y) → (X, Y, Z)
    nn = {"cbf": np.where(mask, to_xyz(maps["cbf"]), 0.0), "att": np.where(mask, to_xyz(maps["att"]), 0.0),
          "cbf_std": np.where(mask, np.sqrt(to_xyz(maps["total_var_cbf"])), 0.0),
          "att_std": np.where(mask, np.sqrt(to_xyz(maps["total_var_att"])), 0.0)}
    out_dir = Path(run.run_dir)
    affine = subject["affine"]
    files = [_save_nifti(v, affine, out_dir / f"{k}.nii.gz") for k, v in nn.items()]
    files.append(_save_nifti(mask.astype(np.float32), affine, out_dir / "mask.nii.gz"))
    ls = {}
    if pcfg["ls"]:
        res = fit_batched(signals[mask], physics, None, prep.get("fit", cfg["fit"]), device=device)
        for key in ("cbf", "att", "failed"):
            full = np.zeros(mask.shape)
            full[mask] = res[key]
            ls[key] = full
        files += [_save_nifti(ls[k], affine, out_dir / f"ls_{k}.nii.gz") for k in ("cbf", "att", "failed")]
        run.log(f"LS: {res['failed'].mean():.1%} of voxels failed (not converged / on a bound), {res['seconds']:.2f} s")
    gm = read_nifti(args.gm)[0] if args.gm else subject.get("gm")
    wm = read_nifti(args.wm)[0] if args.wm else subject.get("wm")
    summary: dict = {"input": str(args.input), "files": files, "mask_voxels": int(mask.sum()),
                     "n_models": len(models), "brain_mean": {"nn": _tissue_means({k: nn[k] for k in ("cbf", "att")}, mask)}}
    if ls:
        summary["brain_mean"]["ls"] = _tissue_means({k: ls[k] for k in ("cbf", "att")}, mask)
        summary["ls_failure_rate"] = float(ls["failed"][mask].mean())
    if gm is not None and wm is not None:
        if gm.shape != mask.shape or wm.shape != mask.shape:
            raise InvivoError(f"GM/WM maps have shape {gm.shape}/{wm.shape}, the ASL data {mask.shape}")
        gm_region, wm_region = mask & (gm > 0.5), mask & (wm > 0.5)
        for name, est in (("nn", nn), ("ls", ls)):
            if not est:
                continue
            g, w = _tissue_means({"cbf": est["cbf"], "att": est["att"]}, gm_region), \
                _tissue_means({"cbf": est["cbf"], "att": est["att"]}, wm_region)
            ratio = g["cbf"] / w["cbf"] if g["cbf"] is not None and w["cbf"] not in (None, 0.0) else None
            summary[f"{name}_gm"] = g
            summary[f"{name}_wm"] = w
            summary[f"{name}_gm_wm_cbf_ratio"] = ratio
        run.log(f"GM/WM CBF: NN {summary['nn_gm']['cbf']:.1f}/{summary['nn_wm']['cbf']:.1f} "
                f"(ratio {summary['nn_gm_wm_cbf_ratio']:.2f})"
                + (f", LS {summary['ls_gm']['cbf']:.1f}/{summary['ls_wm']['cbf']:.1f} "
                   f"(ratio {summary['ls_gm_wm_cbf_ratio']:.2f})" if ls else ""))
    else:
        run.log("no GM/WM probability maps found or given: GM/WM means not reported")
    for param, ref_path in (("cbf", args.reference_cbf), ("att", args.reference_att)):
        if ref_path is None:
            continue
        ref, _ = read_nifti(ref_path)
        if ref.shape != mask.shape:
            raise InvivoError(f"{ref_path}: shape {ref.shape} does not match the ASL data {mask.shape}")
        summary[f"reference_{param}_mae"] = {"nn": float(np.abs(nn[param] - ref)[mask].mean())}
        if ls:
            summary[f"reference_{param}_mae"]["ls"] = float(np.abs(ls[param] - ref)[mask].mean())
    summary["headline"] = {k: v for k, v in {
        "nn_gm_wm_cbf_ratio": summary.get("nn_gm_wm_cbf_ratio"), "ls_gm_wm_cbf_ratio": summary.get("ls_gm_wm_cbf_ratio"),
        "nn_cbf_mae_vs_reference": summary.get("reference_cbf_mae", {}).get("nn"),
        "ls_cbf_mae_vs_reference": summary.get("reference_cbf_mae", {}).get("ls"),
        "ls_failure_rate": summary.get("ls_failure_rate")}.items() if v is not None}
    summary["figures"] = []
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
