"""BIDS and per-PLD readers on small NIfTI files written here, with hand-computed ΔM/M0, and bad input."""

import json

import nibabel as nib
import numpy as np
import pytest

from asl.invivo import InvivoError, assemble, load_bids, load_perpld, load_subject, load_subject_npz, save_subject_npz
from asl.physics import PHYSICS_DEFAULTS

SHAPE = (4, 5, 2)
PH = {**PHYSICS_DEFAULTS, "modes": ["pcasl"], "plds_ms": [1000.0, 2000.0]}


def save(arr, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), np.diag([2.0, 2.0, 4.0, 1.0])), str(path))


def write_bids(folder, plds_s=(1.0, 1.0, 2.0, 2.0), types=("label", "control", "label", "control"), m0="separate",
               kind="PCASL", acq="pcasl", nan_voxel=False, pld_field=None):
    """Volumes: label_k = 100 − k·10 − 1, control_k = 100 (k = PLD index) → ΔM = 10k + 1 at PLD k; M0 = 2000."""
    vols = []
    for t, pld in zip(types, plds_s):
        k = [1.0, 2.0].index(pld) + 1 if pld in (1.0, 2.0) else 0
        vols.append(np.full(SHAPE, 100.0 if t == "control" else 2000.0 if t == "m0scan" else 100.0 - 10 * k - 1))
    data = np.stack(vols, axis=-1)
    if nan_voxel:
        data[0, 0, 0, 1] = np.nan
    prefix = f"sub-01_acq-{acq}"
    save(data, folder / f"{prefix}_asl.nii.gz")
    (folder / f"{prefix}_aslcontext.tsv").write_text("volume_type\n" + "\n".join(types) + "\n", encoding="utf-8")
    sidecar = {"ArterialSpinLabelingType": kind, "PostLabelingDelay": list(plds_s) if pld_field is None else pld_field,
               "LabelingDuration": 1.8}
    (folder / f"{prefix}_asl.json").write_text(json.dumps(sidecar), encoding="utf-8")
    if m0 == "separate":
        save(np.full(SHAPE, 2000.0), folder / f"{prefix}_m0scan.nii.gz")


def test_bids_pairs_subtracted_averaged_and_divided_by_m0(tmp_path):
    write_bids(tmp_path)
    subject = load_bids(tmp_path)
    np.testing.assert_allclose(subject["signals"]["pcasl"][1000.0], 11 / 2000)
    np.testing.assert_allclose(subject["signals"]["pcasl"][2000.0], 21 / 2000)
    signals, mask = assemble(subject, PH, 0.2)
    assert signals.shape == SHAPE + (2,) and mask.all()
    np.testing.assert_allclose(signals[..., 1], 21 / 2000, rtol=1e-6)


def test_bids_included_m0_and_deltam_volumes(tmp_path):
    write_bids(tmp_path, plds_s=(1.0, 1.0, 2.0, 0.0), types=("label", "control", "deltam", "m0scan"), m0="none",
               kind="VSASL", acq="vsasl")
    subject = load_subject(tmp_path)
    assert set(subject["signals"]) == {"vsasl"}
    # deltam volume at 2 s holds 100 − 21 = 79 (it was written as a "label" value); ΔM/M0 = 79/2000.
    np.testing.assert_allclose(subject["signals"]["vsasl"][2000.0], 79 / 2000)


def test_nan_voxels_are_masked_not_propagated(tmp_path):
    write_bids(tmp_path, nan_voxel=True)
    signals, mask = assemble(load_bids(tmp_path), PH, 0.2)
    assert not mask[0, 0, 0] and mask.sum() == np.prod(SHAPE) - 1
    assert np.isfinite(signals).all() and (signals[0, 0, 0] == 0).all()


@pytest.mark.parametrize("kwargs, match", [
    ({"pld_field": [1.0, 2.0, 2.0]}, "PostLabelingDelay' has 3 values but .* has 4 volumes"),
    ({"m0": "none"}, "missing M0"),
    ({"kind": "PASL"}, "ArterialSpinLabelingType"),
    ({"types": ("label", "label", "label", "control")}, "must pair"),
])
def test_bids_bad_input_names_file_and_field(tmp_path, kwargs, match):
    write_bids(tmp_path, **kwargs)
    with pytest.raises(InvivoError, match=match):
        load_bids(tmp_path)


def test_bids_m0_shape_mismatch(tmp_path):
    write_bids(tmp_path)
    save(np.full((3, 3, 2), 2000.0), tmp_path / "sub-01_acq-pcasl_m0scan.nii.gz")
    with pytest.raises(InvivoError, match="m0scan.nii.gz: M0 shape"):
        load_bids(tmp_path)


def test_missing_pld_for_the_model(tmp_path):
    write_bids(tmp_path)
    with pytest.raises(InvivoError, match="PCASL PLD 3000 ms is missing"):
        assemble(load_bids(tmp_path), {**PH, "plds_ms": [1000.0, 3000.0]})
    with pytest.raises(InvivoError, match="needs VSASL data"):
        assemble(load_bids(tmp_path), {**PH, "modes": ["pcasl", "vsasl"]})


def test_perpld_layout_and_npz_round_trip(tmp_path):
    rep = np.stack([np.full(SHAPE, 0.01), np.full(SHAPE, 0.03)], axis=-1)
    save(rep, tmp_path / "r_normdiff_alldyn_PCASL_1000.nii.gz")
    save(np.full(SHAPE, 0.05), tmp_path / "r_normdiff_alldyn_PCASL_2000.nii")
    save(np.full(SHAPE, 900.0), tmp_path / "r_M0.nii.gz")
    subject = load_perpld(tmp_path)
    np.testing.assert_allclose(subject["signals"]["pcasl"][1000.0], 0.02)
    signals, mask = assemble(subject, PH)
    np.testing.assert_allclose(signals[mask][:, 1], 0.05, rtol=1e-6)
    path = save_subject_npz(subject, tmp_path / "out" / "s.npz")
    again = load_subject_npz(path)
    np.testing.assert_allclose(assemble(again, PH)[0], signals)
    save(np.full((3, 5, 2), 0.05), tmp_path / "r_normdiff_alldyn_VSASL_1000.nii.gz")
    with pytest.raises(InvivoError, match="VSASL_1000.nii.gz: shape"):
        load_perpld(tmp_path)


def test_perpld_missing_m0(tmp_path):
    save(np.full(SHAPE, 0.05), tmp_path / "r_normdiff_alldyn_PCASL_2000.nii.gz")
    with pytest.raises(InvivoError, match="missing M0"):
        load_subject(tmp_path)
