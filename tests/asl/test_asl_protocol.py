"""Protocol-conditioned networks: 3D brain subjects with a T1 per tissue, protocols as data, the set-based network,
training with exact resume, held-out validation against least squares, and predict's protocol-range check."""

import json
import math

import numpy as np
import pytest
import torch

from asl import benchmark_asl, predict_asl, train_protocol_asl, validate_asl
from asl.brain_volume import T1_GM_MS, T1_WM_MS, generate_brain
from asl.data import load_ensemble
from asl.defaults import defaults
from asl.fitting import fit_batched
from asl.invivo import InvivoError, read_nifti
from asl.physics import signal_curves
from asl.protocol import (
    PROTOCOL_DEFAULTS,
    protocol_arrays,
    protocol_coverage,
    protocol_from_physics,
    protocol_range,
    protocol_signals,
    reference_scale,
)
from asl.protocol_eval import METHODS, _fit, held_out_subjects, protocol_physics
from asl.ls_inputs import ls_input_channels, nominal_physics, tissue_t1_from_gm_weight
from asl.protocol_data import ls_slab_inputs, predict_volume
from asl.protocol_net import ProtocolASLNet
from asl.pvc import linear_regression_pvc
from asl.synthetic_subject import write_synthetic_subject
from common.checkpoint import CheckpointError
from common.config import load_config

SMOKE = ["--config", "configs/asl/protocol_smoke.yaml", "--device", "cpu"]
CFG = load_config("configs/asl/protocol_smoke.yaml", defaults=defaults())
PCASL_5PLD = protocol_physics(CFG["brain_test"]["protocols"][0], CFG["physics"])


def _torch(protocol: dict) -> dict:
    return {k: torch.from_numpy(np.asarray(v))[None].double() for k, v in protocol_arrays(protocol).items()}


def _clean(subject: dict, physics: dict) -> np.ndarray:
    t = lambda key: torch.from_numpy(subject[key]).double()[None]  # noqa: E731
    n = len(physics["plds_ms"]) * len(physics["modes"])
    sig = protocol_signals(t("cbf"), t("att"), t("t1_tissue_ms"), _torch(protocol_from_physics(physics)))
    return np.moveaxis(sig[0, :n].numpy(), 0, -1)


def test_brain_subject_has_partial_volumes_and_a_t1_per_tissue():
    subject = generate_brain(5, CFG["brain"], CFG["phantom"])
    mask = subject["mask"]
    assert subject["cbf"].shape == tuple(CFG["brain"]["shape"])
    assert np.allclose((subject["gm"] + subject["wm"] + subject["csf"])[mask], 1.0, atol=1e-5)
    mixed = mask & (subject["gm"] > 0.1) & (subject["wm"] > 0.1)
    assert mixed.sum() > 0.1 * mask.sum()  # real partial-volume voxels, not hard labels
    t1 = subject["t1_tissue_ms"][mask & (subject["gm"] + subject["wm"] > 0.5)]
    jitter = CFG["brain"]["t1_tissue_jitter_rel"]
    assert t1.min() >= T1_WM_MS * (1 - jitter) - 1e-3 and t1.max() <= T1_GM_MS * (1 + jitter) + 1e-3
    gm_dominant, wm_dominant = subject["label"] == 1, subject["label"] == 2
    assert subject["t1_tissue_ms"][gm_dominant].mean() > subject["t1_tissue_ms"][wm_dominant].mean() + 150


def test_fit_with_the_tissue_t1_map_is_exact_and_one_t1_biases_white_matter():
    subject = generate_brain(6, CFG["brain"], CFG["phantom"])
    clean = _clean(subject, PCASL_5PLD)
    exact, _ = _fit(clean, subject["mask"], PCASL_5PLD, subject["t1_tissue_ms"].astype(np.float64), CFG["fit"])
    one_t1, _ = _fit(clean, subject["mask"], PCASL_5PLD, None, CFG["fit"])
    mask, wm = subject["mask"], subject["label"] == 2
    assert np.nanmax(np.abs(exact[0] - subject["cbf"])[mask]) < 1e-2
    perfused = mask & (subject["cbf"] > 5.0)  # ATT is unidentifiable without flow (CSF)
    assert np.nanmax(np.abs(exact[1] - subject["att"])[perfused]) < 1e-1
    assert np.nanmean((one_t1[0] - subject["cbf"])[wm]) < -1.0  # WM T1 832 ms fitted with 1331 ms


def test_protocol_signals_match_the_physics_module():
    physics = {**PCASL_5PLD, "modes": ["pcasl", "vsasl"], "n_bs_pcasl": 4, "n_bs_vsasl": 3}
    cbf, att, t1 = torch.tensor([[55.0, 20.0]]), torch.tensor([[900.0, 2100.0]]), torch.tensor([[1300.0, 900.0]])
    sig = protocol_signals(cbf.double(), att.double(), t1.double(), _torch(protocol_from_physics(physics)))
    n = 2 * len(physics["plds_ms"])
    reference = signal_curves(cbf[0].double(), att[0].double(), physics, {"t1_tissue_ms": t1[0].double()})
    assert torch.allclose(sig[0, :n].T, reference, rtol=1e-6, atol=1e-12)  # protocol arrays are float32
    assert torch.all(sig[0, n:] == 0)  # padded measurements


def test_network_output_does_not_depend_on_measurement_order_or_padding():
    torch.manual_seed(0)
    net = ProtocolASLNet(context_slices=3, set_features=8, features=[8, 16], n_groups=4, cbf_mean=40, cbf_std=20).eval()
    protocol = protocol_from_physics(PCASL_5PLD)
    arrays = {k: torch.from_numpy(np.asarray(v))[None] for k, v in protocol_arrays(protocol).items()}
    x = torch.zeros(1, 3, arrays["valid"].shape[1], 8, 8)
    x[:, :, :5] = torch.rand(1, 3, 5, 8, 8)
    inputs = {"x": x, "s_ref": torch.tensor([0.005]), "gm_weight": torch.rand(1, 3, 8, 8), **arrays}
    order = torch.tensor([3, 0, 4, 2, 1, *range(5, x.shape[2])])
    permuted = {**inputs, "x": x[:, :, order], **{k: arrays[k][:, order] for k in ("pld_ms", "is_vsasl", "valid")}}
    with torch.no_grad():
        a, b = net(inputs), net(permuted)
    for key in ("cbf", "att", "log_var_cbf", "log_var_att"):
        assert torch.allclose(a[key], b[key], atol=1e-5)


def test_protocol_coverage_names_each_mismatch():
    covered = protocol_range({**PROTOCOL_DEFAULTS, "mode_sets": [["pcasl"]]})
    assert protocol_coverage(PCASL_5PLD, covered) == []
    assert "labeling modes ['VSASL']" in protocol_coverage({**PCASL_5PLD, "modes": ["vsasl"]}, covered)[0]
    assert "9 PLDs outside the trained 1-8" in protocol_coverage(
        {**PCASL_5PLD, "plds_ms": [300.0 * i for i in range(1, 10)]}, covered)[0]
    assert "PLDs [4000.0] ms outside" in protocol_coverage({**PCASL_5PLD, "plds_ms": [1000.0, 4000.0]}, covered)[0]
    assert "labeling duration 3000 ms" in protocol_coverage({**PCASL_5PLD, "tau_ms": 3000.0}, covered)[0]


@pytest.fixture(scope="module")
def protocol_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("protocol_train")
    return out, train_protocol_asl.main([*SMOKE, "--output-dir", str(out)])


def test_checkpoint_records_its_protocol_range_and_resume_is_exact(protocol_run, tmp_path):
    out, summary = protocol_run
    assert summary["epochs_completed"] == CFG["train"]["epochs"] and not summary["interrupted"]
    ckpt = torch.load(out / "checkpoint_best.pt", weights_only=True)
    assert ckpt["preprocessing"]["protocol_range"] == protocol_range(CFG["protocol"])
    stopped = tmp_path / "stopped"
    first = train_protocol_asl.main([*SMOKE, "--output-dir", str(stopped), "--stop-after-steps", "4"])
    assert first["interrupted"]
    assert json.loads((stopped / "run_state.json").read_text(encoding="utf-8"))["status"] == "interrupted"
    train_protocol_asl.main([*SMOKE, "--output-dir", str(stopped), "--resume"])
    a = torch.load(out / "checkpoint_last.pt", weights_only=True)["state_dict"]
    b = torch.load(stopped / "checkpoint_last.pt", weights_only=True)["state_dict"]
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_validate_compares_with_correctly_configured_ls_with_intervals(protocol_run, tmp_path):
    out, _ = protocol_run
    summary = validate_asl.main(["--checkpoint", str(out), *SMOKE, "--output-dir", str(tmp_path / "v")])
    assert {r["method"] for r in summary["rows"]} == set(METHODS)
    for row in summary["rows"]:
        assert row["mae_ci95_lo"] <= row["mae"] <= row["mae_ci95_hi"]
    nn_gm = [r for r in summary["rows"] if r["method"] == "nn" and r["tissue"] == "gm"]
    assert nn_gm and all(len(r["minus_ls_ci95"]) == 2 for r in nn_gm)
    assert (tmp_path / "v" / "report.md").read_text(encoding="utf-8").count("| pcasl_5pld |") == len(summary["rows"])
    # ±1.96σ coverage for the network (its σ scaled) and the LS √CRLB, none for LS with one T1 (no bound computed)
    for row in summary["rows"]:
        assert (row["coverage95"] is None) == (row["method"] == "ls_one_t1")
        assert row["coverage95"] is None or 0.0 <= row["coverage95"] <= 1.0
    assert summary["sigma_scale"][0].startswith("σ scale CBF")


def test_training_stores_a_sigma_scale_that_predict_volume_applies(protocol_run, tmp_path):
    """The scale fitted after training is in checkpoint_best.pt; predict_volume multiplies the variance by s² per
    output and leaves the maps alone; a checkpoint without one runs with s = 1 and says so."""
    out, summary = protocol_run
    ckpt = torch.load(out / "checkpoint_best.pt", weights_only=True)
    record = ckpt["extra"]["sigma_scale"]
    assert summary["sigma_scale"]["cbf"] == record["cbf"] and record["cbf_voxels"] > 0 and record["draws"] == 4
    lo, hi = CFG["protocol_net"]["snr_range"]
    assert lo <= record["snr_range"][0] < record["snr_range"][1] <= hi
    # coverage on the validation voxels after scaling is the share within ±1.96 s σ: recomputed from the errors
    model, _ = load_ensemble([out / "checkpoint_best.pt"], "cpu")
    err = train_protocol_asl.calibration_errors(model[0], CFG, ckpt["preprocessing"]["target_stats"], 4, "cpu")
    for key in ("cbf", "att"):
        s = record[key]
        assert s == pytest.approx(math.sqrt(np.mean(err[f"{key}_err"] ** 2 / err[f"{key}_var"])))
        inside = np.abs(err[f"{key}_err"]) <= 1.96 * s * np.sqrt(err[f"{key}_var"])
        assert record[f"{key}_val_coverage95_after"] == pytest.approx(inside.mean())
    scaled = model[0]
    assert scaled.sigma_scale == {"cbf": record["cbf"], "att": record["att"]}
    unscaled = ProtocolASLNet(**ckpt["model"]["kwargs"])
    unscaled.load_state_dict(ckpt["state_dict"])
    assert "none stored" in unscaled.load_sigma_scale({k: v for k, v in ckpt.items() if k != "extra"})
    subject = held_out_subjects(CFG["brain_test"], CFG["brain"], CFG["phantom"], n=1)[0]
    signals = _clean(subject, PCASL_5PLD).astype(np.float32)
    protocol = protocol_from_physics(PCASL_5PLD)
    stats = ckpt["preprocessing"]["target_stats"]
    a = predict_volume([unscaled], signals, protocol, None, stats)
    b = predict_volume([scaled], signals, protocol, None, stats)
    assert np.array_equal(a["cbf"], b["cbf"]) and np.array_equal(a["att"], b["att"])
    for key in ("cbf", "att"):
        np.testing.assert_allclose(b[f"{key}_var"], a[f"{key}_var"] * record[key] ** 2, rtol=1e-12)


def test_calibrate_fits_an_existing_checkpoint_into_a_new_folder(protocol_run, tmp_path):
    out, _ = protocol_run
    ckpt = torch.load(out / "checkpoint_best.pt", weights_only=True)
    old = {k: v for k, v in ckpt.items() if k != "extra"}  # as written before the scale existed
    (tmp_path / "old").mkdir()
    torch.save(old, tmp_path / "old" / "checkpoint_best.pt")
    with pytest.raises(SystemExit):  # never into the source's own folder
        train_protocol_asl.main([*SMOKE, "--calibrate", str(tmp_path / "old"), "--output-dir", str(tmp_path / "old")])
    summary = train_protocol_asl.main([*SMOKE, "--calibrate", str(tmp_path / "old"), "--output-dir",
                                       str(tmp_path / "cal")])
    assert "extra" not in torch.load(tmp_path / "old" / "checkpoint_best.pt", weights_only=True)
    new = torch.load(tmp_path / "cal" / "checkpoint_best.pt", weights_only=True)
    for key in ("cbf", "att"):  # the same validation slabs and noise as the scale fitted after training
        assert new["extra"]["sigma_scale"][key] == pytest.approx(ckpt["extra"]["sigma_scale"][key], rel=1e-9)
        assert summary["sigma_scale"][key] == new["extra"]["sigma_scale"][key]
    assert all(torch.equal(new["state_dict"][k], old["state_dict"][k]) for k in old["state_dict"])
    fixed = {**old, "preprocessing": {k: v for k, v in old["preprocessing"].items() if k != "protocol_range"}}
    torch.save(fixed, tmp_path / "fixed.pt")  # not a protocol-conditioned network: refused before anything is written
    with pytest.raises(CheckpointError, match=r"fixed.pt: field 'preprocessing.protocol_range' is missing"):
        train_protocol_asl.main([*SMOKE, "--calibrate", str(tmp_path / "fixed.pt"), "--output-dir",
                                 str(tmp_path / "never")])
    assert not (tmp_path / "never").exists()
    bad = {**old, "extra": {"sigma_scale": {"cbf": -1.0, "att": 1.0}}}
    torch.save(bad, tmp_path / "bad.pt")
    with pytest.raises(CheckpointError, match=r"bad.pt: field 'extra.sigma_scale.cbf' must be a positive number"):
        load_ensemble([tmp_path / "bad.pt"], "cpu")


def test_predict_reads_the_data_protocol_and_refuses_one_outside_the_range(protocol_run, tmp_path):
    out, _ = protocol_run
    physics = {**CFG["physics"], "modes": ["pcasl"], "plds_ms": [700.0, 1400.0, 2100.0], "pcasl_model": "buxton_full",
               "tau_ms": 1600.0}
    phantom = {**CFG["phantom"], "size": 16}
    write_synthetic_subject(tmp_path / "s3", phantom, physics, n_slices=2, seed=3, snr=8.0)
    summary = predict_asl.main([str(tmp_path / "s3" / "bids"), "--checkpoint", str(out), *SMOKE,
                                "--output-dir", str(tmp_path / "p")])
    assert summary["method"] == "both" and summary["physics"]["tau_ms"] == 1600.0
    assert "cbf.nii.gz" in " ".join(summary["files"]) and np.isfinite(summary["brain_mean"]["nn"]["cbf"])
    maps = json.loads((tmp_path / "p" / "maps.json").read_text(encoding="utf-8"))
    assert maps["tissue_t1"] == "per voxel from GM/WM maps" and maps["network"]["protocol_range"]
    assert maps["network"]["sigma_scale"][0].startswith("σ scale CBF")
    pvc = predict_asl.main([str(tmp_path / "s3" / "bids"), "--method", "ls", *SMOKE, "--set", "predict.pvc=true",
                            "--output-dir", str(tmp_path / "pvc")])
    assert {f"ls_pvc_{k}_{t}.nii.gz" for k in ("cbf", "att") for t in ("gm", "wm")} <= set(pvc["files"])
    write_synthetic_subject(tmp_path / "s9", phantom, {**physics, "plds_ms": [300.0 * i for i in range(1, 10)]},
                            n_slices=1, seed=4, snr=8.0)
    with pytest.raises(InvivoError, match="9 PLDs outside the trained 1-8"):
        predict_asl.main([str(tmp_path / "s9" / "bids"), "--checkpoint", str(out), *SMOKE,
                          "--output-dir", str(tmp_path / "p9")])
    assert not (tmp_path / "p9").exists()


def test_benchmark_times_a_protocol_network_as_predict_runs_it(protocol_run, tmp_path):
    out, _ = protocol_run
    bench = benchmark_asl.main(["--checkpoint", str(out), *SMOKE, "--set", "benchmark.n_scipy_voxels=30",
                                "--set", "benchmark.repeats=1", "--output-dir", str(tmp_path / "b")])
    subject = held_out_subjects(CFG["brain_test"], CFG["brain"], CFG["phantom"], n=1)[0]
    assert bench["kind"] == "protocol_conditioned" and bench["voxels"] == int(subject["mask"].sum())
    assert bench["ls_model"] == "buxton_full" and bench["ls_tissue_t1_map"]
    assert all(np.isfinite(v) and v > 0 for v in bench["rates"].values())
    assert bench["ratios"]["nn_vs_batched_ls"] == pytest.approx(
        bench["rates"]["nn_voxels_per_s"] / bench["rates"]["batched_ls_voxels_per_s"])
    assert set(bench["coverage_95"]) >= {"nn_cbf", "nn_att", "ls_crlb_cbf"}
    assert all(0.0 <= v <= 1.0 for v in bench["coverage_95"].values())
    assert bench["agreement"]["share_batched_cost_le_scipy"] >= 0.9
    assert "before" in bench["load_average_1min"]


def test_predict_volume_encodes_each_slice_once_and_matches_the_network_on_windows():
    """predict_volume encodes every slice once and decodes each window of K slices: the same maps as calling the
    network on each window (edge slices repeated)."""
    torch.manual_seed(0)
    net = ProtocolASLNet(context_slices=3, set_features=8, features=[8, 16], n_groups=4, cbf_mean=40, cbf_std=20,
                         att_mean=1500, att_std=400).eval()
    protocol = protocol_from_physics(PCASL_5PLD)
    arrays = {k: torch.from_numpy(np.asarray(v))[None] for k, v in protocol_arrays(protocol).items()}
    s_ref = reference_scale(arrays)
    rng = np.random.default_rng(0)
    signals = (rng.uniform(0, 2, (8, 8, 5, 5)) * float(s_ref)).astype(np.float32)
    weight = rng.uniform(0, 1, (8, 8, 5)).astype(np.float32)
    stats = {"cbf_mean": 40.0, "cbf_std": 20.0, "att_mean": 1500.0, "att_std": 400.0}
    maps = predict_volume([net], signals, protocol, weight, stats, batch_slices=2)
    # channels-last windows (the CPU default) and channels-first ones: the same maps to float32 rounding
    first = predict_volume([net], signals, protocol, weight, stats, batch_slices=2, channels_last=False)
    for key, tol in (("cbf", 1e-4), ("att", 1e-3), ("cbf_var", 1e-3), ("att_var", 1.0)):
        np.testing.assert_allclose(maps[key], first[key], rtol=1e-5, atol=tol)
    x_all = torch.zeros(5, arrays["valid"].shape[1], 8, 8)
    x_all[:, :5] = torch.from_numpy(np.moveaxis(signals, (2, 3), (0, 1))) / s_ref
    w_all = torch.from_numpy(np.moveaxis(weight, 2, 0))
    for z in range(5):
        idx = np.clip(np.arange(z - 1, z + 2), 0, 4)
        with torch.no_grad():
            out = net({"x": x_all[idx][None], "gm_weight": w_all[idx][None], "s_ref": s_ref, **arrays})
        assert np.allclose(maps["cbf"][..., z], out["cbf"][0, 0].numpy() * 20 + 40, atol=1e-4)
        assert np.allclose(maps["att"][..., z], out["att"][0, 0].numpy() * 400 + 1500, atol=1e-3)


def test_grid_estimates_in_place_equal_the_plain_formula_to_the_bit():
    """The in-place grid estimate (asl.protocol_net.ProtocolASLNet.grid_estimates) performs the same floating-point
    operations as the plain expressions below, so CBF and the argmin's ATT are identical, near-ties included."""
    torch.manual_seed(1)
    net = ProtocolASLNet(context_slices=1, set_features=4, features=[8, 16], n_groups=4)
    protocol = protocol_from_physics(PCASL_5PLD)
    arrays = {k: torch.from_numpy(np.asarray(v))[None].expand(3, -1) if np.ndim(v) else
              torch.tensor(float(v)).expand(3) for k, v in protocol_arrays(protocol).items()}
    s_ref = reference_scale({k: v[:1] for k, v in arrays.items()}).expand(3)
    u_gm, u_wm = net.unit_tables({k: v.float() for k, v in arrays.items()}, s_ref.float())
    x = torch.randn(3, u_gm.shape[2], 16, 16) * 0.5 + 1.0
    w = torch.rand(3, 16, 16)
    w[0, :4] = 1.0  # no partial-volume maps
    x[1, :, :2] = 0.0  # flat cost over the grid: ties resolved to the first (shortest) ATT
    got = net.grid_estimates(x, w, u_gm, u_wm)
    n_gm, n_wm = torch.einsum("bmhw,bgm->bghw", x, u_gm), torch.einsum("bmhw,bgm->bghw", x, u_wm)
    d_gg, d_gw, d_ww = ((a * c).sum(-1)[..., None, None] for a, c in ((u_gm, u_gm), (u_gm, u_wm), (u_wm, u_wm)))
    wv = w[:, None]
    num = wv * n_gm + (1 - wv) * n_wm
    den = (wv**2 * d_gg + 2 * wv * (1 - wv) * d_gw + (1 - wv) ** 2 * d_ww).clamp_min(1e-12)
    cbf = (num / den).clamp(0.0, 200.0)
    best = (cbf * cbf * den - 2 * cbf * num).argmin(dim=1, keepdim=True)
    assert torch.equal(got[:, :1], cbf.gather(1, best) / 50.0)
    assert torch.equal(got[:, 1:], (net.att_grid[best] - 1500.0) / 1000.0)
    assert bool((got[1, 1, :2] == (net.att_grid[0] - 1500.0) / 1000.0).all())


def test_linear_regression_pvc_recovers_two_compartments():
    """Two-compartment data (GM CBF 60 / ATT 1200 ms / T1 1331 ms, WM 20 / 1600 / 832) with random GM/WM fractions:
    the regression returns each compartment's signal and its fit the compartment's CBF and ATT."""
    rng = np.random.default_rng(0)
    shape = (12, 12, 2)
    gm = np.clip(rng.uniform(-0.2, 1.2, shape), 0, 1)
    curve = lambda cbf, att, t1: signal_curves(  # noqa: E731
        np.full(shape, cbf), np.full(shape, att), {**PCASL_5PLD, "t1_tissue_ms": t1})
    s_gm, s_wm = curve(60.0, 1200.0, T1_GM_MS), curve(20.0, 1600.0, T1_WM_MS)
    signals = gm[..., None] * s_gm + (1 - gm)[..., None] * s_wm
    res = linear_regression_pvc(signals, gm, 1 - gm, np.ones(shape, bool), kernel=5, ridge=1e-6)
    assert np.abs(res["gm_signals"] - s_gm).max() < 1e-4 * s_gm.max()
    fit = fit_batched(res["gm_signals"][res["gm_ok"]], {**PCASL_5PLD, "t1_tissue_ms": T1_GM_MS})
    assert np.abs(fit["cbf"] - 60.0).max() < 0.01 and np.abs(fit["att"] - 1200.0).max() < 0.1


def test_every_protocol_config_builds_its_network():
    for name in ("protocol_smoke", "protocol_pcasl", "protocol_general", "protocol_pcasl_ls"):
        cfg = load_config(f"configs/asl/{name}.yaml", defaults=defaults())
        stats = {"cbf_mean": 40.0, "cbf_std": 20.0, "att_mean": 1500.0, "att_std": 400.0}
        target, kwargs = train_protocol_asl.model_kwargs(cfg, stats)
        assert target == "asl.protocol_net.ProtocolASLNet" and ProtocolASLNet(**kwargs).k == 3


def test_ls_inputs_are_the_fit_and_predict_builds_the_training_inputs():
    """The LS channels recover noise-free CBF/ATT, and predict_volume hands the network exactly the channels
    the training path (simulate_batch → ls_slab_inputs) computes for the same slab."""
    subject = generate_brain(7, CFG["brain"], CFG["phantom"], (2, 5))  # 3 slices = one slab = the whole volume
    gm_w = np.where(subject["gm"] + subject["wm"] > 1e-6, subject["gm"] / np.maximum(subject["gm"] + subject["wm"],
                                                                                      1e-6), 1.0)
    t1 = {**subject, "t1_tissue_ms": tissue_t1_from_gm_weight(gm_w)}  # the T1 the LS inputs assume
    clean = _clean(t1, PCASL_5PLD)
    rng = np.random.default_rng(0)
    noisy = clean + rng.standard_normal(clean.shape) * 0.0002
    protocol = protocol_from_physics(PCASL_5PLD)
    mask = subject["mask"]
    exact, _ = ls_input_channels(clean[mask], gm_w[mask], nominal_physics(protocol_arrays(protocol)), CFG["fit"])
    perfused = subject["cbf"][mask] > 5.0
    assert np.abs(exact[:, 0] * 50 - subject["cbf"][mask]).max() < 1e-2
    assert np.abs(exact[perfused, 1] * 1000 + 1500 - subject["att"][mask][perfused]).max() < 0.1

    net = ProtocolASLNet(context_slices=3, set_features=8, features=[8, 16], n_groups=4, ls_inputs=True).eval()
    seen = []
    net.blend_with_ls = lambda out, feat, ls, *a: seen.append(ls) or {}
    stats = {"cbf_mean": 0.0, "cbf_std": 1.0, "att_mean": 0.0, "att_std": 1.0}
    predict_volume([net], noisy.astype(np.float32), protocol, gm_w, stats, mask=mask, fit_cfg=CFG["fit"])
    arrays = {k: torch.from_numpy(np.asarray(v))[None] for k, v in protocol_arrays(protocol).items()}
    s_ref = reference_scale(arrays)
    x = torch.zeros(1, 3, arrays["valid"].shape[1], *mask.shape[:2])
    x[0, :, :5] = torch.from_numpy(np.moveaxis(noisy.astype(np.float32), (2, 3), (0, 1))) / s_ref
    train = ls_slab_inputs(x, s_ref, arrays, torch.from_numpy(np.moveaxis(gm_w, 2, 0)).float()[None],
                           torch.from_numpy(np.moveaxis(mask, 2, 0))[None], CFG["fit"])
    centre = seen[0][1]  # one batch of the 3 slices; the blend receives each one's centre slice
    assert centre.shape == train[0, 1].shape and torch.all(centre[4] == train[0, 1, 4])
    assert centre[4].sum() > 0.9 * mask[..., 1].sum()
    assert torch.allclose(centre, train[0, 1], rtol=1e-4, atol=1e-4)


def test_ls_blend_starts_as_the_inverse_variance_combination():
    torch.manual_seed(1)
    kw = {"context_slices": 3, "set_features": 8, "features": [8, 16], "n_groups": 4, "cbf_mean": 40.0,
          "cbf_std": 20.0, "att_mean": 1500.0, "att_std": 400.0}
    plain = ProtocolASLNet(**kw).eval()
    blended = ProtocolASLNet(**kw, ls_inputs=True).eval()
    blended.load_state_dict(plain.state_dict(), strict=False)  # only the zero-initialized correction Δ is new
    arrays = {k: torch.from_numpy(np.asarray(v))[None] for k, v in protocol_arrays(protocol_from_physics(PCASL_5PLD)).items()}
    x = torch.zeros(1, 3, arrays["valid"].shape[1], 8, 8)
    x[:, :, :5] = torch.rand(1, 3, 5, 8, 8)
    ls = torch.stack([torch.full((8, 8), 1.2), torch.full((8, 8), -0.3), torch.full((8, 8), 3.0),
                      torch.full((8, 8), 9.0), (torch.arange(64) % 2).float().view(8, 8)])[None, None].repeat(1, 3, 1, 1, 1)
    inputs = {"x": x, "s_ref": torch.tensor([0.005]), "gm_weight": torch.ones(1, 3, 8, 8), **arrays}
    with torch.no_grad():
        net, out = plain(inputs), blended({**inputs, "ls": ls})
    valid = ls[0, 1, 4] > 0.5
    for name, theta_ls, ln_v_ls, (mean, std) in (("cbf", 60.0, 3.0, (40.0, 20.0)), ("att", 1200.0, 9.0, (1500.0, 400.0))):
        v_net = torch.exp(net[f"log_var_{name}"][0, 0]) * std**2
        theta_net = net[name][0, 0] * std + mean
        v_ls = math.exp(ln_v_ls)
        expected = torch.where(valid, (v_ls * theta_net + v_net * theta_ls) / (v_net + v_ls), theta_net)
        assert torch.allclose(out[name][0, 0] * std + mean, expected, rtol=1e-4, atol=1e-3)


def test_predict_both_fits_ls_once_for_the_maps_and_the_network(tmp_path, monkeypatch):
    """With a network that blends with LS, --method both fits LS once: its maps equal --method nn's (network) and
    --method ls's (LS) bit for bit, each of which also fits once."""
    import asl.ls_inputs

    net = tmp_path / "net"
    train_protocol_asl.main([*SMOKE, "--set", "protocol_net.ls_inputs=true", "--set", "train.epochs=1",
                             "--output-dir", str(net)])
    physics = {**CFG["physics"], "modes": ["pcasl"], "plds_ms": [700.0, 1400.0, 2100.0], "pcasl_model": "buxton_full"}
    write_synthetic_subject(tmp_path / "s", {**CFG["phantom"], "size": 16}, physics, n_slices=2, seed=3, snr=8.0)
    fitted = []
    for module in (predict_asl, asl.ls_inputs):
        real = module.fit_batched
        monkeypatch.setattr(module, "fit_batched", lambda y, *a, real=real, **k: fitted.append(len(y)) or real(y, *a, **k))
    maps = {}
    for method in ("both", "nn", "ls"):
        fitted.clear()
        summary = predict_asl.main([str(tmp_path / "s" / "bids"), "--checkpoint", str(net), "--method", method, *SMOKE,
                                    "--output-dir", str(tmp_path / method)])
        assert fitted == [summary["mask_voxels"]], method  # one fit of the brain voxels
        maps[method] = {f: read_nifti(tmp_path / method / f)[0] for f in ("cbf.nii.gz", "att_std.nii.gz",
                                                                          "ls_cbf.nii.gz", "ls_att_std.nii.gz")
                        if (tmp_path / method / f).exists()}
    assert set(maps["both"]) == set(maps["nn"]) | set(maps["ls"]) and len(maps["both"]) == 4
    for method in ("nn", "ls"):
        assert all(np.array_equal(maps["both"][f], v, equal_nan=True) for f, v in maps[method].items())
    note = json.loads((tmp_path / "both" / "maps.json").read_text(encoding="utf-8"))["network"]["ls_inputs"]
    assert note.startswith("the LS fit of ls_")


def test_joint_fit_over_protocols_gives_the_per_item_ls_channels():
    """One batched fit over a training batch's different protocols (the CUDA path of ls_slab_inputs,
    asl.fitting.fit_batched_protocols) gives each item the LS channels of its own fit to rounding."""
    from torch.utils.data import default_collate

    from asl.protocol_data import BrainSlabDataset, simulate_batch

    cfg = {**CFG["protocol_net"], "crop_px": 16}
    dataset = BrainSlabDataset(6, 5, CFG["brain"], CFG["phantom"], CFG["protocol"], cfg)
    batch = default_collate([dataset[i] for i in range(6)])
    assert len({int(v) for v in batch["nominal_valid"].sum(1)}) > 1  # protocols of different lengths
    inputs = simulate_batch(batch, "cpu", torch.Generator().manual_seed(0), snr=8.0)
    nominal = {k[len("nominal_"):]: v for k, v in batch.items() if k.startswith("nominal_")}
    args = (inputs["x"], inputs["s_ref"], nominal, inputs["gm_weight"], batch["mask"], CFG["fit"])
    apart, joint = ls_slab_inputs(*args, joint=False), ls_slab_inputs(*args, joint=True)
    valid = apart[:, :, 4] > 0.5
    assert valid.sum() > 200 and torch.equal(valid, joint[:, :, 4] > 0.5)
    diff = (apart - joint).abs().amax(2)[valid]
    assert float(diff.median()) < 1e-6 and float((diff > 1e-3).float().mean()) < 0.01
