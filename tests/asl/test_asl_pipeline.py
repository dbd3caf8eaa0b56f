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

CONFIGS = sorted(Path(__file__).resolve().parents[2].joinpath("configs", "asl").glob("*.yaml"))
TINY = ["--set", "phantom.size=32", "--set", "data.n_val=2", "--set", "data.n_test=2", "--set", "data.synthetic_slices=1",
        "--set", "noise.eval_snrs=[3.0,10.0]", "--set", "noise.val_snrs=[5.0]", "--set", "model.features=[8,16]",
        "--set", "model.n_groups=4", "--set", "train.epochs=1", "--set", "train.steps_per_epoch=2",
        "--set", "train.batch_size=2", "--set", "train.warmup_steps=1", "--set", "train.n_ensembles=2",
        "--set", "train.target_stats_phantoms=4", "--set", "validate.linearity_k=[1.0,2.0]",
        "--set", "validate.mc_dropout_samples=2", "--set", "benchmark.n_scipy_voxels=20", "--set", "benchmark.repeats=1",
        "--device", "cpu"]


def finite(value) -> bool:
    return value is not None and math.isfinite(float(value))


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("asl")
    cfg = ["--config", "configs/asl/smoke.yaml", "--set", f"data.dir={(root / 'data').as_posix()}", *TINY]
    pre = preprocess_asl.main([*cfg, "--output-dir", str(root / "data")])
    train = train_asl.main([*cfg, "--output-dir", str(root / "train")])
    return root, cfg, pre, train


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
    rows = (root / "train" / "metrics.csv").read_text(encoding="utf-8").splitlines()
    assert sum(1 for r in rows[1:] if r.startswith("0,2,4,")) == 1  # member 0, epoch 2, step 4: continued


def test_validate_predict_benchmark(pipeline):
    root, cfg, _, _ = pipeline
    val = validate_asl.main([str(root / "train"), *cfg, "--output-dir", str(root / "val")])
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
        for name in ("cbf", "att", "cbf_std", "att_std", "ls_cbf", "ls_att", "mask"):
            assert (root / f"pred_{layout}" / f"{name}.nii.gz").is_file()
        assert finite(pred["nn_gm_wm_cbf_ratio"]) and finite(pred["ls_gm_wm_cbf_ratio"])
        assert pred["reference_cbf_mae"]["ls"] < 15  # LS on the synthetic subject recovers the truth
    import nibabel as nib

    img = nib.load(str(root / "pred_bids" / "cbf.nii.gz"))
    ref = nib.load(str(subject / "truth_cbf.nii.gz"))
    assert img.shape == ref.shape and (img.affine == ref.affine).all()  # the input's geometry

    bench = benchmark_asl.main([str(root / "train"), *cfg, "--output-dir", str(root / "bench")])
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
    """torchrun with 2 CPU processes (gloo): sharded phantoms, exact all-reduced validation, rank-0 writes."""
    import os
    import subprocess
    import sys

    root, cfg, _, _ = pipeline
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m",
           "asl.train_asl", *cfg, "--set", "train.n_ensembles=1", "--output-dir", str(tmp_path / "ddp")]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    subprocess.run(cmd, check=True, env=env, cwd=Path(__file__).resolve().parents[2], timeout=300)
    summary = json.loads((tmp_path / "ddp" / "summary.json").read_text(encoding="utf-8"))
    assert all(finite(v) for v in summary["headline"].values())
