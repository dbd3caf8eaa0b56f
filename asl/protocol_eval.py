"""Held-out evaluation of protocol-conditioned networks (run by validate_asl.py for their checkpoints).

Test subjects: whole 3D brains (asl.brain_volume, ``brain_test.n_subjects``) whose seeds come from the
``brain_test.seed`` family, which the training stream (seeds of (seed, index) pairs) never produces, acquired
with the fixed protocols of ``brain_test.protocols`` (nominal physics = true physics). Noise σ = S_ref/SNR.
Methods, all on the same noisy data:
- ``nn``: the network, given the GM/WM partial-volume maps (GM weight input);
- ``nn_no_pv``: the network without them (GM weight 1);
- ``ls``: correctly configured least squares (asl.fitting.fit_batched, full Buxton model with the protocol's
  physics and the voxel tissue T1 map of the subject);
- ``ls_one_t1``: least squares with one tissue T1 (GM, 1331 ms) for every voxel, as a fit without a T1 map.
Metrics per tissue (GM, WM: dominant tissue, lesions excluded; brain): MAE and bias of CBF and ATT pooled over
the voxels of all subjects; ``coverage95``: share of those voxels whose truth lies inside the estimate ± 1.96 σ,
σ the network's (predict_volume: log-variance heads × the checkpoint's σ scale, plus member disagreement) or,
for ``ls``, the fit's √CRLB as predict_asl.py writes it (σ pooled from the residuals; not scaled); a voxel
without a finite σ counts as outside. 95 % confidence intervals: percentile bootstrap over subjects (cluster bootstrap:
subjects resampled with replacement, voxels of a subject kept together), also for the paired difference
nn − ls; intervals over voxels would ignore their spatial correlation.
"""

from __future__ import annotations

import numpy as np
import torch

from asl.brain_volume import T1_GM_MS, generate_brain
from asl.protocol import protocol_arrays, protocol_from_physics, protocol_signals, reference_scale
from asl.protocol_data import predict_volume
from asl.simulate import LABELS, item_seed

METHODS = ("nn", "nn_no_pv", "ls", "ls_one_t1")


def protocol_physics(entry: dict, base_physics: dict) -> dict:
    """The full physics section (asl.physics) of one ``brain_test.protocols`` entry, PCASL model buxton_full."""
    keys = ("modes", "plds_ms", "tau_ms", "t1_blood_ms", "alpha_pcasl", "alpha_vsasl", "n_bs_pcasl", "n_bs_vsasl",
            "alpha_bs1", "lambda_blood")
    return {**base_physics, **{k: entry[k] for k in keys}, "pcasl_model": "buxton_full", "t1_tissue_ms": T1_GM_MS}


def _fit(signals: np.ndarray, mask: np.ndarray, physics: dict, t1: np.ndarray | None, fit_cfg: dict,
         device="cpu", with_crlb: bool = False) -> tuple[np.ndarray, np.ndarray | None]:
    """LS estimates (2, X, Y, Z) and, ``with_crlb``, their √CRLB (2, X, Y, Z) as predict_asl.py computes them
    (σ pooled from the residuals; NaN where a bound is not available)."""
    from asl.predict_asl import fit_maps

    sel = signals[mask]
    res = fit_maps(sel, np.ones(len(sel)), physics, fit_cfg, device, with_crlb,
                   None if t1 is None else {"t1_tissue_ms": t1[mask]})
    out = np.full((2, *mask.shape), np.nan)
    out[0][mask], out[1][mask] = res["cbf"], res["att"]
    std = None
    if "cbf_std" in res:
        std = np.full((2, *mask.shape), np.nan)
        std[0][mask], std[1][mask] = res["cbf_std"], res["att_std"]
    return out, std


def held_out_subjects(tcfg: dict, brain_cfg: dict, phantom_cfg: dict, n: int | None = None) -> list[dict]:
    """The first ``n`` (default brain_test.n_subjects) held-out subjects of the ``brain_test.seed`` family."""
    return [generate_brain(item_seed(int(tcfg["seed"]), i), brain_cfg, phantom_cfg)
            for i in range(int(tcfg["n_subjects"]) if n is None else int(n))]


def gm_weight(subject: dict) -> np.ndarray:
    """GM / (GM + WM) of a subject's partial volumes (1 where neither tissue is present): the network's GM weight."""
    tissue = subject["gm"] + subject["wm"]
    return np.where(tissue > 1e-6, subject["gm"] / np.maximum(tissue, 1e-6), 1.0)


def noisy_signals(subject: dict, physics: dict, snr: float, seed: int, index: int) -> np.ndarray:
    """ΔM/M0 (X, Y, Z, M) of a test subject under ``physics`` (macrovascular term included) plus Gaussian noise
    σ = S_ref / SNR, the noise drawn from (seed, index, SNR)."""
    protocol = protocol_from_physics(physics)
    arrays = {k: torch.from_numpy(np.asarray(v))[None].double() for k, v in protocol_arrays(protocol).items()}
    s_ref = float(reference_scale(arrays))
    m = len(protocol["modes"]) * len(protocol["plds_ms"])
    t = {key: torch.from_numpy(subject[key]).double()[None] for key in ("cbf", "att", "t1_tissue_ms", "abv", "aatt_ms")}
    clean = protocol_signals(t["cbf"], t["att"], t["t1_tissue_ms"], arrays, t["abv"], t["aatt_ms"])
    clean = np.moveaxis(clean[0, :m].numpy(), 0, -1)
    rng = np.random.default_rng([int(seed), int(index), int(snr * 1000)])
    return clean + rng.standard_normal(clean.shape) * s_ref / snr


def _pooled(err_sums: np.ndarray, counts: np.ndarray, idx: np.ndarray) -> float:
    return float(err_sums[idx].sum() / max(counts[idx].sum(), 1))


def bootstrap_ci(err_sums: np.ndarray, counts: np.ndarray, n_boot: int, seed: int) -> tuple[float, float]:
    """95 % percentile interval of the pooled mean Σ err / Σ count over subjects resampled with replacement."""
    rng = np.random.default_rng(seed)
    n = len(counts)
    draws = [_pooled(err_sums, counts, rng.integers(0, n, n)) for _ in range(int(n_boot))]
    return float(np.percentile(draws, 2.5)), float(np.percentile(draws, 97.5))


def evaluate_protocol_model(models, prep: dict, cfg: dict, log) -> dict:
    """Rows (one per protocol × SNR × method × parameter × tissue) and the headline comparison."""
    tcfg, stats = cfg["brain_test"], prep["target_stats"]
    brain_cfg = prep.get("brain", cfg["brain"])
    subjects = held_out_subjects(tcfg, brain_cfg, cfg["phantom"])
    tissues = lambda s: {"gm": s["label"] == LABELS["gm"], "wm": s["label"] == LABELS["wm"], "brain": s["mask"]}  # noqa: E731
    rows, headline = [], {}
    fit_cfg = prep.get("fit", cfg["fit"])
    device = next(models[0].parameters()).device
    for entry in tcfg["protocols"]:
        physics = protocol_physics(entry, prep["physics"])
        protocol = protocol_from_physics(physics)
        for snr in tcfg["snrs"]:
            snr = float(snr)
            # per method, parameter, tissue: per-subject sums of |error| and of error, and voxel counts
            acc: dict = {}
            for si, subj in enumerate(subjects):
                noisy = noisy_signals(subj, physics, snr, int(tcfg["seed"]), si)
                gm_w = gm_weight(subj)
                est, std = {}, {}
                for name, weight in (("nn", gm_w), ("nn_no_pv", None)):
                    maps = predict_volume(models, noisy.astype(np.float32), protocol, weight, stats, device=device,
                                          mask=subj["mask"], fit_cfg=fit_cfg)
                    est[name] = np.stack([maps["cbf"], maps["att"]])
                    std[name] = np.sqrt(np.stack([maps["cbf_var"], maps["att_var"]]))
                est["ls"], std["ls"] = _fit(noisy, subj["mask"], physics, subj["t1_tissue_ms"].astype(np.float64),
                                            fit_cfg, device, with_crlb=True)
                est["ls_one_t1"], _ = _fit(noisy, subj["mask"], physics, None, fit_cfg, device)
                for method, e in est.items():
                    for pi, param in enumerate(("cbf", "att")):
                        err = e[pi] - subj[param]
                        # inside the ±1.96 σ interval (network σ, or the fit's √CRLB); NaN/inf σ counts as outside
                        inside = (np.abs(err) <= 1.96 * std[method][pi]) if std.get(method) is not None else None
                        for tname, tmask in tissues(subj).items():
                            sel = tmask & np.isfinite(err)
                            key = (method, param, tname)
                            n_in = int(inside[sel].sum()) if inside is not None else -1
                            acc.setdefault(key, []).append((np.abs(err[sel]).sum(), err[sel].sum(), sel.sum(), n_in))
            for (method, param, tname), per_subject in acc.items():
                a = np.asarray(per_subject, dtype=np.float64)
                lo, hi = bootstrap_ci(a[:, 0], a[:, 2], tcfg["n_bootstrap"], int(tcfg["seed"]))
                row = {"protocol": entry["name"], "snr": snr, "method": method, "param": param, "tissue": tname,
                       "mae": float(a[:, 0].sum() / a[:, 2].sum()), "mae_ci95_lo": lo, "mae_ci95_hi": hi,
                       "bias": float(a[:, 1].sum() / a[:, 2].sum()), "voxels": int(a[:, 2].sum()),
                       "subjects": len(a),
                       "coverage95": float(a[:, 3].sum() / a[:, 2].sum()) if (a[:, 3] >= 0).all() else None}
                if method == "nn":
                    ls = np.asarray(acc[("ls", param, tname)], dtype=np.float64)
                    rng = np.random.default_rng(int(tcfg["seed"]))
                    diffs = []
                    for _ in range(int(tcfg["n_bootstrap"])):
                        idx = rng.integers(0, len(a), len(a))
                        diffs.append(_pooled(a[:, 0], a[:, 2], idx) - _pooled(ls[:, 0], ls[:, 2], idx))
                    row["minus_ls_ci95"] = [float(np.percentile(diffs, 2.5)), float(np.percentile(diffs, 97.5))]
                rows.append(row)
            for param in ("cbf", "att"):
                nn = next(r for r in rows if r["protocol"] == entry["name"] and r["snr"] == snr and r["method"] == "nn"
                          and r["param"] == param and r["tissue"] == "gm")
                ls = next(r for r in rows if r["protocol"] == entry["name"] and r["snr"] == snr and r["method"] == "ls"
                          and r["param"] == param and r["tissue"] == "gm")
                key = f"{entry['name']}_snr{snr:g}_gm_{param}"
                headline[f"{key}_mae_nn"], headline[f"{key}_mae_ls"] = nn["mae"], ls["mae"]
                headline[f"{key}_nn_lower_ci95_excludes_0"] = bool(nn["minus_ls_ci95"][1] < 0)
                brain = {r["method"]: r for r in rows if r["protocol"] == entry["name"] and r["snr"] == snr
                         and r["param"] == param and r["tissue"] == "brain"}
                cov_nn, cov_ls = brain["nn"]["coverage95"], brain["ls"]["coverage95"]
                headline[f"{entry['name']}_snr{snr:g}_brain_{param}_coverage95_nn"] = cov_nn
                headline[f"{entry['name']}_snr{snr:g}_brain_{param}_coverage95_ls_crlb"] = cov_ls
                log(f"{entry['name']} SNR {snr:g} GM {param.upper()} MAE: NN {nn['mae']:.2f} "
                    f"[{nn['mae_ci95_lo']:.2f}, {nn['mae_ci95_hi']:.2f}] vs LS {ls['mae']:.2f} "
                    f"[{ls['mae_ci95_lo']:.2f}, {ls['mae_ci95_hi']:.2f}]; NN − LS 95 % CI "
                    f"[{nn['minus_ls_ci95'][0]:.2f}, {nn['minus_ls_ci95'][1]:.2f}]; ±1.96σ coverage (brain): "
                    f"NN {_pct(cov_nn)}, LS √CRLB {_pct(cov_ls)}")
    return {"rows": rows, "headline": headline, "n_subjects": len(subjects),
            "voxels_per_subject": [int(s["mask"].sum()) for s in subjects]}


def _pct(value) -> str:
    return "n/a" if value is None else f"{value:.1%}"


def render_protocol_report(result: dict) -> str:
    lines = ["# ASL validation of a protocol-conditioned network", "",
             f"{result['n_subjects']} held-out 3D brain subjects ({result['voxels_per_subject']} brain voxels); "
             "95 % intervals: bootstrap over subjects. LS: full Buxton model with the protocol's physics and the "
             "subject's tissue T1 map; ls_one_t1: one tissue T1 (1331 ms).", "",
             "| protocol | SNR | param | tissue | method | MAE [95 % CI] | bias | NN − LS [95 % CI] | ±1.96σ covers |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        diff = f"[{r['minus_ls_ci95'][0]:.2f}, {r['minus_ls_ci95'][1]:.2f}]" if "minus_ls_ci95" in r else ""
        lines.append(f"| {r['protocol']} | {r['snr']:g} | {r['param']} | {r['tissue']} | {r['method']} | "
                     f"{r['mae']:.2f} [{r['mae_ci95_lo']:.2f}, {r['mae_ci95_hi']:.2f}] | {r['bias']:.2f} | {diff} | "
                     f"{_pct(r.get('coverage95')) if r.get('coverage95') is not None else ''} |")
    return "\n".join(lines) + "\n"
