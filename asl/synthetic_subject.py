"""Synthetic in-vivo-format subjects written from phantoms, so the real-data path is the tested path.

:func:`write_synthetic_subject` stacks phantoms as slices and writes
- BIDS: ``sub-<id>/perfusion/sub-<id>_acq-<mode>_asl.nii.gz`` (label/control pairs per PLD), its
  ``_aslcontext.tsv`` and ``_asl.json`` (PostLabelingDelay per volume, seconds), M0 as a separate
  ``_m0scan.nii.gz`` (PCASL) or as an included ``m0scan`` volume (VSASL), GM/WM probability maps;
- the original's per-PLD layout (``r_normdiff_alldyn_<MODE>_<PLD>.nii.gz`` repeats of ΔM/M0, ``r_M0``);
- the truth (``truth_cbf.nii.gz``, ``truth_att.nii.gz``) for comparison.
ΔM = signal(CBF, ATT, nominal physics) × M0 with uniform absolute noise: σ_ΔM = (S_ref/SNR)·M0_GM on the
averaged ΔM (the project's SNR definition, asl.physics.reference_signal, at grey-matter M0).
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import numpy as np

from asl.physics import noise_sigma, signal_curves_np
from asl.simulate import generate_phantom, item_seed

M0_GM, M0_WM, M0_CSF = 850.0, 700.0, 1000.0  # relative proton density × arbitrary receiver gain
VOXEL_MM = (3.0, 3.0, 5.0)


def _save(arr: np.ndarray, path: Path) -> None:
    import nibabel as nib

    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(arr.astype(np.float32), np.diag([*VOXEL_MM, 1.0])), str(path))


def write_synthetic_subject(out_dir: str | Path, phantom_cfg: Mapping, physics: Mapping, n_slices: int, seed: int,
                            snr: float, repeats: int = 2, subject: str = "phantom01") -> dict:
    """Write BIDS + per-PLD layouts of one synthetic subject; returns the paths written."""
    out_dir = Path(out_dir)
    rng = np.random.default_rng(seed)
    phantoms = [generate_phantom(item_seed(seed, i), phantom_cfg) for i in range(int(n_slices))]
    stack = lambda key: np.stack([p[key] for p in phantoms], axis=-1).astype(np.float64)  # noqa: E731 (X, Y, Z)
    cbf, att, mask = stack("cbf"), stack("att"), stack("mask") > 0
    gm, wm, csf = stack("gm"), stack("wm"), stack("csf")
    m0 = np.where(mask, gm * M0_GM + wm * M0_WM + csf * M0_CSF, 0.0)
    m0 = m0 + rng.normal(0, 5.0, m0.shape) * mask  # noisy but high-SNR M0
    sigma_abs = noise_sigma(float(snr), physics) * M0_GM
    plds = [float(p) for p in physics["plds_ms"]]
    bids = out_dir / "bids" / f"sub-{subject}" / "perfusion"
    perpld = out_dir / "per_pld"
    written: dict = {"bids": str(out_dir / "bids"), "per_pld": str(perpld)}
    control_level = 0.1  # background-suppressed control, fraction of M0
    for mode in physics["modes"]:
        one = dict(physics)
        one["modes"] = [mode]
        dm = signal_curves_np(cbf, att, one) * m0[..., None]  # (X, Y, Z, n_pld) absolute ΔM
        volumes, types, pld_list = [], [], []
        sigma_vol = sigma_abs * np.sqrt(repeats / 2.0)  # mean over R pairs of (control − label) has σ_abs
        for k, pld in enumerate(plds):
            for _ in range(int(repeats)):
                control = control_level * m0 + rng.normal(0, sigma_vol, m0.shape)
                label = control_level * m0 - dm[..., k] + rng.normal(0, sigma_vol, m0.shape)
                volumes += [label, control]
                types += ["label", "control"]
                pld_list += [pld / 1000.0, pld / 1000.0]
            # Per-PLD layout: R repeats of ΔM/M0 whose mean has noise σ_abs/M0.
            reps = [(dm[..., k] + rng.normal(0, sigma_abs * np.sqrt(repeats), m0.shape)) / np.where(mask, m0, 1.0)
                    * mask for _ in range(int(repeats))]
            _save(np.stack(reps, axis=-1), perpld / f"r_normdiff_alldyn_{mode.upper()}_{int(pld)}.nii.gz")
        prefix = f"sub-{subject}_acq-{mode}"
        sidecar = {"ArterialSpinLabelingType": mode.upper(), "MagneticFieldStrength": 3,
                   "BackgroundSuppression": True,
                   "BackgroundSuppressionNumberPulses": int(physics[f"n_bs_{mode}"]),
                   "LabelingEfficiency": float(physics[f"alpha_{mode}"])}
        if mode == "pcasl":
            sidecar["LabelingDuration"] = float(physics["tau_ms"]) / 1000.0
            sidecar["M0Type"] = "Separate"
            _save(m0, bids / f"{prefix}_m0scan.nii.gz")
        else:
            sidecar["M0Type"] = "Included"
            volumes.append(m0)
            types.append("m0scan")
            pld_list.append(0.0)
        sidecar["PostLabelingDelay"] = pld_list
        _save(np.stack(volumes, axis=-1), bids / f"{prefix}_asl.nii.gz")
        (bids / f"{prefix}_asl.json").write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
        (bids / f"{prefix}_aslcontext.tsv").write_text("volume_type\n" + "\n".join(types) + "\n", encoding="utf-8")
    _save(m0, perpld / "r_M0.nii.gz")
    anat = out_dir / "bids" / f"sub-{subject}" / "anat"
    _save(gm, anat / f"sub-{subject}_label-GM_probseg.nii.gz")
    _save(wm, anat / f"sub-{subject}_label-WM_probseg.nii.gz")
    _save(gm, perpld / "r_GM_prob.nii.gz")
    _save(wm, perpld / "r_WM_prob.nii.gz")
    _save(cbf, out_dir / "truth_cbf.nii.gz")
    _save(att * mask, out_dir / "truth_att.nii.gz")
    _save(mask.astype(np.float32), out_dir / "truth_mask.nii.gz")
    written["truth_cbf"] = str(out_dir / "truth_cbf.nii.gz")
    written["truth_att"] = str(out_dir / "truth_att.nii.gz")
    return written
