"""Phantoms, domain randomization, fixed sets; batched least squares against scipy."""

import numpy as np
import pytest
import torch

from asl.fitting import FIT_DEFAULTS, fit_batched, fit_batched_protocols, fit_scipy, grid_init
from asl.physics import PHYSICS_DEFAULTS, noise_sigma, signal_curves, signal_curves_np
from asl.simulate import (
    LABELS,
    PHANTOM_DEFAULTS,
    RANDOMIZATION_DEFAULTS,
    RANDOMIZED,
    EpochSampler,
    PhantomDataset,
    build_fixed_set,
    generate_phantom,
    load_fixed_set,
    physics_params_from_uniforms,
    save_fixed_set,
    simulate_clean,
)

PH = dict(PHYSICS_DEFAULTS)


@pytest.mark.parametrize("size", [64, 128])
def test_phantom_is_deterministic_brain_like_and_in_range(size):
    cfg = {**PHANTOM_DEFAULTS, "size": size, "voronoi_fraction": 0.0, "p_tumor": 1.0, "p_stroke": 1.0}
    a, b = generate_phantom(7, cfg), generate_phantom(7, cfg)
    for key in a:
        np.testing.assert_array_equal(a[key], b[key])
    assert a["cbf"].shape == (size, size)
    m = a["mask"]
    assert 0.3 < m.mean() < 0.7
    assert a["cbf"].min() >= 0 and a["cbf"].max() <= 200
    assert a["att"][m].min() >= 300 and a["att"][m].max() <= 3900
    assert (a["cbf"][~m] == 0).all()
    for name in ("gm", "wm", "pathology"):
        assert (a["label"] == LABELS[name]).any(), name
    gm = a["cbf"][a["label"] == LABELS["gm"]]
    # Within-tissue variation: not piecewise constant (many distinct values, relative spread > 5 %).
    assert np.unique(gm).size > 0.9 * gm.size and gm.std() / gm.mean() > 0.05
    frac = a["gm"] + a["wm"] + a["csf"]
    np.testing.assert_allclose(frac[m], 1.0, atol=1e-5)
    assert ((a["gm"] > 0.05) & (a["gm"] < 0.95)).any()  # partial volume


def test_voronoi_style_and_different_seeds_differ():
    cfg = {**PHANTOM_DEFAULTS, "size": 48, "voronoi_fraction": 1.0}
    a, b = generate_phantom(1, cfg), generate_phantom(2, cfg)
    assert not np.array_equal(a["cbf"], b["cbf"])


def test_randomization_reaches_signals_and_stays_in_range():
    u = torch.rand((64, len(RANDOMIZED)), generator=torch.Generator().manual_seed(0))
    params = physics_params_from_uniforms(u, PH, RANDOMIZATION_DEFAULTS, 1.0)
    lo, hi = RANDOMIZATION_DEFAULTS["t1_blood_ms"]
    assert float(params["t1_blood_ms"].min()) >= lo and float(params["t1_blood_ms"].max()) <= hi
    nominal = physics_params_from_uniforms(u, PH, RANDOMIZATION_DEFAULTS, 0.0)
    assert torch.allclose(nominal["alpha_pcasl"], torch.full((64,), PH["alpha_pcasl"]))
    cbf = torch.full((64, 4, 4), 50.0)
    att = torch.full((64, 4, 4), 1500.0)
    rand_sig = simulate_clean(cbf, att, PH, params)
    nom_sig = simulate_clean(cbf, att, PH, nominal)
    assert rand_sig.shape == (64, 12, 4, 4)
    assert (rand_sig - nom_sig).abs().max() > 1e-4  # the draw changes the simulated signals
    off = physics_params_from_uniforms(u, PH, {**RANDOMIZATION_DEFAULTS, "enabled": False}, 1.0)
    assert torch.allclose(off["t1_blood_ms"], torch.full((64,), PH["t1_blood_ms"]))


def test_epoch_sampler_new_phantoms_each_epoch_and_disjoint_ranks():
    s0, s1 = EpochSampler(10, 0, 2), EpochSampler(10, 1, 2)
    s0.set_epoch(3)
    s1.set_epoch(3)
    a, b = list(s0), list(s1)
    assert set(a).isdisjoint(b) and sorted(a + b) == list(range(30, 40)) and len(s0) == 5
    ds = PhantomDataset(10, 0, {**PHANTOM_DEFAULTS, "size": 32})
    assert not torch.equal(ds[0]["cbf"], ds[30]["cbf"])
    assert torch.equal(ds[5]["cbf"], ds[5]["cbf"])


def test_fixed_set_round_trip_and_missing_field(tmp_path):
    cfg = {**PHANTOM_DEFAULTS, "size": 32}
    data = build_fixed_set(2, 5, cfg, PH, RANDOMIZATION_DEFAULTS, [3.0, 10.0])
    assert data["noisy"].shape == (2, 2, 12, 32, 32)
    # Noise level of the saved set follows the SNR definition (σ = S_ref / SNR).
    resid = data["noisy"][0] - data["clean"]
    assert resid.std() == pytest.approx(noise_sigma(3.0, PH), rel=0.05)
    path = save_fixed_set(tmp_path / "s.npz", data, {"physics": PH})
    loaded, meta = load_fixed_set(path)
    np.testing.assert_array_equal(loaded["cbf"], data["cbf"])
    assert meta["physics"]["plds_ms"] == PH["plds_ms"]
    np.savez(tmp_path / "bad.npz", cbf=data["cbf"])
    with pytest.raises(ValueError, match="field 'att' is missing"):
        load_fixed_set(tmp_path / "bad.npz")


def voxels(n, snr, seed=0, physics=PH):
    rng = np.random.default_rng(seed)
    cbf, att = rng.uniform(10, 90, n), rng.uniform(500, 3500, n)
    clean = signal_curves_np(cbf, att, physics)
    return cbf, att, clean + rng.standard_normal(clean.shape) * noise_sigma(snr, physics)


def test_batched_ls_agrees_with_scipy():
    _, _, y = voxels(80, 5.0)
    b = fit_batched(y, PH)
    c0, a0 = grid_init(torch.from_numpy(y), PH, None, FIT_DEFAULTS)
    s = fit_scipy(y, PH, init=(c0.numpy(), a0.numpy()), ftol=1e-12, xtol=1e-12)
    both = b["converged"] & s["converged"]
    assert both.mean() > 0.9
    d_cbf = np.abs(b["cbf"] - s["cbf"])[both]
    assert np.mean(d_cbf < 0.1) >= 0.95
    # Where they differ, the batched fit found a lower cost (scipy stopped at a kink of the piecewise model).
    differ = both & (np.abs(b["cbf"] - s["cbf"]) >= 0.1)
    assert np.all(b["cost"][differ] <= s["cost"][differ] * (1 + 1e-6))


def test_grid_products_with_a_tissue_t1_map_equal_the_direct_sums():
    """The closed-form grid sums of the full Buxton model with a T1 per voxel (and a VSASL part) equal the sums of
    the unit-CBF signals evaluated point by point."""
    from asl.fitting import _grid_products

    physics = {**PH, "pcasl_model": "buxton_full", "plds_ms": [500.0, 1000.0, 1800.0, 2300.0, 3000.0]}
    rng = np.random.default_rng(3)
    t1 = torch.from_numpy(rng.uniform(800, 1400, 30))
    y = torch.from_numpy(rng.uniform(-1e-3, 1e-2, (30, 10)))
    grid = torch.linspace(100.0, 4000.0, 40, dtype=torch.float64)
    num, den = _grid_products(grid, physics, {"t1_tissue_ms": t1}, y)
    unit = signal_curves(torch.ones(30, 40, dtype=torch.float64), grid[None].expand(30, 40), physics,
                         {"t1_tissue_ms": t1[:, None].expand(30, 40)})
    assert torch.allclose(num, (unit * y[:, None]).sum(-1), rtol=1e-9, atol=1e-18)
    assert torch.allclose(den, (unit * unit).sum(-1), rtol=1e-9, atol=1e-20)


def test_grid_init_breaks_near_ties_towards_the_shortest_att():
    """Where the cost is flat in ATT to rounding, the first (shortest) such grid ATT is chosen."""
    physics = {**PH, "modes": ["pcasl"]}
    grid_cfg = {**FIT_DEFAULTS, "att_grid_points": 40}
    y = torch.zeros(3, len(physics["plds_ms"]), dtype=torch.float64)  # zero signal: every ATT fits with CBF 0
    cbf, att = grid_init(y, physics, None, grid_cfg)
    assert torch.all(cbf == 0) and torch.all(att == FIT_DEFAULTS["att_bounds_ms"][0])


def test_noise_free_fit_recovers_truth_with_oracle_physics():
    cbf, att, _ = voxels(50, 5.0, seed=1)
    params = {"t1_blood_ms": np.full(50, 1800.0), "alpha_bs1": np.linspace(0.9, 1.0, 50)}
    y = signal_curves_np(cbf, att, PH, params)
    res = fit_batched(y, PH, params)
    ok = ~res["failed"]
    assert ok.mean() > 0.9
    np.testing.assert_allclose(res["cbf"][ok], cbf[ok], rtol=1e-4)
    np.testing.assert_allclose(res["att"][ok], att[ok], rtol=1e-3)
    nominal = fit_batched(y, PH)  # wrong physics → biased
    assert np.abs(nominal["cbf"] - cbf).mean() > 1.0


def test_failures_are_reported_per_voxel():
    y = signal_curves_np([60.0, 60.0], [1300.0, 1300.0], PH)
    y[1] *= 10  # would need CBF 600 > upper bound 200
    res = fit_batched(y, PH)
    assert not res["failed"][0]
    assert res["at_bound"][1] and res["failed"][1] and res["cbf"][1] == pytest.approx(200.0)
    with pytest.raises(ValueError, match="n_voxels, n_channels"):
        fit_batched(np.zeros(12), PH)


@pytest.mark.parametrize("modes", [["pcasl", "vsasl"], ["pcasl"], ["vsasl"]])
def test_nominal_jacobian_of_the_fit_is_signal_jacobian_to_the_bit(modes):
    """The fit's precomputed blood-T1 / VSASL Jacobian gives exactly asl.physics.signal_jacobian, on every branch of
    the piecewise models (before the bolus, during it, after it)."""
    from asl.fitting import _nominal_jacobian
    from asl.physics import signal_jacobian

    physics = {**PH, "modes": modes, "n_bs_pcasl": 3}
    rng = np.random.default_rng(5)
    cbf = torch.from_numpy(rng.uniform(0.0, 150.0, 400))
    att = torch.from_numpy(np.concatenate([rng.uniform(100.0, 4000.0, 397), [500.0, 1800.0, 2300.0]]))
    fast = _nominal_jacobian(physics, cbf)(cbf, att)
    for got, want in zip(fast, signal_jacobian(cbf, att, physics)):
        assert torch.equal(got, want)
    assert _nominal_jacobian({**physics, "pcasl_model": "buxton_full"}, cbf) is None or modes == ["vsasl"]


@pytest.mark.parametrize("model", ["blood_t1", "buxton_full"])
def test_fit_blocks_change_nothing_and_the_final_jacobian_gives_the_crlb(model):
    """Grid and LM blocks (cache-sized work units) leave every voxel's result unchanged to the bit, and the Jacobian
    the fit ends with is the model's at the estimate (the CRLB maps use it)."""
    from asl.physics import crlb, crlb_from_jacobian

    physics = {**PH, "pcasl_model": model}
    _, _, y = voxels(300, 3.0, seed=2)
    params = {"t1_tissue_ms": np.random.default_rng(2).uniform(800, 1400, 300)} if model == "buxton_full" else None
    whole = fit_batched(y, physics, params, {"grid_block_voxels": 0, "lm_block_voxels": 0})
    blocks = fit_batched(y, physics, params, {"grid_block_voxels": 64, "lm_block_voxels": 64})
    assert whole["n_iter"].max() > 3  # the tail is iterated after the blocks are joined
    for key in ("cbf", "att", "cost", "n_iter", "converged", "jacobian"):
        assert np.array_equal(whole[key], blocks[key]), key
    sigma = torch.full((300,), 1e-3, dtype=torch.float64)
    tp = None if params is None else {k: torch.from_numpy(v) for k, v in params.items()}
    want = crlb(torch.from_numpy(whole["cbf"]), torch.from_numpy(whole["att"]), physics, sigma, tp)
    for got, ref in zip(crlb_from_jacobian(whole["jacobian"], sigma), want):
        finite = torch.isfinite(ref)
        assert torch.equal(finite, torch.isfinite(got))
        assert torch.allclose(got[finite], ref[finite], rtol=1e-6)


@pytest.mark.parametrize("model", ["blood_t1", "buxton_full"])
def test_one_fit_over_several_protocols_equals_each_protocol_fitted_alone(model):
    """fit_batched_protocols pads shorter PLD lists with zero-weight measurements: every voxel minimizes the cost
    of its own protocol, so estimates, costs and Jacobians equal fit_batched per protocol to rounding."""
    rng = np.random.default_rng(3)
    sets, physics, params = [], [], []
    for plds, tau, t1b in [([500.0, 1000.0, 1500.0, 2000.0, 2500.0], 1800.0, 1650.0), ([700.0, 1600.0, 2600.0], 1400.0, 1600.0),
                           ([300.0, 800.0, 1300.0, 1800.0, 2300.0, 2800.0, 3300.0], 2000.0, 1700.0)]:
        ph = {**PHYSICS_DEFAULTS, "modes": ["pcasl", "vsasl"], "plds_ms": plds, "pcasl_model": model, "tau_ms": tau,
              "t1_blood_ms": t1b}
        t1 = rng.uniform(832.0, 1331.0, 400)
        clean = signal_curves_np(rng.uniform(10, 90, 400), rng.uniform(500, 2500, 400), ph, {"t1_tissue_ms": t1})
        sets.append(clean + rng.normal(0.0, 2e-3, clean.shape))
        physics.append(ph)
        params.append({"t1_tissue_ms": t1})
    joint = fit_batched_protocols(sets, physics, params, FIT_DEFAULTS)
    for y, ph, p, one in zip(sets, physics, params, joint):
        alone = fit_batched(y, ph, p, FIT_DEFAULTS)
        assert one["jacobian"].shape == alone["jacobian"].shape == (*y.shape, 2)
        assert np.array_equal(one["failed"], alone["failed"]) and (~alone["failed"]).sum() > 300
        ok = ~alone["failed"]
        assert np.abs(one["cbf"] - alone["cbf"])[ok].max() < 1e-4 and np.abs(one["att"] - alone["att"])[ok].max() < 1e-2
        assert np.allclose(one["cost"], alone["cost"], rtol=1e-8, atol=1e-20)
    with pytest.raises(ValueError, match="one set of modes"):
        fit_batched_protocols(sets[:2], [physics[0], {**physics[1], "modes": ["pcasl"]}], params[:2])
