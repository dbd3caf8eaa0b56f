"""Exact mid-epoch resume of train_vmat.py (U-Net and diffusion): a run stopped by --stop-after-steps in
the middle of an epoch and resumed ends with the weights, EMA and per-epoch metrics of an uninterrupted run."""

import json

import pytest
import torch
import yaml

from common.runlog import read_csv_rows

# 2 training cases x 3 patches / batch 2 = 3 steps per epoch, 2 epochs; the stop lands 1 batch into epoch 2.
STEPS_PER_EPOCH, EPOCHS, STOP_AT = 3, 2, 4
RESUME_TRAIN = {
    "patch": {"size": [8, 16, 16], "per_case_per_epoch": 3},
    "augment": {"rotate_deg": 3.0},
    "model": {"channels": [4, 8], "groups": 2},
    "train": {"epochs": EPOCHS, "batch_size": 2, "lr": 1e-3, "ema_decay": 0.9},
    "val": {"gamma_subset": 0, "inference": {"window_zyx": [24, 32, 32], "tta_flip": False,
                                             "diffusion_samples": 1, "diffusion_steps": 1}},
    "dvh": {"method": "voxel"},  # exact resume is the point here; sub-voxel DVHs are tested elsewhere
}
MODELS = {"unet": {"type": "unet"},
          "diffusion": {"type": "diffusion", "diffusion_steps": 20, "sampling_steps": 2}}


def _final_state(run_dir):
    ckpt = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)
    return ckpt, {**ckpt["state_dict"], **{f"ema.{k}": v for k, v in ckpt["extra"]["ema"]["shadow"].items()}}


@pytest.mark.parametrize("kind", sorted(MODELS))
def test_resume_mid_epoch_matches_uninterrupted_run(kind, tiny_npz, tmp_path):
    from vmat.train_vmat import main

    cfg = json.loads(json.dumps(RESUME_TRAIN))
    cfg["model"].update(MODELS[kind])
    config = tmp_path / f"{kind}.yaml"
    config.write_text(yaml.safe_dump(cfg), encoding="utf-8")
    base = ["--config", str(config), "--data", str(tiny_npz)]
    reference, resumed = tmp_path / "reference", tmp_path / "resumed"
    main(base + ["--output-dir", str(reference)])

    first = main(base + ["--output-dir", str(resumed), "--stop-after-steps", str(STOP_AT)])
    assert first["interrupted"] and first["epochs_completed"] == 1
    assert not (resumed / "summary.json").exists()
    state = json.loads((resumed / "run_state.json").read_text(encoding="utf-8"))
    assert state["status"] == "interrupted" and state["step"] == STOP_AT
    partial, _ = _final_state(resumed)
    assert partial["extra"]["partial_epoch"]["batches_done"] == STOP_AT - STEPS_PER_EPOCH

    second = main(base + ["--output-dir", str(resumed), "--resume"])
    assert not second["interrupted"] and second["epochs_completed"] == EPOCHS
    ref_ckpt, ref_weights = _final_state(reference)
    new_ckpt, new_weights = _final_state(resumed)
    assert new_ckpt["step"] == ref_ckpt["step"] == EPOCHS * STEPS_PER_EPOCH
    assert new_ckpt["extra"]["ema"]["num_updates"] == ref_ckpt["extra"]["ema"]["num_updates"]
    for key, value in ref_weights.items():
        assert torch.allclose(value.float(), new_weights[key].float(), rtol=1e-5, atol=1e-7), key
    ref_rows, new_rows = read_csv_rows(reference / "metrics.csv"), read_csv_rows(resumed / "metrics.csv")
    assert [r["epoch"] for r in new_rows] == [str(e) for e in range(1, EPOCHS + 1)]
    for ref, new in zip(ref_rows, new_rows):
        for key in ("train_loss", "val_mae_body_gy"):
            assert float(new[key]) == pytest.approx(float(ref[key]), rel=1e-5), key
    assert json.loads((resumed / "run_state.json").read_text(encoding="utf-8"))["status"] == "completed"
