"""Speed and accuracy of the network, the batched LS fit and the per-voxel scipy LS, in one run on the same data.

Models: --checkpoint (a checkpoint file, a training run folder or an ensemble folder). Data:
- fixed-protocol networks (train_asl.py): the saved test phantoms (test.npz of --data DIR, default data.dir) at
  benchmark.snr (brain voxels); LS fits the test set's physics (the checkpoint's PCASL model);
- protocol-conditioned networks (train_protocol_asl.py): the first held-out brain subject of validate's
  ``brain_test`` family with its first protocol at benchmark.snr (brain-mask voxels); the GM/WM maps are given,
  so LS fits the full Buxton model with the tissue T1 map (predict.tissue_t1_from_pv) and the network gets its
  GM weight input, as predict_asl.py runs them on data with GM/WM maps.
Timed exactly as predict_asl.py runs them (asl.predict_asl.nn_predict / fit_maps):
- the network with its uncertainty (fixed-protocol: validate.mc_dropout_samples MC-dropout passes of every member,
  whole images; protocol-conditioned: log-variance heads and member disagreement, the whole volume, with the LS fit
  the network blends with when it has ``ls_inputs``); voxels/s counts brain voxels; for fixed-protocol networks
  also one plain pass;
- LS as predict runs it (batched fit + CRLB maps) and the batched fit alone; for fixed-protocol networks, for speed
  only, the batched fit with the other PCASL model;
- scipy.optimize.least_squares on a random subset (benchmark.n_scipy_voxels), one voxel at a time, same model,
  per-voxel physics and initialization as the batched fit.
Every method is timed best of benchmark.repeats runs. Prints and returns voxels/s of each, the speed ratios, MAE of each on the scipy subset, the agreement of the
batched fit with scipy (|ΔCBF|, |ΔATT| on voxels where both converged), the coverage of the 95 % intervals
(±1.96 σ) of the network (σ × the checkpoint's σ scale, as predict writes it; asl.protocol_net step 5) and of the
LS CRLB maps (not scaled) over all brain voxels, and the machine load (1-minute load
average before and after).

    python asl/benchmark_asl.py --checkpoint runs/asl/smoke --config configs/asl/smoke.yaml --data data/asl/smoke
    python asl/benchmark_asl.py --checkpoint runs/asl/protocol_pcasl_ls --config configs/asl/protocol_pcasl_ls.yaml
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
import torch

from asl.data import checkpoint_paths, fixed_set_from_args, load_ensemble, predict_maps
from asl.defaults import defaults
from asl.fitting import fit_batched, fit_scipy, grid_init
from asl.predict_asl import fit_maps, nn_predict
from asl.simulate import load_fixed_set
from asl.train_asl import check_set_matches
from common.cli import make_parser, start_run
from common.errors import run_cli

DEFAULTS = defaults()


def _load_average() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except (AttributeError, OSError):  # not on every platform (Windows)
        return None


def _best(run_once, repeats: int) -> dict:
    """The result of the fastest of ``repeats`` runs (each returns a dict with ``seconds``)."""
    return min((run_once() for _ in range(max(int(repeats), 1))), key=lambda r: r["seconds"])


def _take(params: dict | None, idx) -> dict | None:
    return None if params is None else {k: np.ascontiguousarray(v[idx]) for k, v in params.items()}


def _fixed_protocol_data(models, prep: dict, cfg: dict, device, test_file) -> dict:
    """Test phantoms of a fixed-protocol network (train_asl.py) at benchmark.snr."""
    bcfg = cfg["benchmark"]
    physics = prep["physics"]
    data_path = test_file or Path(cfg["data"]["dir"]) / "test.npz"
    data, meta = load_fixed_set(data_path)
    check_set_matches(meta, {"physics": physics}, data_path)
    k = int(np.argmin(np.abs(data["snrs"] - float(bcfg["snr"]))))
    n = int(bcfg["max_phantoms"]) or data["cbf"].shape[0]
    noisy, mask = data["noisy"][k, :n], data["mask"][:n]
    x = torch.from_numpy(noisy) / prep["input_scale"]
    mc = int(cfg["validate"]["mc_dropout_samples"])
    predict_maps(models, x[:1], prep["target_stats"])  # warm-up

    def run_nn():
        maps_xyz, seconds = nn_predict(models, prep, cfg, np.transpose(noisy, (2, 3, 0, 1)))
        return {key: np.transpose(v, (2, 0, 1))[mask] for key, v in maps_xyz.items()}, seconds

    def run_single():
        times = []
        for _ in range(int(bcfg["repeats"])):
            start = time.perf_counter()
            predict_maps(models, x, prep["target_stats"], batch_size=32)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            times.append(time.perf_counter() - start)
        return min(times)

    return {"kind": "fixed_protocol", "description": f"test phantoms {data_path}", "snr": float(data["snrs"][k]),
            "y": np.transpose(noisy, (0, 2, 3, 1))[mask].astype(np.float64), "physics": dict(physics), "params": None,
            "fit_cfg": prep.get("fit", cfg["fit"]), "cbf_true": data["cbf"][:n][mask], "att_true": data["att"][:n][mask],
            "run_nn": run_nn, "run_single": run_single, "mc_dropout_samples": mc,
            "nn_description": f"{len(models)} model(s) x {max(mc, 1)} pass(es) as predict runs it"}


def _protocol_data(models, prep: dict, cfg: dict, device, test_file) -> dict:
    """The first held-out brain subject (validate's brain_test family) with the first brain_test protocol."""
    from asl.predict_asl import tissue_t1_map
    from asl.protocol_eval import gm_weight, held_out_subjects, noisy_signals, protocol_physics

    if test_file is not None:
        raise ValueError(f"--data {test_file}: a protocol-conditioned network is benchmarked on the held-out brain "
                         "subjects of brain_test (no test file)")
    tcfg = cfg["brain_test"]
    subject = held_out_subjects(tcfg, prep.get("brain", cfg["brain"]), cfg["phantom"], n=1)[0]
    entry = tcfg["protocols"][0]
    physics = protocol_physics(entry, prep["physics"])
    snr = float(cfg["benchmark"]["snr"])
    noisy = noisy_signals(subject, physics, snr, int(tcfg["seed"]), 0)
    mask = subject["mask"]
    gm_w = gm_weight(subject)
    t1 = tissue_t1_map(subject["gm"], subject["wm"], physics)[mask].astype(np.float64)  # as predict with GM/WM maps
    ls_inputs = any(getattr(m, "ls_inputs", False) for m in models)

    def run_nn():
        maps, seconds = nn_predict(models, prep, cfg, noisy, physics, gm_w, mask=mask)
        return {key: v[mask] for key, v in maps.items()}, seconds

    run_nn()  # warm-up
    return {"kind": "protocol_conditioned", "snr": snr,
            "description": f"held-out brain subject 0 of brain_test.seed {tcfg['seed']}, protocol {entry['name']}, "
                           f"shape {list(mask.shape)}",
            "y": noisy[mask].astype(np.float64), "physics": physics, "params": {"t1_tissue_ms": t1},
            "fit_cfg": cfg["fit"], "cbf_true": subject["cbf"][mask], "att_true": subject["att"][mask],
            "run_nn": run_nn, "run_single": None,
            "nn_description": f"{len(models)} protocol-conditioned model(s), log-variance heads, whole volume"
                              + (", with the LS fit it blends with (ls_inputs)" if ls_inputs else "")}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True, checkpoint=True)
    parser.add_argument("checkpoints", nargs="*", type=Path, help=argparse.SUPPRESS)  # deprecated: use --checkpoint
    args = parser.parse_args(argv)
    checkpoints = checkpoint_paths(args, parser)
    test_file = fixed_set_from_args(args)
    run = start_run(args, domain="asl", defaults=DEFAULTS, argv=argv, data_key="data.dir")
    cfg, device, bcfg = run.cfg, run.device, run.cfg["benchmark"]
    if device.type == "cpu" and int(bcfg["threads"]) > 0:
        torch.set_num_threads(int(bcfg["threads"]))  # same thread budget as the single-threaded scipy fit
    load_before = _load_average()
    models, ckpts = load_ensemble(checkpoints, device)
    prep = ckpts[0]["preprocessing"]
    bench = (_protocol_data if "protocol_range" in prep else _fixed_protocol_data)(models, prep, cfg, device, test_file)
    y, fit_physics, params, fit_cfg = bench["y"], bench["physics"], bench["params"], bench["fit_cfg"]
    n_vox = len(y)
    nn_times = []
    for _ in range(int(bcfg["repeats"])):
        nn_maps, seconds = bench["run_nn"]()  # exactly as predict_asl runs the network (asl.predict_asl.nn_predict)
        nn_times.append(seconds)
    nn_s = min(nn_times)
    fit_batched(y[:64], fit_physics, _take(params, slice(0, 64)), fit_cfg, device=device)  # warm-up
    repeats = int(bcfg["repeats"])  # every method: best of this many runs (the machine may be shared)
    batched = _best(lambda: fit_batched(y, fit_physics, params, fit_cfg, device=device), repeats)
    # LS as predict runs it: the batched fit with the data's physics plus the CRLB maps
    ls_predict = _best(lambda: fit_maps(y, np.ones(n_vox), fit_physics, fit_cfg, device, with_crlb=True,
                                        params=params), repeats)
    rates = {"nn_voxels_per_s": n_vox / nn_s}
    seconds = {"nn": nn_s}
    if bench.get("run_single") is not None:
        single_s = bench["run_single"]()
        rates["nn_single_pass_voxels_per_s"], seconds["nn_single_pass"] = n_vox / single_s, single_s
    rates["batched_ls_voxels_per_s"] = n_vox / batched["seconds"]
    rates["ls_predict_voxels_per_s"] = n_vox / ls_predict["seconds"]
    seconds.update({"batched_ls": batched["seconds"], "ls_predict": ls_predict["seconds"]})
    other = None
    if params is None and "pcasl" in fit_physics["modes"]:
        other = "buxton_full" if fit_physics["pcasl_model"] == "blood_t1" else "blood_t1"
        other_fit = _best(lambda: fit_batched(y, {**fit_physics, "pcasl_model": other}, None, fit_cfg, device=device),
                          repeats)  # speed only
        rates[f"batched_ls_{other}_voxels_per_s"] = n_vox / other_fit["seconds"]
    rng = np.random.default_rng(int(cfg["seed"]))
    sub = np.sort(rng.choice(n_vox, min(int(bcfg["n_scipy_voxels"]), n_vox), replace=False))
    sub_params = _take(params, sub)
    c0, a0 = grid_init(torch.from_numpy(y[sub]), fit_physics,
                       None if sub_params is None else {k: torch.from_numpy(v) for k, v in sub_params.items()}, fit_cfg)
    scipy_res = _best(lambda: fit_scipy(y[sub], fit_physics, sub_params, fit_cfg, init=(c0.numpy(), a0.numpy())),
                      repeats)
    rates["scipy_ls_voxels_per_s"] = len(sub) / scipy_res["seconds"]
    seconds["scipy_ls"] = scipy_res["seconds"]
    both = batched["converged"][sub] & scipy_res["converged"]
    dcbf = np.abs(batched["cbf"][sub] - scipy_res["cbf"])[both]
    datt = np.abs(batched["att"][sub] - scipy_res["att"])[both]
    cbf_true, att_true = bench["cbf_true"], bench["att_true"]
    accuracy = {}
    for name, cbf, att in (("nn", nn_maps["cbf"][sub], nn_maps["att"][sub]),
                           ("batched_ls", batched["cbf"][sub], batched["att"][sub]),
                           ("scipy_ls", scipy_res["cbf"], scipy_res["att"])):
        accuracy[name] = {"cbf_mae": float(np.abs(cbf - cbf_true[sub]).mean()),
                          "att_mae_ms": float(np.abs(att - att_true[sub]).mean())}
    coverage = {}
    for name, maps in (("nn", nn_maps), ("ls_crlb", ls_predict)):
        for key, truth in (("cbf", cbf_true), ("att", att_true)):
            if f"{key}_std" in maps:
                inside = np.abs(maps[key] - truth) <= 1.96 * maps[f"{key}_std"]  # NaN/inf std: counted as outside
                coverage[f"{name}_{key}"] = float(np.mean(inside & np.isfinite(maps[key])))
    scipy_rate = rates["scipy_ls_voxels_per_s"]
    ratios = {f"{k[:-len('_voxels_per_s')]}_vs_scipy": v / scipy_rate for k, v in rates.items()
              if k != "scipy_ls_voxels_per_s"}
    ratios["nn_vs_batched_ls"] = rates["nn_voxels_per_s"] / rates["batched_ls_voxels_per_s"]
    agreement = {"voxels_both_converged": int(both.sum()), "max_abs_dcbf": float(dcbf.max()) if dcbf.size else None,
                 "share_abs_dcbf_below_0.1": float(np.mean(dcbf < 0.1)) if dcbf.size else None,
                 "max_abs_datt_ms": float(datt.max()) if datt.size else None,
                 "median_abs_datt_ms": float(np.median(datt)) if datt.size else None,
                 # where they differ, which one found the lower residual sum of squares (both stop at kinks of the
                 # model in ATT, so scipy is a reference, not the optimum)
                 "share_batched_cost_le_scipy": float(np.mean(batched["cost"][sub][both]
                                                              <= scipy_res["cost"][both] * (1 + 1e-9)))
                 if both.any() else None}
    targets = {"batched_ls_vs_scipy_ge_200": ratios["batched_ls_vs_scipy"] >= 200,
               "nn_as_predicted_vs_scipy_ge_1000": ratios["nn_vs_scipy"] >= 1000,
               "batched_agrees_with_scipy_0.1": (agreement["share_abs_dcbf_below_0.1"] or 0) >= 0.99}
    load_after = _load_average()
    run.log(f"{bench['description']}; {n_vox} brain voxels, SNR {bench['snr']:g}; torch threads "
            f"{torch.get_num_threads()}; 1-min load average {load_before} before, {load_after} after")
    run.log(f"network: {bench['nn_description']}")
    sigma_scales = [m.sigma_scale_source for m in models if hasattr(m, "sigma_scale_source")]
    for i, source in enumerate(sigma_scales):
        run.log(f"network member {i}: {source}")
    run.log(f"LS: {fit_physics['pcasl_model'] if 'pcasl' in fit_physics['modes'] else 'vsasl'} model"
            + (", tissue T1 per voxel" if params else "") + (f"; {other} timed too (speed only)" if other else ""))
    for key, value in rates.items():
        run.log(f"{key:>34s}: {value:12.0f}")
    for key, value in ratios.items():
        run.log(f"{'ratio ' + key:>34s}: {value:12.1f}")
    if dcbf.size:
        run.log(f"batched vs scipy on {both.sum()} converged voxels: max |ΔCBF| {agreement['max_abs_dcbf']:.4f}, "
                f"share < 0.1: {agreement['share_abs_dcbf_below_0.1']:.1%}, max |ΔATT| "
                f"{agreement['max_abs_datt_ms']:.3f} ms; batched cost <= scipy cost on "
                f"{agreement['share_batched_cost_le_scipy']:.1%}")
    for name, acc in accuracy.items():
        run.log(f"{name:>12s}: CBF MAE {acc['cbf_mae']:.2f}, ATT MAE {acc['att_mae_ms']:.0f} ms "
                f"(scipy subset, SNR {bench['snr']:g})")
    run.log("95 % interval coverage (brain voxels): " + ", ".join(f"{k} {v:.1%}" for k, v in coverage.items()))
    summary = {"kind": bench["kind"], "snr": bench["snr"], "device": str(device), "ls_model": fit_physics["pcasl_model"],
               "ls_tissue_t1_map": params is not None, "torch_threads": torch.get_num_threads(), "voxels": n_vox,
               "scipy_voxels": int(len(sub)), "n_models": len(models), "network": bench["nn_description"],
               "load_average_1min": {"before": load_before, "after": load_after},
               "rates": rates, "ratios": ratios, "agreement": agreement, "accuracy": accuracy, "coverage_95": coverage,
               "targets_met": targets, "seconds": seconds}
    if sigma_scales:
        summary["sigma_scale"] = sigma_scales
    if "mc_dropout_samples" in bench:
        summary["mc_dropout_samples"] = bench["mc_dropout_samples"]
    summary["headline"] = {"batched_ls_vs_scipy_speedup": ratios["batched_ls_vs_scipy"],
                           "ls_predict_vs_scipy_speedup": ratios["ls_predict_vs_scipy"],
                           "nn_vs_scipy_speedup": ratios["nn_vs_scipy"],
                           "batched_vs_scipy_max_abs_dcbf": agreement["max_abs_dcbf"]}
    summary["figures"] = []
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
