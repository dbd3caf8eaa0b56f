"""Validate trained CBF/ATT networks on the saved test phantoms against voxel-wise least squares.

--checkpoint PATH: a checkpoint file, a training run folder (all ensemble members) or an ensemble folder
(ensemble.json); each model is rebuilt from its checkpoint alone, whatever class it holds. --data DIR: the
folder holding test.npz (default data.dir). For every SNR of the test set: the network (ensemble mean; uncertainty from
member disagreement, MC dropout if configured, and log-variance heads), LS with the nominal physics the
network was trained around, and LS with the true per-phantom physics (oracle). Metrics per tissue (brain,
GM, WM, pathology): MAE, RMSE, bias, R², ICC(2,1), failure rate, CRLB ratio, win rate; uncertainty coverage
and AUROC; amplitude linearity (signals × k → CBF × k, ATT unchanged). Writes metrics.csv, summary.json,
report.md and figures/.

A protocol-conditioned checkpoint (train_protocol_asl.py) is validated instead on held-out 3D brain subjects with the
``brain_test`` protocols against correctly configured least squares, with 95 % bootstrap intervals over subjects
and the coverage of the network's ±1.96 σ (its checkpoint's σ scale applied) and of the fit's ±1.96 √CRLB
(asl/protocol_eval.py); no --data is needed.

    python asl/validate_asl.py --checkpoint runs/asl/smoke --config configs/asl/smoke.yaml --data data/asl/smoke
"""

from __future__ import annotations

import argparse
from pathlib import Path
from statistics import NormalDist

import numpy as np
import torch

from asl.data import checkpoint_paths, fixed_set_from_args, load_ensemble, predict_maps
from asl.defaults import defaults
from asl.evaluation import TISSUES, coverage, find, nn_failed, snr_rows, tissue_masks, uncertainty_auroc
from asl.fitting import fit_batched
from asl.physics import crlb
from asl.simulate import add_noise, load_fixed_set, params_of
from asl.train_asl import check_set_matches
from common.cli import make_parser, start_run
from common.errors import run_cli
from common.runlog import append_csv_row, write_text_atomic

DEFAULTS = defaults()


def fit_maps(noisy: np.ndarray, mask: np.ndarray, physics: dict, fit_cfg: dict, params: dict | None, device) -> dict:
    """LS over brain voxels of (N, C, H, W) signals → maps (N, H, W) of cbf, att, failed (NaN outside)."""
    y = np.transpose(noisy, (0, 2, 3, 1))[mask]
    vox_params = None
    if params is not None:  # per-phantom physics → per voxel
        phantom_of_voxel = np.nonzero(mask)[0]
        vox_params = {k: v.numpy()[phantom_of_voxel] for k, v in params.items()}
    res = fit_batched(y, physics, vox_params, fit_cfg, device=device)
    out = {}
    for key in ("cbf", "att"):
        full = np.full(mask.shape, np.nan)
        full[mask] = res[key]
        out[key] = full
    failed = np.zeros(mask.shape, dtype=bool)
    failed[mask] = res["failed"]
    out["failed"] = failed
    out["seconds"] = res["seconds"]
    return out


def amplitude_linearity(models, clean: np.ndarray, gm: np.ndarray, prep: dict, ks, sigma: float, seed: int) -> dict:
    """Scale clean signals by k, add the same noise (σ fixed), and compare mean GM CBF/ATT with k = 1.

    Returns per k: cbf_ratio (mean CBF(k) / mean CBF(1); ideal k) and att_shift_ms (ideal 0), plus
    cbf_scaling_exponent: slope of log mean CBF vs log k (ideal 1).
    """
    gen = torch.Generator().manual_seed(seed)
    base = torch.from_numpy(clean).double()
    noise = add_noise(torch.zeros_like(base), torch.full((base.shape[0],), sigma, dtype=torch.float64), "gaussian", gen)
    means = {}
    for k in ks:
        x = ((base * float(k) + noise) / prep["input_scale"]).float()
        maps = predict_maps(models, x, prep["target_stats"])
        means[float(k)] = (float(maps["cbf"][gm].mean()), float(maps["att"][gm].mean()))
    ref_cbf, ref_att = means.get(1.0, next(iter(means.values())))
    per_k = {f"k{k:g}": {"cbf_ratio": c / ref_cbf, "att_shift_ms": a - ref_att} for k, (c, a) in means.items()}
    logk = np.log([k for k in means])
    logc = np.log([max(c, 1e-6) for c, _ in means.values()])
    slope = float(np.polyfit(logk, logc, 1)[0]) if len(means) > 1 else float("nan")
    return {"per_k": per_k, "cbf_scaling_exponent": slope,
            "max_cbf_ratio_error": float(max(abs(v["cbf_ratio"] - float(k[1:])) / float(k[1:]) for k, v in per_k.items())),
            "max_att_shift_ms": float(max(abs(v["att_shift_ms"]) for v in per_k.values()))}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True, checkpoint=True)
    parser.add_argument("checkpoints", nargs="*", type=Path, help=argparse.SUPPRESS)  # deprecated: use --checkpoint
    args = parser.parse_args(argv)
    checkpoints = checkpoint_paths(args, parser)
    test_file = fixed_set_from_args(args)
    run = start_run(args, domain="asl", defaults=DEFAULTS, argv=argv, data_key="data.dir")
    cfg, device, vcfg = run.cfg, run.device, run.cfg["validate"]
    models, ckpts = load_ensemble(checkpoints, device)
    if (run.run_dir / "metrics.csv").is_file():
        (run.run_dir / "metrics.csv").unlink()  # rows of an earlier validation in this folder
    prep = ckpts[0]["preprocessing"]
    if "protocol_range" in prep:  # a protocol-conditioned network: held-out 3D brain subjects (asl/protocol_eval.py)
        return validate_protocol_network(run, models, prep)
    physics, stats, s_ref = prep["physics"], prep["target_stats"], prep["input_scale"]
    run.log(f"{len(models)} model(s): {sorted({c['model']['target'] for c in ckpts})}")
    data_path = test_file or Path(cfg["data"]["dir"]) / "test.npz"
    data, meta = load_fixed_set(data_path)
    check_set_matches(meta, {"physics": physics}, data_path)
    n = int(vcfg["max_phantoms"]) or data["cbf"].shape[0]
    data = {k: (v[:n] if k not in ("noisy", "snrs", "sigma") and np.ndim(v) and len(v) == len(data["cbf"]) else v)
            for k, v in data.items()}
    data["noisy"] = data["noisy"][:, :n]
    mask, label = data["mask"], data["label"]
    tissues = tissue_masks(label, mask)
    true_params = params_of(data)
    fit_cfg = prep.get("fit", cfg["fit"])
    truth = {"cbf": data["cbf"].astype(np.float64), "att": data["att"].astype(np.float64)}
    rows, summary_snr, figures = [], {}, []
    crlb_rmse = {"cbf": {}, "att": {}}
    keep_maps = {}
    calib_levels = [0.5, 0.8, 0.9, 0.95]
    calib = {}
    mc = int(vcfg["mc_dropout_samples"])
    for k, snr in enumerate(data["snrs"]):
        snr, sigma = float(snr), float(data["sigma"][k])
        noisy = data["noisy"][k]
        maps = predict_maps(models, torch.from_numpy(noisy) / s_ref, stats, mc_samples=mc,
                            mc_rate=vcfg["mc_dropout_rate"])
        ls_nom = fit_maps(noisy, mask, physics, fit_cfg, None, device)
        ls_orc = fit_maps(noisy, mask, physics, fit_cfg, true_params, device)
        p = {kk: torch.as_tensor(v)[:, None, None].expand(mask.shape).double() for kk, v in true_params.items()}
        var_cbf, var_att = crlb(torch.from_numpy(truth["cbf"]), torch.from_numpy(truth["att"]), physics, sigma, p)
        crlb_var = {"cbf": var_cbf.numpy(), "att": var_att.numpy()}
        for param in ("cbf", "att"):
            v = crlb_var[param][mask]
            crlb_rmse[param][snr] = float(np.sqrt(v[np.isfinite(v)].mean()))
        estimates = {"nn": {"cbf": maps["cbf"], "att": maps["att"]}, "ls_nominal": ls_nom, "ls_oracle": ls_orc}
        failed = {"nn": nn_failed(maps["cbf"], maps["att"], fit_cfg), "ls_nominal": ls_nom["failed"],
                  "ls_oracle": ls_orc["failed"]}
        snr_metric_rows, wins = snr_rows(snr, truth, estimates, failed, crlb_var, tissues)
        unc = {}
        for param in ("cbf", "att"):
            var = maps[f"total_var_{param}"]
            err = np.abs(maps[param] - truth[param])
            unc[f"{param}_ci95_coverage"] = coverage(maps[param][mask], var[mask], truth[param][mask])
            unc[f"{param}_uncertainty_auroc"] = uncertainty_auroc(var[mask], err[mask], float(vcfg["error_quantile"]))
            calib[f"{param.upper()} SNR {snr:g}"] = [
                coverage(maps[param][mask], var[mask], truth[param][mask], z=NormalDist().inv_cdf(0.5 + lv / 2))
                for lv in calib_levels]
        for row in snr_metric_rows:
            if row["method"] == "nn" and row["tissue"] == "brain":
                row.update({"ci95_coverage": unc[f"{row['param']}_ci95_coverage"],
                            "uncertainty_auroc": unc[f"{row['param']}_uncertainty_auroc"]})
            row.update({f"win_rate_vs_{ls}": wins.get(f"{row['param']}_{row['tissue']}_vs_{ls}")
                        for ls in ("ls_nominal", "ls_oracle")} if row["method"] == "nn" else {})
            append_csv_row(run.run_dir / "metrics.csv", row)
        rows += snr_metric_rows
        summary_snr[f"snr{snr:g}"] = {"win_rates": wins, "uncertainty": unc,
                                      "ls_seconds": {"nominal": ls_nom["seconds"], "oracle": ls_orc["seconds"]}}
        nn_cbf, ls_cbf = find(rows, snr=snr, method="nn", param="cbf", tissue="brain"), \
            find(rows, snr=snr, method="ls_nominal", param="cbf", tissue="brain")
        run.log(f"SNR {snr:g}: CBF MAE NN {nn_cbf['mae']:.2f} vs LS nominal {ls_cbf['mae']:.2f} "
                f"(oracle {find(rows, snr=snr, method='ls_oracle', param='cbf', tissue='brain')['mae']:.2f}); "
                f"ATT MAE NN {find(rows, snr=snr, method='nn', param='att', tissue='brain')['mae']:.0f} vs LS nominal "
                f"{find(rows, snr=snr, method='ls_nominal', param='att', tissue='brain')['mae']:.0f} ms; "
                f"CBF win rate {wins.get('cbf_brain_vs_ls_nominal', float('nan')):.1%}")
        if abs(snr - float(vcfg["figure_snr"])) < 1e-9 or not keep_maps:
            keep_maps = {"snr": snr, "estimates": estimates}
    # Amplitude linearity on realistic phantoms (the test set's clean signals), σ of linearity_snr.
    from asl.physics import noise_sigma

    linearity = amplitude_linearity(models, data["clean"], tissues["gm"], prep, vcfg["linearity_k"],
                                    float(noise_sigma(float(vcfg["linearity_snr"]), physics)), int(cfg["seed"]))
    run.log(f"amplitude linearity: CBF ∝ k^{linearity['cbf_scaling_exponent']:.3f} (ideal 1), max ATT shift "
            f"{linearity['max_att_shift_ms']:.0f} ms")
    # Figures.
    from asl.figures import plot_calibration, plot_error_vs_snr, plot_maps, plot_scatter_ba

    fig_dir = run.run_dir / "figures"
    i = int(np.argmax([(label[j] == 4).sum() * 1000 + mask[j].sum() for j in range(mask.shape[0])]))
    est = keep_maps["estimates"]
    figures += plot_maps({kk: truth[kk][i] for kk in truth}, {m: {kk: e[kk][i] for kk in ("cbf", "att")}
                                                               for m, e in est.items()}, mask[i],
                         fig_dir / "maps", keep_maps["snr"])
    figures += plot_scatter_ba(truth, {m: {kk: e[kk] for kk in ("cbf", "att")} for m, e in est.items()}, mask,
                               fig_dir / "scatter_bland_altman", keep_maps["snr"], int(vcfg["scatter_points"]))
    figures += plot_error_vs_snr(rows, crlb_rmse, fig_dir / "error_vs_snr")
    figures += plot_calibration(calib_levels, calib, fig_dir / "calibration")
    headline = {}
    for snr in data["snrs"]:
        snr = float(snr)
        for param in ("cbf", "att"):
            for method in ("nn", "ls_nominal", "ls_oracle"):
                headline[f"{param}_mae_{method}_snr{snr:g}"] = find(rows, snr=snr, method=method, param=param,
                                                                    tissue="brain").get("mae")
        headline[f"cbf_win_rate_vs_ls_nominal_snr{snr:g}"] = summary_snr[f"snr{snr:g}"]["win_rates"].get(
            "cbf_brain_vs_ls_nominal")
    low = [float(s) for s in data["snrs"] if float(s) <= 5]
    if low:
        headline["nn_beats_ls_nominal_cbf_mae_at_snr_le5"] = bool(all(
            headline[f"cbf_mae_nn_snr{s:g}"] < headline[f"cbf_mae_ls_nominal_snr{s:g}"] for s in low))
    headline["cbf_scaling_exponent"] = linearity["cbf_scaling_exponent"]
    summary = {"checkpoints": [str(p) for p in checkpoints], "n_models": len(models),
               "model_targets": sorted({c["model"]["target"] for c in ckpts}), "test_set": str(data_path),
               "n_phantoms": int(n), "voxels": int(mask.sum()), "per_snr": summary_snr,
               "linearity": linearity, "crlb_rmse": crlb_rmse, "metrics": rows, "headline": headline,
               "figures": [p.relative_to(run.run_dir).as_posix() for p in figures if p.suffix == ".png"]}
    write_text_atomic(run.run_dir / "report.md", render_report(summary, cfg))
    return run.finish(summary)


def validate_protocol_network(run, models, prep: dict) -> dict:
    """Held-out brain subjects with the ``brain_test`` protocols: network vs correctly configured LS (with 95 %
    bootstrap intervals over subjects); rows to metrics.csv, report.md, summary.json."""
    from asl.protocol_eval import evaluate_protocol_model, render_protocol_report

    run.record_inputs_valid()
    sigma_scales = [m.sigma_scale_source for m in models]
    for i, source in enumerate(sigma_scales):
        run.log(f"model {i}: {source}")
    result = evaluate_protocol_model(models, prep, run.cfg, run.log)
    for row in result["rows"]:
        append_csv_row(run.run_dir / "metrics.csv", {k: v for k, v in row.items() if k != "minus_ls_ci95"}
                       | ({"minus_ls_ci95_lo": row["minus_ls_ci95"][0], "minus_ls_ci95_hi": row["minus_ls_ci95"][1]}
                          if "minus_ls_ci95" in row else {}))
    write_text_atomic(run.run_dir / "report.md", render_protocol_report(result))
    return run.finish({"n_models": len(models), "protocol_range": prep["protocol_range"], "sigma_scale": sigma_scales,
                       **result})


def render_report(summary: dict, cfg: dict) -> str:
    lines = ["# ASL validation report", "",
             f"Models: {summary['n_models']} ({', '.join(summary['model_targets'])}); test set "
             f"`{summary['test_set']}`: {summary['n_phantoms']} phantoms, {summary['voxels']} brain voxels.",
             "SNR: σ = S_ref / SNR with S_ref the mean nominal GM signal (CBF 60, ATT 1300 ms) over all channels.",
             "LS nominal: the physics the network was trained around; LS oracle: each phantom's true physics.", ""]
    for tissue in TISSUES:
        sel = [r for r in summary["metrics"] if r["tissue"] == tissue]
        if not sel:
            continue
        lines += [f"## {tissue}", "", "| SNR | param | method | MAE | RMSE | bias | R² | ICC(2,1) | failure | CRLB ratio | "
                  "win vs LS nominal |", "|---|---|---|---|---|---|---|---|---|---|---|"]
        for r in sel:
            lines.append(f"| {r['snr']:g} | {r['param']} | {r['method']} | {r['mae']:.2f} | {r['rmse']:.2f} | "
                         f"{r['bias']:.2f} | {r['r2']:.3f} | {r['icc']:.3f} | {r['failure_rate']:.1%} | "
                         f"{r.get('crlb_ratio', float('nan')):.2f} | "
                         f"{'' if r.get('win_rate_vs_ls_nominal') is None else format(r['win_rate_vs_ls_nominal'], '.1%')} |")
        lines.append("")
    lin = summary["linearity"]
    lines += ["## Amplitude linearity", "", f"CBF ∝ k^{lin['cbf_scaling_exponent']:.3f} (ideal 1); largest relative "
              f"CBF-ratio error {lin['max_cbf_ratio_error']:.1%}; largest ATT shift {lin['max_att_shift_ms']:.0f} ms.", ""]
    lines += ["## Uncertainty", ""]
    for key, value in summary["per_snr"].items():
        u = value["uncertainty"]
        lines.append(f"- {key}: CBF 95 % interval coverage {u['cbf_ci95_coverage']:.1%} (AUROC {u['cbf_uncertainty_auroc']:.2f}), "
                     f"ATT {u['att_ci95_coverage']:.1%} (AUROC {u['att_uncertainty_auroc']:.2f})")
    lines += ["", "## Figures", ""] + [f"![{Path(f).stem}]({f})" for f in summary["figures"]]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
