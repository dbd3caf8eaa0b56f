"""vmat/dvh.py against dicompyler-core on one DICOM-RT patient (the peer runs in its own interpreter,
tests/vmat/dvh_peer_dicompyler.py). Agreement criterion of issue 13: dose metrics within
max(1 % of the peer's value, 0.5 Gy), V_xGy within 1 percentage point.

Where the two disagree, ``analytic_reference`` says which one is right on a synthetic patient: the
generator's analytic solids (vmat/phantom_anatomy.py) sampled on a fine lattice (default 0.5 mm; 0.3 mm
moved no metric by more than 0.04 Gy / points), each point reading the RTDOSE trilinearly, the way both
tools read it. It is the DVH the contours approximate, not a third implementation of them.

    python tests/vmat/dvh_peer.py RAW/synth_000 NPZ/synth_000.npz PEER_PYTHON [--truth configs/vmat/phantom.yaml]
"""

from __future__ import annotations

import copy
import json
import subprocess
from pathlib import Path

import numpy as np
import pydicom

from vmat.case_io import load_case
from vmat.dvh import DVH_DEFAULTS, case_samples, metric_value, reference_dose

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
    dvh_cfg = dvh_cfg or DVH_DEFAULTS
    samples = case_samples(case, dvh_cfg)
    dose, grid = reference_dose(case, dvh_cfg)  # as validate_vmat reads the reference
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
        dvh = samples[name].dvh(dose, grid)
        for metric in metrics:
            ours = metric_value(dvh, metric if metric == "Dmean" or metric.startswith("V") else metric + "%", 1.0)
            tolerance, ok = within(metric, ours, peer[roi][metric])
            rows.append({"case": npz_path.stem, "structure": name, "metric": metric, "ours": ours,
                         "peer": peer[roi][metric], "difference": ours - peer[roi][metric], "tolerance": tolerance,
                         "agrees": ok})
    return rows


def analytic_reference(phantom_cfg: dict, index: int, seed: int, metrics: dict, step_mm: float = 0.5) -> dict:
    """{structure: {metric: value, "volume_cc": ...}} of synthetic patient ``index`` (vmat.phantom with
    ``phantom_cfg`` and ``seed``) from its analytic solids: lattice points of ``step_mm`` inside the solid
    and the body and within the RTDOSE grid's voxel centres, each reading the RTDOSE trilinearly.
    ``metrics``: {structure: ["D99", "Dmean", "V50Gy", ...]} (D<x> = D<x>%)."""
    from scipy import ndimage

    from vmat.dvh import SampledDVH
    from vmat.phantom import generate_case

    case = generate_case(copy.deepcopy(phantom_cfg), index, seed)
    dose = np.asarray(case.dose, np.float64)
    origin = np.asarray(case.dose_origin_xyz, np.float64)[::-1]  # z, y, x
    spacing = np.asarray(case.dose_spacing_zyx, np.float64)
    top = origin + spacing * (np.asarray(dose.shape) - 1)
    out = {}
    for name, wanted in metrics.items():
        solid = case.anatomy.structures[name]
        lo_xyz, hi_xyz = (np.asarray(v, np.float64) for v in solid.bbox())
        lo, hi = np.maximum(lo_xyz[::-1] - 1.0, origin), np.minimum(hi_xyz[::-1] + 1.0, top)
        ys = np.arange(lo[1], hi[1], step_mm) + step_mm / 2
        xs = np.arange(lo[2], hi[2], step_mm) + step_mm / 2
        yy, xx = np.meshgrid(ys, xs, indexing="ij")
        doses = []
        for z in np.arange(lo[0], hi[0], step_mm) + step_mm / 2:
            inside = solid.inside(xx, yy, z) & case.anatomy.body.inside(xx, yy, z)
            points = np.c_[np.full(int(inside.sum()), z), yy[inside], xx[inside]]
            doses.append(ndimage.map_coordinates(dose, ((points - origin) / spacing).T, order=1))
        d = np.concatenate(doses)
        dvh = SampledDVH(d, np.full(d.size, step_mm**3 / 1000.0))
        row = {m: metric_value(dvh, m if m == "Dmean" or m.startswith("V") else m + "%", 1.0) for m in wanted}
        out[name] = {**row, "volume_cc": dvh.total}
    return out


def _main() -> None:
    import argparse

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw_folder", type=Path)
    parser.add_argument("npz", type=Path)
    parser.add_argument("peer_python")
    parser.add_argument("--resolution-mm", type=float, default=None, help="dicompyler's in-plane interpolation")
    parser.add_argument("--segments", type=int, default=0, help="dicompyler's planes between contour planes")
    parser.add_argument("--truth", default=None, help="phantom config that generated RAW: add the analytic reference")
    parser.add_argument("--set", action="append", default=[], help="dvh.KEY=VALUE, e.g. dvh.end_cap=none")
    args = parser.parse_args()
    from common.config import load_config
    from vmat.defaults import VMAT_DEFAULTS

    cfg = load_config(args.truth, overrides=args.set, defaults=VMAT_DEFAULTS)
    rows = compare_with_peer(args.raw_folder, args.npz, args.peer_python, args.resolution_mm, args.segments,
                             cfg["dvh"])
    if args.truth:
        wanted: dict = {}
        for r in rows:
            if r["metric"] != "peer_error":
                wanted.setdefault(r["structure"], []).append(r["metric"])
        index = int(args.raw_folder.name.rsplit("_", 1)[-1])  # <prefix>_<NNN> (vmat.phantom)
        truth = analytic_reference(cfg["phantom"], index, int(cfg["seed"]), wanted)
        for r in rows:
            if r["metric"] != "peer_error":
                r["truth"] = truth[r["structure"]][r["metric"]]
                r["ours_minus_truth"], r["peer_minus_truth"] = r["ours"] - r["truth"], r["peer"] - r["truth"]
    for row in rows:
        print(json.dumps(row))


if __name__ == "__main__":
    _main()
