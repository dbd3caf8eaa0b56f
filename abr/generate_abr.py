"""Sample synthetic-looking ABRs from a trained diffusion generator for given conditions.

Conditions = every (class, intensity) of the ``generate`` config section at one age and stimulus rate,
``n_per_condition`` waveforms each (DDIM, classifier-free guidance, EMA weights). The output is a table in
the clinical format (resampled back to the source sampling rate, so abr/data.py reads it with the same
data config; the file is read back as a check), figures of the generated series, and quality metrics
against real recordings of the same class and intensity.

Config sections used: seed, data (columns), generate, classical. ``--checkpoint PATH``: a checkpoint file
or a run folder of abr.train_diffusion_abr; ``--data DIR``: the cache with real recordings to compare with
(default: the one the generator was trained on).

    python -m abr.generate_abr --checkpoint runs/abr/diffusion/<run> --set generate.n_per_condition=8
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from abr.data import DEFAULT_COLUMNS, load_recordings, write_table
from abr.dataset import load_cache
from abr.defaults import abr_defaults
from abr.dsp import resample
from abr.generator import condition_features, sample_waveforms, target_uv
from abr.labels import CLASS_ASCII, WAVES, canonical_class
from abr.quality import quality_report
from abr.train_diffusion_abr import load_generator, split_rows
from common.checkpoint import resolve_checkpoints
from common.cli import make_parser, start_run
from common.config import ConfigError
from common.errors import InputError, run_cli
from common.plotting import OKABE_ITO, plt, save_figure

DEFAULTS = abr_defaults()


def conditions_table(gcfg: dict) -> pd.DataFrame:
    rows = []
    for name in gcfg["classes"]:
        cls = canonical_class(name, "generate.classes")
        for level in gcfg["intensities_db"]:
            for _ in range(int(gcfg["n_per_condition"])):
                rows.append({"class": cls, "intensity_db": float(level), "age_years": float(gcfg["age_years"]),
                             "rate_per_s": float(gcfg["rate_per_s"])})
    if not rows:
        raise ConfigError("generate.classes and generate.intensities_db must not be empty")
    return pd.DataFrame(rows)


def to_clinical_table(conditions: pd.DataFrame, waveforms_uv: np.ndarray, columns: dict) -> pd.DataFrame:
    cols = {**DEFAULT_COLUMNS, **columns}
    meta = {}
    n = len(conditions)
    for key, values in (("patient_id", [f"GEN{i + 1:05d}" for i in range(n)]), ("ear", [""] * n),
                        ("age", conditions["age_years"]), ("intensity", conditions["intensity_db"]),
                        ("rate", conditions["rate_per_s"]), ("fmp", [np.nan] * n), ("sweeps_rejected", [0] * n),
                        ("polarity", ["Alternating"] * n), ("hearing_loss", conditions["class"]),
                        ("threshold", [np.nan] * n)):
        if cols.get(key):
            meta[cols[key]] = list(values)
    for wave in WAVES:
        for kind in ("latency", "amplitude"):
            if cols.get(f"{kind}_{wave}"):
                meta[cols[f"{kind}_{wave}"]] = [np.nan] * n
    samples = pd.DataFrame(np.round(waveforms_uv, 5),
                           columns=[f"{cols['sample_prefix']}{i + 1}" for i in range(waveforms_uv.shape[1])])
    return pd.concat([pd.DataFrame(meta), samples], axis=1)


def series_figure(conditions: pd.DataFrame, waveforms_uv: np.ndarray, t_ms: np.ndarray, path_stem: Path) -> list[Path]:
    classes = list(dict.fromkeys(conditions["class"]))
    fig, axes = plt.subplots(1, len(classes), figsize=(2.6 * len(classes), 4.2), squeeze=False, sharey=True)
    spacing = max(float(np.abs(waveforms_uv).max()) * 0.8, 0.1)
    for ax, (c, cls) in zip(axes[0], enumerate(classes)):
        levels = sorted(conditions.loc[conditions["class"] == cls, "intensity_db"].unique())
        for k, level in enumerate(levels):
            idx = np.flatnonzero(((conditions["class"] == cls) & (conditions["intensity_db"] == level)).to_numpy())
            for j in idx:
                ax.plot(t_ms, waveforms_uv[j] + k * spacing, color=OKABE_ITO[c % len(OKABE_ITO)], linewidth=0.7, alpha=0.7)
            ax.text(t_ms[-1], k * spacing, f"{level:.0f}", fontsize=6, va="center")
        ax.set_title(CLASS_ASCII.get(cls, cls))
        ax.set_xlabel("time (ms)")
        ax.set_yticks([])
    axes[0][0].set_ylabel("generated, stacked by intensity (dB nHL)")
    fig.tight_layout()
    return save_figure(fig, path_stem)


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True, checkpoint=True)
    args = parser.parse_args(argv)
    run = start_run(args, domain="abr", defaults=DEFAULTS, argv=argv)
    cfg, device = run.cfg, run.device
    gcfg = cfg["generate"]
    conditions = conditions_table(gcfg)  # config errors before the checkpoint is read
    if args.checkpoint is None:
        raise InputError("--checkpoint PATH is required (a checkpoint file or a run folder of abr.train_diffusion_abr)")
    files = resolve_checkpoints(args.checkpoint)
    if len(files) != 1:
        raise InputError(f"names {len(files)} checkpoints (an ensemble); sampling uses one generator", args.checkpoint)
    model, process, ckpt = load_generator(files[0], device)
    pre = ckpt["preprocessing"]
    run.record_inputs_valid()
    cls_idx = np.array([pre["class_names"].index(c) for c in conditions["class"]])
    cond = condition_features(conditions["age_years"].to_numpy(), conditions["intensity_db"].to_numpy(),
                              conditions["rate_per_s"].to_numpy(), pre)
    run.log(f"sampling {len(conditions)} waveforms ({gcfg['sampling_steps']} DDIM steps, guidance {gcfg['guidance_scale']})")
    clip = float(ckpt["config"]["diffusion"]["clip_x0"])
    generated = sample_waveforms(model, process, cond, cls_idx, gcfg["sampling_steps"], gcfg["guidance_scale"],
                                 clip, device, seed=int(cfg["seed"])) * pre["data_scale_uv"]
    fs_out = float(pre["source_sampling_rate_hz"])
    n_out = int(round(pre["window_ms"] * fs_out / 1000.0))
    exported = resample(generated, pre["model_rate_hz"], fs_out, n_out)
    table_path = write_table(to_clinical_table(conditions, exported, cfg["data"]["columns"]),
                             run.run_dir / "generated_abr.csv")
    data_cfg = {**cfg["data"], "sampling_rate_hz": fs_out, "window_ms": pre["window_ms"]}
    check = load_recordings(table_path, data_cfg)  # the export must read back in the clinical format
    run.log(f"wrote {table_path} ({len(check)} recordings, {exported.shape[1]} samples at {fs_out:g} Hz)")
    t_ms = np.asarray(pre["time_ms"])
    figures = series_figure(conditions, generated, t_ms, run.run_dir / "figures" / "generated_series")

    summary: dict = {"table": table_path.as_posix(), "n_generated": int(len(conditions)),
                     "notes": f"Generator trained for {ckpt['step']} optimizer steps (epoch {ckpt['epoch']}); compare "
                              "condition_mean_r and wave_v_latency_shift_ms with the real_vs_real values.",
                     "conditions": {k: gcfg[k] for k in ("classes", "intensities_db", "age_years", "rate_per_s")}}
    data_dir = args.data or Path(pre["cache"])
    if (Path(data_dir) / "abr_cache.npz").is_file():
        arrays, meta = load_cache(data_dir)
        split = {"train": 0, "val": 1, "test": 2}[gcfg["compare_split"]]
        pool = split_rows(arrays, split)
        rng = np.random.default_rng(int(cfg["seed"]))
        matched, keep = [], []
        for i, row in conditions.iterrows():
            same = pool[(arrays["class_idx"][pool] == cls_idx[i]) & (arrays["intensity_db"][pool] == row["intensity_db"])]
            if same.size:
                matched.append(int(rng.choice(same)))
                keep.append(i)
        if len(keep) >= 4:
            keep = np.array(keep)
            real = target_uv(arrays, np.array(matched), pre["target"])
            report = quality_report(generated[keep], real, conditions["intensity_db"].to_numpy()[keep],
                                    target_uv(arrays, split_rows(arrays, 0), pre["target"]), t_ms, pre["model_rate_hz"],
                                    cfg["classical"], seed=int(cfg["seed"]))
            summary["quality"] = report
            g = report["generated_vs_real"]
            summary["headline"] = {"generator_steps": int(ckpt["step"]), "n_compared": int(len(keep)),
                                   "condition_mean_r": g["condition_mean_r"], "psd_distance_db": g["psd_log_distance_db"],
                                   "wave_v_latency_shift_ms": g["wave_v_latency_shift_ms"],
                                   "real_vs_real_condition_mean_r": report["real_vs_real"].get("condition_mean_r"),
                                   "real_vs_real_wave_v_latency_shift_ms": report["real_vs_real"].get("wave_v_latency_shift_ms")}
            run.log(f"vs {len(keep)} real {gcfg['compare_split']} recordings of the same class and level: condition-mean "
                    f"r {g['condition_mean_r']:.3f}, wave V latency shift {g['wave_v_latency_shift_ms']:.3f} ms")
    summary["figures"] = [p.relative_to(run.run_dir).as_posix() for p in figures if p.suffix == ".png"]
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
