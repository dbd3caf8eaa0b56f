"""DVH metrics from dicompyler-core (``dicompylercore.dvhcalc.get_dvh``), the open clinical DVH calculator,
for comparison with vmat/dvh.py. It runs under an interpreter that has dicompyler-core installed (a
separate environment: it is not a project dependency) and imports nothing from this project:

    PEER_PYTHON tests/vmat/dvh_peer_dicompyler.py RTSTRUCT RTDOSE REQUEST_JSON [--resolution-mm R --segments S]

REQUEST_JSON: {"ROI name": ["D95", "Dmean", "V50Gy", ...]}. Prints JSON {"ROI name": {metric: value}}:
D<x> in Gy (the dose covering x % of the volume), Dmean in Gy, V<x>Gy in % of the volume.
``--resolution-mm`` / ``--segments``: dicompyler's in-plane interpolation of structure and dose
(``interpolation_resolution``, with ``use_structure_extents``) and contour planes interpolated between
slices (``interpolation_segments_between_planes``); without them it works on the RTDOSE grid as stored.
Either way it samples the dose only on the contour planes (and the interpolated ones between them).
"""

import argparse
import json

from dicompylercore import dicomparser, dvhcalc


def peer_metrics(rtstruct: str, rtdose: str, request: dict, resolution_mm: float | None = None,
                 segments: int = 0) -> dict:
    numbers = {s["name"]: number for number, s in dicomparser.DicomParser(rtstruct).GetStructures().items()}
    out = {}
    for name, metrics in request.items():
        if name not in numbers:
            raise SystemExit(f"{rtstruct}: no ROI named {name!r} (have {sorted(numbers)})")
        # interpolation needs use_structure_extents (without it dicompyler-core 0.5.6 fails on a mask/dose
        # size mismatch)
        try:
            dvh = dvhcalc.get_dvh(rtstruct, rtdose, numbers[name], use_structure_extents=bool(resolution_mm),
                                  interpolation_resolution=(resolution_mm, resolution_mm) if resolution_mm else None,
                                  interpolation_segments_between_planes=int(segments))
        except Exception as exc:  # dicompyler's own failure on this ROI: reported, not compared
            out[name] = {"error": f"{type(exc).__name__}: {exc}"}
            continue
        relative = dvh.relative_volume
        row = {}
        for metric in metrics:  # D95 / V50Gy on the relative-volume DVH: Gy / % of the volume
            row[metric] = float(dvh.mean) if metric == "Dmean" else float(relative.statistic(metric).value)
        row["volume_cc"] = float(dvh.volume)
        out[name] = row
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("rtstruct")
    parser.add_argument("rtdose")
    parser.add_argument("request", help="JSON {ROI name: [metrics]}")
    parser.add_argument("--resolution-mm", type=float, default=None)
    parser.add_argument("--segments", type=int, default=0)
    args = parser.parse_args()
    print(json.dumps(peer_metrics(args.rtstruct, args.rtdose, json.loads(args.request), args.resolution_mm,
                                  args.segments)))


if __name__ == "__main__":
    main()
