"""Speed and accuracy of the network, the batched LS fit and the per-voxel scipy LS, in one run on the same data.

Data: the saved test phantoms (test.npz of --data DIR, default data.dir) at benchmark.snr (brain voxels);
models: --checkpoint (a checkpoint file, a training run folder or an ensemble folder).
Timed exactly as predict_asl.py runs them (asl.predict_asl.nn_predict / fit_maps):
- the network with its uncertainty passes (validate.mc_dropout_samples MC-dropout passes of every member; whole
  images, every pixel computed; voxels/s counts brain voxels), and for reference one plain pass;
- LS as predict runs it: the batched fit with the data's physics (here the test set's, i.e. the checkpoint's,
  PCASL model) plus the CRLB maps; the batched fit alone; and, for speed only, the batched fit with the other
  PCASL model (buxton_full is predict's default on real data);
- scipy.optimize.least_squares on a random subset (benchmark.n_scipy_voxels), one voxel at a time, same model
  and initialization.
Prints voxels/s of each, the speed ratios, MAE of each on the scipy subset, and the agreement of the
batched fit with scipy (|ΔCBF| on voxels where both converged).

    python asl/benchmark_asl.py --checkpoint runs/asl/smoke --config configs/asl/smoke.yaml --data data/asl/smoke
"""

from __future__ import annotations

import argparse
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
    models, ckpts = load_ensemble(checkpoints, device)
    prep = ckpts[0]["preprocessing"]
    if "protocol_range" in prep:
        from common.checkpoint import CheckpointError

        raise CheckpointError(f"{checkpoints[0]}: a protocol-conditioned network (train_protocol_asl.py); this benchmark "
                              "times fixed-protocol networks on phantom sets (predict_asl.py reports the network's "
                              "seconds for a subject)")
    physics, fit_cfg = prep["physics"], prep.get("fit", cfg["fit"])
    data_path = test_file or Path(cfg["data"]["dir"]) / "test.npz"
    data, meta = load_fixed_set(data_path)
    check_set_matches(meta, {"physics": physics}, data_path)
    k = int(np.argmin(np.abs(data["snrs"] - float(bcfg["snr"]))))
    snr = float(data["snrs"][k])
    n = int(bcfg["max_phantoms"]) or data["cbf"].shape[0]
    noisy, mask = data["noisy"][k, :n], data["mask"][:n]
    cbf_true, att_true = data["cbf"][:n][mask], data["att"][:n][mask]
    n_vox = int(mask.sum())
    x = torch.from_numpy(noisy) / prep["input_scale"]

    # LS fits the data's physics, as predict does: here the test set's (the checkpoint's) physics and PCASL model
    fit_physics = dict(physics)
    mc = int(cfg["validate"]["mc_dropout_samples"])
    predict_maps(models, x[:1], prep["target_stats"])  # warm-up
    single_times, nn_times = [], []
    for _ in range(int(bcfg["repeats"])):
        start = time.perf_counter()
        predict_maps(models, x, prep["target_stats"], batch_size=32)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        single_times.append(time.perf_counter() - start)
        # exactly as predict_asl runs the network: its uncertainty passes, input scaling and output maps included
        maps_xyz, seconds = nn_predict(models, prep, cfg, np.transpose(noisy, (2, 3, 0, 1)))
        nn_times.append(seconds)
    nn_s, single_s = min(nn_times), min(single_times)
    y = np.transpose(noisy, (0, 2, 3, 1))[mask].astype(np.float64)
    fit_batched(y[:64], fit_physics, None, fit_cfg, device=device)  # warm-up
    batched = fit_batched(y, fit_physics, None, fit_cfg, device=device)
    ls_predict = fit_maps(y, np.ones(n_vox), fit_physics, fit_cfg, device, with_crlb=True)  # fit + CRLB, as predict
    other = "buxton_full" if fit_physics["pcasl_model"] == "blood_t1" else "blood_t1"
    other_fit = fit_batched(y, {**fit_physics, "pcasl_model": other}, None, fit_cfg, device=device)  # speed only
    rng = np.random.default_rng(int(cfg["seed"]))
    sub = np.sort(rng.choice(n_vox, min(int(bcfg["n_scipy_voxels"]), n_vox), replace=False))
    c0, a0 = grid_init(torch.from_numpy(y[sub]), fit_physics, None, fit_cfg)
    scipy_res = fit_scipy(y[sub], fit_physics, None, fit_cfg, init=(c0.numpy(), a0.numpy()))
    rates = {"nn_voxels_per_s": n_vox / nn_s, "nn_single_pass_voxels_per_s": n_vox / single_s,
             "batched_ls_voxels_per_s": n_vox / batched["seconds"],
             "ls_predict_voxels_per_s": n_vox / ls_predict["seconds"],
             f"batched_ls_{other}_voxels_per_s": n_vox / other_fit["seconds"],
             "scipy_ls_voxels_per_s": len(sub) / scipy_res["seconds"]}
    both = batched["converged"][sub] & scipy_res["converged"]
    dcbf = np.abs(batched["cbf"][sub] - scipy_res["cbf"])[both]
    datt = np.abs(batched["att"][sub] - scipy_res["att"])[both]
    nn_cbf, nn_att = (np.transpose(maps_xyz[k], (2, 0, 1))[mask] for k in ("cbf", "att"))
    accuracy = {}
    for name, cbf, att in (("nn", nn_cbf[sub], nn_att[sub]), ("batched_ls", batched["cbf"][sub], batched["att"][sub]),
                           ("scipy_ls", scipy_res["cbf"], scipy_res["att"])):
        accuracy[name] = {"cbf_mae": float(np.abs(cbf - cbf_true[sub]).mean()),
                          "att_mae_ms": float(np.abs(att - att_true[sub]).mean())}
    scipy_rate = rates["scipy_ls_voxels_per_s"]
    ratios = {"batched_ls_vs_scipy": rates["batched_ls_voxels_per_s"] / scipy_rate,
              "ls_predict_vs_scipy": rates["ls_predict_voxels_per_s"] / scipy_rate,
              f"batched_ls_{other}_vs_scipy": rates[f"batched_ls_{other}_voxels_per_s"] / scipy_rate,
              "nn_vs_scipy": rates["nn_voxels_per_s"] / scipy_rate,
              "nn_single_pass_vs_scipy": rates["nn_single_pass_voxels_per_s"] / scipy_rate,
              "nn_vs_batched_ls": rates["nn_voxels_per_s"] / rates["batched_ls_voxels_per_s"]}
    agreement = {"voxels_both_converged": int(both.sum()), "max_abs_dcbf": float(dcbf.max()) if dcbf.size else None,
                 "share_abs_dcbf_below_0.1": float(np.mean(dcbf < 0.1)) if dcbf.size else None,
                 "median_abs_datt_ms": float(np.median(datt)) if datt.size else None}
    targets = {"batched_ls_vs_scipy_ge_200": ratios["batched_ls_vs_scipy"] >= 200,
               "nn_as_predicted_vs_scipy_ge_1000": ratios["nn_vs_scipy"] >= 1000,
               "batched_agrees_with_scipy_0.1": (agreement["share_abs_dcbf_below_0.1"] or 0) >= 0.99}
    run.log(f"network: {len(models)} model(s) x {max(mc, 1)} pass(es) as predict runs it; LS model "
            f"{fit_physics['pcasl_model'] if 'pcasl' in fit_physics['modes'] else 'vsasl'} (the test set's); "
            f"{other} timed too (its ratio vs scipy uses scipy with the test set's model)")
    for key, value in rates.items():
        run.log(f"{key:>26s}: {value:12.0f}")
    for key, value in ratios.items():
        run.log(f"{'ratio ' + key:>26s}: {value:12.1f}")
    run.log(f"batched vs scipy on {both.sum()} converged voxels: max |ΔCBF| {agreement['max_abs_dcbf']:.4f}, "
            f"share < 0.1: {agreement['share_abs_dcbf_below_0.1']:.1%}")
    for name, acc in accuracy.items():
        run.log(f"{name:>12s}: CBF MAE {acc['cbf_mae']:.2f}, ATT MAE {acc['att_mae_ms']:.0f} ms (scipy subset, SNR {snr:g})")
    summary = {"snr": snr, "device": str(device), "mc_dropout_samples": mc, "ls_model": fit_physics["pcasl_model"], "torch_threads": torch.get_num_threads(), "voxels": n_vox, "scipy_voxels": int(len(sub)), "n_models": len(models),
               "rates": rates, "ratios": ratios, "agreement": agreement, "accuracy": accuracy, "targets_met": targets,
               "seconds": {"nn": nn_s, "nn_single_pass": single_s, "batched_ls": batched["seconds"],
                           "ls_predict": ls_predict["seconds"], "scipy_ls": scipy_res["seconds"]}}
    summary["headline"] = {"batched_ls_vs_scipy_speedup": ratios["batched_ls_vs_scipy"],
                           "ls_predict_vs_scipy_speedup": ratios["ls_predict_vs_scipy"],
                           "nn_vs_scipy_speedup": ratios["nn_vs_scipy"],
                           "batched_vs_scipy_max_abs_dcbf": agreement["max_abs_dcbf"]}
    summary["figures"] = []
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
