"""Preprocess DICOM-RT cases (or the OpenKBP CSV layout) into per-case NPZ files + manifest.csv.

    python vmat/preprocess_vmat.py --config configs/vmat/preprocess.yaml --data RAW --output-dir OUT
    python vmat/preprocess_vmat.py --format openkbp --data open-kbp/provided-data/train-pats --output-dir OUT

RAW holds one folder per case with DICOM files of any names (identified by Modality, searched
recursively). Each case becomes OUT/<case>.npz (format in vmat/case_io.py) with CT (HU), dose on the CT
grid (Gy), structure masks and signed distance fields (mm-correct, clipped, scaled), spacing, origin,
prescription and the possible-dose (body) mask. OUT/manifest.csv lists every case with its status and,
for skipped cases, the reason (missing RTDOSE, non-SIB case, contour outside the CT, mixed frames of
reference, undecodable pixel data, failed sanity checks ...). A failing case never stops the batch and
never leaves a partial NPZ (files are written to a temporary name and renamed). OUT/preprocessing.json
records the channel list and settings that training copies into its checkpoints; OUT also holds the run
files (log.txt, config.yaml, env.json, summary.json). A batch in which no case could be used exits
non-zero. Settings: the ``preprocess`` section of the vmat config (vmat/defaults.py). (``--input`` and
``--output`` are deprecated spellings of ``--data`` and ``--output-dir``.)
"""

from __future__ import annotations

import logging
import time
import traceback
from concurrent.futures import ProcessPoolExecutor, as_completed
from multiprocessing import get_context
from pathlib import Path

import numpy as np

from common.cli import add_deprecated_alias, make_parser, start_run
from common.config import ConfigError
from common.errors import InputError, NothingProcessedError, run_cli
from common.runlog import progress, write_json, write_text_atomic
from vmat.case_io import write_case
from vmat.defaults import PREPROCESS_DEFAULTS, VMAT_DEFAULTS
from vmat.dicom_rt import CaseError, load_rt_case
from vmat.dvh import dose_at_volume_percent
from vmat.geometry import resample_to_grid, scaled_sdf
from vmat.structures import OPENKBP_STRUCTURES, PROSTATE_STRUCTURES, load_structure_map, target_dose_from_name

log = logging.getLogger(__name__)

# ------------------------------------------------------------------------------------------- grid ops
def _resample_case(arrays: dict, spacing, origin_xyz, new_spacing) -> tuple[dict, tuple, np.ndarray]:
    shape = arrays["ct"].shape
    extent = (np.array(shape) - 1) * np.array(spacing)
    new_shape = tuple(int(v) for v in np.floor(extent / np.array(new_spacing)) + 1)
    kw = {"src_origin_xyz": origin_xyz, "src_spacing_zyx": spacing, "dst_origin_xyz": origin_xyz,
          "dst_spacing_zyx": new_spacing, "dst_shape_zyx": new_shape}
    out = {"ct": resample_to_grid(arrays["ct"], default=-1000.0, **kw)}
    if arrays.get("dose") is not None:
        out["dose"] = np.clip(resample_to_grid(arrays["dose"], default=0.0, **kw), 0, None)
    else:
        out["dose"] = None
    out["masks"] = np.stack([resample_to_grid(m.astype(np.float32), **kw) >= 0.5 for m in arrays["masks"]])
    out["body"] = resample_to_grid(arrays["body"].astype(np.float32), **kw) >= 0.5
    # A resampled voxel is known only where every source voxel it interpolates from is.
    known = arrays.get("valid")
    known = np.ones(shape, bool) if known is None else np.asarray(known, bool)
    out["valid"] = resample_to_grid(known.astype(np.float32), **kw) >= 1.0 - 1e-6
    return out, tuple(float(v) for v in new_spacing), origin_xyz


def _crop_case(arrays: dict, spacing, origin_xyz, crop_shape, center_mask) -> tuple[dict, np.ndarray]:
    """Crop/pad to ``crop_shape`` around the centroid of ``center_mask``; origin follows the crop."""
    shape = np.array(arrays["ct"].shape)
    crop = np.array(crop_shape, dtype=int)
    center = np.round(np.argwhere(center_mask).mean(axis=0)).astype(int) if center_mask.any() else shape // 2
    start = center - crop // 2

    def take(volume, fill):
        out = np.full((*volume.shape[:-3], *crop), fill, dtype=volume.dtype)
        src_lo = np.maximum(start, 0)
        src_hi = np.minimum(start + crop, shape)
        dst_lo = src_lo - start
        dst_hi = dst_lo + (src_hi - src_lo)
        src = (..., *[slice(a, b) for a, b in zip(src_lo, src_hi)])
        dst = (..., *[slice(a, b) for a, b in zip(dst_lo, dst_hi)])
        out[dst] = volume[src]
        return out

    out = {"ct": take(arrays["ct"], -1000.0), "masks": take(arrays["masks"], 0), "body": take(arrays["body"], 0),
           "dose": None if arrays.get("dose") is None else take(arrays["dose"], 0.0),
           "valid": take(np.asarray(arrays.get("valid", np.ones(tuple(shape), bool)), bool), False)}
    new_origin = np.asarray(origin_xyz, float) + start[::-1] * np.asarray(spacing, float)[::-1]
    return out, new_origin


def body_from_ct(ct_hu: np.ndarray, threshold_hu: float) -> np.ndarray:
    """Largest connected component above ``threshold_hu``, holes filled slice by slice."""
    from scipy import ndimage

    above = ct_hu > threshold_hu
    labels, n = ndimage.label(above)
    if n == 0:
        return above
    sizes = ndimage.sum(above, labels, index=np.arange(1, n + 1))
    body = labels == (int(np.argmax(sizes)) + 1)
    return np.stack([ndimage.binary_fill_holes(s) for s in body])


# --------------------------------------------------------------------------------------- sanity checks
def dose_coverage(masks, names, valid, body=None) -> dict:
    """{structure: fraction of its voxels inside the RTDOSE grid} for present structures (+ "body")."""
    out = {n: float(np.mean(valid[m])) for n, m in zip(names, masks) if m.any()}
    if body is not None and body.any():
        out["body"] = float(np.mean(valid[body]))
    return out


def sanity_checks(dose, masks, names, target_doses: dict, cfg: dict, valid=None) -> tuple[list[str], dict]:
    """Reasons this case's reference dose looks wrong (empty list if fine) and the numbers checked
    (over the voxels where the dose is known: ``valid``)."""
    problems, numbers = [], {}
    if dose is None:
        return problems, numbers
    valid = np.ones(dose.shape, bool) if valid is None else np.asarray(valid, bool)
    if float(dose.min()) < 0:
        problems.append(f"negative dose {float(dose.min()):.3g} Gy")
    present = [(n, d) for n, d in target_doses.items() if n in names and masks[names.index(n)].any()]
    if not present:
        return problems, numbers
    top, top_dose = max(present, key=lambda item: item[1])
    inside = dose[masks[names.index(top)].astype(bool) & valid]
    if inside.size == 0:
        return problems + [f"{top} lies wholly outside the RTDOSE grid"], numbers
    mean, d95 = float(inside.mean()), float(dose_at_volume_percent(inside, 95.0))
    numbers = {"top_target": top, "top_target_mean_gy": mean, "top_target_d95_gy": d95}
    tol = float(cfg["ptv_mean_tolerance"])
    if abs(mean - top_dose) > tol * top_dose:
        problems.append(f"{top} mean dose {mean:.1f} Gy is more than {tol:.0%} from {top_dose:.1f} Gy")
    if d95 < float(cfg["min_d95_fraction"]) * top_dose:
        problems.append(f"{top} D95 {d95:.1f} Gy is below {cfg['min_d95_fraction']:.0%} of {top_dose:.1f} Gy")
    return problems, numbers


# ---------------------------------------------------------------------------------------------- a case
def _target_doses(names, cfg) -> dict:
    table = dict(cfg["target_doses_gy"] or {})
    out = {}
    for name in names:
        dose = table.get(name, target_dose_from_name(name))
        if dose:
            out[name] = float(dose)
    return out


def _read_dicom(case_dir: Path, cfg: dict, channels: list[str]) -> dict:
    smap = load_structure_map(cfg["structures"]["map_file"], cfg["structures"]["extra_names"])
    case = load_rt_case(case_dir, smap, required=cfg["structures"]["required"],
                        fallback_prescription_gy=cfg["prescription"]["fallback_gy"],
                        dose_interpolation=cfg["dose"]["interpolation"], ct_slice_gaps=cfg["ct"]["slice_gaps"],
                        gap_tolerance_mm=float(cfg["ct"]["gap_tolerance_mm"]))
    shape = case.grid.shape_zyx
    masks = np.stack([case.masks.get(n, np.zeros(shape, bool)) for n in channels])
    body_name = cfg["structures"]["body"]
    body = case.masks.get(body_name)
    if body is None:
        case.warnings.append(f"no {body_name} ROI; possible-dose mask from CT > {cfg['body_threshold_hu']} HU")
        body = body_from_ct(case.ct_hu, float(cfg["body_threshold_hu"]))
    valid = case.dose_valid if case.dose_valid is not None else np.ones(shape, bool)
    return {"case_id": case.case_id, "ct": case.ct_hu, "dose": case.dose_gy, "masks": masks, "body": body,
            "valid": valid, "contours": case.contours, "rtdose": case.rtdose_native, "repairs": case.repairs, "spacing": case.grid.spacing_zyx, "origin_xyz": case.grid.origin_xyz, "prescription_gy": case.prescription_gy,
            "meta": {"prescription_source": case.prescription_source, "plan_target_doses_gy": case.target_doses_gy,
                     "roi_sources": case.roi_sources, "unmatched_rois": case.unmatched_rois, "uids": case.uids,
                     "warnings": case.warnings, "source_format": "dicom"}}


def _read_openkbp(case_dir: Path, cfg: dict, channels: list[str]) -> dict:
    from vmat.openkbp import read_patient

    patient = read_patient(case_dir)
    index = {n: i for i, n in enumerate(patient["structure_names"])}
    shape = patient["ct"].shape
    masks = np.stack([patient["masks"][index[n]] if n in index else np.zeros(shape, np.uint8) for n in channels])
    return {"case_id": patient["case_id"], "ct": patient["ct"], "dose": patient["dose"], "masks": masks.astype(bool),
            "body": patient["possible_dose_mask"].astype(bool), "valid": np.ones(shape, bool), "contours": {},
            "repairs": [], "spacing": patient["spacing_zyx"],
            "origin_xyz": np.zeros(3), "prescription_gy": patient["prescription_gy"],
            "meta": {"prescription_source": "OpenKBP target names", "warnings": [], "source_format": "openkbp",
                     "uids": {}}}


def process_case(case_dir: str, out_dir: str, cfg: dict, fmt: str) -> dict:
    """Preprocess one case; returns its manifest row. Module-level so spawn workers can pickle it."""
    start = time.perf_counter()
    case_dir, out_dir = Path(case_dir), Path(out_dir)
    channels = list(cfg["structures"]["channels"] or (OPENKBP_STRUCTURES if fmt == "openkbp" else PROSTATE_STRUCTURES))
    row = {"case": case_dir.name, "status": "skipped", "reason": ""}
    try:
        data = _read_openkbp(case_dir, cfg, channels) if fmt == "openkbp" else _read_dicom(case_dir, cfg, channels)
        spacing, origin = data["spacing"], np.asarray(data["origin_xyz"], float)
        arrays = {k: data[k] for k in ("ct", "dose", "masks", "body", "valid")}
        if cfg["grid"]["resample_spacing_mm"]:
            arrays, spacing, origin = _resample_case(arrays, spacing, origin, cfg["grid"]["resample_spacing_mm"])
        target_doses = _target_doses(channels, cfg)
        if cfg["grid"]["crop_shape"]:
            top = max(target_doses, key=target_doses.get) if target_doses else channels[0]
            arrays, origin = _crop_case(arrays, spacing, origin, cfg["grid"]["crop_shape"],
                                        arrays["masks"][channels.index(top)])
        masks = arrays["masks"].astype(bool)
        valid = np.asarray(arrays["valid"], bool)
        problems, numbers = sanity_checks(arrays["dose"], masks, channels, target_doses, cfg["sanity"], valid)
        coverage = dose_coverage(masks, channels, valid, np.asarray(arrays["body"], bool)) \
            if arrays["dose"] is not None else {}
        min_cov = float(cfg["dose"]["min_coverage"])
        flagged = [n for n, f in coverage.items() if n != "body" and f < min_cov]
        row.update({f"dose_coverage_{n}": round(f, 4) for n, f in coverage.items()})
        row["coverage_flags"] = "; ".join(f"{n} {coverage[n]:.1%} inside the RTDOSE grid (< {min_cov:.0%})"
                                          for n in flagged)
        row["repairs"] = " | ".join(data.get("repairs", []))
        if flagged:
            data["meta"]["warnings"].append("dose grid does not cover " + row["coverage_flags"]
                                            + ": their DVHs use only the covered part")
        voxel_cc = float(np.prod(spacing)) / 1000.0
        row.update({f"volume_cc_{n}": round(float(m.sum()) * voxel_cc, 3) for n, m in zip(channels, masks)})
        row.update({"prescription_gy": data["prescription_gy"], "shape": "x".join(map(str, masks.shape[1:])),
                    "spacing_mm": "x".join(f"{s:g}" for s in spacing), **numbers,
                    "sanity": "; ".join(problems) or "ok", "warnings": " | ".join(data["meta"]["warnings"]),
                    "unmatched_rois": "; ".join(data["meta"].get("unmatched_rois", []))})
        if problems and cfg["sanity"]["enforce"]:
            raise CaseError("sanity_check", "; ".join(problems))
        clip = float(cfg["sdf"]["clip_mm"])
        sdf = np.stack([scaled_sdf(m, spacing, clip) for m in masks])
        meta = {**data["meta"], "case_id": data["case_id"], "target_doses_gy": target_doses, "sdf_clip_mm": clip,
                "dose_coverage": coverage, "coverage_flagged": flagged, "min_coverage": min_cov,
                "repairs": data.get("repairs", []),
                "axes": "z superior, y posterior, x patient left (DICOM LPS)", "origin_order": "zyx"}
        write_case(out_dir / f"{data['case_id']}.npz", ct=arrays["ct"], dose=arrays["dose"], masks=masks, sdf=sdf,
                   structure_names=channels, spacing_mm=spacing, origin_mm=origin[::-1],
                   prescription_gy=data["prescription_gy"], possible_dose_mask=arrays["body"], meta=meta,
                   dose_valid_mask=valid, contours=data.get("contours"), rtdose=data.get("rtdose"))
        row.update({"status": "ok", "reason": ""})
    except CaseError as exc:
        row["reason"] = str(exc)
    except Exception as exc:  # an unexpected failure of one case must not stop the batch
        row.update({"status": "failed", "reason": f"{type(exc).__name__}: {exc}",
                    "traceback": traceback.format_exc(limit=3).replace("\n", " | ")})
    row["seconds"] = round(time.perf_counter() - start, 3)
    return row


def list_case_dirs(root: Path, fmt: str) -> list[Path]:
    if not root.is_dir():
        raise InputError("--data folder not found", root)
    if fmt == "openkbp":
        from vmat.openkbp import find_patients

        return find_patients(root)
    return sorted(p for p in root.iterdir() if p.is_dir())


def write_manifest(path: Path, rows: list[dict]) -> Path:
    import csv
    import io

    columns: list[str] = []
    for row in rows:
        columns += [k for k in row if k not in columns]
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=columns, lineterminator="\n")
    writer.writeheader()
    writer.writerows(rows)
    return write_text_atomic(path, buffer.getvalue())


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__, data=True)
    add_deprecated_alias(parser, "--input", "--data", dest="data", type=Path)
    add_deprecated_alias(parser, "--output", "--output-dir", dest="output_dir", type=Path)
    parser.add_argument("--format", choices=("dicom", "openkbp"), default=None, help="overrides the config's format")
    parser.add_argument("--cases", nargs="*", default=None, help="only these case folder names")
    args = parser.parse_args(argv)
    if args.data is None or args.output_dir is None:
        parser.error("--data RAW (one sub-folder per case) and --output-dir OUT (for <case>.npz) are required")
    run = start_run(args, domain="vmat", defaults=VMAT_DEFAULTS, argv=argv)
    cfg, out_dir = run.cfg["preprocess"], run.run_dir
    fmt = args.format or cfg["format"]
    if fmt not in ("dicom", "openkbp"):
        raise ConfigError(f"config: 'preprocess.format' must be dicom or openkbp, got {fmt!r}")
    if fmt == "openkbp" and cfg["structures"]["required"] == PREPROCESS_DEFAULTS["structures"]["required"]:
        cfg["structures"]["required"] = []  # OpenKBP patients have different ROI sets; targets are checked
    if fmt == "dicom":
        # a broken map is one clear error, not N skips
        load_structure_map(cfg["structures"]["map_file"], cfg["structures"]["extra_names"])
    case_dirs = list_case_dirs(args.data, fmt)
    if args.cases:
        case_dirs = [p for p in case_dirs if p.name in set(args.cases)]
    if not case_dirs:
        raise InputError("no case folders here" + (f" named {args.cases}" if args.cases else ""), args.data)
    run.record_inputs_valid()
    start = time.perf_counter()
    rows = []
    workers = int(cfg["num_workers"])
    if workers > 1 and len(case_dirs) > 1:
        with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as pool:
            futures = [pool.submit(process_case, str(p), str(out_dir), cfg, fmt) for p in case_dirs]
            for future in progress(as_completed(futures), desc="cases", total=len(futures)):
                rows.append(future.result())
    else:
        for path in progress(case_dirs, desc="cases", total=len(case_dirs)):
            rows.append(process_case(str(path), str(out_dir), cfg, fmt))
    rows.sort(key=lambda r: r["case"])
    elapsed = time.perf_counter() - start
    ok = [r for r in rows if r["status"] == "ok"]
    for row in rows:
        if row["status"] != "ok":
            run.log(f"[vmat] {row['status']} {row['case']}: {row['reason']}")
        elif row.get("unmatched_rois"):
            run.log(f"[vmat] {row['case']}: unmatched ROI names: {row['unmatched_rois']}")
        if row.get("coverage_flags"):
            run.log(f"[vmat] {row['case']}: dose grid does not cover {row['coverage_flags']}")
        if row.get("repairs"):
            run.log(f"[vmat] {row['case']}: repaired: {row['repairs']}")
    write_manifest(out_dir / "manifest.csv", rows)
    channels = list(cfg["structures"]["channels"] or (OPENKBP_STRUCTURES if fmt == "openkbp" else PROSTATE_STRUCTURES))
    summary = {"n_cases": len(rows), "n_ok": len(ok), "n_skipped": len(rows) - len(ok), "seconds": elapsed,
               "cases_per_minute": 60.0 * len(rows) / max(elapsed, 1e-9), "format": fmt,
               "structure_names": channels, "target_doses_gy": _target_doses(channels, cfg),
               "sdf_clip_mm": float(cfg["sdf"]["clip_mm"]), "config": cfg, "site": cfg["site"],
               "skipped": {r["case"]: r["reason"] for r in rows if r["status"] != "ok"},
               "coverage_flagged": {r["case"]: r["coverage_flags"] for r in rows if r.get("coverage_flags")},
               "repaired": {r["case"]: r["repairs"] for r in rows if r.get("repairs")}}
    write_json(out_dir / "preprocessing.json", summary)
    run.log(f"[vmat] preprocessed {len(ok)}/{len(rows)} cases into {out_dir} "
            f"({summary['cases_per_minute']:.1f} cases/min)")
    if not ok:
        first = rows[0]
        raise NothingProcessedError(f"none of the {len(rows)} case(s) could be preprocessed (see "
                                    f"{out_dir / 'manifest.csv'}); first: {first['case']}: {first['reason']}", args.data)
    return run.finish(summary)


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
