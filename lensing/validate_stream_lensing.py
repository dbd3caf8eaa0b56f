"""Score a trained lens finder on a large simulated validation set rendered on the fly (nothing stored).

    python lensing/validate_stream_lensing.py --config configs/lensing/validate_100k.yaml --checkpoint RUN

TPR0 (the highest TPR before the first false positive) and TPR10 (fewer than ten) are false-positive COUNTS
(Metcalf et al. 2019): on a test set of a few hundred non-lenses they say little; the Bologna challenge had
100,000 candidates. This script draws ``stream.n_nonlenses`` non-lenses and ``stream.n_lenses`` lenses per
survey of ``simulate.surveys`` from the ``simulate`` section (population, seeing and depth scatter, size,
supersampling; torch's fused ``BatchRenderer``, compiled with ``simulate.compile``), in chunks of
``stream.chunk`` scenes with seed ``seed``: each chunk is
rendered, noised, normalized exactly as lensing/data.py normalizes a stored cutout (σ = √median variance per
band, clip, stretch, residual channel, crop/pad to the model's size) and scored by the model(s) and the
azimuthal-residual baseline; only the scores are kept. Writes ``scores.csv`` (one row per scene: survey,
label, sim_kind, logit, baseline score), ``metrics.csv``, and ``summary.json`` with the Bologna metrics of
model and baseline, per survey and per non-lens kind (the false-positive count of each confuser kind at the
model's TPR10 threshold), paired stratified bootstrap CIs (``validate.bootstrap``), and the wall time of
rendering, scoring and the whole run. Images with artefacts (``simulate.artefact_fraction``) have
``+artefacts`` appended to their ``sim_kind``. ``--set validate.combine_with_baseline=apply`` also scores with
the network + baseline stack stored beside the checkpoint (lensing/combine.py; fitted by validate_lensing.py).
"""

from __future__ import annotations

import time

import numpy as np
import pandas as pd
import torch

from common.checkpoint import load_model, resolve_checkpoints
from common.cli import make_parser, start_run
from common.config import ConfigError
from common.errors import run_cli
from common.runlog import write_text_atomic
from lensing.artefacts import add_artefacts
from lensing.batch_renderer import BatchRenderer
from lensing.baseline import azimuthal_median_model, azimuthal_residual_score
from lensing.combine import apply_stack, checkpoint_identity, combined_report, describe, load_stack, stack_path
from lensing.data import STRETCHES, fit_size, normalize
from lensing.defaults import lensing_defaults
from lensing.metrics import bologna_metrics, bootstrap_comparison, per_survey_metrics
from lensing.population import PopulationConfig, sample_scenes
from lensing.simulate_data import DTYPES, batch_survey, observing_conditions, survey_renderer
from lensing.simulator import add_noise
from lensing.surveys import get_survey

DEFAULTS = lensing_defaults()  # sections read here: seed, simulate, stream, validate, runtime
PROGRESS_EVERY_CHUNKS = 10  # a log line (with the elapsed time) every this many chunks


def network_inputs(noisy: np.ndarray, variance: np.ndarray, prep: dict) -> np.ndarray:
    """Model inputs [N, C or 2C, S, S] of noisy images [N, C, H, W] with variance maps, as LensingDataset
    builds them (lensing/data.py) for the checkpoint's preprocessing ``prep``."""
    sigma = np.sqrt(np.median(variance.reshape(*variance.shape[:2], -1), axis=2))  # [N, C]
    x = np.stack([normalize(img, s, float(prep.get("clip_sigma", 250.0)), prep.get("stretch", "linear"))
                  for img, s in zip(noisy, sigma)])
    size = prep.get("image_size")
    if size and x.shape[-1] != int(size):
        x = np.stack([fit_size(img, int(size), 0.0) for img in x])
    if prep.get("residual_channel", False):
        x = np.concatenate([x, x - azimuthal_median_model(x.reshape(-1, *x.shape[-2:])).reshape(x.shape)], axis=1)
    return x.astype(np.float32)


def _render_chunk(n: int, survey, renderer: BatchRenderer, n_pix: int, population: PopulationConfig, scfg: dict,
                  rng, generator, dtype):
    survey = batch_survey(survey, float(scfg["pixel_scale_scatter"]), rng)
    params, meta = sample_scenes(n, survey, n_pix, population, rng, dtype)
    fwhm, bkg, t_exp = observing_conditions(survey, n, float(scfg["seeing_scatter"]), float(scfg["depth_scatter_mag"]),
                                            rng)
    with torch.no_grad():
        model = renderer(params, psf_fwhm_arcsec=torch.from_numpy(fwhm),
                         pixel_scale_arcsec=survey.pixel_scale_arcsec)
        model, artefacts = add_artefacts(model, bkg, fwhm, survey.pixel_scale_arcsec, float(scfg["artefact_fraction"]),
                                         rng)
        noisy, variance = add_noise(model, bkg, t_exp, generator=generator)
    kinds = np.where(artefacts, np.char.add(meta["sim_kind"].astype(str), "+artefacts"), meta["sim_kind"])
    return noisy.numpy(), variance.numpy(), {**meta, "sim_kind": kinds}


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, checkpoint=True)
    args = parser.parse_args(argv)
    if args.checkpoint is None:
        parser.error("give the model with --checkpoint PATH (checkpoint file, run folder or ensemble folder)")
    run = start_run(args, domain="lensing", defaults=DEFAULTS, argv=argv)
    cfg, scfg, stream, vcfg = run.cfg, run.cfg["simulate"], run.cfg["stream"], run.cfg["validate"]
    counts = {"lenses": int(stream["n_lenses"]), "nonlenses": int(stream["n_nonlenses"])}
    if min(counts.values()) < 1 or int(stream["chunk"]) < 1:
        raise ConfigError(f"stream.n_lenses, stream.n_nonlenses and stream.chunk must be >= 1, got {dict(stream)}")
    if scfg["renderer"] != "torch":
        raise ConfigError("validate_stream_lensing renders with the torch simulator (simulate.renderer: torch); "
                          "write lenstronomy sets with preprocess_lensing.py simulate and score them with validate_lensing.py")
    try:
        surveys = [get_survey(name).select(scfg["band_mode"]) for name in scfg["surveys"]]
        population = {label: PopulationConfig.from_dict({**scfg["population"], "lens_fraction": fraction})
                      for label, fraction in (("lenses", 1.0), ("nonlenses", 0.0))}
    except ValueError as exc:
        raise ConfigError(f"simulate: {exc}") from None
    combine = str(vcfg["combine_with_baseline"])
    if combine not in ("off", "apply"):
        raise ConfigError(f"validate.combine_with_baseline: off or apply here, not {combine!r} (the stack is fitted "
                          "by validate_lensing.py on the validation split of the training data)")
    paths = resolve_checkpoints(args.checkpoint)
    models = [load_model(path, device=run.device, expected_domain="lensing") for path in paths]
    stack = load_stack(stack_path(args.checkpoint), checkpoint_identity([c for _, c in models], paths)) \
        if combine == "apply" else None
    prep = models[0][1].get("preprocessing", {})
    if prep.get("stretch", "linear") not in STRETCHES:
        raise ConfigError(f"{args.checkpoint}: unknown stretch {prep.get('stretch')!r} in the checkpoint's preprocessing")
    for survey in surveys:
        if prep.get("n_bands") and len(survey.bands) != int(prep["n_bands"]):
            raise ConfigError(f"simulate.surveys: {survey.name} has {len(survey.bands)} band(s) ({scfg['band_mode']} "
                              f"band_mode), the model {args.checkpoint} takes {prep['n_bands']}")
    run.record_inputs_valid()
    for model, _ in models:
        model.eval()
    rng = np.random.default_rng(cfg["seed"])
    generator = torch.Generator().manual_seed(int(cfg["seed"]))
    dtype, n_pix, chunk = DTYPES[scfg["dtype"]], int(scfg["n_pix"]), int(stream["chunk"])
    parts, seconds = [], {"render": 0.0, "model": 0.0, "baseline": 0.0}
    start_all = time.perf_counter()
    for survey in surveys:
        renderer = survey_renderer(survey, n_pix, scfg, dtype, "cpu")
        for label, total in counts.items():
            for start in range(0, total, chunk):
                n = min(chunk, total - start)
                tick = time.perf_counter()
                noisy, variance, meta = _render_chunk(n, survey, renderer, n_pix, population[label], scfg, rng,
                                                      generator, dtype)
                x = network_inputs(noisy, variance, prep)
                seconds["render"] += time.perf_counter() - tick
                tick = time.perf_counter()
                with torch.no_grad():
                    logits = np.mean([m(torch.from_numpy(x).to(run.device))["logit"].float().cpu().numpy()
                                      for m, _ in models], axis=0)
                seconds["model"] += time.perf_counter() - tick
                tick = time.perf_counter()
                # the baseline reads the linear noise-normalized image it was designed for, whatever the stretch
                linear = network_inputs(noisy, variance, {**prep, "stretch": "linear", "residual_channel": False})
                baseline = azimuthal_residual_score(linear)
                seconds["baseline"] += time.perf_counter() - tick
                parts.append(pd.DataFrame({"survey": survey.name, "label": meta["label"], "sim_kind": meta["sim_kind"],
                                           "logit": logits, "baseline_score": baseline}))
                if (start // chunk + 1) % PROGRESS_EVERY_CHUNKS == 0:
                    run.log(f"[lensing] {survey.name}: {start + n}/{total} {label} "
                            f"({time.perf_counter() - start_all:.0f} s so far)")
            run.log(f"[lensing] {survey.name}: scored {total} {label} ({time.perf_counter() - start_all:.0f} s so far)")
    seconds["total"] = time.perf_counter() - start_all
    scores = pd.concat(parts, ignore_index=True)
    labels, logit, base = scores["label"].to_numpy(), scores["logit"].to_numpy(), scores["baseline_score"].to_numpy()
    if stack is not None:
        scores["combined_score"] = apply_stack(stack, logit, base)
        combined, boot_combined, combined_headline = combined_report(
            labels, scores["combined_score"].to_numpy(), logit, base, int(vcfg["bootstrap"]), cfg["seed"])
    write_text_atomic(run.run_dir / "scores.csv", scores.to_csv(index=False))
    overall, baseline_metrics = bologna_metrics(labels, logit), bologna_metrics(labels, base)
    surveys_m = per_survey_metrics(labels, logit, scores["survey"].to_numpy(), run.log,
                                   float(vcfg["domain_shift_auroc"]), trained_surveys=prep.get("surveys"))
    boot = bootstrap_comparison(labels, logit, base, int(vcfg["bootstrap"]), cfg["seed"]) \
        if int(vcfg["bootstrap"]) > 0 else None
    false_positives = _false_positives_by_kind(scores)
    rows = [{"scope": "overall", **_flat(overall)}, {"scope": "baseline:azimuthal_residual", **_flat(baseline_metrics)}]
    if stack is not None:
        rows.append({"scope": "combined:logistic_stack", **_flat(combined)})
    rows += [{"scope": f"survey:{name}", **_flat(m)} for name, m in surveys_m.items()]
    write_text_atomic(run.run_dir / "metrics.csv", pd.DataFrame(rows).to_csv(index=False))
    headline = {"auroc": overall["auroc"], "tpr0": overall["tpr0"], "tpr10": overall["tpr10"],
                "baseline_auroc": baseline_metrics["auroc"], "baseline_tpr0": baseline_metrics["tpr0"],
                "baseline_tpr10": baseline_metrics["tpr10"], "n_lenses": int((labels == 1).sum()),
                "n_nonlenses": int((labels == 0).sum()), "wall_s": round(seconds["total"], 1)}
    if boot and boot.get("n_boot"):
        for metric in ("auroc", "tpr0", "tpr10"):
            if metric in boot:
                headline[f"{metric}_ci95"] = [round(v, 4) for v in boot[metric]["model"]]
                headline[f"baseline_{metric}_ci95"] = [round(v, 4) for v in boot[metric]["baseline"]]
                headline[f"{metric}_minus_baseline_ci95"] = [round(v, 4) for v in boot[metric]["difference"]]
    run.log(f"[lensing] {headline['n_nonlenses']} non-lenses, {headline['n_lenses']} lenses in {seconds['total']:.0f} s "
            f"(render {seconds['render']:.0f} s, model {seconds['model']:.0f} s, baseline {seconds['baseline']:.0f} s): "
            f"model AUROC {overall['auroc']:.4f} TPR0 {overall['tpr0']:.3f} TPR10 {overall['tpr10']:.3f}; baseline AUROC "
            f"{baseline_metrics['auroc']:.4f} TPR0 {baseline_metrics['tpr0']:.3f} TPR10 {baseline_metrics['tpr10']:.3f}")
    if stack is not None:
        headline.update(combined_headline)
        run.log(describe(combined_headline))
    summary = {"checkpoint": str(args.checkpoint), "n_members": len(models), "overall": overall,
               "baseline_azimuthal_residual": baseline_metrics, "per_survey": surveys_m, "bootstrap_vs_baseline": boot,
               "false_positives_at_tpr10_threshold_by_kind": false_positives, "seconds": seconds, "headline": headline,
               "combined_logistic_stack": None if stack is None else {
                   "stack": stack, "metrics": combined, "bootstrap": boot_combined},
               "notes": "TPR0/TPR10: false-positive counts (Metcalf et al. 2019); nothing rendered here is stored."}
    return run.finish(summary)


def _flat(metrics: dict) -> dict:
    return {k: v for k, v in metrics.items() if not isinstance(v, (dict, list))}


def _false_positives_by_kind(scores: pd.DataFrame) -> dict:
    """Non-lenses of each ``sim_kind`` scoring above the lowest score with < 10 false positives overall (the
    TPR10 operating point of the model): which confusers the model mistakes for lenses."""
    negatives = scores[scores["label"] == 0]
    threshold = np.sort(negatives["logit"].to_numpy())[-min(10, len(negatives))]
    above = negatives[negatives["logit"] >= threshold]
    return {str(kind): int(count) for kind, count in above["sim_kind"].value_counts().items()}


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
