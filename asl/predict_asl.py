"""CBF and ATT maps of real acquisitions: least squares with the data's own physics, and/or a trained network.

Input: a BIDS ASL folder (asl.nii.gz + aslcontext.tsv + asl.json [+ m0scan]), the original's per-PLD folder
(r_normdiff_alldyn_<PCASL|VSASL>_<PLD>.nii* + r_M0.nii*) or a .npz from preprocess_asl.py --invivo.

Physics come from the data's sidecar (asl/acquisition.py: labeling type, PLDs, labeling duration, labeling
efficiency, background suppression pulses, field strength → blood T1, M0 type and its TR correction);
the config fills only what the data lacks; ``--set physics.KEY=VALUE`` overrides both. The physics used,
and where each value came from, are printed and written to ``maps.json``.

Methods (``--method``): ``ls`` (no checkpoint needed; the default without --checkpoint), ``nn`` (--checkpoint:
a checkpoint file, a training run folder or an ensemble folder) and ``both`` (the default with --checkpoint).
LS always fits the data's physics; a network whose training physics cannot cover the data is refused, naming
the mismatch (protocol-conditioned networks: their recorded ``protocol_range``). With GM/WM maps the LS fit uses a
tissue T1 per voxel (``predict.tissue_t1_from_pv``), and ``predict.pvc`` adds a two-compartment partial-volume
correction (asl/pvc.py).

Writes in the input's geometry: ls_cbf.nii.gz (ml/100g/min), ls_att.nii.gz (ms), ls_failed.nii.gz,
ls_cbf_std.nii.gz / ls_att_std.nii.gz (√CRLB with σ from the fit residuals), cbf / att / cbf_std / att_std
.nii.gz (network), mask.nii.gz, maps.json (physics and sources, method, software version, warnings, repairs),
figures/qc.png, summary.json. A refused input writes nothing.

    python asl/predict_asl.py /data/sub-01 --method ls --output-dir runs/asl/sub-01
    python asl/predict_asl.py data/asl/smoke/synthetic_subject/bids --checkpoint runs/asl/smoke --output-dir runs/asl/pred
"""

from __future__ import annotations

import json
import platform
from pathlib import Path

import numpy as np
import torch

from asl.acquisition import command_line_physics_keys, data_physics, m0_recovery_factor, network_coverage
from asl.data import load_ensemble, predict_maps
from asl.defaults import defaults
from asl.fitting import fit_batched
from asl.invivo import InvivoError, assemble, load_subject, read_nifti
from asl.physics import check_physics, crlb_from_jacobian
from common.cli import make_parser, start_run
from common.config import load_config
from common.errors import run_cli
from common.runlog import atomic_path, write_text_atomic

DEFAULTS = defaults()
MAP_UNITS = {"cbf": "ml/100g/min", "att": "ms", "cbf_std": "ml/100g/min", "att_std": "ms", "ls_cbf": "ml/100g/min",
             "ls_att": "ms", "ls_failed": "1 = not converged / non-finite / on a bound", "ls_cbf_std": "ml/100g/min",
             "ls_att_std": "ms", "mask": "1 = brain (M0 threshold) with finite data",
             "ls_pvc_cbf_gm": "ml/100g/min (GM compartment)", "ls_pvc_att_gm": "ms (GM compartment)",
             "ls_pvc_cbf_wm": "ml/100g/min (WM compartment)", "ls_pvc_att_wm": "ms (WM compartment)"}


def _save_nifti(arr: np.ndarray, affine: np.ndarray, path: Path) -> str:
    import nibabel as nib

    with atomic_path(path) as tmp:
        nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), affine), tmp)
    return path.name


def _tissue_means(maps: dict, region: np.ndarray) -> dict:
    return {k: (float(np.nanmean(v[region])) if region.any() else None) for k, v in maps.items()}


def software_version() -> dict:
    from importlib import metadata

    try:
        version = metadata.version("imaging-pipelines")
    except metadata.PackageNotFoundError:
        version = "unknown"
    return {"package": "imaging-pipelines", "version": version, "script": "asl.predict_asl",
            "python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}


def prepare_subject(args, cfg: dict) -> tuple[dict, dict, dict, list[str]]:
    """Read and check the input and resolve its physics (before any file is written).
    Returns (subject, physics, provenance, warnings); the subject's signals carry the M0 T1-recovery factor."""
    pcfg = cfg["predict"]
    subject = load_subject(args.input, m0_value=float(pcfg["m0_value"]) or None,
                           fix_label_control_swap=bool(pcfg["fix_label_control_swap"]))
    overrides = command_line_physics_keys(args.set)
    physics, provenance, warnings = data_physics(subject, cfg["physics"], overrides, str(pcfg["fit_model"]))
    try:
        check_physics(physics)
    except ValueError as exc:
        raise InvivoError(f"{args.input}: {exc}") from None
    if "plds_ms" in overrides:  # relabel the data's PLDs, in order
        for mode in physics["modes"]:
            old = sorted(subject["signals"][mode])
            subject["signals"][mode] = {float(new): subject["signals"][mode][o]
                                        for o, new in zip(old, physics["plds_ms"])}
    subject["signals"] = {m: subject["signals"][m] for m in physics["modes"]}
    m0_info = []
    for r in subject["meta"].get("runs", []):
        acq = r.get("acquisition", {})
        factor = m0_recovery_factor(acq.get("m0_tr_ms"), float(physics["t1_tissue_ms"]))
        if r["mode"] in subject["signals"] and factor != 1.0:
            subject["signals"][r["mode"]] = {p: v * factor for p, v in subject["signals"][r["mode"]].items()}
        m0_info.append({"mode": r["mode"], "m0_type": acq.get("m0_type"), "m0_source": r.get("m0_source"),
                        "m0_tr_ms": acq.get("m0_tr_ms"), "t1_recovery_factor": factor})
    subject["meta"]["m0"] = m0_info
    return subject, physics, provenance, warnings


def _sigma_from_residuals(cost: np.ndarray, ok: np.ndarray, m0: np.ndarray, n_channels: int) -> float | None:
    """Pooled absolute noise σ (M0 units × M0): σ² = Σ cost·M0² / (N (C − 2)) over well-fitted voxels."""
    if n_channels <= 2 or not ok.any():
        return None
    return float(np.sqrt(np.sum(cost[ok] * m0[ok] ** 2) / (ok.sum() * (n_channels - 2))))


def fit_maps(signals_vox: np.ndarray, m0_vox: np.ndarray, physics: dict, fit_cfg: dict, device,
             with_crlb: bool = True, params: dict | None = None, fit: dict | None = None) -> dict:
    """What predict runs for LS: the batched fit plus the √CRLB maps (timed together: ``seconds``).
    ``params``: per-voxel physics (e.g. ``t1_tissue_ms`` from GM/WM maps); ``fit``: the fit_batched result of this
    problem when already made (shared with the network's LS inputs; its time is counted in ``seconds``)."""
    import time

    start = time.perf_counter()
    res = fit if fit is not None else fit_batched(signals_vox, physics, params, fit_cfg, device=device)
    out = {"cbf": res["cbf"], "att": res["att"], "failed": res["failed"].astype(np.float64), "fit": res}
    sigma = None
    if with_crlb:
        sigma = _sigma_from_residuals(res["cost"], ~res["failed"], m0_vox, signals_vox.shape[1])
    if sigma is not None:
        sig_v = sigma / np.where(m0_vox > 0, m0_vox, np.inf)
        var_c, var_a = crlb_from_jacobian(res["jacobian"], torch.from_numpy(sig_v))  # the fit's final Jacobian
        out["cbf_std"] = np.sqrt(var_c.numpy())
        out["att_std"] = np.sqrt(var_a.numpy())
    out["sigma_abs"] = sigma
    out["seconds"] = time.perf_counter() - start + (fit["seconds"] if fit is not None else 0.0)
    return out


def shared_ls_fit_problem(physics: dict, fit_cfg: dict, network_fit_cfg: dict | None) -> str | None:
    """None when predict's LS fit can be the one a network with ``ls_inputs`` blends with, so one fit serves both:
    the same fit settings (up to those that only split the work), the full Buxton PCASL model, and the data's
    physics equal to the protocol the network is given (asl.ls_inputs: nominal physics held as float32 protocol
    arrays; 1e-6 relative). Else the first difference, in words. The tissue T1 is then predict's (the map from the
    GM/WM maps scaled by physics.t1_tissue_ms / 1331 ms, or physics.t1_tissue_ms), not the GM-weight T1 the network
    fits with on its own (1331 / 832 ms): the network blends with the LS maps written beside it."""
    from asl.fitting import FIT_DEFAULTS, SPEED_ONLY_FIT_KEYS
    from asl.ls_inputs import nominal_physics
    from asl.protocol import protocol_arrays, protocol_from_physics

    if network_fit_cfg is None:
        return "the checkpoint records no fit settings"
    a, b = ({k: v for k, v in {**FIT_DEFAULTS, **c}.items() if k not in SPEED_ONLY_FIT_KEYS}
            for c in (fit_cfg, network_fit_cfg))
    if a != b:
        return "fit settings differ: " + ", ".join(f"fit.{k} {a.get(k)} vs {b.get(k)}" for k in sorted(set(a) | set(b))
                                                   if a.get(k) != b.get(k))
    if "pcasl" in physics["modes"] and physics["pcasl_model"] != "buxton_full":
        return f"LS uses pcasl_model {physics['pcasl_model']}, the network's inputs buxton_full"
    nominal = nominal_physics(protocol_arrays(protocol_from_physics(physics)))
    ours = {**physics, **{f"alpha_{m}": float(physics[f"alpha_{m}"]) * float(physics["alpha_bs1"])
                          ** int(physics[f"n_bs_{m}"]) for m in ("pcasl", "vsasl")}}
    if list(nominal["modes"]) != list(physics["modes"]) or not np.allclose(nominal["plds_ms"], physics["plds_ms"],
                                                                           rtol=1e-6, atol=0):
        return "the measurements differ"
    keys = ["tau_ms", "t1_blood_ms", "lambda_blood"] + [f"alpha_{m}" for m in physics["modes"]]
    for key in keys:
        if not np.isclose(nominal[key], ours[key], rtol=1e-6, atol=0):
            return f"physics.{key} {ours[key]:g} vs {nominal[key]:g}"
    return None


def tissue_t1_map(gm: np.ndarray, wm: np.ndarray, physics: dict) -> np.ndarray:
    """Voxel tissue T1 (ms) from GM/WM partial volumes: (GM·T1_GM + WM·T1_WM)/(GM + WM) with the 3 T values of
    Wansapura et al. 1999 (asl.brain_volume), both scaled by physics.t1_tissue_ms / T1_GM (so an override of the
    GM T1 scales the map); physics.t1_tissue_ms where GM + WM < 0.05."""
    from asl.brain_volume import T1_GM_MS, T1_WM_MS

    tissue = gm + wm
    ratio = float(physics["t1_tissue_ms"]) / T1_GM_MS
    t1 = (gm * T1_GM_MS + wm * T1_WM_MS) / np.maximum(tissue, 1e-6) * ratio
    return np.where(tissue >= 0.05, t1, float(physics["t1_tissue_ms"]))


def partial_volume_correction(signals: np.ndarray, gm: np.ndarray, wm: np.ndarray, mask: np.ndarray, physics: dict,
                              fit_cfg: dict, device, kernel: int) -> tuple[dict, dict]:
    """GM and WM compartment signals by local linear regression (asl.pvc, Asllani et al. 2008), each fitted with its
    tissue T1 (asl.brain_volume values × physics.t1_tissue_ms / T1_GM): maps cbf_gm, att_gm, cbf_wm, att_wm (0 where
    the kernel holds too little of that tissue) and a description."""
    from asl.brain_volume import T1_GM_MS, T1_WM_MS
    from asl.pvc import PVC_DEFAULTS, linear_regression_pvc

    pvc = linear_regression_pvc(signals, gm, wm, mask, kernel, PVC_DEFAULTS["ridge"], PVC_DEFAULTS["min_fraction"])
    ratio = float(physics["t1_tissue_ms"]) / T1_GM_MS
    maps, info = {}, {"method": "linear regression (Asllani et al. MRM 2008)", "kernel": kernel}
    for tissue, t1 in (("gm", T1_GM_MS), ("wm", T1_WM_MS)):
        ok = pvc[f"{tissue}_ok"]
        res = fit_batched(pvc[f"{tissue}_signals"][ok], physics, {"t1_tissue_ms": np.full(int(ok.sum()), t1 * ratio)},
                          fit_cfg, device=device)
        for key in ("cbf", "att"):
            full = np.zeros(mask.shape)
            full[ok] = np.where(np.isfinite(res[key]), res[key], 0.0)
            maps[f"{key}_{tissue}"] = full
        info[f"{tissue}_cbf_mean"] = float(np.nanmean(res["cbf"])) if ok.any() else float("nan")
    return maps, info


def nn_predict(models, prep: dict, cfg: dict, signals: np.ndarray, physics: dict | None = None,
               gm_weight: np.ndarray | None = None, mask: np.ndarray | None = None,
               ls_fit: dict | None = None) -> tuple[dict, float]:
    """What predict runs for the network (including its uncertainty passes); signals (X, Y, Z, C).
    Protocol-conditioned networks (checkpoints with ``protocol_range``) take the data's ``physics`` and the GM
    weight GM/(GM+WM) (None: no partial-volume maps); ``ls_fit``: for networks with ls_inputs, the LS fit over the
    ``mask`` voxels already made (see shared_ls_fit_problem), else they fit it. Returns maps (X, Y, Z) and seconds."""
    import time

    if "protocol_range" in prep:
        from asl.protocol import protocol_from_physics
        from asl.protocol_data import predict_volume

        start = time.perf_counter()
        maps = predict_volume(models, signals.astype(np.float32), protocol_from_physics(physics), gm_weight,
                              prep["target_stats"], device=next(models[0].parameters()).device, mask=mask,
                              fit_cfg=prep.get("fit"), ls_fit=ls_fit)
        seconds = time.perf_counter() - start
        return {"cbf": maps["cbf"], "att": maps["att"], "cbf_std": np.sqrt(maps["cbf_var"]),
                "att_std": np.sqrt(maps["att_var"])}, seconds
    x = torch.from_numpy(np.transpose(signals, (2, 3, 0, 1)) / prep["input_scale"]).float()
    start = time.perf_counter()
    mc = int(cfg["validate"]["mc_dropout_samples"])
    maps = predict_maps(models, x, prep["target_stats"], mc_samples=mc, mc_rate=cfg["validate"]["mc_dropout_rate"])
    seconds = time.perf_counter() - start
    to_xyz = lambda a: np.transpose(a, (1, 2, 0))  # noqa: E731 (Z, X, Y) → (X, Y, Z)
    out = {"cbf": to_xyz(maps["cbf"]), "att": to_xyz(maps["att"])}
    for key in ("cbf", "att"):
        var = maps.get(f"total_var_{key}", maps[f"epistemic_var_{key}"])
        out[f"{key}_std"] = np.sqrt(to_xyz(var))
    return out, seconds


def qc_figure(path: Path, subject: dict, mask: np.ndarray, ls: dict, nn: dict, signals: np.ndarray, physics: dict):
    from asl.physics import signal_curves_np
    from common.plotting import plt, save_figure

    z = int(np.argmax(mask.sum(axis=(0, 1))))
    panels = [("M0", subject["m0"], None), ("mean ΔM/M0", signals.mean(-1), None)]
    for name, maps in (("LS", ls), ("NN", nn)):
        if maps:
            panels += [(f"{name} CBF", maps["cbf"], (0, 100)), (f"{name} ATT (ms)", maps["att"], (0, 3500))]
            if "cbf_std" in maps:
                panels.append((f"{name} CBF σ", maps["cbf_std"], (0, 30)))
    fig, axes = plt.subplots(1, len(panels) + 1, figsize=(2.2 * (len(panels) + 1), 2.6))
    for ax, (title, img, lim) in zip(axes, panels):
        shown = np.where(mask[..., z], img[..., z], np.nan).T if title != "M0" else img[..., z].T
        ax.imshow(shown, origin="lower", cmap="viridis", vmin=None if lim is None else lim[0],
                  vmax=None if lim is None else lim[1])
        ax.set_title(title, fontsize=7)
        ax.axis("off")
    ax = axes[-1]
    plds = np.asarray(physics["plds_ms"], dtype=float)
    mean_curve = signals[mask].mean(0)
    ax.plot(np.arange(mean_curve.size), mean_curve, "o", label="data (brain mean)")
    if ls:
        ok = mask & np.isfinite(ls["cbf"]) & np.isfinite(ls["att"])
        fit = signal_curves_np(ls["cbf"][ok], ls["att"][ok], physics).mean(0)
        ax.plot(np.arange(fit.size), fit, "-", label="LS fits (brain mean)")
    ax.set_xticks(np.arange(mean_curve.size))
    ax.set_xticklabels([f"{m[0].upper()}{p / 1000:g}" for m in physics["modes"] for p in plds], fontsize=5,
                       rotation=90)
    ax.set_title("ΔM/M0 per channel (s)", fontsize=7)
    ax.legend(fontsize=5)
    fig.suptitle(f"QC: slice {z}, {int(mask.sum())} brain voxels", fontsize=8)
    fig.tight_layout()
    return save_figure(fig, path)


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, checkpoint=True)
    parser.add_argument("input", type=Path, help="BIDS ASL folder, per-PLD folder, or preprocessed .npz")
    parser.add_argument("--method", choices=("ls", "nn", "both"), default=None,
                        help="ls (no checkpoint), nn or both (default: both with --checkpoint, else ls)")
    parser.add_argument("--gm", type=Path, default=None, help="GM probability NIfTI (default: found beside the data)")
    parser.add_argument("--wm", type=Path, default=None, help="WM probability NIfTI (default: found beside the data)")
    parser.add_argument("--reference-cbf", type=Path, default=None, help="optional reference CBF NIfTI to compare with")
    parser.add_argument("--reference-att", type=Path, default=None, help="optional reference ATT NIfTI to compare with")
    args = parser.parse_args(argv)
    cfg0 = load_config(args.config, args.set, defaults=DEFAULTS)
    method = args.method or (("both" if cfg0["predict"]["ls"] else "nn") if args.checkpoint is not None else "ls")
    if method in ("nn", "both") and args.checkpoint is None:
        parser.error(f"--method {method} needs --checkpoint PATH (or use --method ls)")
    # Everything that can refuse the input runs before the run folder exists: a refused input writes nothing.
    subject, physics, provenance, warnings = prepare_subject(args, cfg0)
    mask_threshold = float(cfg0["predict"]["mask_threshold"])
    gm = read_nifti(args.gm)[0] if args.gm else subject.get("gm")
    wm = read_nifti(args.wm)[0] if args.wm else subject.get("wm")
    if gm is not None and wm is not None and (gm.shape != subject["m0"].shape or wm.shape != subject["m0"].shape):
        raise InvivoError(f"GM/WM maps have shape {gm.shape}/{wm.shape}, the ASL data {subject['m0'].shape}")
    pv_maps = gm is not None and wm is not None
    if cfg0["predict"]["pvc"] and not pv_maps:
        raise InvivoError(f"{args.input}: predict.pvc needs GM and WM probability maps (--gm/--wm, or "
                          "*label-GM_probseg / *label-WM_probseg beside the data)")
    models, prep = [], None
    if method in ("nn", "both"):
        models, ckpts = load_ensemble([args.checkpoint], "cpu")
        prep = ckpts[0]["preprocessing"]
        if "protocol_range" in prep:  # protocol-conditioned network: the data's own protocol within its range
            from asl.protocol import protocol_coverage

            problems = protocol_coverage(physics, prep["protocol_range"])
        else:
            problems = network_coverage(physics, prep["physics"], (ckpts[0].get("config") or {}).get("randomization"))
        if problems:
            raise InvivoError(f"{args.checkpoint}: the network's training physics does not cover {args.input}: "
                              + "; ".join(problems) + " (use --method ls, or a network trained for this protocol)")
        nn_signals, nn_mask = assemble(subject, physics if "protocol_range" in prep else prep["physics"],
                                       mask_threshold)
    run = start_run(args, domain="asl", defaults=DEFAULTS, argv=argv)
    cfg, device, pcfg = run.cfg, run.device, run.cfg["predict"]
    run.record_inputs_valid()
    for key in sorted(physics):
        run.log(f"physics.{key} = {physics[key]}  [{provenance.get(key, 'config')}]")
    for text in warnings + subject["meta"].get("repairs", []):
        run.log(f"WARNING: {text}")
    m0_scale = float(pcfg["m0_scale"])
    signals, mask = assemble(subject, physics, mask_threshold)
    signals = signals / m0_scale
    nf = subject["meta"].get("nonfinite", {})
    run.log(f"{args.input}: {signals.shape[:3]} voxels, {signals.shape[3]} channels, brain mask {int(mask.sum())}; "
            f"{nf.get('brain_voxels_lost', 0)} brain voxels masked for NaN/Inf")
    out_dir = Path(run.run_dir)
    affine = subject["affine"]
    files = [_save_nifti(mask.astype(np.float32), affine, out_dir / "mask.nii.gz")]
    nn, ls, timings = {}, {}, {}
    vox_params = None
    if pv_maps and pcfg["tissue_t1_from_pv"] and "pcasl" in physics["modes"] and physics["pcasl_model"] == "buxton_full":
        vox_params = {"t1_tissue_ms": tissue_t1_map(gm, wm, physics)[mask].astype(np.float64)}
    # A network with ls_inputs blends with an LS fit: when it is the fit of the LS maps (same problem), fit once.
    shared_fit, ls_inputs_note = None, None
    if any(getattr(m, "ls_inputs", False) for m in models):
        why = shared_ls_fit_problem(physics, cfg["fit"], prep.get("fit"))
        if why is None:
            shared_fit = fit_batched(signals[mask].astype(np.float64), physics, vox_params, cfg["fit"], device=device)
            ls_inputs_note = "the LS fit of ls_*.nii.gz (one fit)" if method == "both" else "predict's LS fit"
        else:
            ls_inputs_note = f"fitted separately ({why})"
        run.log(f"network LS inputs: {ls_inputs_note}")
    if models:
        models = [m.to(device) for m in models]
        gm_weight = np.where(gm + wm > 1e-6, gm / np.maximum(gm + wm, 1e-6), 1.0) if pv_maps else None
        nn_maps, timings["nn_s"] = nn_predict(models, prep, cfg, nn_signals / m0_scale, physics, gm_weight,
                                                mask=mask, ls_fit=shared_fit)
        nn = {k: np.where(mask, v, 0.0) for k, v in nn_maps.items()}
        if "protocol_range" in prep:
            for i, m in enumerate(models):
                run.log(f"network member {i}: {m.sigma_scale_source}")
        files += [_save_nifti(v, affine, out_dir / f"{k}.nii.gz") for k, v in nn.items()]
    crlb_info, pvc_info = None, None
    if method in ("ls", "both"):
        m0_vox = subject["m0"][mask] * m0_scale
        if vox_params is not None:
            run.log("LS: tissue T1 per voxel from the GM/WM maps (predict.tissue_t1_from_pv)")
        res = fit_maps(signals[mask].astype(np.float64), m0_vox, physics, cfg["fit"], device, bool(pcfg["crlb"]),
                       vox_params, fit=shared_fit)
        timings["ls_s"] = res["seconds"]
        for key in ("cbf", "att", "failed", "cbf_std", "att_std"):
            if key in res:
                full = np.zeros(mask.shape)
                full[mask] = np.where(np.isfinite(res[key]), res[key], np.nan)
                ls[key] = full
        files += [_save_nifti(v, affine, out_dir / f"ls_{k}.nii.gz") for k, v in ls.items()]
        run.log(f"LS ({physics['pcasl_model'] if 'pcasl' in physics['modes'] else 'vsasl'}): "
                f"{res['fit']['failed'].mean():.1%} of voxels failed (not converged / on a bound), {res['seconds']:.2f} s")
        if "cbf_std" in res:
            crlb_info = {"sigma_abs": res["sigma_abs"], "sigma_definition": "pooled over converged voxels: "
                         "σ² = Σ residual²·M0² / (N·(C − 2)); per voxel σ/M0",
                         "unidentifiable_voxels": int((~np.isfinite(res["att_std"])).sum())}
        elif pcfg["crlb"]:
            warnings.append("no CRLB maps: fewer than 3 channels, or no converged voxel, to estimate σ from")
        if pcfg["pvc"]:
            pvc_maps, pvc_info = partial_volume_correction(signals, gm, wm, mask, physics, cfg["fit"], device,
                                                          int(pcfg["pvc_kernel"]))
            files += [_save_nifti(v, affine, out_dir / f"ls_pvc_{k}.nii.gz") for k, v in pvc_maps.items()]
            run.log(f"partial-volume correction ({pvc_info['method']}, {pvc_info['kernel']}×{pvc_info['kernel']} kernel): "
                    f"GM CBF mean {pvc_info['gm_cbf_mean']:.1f}, WM CBF mean {pvc_info['wm_cbf_mean']:.1f}")
    sidecar = {"method": method, "software": software_version(), "input": str(args.input),
               "physics": physics, "physics_source": provenance, "m0": subject["meta"].get("m0"),
               "m0_scale": m0_scale, "warnings": warnings, "repairs": subject["meta"].get("repairs", []),
               "nonfinite": nf, "runs": [{k: r.get(k) for k in ("mode", "source", "quality")}
                                         for r in subject["meta"].get("runs", [])],
               "crlb": crlb_info, "maps": {f: MAP_UNITS.get(f.split(".")[0]) for f in files},
               "pvc": pvc_info, "tissue_t1": "per voxel from GM/WM maps" if ls and vox_params else
               f"{physics['t1_tissue_ms']:g} ms everywhere"}
    if models:
        sidecar["network"] = {"checkpoint": str(args.checkpoint), "n_models": len(models),
                              "physics": prep["physics"], "protocol_range": prep.get("protocol_range"),
                              "ls_inputs": ls_inputs_note,
                              "uncertainty": "log-variance heads × σ scale + member disagreement" if "protocol_range"
                              in prep else f"MC dropout {int(cfg['validate']['mc_dropout_samples'])} passes + "
                              "log-variance heads"}
        if "protocol_range" in prep:
            sidecar["network"]["sigma_scale"] = [m.sigma_scale_source for m in models]
    write_text_atomic(out_dir / "maps.json", json.dumps(sidecar, indent=2, default=str))
    figures = []
    if pcfg["qc_figure"]:
        figures = [p.relative_to(out_dir).as_posix() for p in
                   qc_figure(out_dir / "figures" / "qc", subject, mask, ls, nn, signals, physics)]
    summary: dict = {"input": str(args.input), "method": method, "files": files + ["maps.json"],
                     "mask_voxels": int(mask.sum()), "n_models": len(models), "physics": physics,
                     "warnings": warnings, "repairs": sidecar["repairs"], "seconds": timings, "brain_mean": {}}
    estimates = {name: est for name, est in (("nn", nn), ("ls", ls)) if est}
    for name, est in estimates.items():
        summary["brain_mean"][name] = _tissue_means({k: est[k] for k in ("cbf", "att")}, mask)
    if ls:
        summary["ls_failure_rate"] = float(ls["failed"][mask].mean())
    if pv_maps:
        gm_region, wm_region = mask & (gm > 0.5), mask & (wm > 0.5)
        parts = []
        for name, est in estimates.items():
            g = _tissue_means({"cbf": est["cbf"], "att": est["att"]}, gm_region)
            w = _tissue_means({"cbf": est["cbf"], "att": est["att"]}, wm_region)
            ratio = g["cbf"] / w["cbf"] if g["cbf"] is not None and w["cbf"] not in (None, 0.0) else None
            summary[f"{name}_gm"], summary[f"{name}_wm"], summary[f"{name}_gm_wm_cbf_ratio"] = g, w, ratio
            if ratio is not None:
                parts.append(f"{name.upper()} {g['cbf']:.1f}/{w['cbf']:.1f} (ratio {ratio:.2f})")
        run.log("GM/WM CBF: " + ", ".join(parts))
    else:
        run.log("no GM/WM probability maps found or given: GM/WM means not reported")
    for param, ref_path in (("cbf", args.reference_cbf), ("att", args.reference_att)):
        if ref_path is None:
            continue
        ref, _ = read_nifti(ref_path)
        if ref.shape != mask.shape:
            raise InvivoError(f"{ref_path}: shape {ref.shape} does not match the ASL data {mask.shape}")
        summary[f"reference_{param}_mae"] = {name: float(np.abs(est[param] - ref)[mask].mean())
                                             for name, est in estimates.items()}
    summary["headline"] = {k: v for k, v in {
        "nn_gm_wm_cbf_ratio": summary.get("nn_gm_wm_cbf_ratio"), "ls_gm_wm_cbf_ratio": summary.get("ls_gm_wm_cbf_ratio"),
        "nn_cbf_mae_vs_reference": summary.get("reference_cbf_mae", {}).get("nn"),
        "ls_cbf_mae_vs_reference": summary.get("reference_cbf_mae", {}).get("ls"),
        "ls_failure_rate": summary.get("ls_failure_rate")}.items() if v is not None}
    summary["figures"] = figures
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
