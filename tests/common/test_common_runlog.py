import csv
import json
import math

import numpy as np
import torch

from common.plotting import OKABE_ITO, plot_training_curves, save_figure
from common.runlog import (RunLogger, append_csv_row, create_run_dir, latest_run_dir, progress_enabled, to_jsonable,
                           write_json)


def test_create_run_dir_layout_and_uniqueness(tmp_path):
    first = create_run_dir("asl", "smoke", root=tmp_path)
    second = create_run_dir("asl", "smoke", root=tmp_path)
    assert first.parent == tmp_path / "asl" / "smoke" and first != second
    assert create_run_dir("asl", "smoke", output_dir=tmp_path / "mine") == tmp_path / "mine"
    (second / "checkpoint_last.pt").write_bytes(b"x")
    assert latest_run_dir("asl", "smoke", root=tmp_path) == second
    assert latest_run_dir("vmat", "smoke", root=tmp_path) is None


def test_csv_rows_widen_header_when_new_columns_appear(tmp_path):
    path = tmp_path / "metrics.csv"
    append_csv_row(path, {"epoch": 1, "loss": 0.5})
    append_csv_row(path, {"epoch": 2, "loss": 0.4})
    append_csv_row(path, {"epoch": 3, "loss": 0.3, "val_mae": np.float32(1.5)})
    with path.open(encoding="utf-8") as handle:
        rows = list(csv.DictReader(handle))
    assert [r["epoch"] for r in rows] == ["1", "2", "3"]
    assert rows[0]["val_mae"] == "" and rows[2]["val_mae"] == "1.5"


def test_json_is_strict_nan_becomes_null(tmp_path):
    obj = {"a": float("nan"), "b": np.float64(2.5), "c": torch.tensor([1.0, float("inf")]), "d": np.arange(2)}
    assert to_jsonable(obj) == {"a": None, "b": 2.5, "c": [1.0, None], "d": [0, 1]}
    path = write_json(tmp_path / "s.json", obj)
    text = path.read_text(encoding="utf-8")
    assert "NaN" not in text and json.loads(text)["b"] == 2.5


def test_logger_writes_only_on_main_rank(tmp_path):
    main = RunLogger(tmp_path / "main")
    main.log("hello İ ✓")
    main.log_metrics({"epoch": 1})
    main.write_summary({"x": 1.0})
    assert "hello İ ✓" in (tmp_path / "main" / "log.txt").read_text(encoding="utf-8")
    assert json.loads((tmp_path / "main" / "summary.json").read_text(encoding="utf-8"))["x"] == 1.0
    other = RunLogger(tmp_path / "other", is_main=False)
    other.log("x")
    other.log_metrics({"epoch": 1})
    other.write_summary({"x": 1})
    assert not (tmp_path / "other").exists()


def test_progress_is_quiet_off_terminal(monkeypatch):
    monkeypatch.delenv("PROGRESS", raising=False)
    assert progress_enabled(True) is False  # pytest captures stderr: not a terminal
    monkeypatch.setenv("PROGRESS", "1")
    assert progress_enabled(True) and not progress_enabled(False)


def test_figures_png_and_pdf(tmp_path):
    import matplotlib.pyplot as plt

    assert len(OKABE_ITO) == 8
    fig, ax = plt.subplots()
    ax.plot([0, 1], [0, 1])
    paths = save_figure(fig, tmp_path / "figs" / "line.png", formats=("png", "pdf"))
    assert sorted(p.name for p in paths) == ["line.pdf", "line.png"]
    assert all(p.stat().st_size > 0 for p in paths)
    csv_path = tmp_path / "metrics.csv"
    for epoch in range(1, 4):
        append_csv_row(csv_path, {"epoch": epoch, "train_loss": 1.0 / epoch, "val_mae": math.nan if epoch == 1 else 0.5})
    out = plot_training_curves(csv_path, tmp_path / "curves")
    assert (tmp_path / "curves.png").is_file() and len(out) >= 1


def test_atomic_npz_and_cleanup_on_error(tmp_path):
    import pytest

    from common.runlog import atomic_open, save_npz_atomic

    path = save_npz_atomic(tmp_path / "case.npz", ct=np.arange(3, dtype=np.float32))
    with np.load(path, allow_pickle=False) as npz:
        assert npz["ct"].tolist() == [0.0, 1.0, 2.0]
    with pytest.raises(RuntimeError):
        with atomic_open(tmp_path / "case.npz") as handle:
            handle.write(b"half")
            raise RuntimeError("disk full")
    with np.load(path, allow_pickle=False) as npz:  # the previous file is intact
        assert npz["ct"].shape == (3,)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["case.npz"]


def test_layers_group_count_and_film():
    import pytest

    from common.layers import film, group_count, group_norm

    assert [group_count(c, 8) for c in (16, 12, 7, 3)] == [8, 6, 7, 3]
    assert group_norm(12, 8).num_groups == 6
    x = torch.ones(2, 3, 4, 5)
    gamma = torch.tensor([[0.0, 1.0, -1.0], [0.5, 0.0, 0.0]])
    beta = torch.tensor([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0]])
    out = film(x, gamma, beta)
    assert out[0, :, 0, 0].tolist() == [2.0, 2.0, 0.0] and out[1, :, 3, 4].tolist() == [1.5, 3.0, 1.0]
    with pytest.raises(RuntimeError):
        film(x, gamma[:, :2], beta)
