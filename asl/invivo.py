"""Readers of in-vivo ASL data and their conversion to the network's input.

Layouts read (see asl/README.md):
- BIDS ASL: ``*_asl.nii[.gz]`` (4D) + ``*_aslcontext.tsv`` (column ``volume_type``: label / control /
  deltam / m0scan / cbf) + ``*_asl.json`` (ArterialSpinLabelingType PCASL|CASL|VSASL, PostLabelingDelay in
  seconds: one number or one per volume, LabelingDuration, M0Type, ...); M0 from ``m0scan`` volumes, a
  ``*_m0scan.nii[.gz]`` beside the series, or the sidecar's ``M0Estimate``. Several runs (e.g.
  ``acq-pcasl`` and ``acq-vsasl``) in one folder are combined by their labeling type.
- The original's per-PLD layout: ``r_normdiff_alldyn_{PCASL,VSASL}_<PLD ms>.nii[.gz]`` (3D or 4D repeats,
  already ΔM/M0) and ``r_M0.nii[.gz]``.
- A ``.npz`` written by ``preprocess_asl.py --invivo``.
Optional tissue maps beside the data: ``*label-GM_probseg.nii*`` / ``*label-WM_probseg.nii*`` (BIDS
derivatives) or ``r_GM*.nii*`` / ``r_WM*.nii*``.

Control − label pairs (and deltam volumes) are averaged per PLD and divided by M0. The brain mask is
M0 > threshold × its 99th percentile. A pair (or deltam volume, or per-PLD repeat) with a NaN/Inf at a voxel is
left out at that voxel; the voxel is masked only when no finite pair is left at some PLD or its M0 is not
finite; counts go into ``meta`` (never propagated, never silent).

Input contract (asl/README.md, "Real data"): the sidecar is parsed by :mod:`asl.acquisition` (unsupported
designs refused); M0 follows ``M0Type`` (Separate / Included / Estimate / Absent with an explicit value) and
records the M0 scan's ``RepetitionTimePreparation``; a label/control swap is refused (or, with
``fix_label_control_swap``, flipped and recorded in ``meta['repairs']``); an implausible M0 scale is refused.
Every refusal is an :class:`InvivoError` naming the file and the field.
"""

from __future__ import annotations

import csv
import json
import re
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from common.errors import InputError
from common.files import load_npz
from common.runlog import save_npz_atomic


class InvivoError(InputError):
    """In-vivo input that cannot be used; the message names the file and the field."""


LABELING_TYPES = {"PCASL": "pcasl", "CASL": "pcasl", "VSASL": "vsasl"}


def _nib():
    import nibabel as nib

    return nib


def read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        img = _nib().load(str(path))
        return np.asarray(img.dataobj, dtype=np.float64), np.asarray(img.affine, dtype=np.float64)
    except Exception as exc:  # nibabel raises several types for broken files
        raise InvivoError(f"{path}: not a readable NIfTI file ({type(exc).__name__}: {exc})") from exc


def _nifti_files(folder: Path, pattern: str) -> list[Path]:
    return sorted(p for p in folder.glob(pattern) if p.name.endswith((".nii", ".nii.gz")))


def _stem(path: Path) -> str:
    name = path.name
    return name[:-7] if name.endswith(".nii.gz") else name[:-4] if name.endswith(".nii") else path.stem


# ----------------------------------------------------------------------------------------------- BIDS
def _read_context(path: Path, n_volumes: int, nifti: Path) -> list[str]:
    if not path.is_file():
        raise InvivoError(f"{nifti}: the BIDS context file {path.name} is missing")
    with path.open("r", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle, delimiter="\t"))
    if not rows or "volume_type" not in rows[0]:
        raise InvivoError(f"{path}: column 'volume_type' is missing")
    types = [r["volume_type"].strip().lower() for r in rows]
    bad = sorted({t for t in types if t not in ("label", "control", "deltam", "m0scan", "cbf", "noise")})
    if bad:
        raise InvivoError(f"{path}: field 'volume_type' has unknown values {bad}")
    if len(types) != n_volumes:
        raise InvivoError(f"{path}: {len(types)} rows in 'volume_type' but {nifti.name} has {n_volumes} volumes")
    return types


def _sidecar_json(path: Path) -> dict:
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvivoError(f"{path}: not valid JSON ({exc})") from exc
    if not isinstance(meta, dict):
        raise InvivoError(f"{path}: not a JSON object")
    return meta


def _nanmean(stack: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(mean over the last axis of the finite entries, number of finite entries) per voxel."""
    ok = np.isfinite(stack)
    count = ok.sum(axis=-1)
    total = np.where(ok, stack, 0.0).sum(axis=-1)
    return np.where(count > 0, total / np.maximum(count, 1), 0.0), count


def _tr_ms(value, indices: list[int], n_vol: int) -> float | None:
    """RepetitionTimePreparation (s, scalar or per volume) at ``indices``, in ms."""
    if value is None:
        return None
    arr = np.atleast_1d(np.asarray(value, dtype=np.float64))
    if arr.size == 1:
        return float(arr[0]) * 1000.0
    if arr.size == n_vol and indices:
        return float(arr[indices].mean()) * 1000.0
    return None


def _read_bids_run(nifti: Path, m0_value: float | None = None) -> dict:
    from asl.acquisition import parse_sidecar

    stem = _stem(nifti)
    prefix = stem[:-len("_asl")] if stem.endswith("_asl") else stem
    sidecar = nifti.parent / f"{stem}.json"
    if not sidecar.is_file():
        raise InvivoError(f"{nifti}: the sidecar {sidecar.name} is missing")
    meta = _sidecar_json(sidecar)
    if str(meta.get("ArterialSpinLabelingType", "")).upper() not in LABELING_TYPES:
        parse_sidecar(meta, str(sidecar), 1, [])  # raises naming the field (PASL, time-encoded, unknown)
    data, affine = read_nifti(nifti)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise InvivoError(f"{nifti}: expected a 4D series, got shape {data.shape}")
    n_vol = data.shape[3]
    context = nifti.parent / f"{prefix}_aslcontext.tsv"
    types = _read_context(context, n_vol, nifti)
    asl_vols = [i for i, t in enumerate(types) if t in ("label", "control", "deltam")]
    acq = parse_sidecar(meta, str(sidecar), n_vol, asl_vols)
    if "PostLabelingDelay" not in meta:
        raise InvivoError(f"{sidecar}: field 'PostLabelingDelay' is missing")
    pld = np.atleast_1d(np.asarray(meta["PostLabelingDelay"], dtype=np.float64))
    if pld.size == 1:
        pld = np.repeat(pld, n_vol)
    elif pld.size != n_vol:
        raise InvivoError(f"{sidecar}: field 'PostLabelingDelay' has {pld.size} values but {nifti.name} has "
                          f"{n_vol} volumes")
    pld_ms = np.round(pld * 1000.0, 3)  # BIDS times are seconds
    nonfinite = ~np.isfinite(data)
    quality = {"nonfinite_values": int(nonfinite.sum()), "nonfinite_voxels": int(nonfinite.any(axis=3).sum())}
    # M0 as the sidecar's M0Type says (inferred from the files, with a warning, when M0Type is absent).
    m0_idx = [i for i, t in enumerate(types) if t == "m0scan"]
    m0_files = _nifti_files(nifti.parent, f"{prefix}_m0scan.nii*") or _nifti_files(nifti.parent, "*_m0scan.nii*")
    m0_type = acq.get("m0_type")
    if m0_type is None:
        m0_type = ("Included" if m0_idx else "Separate" if m0_files else "Estimate" if "M0Estimate" in meta
                   else "Absent")
        acq["warnings"].append(f"{sidecar}: 'M0Type' missing; inferred {m0_type!r} from the files present")
    m0_type = str(m0_type)
    m0_tr = None
    if m0_type.lower() == "included":
        if not m0_idx:
            raise InvivoError(f"{sidecar}: field 'M0Type' is Included but {context.name} has no 'm0scan' volume")
        m0, _ = _nanmean(data[..., m0_idx])
        m0_source = f"{nifti.name} (m0scan volumes)"
        m0_tr = _tr_ms(meta.get("RepetitionTimePreparation"), m0_idx, n_vol)
    elif m0_type.lower() == "separate":
        if not m0_files:
            raise InvivoError(f"{sidecar}: field 'M0Type' is Separate but no {prefix}_m0scan.nii[.gz] was found")
        m0, _ = read_nifti(m0_files[0])
        if m0.ndim == 4:
            m0 = _nanmean(m0)[0]
        if m0.shape != data.shape[:3]:
            raise InvivoError(f"{m0_files[0]}: M0 shape {m0.shape} does not match {nifti.name} "
                              f"spatial shape {data.shape[:3]}")
        m0_source = m0_files[0].name
        m0_json = m0_files[0].parent / f"{_stem(m0_files[0])}.json"
        if m0_json.is_file():
            m0_meta = _sidecar_json(m0_json)
            m0_tr = _tr_ms(m0_meta.get("RepetitionTimePreparation", m0_meta.get("RepetitionTime")), [], 1)
    elif m0_type.lower() == "estimate":
        if "M0Estimate" not in meta:
            raise InvivoError(f"{sidecar}: field 'M0Type' is Estimate but 'M0Estimate' is missing")
        m0 = np.full(data.shape[:3], float(meta["M0Estimate"]))
        m0_source = f"{sidecar.name} M0Estimate"
    elif m0_type.lower() == "absent":
        if not m0_value:
            raise InvivoError(f"{nifti}: missing M0 (M0Type Absent or no 'm0scan' volume in {context.name}, no "
                              f"{prefix}_m0scan.nii[.gz], no 'M0Estimate' in {sidecar.name}); give the M0 value "
                              f"with --set predict.m0_value=...")
        m0 = np.full(data.shape[:3], float(m0_value))
        m0_source = f"predict.m0_value {float(m0_value):g} (M0Type Absent)"
    else:
        raise InvivoError(f"{sidecar}: field 'M0Type' is {m0_type!r}; expected Separate, Included, Estimate or Absent")
    if m0_tr is None and m0_type.lower() in ("included", "separate"):
        acq["warnings"].append(f"{sidecar}: no RepetitionTimePreparation for the M0 scan: no T1-recovery correction "
                               f"of M0")
    acq["m0_tr_ms"] = m0_tr
    acq["m0_type"] = m0_type
    m0_finite = np.isfinite(m0)
    m0 = np.where(m0_finite, m0, 0.0)
    deltam: dict[float, np.ndarray] = {}
    finite = m0_finite.copy()
    controls_all = [i for i, t in enumerate(types) if t == "control"]
    for value in sorted(set(pld_ms[asl_vols])):
        sel = lambda t, value=value: [i for i, tt in enumerate(types) if tt == t and pld_ms[i] == value]  # noqa: E731
        labels, controls, diffs = sel("label"), sel("control"), sel("deltam")
        if len(labels) != len(controls):
            raise InvivoError(f"{nifti}: at PostLabelingDelay {value / 1000:g} s there are {len(labels)} label and "
                              f"{len(controls)} control volumes (they must pair)")
        # Pairs in order; a pair or deltam volume with a NaN/Inf at a voxel is left out there (not the voxel).
        parts = [data[..., c] - data[..., lab] for c, lab in zip(controls, labels)] + [data[..., d] for d in diffs]
        mean, count = _nanmean(np.stack(parts, axis=-1))
        deltam[float(value)] = mean
        finite &= count > 0
    if not deltam:
        raise InvivoError(f"{nifti}: no label/control or deltam volumes in {prefix}_aslcontext.tsv")
    control_mean = _nanmean(data[..., controls_all])[0] if controls_all else None
    acquisition = {k: meta[k] for k in ("LabelingDuration", "BackgroundSuppression", "BackgroundSuppressionNumberPulses",
                                        "LabelingEfficiency", "M0Type", "MagneticFieldStrength", "VascularCrushing",
                                        "RepetitionTimePreparation") if k in meta}
    return {"mode": LABELING_TYPES[acq["type"]], "deltam": deltam, "m0": m0, "affine": affine, "finite": finite,
            "source": nifti.name, "m0_source": m0_source, "acquisition": {**acq, "sidecar": acquisition},
            "quality": quality, "control_mean": control_mean, "context": str(context)}


def load_bids(folder: str | Path, m0_value: float | None = None, fix_label_control_swap: bool = False) -> dict:
    """Every ``*_asl.nii[.gz]`` under ``folder`` (recursively); runs are grouped by labeling type."""
    folder = Path(folder)
    runs = [_read_bids_run(p, m0_value) for p in sorted(folder.rglob("*_asl.nii*"))
            if p.name.endswith((".nii", ".nii.gz"))]
    if not runs:
        raise InvivoError(f"{folder}: no *_asl.nii[.gz] file (BIDS ASL) found")
    shape = runs[0]["m0"].shape
    for r in runs[1:]:
        if r["m0"].shape != shape:
            raise InvivoError(f"{folder}/{r['source']}: spatial shape {r['m0'].shape} differs from "
                              f"{runs[0]['source']} {shape}")
    signals: dict[str, dict[float, np.ndarray]] = {}
    m0s, finite = [], np.ones(shape, dtype=bool)
    for r in runs:
        if r["mode"] in signals:
            raise InvivoError(f"{folder}: two runs of labeling type {r['mode'].upper()} ({r['source']}); keep one")
        signals[r["mode"]] = r["deltam"]
        m0s.append(r["m0"])
        finite &= r["finite"]
    # ΔM of each run is divided by the M0 of that run.
    m0_by_mode = {r["mode"]: r["m0"] for r in runs}
    checks = {r["mode"]: {"where": r["context"], "control_mean": r["control_mean"], "m0": r["m0"]} for r in runs}
    meta = {"layout": "bids", "runs": [{k: r[k] for k in ("mode", "source", "m0_source", "acquisition", "quality")}
                                       for r in runs]}
    return _finish(folder, signals, m0_by_mode, np.mean(m0s, axis=0), runs[0]["affine"], finite, meta,
                   ratio_done=False, checks=checks, fix_swap=fix_label_control_swap)


# ------------------------------------------------------------------------------------------ per-PLD
_PERPLD = re.compile(r"^r_normdiff_alldyn_(PCASL|VSASL)_(\d+(?:\.\d+)?)\.nii(\.gz)?$", re.IGNORECASE)


def load_perpld(folder: str | Path) -> dict:
    """The original's layout: r_normdiff_alldyn_{PCASL,VSASL}_<PLD>.nii* (ΔM/M0, repeats averaged) + r_M0."""
    folder = Path(folder)
    m0_files = _nifti_files(folder, "r_M0.nii*")
    if not m0_files:
        raise InvivoError(f"{folder}: missing M0 (r_M0.nii or r_M0.nii.gz)")
    m0, affine = read_nifti(m0_files[0])
    if m0.ndim == 4:
        m0 = m0.mean(axis=3)
    signals: dict[str, dict[float, np.ndarray]] = {}
    finite = np.isfinite(m0)
    for path in sorted(folder.iterdir()):
        match = _PERPLD.match(path.name)
        if not match:
            continue
        data, _ = read_nifti(path)
        if data.shape[:3] != m0.shape:
            raise InvivoError(f"{path}: shape {data.shape[:3]} does not match {m0_files[0].name} shape {m0.shape}")
        if data.ndim == 3:
            data = data[..., None]
        data, count = _nanmean(data)  # a repeat with a NaN/Inf at a voxel is left out there
        finite &= count > 0
        signals.setdefault(match.group(1).lower(), {})[float(match.group(2))] = data
    if not signals:
        raise InvivoError(f"{folder}: no r_normdiff_alldyn_<PCASL|VSASL>_<PLD>.nii[.gz] files")
    quality = {"nonfinite_voxels": int((~finite).sum())}
    return _finish(folder, signals, None, np.where(np.isfinite(m0), m0, 0.0), affine, finite,
                   {"layout": "per_pld", "m0_source": m0_files[0].name, "quality": quality}, ratio_done=True)


# -------------------------------------------------------------------------------------------- common
def _tissue_map(folder: Path, names: list[str], shape) -> np.ndarray | None:
    for pattern in names:
        files = [p for p in folder.rglob(pattern) if p.name.endswith((".nii", ".nii.gz"))]
        if files:
            data, _ = read_nifti(sorted(files)[0])
            if data.shape[:3] != tuple(shape):
                raise InvivoError(f"{files[0]}: tissue map shape {data.shape[:3]} does not match the ASL data {shape}")
            return np.where(np.isfinite(data), data, 0.0)
    return None


# Plausible brain-median ΔM/M0 (mean over PLDs): GM ΔM/M0 is ~0.3-1.5 % at 3 T (CBF 60, α 0.85), so a median
# beyond these limits means M0 is off by an order of magnitude or more (another receiver gain, scaling, units).
DELTAM_M0_RANGE = (1e-4, 0.1)
CONTROL_M0_MAX = 3.0  # a control image brighter than 3×M0 means M0 is too small (control ≤ M0 physically)
SWAP_T = 5.0  # brain-mean ΔM below −SWAP_T standard errors: label and control swapped


def _check_signals(folder, signals, m0, checks, fix_swap: bool, meta: dict) -> None:
    """Label/control sign and M0 scale sanity over the brain (M0 mask), per labeling type. Refuses (or,
    with ``fix_swap``, corrects a swap and records it in ``meta['repairs']``)."""
    mask = brain_mask(m0, 0.2)
    for mode, per_pld in signals.items():
        info = (checks or {}).get(mode, {})
        where = info.get("where", f"{folder} ({mode.upper()})")
        ratio = np.mean([per_pld[p] for p in sorted(per_pld)], axis=0)[mask]
        ratio = ratio[np.isfinite(ratio)]
        if ratio.size < 10:
            continue
        mean, se = float(ratio.mean()), float(ratio.std() / np.sqrt(ratio.size) + 1e-30)
        if mean < -SWAP_T * se:
            text = (f"{where}: field 'volume_type': the brain-mean control − label signal is negative "
                    f"(ΔM/M0 {mean:.2e}, {mean / se:.0f} standard errors): label and control look swapped")
            if not fix_swap:
                raise InvivoError(text + "; fix the file or rerun with --set predict.fix_label_control_swap=true")
            for p in per_pld:
                per_pld[p] = -per_pld[p]
            meta.setdefault("repairs", []).append(text + "; CORRECTED (sign flipped, predict.fix_label_control_swap)")
            ratio = -ratio
        median = float(np.median(np.abs(ratio)))
        lo, hi = DELTAM_M0_RANGE
        if not lo <= median <= hi:
            raise InvivoError(f"{where}: M0 scale: brain-median |ΔM/M0| is {median:.2e}, outside the plausible "
                              f"[{lo:g}, {hi:g}]: M0 is off by orders of magnitude (M0 source "
                              f"{info.get('m0_source', 'M0')}); correct it with --set predict.m0_scale=...")
        control = info.get("control_mean")
        if control is not None:
            m0_run = info["m0"]
            ok = mask & (m0_run > 0)
            if ok.any():
                cm = float(np.median(control[ok] / m0_run[ok]))
                if cm > CONTROL_M0_MAX:
                    raise InvivoError(f"{where}: M0 scale: brain-median control/M0 is {cm:.1f} (> {CONTROL_M0_MAX:g}; "
                                      f"the control image cannot be brighter than M0): M0 is scaled differently "
                                      f"from the ASL series")


def _finish(folder, signals, m0_by_mode, m0, affine, finite, meta, ratio_done: bool, checks=None,
            fix_swap: bool = False) -> dict:
    out_signals = {}
    for mode, per_pld in signals.items():
        out_signals[mode] = {}
        for pld, dm in per_pld.items():
            if ratio_done:
                ratio = dm
            else:
                m0_run = m0_by_mode[mode]
                ratio = np.where(m0_run > 0, dm / np.where(m0_run > 0, m0_run, 1.0), 0.0)
            out_signals[mode][pld] = ratio
    meta = {**meta, "folder": str(folder)}
    _check_signals(folder, out_signals, m0, checks, fix_swap, meta)
    brain = brain_mask(m0, 0.2)
    meta["nonfinite"] = {"brain_voxels_lost": int((brain & ~finite).sum()), "brain_voxels": int(brain.sum()),
                         "note": "voxels with a NaN/Inf in every pair of some PLD or in M0 are masked; a NaN in one "
                                 "pair only drops that pair there"}
    return {"signals": out_signals, "m0": m0, "affine": affine, "finite": finite,
            "gm": _tissue_map(Path(folder), ["*label-GM_probseg.nii*", "r_GM*.nii*"], m0.shape),
            "wm": _tissue_map(Path(folder), ["*label-WM_probseg.nii*", "r_WM*.nii*"], m0.shape),
            "meta": meta}


def load_subject(path: str | Path, m0_value: float | None = None, fix_label_control_swap: bool = False) -> dict:
    """Dispatch on the layout: a preprocessed .npz, a BIDS folder, or a per-PLD folder."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        return load_subject_npz(path)
    if not path.is_dir():
        raise InvivoError(f"in-vivo input not found: {path} (a BIDS folder, a per-PLD folder or a .npz)")
    if any(p.name.endswith((".nii", ".nii.gz")) for p in path.rglob("*_asl.nii*")):
        return load_bids(path, m0_value=m0_value, fix_label_control_swap=fix_label_control_swap)
    return load_perpld(path)


def brain_mask(m0: np.ndarray, threshold: float) -> np.ndarray:
    """M0 > threshold × 99th percentile of positive M0 (largest structures kept, holes filled per slice)."""
    from scipy import ndimage

    positive = m0[m0 > 0]
    if positive.size == 0:
        return np.zeros(m0.shape, dtype=bool)
    mask = m0 > threshold * np.percentile(positive, 99)
    for z in range(mask.shape[2]):
        mask[..., z] = ndimage.binary_fill_holes(mask[..., z])
    return mask


def assemble(subject: Mapping, physics: Mapping, mask_threshold: float = 0.2) -> tuple[np.ndarray, np.ndarray]:
    """(signals (X, Y, Z, C) ΔM/M0 in the network's channel order, brain mask (X, Y, Z)).

    Every (mode, PLD) the physics expects must be present (matched within 1 ms); extra PLDs are ignored.
    """
    channels = []
    where = subject["meta"].get("folder", "input")
    for mode in physics["modes"]:
        if mode not in subject["signals"]:
            raise InvivoError(f"{where}: the model needs {mode.upper()} data but the input has only "
                              f"{sorted(m.upper() for m in subject['signals'])} (physics.modes)")
        available = subject["signals"][mode]
        for pld in physics["plds_ms"]:
            match = [p for p in available if abs(p - float(pld)) < 1.0]
            if not match:
                raise InvivoError(f"{where}: {mode.upper()} PLD {pld:g} ms is missing; the input has "
                                  f"PostLabelingDelay {sorted(available)} ms and the model needs {list(physics['plds_ms'])}")
            channels.append(available[match[0]])
    signals = np.stack(channels, axis=-1)
    ok = subject["finite"] & np.all(np.isfinite(signals), axis=-1)
    mask = brain_mask(subject["m0"], mask_threshold) & ok
    signals = np.where(mask[..., None], signals, 0.0)
    return signals.astype(np.float32), mask


def save_subject_npz(subject: Mapping, path: str | Path) -> Path:
    """A converted subject (all modes/PLDs, M0, affine, tissue maps) as one .npz, written atomically."""
    arrays = {"m0": subject["m0"], "affine": subject["affine"], "finite": subject["finite"],
              "meta_json": np.asarray(json.dumps(subject["meta"], default=str))}
    for mode, per_pld in subject["signals"].items():
        for pld, arr in per_pld.items():
            arrays[f"signal__{mode}__{pld:g}"] = arr.astype(np.float32)
    for name in ("gm", "wm"):
        if subject.get(name) is not None:
            arrays[name] = subject[name].astype(np.float32)
    return save_npz_atomic(path, **arrays)


def load_subject_npz(path: str | Path) -> dict:
    path = Path(path)
    data = load_npz(path)  # a truncated or foreign file is an InputError naming it
    for key in ("m0", "affine", "finite", "meta_json"):
        if key not in data:
            raise InvivoError(f"{path}: field '{key}' is missing; not a subject written by preprocess_asl.py --invivo")
    signals: dict[str, dict[float, np.ndarray]] = {}
    for key, value in data.items():
        if key.startswith("signal__"):
            _, mode, pld = key.split("__")
            signals.setdefault(mode, {})[float(pld)] = value.astype(np.float64)
    return {"signals": signals, "m0": data["m0"], "affine": data["affine"], "finite": data["finite"].astype(bool),
            "gm": data.get("gm"), "wm": data.get("wm"), "meta": {**json.loads(str(data["meta_json"])),
                                                                 "folder": str(path)}}
