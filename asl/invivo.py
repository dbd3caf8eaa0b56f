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
M0 > threshold × its 99th percentile; voxels with NaN/Inf in any input are masked (set to 0, never
propagated).
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


def _read_bids_run(nifti: Path) -> dict:
    stem = _stem(nifti)
    prefix = stem[:-len("_asl")] if stem.endswith("_asl") else stem
    sidecar = nifti.parent / f"{stem}.json"
    if not sidecar.is_file():
        raise InvivoError(f"{nifti}: the sidecar {sidecar.name} is missing")
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise InvivoError(f"{sidecar}: not valid JSON ({exc})") from exc
    kind = str(meta.get("ArterialSpinLabelingType", "")).upper()
    if kind not in LABELING_TYPES:
        raise InvivoError(f"{sidecar}: field 'ArterialSpinLabelingType' is {meta.get('ArterialSpinLabelingType')!r}; "
                          f"supported: {sorted(LABELING_TYPES)}")
    data, affine = read_nifti(nifti)
    if data.ndim == 3:
        data = data[..., None]
    if data.ndim != 4:
        raise InvivoError(f"{nifti}: expected a 4D series, got shape {data.shape}")
    n_vol = data.shape[3]
    types = _read_context(nifti.parent / f"{prefix}_aslcontext.tsv", n_vol, nifti)
    if "PostLabelingDelay" not in meta:
        raise InvivoError(f"{sidecar}: field 'PostLabelingDelay' is missing")
    pld = np.atleast_1d(np.asarray(meta["PostLabelingDelay"], dtype=np.float64))
    if pld.size == 1:
        pld = np.repeat(pld, n_vol)
    elif pld.size != n_vol:
        raise InvivoError(f"{sidecar}: field 'PostLabelingDelay' has {pld.size} values but {nifti.name} has "
                          f"{n_vol} volumes")
    pld_ms = np.round(pld * 1000.0, 3)  # BIDS times are seconds
    finite = np.all(np.isfinite(data), axis=3)
    data = np.where(np.isfinite(data), data, 0.0)
    # M0: volumes in the series, a separate m0scan image, or a scalar estimate.
    m0_idx = [i for i, t in enumerate(types) if t == "m0scan"]
    m0_source = None
    if m0_idx:
        m0 = data[..., m0_idx].mean(axis=3)
        m0_source = f"{nifti.name} (m0scan volumes)"
    else:
        candidates = _nifti_files(nifti.parent, f"{prefix}_m0scan.nii*") or _nifti_files(nifti.parent, "*_m0scan.nii*")
        if candidates:
            m0, _ = read_nifti(candidates[0])
            if m0.ndim == 4:
                m0 = m0.mean(axis=3)
            if m0.shape != data.shape[:3]:
                raise InvivoError(f"{candidates[0]}: M0 shape {m0.shape} does not match {nifti.name} "
                                  f"spatial shape {data.shape[:3]}")
            m0_source = candidates[0].name
        elif "M0Estimate" in meta:
            m0 = np.full(data.shape[:3], float(meta["M0Estimate"]))
            m0_source = f"{sidecar.name} M0Estimate"
        else:
            raise InvivoError(f"{nifti}: missing M0 (no 'm0scan' volume in {prefix}_aslcontext.tsv, no "
                              f"{prefix}_m0scan.nii[.gz], no 'M0Estimate' in {sidecar.name})")
    finite &= np.isfinite(m0)
    m0 = np.where(np.isfinite(m0), m0, 0.0)
    deltam: dict[float, np.ndarray] = {}
    for value in sorted(set(pld_ms[[i for i, t in enumerate(types) if t in ("label", "control", "deltam")]])):
        sel = lambda t, value=value: [i for i, tt in enumerate(types) if tt == t and pld_ms[i] == value]  # noqa: E731
        labels, controls, diffs = sel("label"), sel("control"), sel("deltam")
        if len(labels) != len(controls):
            raise InvivoError(f"{nifti}: at PostLabelingDelay {value / 1000:g} s there are {len(labels)} label and "
                              f"{len(controls)} control volumes (they must pair)")
        parts = []
        if labels:
            parts.append(data[..., controls].mean(axis=3) - data[..., labels].mean(axis=3))
        if diffs:
            parts.append(data[..., diffs].mean(axis=3))
        weights = [len(labels), len(diffs)]
        weights = [w for w in weights if w]
        deltam[float(value)] = sum(w * p for w, p in zip(weights, parts)) / sum(weights)
    if not deltam:
        raise InvivoError(f"{nifti}: no label/control or deltam volumes in {prefix}_aslcontext.tsv")
    acquisition = {k: meta[k] for k in ("LabelingDuration", "BackgroundSuppression", "BackgroundSuppressionNumberPulses",
                                        "LabelingEfficiency", "M0Type", "MagneticFieldStrength") if k in meta}
    return {"mode": LABELING_TYPES[kind], "deltam": deltam, "m0": m0, "affine": affine, "finite": finite,
            "source": nifti.name, "m0_source": m0_source, "acquisition": acquisition}


def load_bids(folder: str | Path) -> dict:
    """Every ``*_asl.nii[.gz]`` under ``folder`` (recursively); runs are grouped by labeling type."""
    folder = Path(folder)
    runs = [_read_bids_run(p) for p in sorted(folder.rglob("*_asl.nii*")) if p.name.endswith((".nii", ".nii.gz"))]
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
    return _finish(folder, signals, m0_by_mode, np.mean(m0s, axis=0), runs[0]["affine"], finite,
                   {"layout": "bids", "runs": [{k: r[k] for k in ("mode", "source", "m0_source", "acquisition")}
                                               for r in runs]}, ratio_done=False)


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
        ok = np.isfinite(data)
        if data.ndim == 4:
            finite &= ok.all(axis=3)
            data = np.where(ok, data, 0.0).mean(axis=3)
        else:
            finite &= ok
            data = np.where(ok, data, 0.0)
        signals.setdefault(match.group(1).lower(), {})[float(match.group(2))] = data
    if not signals:
        raise InvivoError(f"{folder}: no r_normdiff_alldyn_<PCASL|VSASL>_<PLD>.nii[.gz] files")
    return _finish(folder, signals, None, np.where(np.isfinite(m0), m0, 0.0), affine, finite,
                   {"layout": "per_pld", "m0_source": m0_files[0].name}, ratio_done=True)


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


def _finish(folder, signals, m0_by_mode, m0, affine, finite, meta, ratio_done: bool) -> dict:
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
    return {"signals": out_signals, "m0": m0, "affine": affine, "finite": finite,
            "gm": _tissue_map(Path(folder), ["*label-GM_probseg.nii*", "r_GM*.nii*"], m0.shape),
            "wm": _tissue_map(Path(folder), ["*label-WM_probseg.nii*", "r_WM*.nii*"], m0.shape),
            "meta": {**meta, "folder": str(folder)}}


def load_subject(path: str | Path) -> dict:
    """Dispatch on the layout: a preprocessed .npz, a BIDS folder, or a per-PLD folder."""
    path = Path(path)
    if path.is_file() and path.suffix == ".npz":
        return load_subject_npz(path)
    if not path.is_dir():
        raise InvivoError(f"in-vivo input not found: {path} (a BIDS folder, a per-PLD folder or a .npz)")
    if any(p.name.endswith((".nii", ".nii.gz")) for p in path.rglob("*_asl.nii*")):
        return load_bids(path)
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
