"""Benchmarks: gamma (vectorized torch vs pymedphys), preprocessing speed, training throughput and memory.

    python vmat/benchmark_vmat.py --output-dir runs/vmat/bench
    python vmat/benchmark_vmat.py --data OUT_NPZ --set benchmark.throughput.model_config=configs/vmat/baseline_unet.yaml

1. Gamma (``benchmark.gamma.criteria``: 3%/3 mm global and 2%/2 mm local, 10 % cutoff) of a perturbed dose
   against the reference, on the same full 3D grid, by vmat.gamma.gamma_index and pymedphys.gamma with
   identical settings, one after the other in the same run: wall and CPU seconds of each, their ratios,
   the pass-rate difference (target: ratio >= 20 on CPU, |difference| <= 0.5 points), torch threads
   (``cpu_threads``, 1 by default: see vmat/gamma.py) and the machine's load average before and after
   each (the wall ratio is only meaningful with the load stated; the headline is the run's worst ratio).
   Cases: the first NPZ of --data (e.g. a 128³ OpenKBP patient) and a synthetic patient's dose on the
   ``synthetic_grid_mm`` grid (e.g. 2.5 mm); the perturbation is a shift of ~3 mm, a −3 % scale and 1 Gy
   noise (a plausible prediction error).
2. Preprocessing: synthetic DICOM-RT patients through preprocess_vmat.process_case, cases per minute.
3. Training: patches/s and peak memory of forward + backward + AdamW steps per patch size for the model
   of a training config (CUDA: torch.cuda.max_memory_allocated; CPU: growth of the process's peak RSS).
Speeds are measured against a peer in the same run; nothing here is a pass/fail test. Settings: the
``benchmark`` section of the vmat config (vmat/defaults.py).
"""

from __future__ import annotations

import copy
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from common.cli import make_parser, start_run
from common.config import load_config
from common.errors import run_cli
from vmat.defaults import PHANTOM_DEFAULTS, PREPROCESS_DEFAULTS, VMAT_DEFAULTS


def _peak_rss_mb() -> float:
    try:
        import resource
    except ImportError:  # Windows
        return float("nan")
    import sys

    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / 1024.0 if sys.platform != "darwin" else rss / 2**20


def _gamma_cases(cfg: dict, data: Path | None, seed: int) -> list[tuple]:
    """(label, reference dose, spacing) of each benchmark case: the first NPZ of ``data`` (e.g. a 128³
    OpenKBP patient) and, unless ``data`` is given and ``synthetic`` is false, a synthetic patient's dose
    on a grid of ``synthetic_grid_mm`` (null: the phantom's default RTDOSE grid)."""
    cases = []
    if data is not None:
        from vmat.case_io import list_cases, load_case

        case = load_case(list_cases(data)[0])
        cases.append((case["case_id"], case["dose"].astype(np.float64), tuple(float(v) for v in case["spacing_mm"])))
    if data is None or cfg["synthetic"]:
        from vmat.phantom import generate_case

        pcfg = copy.deepcopy(PHANTOM_DEFAULTS)
        if cfg["synthetic_grid_mm"]:
            pcfg["dose_grid"]["spacing_zyx_mm"] = [float(v) for v in cfg["synthetic_grid_mm"]]
        case = generate_case(pcfg, 0, seed)
        label = "synthetic dose grid " + "x".join(f"{v:g}" for v in case.dose_spacing_zyx) + " mm"
        cases.append((label, case.dose.astype(np.float64), tuple(case.dose_spacing_zyx)))
    return cases


def _timed(fn, *args, **kwargs):
    """(result, wall seconds, CPU seconds of this process)."""
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn(*args, **kwargs)
    return out, time.perf_counter() - t0, time.process_time() - c0


def bench_gamma(cfg: dict, data: Path | None, seed: int, log) -> dict:
    from scipy import ndimage

    from vmat.gamma import gamma_index, gamma_pymedphys, pass_rate

    out = {"cpu_threads": cfg["cpu_threads"], "load_average_before": list(_load_average()), "cases": [],
           "criteria": []}
    for source, ref, spacing in _gamma_cases(cfg, data, seed):
        rng = np.random.default_rng(seed)
        ev = ndimage.shift(ref, np.asarray(cfg["shift_mm"]) / np.asarray(spacing), order=1) * cfg["scale"]
        ev = np.clip(ev + rng.normal(0, cfg["noise_gy"], ref.shape) * (ref > 0.01 * ref.max()), 0, None)
        out["cases"].append({"case": source, "shape": list(ref.shape), "spacing_mm": list(spacing)})
        for pct, dist, local in cfg["criteria"]:
            kw = {"dose_percent": float(pct), "distance_mm": float(dist),
                  "lower_percent_cutoff": cfg["lower_percent_cutoff"], "max_gamma": cfg["max_gamma"],
                  "interp_fraction": cfg["interp_fraction"], "local": bool(local)}
            gamma_index(ref[:8], ev[:8], spacing, cpu_threads=cfg["cpu_threads"], **kw)  # warm-up
            g_torch, t_torch, c_torch = _timed(gamma_index, ref, ev, spacing, cpu_threads=cfg["cpu_threads"], **kw)
            gamma_pymedphys(ref[:6], ev[:6], spacing, **kw)  # warm-up: numba compiles its interpolation once
            g_ref, t_ref, c_ref = _timed(gamma_pymedphys, ref, ev, spacing, **kw)
            label = f"{pct:g}%/{dist:g}mm {'local' if local else 'global'}"
            row = {"case": source, "criterion": label, "n_points": int(np.isfinite(g_torch).sum()),
                   "torch_s": t_torch, "pymedphys_s": t_ref, "speedup": t_ref / max(t_torch, 1e-9),
                   "torch_cpu_s": c_torch, "pymedphys_cpu_s": c_ref, "cpu_speedup": c_ref / max(c_torch, 1e-9),
                   "torch_pass_pct": pass_rate(g_torch), "pymedphys_pass_pct": pass_rate(g_ref),
                   "max_abs_gamma_difference": float(np.nanmax(np.abs(g_torch - g_ref))),
                   "load_average_after": list(_load_average())}
            row["pass_pct_difference"] = row["torch_pass_pct"] - row["pymedphys_pass_pct"]
            out["criteria"].append(row)
            log(f"[vmat] gamma {label} on {source} {ref.shape}: torch {t_torch:.2f} s ({c_torch:.2f} s CPU), "
                f"pymedphys {t_ref:.2f} s ({c_ref:.2f} s CPU): {row['speedup']:.1f}x wall, "
                f"{row['cpu_speedup']:.1f}x CPU; pass {row['torch_pass_pct']:.2f}% vs {row['pymedphys_pass_pct']:.2f}%; "
                f"load {row['load_average_after'][0]:.1f}")
    out["load_average_after"] = list(_load_average())
    slowest = min(out["criteria"], key=lambda r: r["speedup"])  # the headline is the worst ratio of the run
    out.update({"speedup": slowest["speedup"], "speedup_worst_of": f"{slowest['case']} {slowest['criterion']}",
                "pass_pct_difference": max((r["pass_pct_difference"] for r in out["criteria"]), key=abs)})
    return out


def _load_average() -> tuple:
    import os

    try:
        return tuple(round(v, 2) for v in os.getloadavg())
    except (AttributeError, OSError):  # Windows
        return (float("nan"),) * 3


def bench_preprocess(cfg: dict, seed: int, log) -> dict:
    from vmat.phantom import generate_case, write_case
    from vmat.preprocess_vmat import process_case

    with tempfile.TemporaryDirectory(prefix="vmat_bench_") as tmp:
        tmp = Path(tmp)
        pcfg = copy.deepcopy(PHANTOM_DEFAULTS)
        for i in range(int(cfg["n_cases"])):
            write_case(generate_case(pcfg, i, seed), tmp / "raw" / f"case_{i}", pcfg, seed)
        t0 = time.perf_counter()
        rows = [process_case(str(p), str(tmp / "npz"), copy.deepcopy(PREPROCESS_DEFAULTS), "dicom") for p in sorted((tmp / "raw").iterdir())]
        elapsed = time.perf_counter() - t0
    ok = sum(r["status"] == "ok" for r in rows)
    out = {"n_cases": len(rows), "n_ok": ok, "seconds": elapsed, "cases_per_minute": 60 * len(rows) / elapsed,
           "ct_shape": PHANTOM_DEFAULTS["ct"]["shape_zyx"]}
    log(f"[vmat] preprocessing: {out['cases_per_minute']:.1f} cases/min ({ok}/{len(rows)} ok)")
    return out


def _train_step(model, optimizer, amp, x, cond, y) -> None:
    from common.runtime import optimizer_step

    with amp.autocast():
        if getattr(model, "is_diffusion", False):
            loss = model(x, cond, y)
        else:
            out = model(x, cond)
            loss = (out[-1] if isinstance(out, list) else out).float().sub(y).abs().mean()
    optimizer_step(loss, optimizer, amp, grad_clip=1.0)


def bench_throughput(cfg: dict, device: torch.device, log) -> list[dict]:
    from common.checkpoint import build_model
    from common.runtime import amp_policy
    from vmat.data import make_input_spec
    from vmat.structures import PROSTATE_STRUCTURES
    from vmat.train_vmat import model_spec_from_config

    tcfg = load_config(cfg["model_config"], defaults=VMAT_DEFAULTS)
    spec = make_input_spec(PROSTATE_STRUCTURES, {"PTV70": 70.0, "PTV56": 56.0}, tcfg["input"], 50.0)
    target, kwargs = model_spec_from_config(tcfg["model"], spec)
    rows = []
    for size in cfg["patch_sizes"]:
        model = build_model(target, kwargs).to(device).to(memory_format=torch.channels_last_3d)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
        amp = amp_policy(device, True)
        b = int(cfg["batch_size"])
        x = torch.randn(b, spec["n_channels"], *size, device=device).contiguous(memory_format=torch.channels_last_3d)
        cond = torch.randn(b, spec["cond_dim"], device=device)
        y = torch.rand(b, 1, *size, device=device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        rss0 = _peak_rss_mb()

        _train_step(model, optimizer, amp, x, cond, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        t0 = time.perf_counter()
        for _ in range(int(cfg["steps"])):
            _train_step(model, optimizer, amp, x, cond, y)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        elapsed = time.perf_counter() - t0
        peak = torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else _peak_rss_mb() - rss0
        row = {"patch_size": list(size), "batch_size": b, "patches_per_s": b * int(cfg["steps"]) / elapsed,
               "peak_memory_mb": float(peak), "memory_kind": "cuda allocated" if device.type == "cuda" else "RSS growth",
               "model": target, "parameters": sum(p.numel() for p in model.parameters())}
        rows.append(row)
        log(f"[vmat] training {target.rsplit('.', 1)[-1]} patch {size}: {row['patches_per_s']:.2f} patches/s, "
            f"peak {row['peak_memory_mb']:.0f} MB ({row['memory_kind']})")
        del model, optimizer
    return rows


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True)  # --data: preprocessed NPZ folder (gamma on its first case)
    args = parser.parse_args(argv)
    run = start_run(args, domain="vmat", defaults=VMAT_DEFAULTS, argv=argv)
    cfg, seed = run.cfg["benchmark"], run.cfg["seed"]
    summary: dict = {"device": str(run.device), "torch_threads": torch.get_num_threads()}
    headline = {}
    if cfg["gamma"]["enabled"]:
        summary["gamma"] = bench_gamma(cfg["gamma"], args.data, seed, run.log)
        headline.update({"gamma_speedup_vs_pymedphys": summary["gamma"]["speedup"],
                         "gamma_pass_pct_difference": summary["gamma"]["pass_pct_difference"]})
    if cfg["preprocess"]["enabled"]:
        summary["preprocess"] = bench_preprocess(cfg["preprocess"], seed, run.log)
        headline["preprocess_cases_per_minute"] = summary["preprocess"]["cases_per_minute"]
    if cfg["throughput"]["enabled"]:
        summary["throughput"] = bench_throughput(cfg["throughput"], run.device, run.log)
        headline["train_patches_per_s"] = {"x".join(map(str, r["patch_size"])): r["patches_per_s"]
                                           for r in summary["throughput"]}
    summary["headline"] = headline
    summary["figures"] = []
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
