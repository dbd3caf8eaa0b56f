"""A sixth domain starts from tools/domain_template with no edit to common/ or the project-wide tests."""

import importlib.util
import sys
from pathlib import Path

import pytest

import common.checkpoint as checkpoint

ROOT = Path(__file__).resolve().parents[2]


def _load(path: Path, name: str):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_new_domain_from_the_template_trains_resumes_and_validates(tmp_path, monkeypatch):
    new_domain = _load(ROOT / "tools" / "new_domain.py", "new_domain")
    files = new_domain.create_domain("sixth_check", tmp_path)
    rel = {p.relative_to(tmp_path).as_posix() for p in files}
    assert {"sixth_check/train_sixth_check.py", "sixth_check/validate_sixth_check.py", "mk/sixth_check.mk",
            "configs/sixth_check/smoke.yaml", "tests/sixth_check/test_sixth_check_pipeline.py"} <= rel
    text = (tmp_path / "sixth_check" / "models.py").read_text(encoding="utf-8")
    assert "class SixthCheckNet" in text and "__domain__" not in text
    with pytest.raises(SystemExit, match="already exists"):
        new_domain.create_domain("sixth_check", tmp_path)

    # The generated folder sits in tmp_path here instead of the repository root: make that a project root.
    monkeypatch.setattr(checkpoint, "PROJECT_ROOTS", [*checkpoint.PROJECT_ROOTS, tmp_path])
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert "sixth_check" in checkpoint.project_packages()
    try:
        generated = _load(tmp_path / "tests/sixth_check/test_sixth_check_pipeline.py", "generated_test")
        generated.test_pipeline_resumes_exactly_and_beats_the_mean(tmp_path / "work")
        train = importlib.import_module("sixth_check.train_sixth_check")
        with pytest.raises(SystemExit) as info:
            train.main(["--help"])
        assert info.value.code == 0
    finally:
        for name in [m for m in sys.modules if m == "sixth_check" or m.startswith("sixth_check.")]:
            del sys.modules[name]
