"""Exact mid-epoch resume of both trainers of train_rsna.py: a run stopped by --stop-after-steps in the middle
of an epoch and resumed ends with the same weights and per-epoch losses as an uninterrupted run."""

import json

import pandas as pd
import pytest
import torch

from rsna_spine import train_rsna

TINY_MODELS = ["localizer.grid_sagittal=[9,32,32]", "localizer.grid_axial=[24,24]", "localizer.channels=[4,8,8]",
               "crop.img_size=24", "crop.num_slices=3", "model.tiny_channels=[4,8,8]", "model.gru_hidden=8",
               "model.attention_hidden=8", "model.level_dim=4", "model.condition_dim=4", "model.head_hidden=8"]
# stage 1 alone: one localizer, batches of one stack, augmentation on (the RNG state must be restored)
STAGE1 = ["train.stages=[localizer]", "localizer.series=[sag_t2]", "localizer.epochs=2", "localizer.batch_size=1"]
# stage 2 alone (label-point crops): 3 steps per epoch, SWA from epoch 2, so the stop falls inside an SWA epoch
STAGE2 = ["train.stages=[classifier]", "train.val_centers=gt", "train.epochs=2", "train.max_steps_per_epoch=3",
          "train.batch_size=4", "train.swa.start_epoch=2", "train.warmup_epochs=1"]


def _args(dataset, out, settings, extra=()):
    args = ["--config", "configs/rsna_spine/smoke.yaml", "--output-dir", str(out), "--data", str(dataset["cache"]),
            "--set", f"paths.data_root={dataset['root'].as_posix()}"]
    for item in [*TINY_MODELS, *settings]:
        args += ["--set", item]
    return [*args, *extra]


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


def _stop_and_resume(dataset, tmp_path, settings, job: str, stop_after: int):
    """(uninterrupted run folder, stopped-then-resumed run folder), after the checks on the stopped run."""
    whole, split = tmp_path / "whole", tmp_path / "split"
    train_rsna.main(_args(dataset, whole, settings))
    stopped = train_rsna.main(_args(dataset, split, settings, ["--stop-after-steps", str(stop_after)]))
    assert stopped["interrupted"] is True
    assert not (split / "summary.json").exists()
    state = json.loads((split / "run_state.json").read_text())
    assert state["status"] == "interrupted" and state["step"] == stop_after
    assert not (split / job / "done.json").exists()
    resumed = train_rsna.main(_args(dataset, split, settings, ["--resume"]))
    assert resumed["interrupted"] is False and (split / "summary.json").is_file()
    return whole, split


def _assert_same_training(whole, split, job: str, checkpoints, n_epochs: int):
    for name in checkpoints:
        ours, theirs = _weights(split / name), _weights(whole / name)
        assert ours.keys() == theirs.keys()
        for key in ours:
            assert torch.allclose(ours[key].float(), theirs[key].float(), rtol=1e-6, atol=1e-7), (name, key)
    rows = {name: pd.read_csv(folder / "metrics.csv") for name, folder in (("whole", whole), ("split", split))}
    epochs = {name: frame.loc[frame["job"] == job, "epoch"].tolist() for name, frame in rows.items()}
    assert epochs["whole"] == epochs["split"] == list(range(1, n_epochs + 1))  # one row per epoch
    losses = {name: frame.loc[frame["job"] == job, "train_loss"].tolist() for name, frame in rows.items()}
    assert losses["split"] == pytest.approx(losses["whole"], rel=1e-6)


def _steps_per_epoch(run_dir, job: str) -> int:
    rows = pd.read_csv(run_dir / "metrics.csv")
    return int(rows.loc[(rows["job"] == job) & (rows["epoch"] == 1), "step"].iloc[0])


def test_stage1_localizer_resumes_exactly_mid_epoch(tiny_dataset, tmp_path):
    job = "fold0/localizer_sag_t2"
    probe = tmp_path / "probe"
    train_rsna.main(_args(tiny_dataset, probe, [*STAGE1, "localizer.epochs=1"]))
    steps = _steps_per_epoch(probe, job)
    assert steps >= 2, "the tiny dataset must give at least 2 localizer batches per epoch"
    whole, split = _stop_and_resume(tiny_dataset, tmp_path, STAGE1, job, stop_after=steps + 1)  # epoch 2, batch 1
    _assert_same_training(whole, split, job, ["checkpoint_last.pt", f"{job}/checkpoint_best.pt"], n_epochs=2)


def test_stage2_classifier_resumes_exactly_mid_epoch(tiny_dataset, tmp_path):
    job = "fold0/classifier_all"
    whole, split = _stop_and_resume(tiny_dataset, tmp_path, STAGE2, job, stop_after=4)  # epoch 2, batch 1 of 3
    _assert_same_training(whole, split, job, [f"{job}/checkpoint_last.pt", f"{job}/checkpoint_best.pt",
                                              f"{job}/checkpoint_swa.pt"], n_epochs=2)
    manifest = json.loads((split / "ensemble.json").read_text())
    assert manifest["members"] == [f"{job}/checkpoint_best.pt"]
    assert manifest["models"][0]["stage"] == "classifier" and manifest["models"][0]["fold"] == 0
