"""End to end at tiny size: preprocess → train (2 members, resume) → validate → predict (BIDS and per-PLD
synthetic subjects) → benchmark; every script's --help; every config loads and builds its model."""

import json
import math
from pathlib import Path

import pytest
import torch

from asl import benchmark_asl, predict_asl, preprocess_asl, train_asl, validate_asl
from asl.data import model_kwargs
from asl.defaults import DEFAULTS
from common.checkpoint import build_model
from common.config import load_config
from common.runlog import read_csv_rows

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs", "asl").glob("*.yaml"))


def finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


def test_preprocess_and_train(pipeline):
    root, _, pre, train = pipeline
    assert (root / "data" / "test.npz").is_file() and pre["test"]["n"] == 2
    assert (root / "data" / "synthetic_subject" / "bids" / "sub-phantom01" / "perfusion").is_dir()
    assert len(train["members"]) == 2
    for i in range(2):
        assert (root / "train" / f"member_{i}" / "checkpoint_best.pt").is_file()
    assert all(finite(v) for v in train["headline"].values())
    assert json.loads((root / "train" / "summary.json").read_text(encoding="utf-8"))["target_stats"]["cbf_std"] > 0


def test_resume_continues_the_run(pipeline):
    root, cfg, _, _ = pipeline
    out = train_asl.main([*cfg, "--output-dir", str(root / "train"), "--resume", "--set", "train.epochs=2"])
    assert [m["epochs_completed"] for m in out["members"]] == [2, 2]
    rows = read_csv_rows(root / "train" / "metrics.csv")
    # one row per member and epoch; epoch 2 continued from step 2 of the first run
    assert [(r["member"], r["epoch"], r["step"]) for r in rows] == [("0", "1", "2"), ("1", "1", "2"),
                                                                      ("0", "2", "4"), ("1", "2", "4")]
    manifest = json.loads((root / "train" / "ensemble.json").read_text(encoding="utf-8"))
    assert manifest["members"] == ["member_0/checkpoint_best.pt", "member_1/checkpoint_best.pt"]


def member_weights(run_dir: Path, member: int) -> dict:
    return torch.load(run_dir / f"member_{member}" / "checkpoint_last.pt", weights_only=True)["state_dict"]


def test_stop_mid_epoch_and_resume_matches_the_uninterrupted_run(pipeline, tmp_path):
    """2 members x 2 epochs x 3 steps; stopped in member 0 (epoch 2, 1 batch in), resumed and stopped again in
    member 1 (epoch 1, 2 batches in), resumed to the end: the same weights and losses as one uninterrupted run."""
    root, cfg, _, _ = pipeline
    args = [*cfg, "--set", "train.epochs=2", "--set", "train.steps_per_epoch=3"]
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    train_asl.main([*args, "--output-dir", str(reference)])

    first = train_asl.main([*args, "--output-dir", str(out), "--stop-after-steps", "4"])
    assert first["interrupted"] and [m["member"] for m in first["members"]] == [0]
    saved = torch.load(out / "member_0" / "checkpoint_last.pt", weights_only=True)
    assert (saved["epoch"], saved["step"], saved["extra"]["partial_epoch"]["batches_done"]) == (1, 4, 1)
    assert not (out / "summary.json").exists()
    state = json.loads((out / "run_state.json").read_text(encoding="utf-8"))
    assert state["status"] == "interrupted" and state["step"] == 4 and state["reason"] == "--stop-after-steps"

    second = train_asl.main([*args, "--output-dir", str(out), "--resume", "--stop-after-steps", "8"])
    assert second["interrupted"] and [m["interrupted"] for m in second["members"]] == [False, True]
    assert not (out / "summary.json").exists() and not (out / "member_1" / "member_summary.json").exists()
    assert json.loads((out / "run_state.json").read_text(encoding="utf-8"))["status"] == "interrupted"

    third = train_asl.main([*args, "--output-dir", str(out), "--resume"])
    assert not third["interrupted"] and [m["epochs_completed"] for m in third["members"]] == [2, 2]
    assert_same_training(reference, out, members=2, epochs=2)


@pytest.mark.parametrize("weighting", ["uncertainty", "inverse_validation_loss"])
def test_resume_restores_adaptive_task_weights(pipeline, tmp_path, weighting):
    """Learned (Kendall) and validation-driven task weights travel in the checkpoint: still an exact resume."""
    root, cfg, _, _ = pipeline
    args = [*cfg, "--set", "train.n_ensembles=1", "--set", "train.epochs=2", "--set", "train.steps_per_epoch=3",
            "--set", f"train.loss_weighting={weighting}"]
    reference, out = tmp_path / "reference", tmp_path / "stopped"
    train_asl.main([*args, "--output-dir", str(reference)])
    assert train_asl.main([*args, "--output-dir", str(out), "--stop-after-steps", "5"])["interrupted"]
    train_asl.main([*args, "--output-dir", str(out), "--resume"])
    assert_same_training(reference, out, members=1, epochs=2)
    extra = torch.load(out / "member_0" / "checkpoint_last.pt", weights_only=True)["extra"]
    assert ("uncertainty_weighting" in extra) == (weighting == "uncertainty")


def assert_same_training(reference: Path, out: Path, members: int, epochs: int) -> None:
    """Final weights equal, and one metrics row per member and epoch with the reference's losses."""
    for member in range(members):
        expected, result = member_weights(reference, member), member_weights(out, member)
        for key in expected:
            assert torch.equal(expected[key], result[key]), (member, key)
    ref_rows, new_rows = read_csv_rows(reference / "metrics.csv"), read_csv_rows(out / "metrics.csv")
    assert [(r["member"], r["epoch"]) for r in new_rows] == [
        (str(m), str(e)) for m in range(members) for e in range(1, epochs + 1)]
    for a, b in zip(ref_rows, new_rows):
        assert a["step"] == b["step"]
        for key in ("train_loss", "val_loss", "val_cbf_mae_snr5", "w_cbf", "w_att"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-6), key
    assert json.loads((out / "run_state.json").read_text(encoding="utf-8"))["status"] == "completed"
    assert (out / "summary.json").is_file()


def test_validate_predict_benchmark(pipeline, capsys):
    root, cfg, _, _ = pipeline
    val = validate_asl.main(["--checkpoint", str(root / "train"), *cfg, "--data", str(root / "data"),
                             "--output-dir", str(root / "val")])
    summary = json.loads((root / "val" / "summary.json").read_text(encoding="utf-8"))
    assert summary["n_models"] == 2 and summary["headline"] == val["headline"]
    for key in ("cbf_mae_nn_snr3", "cbf_mae_ls_nominal_snr3", "cbf_mae_ls_oracle_snr3", "att_mae_nn_snr10",
                "cbf_win_rate_vs_ls_nominal_snr3", "cbf_scaling_exponent"):
        assert finite(summary["headline"][key]), key
    assert isinstance(summary["headline"]["nn_beats_ls_nominal_cbf_mae_at_snr_le5"], bool)
    for fig in summary["figures"]:
        assert (root / "val" / fig).is_file()
    assert (root / "val" / "report.md").is_file() and (root / "val" / "metrics.csv").is_file()
    rows = [r for r in summary["metrics"] if r["method"] == "ls_oracle" and r["param"] == "cbf" and r["tissue"] == "brain"]
    assert all(0 <= r["icc"] <= 1 and finite(r["crlb_ratio"]) for r in rows)

    subject = root / "data" / "synthetic_subject"
    for layout in ("bids", "per_pld"):
        pred = predict_asl.main([str(subject / layout), "--checkpoint", str(root / "train"), *cfg,
                                 "--output-dir", str(root / f"pred_{layout}"),
                                 "--reference-cbf", str(subject / "truth_cbf.nii.gz")])
        for name in ("cbf", "att", "cbf_std", "att_std", "ls_cbf", "ls_att", "ls_cbf_std", "ls_att_std", "mask"):
            assert (root / f"pred_{layout}" / f"{name}.nii.gz").is_file()
        sidecar = json.loads((root / f"pred_{layout}" / "maps.json").read_text(encoding="utf-8"))
        assert sidecar["method"] == "both" and sidecar["network"]["n_models"] == 2 and pred["method"] == "both"
        assert finite(pred["nn_gm_wm_cbf_ratio"]) and finite(pred["ls_gm_wm_cbf_ratio"])
        assert pred["reference_cbf_mae"]["ls"] < 15  # LS on the synthetic subject recovers the truth
    import nibabel as nib

    img = nib.load(str(root / "pred_bids" / "cbf.nii.gz"))
    ref = nib.load(str(subject / "truth_cbf.nii.gz"))
    assert img.shape == ref.shape and (img.affine == ref.affine).all()  # the input's geometry

    capsys.readouterr()
    # the old command line (positional run folder, --data naming the test set file) still works, with notes
    bench = benchmark_asl.main([str(root / "train"), *cfg, "--data", str(root / "data" / "test.npz"),
                                "--output-dir", str(root / "bench")])
    notes = capsys.readouterr().err
    assert "positional checkpoints are deprecated" in notes and "--data FILE.npz is deprecated" in notes
    assert bench["n_models"] == 2
    assert all(finite(v) and v > 0 for v in bench["rates"].values())
    assert bench["agreement"]["share_abs_dcbf_below_0.1"] >= 0.9


def test_finetune_on_synthetic_subject(pipeline):
    root, cfg, _, _ = pipeline
    bids = root / "data" / "synthetic_subject" / "bids"
    out = train_asl.main([*cfg, "--output-dir", str(root / "ft"), "--set", "train.n_ensembles=1",
                          "--set", "finetune.enabled=true", "--set", f"finetune.data={bids.as_posix()}",
                          "--set", "finetune.epochs=1"])
    ft = out["members"][0]["finetune"]
    assert finite(ft["dc_before"]) and finite(ft["dc_after"]) and ft["slices"] == 1
    assert (root / "ft" / "member_0" / "checkpoint_pre_finetune.pt").is_file()


def test_bad_checkpoint_and_mismatched_test_set(pipeline, tmp_path):
    root, cfg, _, _ = pipeline
    bad = tmp_path / "x.pt"
    bad.write_bytes(b"not a checkpoint")
    with pytest.raises(Exception, match="x.pt: not a readable checkpoint"):
        validate_asl.main([str(bad), *cfg, "--output-dir", str(tmp_path / "v")])
    with pytest.raises(ValueError, match="field 'physics.plds_ms'"):
        train_asl.main([*cfg, "--output-dir", str(tmp_path / "t"), "--set", "physics.plds_ms=[500.0,1000.0]"])


@pytest.mark.parametrize("module", [preprocess_asl, train_asl, validate_asl, predict_asl, benchmark_asl])
def test_help(module, capsys):
    with pytest.raises(SystemExit) as exc:
        module.main(["--help"])
    assert exc.value.code == 0 and "--config" in capsys.readouterr().out


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_every_config_loads_and_builds(path):
    cfg = load_config(path, defaults=DEFAULTS)
    target, kwargs = model_kwargs(cfg)
    kwargs["features"] = [4] * len(kwargs["features"])  # tiny widths, same structure and flags
    model = build_model(target, kwargs).eval()
    side = 4 * 2 ** (len(kwargs["features"]) - 1) * max(kwargs["multi_scale_factors"])
    out = model(torch.zeros(1, kwargs["n_pcasl"] + kwargs["n_vsasl"], side, side))
    assert out["cbf"].shape[-1] == side


@pytest.mark.slow
def test_ddp_two_gloo_processes(pipeline, tmp_path):
    """torchrun with 2 CPU processes (gloo): sharded phantoms, exact all-reduced validation, rank-0 writes;
    --stop-after-steps mid-epoch stops both ranks (the stop is reduced over ranks), --resume finishes the run."""
    import os
    import subprocess
    import sys

    root, cfg, _, _ = pipeline
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "asl.train_asl", *cfg, "--set", "train.n_ensembles=1", "--output-dir", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    repo = Path(__file__).resolve().parents[2]
    subprocess.run([*cmd, "--stop-after-steps", "1"], check=True, env=env, cwd=repo, timeout=300)
    state = json.loads((tmp_path / "ddp" / "run_state.json").read_text(encoding="utf-8"))
    assert state["status"] == "interrupted" and state["step"] == 1
    subprocess.run([*cmd, "--resume"], check=True, env=env, cwd=repo, timeout=300)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text(encoding="utf-8"))
    assert all(finite(v) for v in summary["headline"].values())
