"""The one-line error contract of the vmat scripts: a damaged input file exits with code 2 and one
``error:`` line naming the file (no traceback), for each vmat error class, with real truncated files."""

import copy
import shutil

import numpy as np
import pytest
import torch

from common.errors import run_cli
from tests.vmat.conftest import TINY


def truncate(path):
    """Cut a file to half its bytes, as an interrupted copy would."""
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def one_error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def npz_copy(tiny_npz, tmp_path):
    """A private copy of the preprocessed tiny cases (so tests may damage files)."""
    folder = tmp_path / "npz"
    folder.mkdir()
    for path in tiny_npz.glob("*.npz"):
        shutil.copy(path, folder / path.name)
    return folder


def test_truncated_case_npz(npz_copy, tmp_path, capsys):
    from vmat.validate_vmat import main as validate

    bad = truncate(sorted(npz_copy.glob("*.npz"))[0])
    code = run_cli(validate, ["--data", str(npz_copy), "--predictions", str(tmp_path), "--output-dir", str(tmp_path / "v")])
    assert code == 2
    line = one_error_line(capsys)
    assert str(bad) in line and "truncated or damaged" in line


def test_truncated_prediction_npz_is_a_case_file_error(npz_copy, tmp_path, capsys):
    from common.runlog import save_npz_atomic
    from vmat.case_io import CaseFileError, load_case, load_prediction
    from vmat.validate_vmat import main as validate

    pred = tmp_path / "pred"
    pred.mkdir()
    for path in sorted(npz_copy.glob("*.npz")):
        save_npz_atomic(pred / path.name, dose=np.asarray(load_case(path)["dose"]))
    bad = truncate(sorted(pred.glob("*.npz"))[0])
    with pytest.raises(CaseFileError, match="truncated or damaged"):
        load_prediction(bad)
    code = run_cli(validate, ["--data", str(npz_copy), "--predictions", str(pred), "--output-dir", str(tmp_path / "v")])
    assert code == 2 and str(bad) in one_error_line(capsys)


def test_truncated_structure_map(tiny_raw, tmp_path, capsys):
    from vmat.preprocess_vmat import main as preprocess

    smap = tmp_path / "map.json"
    shutil.copy("configs/vmat/structure_map.json", smap)
    truncate(smap)
    code = run_cli(preprocess, ["--data", str(tiny_raw), "--output-dir", str(tmp_path / "out"),
                                "--set", f"preprocess.structures.map_file={smap.as_posix()}"])
    assert code == 2
    line = one_error_line(capsys)
    assert str(smap) in line and "not valid JSON" in line


def test_no_case_preprocessed_exits_non_zero_naming_the_truncated_file(tmp_path, capsys):
    """A batch whose only case has a truncated CT slice (a CaseError, recorded in the manifest) processed
    0 of 1 cases: NothingProcessedError, exit 2, the line names the slice."""
    from vmat.phantom import generate_case, write_case
    from vmat.preprocess_vmat import main as preprocess

    case = generate_case(copy.deepcopy(TINY), 0, 0)
    folder = write_case(case, tmp_path / "raw" / case.case_id, TINY, 0)
    bad = truncate(sorted(folder.rglob("IM*"))[5])
    code = run_cli(preprocess, ["--data", str(tmp_path / "raw"), "--output-dir", str(tmp_path / "out")])
    assert code == 2
    line = one_error_line(capsys)
    assert "none of the 1 case(s)" in line and str(bad) in line and "ct_unreadable" in line
    assert not list((tmp_path / "out").glob("*.npz"))
    assert (tmp_path / "out" / "manifest.csv").is_file()


def test_truncated_checkpoint(npz_copy, tmp_path, capsys):
    from vmat.predict_vmat import main as predict

    bad = tmp_path / "checkpoint_best.pt"
    torch.save({"state_dict": {"w": torch.zeros(4096)}}, bad)
    truncate(bad)
    code = run_cli(predict, ["--checkpoint", str(bad), "--data", str(npz_copy), "--output-dir", str(tmp_path / "p")])
    assert code == 2 and str(bad) in one_error_line(capsys)
