"""Sagittal + axial fusion (rsna_spine/fusion.py): second-view centres land on the same patient point,
the classifier falls back to the primary view, and a fused model trains and predicts end to end (through
the offline Kaggle entry, which also applies the model folder's temperatures)."""

import json
import shutil

import numpy as np
import pandas as pd
import pytest
import torch

from rsna_spine import predict_kaggle_rsna, train_rsna
from rsna_spine.data import StackStore
from rsna_spine.fusion import attach_second_views
from rsna_spine.models import SpineClassifier
from rsna_spine.stage_datasets import crop_items

TINY_RUN = ["localizer.epochs=1", "localizer.grid_sagittal=[9,32,32]", "localizer.grid_axial=[24,24]",
            "localizer.channels=[4,8,8]", "train.epochs=1", "train.max_steps_per_epoch=2", "train.batch_size=4",
            "train.swa.enabled=false", "crop.img_size=24", "crop.num_slices=3", "model.tiny_channels=[4,8,8]",
            "model.gru_hidden=8", "model.attention_hidden=8", "model.level_dim=4", "model.condition_dim=4",
            "model.head_hidden=8", "model.second_view=true"]
TINY_MODEL = {"backbone": "efficientnet_v2_tiny", "tiny_channels": [4, 8], "gru_hidden": 4, "gru_layers": 1,
              "gru_dropout": 0.0, "attention_hidden": 4, "level_dim": 2, "condition_dim": 2, "head_hidden": 4}


def test_second_view_is_the_same_patient_point(tiny_dataset):
    store = StackStore(tiny_dataset["cache"])
    labels = pd.read_csv(tiny_dataset["cache"] / "labels.csv")
    items = crop_items(labels, None, labels["study_id"].unique())
    counts = attach_second_views(items, store)
    assert counts["fused"] > 0
    for item in items:
        center = item["second_view"]
        if item["condition"].endswith("foraminal_narrowing"):
            assert center is None
            continue
        if center is None:
            continue
        primary = store.get(item["study_id"], item["series_id"], item["stack_index"])
        other = store.get(item["study_id"], center["series_id"], center["stack_index"])
        assert other.series_key == ("axial_t2" if item["condition"] == "spinal_canal_stenosis" else "sag_t2")
        here = primary.voxel_to_patient(np.asarray(item["kji"]))[0]
        there = other.voxel_to_patient(np.asarray(center["kji"]))[0]
        # in-plane the same point; along the other stack's normal at most the slice tolerance (one slice gap)
        assert abs((here - there) @ other.normal) <= abs(other.spacing_mm[0]) + 1e-6
        assert np.linalg.norm((here - there) - ((here - there) @ other.normal) * other.normal) < 1e-3  # mm (float32 geometry)


def test_missing_second_view_is_the_zero_feature_fallback():
    torch.manual_seed(0)
    model = SpineClassifier(**TINY_MODEL, second_view=True).eval()
    images = torch.rand(3, 2, 3, 16, 16)
    level, condition = torch.tensor([0, 1, 2]), torch.tensor([0, 3, 1])
    without = model(images, level, condition)["logits"]
    absent = model(images, level, condition, torch.rand(3, 2, 3, 16, 16), torch.zeros(3))["logits"]
    torch.testing.assert_close(without, absent)
    present = model(images, level, condition, torch.rand(3, 2, 3, 16, 16), torch.tensor([1.0, 0.0, 1.0]))["logits"]
    torch.testing.assert_close(present[1], without[1])
    assert not torch.allclose(present[0], without[0])


def test_fused_model_trains_and_predicts_offline(tiny_dataset):
    work = tiny_dataset["work"] / "fusion"
    args = ["--config", "configs/rsna_spine/smoke.yaml", "--output-dir", str(work / "train"),
            "--set", f"paths.data_root={tiny_dataset['root'].as_posix()}",
            "--set", f"paths.cache_dir={tiny_dataset['cache'].as_posix()}"]
    train = train_rsna.main(args + [token for item in TINY_RUN for token in ("--set", item)])
    assert train["jobs"]["fold0/classifier_all"]["n_train"] > 0
    model_dir = work / "model"  # what would be uploaded as a Kaggle dataset: checkpoints + temperatures
    shutil.copytree(work / "train", model_dir, ignore=shutil.ignore_patterns("*.csv", "log.txt", "run.lock"))
    (model_dir / "temperatures.json").write_text(json.dumps({"temperatures_all": {"spinal": 0.5, "foraminal": 2.0}}))
    root = tiny_dataset["root"]
    out = predict_kaggle_rsna.main(["--checkpoint", str(model_dir), "--data", str(root), "--output-dir",
                                    str(work / "kaggle"), "--device", "cpu", "--set", "predict.batch_size=8",
                                    "--solution", str(root / "solution" / "test_solution.csv")])
    sub = pd.read_csv(work / "kaggle" / "submission.csv")
    assert len(sub) == out["n_rows"] == 25 * out["n_studies"] and out["probability_rows_sum_to_1"]
    assert out["temperatures"] == {"spinal": 0.5, "foraminal": 2.0}
    assert out["counts"]["second_view_fused"] > 0
    assert out["official"]["score"] != pytest.approx(out["official_untempered"]["score"])
    times = pd.read_csv(work / "kaggle" / "per_study_times.csv")
    assert len(times) == out["n_studies"] and (times["total_s"] > 0).all()
    estimate = out["time_estimate"]
    assert estimate["estimated_s"] == pytest.approx(estimate["model_load_s"] + 1500 * times["total_s"].mean())
    assert out["machine"]["logical_cores"] >= 1 and not (work / "kaggle" / "scratch_cache").exists()
