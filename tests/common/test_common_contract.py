"""The run contract (common/README.md): run-folder integrity, checkpoint trust, one-line errors, signals."""

import errno
import json
import os
import signal
import socket
import subprocess
import sys
import zipfile

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

import common.demo as demo
from common.checkpoint import (
    CheckpointError,
    build_model,
    load_model,
    project_packages,
    resolve_checkpoints,
    save_checkpoint,
    warm_start,
    write_ensemble_manifest,
)
from common.errors import InputError, RunFolderError, run_cli
from common.files import load_npy, load_npz
from common.runfolder import RunLock, config_differences, pid_alive
from common.runlog import append_csv_row, atomic_open, read_csv_rows, save_npz_atomic
from common.runtime import GracefulInterrupt, choose_backend

ROOT = Path(__file__).resolve().parents[2]
SMALL = ["--config", "configs/common/demo.yaml", "--device", "cpu", "--set", "data.n_train=128",
         "--set", "data.n_val=32", "--set", "train.epochs=2"]


def truncate(path, fraction=0.5):
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * fraction)])
    return path


# ------------------------------------------------------------------------------------ run folder
def test_a_second_run_into_a_locked_folder_names_the_running_pid(tmp_path, capsys):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "run.lock").write_text(json.dumps({"pid": holder.pid, "host": socket.gethostname()}))
        code = run_cli(demo.main, SMALL + ["--output-dir", str(tmp_path)])
        assert code == 2
        assert f"another run (pid {holder.pid}) is writing to this folder" in capsys.readouterr().err
        assert not (tmp_path / "config.yaml").exists() and not (tmp_path / "metrics.csv").exists()
        with pytest.raises(RunFolderError, match=f"pid {holder.pid}"):
            RunLock(tmp_path).acquire()
    finally:
        holder.kill()
        holder.wait()


def test_a_dead_runs_lock_is_taken_over_and_released_at_the_end(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)
    assert not pid_alive(pid)
    (tmp_path / "run.lock").write_text(json.dumps({"pid": pid, "host": socket.gethostname()}))
    demo.main(SMALL + ["--output-dir", str(tmp_path)])
    assert not (tmp_path / "run.lock").exists()
    assert "no longer running" in (tmp_path / "log.txt").read_text(encoding="utf-8")


def test_resume_cuts_metrics_back_removes_temporaries_and_restores_a_lost_row(tmp_path):
    out = tmp_path / "run"
    demo.main(SMALL + ["--output-dir", str(out), "--set", "train.epochs=3", "--stop-after-steps", "9"])
    rows = read_csv_rows(out / "metrics.csv")
    assert [r["epoch"] for r in rows] == ["1", "2"]
    # As if killed after epoch 2's checkpoint but before its metrics row, with a checkpoint write half done
    # and a stray row from a later step.
    ckpt = torch.load(out / "checkpoint_last.pt", weights_only=True)
    assert ckpt["extra"]["partial_epoch"]["batches_done"] == 1
    (out / "metrics.csv").write_text("epoch,step,train_loss\n1,4,0.5\n7,99,0.1\n", encoding="utf-8")
    stale = out / "checkpoint_last.pt.abc123.tmp"
    stale.write_bytes(b"partial")
    demo.main(SMALL + ["--output-dir", str(out), "--set", "train.epochs=3", "--resume"])
    assert not stale.exists()
    steps = [r["step"] for r in read_csv_rows(out / "metrics.csv")]
    assert steps == ["4", "12"]  # the stray step-99 row is gone; epoch 3 (step 12) appended once
    assert "removed 1 temporary file" in (out / "log.txt").read_text(encoding="utf-8")


def test_resume_that_changes_the_model_is_refused_and_config_yaml_kept(tmp_path):
    out = tmp_path / "run"
    demo.main(SMALL + ["--output-dir", str(out), "--stop-after-steps", "3"])
    before = (out / "config.yaml").read_text(encoding="utf-8")
    code = run_cli(demo.main, SMALL + ["--output-dir", str(out), "--resume", "--set", "model.hidden=[16,16]"])
    assert code == 2
    assert (out / "config.yaml").read_text(encoding="utf-8") == before
    assert yaml.safe_load(before)["model"]["hidden"] == [64, 64]


def test_resume_change_message_lists_the_keys(tmp_path, capsys):
    out = tmp_path / "run"
    demo.main(SMALL + ["--output-dir", str(out), "--stop-after-steps", "3"])
    capsys.readouterr()
    run_cli(demo.main, SMALL + ["--output-dir", str(out), "--resume", "--set", "model.hidden=[16,16]",
                                "--set", "data.n_features=4"])
    err = capsys.readouterr().err.strip().splitlines()
    assert err[0].startswith("error: ") and "model.hidden: [64, 64] -> [16, 16]" in err[0]
    assert "data.n_features: 8 -> 4" in err[0]
    assert "Traceback" not in "\n".join(err)


def test_config_differences_reports_leaves_and_absent_keys():
    diffs = config_differences({"a": {"b": 1, "c": [1, 2]}, "d": 1}, {"a": {"b": 1.0, "c": [1, 3]}, "e": 2})
    assert [d[0] for d in diffs] == ["a.c", "d", "e"]


def test_files_follow_the_umask(tmp_path):
    old = os.umask(0o002)
    try:
        with atomic_open(tmp_path / "x.bin") as handle:
            handle.write(b"1")
        save_npz_atomic(tmp_path / "a.npz", x=np.zeros(2))
    finally:
        os.umask(old)
    assert (tmp_path / "x.bin").stat().st_mode & 0o777 == 0o664
    assert (tmp_path / "a.npz").stat().st_mode & 0o777 == 0o664


def test_metrics_append_retries_then_names_the_file(tmp_path, monkeypatch):
    import common.runlog as runlog

    calls = {"n": 0}
    real = runlog._append_csv_row

    def flaky(path, row):
        calls["n"] += 1
        if calls["n"] < 3:
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        real(path, row)

    monkeypatch.setattr(runlog, "_append_csv_row", flaky)
    append_csv_row(tmp_path / "m.csv", {"epoch": 1}, wait_s=0.0)
    assert read_csv_rows(tmp_path / "m.csv") == [{"epoch": "1"}]

    def locked(path, row):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(runlog, "_append_csv_row", locked)
    with pytest.raises(Exception, match=r"m\.csv: cannot write .*open in another program"):
        append_csv_row(tmp_path / "m.csv", {"epoch": 2}, retries=2, wait_s=0.0)


# ------------------------------------------------------------------------------------- signals
@pytest.mark.skipif(not hasattr(signal, "SIGTERM") or os.name == "nt", reason="POSIX signal delivery")
def test_sigterm_is_a_graceful_stop_like_ctrl_c():
    with GracefulInterrupt() as interrupt:
        os.kill(os.getpid(), signal.SIGTERM)
        assert interrupt.requested and interrupt.reason == "SIGTERM"
    assert signal.getsignal(signal.SIGTERM) in (signal.SIG_DFL, None) or not isinstance(
        signal.getsignal(signal.SIGTERM), type(interrupt._handler))


GROUP_STOP_SCRIPT = """
import os, subprocess, sys, time
import torch
from torch.utils.data import DataLoader, Dataset
from common.runtime import GracefulInterrupt, dataloader_kwargs

class Slow(Dataset):
    def __len__(self):
        return 64

    def __getitem__(self, i):
        time.sleep(0.02)
        return torch.tensor([float(i)])

loader = DataLoader(Slow(), batch_size=2, **dataloader_kwargs(torch.device("cpu"), 2, seed=0, start_method="fork"))
seen = 0
with GracefulInterrupt() as stop:
    for batch in loader:
        seen += 1
        if seen == 2:  # SIGTERM to the whole process group from another process, as `timeout` or a scheduler sends
            subprocess.run(["kill", "-s", "TERM", "--", f"-{os.getpgrp()}"], check=False)
        time.sleep(0.2)  # the step goes on while the signal arrives
        if stop.requested:
            break
print(f"stopped after {seen} batches: {stop.reason}")
"""


@pytest.mark.skipif(os.name == "nt" or not hasattr(os, "killpg"), reason="POSIX process groups")
def test_group_sigterm_stops_the_loop_without_killing_dataloader_workers(tmp_path):
    script = tmp_path / "group_stop.py"
    script.write_text(GROUP_STOP_SCRIPT, encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120, env=env,
                          start_new_session=True)  # its own group: the signal stays away from pytest
    assert done.returncode == 0, done.stderr
    assert "stopped after 2 batches: SIGTERM" in done.stdout
    assert "killed by signal" not in done.stderr


def test_backend_is_gloo_without_nccl(monkeypatch):
    import torch.distributed as dist

    monkeypatch.delenv("DIST_BACKEND", raising=False)
    assert choose_backend(torch.device("cpu")) == "gloo"
    monkeypatch.setattr(dist, "is_nccl_available", lambda: False)
    assert choose_backend(torch.device("cuda", 0)) == "gloo"  # e.g. Windows builds of torch
    monkeypatch.setattr(dist, "is_nccl_available", lambda: True)
    assert choose_backend(torch.device("cuda", 0)) == "nccl"


# ------------------------------------------------------------------------------- checkpoint trust
def test_a_checkpoint_naming_a_non_model_callable_is_refused_before_it_is_called(tmp_path):
    victim = tmp_path / "written_by_exploit.txt"
    model = build_model("common.demo.TinyRegressor", {"n_features": 2, "hidden": [3]})
    path = save_checkpoint(tmp_path / "evil.pt", model, domain="common",
                           spec={"target": "common.runlog.write_text_atomic",
                                 "kwargs": {"path": str(victim), "text": "pwned"}})
    with pytest.raises(CheckpointError, match="not a registered model class"):
        load_model(path)
    assert not victim.exists()
    for target in ("os.system", "builtins.eval", "torch.nn.Linear"):
        bad = save_checkpoint(tmp_path / "bad.pt", model, domain="common", spec={"target": target, "kwargs": {}})
        with pytest.raises(CheckpointError):
            load_model(bad)


def test_domains_are_discovered():
    packages = project_packages()
    assert {"common", "asl", "vmat", "rsna_spine", "lensing", "abr"} <= set(packages)
    assert "tests" not in packages


def test_warm_start_reports_and_refuses_a_foreign_checkpoint(tmp_path):
    source = build_model("common.demo.TinyRegressor", {"n_features": 4, "hidden": [8]})
    path = save_checkpoint(tmp_path / "src.pt", source, domain="common")
    same = build_model("common.demo.TinyRegressor", {"n_features": 4, "hidden": [8]})
    lines = []
    report = warm_start(same, path, min_fraction=0.9, log=lines.append)
    assert report["matched"] == report["total"] == 4 and "initialised 4/4" in lines[0]
    for key, value in same.state_dict().items():
        assert torch.equal(value, source.state_dict()[key])
    other = build_model("common.demo.TinyRegressor", {"n_features": 5, "hidden": [8, 8]})
    with pytest.raises(CheckpointError, match=r"only \d+ of 6 tensors fit this model"):
        warm_start(other, path, min_fraction=0.9)


def test_checkpoint_paths_file_run_folder_and_ensemble_manifest(tmp_path):
    model = build_model("common.demo.TinyRegressor", {"n_features": 2, "hidden": [3]})
    for i in (1, 0, 10):
        save_checkpoint(tmp_path / "run" / f"member_{i}" / "checkpoint_best.pt", model, domain="common")
    members = resolve_checkpoints(tmp_path / "run")
    assert [p.parent.name for p in members] == ["member_0", "member_1", "member_10"]
    write_ensemble_manifest(tmp_path / "run", ["member_1/checkpoint_best.pt", "member_0/checkpoint_best.pt"])
    assert [p.parent.name for p in resolve_checkpoints(tmp_path / "run")] == ["member_1", "member_0"]
    assert resolve_checkpoints(members[0]) == [members[0]]
    # members named relative to the working directory, as scripts run from the repository root do
    os.chdir(tmp_path)
    try:
        write_ensemble_manifest("run", [Path("run/member_10/checkpoint_best.pt")])
    finally:
        os.chdir(ROOT)
    assert json.loads((tmp_path / "run" / "ensemble.json").read_text())["members"] == ["member_10/checkpoint_best.pt"]
    with pytest.raises(CheckpointError, match="no checkpoint here"):
        resolve_checkpoints(tmp_path)


# --------------------------------------------------------------------------------------- errors
def test_truncated_npz_and_npy_name_the_file(tmp_path):
    np.savez(tmp_path / "case.npz", dose=np.ones((8, 8, 8)), ct=np.zeros((8, 8, 8)))
    assert set(load_npz(tmp_path / "case.npz", required=["dose"])) == {"dose", "ct"}
    truncate(tmp_path / "case.npz")
    with pytest.raises(InputError, match=r"case\.npz: not a readable NPZ"):
        load_npz(tmp_path / "case.npz")
    np.save(tmp_path / "a.npy", np.arange(1000.0))
    truncate(tmp_path / "a.npy", 0.3)
    with pytest.raises(InputError, match=r"a\.npy: not a readable \.npy"):
        load_npy(tmp_path / "a.npy")
    np.savez(tmp_path / "ok.npz", x=np.ones(2))
    with pytest.raises(InputError, match=r"missing array\(s\) \['dose'\]"):
        load_npz(tmp_path / "ok.npz", required=["dose"])


def test_run_cli_truncated_checkpoint_one_line_exit_2(tmp_path, capsys):
    out = tmp_path / "run"
    demo.main(SMALL + ["--output-dir", str(out), "--stop-after-steps", "2"])
    truncate(out / "checkpoint_last.pt")
    capsys.readouterr()
    code = run_cli(demo.main, SMALL + ["--output-dir", str(out), "--resume"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and "checkpoint_last.pt" in err[0] and "not a readable checkpoint" in err[0]
    assert len(err) == 2 and "--debug" in err[1]
    with pytest.raises(CheckpointError):
        run_cli(demo.main, SMALL + ["--output-dir", str(out), "--resume", "--debug"])


def test_disk_full_during_a_checkpoint_write_is_one_line_and_leaves_no_temporary(tmp_path, monkeypatch, capsys):
    import common.checkpoint as checkpoint

    def full_disk(obj, handle):
        handle.write(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . PytorchStreamWriter failed writing file "
                           "data/3: file write failed")

    monkeypatch.setattr(checkpoint.torch, "save", full_disk)
    out = tmp_path / "run"
    code = run_cli(demo.main, SMALL + ["--output-dir", str(out)])
    err = capsys.readouterr().err
    assert code == 2 and "disk full" in err and "checkpoint" in err and "Traceback" not in err
    assert not list(out.glob("*.tmp"))
    assert json.loads((out / "run_state.json").read_text())["status"] == "failed"
    assert not (out / "run.lock").exists()


def test_bad_zip_from_a_library_is_still_one_line(tmp_path, capsys):
    def main(argv=None):
        (tmp_path / "x.zip").write_bytes(b"not a zip")
        zipfile.ZipFile(tmp_path / "x.zip")

    assert run_cli(main, []) == 2
    assert capsys.readouterr().err.startswith("error: File is not a zip file")


def test_unknown_errors_keep_their_traceback():
    def main(argv=None):
        raise ZeroDivisionError("bug")

    with pytest.raises(ZeroDivisionError):
        run_cli(main, [])


def test_script_subprocess_exit_code_and_single_line(tmp_path):
    np.savez(tmp_path / "x.npz", a=np.ones(3))
    truncate(tmp_path / "x.npz")
    code = ("import sys; from common.errors import run_cli; from common.files import load_npz\n"
            "def main(argv=None):\n    load_npz(sys.argv[1])\n"
            "raise SystemExit(run_cli(main))\n")
    done = subprocess.run([sys.executable, "-c", code, str(tmp_path / "x.npz")], capture_output=True, text=True,
                          cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert done.returncode == 2
    assert done.stderr.splitlines()[0].startswith(f"error: {tmp_path / 'x.npz'}: not a readable NPZ")


def test_torchrun_stop_mid_epoch_then_resume_on_two_gloo_ranks(tmp_path):
    """Both ranks stop at the same step (the stop is reduced over ranks: none hangs) and resume exactly."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    base = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "common.demo",
            "--config", os.path.join(root, "configs/common/demo.yaml"), "--device", "cpu", "--set", "train.epochs=2",
            "--set", "data.n_train=256", "--set", "data.n_val=64"]
    env = {**os.environ, "PROGRESS": "0", "OMP_NUM_THREADS": "1"}
    full, cut = tmp_path / "full", tmp_path / "cut"
    runs = [base + ["--output-dir", str(full)], base + ["--output-dir", str(cut), "--stop-after-steps", "6"],
            base + ["--output-dir", str(cut), "--resume"]]
    for i, cmd in enumerate(runs):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=root, timeout=300)
        assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
        if i == 1:
            state = json.loads((cut / "run_state.json").read_text(encoding="utf-8"))
            assert state["status"] == "interrupted" and state["step"] == 6
    a = torch.load(full / "checkpoint_last.pt", weights_only=True)["state_dict"]
    b = torch.load(cut / "checkpoint_last.pt", weights_only=True)["state_dict"]
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=1e-6, atol=1e-7)
    assert json.loads((cut / "summary.json").read_text(encoding="utf-8"))["ddp_max_weight_spread"] == 0.0


def test_truncated_nifti_dicom_and_csv_name_the_file(tmp_path):
    import nibabel as nib
    import pydicom
    from pydicom.dataset import FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    from common.dicom_series import load_volume
    from common.files import load_nifti, read_csv

    image = nib.Nifti1Image(np.random.default_rng(0).normal(size=(16, 16, 8)).astype(np.float32), np.eye(4))
    nib.save(image, tmp_path / "cbf.nii.gz")
    data, _ = load_nifti(tmp_path / "cbf.nii.gz")
    assert data.shape == (16, 16, 8)
    truncate(tmp_path / "cbf.nii.gz", 0.6)
    with pytest.raises(InputError, match=r"cbf\.nii\.gz: not a readable NIfTI"):
        load_nifti(tmp_path / "cbf.nii.gz")

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = "1.2.840.10008.5.1.4.1.1.2", generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = pydicom.Dataset()
    ds.file_meta = meta
    ds.Rows = ds.Columns = 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.ImagePositionPatient, ds.ImageOrientationPatient = [0, 0, 0], [1, 0, 0, 0, 1, 0]
    ds.PixelSpacing, ds.SliceThickness = [1, 1], 1
    ds.PixelData = np.zeros((8, 8), np.int16).tobytes()
    ds.save_as(tmp_path / "slice.dcm", enforce_file_format=True)
    truncate(tmp_path / "slice.dcm", 0.7)
    with pytest.raises(InputError, match=r"slice\.dcm"):
        load_volume([tmp_path / "slice.dcm"])

    (tmp_path / "table.csv").write_bytes(b"id,age\n1,3\n" + bytes([0xFF, 0xFE, 0x00]) * 10)
    with pytest.raises(InputError, match=r"table\.csv: not a readable CSV"):
        read_csv(tmp_path / "table.csv")
    (tmp_path / "ok.csv").write_text("id,age\n1,3\n")
    with pytest.raises(InputError, match=r"missing column\(s\) \['ear'\]"):
        read_csv(tmp_path / "ok.csv", required=["id", "ear"])
