"""Every script: --help, and the pipeline end to end on tiny synthetic patients."""

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml

SCRIPTS = ["vmat.phantom", "vmat.preprocess_vmat", "vmat.train_vmat", "vmat.predict_vmat", "vmat.validate_vmat",
           "vmat.benchmark_vmat"]


@pytest.mark.parametrize("module", SCRIPTS)
def test_help(module, capsys):
    import importlib

    with pytest.raises(SystemExit) as info:
        importlib.import_module(module).main(["--help"])
    assert info.value.code == 0
    assert "usage" in capsys.readouterr().out


TINY_TRAIN = {
    "patch": {"size": [8, 16, 16], "per_case_per_epoch": 2},
    "augment": {"rotate_deg": 3.0},
    "model": {"channels": [4, 8], "groups": 2},
    "train": {"epochs": 1, "batch_size": 2, "lr": 1e-3, "ema_decay": 0.9},
    "val": {"gamma_subset": 200, "inference": {"window_zyx": [24, 32, 32], "tta_flip": False}},
    "gamma": {"interp_fraction": 5},  # training validation uses the gamma section, as validate_vmat does
    "dvh": {"sample_mm": 4.0},  # coarse sub-voxel DVH samples: the tiny patients have 10-12 mm voxels
}


def _finite(values):
    return all(isinstance(v, (int, float)) and math.isfinite(v) for v in values)


@pytest.fixture(scope="module")
def trained(tiny_npz, tmp_path_factory):
    from vmat.train_vmat import main

    root = tmp_path_factory.mktemp("vmat_train")
    config = root / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY_TRAIN), encoding="utf-8")
    summary = main(["--config", str(config), "--data", str(tiny_npz), "--output-dir", str(root / "run")])
    return root, config, summary


def test_train_writes_checkpoints_and_resumes(trained, tiny_npz):
    from vmat.train_vmat import main

    root, config, summary = trained
    run = root / "run"
    assert summary["epochs_completed"] == 1
    assert _finite([summary["val"][k] for k in ("val_mae_body_gy", "val_gamma_3_3_pass_pct", "val_gamma_2_2_pass_pct",
                                                "val_openkbp_dose_score", "val_openkbp_dvh_score")])
    assert {"checkpoint_last.pt", "checkpoint_best.pt", "atlas.json", "metrics.csv", "summary.json"} <= {p.name for p in run.iterdir()}
    assert math.isfinite(summary["headline"]["atlas_val_mae_body_gy"])
    assert math.isfinite(summary["headline"]["atlas_val_openkbp_dvh_score"])
    resumed = main(["--config", str(config), "--data", str(tiny_npz), "--output-dir", str(run), "--resume",
                    "--set", "train.epochs=2"])
    assert resumed["epochs_completed"] == 2
    from common.checkpoint import load_checkpoint

    ckpt = load_checkpoint(run / "checkpoint_last.pt", expected_domain="vmat")
    assert ckpt["epoch"] == 2 and ckpt["step"] == 4  # 2 training cases x 2 patches / batch 2, twice
    assert ckpt["extra"]["ema"]["num_updates"] == ckpt["step"]  # EMA state survived the resume
    assert ckpt["preprocessing"]["input_spec"]["structure_names"][0] == "PTV70"


@pytest.mark.parametrize("kind, extra", [("cascade", {}), ("diffusion", {"diffusion_steps": 20, "sampling_steps": 2})])
def test_other_model_types_train(kind, extra, tiny_npz, tmp_path):
    from vmat.train_vmat import main

    cfg = json.loads(json.dumps(TINY_TRAIN))
    cfg["model"].update({"type": kind, **extra})
    cfg["val"]["inference"]["diffusion_samples"] = 1
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    summary = main(["--config", str(config), "--data", str(tiny_npz), "--output-dir", str(tmp_path / "run")])
    assert _finite([summary["val"]["val_mae_body_gy"], summary["val"]["val_gamma_3_3_pass_pct"]])


def test_predict_validate_export(trained, tiny_npz, tmp_path):
    from vmat.predict_vmat import main as predict
    from vmat.validate_vmat import main as validate

    root, _, _ = trained
    pred = tmp_path / "pred"
    out = predict(["--checkpoint", str(root / "run"), "--data", str(tiny_npz), "--output-dir", str(pred),
                   "--set", "inference.window_zyx=[24,32,32]", "--export-rtdose"])
    assert out["n_cases"] == 3 and out["outputs_per_case"] == 2  # flip TTA on by default
    assert len(list((pred / "rtdose").glob("*_predicted_RD.dcm"))) == 3
    summary = validate(["--config", "configs/vmat/validate_smoke.yaml", "--set", "dvh.sample_mm=4.0", "--data", str(tiny_npz), "--predictions", str(pred),
                        "--atlas", str(root / "run" / "atlas.json"), "--output-dir", str(tmp_path / "val")])
    headline = summary["headline"]
    assert _finite([headline["mae_body_gy"], headline["gamma_3%/3mm_pass_pct"], headline["atlas_mae_body_gy"],
                    headline["openkbp_dose_score"], headline["openkbp_dvh_score"]])
    assert (tmp_path / "val" / "report.md").is_file() and (tmp_path / "val" / "metrics.csv").is_file()
    assert all((tmp_path / "val" / f).is_file() for f in summary["figures"])
    # the same model through --checkpoint (predicts on the fly), with RTDOSE export
    direct = validate(["--config", "configs/vmat/validate_smoke.yaml", "--set", "dvh.sample_mm=4.0", "--data", str(tiny_npz), "--checkpoint",
                       str(root / "run"), "--set", "inference.window_zyx=[24,32,32]", "--export-rtdose",
                       "--set", "figures.n_cases=0", "--cases", "synth_000", "--output-dir", str(tmp_path / "val2")])
    first = [r for r in _rows(tmp_path / "val" / "metrics.csv") if r["case"] == "synth_000"][0]
    assert direct["overall"]["mae_body_gy"] == pytest.approx(float(first["mae_body_gy"]), rel=1e-4)
    assert len(list((tmp_path / "val2" / "rtdose").glob("*.dcm"))) == 1


def _rows(path):
    import csv

    with open(path, encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_validate_bad_predictions(tiny_npz, tmp_path):
    from common.runlog import save_npz_atomic
    from vmat.case_io import CaseFileError
    from vmat.validate_vmat import main as validate

    pred = tmp_path / "pred"
    pred.mkdir()
    with pytest.raises(CaseFileError, match="no prediction for case"):
        validate(["--data", str(tiny_npz), "--predictions", str(pred), "--output-dir", str(tmp_path / "v1")])
    for path in sorted(tiny_npz.glob("*.npz")):
        save_npz_atomic(pred / path.name, dose=np.zeros((2, 2, 2), np.float32))
    with pytest.raises(CaseFileError, match="key 'dose' has shape"):
        validate(["--data", str(tiny_npz), "--predictions", str(pred), "--output-dir", str(tmp_path / "v2")])


def test_phantom_and_benchmark_mains(tmp_path, tiny_npz):
    from vmat.benchmark_vmat import main as bench
    from vmat.phantom import main as phantom

    out = phantom(["--output-dir", str(tmp_path / "raw"), "--n-cases", "1", "--set", "phantom.ct.shape_zyx=[16,24,24]",
                   "--set", "phantom.ct.spacing_zyx_mm=[12.0,16.0,16.0]", "--set", "phantom.dose_grid.spacing_zyx_mm=[10.0,12.0,12.0]",
                   "--set", "phantom.plan.beams_per_arc=4"])
    truth = json.loads((tmp_path / "raw" / "synth_000" / "ground_truth.json").read_text(encoding="utf-8"))
    assert out["n_cases"] == 1 and truth["prescription_gy"] == 70.0
    summary = bench(["--data", str(tiny_npz), "--output-dir", str(tmp_path / "bench"), "--set", "benchmark.gamma.interp_fraction=3",
                     "--set", "benchmark.preprocess.enabled=false", "--set", "benchmark.throughput.patch_sizes=[[8,8,8]]",
                     "--set", "benchmark.throughput.steps=1"])
    head = summary["headline"]
    assert _finite([head["gamma_speedup_vs_pymedphys"], head["gamma_pass_pct_difference"]])
    crit = summary["gamma"]["criteria"]
    assert [c["criterion"] for c in crit] == ["3%/3mm global", "2%/2mm local"] and crit[1]["n_points"] > 0
    assert len(summary["gamma"]["load_average_before"]) == 3 and summary["gamma"]["cpu_threads"] == 1
    assert all(c["torch_cpu_s"] > 0 and c["cpu_speedup"] > 0 for c in crit)
    assert head["gamma_speedup_vs_pymedphys"] == min(c["speedup"] for c in crit)  # the worst ratio of the run
    assert summary["throughput"][0]["patches_per_s"] > 0


@pytest.mark.slow
def test_ddp_two_processes_gloo(tiny_npz, tmp_path):
    """torchrun with two CPU processes (gloo): stops mid-epoch on both ranks, resumes, rank 0 writes the
    checkpoints and summary."""
    import subprocess
    import sys
    from pathlib import Path

    config = tmp_path / "ddp.yaml"
    cfg = json.loads(json.dumps(TINY_TRAIN))
    cfg["train"]["batch_size"] = 1
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    script = Path(__file__).resolve().parents[2] / "vmat" / "train_vmat.py"
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", str(script),
               "--config", str(config), "--data", str(tiny_npz), "--output-dir", str(tmp_path / "run")]
    # 2 patches per rank and batch 1: a stop after step 1 is mid-epoch; both ranks must stop there together
    stopped = subprocess.run(command + ["--stop-after-steps", "1"], capture_output=True, text=True, timeout=600)
    assert stopped.returncode == 0, stopped.stderr[-2000:]
    state = json.loads((tmp_path / "run" / "run_state.json").read_text(encoding="utf-8"))
    assert state["status"] == "interrupted" and state["step"] == 1
    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr[-2000:]
    summary = json.loads((tmp_path / "run" / "summary.json").read_text(encoding="utf-8"))
    assert summary["epochs_completed"] == 1 and math.isfinite(summary["val"]["val_mae_body_gy"])


def test_unknown_best_metric_is_refused_before_training(tiny_npz, tmp_path, capsys):
    from common.errors import run_cli
    from vmat.train_vmat import main

    code = run_cli(main, ["--data", str(tiny_npz), "--output-dir", str(tmp_path / "run"), "--set", "val.best_metric=val_mae"])
    assert code == 2
    line = [x for x in capsys.readouterr().err.splitlines() if x.startswith("error:")][0]
    assert "'val.best_metric'" in line and "val_mae_body_gy" in line and "val_gamma_3_3_pass_pct" in line
    assert "train_loss" in line and "'val_mae'" in line
    assert not list((tmp_path / "run").glob("checkpoint_*.pt")) and not (tmp_path / "run" / "config.yaml").exists()


def test_checkpoint_accepts_an_ensemble_folder(trained, tiny_npz, tmp_path):
    from common.checkpoint import write_ensemble_manifest
    from vmat.predict_vmat import main as predict

    run = trained[0] / "run"
    write_ensemble_manifest(run, [run / "checkpoint_best.pt", run / "checkpoint_last.pt"])
    try:
        out = predict(["--checkpoint", str(run), "--data", str(tiny_npz), "--output-dir", str(tmp_path / "pred"),
                       "--cases", "synth_000", "--set", "inference.window_zyx=[24,32,32]", "--set", "inference.tta_flip=false"])
    finally:
        (run / "ensemble.json").unlink()
    assert out["n_members"] == 2 and out["outputs_per_case"] == 2
    assert (tmp_path / "pred" / "synth_000.npz").is_file()


@pytest.mark.parametrize("name", sorted(p.name for p in Path("configs/vmat").glob("*.yaml")))
def test_every_config_loads_against_the_one_vmat_schema(name):
    from common.config import load_config
    from vmat.defaults import VMAT_DEFAULTS

    assert set(load_config(Path("configs/vmat") / name, defaults=VMAT_DEFAULTS)) == set(VMAT_DEFAULTS)


def test_a_typo_in_a_section_another_script_reads_is_an_error(tiny_npz, tmp_path):
    from vmat.train_vmat import main

    config = tmp_path / "typo.yaml"
    config.write_text(yaml.safe_dump({"preprocess": {"sanity": {"enforced": False}}}), encoding="utf-8")
    with pytest.raises(SystemExit, match=r"unknown config key 'preprocess.sanity.enforced'.*enforce"):
        main(["--config", str(config), "--data", str(tiny_npz), "--output-dir", str(tmp_path / "run")])


def test_training_validation_uses_validate_vmat_names(trained):
    """metrics.csv of training carries validate_vmat's overall names prefixed val_; old best-metric names
    are translated once, with a notice; a gamma best metric without gamma is refused."""
    import csv

    from common.config import ConfigError
    from vmat.defaults import defaults
    from vmat.evaluation import VAL_METRIC_KEYS, gamma_metric_keys
    from vmat.train_vmat import check_training_config

    root, _, _ = trained
    header = next(csv.reader((root / "run" / "metrics.csv").open(encoding="utf-8")))
    val_columns = {c for c in header if c.startswith("val_")}
    cfg = defaults()
    assert val_columns == {f"val_{k}" for k in [*VAL_METRIC_KEYS, *gamma_metric_keys(cfg["gamma"]["criteria"])]}
    cfg["val"]["best_metric"] = "val_mae_gy"
    check_training_config(cfg)
    assert cfg["val"]["best_metric"] == "val_mae_body_gy"
    cfg["val"].update({"gamma_subset": 0, "best_metric": "val_gamma_3_3_pass_pct"})
    with pytest.raises(ConfigError, match="no gamma"):
        check_training_config(cfg)
