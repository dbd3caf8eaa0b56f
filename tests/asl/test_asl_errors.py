"""Every asl input-error class reaches the user as one line naming the file (common.errors.run_cli, exit 2),
tested with real damaged files: truncated phantom sets, in-vivo subjects and checkpoints."""

import shutil
from pathlib import Path

import pytest

from asl import predict_asl, preprocess_asl, train_asl, validate_asl
from asl.invivo import InvivoError
from asl.simulate import PhantomSetError
from common.errors import InputError, run_cli


def truncate(path: Path, fraction: float = 0.5) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])


def one_line_error(main, argv, capsys) -> str:
    """Run ``main`` through run_cli; assert exit 2 and one error line (plus the --debug hint); return the line."""
    capsys.readouterr()
    code = run_cli(main, argv)
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2, err
    assert len(err) == 2 and err[0].startswith("error: ") and "--debug" in err[1], err
    return err[0]


def test_error_classes_are_input_errors():
    assert issubclass(PhantomSetError, InputError) and issubclass(InvivoError, InputError)


def test_truncated_validation_set(pipeline, tmp_path, capsys):
    root, cfg, _, _ = pipeline
    data = tmp_path / "data"
    data.mkdir()
    shutil.copyfile(root / "data" / "val.npz", data / "val.npz")
    truncate(data / "val.npz")
    line = one_line_error(train_asl.main, [*cfg, "--data", str(data), "--output-dir", str(tmp_path / "run")], capsys)
    assert str(data / "val.npz") in line and "not a readable NPZ" in line
    assert not (tmp_path / "run" / "config.yaml").exists()  # refused inputs leave no config behind


def test_missing_and_mismatched_phantom_sets(pipeline, tmp_path, capsys):
    root, cfg, _, _ = pipeline
    line = one_line_error(train_asl.main, [*cfg, "--data", str(tmp_path / "empty"), "--output-dir", str(tmp_path / "a")],
                          capsys)
    assert "val.npz" in line and "run preprocess_asl.py first" in line
    line = one_line_error(train_asl.main, [*cfg, "--set", "physics.plds_ms=[500.0,1000.0]",
                                           "--output-dir", str(tmp_path / "b")], capsys)
    assert str(root / "data" / "val.npz") in line and "field 'physics.plds_ms'" in line


def test_truncated_invivo_subject(pipeline, tmp_path, capsys):
    root, cfg, _, _ = pipeline
    converted = preprocess_asl.main([*cfg, "--invivo", str(root / "data" / "synthetic_subject" / "bids"),
                                     "--output-dir", str(tmp_path / "invivo")])
    subject = Path(converted["invivo"])
    truncate(subject)
    line = one_line_error(predict_asl.main, [str(subject), "--checkpoint", str(root / "train"), *cfg,
                                             "--output-dir", str(tmp_path / "pred")], capsys)
    assert str(subject) in line and "not a readable NPZ" in line


def test_invivo_error_is_one_line(pipeline, tmp_path, capsys):
    root, cfg, _, _ = pipeline
    bids = tmp_path / "bids"
    shutil.copytree(root / "data" / "synthetic_subject" / "bids", bids)
    sidecar = next(bids.rglob("*_asl.json"))
    sidecar.write_text("{not json", encoding="utf-8")
    line = one_line_error(predict_asl.main, [str(bids), "--checkpoint", str(root / "train"), *cfg,
                                             "--output-dir", str(tmp_path / "pred")], capsys)
    assert sidecar.name in line and "not valid JSON" in line


def test_truncated_checkpoint(pipeline, tmp_path, capsys):
    root, cfg, _, _ = pipeline
    checkpoint = tmp_path / "member.pt"
    shutil.copyfile(root / "train" / "member_0" / "checkpoint_best.pt", checkpoint)
    truncate(checkpoint)
    line = one_line_error(validate_asl.main, ["--checkpoint", str(checkpoint), *cfg,
                                              "--output-dir", str(tmp_path / "val")], capsys)
    assert str(checkpoint) in line and "not a readable checkpoint" in line


@pytest.mark.parametrize("setting, message", [
    ("train.loss=l3", "train.loss must be one of"),
    ("physics.modes=[pasl]", "physics.modes must be"),
])
def test_config_value_errors_are_one_line(pipeline, tmp_path, setting, message, capsys):
    _, cfg, _, _ = pipeline
    line = one_line_error(train_asl.main, [*cfg, "--set", setting, "--output-dir", str(tmp_path / "run")], capsys)
    assert message in line
