"""Bad inputs end as one line naming the file, exit code 2 (common.errors.run_cli), each made from a real
truncated file: a cached stack (.npz), a competition CSV, and DICOM series of which none decodes."""

import shutil

import pandas as pd
import pytest

from common.errors import run_cli
from rsna_spine import preprocess_rsna, train_rsna
from rsna_spine.data import Stack


def _truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def _one_error_line(capsys) -> str:
    lines = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, lines
    return lines[0]


def _preprocess_args(root, tmp_path):
    return ["--config", "configs/rsna_spine/smoke.yaml", "--output-dir", str(tmp_path / "run"), "--data", str(root),
            "--set", f"paths.cache_dir={(tmp_path / 'cache').as_posix()}", "--set", "synthetic.enabled=false",
            "--set", "preprocess.n_folds=2"]


def _layout_with_series(tiny_dataset, tmp_path, n_series: int):
    """A copy of the competition CSVs listing the first ``n_series`` training series, and their DICOM files."""
    src, root = tiny_dataset["root"], tmp_path / "kaggle"
    root.mkdir()
    for name in ("train.csv", "train_label_coordinates.csv"):
        shutil.copy(src / name, root / name)
    listed = pd.read_csv(src / "train_series_descriptions.csv")
    listed = listed[[(src / "train_images" / str(s) / str(r)).is_dir()
                     for s, r in zip(listed["study_id"], listed["series_id"])]].head(n_series)
    listed.to_csv(root / "train_series_descriptions.csv", index=False)
    for study, series in zip(listed["study_id"], listed["series_id"]):
        shutil.copytree(src / "train_images" / str(study) / str(series), root / "train_images" / str(study) / str(series))
    return root, listed


def test_truncated_stack_in_the_cache_is_one_line_naming_it(tiny_dataset, tmp_path, capsys):
    cache = tmp_path / "cache"
    shutil.copytree(tiny_dataset["cache"], cache)
    stacks = sorted(cache.glob("stacks/*/*.npz"))
    assert Stack.load(stacks[0]).array.ndim == 3  # readable before it is cut
    for path in stacks:
        _truncate(path)
    args = ["--config", "configs/rsna_spine/smoke.yaml", "--output-dir", str(tmp_path / "train"), "--data", str(cache),
            "--set", "train.stages=[localizer]", "--set", "localizer.series=[sag_t2]", "--set", "localizer.epochs=1"]
    assert run_cli(train_rsna.main, args) == 2
    line = _one_error_line(capsys)
    named = line.split(": ")[1]
    assert named.endswith(".npz") and any(named == str(p) for p in stacks), line
    assert "truncated or damaged" in line
    assert not (tmp_path / "train" / "checkpoint_last.pt").exists()


def test_truncated_series_descriptions_csv_is_one_line_naming_it(tiny_dataset, tmp_path, capsys):
    root, _ = _layout_with_series(tiny_dataset, tmp_path, 2)
    csv = root / "train_series_descriptions.csv"
    _truncate(csv, 0.3)  # the header ends inside its second column name
    assert run_cli(preprocess_rsna.main, _preprocess_args(root, tmp_path)) == 2
    line = _one_error_line(capsys)
    assert str(csv) in line and "missing column" in line


@pytest.mark.filterwarnings("ignore:End of file reached")
def test_preprocess_of_only_undecodable_series_exits_2(tiny_dataset, tmp_path, capsys):
    root, listed = _layout_with_series(tiny_dataset, tmp_path, 2)
    files = sorted((root / "train_images").rglob("*.dcm"))
    assert files
    for path in files:  # every file of both series cut in half: no series gives a stack
        _truncate(path)
    assert run_cli(preprocess_rsna.main, _preprocess_args(root, tmp_path)) == 2
    line = _one_error_line(capsys)
    assert f"0 of {len(listed)} listed series" in line and str(root) in line
    assert not (tmp_path / "run" / "summary.json").exists()
