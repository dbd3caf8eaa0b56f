"""The run contract on the lensing scripts: exact mid-epoch resume of train_lensing (one model and an
ensemble), --checkpoint as a file / run folder / ensemble folder, one strict config schema for every
script, and one-line errors (exit 2) naming the file for truncated images, catalogues and HDF5 files."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch

from common.checkpoint import resolve_checkpoints
from common.config import load_config
from common.errors import run_cli
from common.runlog import read_csv_rows
from lensing import benchmark_lensing, preprocess_lensing, train_lensing, validate_lensing
from lensing.defaults import lensing_defaults
from lensing.storage import read_array, write_array

SMOKE = "configs/lensing/smoke.yaml"

# train split of the smoke data set: ~67 cutouts = 4 batches of 16
RESUME_CASES = {
    # 3 steps per epoch, 2 epochs: step 4 is one batch into epoch 2
    "one_model": (["--set", "train.max_steps_per_epoch=3", "--set", "train.epochs=2"], 4, [""]),
    # 2 members x 1 epoch x 3 steps, global steps 1-3 member 0, 4-6 member 1: step 5 is inside member 1's
    # epoch. Dropout, the physics loss and the parameter head are exercised too.
    "ensemble_physics": (["--set", "train.max_steps_per_epoch=3", "--set", "train.epochs=1",
                          "--set", "train.batch_size=8", "--set", "ensemble.n_members=2", "--set", "model.name=deeplens_params",
                          "--set", "physics.weight=0.01", "--set", "physics.param_supervision_weight=1.0",
                          "--set", "model.dropout=0.3"], 5, ["member_0", "member_1"]),
}


def _weights(path):
    return torch.load(path, map_location="cpu", weights_only=True)["state_dict"]


@pytest.mark.parametrize("case", list(RESUME_CASES))
def test_train_resumes_mid_epoch_exactly(dataset, tmp_path, case):
    folder, _ = dataset
    extra, stop_at, members = RESUME_CASES[case]
    base = ["--config", SMOKE, "--data", str(folder), "--set", "train.plot_curves=false", *extra]
    full_dir, resumed_dir = tmp_path / "full", tmp_path / "resumed"
    full = train_lensing.main([*base, "--output-dir", str(full_dir)])
    assert not full["interrupted"]

    first = train_lensing.main([*base, "--output-dir", str(resumed_dir), "--stop-after-steps", str(stop_at)])
    assert first["interrupted"]
    assert not (resumed_dir / "summary.json").exists()  # an interrupted run never looks complete
    state = json.loads((resumed_dir / "run_state.json").read_text(encoding="utf-8"))
    assert state["status"] == "interrupted" and state["step"] == stop_at
    stopped = torch.load(resumed_dir / members[-1] / "checkpoint_last.pt", weights_only=True)
    assert stopped["step"] == stop_at and 0 < stopped["extra"]["partial_epoch"]["batches_done"] < 3

    second = train_lensing.main([*base, "--output-dir", str(resumed_dir), "--resume"])
    assert not second["interrupted"] and (resumed_dir / "summary.json").is_file()
    for member in members:
        reference, result = _weights(full_dir / member / "checkpoint_last.pt"), \
            _weights(resumed_dir / member / "checkpoint_last.pt")
        for key in reference:
            assert torch.allclose(reference[key].float(), result[key].float(), rtol=1e-6, atol=1e-7), (member, key)
    ref_rows, new_rows = read_csv_rows(full_dir / "metrics.csv"), read_csv_rows(resumed_dir / "metrics.csv")
    keys = [(r.get("member"), r["epoch"]) for r in new_rows]
    assert keys == [(r.get("member"), r["epoch"]) for r in ref_rows] and len(set(keys)) == len(keys) == 2
    for a, b in zip(ref_rows, new_rows):
        for column in ("train_bce", "val_bce", "val_auroc"):
            assert float(b[column]) == pytest.approx(float(a[column]), rel=1e-5), column
        assert a["step"] == b["step"]
    if len(members) > 1:
        # the common ensemble manifest; validate takes the folder, a member's checkpoint file or the run folder
        manifest = json.loads((resumed_dir / "ensemble.json").read_text(encoding="utf-8"))
        assert manifest["members"] == ["member_0/checkpoint_best.pt", "member_1/checkpoint_best.pt"]
        assert len(resolve_checkpoints(resumed_dir)) == 2
    else:
        val = validate_lensing.main(["--config", SMOKE, "--checkpoint", str(resumed_dir / "checkpoint_best.pt"),
                                     "--data", str(folder), "--output-dir", str(tmp_path / "val"),
                                     "--set", "validate.baseline=false", "--set", "validate.figures=false"])
        assert val["n_members"] == 1 and val["checkpoints"] == [str(resumed_dir / "checkpoint_best.pt")]


@pytest.mark.parametrize("script, args", [
    (train_lensing, ["--data", "unused"]),
    (validate_lensing, ["--data", "unused", "--checkpoint", "unused.pt"]),
    (preprocess_lensing, ["simulate"]),
    (benchmark_lensing, []),
], ids=lambda v: getattr(v, "__name__", ""))
def test_a_typo_in_any_section_fails_every_script(script, args, tmp_path):
    """One schema for the pipeline: a typo in the validate section stops train_lensing too (and the others)."""
    config = tmp_path / "typo.yaml"
    config.write_text("base: " + Path(SMOKE).resolve().as_posix()
                      + "\nvalidate:\n  thresholdz: 4\n", encoding="utf-8")
    with pytest.raises(SystemExit, match=r"unknown config key 'validate.thresholdz'\. Did you mean 'n_thresholds'"):
        script.main([*args, "--config", str(config), "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out" / "config.yaml").exists()


@pytest.mark.parametrize("config", sorted(Path("configs/lensing").glob("*.yaml")), ids=lambda p: p.name)
def test_every_lensing_config_loads_with_the_one_schema(config):
    for script in (preprocess_lensing, train_lensing, validate_lensing, benchmark_lensing):
        assert script.DEFAULTS == lensing_defaults(), script.__name__
    cfg = load_config(config, [], defaults=lensing_defaults())
    assert set(cfg) == set(lensing_defaults())


def _copy_with_damaged_train_image(folder, tmp_path, fmt: str, suffix: str):
    """A copy of the data set whose first training image is rewritten as ``fmt`` and cut to half its bytes."""
    copy = tmp_path / "data"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("split_run"))
    cat = pd.read_csv(copy / "catalog.csv", dtype={"object_id": str, "bands": str, "split": str})
    row = cat.index[cat["split"] == "train"][0]
    image = read_array(copy / cat.at[row, "image_path"], cat.at[row, "image_scale"], cat.at[row, "image_offset"])
    rel = f"images/damaged{suffix}"
    write_array(copy / rel, image, fmt)
    cat.loc[row, ["image_path", "image_scale", "image_offset"]] = [rel, np.nan, np.nan]
    cat.to_csv(copy / "catalog.csv", index=False)
    data = (copy / rel).read_bytes()
    (copy / rel).write_bytes(data[: len(data) // 2])
    return copy, copy / rel


def _one_error_line(capsys, path) -> str:
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(err) == 1 and str(path) in err[0], err
    return err[0]


@pytest.mark.parametrize("fmt, suffix", [("npy", ".npy"), ("fits", ".fits")])
def test_truncated_image_file_is_one_line_naming_it(dataset, tmp_path, capsys, fmt, suffix):
    folder, _ = dataset
    data, damaged = _copy_with_damaged_train_image(folder, tmp_path, fmt, suffix)
    code = run_cli(train_lensing.main, ["--config", SMOKE, "--data", str(data), "--output-dir", str(tmp_path / "run")])
    assert code == 2
    assert "truncated" in _one_error_line(capsys, damaged)
    assert not (tmp_path / "run" / "config.yaml").exists()  # inputs failed: no config recorded


def test_truncated_catalog_is_one_line_naming_it(dataset, tmp_path, capsys):
    folder, _ = dataset
    copy = tmp_path / "data"
    shutil.copytree(folder, copy, ignore=shutil.ignore_patterns("split_run"))
    text = (copy / "catalog.csv").read_bytes()
    (copy / "catalog.csv").write_bytes(text[: len(text) // 2])  # cut in the middle of a row
    code = run_cli(train_lensing.main, ["--config", SMOKE, "--data", str(copy), "--output-dir", str(tmp_path / "run")])
    assert code == 2
    assert "truncated" in _one_error_line(capsys, copy / "catalog.csv")


def _galaxiesml_file(path, n: int) -> None:
    import h5py

    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as handle:
        handle["image"] = rng.normal(size=(n, 5, 16, 16)).astype(np.float32)
        handle["object_id"] = np.arange(n)


def test_truncated_hdf5_and_empty_inputs_exit_non_zero(tmp_path, capsys):
    source = tmp_path / "galaxiesml.hdf5"
    _galaxiesml_file(source, 8)
    data = source.read_bytes()
    source.write_bytes(data[: len(data) // 2])
    convert = ["convert", "--input", str(source), "--set", "convert.bands=[g,r,i]"]
    assert run_cli(preprocess_lensing.main, [*convert, "--output-dir", str(tmp_path / "a")]) == 2
    assert "HDF5" in _one_error_line(capsys, source)
    # preprocessing that produces nothing is an error, not an empty data set
    empty = tmp_path / "empty.hdf5"
    _galaxiesml_file(empty, 0)
    assert run_cli(preprocess_lensing.main, ["convert", "--input", str(empty), "--output-dir", str(tmp_path / "b")]) == 2
    assert "0 of 0" in _one_error_line(capsys, empty)
    assert run_cli(preprocess_lensing.main, ["simulate", "--set", "simulate.n_per_survey=[0]",
                                             "--output-dir", str(tmp_path / "c")]) == 2
    assert "0 cutouts" in capsys.readouterr().err
    assert not (tmp_path / "c" / "catalog.csv").exists()
