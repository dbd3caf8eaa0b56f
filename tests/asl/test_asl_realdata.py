"""Real acquisitions: BIDS subjects written here the way scanners/converters write them, from an INDEPENDENT
forward model (the general kinetic model of Buxton et al. MRM 1998, integrated numerically below, not asl.physics),
with realistic sidecars; predict_asl must take its physics from the sidecar, recover the truth with LS and no
checkpoint, and refuse (writing nothing) or repair-and-record what real files get wrong."""

import json
import math
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest

from asl import predict_asl
from asl.invivo import InvivoError

LAMBDA = 0.9  # ml/g
T1_TISSUE_S = 1.33
ALPHA_BS1 = 0.95  # per background-suppression pulse (the project's nominal value; not a BIDS field)


def gkm_deltam_over_m0(cbf, att_s, pld_s, tau_s, alpha, t1b_s):
    """Buxton (1998) general kinetic model for (P)CASL, written out: ΔM(t)/M0 = 2 α (f/λ) ∫ c(t') r(t−t') m(t−t') dt'
    with the delivery c(t') = exp(−ATT/T1b) for ATT ≤ t' < ATT + τ (else 0), residue r(u) = exp(−f u / λ) and
    tissue relaxation m(u) = exp(−u/T1t); f = CBF/6000 ml/g/s, t = τ + PLD. Integrated with the trapezoid rule
    on 2000 points (an independent route from the closed form in asl.physics)."""
    f = np.asarray(cbf, dtype=np.float64)[..., None] / 6000.0
    att = np.asarray(att_s, dtype=np.float64)[..., None]
    t = tau_s + pld_s
    lo, hi = att, np.minimum(t, att + tau_s)
    u = np.linspace(0.0, 1.0, 2000)
    tp = lo + (np.maximum(hi - lo, 0.0)) * u  # (..., 2000) arrival times t'
    integrand = np.exp(-att / t1b_s) * np.exp(-(t - tp) * (1.0 / T1_TISSUE_S + f / LAMBDA))
    integral = np.trapezoid(integrand, tp, axis=-1) if hasattr(np, "trapezoid") else np.trapz(integrand, tp, axis=-1)
    return 2.0 * alpha * f[..., 0] / LAMBDA * integral


def brain(shape=(20, 20, 2), seed=0):
    """Ellipse of GM (outer ring) and WM (inside) with smooth CBF/ATT gradients; M0 0 outside."""
    x, y = np.meshgrid(np.linspace(-1, 1, shape[0]), np.linspace(-1, 1, shape[1]), indexing="ij")
    r = np.sqrt(x ** 2 + (1.2 * y) ** 2)
    inside, wm = r < 0.95, r < 0.55
    cbf = np.where(wm, 22.0 + 6.0 * x, 55.0 + 12.0 * y)
    att = np.where(wm, 1.55 + 0.25 * x, 1.15 + 0.25 * y)  # s
    m0 = np.where(wm, 800.0, 1000.0) * inside
    rep = lambda a: np.repeat(a[..., None], shape[2], axis=2)  # noqa: E731
    return {"cbf": rep(cbf * inside), "att": rep(att * inside), "m0": rep(m0), "mask": rep(inside)}


def save(arr, path):
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(nib.Nifti1Image(np.asarray(arr, dtype=np.float32), np.diag([3.0, 3.0, 4.0, 1.0])), str(path))


def write_subject(root: Path, *, tau_s=1.8, plds_s=(0.5, 1.0, 1.5, 2.0, 2.5), bs_pulses=4, field_t=3.0,
                  efficiency=0.85, m0_type="Separate", m0_tr_s=5.0, repeats=2, noise=0.1, swap=False,
                  nan_volume=None, m0_factor=1.0, extra=None, seed=1) -> dict:
    """sub-01/perfusion/sub-01_asl.nii.gz (label, control pairs per PLD), _aslcontext.tsv, _asl.json and the M0."""
    rng = np.random.default_rng(seed)
    b = brain()
    t1b = {1.5: 1.35, 3.0: 1.65}[field_t]
    alpha = efficiency * ALPHA_BS1 ** bs_pulses
    m0_meas = b["m0"] * (1.0 - math.exp(-m0_tr_s / T1_TISSUE_S))  # saturation recovery of the M0 scan
    control = 0.1 * b["m0"] if bs_pulses else 0.9 * b["m0"]
    vols, types, pld_list = [], [], []
    for pld in plds_s:
        dm = gkm_deltam_over_m0(b["cbf"], b["att"], pld, tau_s, alpha, t1b) * b["m0"]
        for _ in range(repeats):
            c = control + rng.normal(0, noise, control.shape)
            lab = control - dm + rng.normal(0, noise, control.shape)
            for kind, img in (("label", lab), ("control", c)):
                vols.append(img)
                types.append({"label": "control", "control": "label"}[kind] if swap else kind)
                pld_list.append(pld)
    perf = root / "sub-01" / "perfusion"
    sidecar = {"ArterialSpinLabelingType": "PCASL", "MagneticFieldStrength": field_t, "LabelingDuration": tau_s,
               "BackgroundSuppression": bool(bs_pulses), "M0Type": m0_type, "VascularCrushing": False,
               "RepetitionTimePreparation": 4.2}
    if bs_pulses:
        sidecar["BackgroundSuppressionNumberPulses"] = bs_pulses
        sidecar["BackgroundSuppressionPulseTime"] = [0.9, 1.4, 1.9, 2.2][:bs_pulses]
    if efficiency != 0.85:
        sidecar["LabelingEfficiency"] = efficiency
    if m0_type == "Included":
        vols.append(m0_meas * m0_factor)
        types.append("m0scan")
        pld_list.append(0.0)
        sidecar["RepetitionTimePreparation"] = [4.2] * (len(vols) - 1) + [m0_tr_s]
    elif m0_type == "Separate":
        save(m0_meas * m0_factor, perf / "sub-01_m0scan.nii.gz")
        (perf / "sub-01_m0scan.json").write_text(json.dumps({"RepetitionTimePreparation": m0_tr_s}), encoding="utf-8")
    data = np.stack(vols, axis=-1)
    if nan_volume is not None:
        data[:10, :, :, nan_volume] = np.nan  # part of one volume (e.g. a reconstruction failure)
    sidecar["PostLabelingDelay"] = pld_list
    sidecar.update(extra or {})
    save(data, perf / "sub-01_asl.nii.gz")
    (perf / "sub-01_asl.json").write_text(json.dumps(sidecar, indent=2), encoding="utf-8")
    (perf / "sub-01_aslcontext.tsv").write_text("volume_type\n" + "\n".join(types) + "\n", encoding="utf-8")
    return b


def run_ls(bids: Path, out: Path, *extra, figure=False):
    summary = predict_asl.main([str(bids), "--method", "ls", "--output-dir", str(out), "--device", "cpu", *extra,
                                "--set", f"predict.qc_figure={str(figure).lower()}"])
    maps = {k: np.asarray(nib.load(str(out / f"ls_{k}.nii.gz")).dataobj) for k in ("cbf", "att", "cbf_std", "att_std")}
    sidecar = json.loads((out / "maps.json").read_text(encoding="utf-8"))
    return summary, maps, sidecar


def errors(truth, maps):
    m = truth["mask"]
    rel = np.abs(maps["cbf"][m] - truth["cbf"][m]) / truth["cbf"][m]
    datt = np.abs(maps["att"][m] - 1000 * truth["att"][m])
    return float(np.median(rel)), float(np.median(datt))


@pytest.mark.parametrize("protocol, expect", [
    ({}, {"tau_ms": 1800.0, "n_bs_pcasl": 4, "t1_blood_ms": 1650.0, "alpha_pcasl": 0.85}),
    ({"tau_s": 1.5, "bs_pulses": 0, "field_t": 1.5, "efficiency": 0.8, "m0_type": "Included", "m0_tr_s": 3.0,
      "plds_s": (0.4, 0.9, 1.4, 1.9, 2.4, 2.9)},
     {"tau_ms": 1500.0, "n_bs_pcasl": 0, "t1_blood_ms": 1350.0, "alpha_pcasl": 0.8}),
])
def test_ls_without_checkpoint_uses_the_sidecar_physics_and_recovers_truth(tmp_path, protocol, expect):
    truth = write_subject(tmp_path / "bids", **protocol)
    summary, maps, sidecar = run_ls(tmp_path / "bids", tmp_path / "out", figure=not protocol)
    for key, value in expect.items():
        assert sidecar["physics"][key] == pytest.approx(value), key
    assert "sidecar" in sidecar["physics_source"]["tau_ms"] or "LabelingDuration" in sidecar["physics_source"]["tau_ms"]
    assert sidecar["physics"]["pcasl_model"] == "buxton_full" and sidecar["method"] == "ls"
    assert sidecar["software"]["version"] and sidecar["m0"][0]["m0_tr_ms"] == pytest.approx(
        1000 * protocol.get("m0_tr_s", 5.0))
    assert any("VascularCrushing" in w for w in sidecar["warnings"])
    rel_cbf, att_ms = errors(truth, maps)
    assert rel_cbf < 0.03 and att_ms < 40, (rel_cbf, att_ms)
    m = truth["mask"]
    assert np.isfinite(maps["cbf_std"][m]).mean() > 0.9 and np.nanmedian(maps["cbf_std"][m]) > 0
    assert (tmp_path / "out" / "figures" / "qc.png").is_file() == (not protocol) and summary["method"] == "ls"


def test_wrong_physics_gives_wrong_maps_and_set_override_is_recorded(tmp_path):
    """The same data fitted with a labeling duration overridden on the command line: the override is used,
    recorded, and changes the maps (so the sidecar value is what made them right)."""
    truth = write_subject(tmp_path / "bids")
    _, maps, sidecar = run_ls(tmp_path / "bids", tmp_path / "out", "--set", "physics.tau_ms=1200.0")
    assert sidecar["physics"]["tau_ms"] == 1200.0 and sidecar["physics_source"]["tau_ms"] == "--set"
    assert errors(truth, maps)[1] > 100  # a 0.6 s error in τ moves ATT


def test_label_control_swap_refused_then_corrected(tmp_path, capsys):
    truth = write_subject(tmp_path / "bids", swap=True)
    with pytest.raises(InvivoError, match="aslcontext.tsv: field 'volume_type'.*swapped"):
        run_ls(tmp_path / "bids", tmp_path / "refused")
    assert not (tmp_path / "refused").exists()  # nothing written
    _, maps, sidecar = run_ls(tmp_path / "bids", tmp_path / "fixed", "--set", "predict.fix_label_control_swap=true")
    assert sidecar["repairs"] and "CORRECTED" in sidecar["repairs"][0]
    assert errors(truth, maps)[0] < 0.03


def test_nan_in_part_of_one_volume_is_counted_not_masking(tmp_path):
    truth = write_subject(tmp_path / "bids", nan_volume=3)
    summary, maps, sidecar = run_ls(tmp_path / "bids", tmp_path / "out")
    assert sidecar["runs"][0]["quality"]["nonfinite_voxels"] == 10 * 20 * 2
    assert sidecar["nonfinite"]["brain_voxels_lost"] == 0 and summary["mask_voxels"] == int(truth["mask"].sum())
    assert errors(truth, maps)[0] < 0.03


@pytest.mark.parametrize("kwargs, extra, match", [
    ({"m0_factor": 1e-3}, [], "M0 scale"),
    ({"m0_factor": 1e3}, [], "M0 scale"),
    ({"extra": {"TimeEncodedMatrixSize": 8}}, [], "time-encoded"),
    ({"extra": {"ArterialSpinLabelingType": "PASL"}}, [], "PASL"),
    ({"extra": {"LabelingDuration": [1.8, 1.5] * 10}}, [], "LabelingDuration"),
    ({"m0_type": "Absent"}, [], "predict.m0_value"),
    ({"extra": {"PostLabelingDelay": [1.0, 2.0]}}, [], "PostLabelingDelay' has 2 values"),
])
def test_bad_real_inputs_refused_naming_file_and_field_writing_nothing(tmp_path, kwargs, extra, match):
    write_subject(tmp_path / "bids", **kwargs)
    with pytest.raises(InvivoError, match=match):
        run_ls(tmp_path / "bids", tmp_path / "out", *extra)
    assert not (tmp_path / "out").exists()


def test_absent_m0_with_explicit_value(tmp_path):
    write_subject(tmp_path / "bids", m0_type="Absent")
    summary, _, sidecar = run_ls(tmp_path / "bids", tmp_path / "out", "--set", "predict.m0_value=1000.0")
    assert "predict.m0_value" in sidecar["m0"][0]["m0_source"] and summary["mask_voxels"] > 0


def test_network_that_cannot_cover_the_data_is_refused(pipeline, tmp_path):
    root, cfg, _, _ = pipeline
    write_subject(tmp_path / "bids")
    with pytest.raises(InvivoError, match="does not cover.*needs VSASL"):
        predict_asl.main([str(tmp_path / "bids"), "--checkpoint", str(root / "train"), *cfg,
                          "--output-dir", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()


NET = {"modes": ["pcasl"], "plds_ms": [500.0, 1000.0], "t1_blood_ms": 1650.0, "alpha_pcasl": 0.85, "alpha_vsasl": 0.56,
       "alpha_bs1": 0.95, "n_bs_pcasl": 4, "n_bs_vsasl": 3, "tau_ms": 1800.0}
RND = {"enabled": True, "t1_blood_ms": [1350.0, 1950.0], "alpha_pcasl": [0.75, 0.95], "alpha_bs1": [0.90, 1.0],
       "tau_rel": [0.9, 1.1]}


@pytest.mark.parametrize("change, problem", [
    ({}, None),
    ({"plds_ms": [500.0, 1000.0, 1500.0]}, None),  # extra PLDs are ignored by the network
    ({"plds_ms": [500.0, 1500.0]}, "PLDs"),
    ({"modes": ["vsasl"]}, "needs PCASL"),
    ({"t1_blood_ms": 1350.0}, None),  # edge of the training range
    ({"t1_blood_ms": 2090.0}, "blood T1 2090"),
    ({"n_bs_pcasl": 0}, None),  # α·α_BS^n = 0.85: inside [0.75·0.90^4, 0.95·1.0^4] = [0.492, 0.95]
    ({"n_bs_pcasl": 8}, None),  # 0.85·0.95^8 = 0.564: inside
    ({"n_bs_pcasl": 16}, "effective labeling efficiency"),  # 0.85·0.95^16 = 0.375: below 0.492
    ({"alpha_pcasl": 0.5}, "effective labeling efficiency"),  # 0.5·0.95^4 = 0.407
    ({"tau_ms": 1500.0}, "labeling duration 1500"),
])
def test_network_coverage_table(change, problem):
    from asl.acquisition import network_coverage

    problems = network_coverage({**NET, **change}, NET, RND)
    assert (problems == []) == (problem is None), problems
    if problem:
        assert problem in problems[0]


@pytest.mark.parametrize("tr_ms, t1_ms, factor", [(None, 1330.0, 1.0), (5000.0, 1330.0, 1 - math.exp(-5000 / 1330)),
                                                  (1330.0, 1330.0, 1 - math.exp(-1.0))])
def test_m0_recovery_factor(tr_ms, t1_ms, factor):
    from asl.acquisition import m0_recovery_factor

    assert m0_recovery_factor(tr_ms, t1_ms) == pytest.approx(factor)


def test_method_nn_needs_a_checkpoint(tmp_path):
    with pytest.raises(SystemExit):
        predict_asl.main([str(tmp_path), "--method", "nn"])


def test_noise_free_subject_is_recovered_exactly_with_the_sidecar_physics(tmp_path):
    """Without noise the fit with the sidecar's physics (τ 1.5 s, no BS, 1.5 T, α 0.8, M0 TR 3 s) reproduces the
    independent model's truth: the closed-form buxton_full agrees with the numerical integral above."""
    truth = write_subject(tmp_path / "bids", noise=0.0, tau_s=1.5, bs_pulses=0, field_t=1.5, efficiency=0.8,
                          m0_type="Included", m0_tr_s=3.0, plds_s=(0.4, 0.9, 1.4, 1.9, 2.4, 2.9))
    _, maps, _ = run_ls(tmp_path / "bids", tmp_path / "out")
    m = truth["mask"]
    np.testing.assert_allclose(maps["cbf"][m], truth["cbf"][m], rtol=1e-4)
    np.testing.assert_allclose(maps["att"][m], 1000 * truth["att"][m], atol=0.5)


def test_sidecar_physics_versus_config_physics(tmp_path, capsys):
    """τ 1.5 s, no BS, 1.5 T, α 0.8, M0 Included (TR 3 s), 6 PLDs, σ 0.1 per volume: the sidecar's physics
    recovers CBF; the config's (what a reader that ignores the sidecar would use: τ 1.8 s, 4 BS pulses, T1b 1650 ms,
    blood-T1 model) is biased. Prints the numbers quoted in asl/README.md (run with -s)."""
    truth = write_subject(tmp_path / "bids", tau_s=1.5, bs_pulses=0, field_t=1.5, efficiency=0.8, m0_type="Included",
                          m0_tr_s=3.0, plds_s=(0.4, 0.9, 1.4, 1.9, 2.4, 2.9))
    m = truth["mask"]
    config_physics = ["--set", "physics.tau_ms=1800.0", "--set", "physics.n_bs_pcasl=4", "--set",
                      "physics.t1_blood_ms=1650.0", "--set", "physics.alpha_pcasl=0.85", "--set",
                      "physics.pcasl_model=blood_t1"]
    result = {}
    for name, extra in (("sidecar", []), ("config", config_physics)):
        _, maps, _ = run_ls(tmp_path / "bids", tmp_path / name, *extra)
        d_cbf = maps["cbf"][m] - truth["cbf"][m]
        result[name] = (float(np.abs(d_cbf).mean()), float(d_cbf.mean()),
                        float(np.abs(maps["att"][m] - 1000 * truth["att"][m]).mean()))
        print(f"{name} physics: CBF MAE {result[name][0]:.2f} (bias {result[name][1]:+.2f}), "
              f"ATT MAE {result[name][2]:.0f} ms over {int(m.sum())} voxels")
    assert result["sidecar"][0] < 2.0 and abs(result["sidecar"][1]) < 0.5
    assert result["config"][1] < -5.0


def test_aslcontext_rows_must_match_the_volumes(tmp_path):
    write_subject(tmp_path / "bids")
    context = tmp_path / "bids" / "sub-01" / "perfusion" / "sub-01_aslcontext.tsv"
    context.write_text("\n".join(context.read_text(encoding="utf-8").splitlines()[:-1]) + "\n", encoding="utf-8")
    with pytest.raises(InvivoError, match="aslcontext.tsv: 19 rows in 'volume_type' but sub-01_asl.nii.gz has 20"):
        run_ls(tmp_path / "bids", tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("sidecar, key, value, source", [
    ({"ArterialSpinLabelingType": "CASL"}, "alpha_pcasl", 0.68, "default for CASL"),
    ({"ArterialSpinLabelingType": "PCASL", "LabelingEfficiency": 0.72}, "alpha_pcasl", 0.72, "LabelingEfficiency"),
    ({"BackgroundSuppression": True, "BackgroundSuppressionPulseTime": [1.0, 2.0]}, "n_bs_pcasl", 2,
     "BackgroundSuppression"),
    ({"BackgroundSuppression": True}, "n_bs_pcasl", 4, "config"),  # pulse count unknown: config, with a warning
    ({"MagneticFieldStrength": 7}, "t1_blood_ms", 2090.0, "MagneticFieldStrength 7 T"),
    ({"LabelingDuration": 1.65}, "tau_ms", 1650.0, "LabelingDuration"),
])
def test_data_physics_table(sidecar, key, value, source):
    """parse_sidecar + data_physics on hand-written sidecars: the value used and its recorded source."""
    from asl.acquisition import data_physics, parse_sidecar
    from asl.physics import PHYSICS_DEFAULTS

    meta = {"ArterialSpinLabelingType": "PCASL", "PostLabelingDelay": 1.5, **sidecar}
    acq = parse_sidecar(meta, "sub-01_asl.json", 2, [0, 1])
    subject = {"signals": {"pcasl": {1500.0: np.zeros(3)}},
               "meta": {"folder": "x", "runs": [{"mode": "pcasl", "source": "sub-01_asl.nii.gz", "acquisition": acq}]}}
    physics, provenance, warnings = data_physics(subject, PHYSICS_DEFAULTS)
    assert physics[key] == pytest.approx(value) and source in provenance[key]
    if provenance[key].startswith("config"):
        assert any("pulse count" in w for w in warnings)
