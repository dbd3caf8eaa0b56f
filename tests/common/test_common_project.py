"""Project-wide rules: every script has --help and a README line, configs load, recipes are cmd.exe-safe,
no module shadows the standard library, the demo report lists what is there and what is missing."""

import importlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

import common.demo as demo
from common.checkpoint import project_packages
from common.report import build_report

ROOT = Path(__file__).resolve().parents[2]
DOMAINS = [p for p in project_packages() if p != "common"]  # discovered: a new domain folder is checked too
SCRIPT_PREFIXES = ("preprocess_", "train_", "validate_", "predict_", "benchmark_", "generate_")
SCRIPTS = sorted(p for d in DOMAINS for p in (ROOT / d).glob("*.py") if p.name.startswith(SCRIPT_PREFIXES))


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_script_has_help_readme_line_and_smoke_config(script, capsys):
    module = importlib.import_module(f"{script.parent.name}.{script.stem}")
    with pytest.raises(SystemExit) as info:
        module.main(["--help"])
    assert info.value.code == 0
    help_text = capsys.readouterr().out
    assert "--config" in help_text and "--set" in help_text and "--output-dir" in help_text
    readme = (script.parent / "README.md").read_text(encoding="utf-8")
    module_path = f"{script.parent.name}.{script.stem}"
    assert script.name in readme or module_path in readme, f"{script.parent.name}/README.md does not mention {script.name}"
    assert (ROOT / "configs" / script.parent.name / "smoke.yaml").is_file()


def test_demo_help_and_config_errors_are_one_line(capsys):
    with pytest.raises(SystemExit) as info:
        demo.main(["--help"])
    assert info.value.code == 0
    assert "--resume" in capsys.readouterr().out
    with pytest.raises(SystemExit, match=r"unknown config key 'train.lrr'.*Did you mean 'lr'"):
        demo.main(["--set", "train.lrr=1", "--device", "cpu"])


def test_no_module_shadows_the_standard_library():
    offenders = [p.relative_to(ROOT).as_posix() for d in ["common", "tools", *DOMAINS]
                 for p in (ROOT / d).glob("*.py") if p.stem in sys.stdlib_module_names]
    assert offenders == []


def test_makefile_recipes_are_python_only_under_cmd(tmp_path):
    make = shutil.which("make")
    if make is None:
        pytest.skip("make is not installed")
    # Under `make test` the parent make exports MAKEFLAGS/MAKELEVEL, which would make the child print
    # "Entering directory" lines; the check is about the recipes a user's own `make demo` would run.
    env = {k: v for k, v in os.environ.items() if k not in {"MAKEFLAGS", "MAKELEVEL", "MFLAGS", "MAKEOVERRIDES"}}
    done = subprocess.run([make, "-n", "--no-print-directory", "OS=Windows_NT", "demo"], cwd=ROOT,
                          capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    lines = [line for line in done.stdout.splitlines() if line.strip()]
    assert lines, "make -n printed nothing"
    for line in lines:
        assert line.startswith((".venv\\Scripts\\python.exe ", "python ")), line
        assert "'" not in line and " && " not in line and "rm -rf" not in line, line


def test_report_lists_headlines_figures_and_missing_domains(tmp_path):
    (tmp_path / "common" / "figures").mkdir(parents=True)
    (tmp_path / "common" / "summary.json").write_text(json.dumps(
        {"headline": {"val_mae": 0.25, "r2": None}, "figures": ["figures/curves.png"]}), encoding="utf-8")
    (tmp_path / "asl").mkdir()
    text = build_report(tmp_path, tmp_path / "REPORT.md")
    assert "| val_mae | 0.25 |" in text and "| r2 | None |" in text
    assert "![curves](common/figures/curves.png)" in text
    assert "ASL" in text and "did not complete" in text
    assert (tmp_path / "REPORT.md").read_text(encoding="utf-8") == text


@pytest.mark.parametrize("script", SCRIPTS, ids=lambda p: f"{p.parent.name}/{p.name}")
def test_every_script_follows_the_error_and_flag_contract(script, capsys):
    """One-line errors through run_cli; training scripts can be stopped mid-epoch and resumed."""
    text = script.read_text(encoding="utf-8")
    assert "raise SystemExit(run_cli(main))" in text, f"{script.name}: __main__ must use common.errors.run_cli"
    module = importlib.import_module(f"{script.parent.name}.{script.stem}")
    with pytest.raises(SystemExit):
        module.main(["--help"])
    help_text = capsys.readouterr().out
    assert "--debug" in help_text and "--device" in help_text and "--seed" in help_text
    if script.name.startswith("train_"):
        assert "--resume" in help_text and "--stop-after-steps" in help_text
