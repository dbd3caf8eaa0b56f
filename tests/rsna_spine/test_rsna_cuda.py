"""Both stages of train_rsna.py on CUDA with mixed precision (bf16 autocast, and fp16 with a GradScaler as on
GPUs without bf16), a mid-epoch stop and resume on CUDA, then validate and predict on CUDA. Skipped without
a CUDA device."""

import json
import math

import pandas as pd
import pytest
import torch

from rsna_spine import predict_rsna, train_rsna, validate_rsna

pytestmark = [pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = ["localizer.series=[sag_t2,axial_t2]", "localizer.epochs=2", "localizer.grid_sagittal=[9,32,32]",
        "localizer.grid_axial=[24,24]", "localizer.channels=[4,8,8]", "train.epochs=2", "train.max_steps_per_epoch=3",
        "train.batch_size=4", "train.swa.start_epoch=2", "crop.img_size=24", "crop.num_slices=3",
        "model.tiny_channels=[4,8,8]", "model.gru_hidden=8", "model.attention_hidden=8", "model.level_dim=4",
        "model.condition_dim=4", "model.head_hidden=8", "predict.batch_size=8", "validate.n_example_studies=1",
        "runtime.amp=true"]


@pytest.fixture(params=["bf16", "fp16"])
def amp_dtype(request, monkeypatch):
    """bf16 where the GPU has it; "fp16" pretends it has not, so float16 autocast with loss scaling runs."""
    if request.param == "fp16":
        monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *args, **kwargs: False)
    elif not torch.cuda.is_bf16_supported():
        pytest.skip("this GPU has no bfloat16")
    return request.param


def _args(dataset, out, extra=()):
    args = ["--config", "configs/rsna_spine/smoke.yaml", "--output-dir", str(out), "--device", "cuda",
            "--data", str(dataset["cache"]), "--set", f"paths.data_root={dataset['root'].as_posix()}"]
    for item in TINY:
        args += ["--set", item]
    return [*args, *extra]


def _finite_run(run_dir, jobs) -> None:
    rows = pd.read_csv(run_dir / "metrics.csv")
    assert set(rows["job"]) == set(jobs)
    for column in ("train_loss", "val_error_mm", "val_official"):
        if column in rows:
            values = rows[column].dropna()
            assert len(values) and all(math.isfinite(v) for v in values), column
    for member in json.loads((run_dir / "ensemble.json").read_text())["members"]:
        state = torch.load(run_dir / member, map_location="cpu", weights_only=True)["state_dict"]
        assert all(torch.isfinite(v.float()).all() for v in state.values() if v.is_floating_point()), member


def test_both_stages_train_validate_and_predict_on_cuda_with_amp(amp_dtype, tiny_dataset, tmp_path):
    run_dir = tmp_path / "train"
    summary = train_rsna.main(_args(tiny_dataset, run_dir))
    assert not summary["interrupted"] and summary["n_models"] == 3
    _finite_run(run_dir, ["fold0/localizer_sag_t2", "fold0/localizer_axial_t2", "fold0/classifier_all"])
    scaler = torch.load(run_dir / "checkpoint_last.pt", weights_only=True)["scaler"]
    assert bool(scaler) == (amp_dtype == "fp16")  # GradScaler state only when float16 needs loss scaling
    val = validate_rsna.main(_args(tiny_dataset, tmp_path / "val", ["--checkpoint", str(run_dir)]))
    assert math.isfinite(val["headline"]["oof_official_score"])
    root = tiny_dataset["root"]
    pred = predict_rsna.main(_args(tiny_dataset, tmp_path / "pred", [
        "--checkpoint", str(run_dir), "--data", str(root), "--solution", str(root / "solution" / "test_solution.csv")]))
    assert pred["probability_rows_sum_to_1"] and math.isfinite(pred["headline"]["test_official_score"])


@pytest.mark.parametrize("job, settings, stop_after", [
    ("fold0/localizer_axial_t2", ["train.stages=[localizer]", "localizer.series=[axial_t2]", "localizer.batch_size=1"], 3),
    ("fold0/classifier_all", ["train.stages=[classifier]", "train.val_centers=gt"], 4),  # epoch 2 of 3 steps: SWA on
])
def test_stop_and_resume_mid_epoch_on_cuda(tiny_dataset, tmp_path, job, settings, stop_after):
    settings = [item for pair in zip(["--set"] * len(settings), settings) for item in pair]
    first = train_rsna.main(_args(tiny_dataset, tmp_path, [*settings, "--stop-after-steps", str(stop_after)]))
    assert first["interrupted"] and not (tmp_path / "summary.json").exists()
    partial = torch.load(tmp_path / "checkpoint_last.pt", weights_only=True)["extra"]["partial_epoch"]
    assert partial["batches_done"] > 0  # stopped inside an epoch
    second = train_rsna.main(_args(tiny_dataset, tmp_path, [*settings, "--resume"]))
    assert not second["interrupted"] and (tmp_path / "summary.json").is_file()
    rows = pd.read_csv(tmp_path / "metrics.csv")
    assert rows.loc[rows["job"] == job, "epoch"].tolist() == [1, 2]  # one row per epoch
    _finite_run(tmp_path, [job])
