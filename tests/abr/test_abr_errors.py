"""Each kind of bad ABR input, made from a real file cut in half or a real checkpoint of the wrong model, ends
the script with exit code 2 and one line naming the file (run_cli), not a traceback."""

import shutil

import pandas as pd
import pytest

from abr import generate_abr, preprocess_abr, train_abr, train_diffusion_abr, validate_abr
from abr.data import write_table
from abr.dataset import CACHE_NAME, META_NAME
from abr.synthetic import clean_sidecar_path
from common.checkpoint import build_model, save_checkpoint
from common.errors import run_cli


def truncate(path):
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def error_line(module, argv, capsys) -> str:
    assert run_cli(module.main, argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    return err.strip().splitlines()[0]


@pytest.fixture
def cache_copy(tiny_cache, tmp_path):
    folder = tmp_path / "cache"
    folder.mkdir()
    for name in (CACHE_NAME, META_NAME):
        shutil.copy(tiny_cache / name, folder / name)
    return folder


@pytest.mark.parametrize("module", [train_abr, train_diffusion_abr], ids=lambda m: m.__name__)
def test_truncated_cache_names_the_npz(module, tiny_config, cache_copy, tmp_path, capsys):
    cache = truncate(cache_copy / CACHE_NAME)
    line = error_line(module, ["--config", str(tiny_config), "--data", str(cache_copy), "--output-dir",
                               str(tmp_path / "run")], capsys)
    assert line.startswith(f"error: {cache}:") and "truncated or damaged" in line


def test_truncated_cache_metadata_names_the_json(tiny_config, cache_copy, tmp_path, capsys):
    meta = truncate(cache_copy / META_NAME)
    line = error_line(train_abr, ["--config", str(tiny_config), "--data", str(cache_copy), "--output-dir",
                                  str(tmp_path / "run")], capsys)
    assert line.startswith(f"error: {meta}:") and "not valid JSON" in line


def test_truncated_excel_table_names_the_file(tiny_config, tmp_path, capsys):
    table = write_table(pd.DataFrame({"Patient_ID": ["P1", "P2"], "Age": [3.0, 4.0]}), tmp_path / "export.xlsx")
    truncate(table)
    line = error_line(preprocess_abr, ["--config", str(tiny_config), "--table", str(table), "--output-dir",
                                       str(tmp_path / "out")], capsys)
    assert line.startswith(f"error: {table}:") and "not a readable Excel workbook" in line
    assert not (tmp_path / "out" / CACHE_NAME).exists()


def test_truncated_clean_sidecar_names_the_npz(tiny_config, tiny_cache, tmp_path, capsys):
    table = shutil.copy(tiny_cache / "synthetic_abr.csv", tmp_path / "synthetic_abr.csv")
    sidecar = clean_sidecar_path(table)
    shutil.copy(clean_sidecar_path(tiny_cache / "synthetic_abr.csv"), sidecar)
    truncate(sidecar)
    line = error_line(preprocess_abr, ["--config", str(tiny_config), "--table", str(table), "--output-dir",
                                       str(tmp_path / "out")], capsys)
    assert line.startswith(f"error: {sidecar}:") and "truncated or damaged" in line


def test_a_table_with_no_usable_recording_exits_non_zero(tiny_config, tiny_cache, tmp_path, capsys):
    table = tiny_cache / "synthetic_abr.csv"
    n_rows = len(pd.read_csv(table, usecols=[0]))
    line = error_line(preprocess_abr, ["--config", str(tiny_config), "--table", str(table), "--output-dir",
                                       str(tmp_path / "out"), "--set", "data.max_sweeps_rejected=0"], capsys)
    assert line.startswith(f"error: {table}:") and f"0 of {n_rows} recordings left" in line
    assert not (tmp_path / "out" / CACHE_NAME).exists()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Untrained but real checkpoints of both ABR models."""
    folder = tmp_path_factory.mktemp("abr_ckpts")
    multitask = build_model("abr.models.ABRMultiTaskNet", {"n_samples": 75, "time_ms": [0.2 * i for i in range(75)],
                                                          "static_dim": 4, "channels": 8, "width": 16,
                                                          "transformer_layers": 1, "heads": 2, "n_classes": 5})
    generator = build_model("abr.models.ABRDiffusionUNet", {"n_samples": 75, "channels": [8, 16], "cond_dim": 16,
                                                           "static_dim": 3, "n_classes": 5})
    return (save_checkpoint(folder / "multitask.pt", multitask, domain="abr"),
            save_checkpoint(folder / "generator.pt", generator, domain="abr"))


def test_truncated_checkpoint_names_the_file(checkpoints, tiny_config, tmp_path, capsys):
    damaged = shutil.copy(checkpoints[0], tmp_path / "checkpoint_best.pt")
    truncate(damaged)
    for module in (validate_abr, generate_abr):
        line = error_line(module, ["--config", str(tiny_config), "--checkpoint", str(tmp_path), "--output-dir",
                                   str(tmp_path / module.__name__)], capsys)
        assert line.startswith(f"error: {damaged}:") and "not a readable checkpoint" in line


def test_checkpoint_of_the_other_model_is_refused(checkpoints, tiny_config, tmp_path, capsys):
    multitask, generator = checkpoints
    line = error_line(validate_abr, ["--config", str(tiny_config), "--checkpoint", str(generator), "--output-dir",
                                     str(tmp_path / "val")], capsys)
    assert line.startswith(f"error: {generator}:") and "not the multi-task model" in line
    line = error_line(generate_abr, ["--config", str(tiny_config), "--checkpoint", str(multitask), "--output-dir",
                                     str(tmp_path / "gen")], capsys)
    assert line.startswith(f"error: {multitask}:") and "not the diffusion generator" in line
    line = error_line(generate_abr, ["--config", str(tiny_config), "--checkpoint", str(generator), "--output-dir",
                                     str(tmp_path / "gen2")], capsys)
    assert line.startswith(f"error: {generator}:") and "no EMA weights" in line  # saved without common EMA state


def test_an_ensemble_folder_is_refused_by_the_single_model_scripts(checkpoints, tiny_config, tmp_path, capsys):
    from common.checkpoint import write_ensemble_manifest

    folder = tmp_path / "ensemble"
    folder.mkdir()
    members = [shutil.copy(checkpoints[0], folder / f"m{i}.pt") for i in range(2)]
    write_ensemble_manifest(folder, members)
    line = error_line(validate_abr, ["--config", str(tiny_config), "--checkpoint", str(folder), "--output-dir",
                                     str(tmp_path / "val")], capsys)
    assert line.startswith(f"error: {folder}:") and "names 2 checkpoints" in line


def test_an_unknown_class_in_the_generate_config_is_one_line(checkpoints, tiny_config, tmp_path, capsys):
    line = error_line(generate_abr, ["--config", str(tiny_config), "--checkpoint", str(checkpoints[1]),
                                     "--output-dir", str(tmp_path / "gen"), "--set", "generate.classes=[NORMAL,SNIKK]"],
                      capsys)
    assert "generate.classes: unknown hearing-loss class 'SNIKK'" in line
