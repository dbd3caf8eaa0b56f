import json
import os

import pytest
import torch

from common.runlog import read_csv_rows

import common.demo as demo
from common.checkpoint import (FORMAT_VERSION, CheckpointError, atomic_torch_save, build_model, clean_state_dict,
                               load_checkpoint, load_model, restore_training_state, save_checkpoint)

TARGET = "common.demo.TinyRegressor"
KWARGS = {"n_features": 4, "hidden": [8], "dropout": 0.0}


def small_model():
    torch.manual_seed(0)
    return build_model(TARGET, KWARGS)


def test_round_trip_rebuilds_identical_model_with_weights_only(tmp_path):
    model = small_model()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    model(torch.randn(3, 4)).sum().backward()
    optimizer.step()
    path = save_checkpoint(tmp_path / "checkpoint_last.pt", model, domain="common", config={"a": 1},
                           optimizer=optimizer, epoch=3, step=30, best_metric=0.5, best_metric_name="val",
                           preprocessing={"mean": [0.0, 1.0]})
    raw = torch.load(path, weights_only=True)  # plain types and tensors only
    assert raw["model"] == {"target": TARGET, "kwargs": KWARGS}
    assert raw["format_version"] == FORMAT_VERSION and raw["epoch"] == 3 and raw["preprocessing"]["mean"] == [0.0, 1.0]
    rebuilt, ckpt = load_model(tmp_path, expected_domain="common")  # a run folder works too
    x = torch.randn(5, 4)
    assert torch.equal(rebuilt(x), model.eval()(x))
    assert type(rebuilt).__name__ == "TinyRegressor" and not rebuilt.training
    # full training state comes back
    fresh = small_model()
    fresh_opt = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    state = restore_training_state(ckpt, fresh, fresh_opt)
    assert state == {"epoch": 3, "step": 30, "best_metric": 0.5}
    assert fresh_opt.state_dict()["state"][0]["step"] == optimizer.state_dict()["state"][0]["step"]


def test_state_dict_is_unwrapped_from_ddp_and_compile_prefixes():
    sd = {"module._orig_mod.net.0.weight": torch.ones(1), "net.0.bias": torch.zeros(1)}
    assert set(clean_state_dict(sd)) == {"net.0.weight", "net.0.bias"}


def test_clear_errors(tmp_path):
    junk = tmp_path / "junk.pt"
    junk.write_bytes(b"not a checkpoint")
    with pytest.raises(CheckpointError, match="junk.pt: not a readable checkpoint"):
        load_checkpoint(junk)
    foreign = tmp_path / "foreign.pt"
    torch.save({"state_dict": {}}, foreign)
    with pytest.raises(CheckpointError, match="not a checkpoint of this project"):
        load_checkpoint(foreign)
    model = small_model()
    path = save_checkpoint(tmp_path / "c.pt", model, domain="asl")
    with pytest.raises(CheckpointError, match="field 'domain' is 'asl', but a 'vmat' checkpoint is needed"):
        load_checkpoint(path, expected_domain="vmat")
    ckpt = torch.load(path, weights_only=True)
    ckpt["format_version"] = FORMAT_VERSION + 1
    torch.save(ckpt, tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="format version"):
        load_checkpoint(tmp_path / "future.pt")
    with pytest.raises(CheckpointError, match="neither checkpoint_best.pt nor checkpoint_last.pt"):
        load_checkpoint(tmp_path / "empty_dir_that_exists" if (tmp_path / "empty_dir_that_exists").mkdir() is None else "")
    with pytest.raises(CheckpointError, match="outside this project"):
        build_model("os.path.join", {})
    with pytest.raises(TypeError, match="not plain data"):
        build_model(TARGET, {**KWARGS, "hidden": torch.tensor([8])})


def test_interrupted_save_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint_last.pt"
    atomic_torch_save({"version": 1}, path)

    def crash(obj, handle, *args, **kwargs):
        handle.write(b"partial bytes")
        raise KeyboardInterrupt  # e.g. Ctrl+C or a power cut in the middle of writing

    monkeypatch.setattr(torch, "save", crash)
    with pytest.raises(KeyboardInterrupt):
        atomic_torch_save({"version": 2}, path)
    monkeypatch.undo()
    assert torch.load(path, weights_only=True) == {"version": 1}
    assert [p.name for p in tmp_path.iterdir()] == ["checkpoint_last.pt"]  # no temp file left


def final_weights(run_dir):
    return torch.load(run_dir / "checkpoint_last.pt", weights_only=True)["state_dict"]


SMALL = ["--config", "configs/common/demo.yaml", "--device", "cpu", "--set", "data.n_train=256",
         "--set", "data.n_val=64", "--set", "train.epochs=4", "--set", "model.dropout=0.2"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    out = tmp_path_factory.mktemp("full")
    summary = demo.main(SMALL + ["--output-dir", str(out)])
    return out, summary


def test_demo_end_to_end_beats_baseline(uninterrupted):
    out, summary = uninterrupted
    assert summary["epochs_completed"] == 4 and not summary["interrupted"]
    assert summary["val"]["mae"] < summary["baseline_mean_predictor"]["mae"]
    for name in ("config.yaml", "env.json", "log.txt", "metrics.csv", "summary.json", "checkpoint_best.pt",
                 "figures/training_curves.png"):
        assert (out / name).is_file(), name


def test_resume_after_ctrl_c_mid_epoch_matches_uninterrupted_run(uninterrupted, tmp_path):
    out, _ = uninterrupted
    resumed = tmp_path / "resumed"
    steps_per_epoch = 256 // 32
    stop_at = 2 * steps_per_epoch + 3  # 3 batches into epoch 3
    first = demo.main(SMALL + ["--output-dir", str(resumed), "--stop-after-steps", str(stop_at)])
    assert first["interrupted"] and first["epochs_completed"] == 2
    saved = torch.load(resumed / "checkpoint_last.pt", weights_only=True)
    assert saved["epoch"] == 2 and saved["step"] == stop_at
    assert saved["extra"]["partial_epoch"]["batches_done"] == 3
    assert not (resumed / "summary.json").exists()  # an interrupted run never looks complete
    state = json.loads((resumed / "run_state.json").read_text(encoding="utf-8"))
    assert state["status"] == "interrupted" and state["step"] == stop_at and state["reason"] == "--stop-after-steps"
    assert not (resumed / "run.lock").exists()
    second = demo.main(SMALL + ["--output-dir", str(resumed), "--resume"])
    assert second["epochs_completed"] == 4
    reference, result = final_weights(out), final_weights(resumed)
    for key in reference:
        assert torch.equal(reference[key], result[key]), key
    # the same per-epoch losses as the uninterrupted run, one row per epoch
    ref_rows = read_csv_rows(out / "metrics.csv")
    new_rows = read_csv_rows(resumed / "metrics.csv")
    assert [r["epoch"] for r in new_rows] == ["1", "2", "3", "4"]
    for a, b in zip(ref_rows, new_rows):
        assert float(a["train_loss"]) == pytest.approx(float(b["train_loss"]), rel=1e-6)
        assert float(a["val_mse"]) == pytest.approx(float(b["val_mse"]), rel=1e-6)
    assert json.loads((resumed / "run_state.json").read_text(encoding="utf-8"))["status"] == "completed"


def test_fresh_run_in_a_used_folder_starts_a_new_metrics_file(uninterrupted, tmp_path):
    out = tmp_path / "reused"
    demo.main(SMALL + ["--output-dir", str(out), "--set", "train.epochs=2"])
    demo.main(SMALL + ["--output-dir", str(out), "--set", "train.epochs=1"])
    assert len((out / "metrics.csv").read_text(encoding="utf-8").splitlines()) == 2  # header + 1 epoch


def test_resume_without_checkpoint_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="checkpoint_last.pt does not exist"):
        demo.main(SMALL + ["--output-dir", str(tmp_path), "--resume"])
    assert os.path.isdir(tmp_path)


def test_resume_finds_the_newest_ensemble_member(tmp_path):
    from common.cli import _find_resume_checkpoint, run_checkpoint, run_root

    run = tmp_path / "run"
    assert run_checkpoint(run) is None
    for member, mtime in [(0, 1_000_000), (1, 2_000_000)]:
        path = run / f"member_{member}" / "checkpoint_last.pt"
        path.parent.mkdir(parents=True)
        path.write_bytes(b"x")
        os.utime(path, (mtime, mtime))
    newest = run / "member_1" / "checkpoint_last.pt"
    assert _find_resume_checkpoint(str(run), "asl", "smoke", None) == newest
    assert _find_resume_checkpoint("auto", "asl", "smoke", run) == newest
    assert run_root(newest) == run  # the run folder, not the member's
    (run / "checkpoint_last.pt").write_bytes(b"x")  # a single-model run's own checkpoint wins
    assert run_checkpoint(run) == run / "checkpoint_last.pt" and run_root(run / "checkpoint_last.pt") == run


def test_git_sha_in_a_worktree_reads_the_real_git_folder(tmp_path):
    """In a git worktree ".git" is a file naming the worktree's folder; its HEAD names a branch whose ref
    lives in the main repository (commondir)."""
    from common.checkpoint import git_sha

    main_git = tmp_path / "main" / ".git"
    (main_git / "refs" / "heads").mkdir(parents=True)
    (main_git / "HEAD").write_text("ref: refs/heads/main\n")
    (main_git / "refs" / "heads" / "main").write_text("a" * 40 + "\n")
    (main_git / "refs" / "heads" / "feature").write_text("b" * 40 + "\n")
    wt_git = main_git / "worktrees" / "wt"
    wt_git.mkdir(parents=True)
    (wt_git / "HEAD").write_text("ref: refs/heads/feature\n")
    (wt_git / "commondir").write_text("../..\n")
    (tmp_path / "wt").mkdir()
    (tmp_path / "wt" / ".git").write_text(f"gitdir: {wt_git}\n")
    assert git_sha(tmp_path / "main") == "a" * 40
    assert git_sha(tmp_path / "wt") == "b" * 40
