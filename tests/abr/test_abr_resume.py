"""Both ABR trainers stopped in the middle of an epoch (--stop-after-steps, as Ctrl+C would) and resumed
end with the weights and per-epoch losses of an uninterrupted run; model.weights warm starts refuse a
checkpoint of another model."""

import json

import pytest
import torch

from abr import train_abr, train_diffusion_abr
from common.checkpoint import build_model, save_checkpoint
from common.errors import run_cli
from common.runlog import read_csv_rows

# 3 batches per epoch, 2 epochs; the stop falls on the first batch of epoch 2. Dropout (multi-task model),
# condition dropout, timesteps and noise (diffusion) all draw random numbers, so the RNG state must resume too.
MULTITASK = ["--set", "train.batch_size=4", "--set", "train.max_steps_per_epoch=3", "--set", "train.epochs=2",
             "--set", "loss.dynamic_class_weights=true"]
DIFFUSION = ["--set", "diffusion.batch_size=16", "--set", "diffusion.max_steps_per_epoch=3",
             "--set", "diffusion.epochs=2"]
STEPS_PER_EPOCH, STOP_AT = 3, 4


def run_stopped_and_resumed(module, base: list[str], folder):
    first = module.main(base + ["--output-dir", str(folder), "--stop-after-steps", str(STOP_AT)])
    assert first["interrupted"] and first["epochs_completed"] == 1
    saved = torch.load(folder / "checkpoint_last.pt", weights_only=True)
    assert saved["step"] == STOP_AT and saved["extra"]["partial_epoch"]["batches_done"] == STOP_AT - STEPS_PER_EPOCH
    assert not (folder / "summary.json").exists()  # an interrupted run never looks complete
    state = json.loads((folder / "run_state.json").read_text(encoding="utf-8"))
    assert state["status"] == "interrupted" and state["step"] == STOP_AT
    second = module.main(base + ["--output-dir", str(folder), "--resume"])
    assert not second["interrupted"] and second["epochs_completed"] == 2
    assert json.loads((folder / "run_state.json").read_text(encoding="utf-8"))["status"] == "completed"
    return saved


def assert_same_training(reference, resumed, loss_columns):
    ref = torch.load(reference / "checkpoint_last.pt", weights_only=True)
    new = torch.load(resumed / "checkpoint_last.pt", weights_only=True)
    assert new["step"] == ref["step"] == 2 * STEPS_PER_EPOCH
    for key, value in ref["state_dict"].items():
        assert torch.allclose(value.float(), new["state_dict"][key].float(), rtol=1e-6, atol=1e-7), key
    ref_rows, new_rows = read_csv_rows(reference / "metrics.csv"), read_csv_rows(resumed / "metrics.csv")
    assert [r["epoch"] for r in new_rows] == ["1", "2"]  # one row per epoch, none duplicated
    for a, b in zip(ref_rows, new_rows):
        for column in loss_columns:
            assert float(b[column]) == pytest.approx(float(a[column]), rel=1e-5, abs=1e-7), column
    return ref, new


@pytest.fixture(scope="module")
def multitask_reference(tiny_config, tiny_cache, tmp_path_factory):
    out = tmp_path_factory.mktemp("abr_mt_ref")
    base = ["--config", str(tiny_config), "--data", str(tiny_cache)] + MULTITASK
    train_abr.main(base + ["--output-dir", str(out)])
    return out, base


def test_multitask_resume_mid_epoch_matches_uninterrupted_run(multitask_reference, tmp_path):
    reference, base = multitask_reference
    run_stopped_and_resumed(train_abr, base, tmp_path / "resumed")
    ref, new = assert_same_training(reference, tmp_path / "resumed",
                                    ["train_loss", "train_peak_latency", "train_classification", "val_loss"])
    # dynamic class weights changed after epoch 1 and travel in the checkpoint
    assert torch.allclose(ref["extra"]["class_weights"], new["extra"]["class_weights"])


def test_diffusion_resume_mid_epoch_matches_uninterrupted_run_with_ema(tiny_config, tiny_cache, tmp_path):
    base = ["--config", str(tiny_config), "--data", str(tiny_cache)] + DIFFUSION
    train_diffusion_abr.main(base + ["--output-dir", str(tmp_path / "reference")])
    saved = run_stopped_and_resumed(train_diffusion_abr, base, tmp_path / "resumed")
    assert saved["extra"]["ema"]["num_updates"] == STOP_AT  # the EMA is part of the mid-epoch checkpoint
    ref, new = assert_same_training(tmp_path / "reference", tmp_path / "resumed", ["train_loss", "val_loss_ema"])
    assert new["extra"]["ema"]["num_updates"] == 2 * STEPS_PER_EPOCH
    for key, value in ref["extra"]["ema"]["shadow"].items():
        assert torch.allclose(value, new["extra"]["ema"]["shadow"][key], rtol=1e-6, atol=1e-7), key


def test_warm_start_from_the_same_model_loads_every_tensor(multitask_reference, tiny_config, tiny_cache, tmp_path):
    reference, _ = multitask_reference
    summary = train_abr.main(["--config", str(tiny_config), "--data", str(tiny_cache), "--output-dir",
                              str(tmp_path / "warm"), "--set", f"model.weights={reference.as_posix()}",
                              "--set", "train.epochs=1", "--set", "train.max_steps_per_epoch=1"])
    assert summary["epochs_completed"] == 1
    n_tensors = len(torch.load(reference / "checkpoint_last.pt", weights_only=True)["state_dict"])
    assert f"initialised {n_tensors}/{n_tensors} tensors" in (tmp_path / "warm" / "log.txt").read_text(encoding="utf-8")


def test_warm_start_from_another_model_is_refused(tiny_config, tiny_cache, tmp_path, capsys):
    generator = build_model("abr.models.ABRDiffusionUNet", {"n_samples": 75, "channels": [8, 16], "cond_dim": 16,
                                                             "static_dim": 3, "n_classes": 5})
    other = save_checkpoint(tmp_path / "generator.pt", generator, domain="abr")
    code = run_cli(train_abr.main, ["--config", str(tiny_config), "--data", str(tiny_cache), "--output-dir",
                                    str(tmp_path / "run"), "--set", f"model.weights={other.as_posix()}"])
    error = capsys.readouterr().err.strip().splitlines()[0]
    assert code == 2
    assert error.startswith(f"error: {other}") and "tensors fit this model" in error and "ABRDiffusionUNet" in error
    assert not (tmp_path / "run" / "checkpoint_last.pt").exists()
