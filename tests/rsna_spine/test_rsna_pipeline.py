"""Kaggle-layout round trip: synthetic dataset → preprocess → train (both stages, a few steps) → resume →
validate → predict → a submission the official metric accepts; every script's main() and --help."""

import json

import numpy as np
import pandas as pd
import pytest

from rsna_spine import benchmark_rsna, predict_rsna, preprocess_rsna, train_rsna, validate_rsna
from rsna_spine.metric import score

TINY_RUN = ["localizer.epochs=1", "localizer.grid_sagittal=[9,32,32]", "localizer.grid_axial=[24,24]",
            "localizer.channels=[4,8,8]", "train.epochs=2", "train.max_steps_per_epoch=2", "train.batch_size=4",
            "train.swa.start_epoch=2", "crop.img_size=24", "crop.num_slices=3", "model.tiny_channels=[4,8,8]",
            "model.gru_hidden=8", "model.attention_hidden=8", "model.level_dim=4", "model.condition_dim=4",
            "model.head_hidden=8", "predict.batch_size=8", "validate.n_example_studies=1"]


def _args(dataset, out, extra=()):
    args = ["--config", "configs/rsna_spine/smoke.yaml", "--output-dir", str(out),
            "--set", f"paths.data_root={dataset['root'].as_posix()}",
            "--set", f"paths.cache_dir={dataset['cache'].as_posix()}"]
    for item in [*TINY_RUN, *extra]:
        args += ["--set", item]
    return args


def test_round_trip(tiny_dataset):
    work = tiny_dataset["work"]
    pre = tiny_dataset["summary"]
    assert pre["n_series_usable"] > 10 and pre["n_series_failed"] >= 1  # the corrupt study has no images
    train = train_rsna.main(_args(tiny_dataset, work / "train"))
    manifest = json.loads((work / "train" / "ensemble.json").read_text())
    assert manifest["format"] == "imaging-pipelines-ensemble"
    assert {m["series_key"] for m in manifest["models"] if m["stage"] == "localizer"} == {"sag_t1", "sag_t2", "axial_t2"}
    assert [m["checkpoint"] for m in manifest["models"] if m["stage"] == "classifier"] == [
        "fold0/classifier_all/checkpoint_best.pt"]
    assert manifest["members"] == [m["checkpoint"] for m in manifest["models"]]
    job_dir = work / "train" / "fold0" / "classifier_all"
    assert all((job_dir / f"checkpoint_{kind}.pt").is_file() for kind in ("best", "last", "swa"))
    assert np.isfinite(train["jobs"]["fold0/classifier_all"]["swa_val_official"])
    assert not (work / "train" / "models.json").exists()

    # resume: pretend the run stopped after epoch 2 of the classifier, then continue to epoch 3
    (work / "train" / "fold0" / "classifier_all" / "done.json").unlink()
    train_rsna.main(_args(tiny_dataset, work / "train", ["train.epochs=3"]) + ["--resume"])
    rows = pd.read_csv(work / "train" / "metrics.csv")
    assert rows.loc[rows["job"] == "fold0/classifier_all", "epoch"].tolist() == [1, 2, 3]
    assert (rows["job"] == "fold0/localizer_sag_t2").sum() == 1  # not retrained

    val = validate_rsna.main(_args(tiny_dataset, work / "validate") + ["--checkpoint", str(work / "train")])
    head = val["headline"]
    assert all(np.isfinite(head[k]) for k in ("oof_official_score", "class_prior_baseline", "margin_vs_prior"))
    assert (work / "validate" / "oof_predictions.csv").is_file() and len(val["figures"]) == 4
    assert all((work / "validate" / f).is_file() for f in val["figures"])
    assert (work / "validate" / "temperatures.json").is_file() and "cross_fitted" in val["calibration"]

    root = tiny_dataset["root"]
    pred = predict_rsna.main(_args(tiny_dataset, work / "predict") + [  # the deprecated flag still works
        "--train-dir", str(work / "train"), "--data-root", str(root),
        "--solution", str(root / "solution" / "test_solution.csv")])
    sub = pd.read_csv(work / "predict" / "submission.csv")
    studies = pd.read_csv(root / "sample_submission.csv")["row_id"].str.split("_").str[0].unique()
    assert len(sub) == 25 * len(studies) == pred["n_rows"] and sub["row_id"].is_unique
    np.testing.assert_allclose(sub[["normal_mild", "moderate", "severe"]].sum(axis=1), 1.0, atol=1e-9)
    assert pred["n_prior_rows"] >= 10  # the test study without Sagittal T1 gets priors for its foramina
    truth = pd.read_csv(root / "solution" / "test_solution.csv")
    assert np.isfinite(score(truth, sub, "row_id", 1.0, mode="normalized"))
    assert pred["levels_without_axial_slice"] >= 0 and "official_mode_score" in pred
    assert pred["headline"]["test_official_score"] == pytest.approx(score(truth, sub, "row_id", 1.0, mode="normalized"))
    assert not (work / "predict" / "test_cache").exists()

    bench = benchmark_rsna.main(_args(tiny_dataset, work / "bench", [
        "benchmark.n_series=2", "benchmark.n_samples=4", "benchmark.decode_workers=[1]",
        "benchmark.real_size.sizes=[64]", "benchmark.real_size.n_slices=7", "benchmark.real_size.n_samples=2"])
        + ["--validate-dir", str(work / "validate")])
    assert bench["samples_per_s_dicom"] > 0 and bench["speedup_cached_vs_dicom"] > 0
    assert [(r["size_px"], r["syntax"]) for r in bench["real_size"]] == [(64, "explicit"), (64, "jpeg2000")]
    assert all(r["max_abs_difference"] == 0 and r["cache_ratio"] < 1 for r in bench["real_size"])
    # measured epochs through the training DataLoader (smoke: runtime.num_workers = 0), both sources
    for r in bench["real_size"]:
        assert r["epoch_samples"] == 2 and r["epoch_s_disk_w0"] > 0 and r["epoch_s_dicom_w0"] > 0
        assert r["full_set_epoch_min_disk_w0"] == pytest.approx(49375 / r["epoch_samples_per_s_disk_w0"] / 60)
    assert (work / "bench" / "real_size.csv").is_file()
    assert bench["max_abs_difference_cache_vs_dicom"] < 1e-5
    assert bench["margin_vs_prior"] == pytest.approx(head["margin_vs_prior"], rel=1e-9)


@pytest.mark.parametrize("module", [preprocess_rsna, train_rsna, validate_rsna, predict_rsna, benchmark_rsna])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0
    assert "usage" in capsys.readouterr().out


@pytest.mark.slow
def test_torchrun_ddp_two_gloo_processes(tiny_dataset):
    """train_rsna.py under torchrun with 2 CPU processes (gloo): every model trains and is saved once."""
    import subprocess
    import sys

    out = tiny_dataset["work"] / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29541",
           "-m", "rsna_spine.train_rsna", *_args(tiny_dataset, out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    manifest = json.loads((out / "ensemble.json").read_text())
    assert {m["series_key"] for m in manifest["models"] if m["stage"] == "localizer"} == {"sag_t1", "sag_t2", "axial_t2"}
    assert (out / "fold0" / "classifier_all" / "checkpoint_swa.pt").is_file()
    assert "DDP rank 0/2" in (out / "log.txt").read_text()
