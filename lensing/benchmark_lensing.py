"""Benchmark the torch simulator against lenstronomy 1.14 and measure training throughput.

    python lensing/benchmark_lensing.py --config configs/lensing/benchmark.yaml
    python lensing/benchmark_lensing.py --set benchmark.compile=true        # also torch.compile'd rendering

In ONE run, on the same random lens scenes (SIE + shear, Sérsic source and lens light, Gaussian PSF):
- images/s of lenstronomy (ImageModel.image, one scene per call, model built once) and of the batched
  torch renderer (float32 and float64; with 1 thread and with all threads), and their ratio;
- the largest pixel difference of torch float64 vs lenstronomy, relative to each image's peak
  (max|Δ| / max|ref|), and the largest per-pixel relative difference over pixels above 1e-3 of the peak;
- training samples/s of the classifier, and of the parameter model with the physics-informed loss;
- if ``benchmark.validate_summary`` names a validate summary.json, its AUROC / TPR0 / TPR10.
Speed targets from the issue (≥ 10× lenstronomy on CPU at 64-101 px without supersampling; < 1e-4 relative
difference in float64) are compared in the printed table; they are measured, never asserted.
"""

from __future__ import annotations

import json
import time
from functools import partial
from pathlib import Path

import numpy as np
import torch

from common.cli import make_parser, start_run
from common.errors import InputError, run_cli
from common.runlog import write_text_atomic
from lensing.defaults import lensing_defaults

DEFAULTS = lensing_defaults()  # sections read here: seed, benchmark, runtime


def _scenes(n: int, n_pix: int, pixel_scale: float, seed: int, dtype) -> dict:
    """Random lenses (every scene has a source) from the simulation population."""
    from lensing.population import PopulationConfig, sample_scenes
    from lensing.surveys import SURVEYS, Survey

    base = SURVEYS["euclid_vis"]
    survey = Survey(base.name, base.instrument, pixel_scale, base.bands, base.psf_fwhm_arcsec, base.zero_point_mag,
                    base.sky_mag_arcsec2, base.exposure_time_s, base.num_exposures, base.read_noise_e,
                    base.reference_band)
    params, _ = sample_scenes(n, survey, n_pix, PopulationConfig(lens_fraction=1.0), np.random.default_rng(seed),
                              dtype)
    params.pop("neighbours")
    return params


def _time(fn, repeats: int) -> float:
    fn()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - start) / repeats


def bench_simulator(bcfg: dict, seed: int, log) -> tuple[list[dict], dict]:
    from lensing.lenstronomy_bridge import LenstronomyRenderer
    from lensing.psf import GaussianPSF
    from lensing.simulator import render, renderer

    rows, accuracy = [], {}
    default_threads = torch.get_num_threads()
    n_ref = int(bcfg["lenstronomy_images"])
    for n_pix in bcfg["n_pix"]:
        for ss in bcfg["supersampling"]:
            scale, fwhm = float(bcfg["pixel_scale_arcsec"]), float(bcfg["psf_fwhm_arcsec"])
            ref_renderer = LenstronomyRenderer(n_pix, scale, fwhm, ss)
            p64 = _scenes(max(n_ref, 1), n_pix, scale, seed, torch.float64)
            ref_renderer.render(p64, 0)
            start = time.perf_counter()
            refs = np.stack([ref_renderer.render(p64, i) for i in range(n_ref)])
            lenstronomy_rate = n_ref / (time.perf_counter() - start)
            psf = GaussianPSF(fwhm)
            ours = render(p64, n_pix, scale, psf, ss)[:, 0].numpy()
            peak = np.abs(refs).max(axis=(1, 2), keepdims=True)
            rel_peak = float((np.abs(ours - refs) / peak).max())
            bright = np.abs(refs) > 1e-3 * peak
            rel_pixel = float((np.abs(ours - refs)[bright] / np.abs(refs)[bright]).max())
            accuracy[f"{n_pix}px_ss{ss}"] = {"max_abs_diff_over_peak": rel_peak, "max_rel_diff_bright_pixels": rel_pixel}
            row = {"n_pix": n_pix, "supersampling": ss, "lenstronomy_images_per_s": lenstronomy_rate,
                   "max_abs_diff_over_peak_f64": rel_peak, "max_rel_diff_bright_pixels_f64": rel_pixel}
            for dtype_name, dtype in (("float32", torch.float32), ("float64", torch.float64)):
                batch = _scenes(int(bcfg["torch_batch"]), n_pix, scale, seed + 1, dtype)
                for threads in bcfg["threads"]:
                    torch.set_num_threads(int(threads) or default_threads)
                    seconds = _time(partial(render, batch, n_pix, scale, psf, ss), int(bcfg["torch_repeats"]))
                    rate = len(batch["lens"]["theta_E"]) / seconds
                    tag = f"torch_{dtype_name}_threads{int(threads) or default_threads}"
                    row[f"{tag}_images_per_s"] = rate
                    row[f"{tag}_speedup"] = rate / lenstronomy_rate
                torch.set_num_threads(default_threads)
                if bcfg["compile"] and dtype_name == "float32":
                    try:
                        compiled = partial(renderer(True), batch, n_pix, scale, psf, ss)
                        start = time.perf_counter()
                        compiled()
                        row["torch_compile_seconds"] = time.perf_counter() - start
                        rate = len(batch["lens"]["theta_E"]) / _time(compiled, int(bcfg["torch_repeats"]))
                        row["torch_float32_compiled_images_per_s"] = rate
                        row["torch_float32_compiled_speedup"] = rate / lenstronomy_rate
                    except Exception as exc:  # no compiler, unsupported platform: report, do not fail
                        log(f"[lensing] torch.compile unavailable: {type(exc).__name__}: {str(exc)[:200]}")
            rows.append(row)
            log(f"[lensing] {n_pix}px ss{ss}: lenstronomy {lenstronomy_rate:.0f} img/s; " + ", ".join(
                f"{k.replace('_images_per_s', '')} {v:.0f} img/s" for k, v in row.items()
                if k.endswith("_images_per_s") and k.startswith("torch")) +
                f"; float64 max|diff|/peak {rel_peak:.2e}, bright-pixel rel {rel_pixel:.2e}")
    return rows, accuracy


def _train_step(model, opt, x, y, physics, batch) -> None:
    import torch.nn.functional as F

    outputs = model(x)
    loss = F.binary_cross_entropy_with_logits(outputs["logit"], y)
    if physics is not None:
        loss = loss + physics(outputs, batch, epoch=1)[0]
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()


def bench_training(bcfg: dict, device: torch.device) -> dict:
    from lensing.models import DeepLensResNet, LensParameterResNet
    from lensing.physics_loss import PhysicsInformedLoss

    size, batch_size, steps = int(bcfg["train_image_size"]), int(bcfg["train_batch"]), int(bcfg["train_steps"])
    widths = list(bcfg["model_widths"])
    out = {}
    x = torch.randn(batch_size, 1, size, size, device=device)
    y = torch.randint(0, 2, (batch_size,), device=device).float()
    batch = {"image": torch.randn(batch_size, 1, size, size, device=device) * 0.01,
             "variance": torch.full((batch_size, 1, size, size), 1e-4, device=device), "label": y,
             "noise_sigma": torch.full((batch_size, 1), 0.01, device=device),
             "pixel_scale": torch.full((batch_size,), 0.1, device=device),
             "psf_fwhm": torch.full((batch_size, 1), 0.18, device=device)}
    for name, cls, physics in (("classifier", DeepLensResNet, None),
                               ("physics_informed", LensParameterResNet, PhysicsInformedLoss(weight=0.01))):
        model = cls(1, size, widths, [1] * len(widths)).to(device)
        opt = torch.optim.AdamW(model.parameters(), lr=1e-3)

        step = partial(_train_step, model, opt, x, y, physics, batch)
        out[f"train_samples_per_s_{name}"] = batch_size / _time(step, steps)
    return out


def _read_validate_summary(path: Path) -> tuple[Path, dict]:
    """(path, its "overall" metrics), read before the benchmark runs so a bad path fails at once."""
    if not path.is_file():
        raise InputError("benchmark.validate_summary: file not found", path)
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except ValueError as exc:  # a truncated summary.json
        raise InputError(f"benchmark.validate_summary: not valid JSON ({exc})", path) from exc
    return path, data.get("overall", {})


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__)
    args = parser.parse_args(argv)
    run = start_run(args, domain="lensing", defaults=DEFAULTS, argv=argv)
    bcfg = run.cfg["benchmark"]
    validate_summary = _read_validate_summary(Path(bcfg["validate_summary"])) if bcfg["validate_summary"] else None
    run.record_inputs_valid()
    run.log(f"[lensing] benchmark on {run.device}, torch threads {torch.get_num_threads()}")
    rows, accuracy = bench_simulator(bcfg, run.cfg["seed"], run.log)
    training = bench_training(bcfg, run.device)
    run.log("[lensing] training: " + ", ".join(f"{k} {v:.1f}" for k, v in training.items()))
    import pandas as pd

    write_text_atomic(run.run_dir / "benchmark.csv", pd.DataFrame(rows).to_csv(index=False))
    headline = {}
    for row in rows:
        tag = f"{row['n_pix']}px_ss{row['supersampling']}"
        best = max((v for k, v in row.items() if k.endswith("_speedup") and "float32" in k), default=float("nan"))
        headline[f"speedup_f32_best_{tag}"] = best
        headline[f"lenstronomy_img_per_s_{tag}"] = row["lenstronomy_images_per_s"]
        headline[f"max_abs_diff_over_peak_f64_{tag}"] = row["max_abs_diff_over_peak_f64"]
    headline.update(training)
    summary = {"simulator": rows, "accuracy": accuracy, "training": training, "headline": headline,
               "targets": {"speedup_cpu_64_101px": 10.0, "max_relative_difference_f64": 1e-4},
               "torch_threads_default": torch.get_num_threads()}
    if validate_summary is not None:
        path, overall = validate_summary
        summary["validate"] = {k: overall.get(k) for k in ("auroc", "tpr0", "tpr10", "n_lenses", "n_nonlenses")}
        run.log(f"[lensing] held-out set ({path}): AUROC {overall.get('auroc')}, TPR0 {overall.get('tpr0')}, "
                f"TPR10 {overall.get('tpr10')}")
    for row in rows:
        tag = f"{row['n_pix']}px_ss{row['supersampling']}"
        run.log(f"[lensing] {tag}: best float32 speedup {headline[f'speedup_f32_best_{tag}']:.1f}x (target >= 10x), "
                f"float64 max|diff|/peak {row['max_abs_diff_over_peak_f64']:.1e} (target < 1e-4)")
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
