"""End to end on a tiny synthetic cohort: preprocess → train (→ resume) → validate → benchmark →
diffusion → generate, each script's main() called as a user would; --help of every script; output that
survives a cp1252 console."""

import io
import json
import math
import re
import sys

import pytest

from abr import (
    benchmark_abr,
    benchmark_exports_abr,
    generate_abr,
    predict_abr,
    preprocess_abr,
    train_abr,
    train_diffusion_abr,
    validate_abr,
)
from common.errors import run_cli

SCRIPTS = [preprocess_abr, train_abr, validate_abr, benchmark_abr, train_diffusion_abr, generate_abr, predict_abr,
           benchmark_exports_abr]


@pytest.mark.parametrize("module", SCRIPTS, ids=lambda m: m.__name__)
def test_help_exits_cleanly(module, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    assert "--config" in capsys.readouterr().out


def finite(value) -> bool:
    return value is None or (isinstance(value, (int, float)) and math.isfinite(value))


def test_preprocess_outputs(tiny_cache):
    meta = json.loads((tiny_cache / "meta.json").read_text(encoding="utf-8"))
    assert meta["n_samples"] == 75 and meta["has_clean"]
    assert sum(meta["counts"]["series_per_split"].values()) == meta["counts"]["series"]
    assert "never a model input" in meta["fmp_note"]
    assert (tiny_cache / "summary.json").is_file() and (tiny_cache / "synthetic_abr.csv").is_file()


def test_train_validate_benchmark(trained, tiny_config, tiny_cache, tmp_path):
    run_dir, summary = trained
    assert summary["epochs_completed"] == 2
    assert (run_dir / "checkpoint_best.pt").is_file() and (run_dir / "metrics.csv").is_file()
    assert 0.2 <= summary["temperature"] <= 10.0
    val = validate_abr.main(["--config", str(tiny_config), "--checkpoint", str(run_dir), "--data", str(tiny_cache),
                             "--output-dir", str(tmp_path / "val")])
    assert all(finite(v) for v in val["headline"].values())
    assert val["headline"]["n_ears"] > 0
    for name in ("metrics.csv", "predictions_ears.csv", "predictions_recordings.csv", "summary.json"):
        assert (tmp_path / "val" / name).is_file()
    for figure in val["figures"]:
        assert (tmp_path / "val" / figure).is_file()
    bench = benchmark_abr.main(["--config", str(tiny_config), "--checkpoint", str(run_dir),
                                "--output-dir", str(tmp_path / "bench")])
    assert bench["headline"]["targets_total"] == 4 and len(bench["targets"]) == 4
    # the benchmark scores what validate (and predict) run by default: both polarity passes, the reported σ
    assert bench["headline"]["polarity_tta"] and bench["headline"]["model_passes_per_recording"] == 2
    for key in ("threshold_within_10db", "threshold_interval_coverage_95", "threshold_interval_coverage_95_model_only",
                "threshold_median_sd_db", "n_unsure"):
        assert bench["headline"][key] == pytest.approx(val["headline"][key]), key


def test_benchmark_times_the_passes_predict_runs(trained, tiny_config, tmp_path, monkeypatch):
    """Every timed model call of benchmark_abr is one predict_abr would make: with predict.polarity_tta (the
    default) each timing repeat runs the recordings and their inverses, without it one pass."""
    from abr import evaluation

    run_dir, _ = trained
    calls = []
    original = evaluation.run_model

    def counting(*args, invert_signal=False, **kwargs):
        calls.append(invert_signal)
        return original(*args, invert_signal=invert_signal, **kwargs)

    monkeypatch.setattr(evaluation, "run_model", counting)
    for tta, expected in (("true", [False, True]), ("false", [False])):
        calls.clear()
        bench = benchmark_abr.main(["--config", str(tiny_config), "--checkpoint", str(run_dir), "--output-dir",
                                    str(tmp_path / f"bench_{tta}"), "--set", f"predict.polarity_tta={tta}"])
        assert calls == expected  # timing_repeats 1 in the tiny config
        assert bench["headline"]["model_passes_per_recording"] == len(expected)
        assert math.isfinite(bench["headline"]["model_ms_per_ear"])


def test_resume_continues_where_training_stopped(trained, tiny_config, tiny_cache, tmp_path):
    run_dir, _ = trained
    import shutil

    copy = tmp_path / "resumed"
    shutil.copytree(run_dir, copy)
    summary = train_abr.main(["--config", str(tiny_config), "--data", str(tiny_cache), "--output-dir", str(copy),
                              "--resume", "--set", "train.epochs=3"])
    assert summary["epochs_completed"] == 3
    rows = (copy / "metrics.csv").read_text(encoding="utf-8").strip().splitlines()
    assert [r.split(",")[0] for r in rows[1:]] == ["1", "2", "3"]


def test_diffusion_and_generation(tiny_config, tiny_cache, tmp_path):
    diff = train_diffusion_abr.main(["--config", str(tiny_config), "--data", str(tiny_cache),
                                     "--output-dir", str(tmp_path / "diff")])
    assert math.isfinite(diff["best_val_loss_ema"])
    assert all(finite(v) for v in diff["quality_summary"].values())
    gen = generate_abr.main(["--config", str(tiny_config), "--checkpoint", str(tmp_path / "diff"),
                             "--output-dir", str(tmp_path / "gen")])
    assert gen["n_generated"] == 8
    table = (tmp_path / "gen" / "generated_abr.csv").read_text(encoding="utf-8-sig")
    assert "SNİK" in table and table.splitlines()[0].startswith("Patient_ID")


def test_bad_inputs_give_one_line_errors(tiny_config, tiny_cache, tmp_path, capsys):
    def error_line(module, argv) -> str:
        assert run_cli(module.main, argv) == 2
        return capsys.readouterr().err.strip().splitlines()[0]

    bad = tmp_path / "bad.csv"
    bad.write_text("Patient_ID,Age\nP1,3\n", encoding="utf-8")
    line = error_line(preprocess_abr, ["--config", str(tiny_config), "--table", str(bad), "--output-dir",
                                       str(tmp_path / "p")])
    assert line.startswith(f"error: {bad}") and "column 'Intensity' (data.columns.intensity) not found" in line
    with pytest.raises(SystemExit, match="unknown config key 'model.chanels'"):
        train_abr.main(["--config", str(tiny_config), "--data", str(tiny_cache), "--set", "model.chanels=4",
                        "--output-dir", str(tmp_path / "t")])
    line = error_line(train_abr, ["--config", str(tiny_config), "--data", str(tiny_cache), "--set",
                                  "model.latency_range_ms.V=[6.0,9.0]", "--output-dir", str(tmp_path / "t2")])
    assert re.search(r"latency_range_ms.V=\[6.0, 9.0\] does not cover", line)
    line = error_line(train_abr, ["--config", str(tiny_config), "--data", str(tmp_path), "--output-dir",
                                  str(tmp_path / "t3")])
    assert line.startswith(f"error: {tmp_path}") and "run abr/preprocess_abr.py first" in line
    assert not (tmp_path / "t3" / "config.yaml").exists()  # a run refused for its inputs records no config


def test_turkish_class_names_survive_a_cp1252_console(trained, tiny_config, tiny_cache, tmp_path, monkeypatch):
    run_dir, _ = trained
    buffer = io.BytesIO()
    console = io.TextIOWrapper(buffer, encoding="cp1252", errors="strict")  # a Windows console
    monkeypatch.setattr(sys, "stdout", console)
    preprocess_abr.main(["--config", str(tiny_config), "--output-dir", str(tmp_path / "pp"),
                         "--set", "synthetic.n_patients=4"])
    console.flush()
    text = buffer.getvalue().decode("cp1252")
    assert "ears per class" in text and "\\u0130" in text  # İ escaped, not a crash


@pytest.mark.slow
def test_ddp_two_cpu_processes(tiny_config, tiny_cache, tmp_path):
    """torchrun with 2 gloo processes trains and writes one set of outputs (rank 0)."""
    import subprocess

    for module, out in (("abr.train_abr", "ddp"), ("abr.train_diffusion_abr", "ddp_diffusion")):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "-m", module, "--config",
               str(tiny_config), "--data", str(tiny_cache), "--output-dir", str(tmp_path / out),
               "--set", "train.balanced_sampling=true", "--set", "loss.dynamic_class_weights=true"]
        result = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert result.returncode == 0, result.stderr[-2000:]
        summary = json.loads((tmp_path / out / "summary.json").read_text(encoding="utf-8"))
        assert summary["epochs_completed"] >= 1


def test_threshold_sd_scale_is_fitted_on_val_and_unsure_ears_widened(trained, tiny_config, tiny_cache, tmp_path):
    """train_abr stores the σ scale fitted on the val ears; validate reports scale · σ for sure ears and
    sqrt((scale · σ)² + (model − classical)²) for unsure ones (predict.widen_unsure_sd)."""
    import csv

    from common.checkpoint import load_checkpoint

    run_dir, summary = trained
    stored = load_checkpoint(run_dir / "checkpoint_best.pt", expected_domain="abr")["extra"]["threshold_sd_scale"]
    assert stored["n_val_ears"] > 0 and stored["scale"] == pytest.approx(summary["threshold_sd_scale"])
    common = ["--config", str(tiny_config), "--checkpoint", str(run_dir), "--data", str(tiny_cache),
              "--set", "classical.criterion=0.5", "--set", "validate.figure_ears=0"]
    # every ear unsure (outlier probability above 0), so the widening shows on each ear
    widened = validate_abr.main(common + ["--output-dir", str(tmp_path / "w"), "--set", "predict.unsure_outlier_prob=0"])
    plain = validate_abr.main(common + ["--output-dir", str(tmp_path / "p"), "--set", "predict.unsure_outlier_prob=0",
                                        "--set", "predict.widen_unsure_sd=false"])
    assert widened["headline"]["threshold_sd_scale"] == pytest.approx(stored["scale"])

    def ears(folder):
        with (folder / "predictions_ears.csv").open(encoding="utf-8") as handle:
            return list(csv.DictReader(handle))

    for w, p in zip(ears(tmp_path / "w"), ears(tmp_path / "p")):
        assert w["unsure"] == "True"
        gap = float(w["threshold_model_db"]) - float(w["threshold_classical_db"])
        assert float(w["threshold_model_sd_db"]) == pytest.approx(math.hypot(float(p["threshold_model_sd_db"]), gap),
                                                                  abs=0.02)
    assert widened["headline"]["threshold_median_sd_db"] >= plain["headline"]["threshold_median_sd_db"]
    assert plain["headline"]["threshold_interval_coverage_95"] == pytest.approx(
        plain["model"]["threshold_interval_scaled"]["coverage_95"])


def test_train_without_validation_keeps_the_last_epoch(tiny_config, tmp_path):
    """A cohort with every ear in train: refused unless train.validation is false, then trained on all ears,
    the last epoch kept as checkpoint_best.pt, no temperature or σ scale fitted."""
    from common.checkpoint import load_checkpoint
    from common.errors import InputError

    data = tmp_path / "all_train"
    preprocess_abr.main(["--config", str(tiny_config), "--output-dir", str(data), "--set", "preprocess.split=[1,0,0]"])
    with pytest.raises(InputError, match="train.validation: false"):
        train_abr.main(["--config", str(tiny_config), "--data", str(data), "--output-dir", str(tmp_path / "refused")])
    out = tmp_path / "run"
    summary = train_abr.main(["--config", str(tiny_config), "--data", str(data), "--output-dir", str(out),
                              "--set", "train.validation=false"])
    meta = json.loads((data / "meta.json").read_text(encoding="utf-8"))
    assert summary["validation"] is False and summary["best_epoch"] == summary["epochs_completed"] == 2
    best = load_checkpoint(out / "checkpoint_best.pt", expected_domain="abr")
    last = load_checkpoint(out / "checkpoint_last.pt", expected_domain="abr")
    assert best["epoch"] == last["epoch"] == 2
    assert all(best["state_dict"][k].equal(last["state_dict"][k]) for k in best["state_dict"])
    assert "threshold_sd_scale" not in (best.get("extra") or {})
    log = (out / "log.txt").read_text(encoding="utf-8")
    assert f"{meta['counts']['series']} train / 0 val ears" in log and "without validation" in log
