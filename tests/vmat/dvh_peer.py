"""vmat/dvh.py against dicompyler-core on one DICOM-RT patient (the peer runs in its own interpreter,
tests/vmat/dvh_peer_dicompyler.py). Agreement criterion of issue 13: dose metrics within
max(1 % of the peer's value, 0.5 Gy), V_xGy within 1 percentage point."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pydicom

from vmat.case_io import load_case
from vmat.dvh import DVH_DEFAULTS, case_samples, metric_value

PEER_SCRIPT = Path(__file__).with_name("dvh_peer_dicompyler.py")
DOSE_METRICS = ["D99", "D98", "D95", "D50", "D2", "Dmean"]
V_GY = [20, 30, 40, 50, 60, 65, 70]


def peer_available(peer_python: str | None) -> bool:
    if not peer_python or not Path(peer_python).is_file():
        return False
    probe = subprocess.run([peer_python, "-c", "import dicompylercore"], capture_output=True)
    return probe.returncode == 0


def find_by_modality(folder: Path, modality: str) -> Path:
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            try:
                if pydicom.dcmread(path, stop_before_pixels=True).Modality == modality:
                    return path
            except pydicom.errors.InvalidDicomError:
                continue
    raise FileNotFoundError(f"{folder}: no {modality} file")


def within(metric: str, ours: float, peer: float) -> tuple[float, bool]:
    """(tolerance, agreement) of one metric pair: 1 point for V_xGy, else max(1 % of the peer, 0.5 Gy)."""
    tolerance = 1.0 if metric.startswith("V") else max(0.01 * abs(peer), 0.5)
    return tolerance, bool(abs(ours - peer) <= tolerance)


def compare_with_peer(raw_folder: Path, npz_path: Path, peer_python: str, resolution_mm: float | None = None,
                      segments: int = 0, dvh_cfg: dict | None = None) -> list[dict]:
    """One row per (structure, metric) of the structures drawn from a single ROI (sub-voxel contour DVHs);
    a structure dicompyler fails on gets one row with metric "peer_error" and its message."""
    case = load_case(npz_path)
    samples = case_samples(case, dvh_cfg or DVH_DEFAULTS)
    sources = case["meta"]["roi_sources"]
    single = {name: sources[name][0] for name, smp in samples.items()
              if len(sources.get(name, [])) == 1 and smp.method == "contour"}
    metrics = DOSE_METRICS + [f"V{x}Gy" for x in V_GY]
    request = {roi: metrics for roi in single.values()}
    command = [peer_python, str(PEER_SCRIPT), str(find_by_modality(raw_folder, "RTSTRUCT")),
               str(find_by_modality(raw_folder, "RTDOSE")), json.dumps(request)]
    if resolution_mm:
        command += ["--resolution-mm", str(resolution_mm), "--segments", str(segments)]
    done = subprocess.run(command, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"dicompyler-core peer failed: {done.stderr.strip()[-2000:]}")
    peer = json.loads(done.stdout)
    rows = []
    for name, roi in single.items():
        if "error" in peer[roi]:
            rows.append({"case": npz_path.stem, "structure": name, "metric": "peer_error", "error": peer[roi]["error"]})
            continue
        dvh = samples[name].dvh(np.asarray(case["dose"]))
        for metric in metrics:
            ours = metric_value(dvh, metric if metric == "Dmean" or metric.startswith("V") else metric + "%", 1.0)
            tolerance, ok = within(metric, ours, peer[roi][metric])
            rows.append({"case": npz_path.stem, "structure": name, "metric": metric, "ours": ours,
                         "peer": peer[roi][metric], "difference": ours - peer[roi][metric], "tolerance": tolerance,
                         "agrees": ok})
    return rows


if __name__ == "__main__":  # python tests/vmat/dvh_peer.py RAW_FOLDER CASE.npz PEER_PYTHON [RESOLUTION_MM SEGMENTS]
    extra = [float(sys.argv[4]), int(sys.argv[5])] if len(sys.argv) > 5 else []
    for row in compare_with_peer(Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3], *extra):
        print(json.dumps(row))
