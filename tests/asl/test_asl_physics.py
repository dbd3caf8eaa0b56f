"""Signal equations (hand-computed values at the branch boundaries, published check values), CRLB against a
numeric Jacobian, and the SNR definition."""

import math

import numpy as np
import pytest
import torch

from asl.physics import (
    PHYSICS_DEFAULTS,
    check_physics,
    crlb,
    noise_sigma,
    reference_signal,
    signal_curves,
    signal_curves_np,
    signal_jacobian,
)
from asl.simulate import add_noise


def physics(**kw):
    p = dict(PHYSICS_DEFAULTS)
    p["alpha_bs1"] = 1.0  # hand values below use no background-suppression loss unless stated
    p.update(kw)
    return p


T1B, TAU, LAM = 1650.0, 1800.0, 0.9


def pcasl_hand(cbf, att, pld, alpha=0.85):
    f = cbf / 6000
    scale = 2 * alpha * f / LAM * T1B / 1000
    if pld < att - TAU:
        return 0.0
    if pld < att:
        return scale * (math.exp(-att / T1B) - math.exp(-(TAU + pld) / T1B))
    return scale * math.exp(-pld / T1B) * (1 - math.exp(-TAU / T1B))


@pytest.mark.parametrize("cbf, att, pld", [
    (60, 1300, 500),     # transit branch (published check value 0.00644)
    (60, 1300, 1300),    # PLD == ATT: first sample of the arrived branch
    (60, 1300, 2500),    # arrived
    (40, 3000, 1199),    # PLD just below ATT − τ = 1200: zero
    (40, 3000, 1200),    # PLD == ATT − τ: transit branch starts at exactly 0
    (40, 3000, 2999),    # just before ATT
])
def test_pcasl_matches_hand_computation(cbf, att, pld):
    got = signal_curves_np([cbf], [att], physics(modes=["pcasl"], plds_ms=[pld]))[0, 0]
    assert got == pytest.approx(pcasl_hand(cbf, att, pld), rel=1e-12, abs=1e-15)


def test_pcasl_published_value_and_continuity():
    got = signal_curves_np([60.0], [1300.0], physics(modes=["pcasl"], plds_ms=[500.0]))[0, 0]
    assert got == pytest.approx(0.00644, abs=5e-6)
    # Continuous at PLD = ATT − τ (0) and at PLD = ATT (both branches agree).
    ph = physics(modes=["pcasl"], plds_ms=[1200.0 - 1e-6, 1200.0 + 1e-6, 3000.0 - 1e-6, 3000.0])
    s = signal_curves_np([40.0], [3000.0], ph)[0]
    assert s[0] == 0.0 and abs(s[1]) < 1e-10  # slope × 1e-6 ms
    assert s[2] == pytest.approx(s[3], rel=1e-6)


def test_buxton_full_published_values():
    ph = physics(modes=["pcasl"], plds_ms=[500.0, 2500.0], pcasl_model="buxton_full", t1_tissue_ms=1330.0)
    s = signal_curves_np([60.0], [1300.0], ph)[0]
    assert s[0] == pytest.approx(0.00601, abs=5e-6)
    assert s[1] == pytest.approx(0.00337, abs=5e-6)
    # Before the bolus arrives (t = τ + PLD < ATT) the signal is 0.
    assert signal_curves_np([60.0], [3000.0], physics(modes=["pcasl"], plds_ms=[1000.0], pcasl_model="buxton_full"))[0, 0] == 0.0


@pytest.mark.parametrize("att, pld, factor_ms", [(1000, 500, 500), (1000, 1000, 1000), (1000, 2000, 1000), (3000, 2000, 2000)])
def test_vsasl_min_pld_att(att, pld, factor_ms):
    expected = 2 * 0.56 * (60 / 6000) / LAM * (factor_ms / 1000) * math.exp(-pld / T1B)
    got = signal_curves_np([60.0], [float(att)], physics(modes=["vsasl"], plds_ms=[float(pld)]))[0, 0]
    assert got == pytest.approx(expected, rel=1e-12)


def test_background_suppression_pulse_counts_and_m0_scale():
    base = signal_curves_np([50.0], [1200.0], physics(plds_ms=[2000.0]))[0]
    bs = signal_curves_np([50.0], [1200.0], physics(plds_ms=[2000.0], alpha_bs1=0.9))[0]
    assert bs[0] / base[0] == pytest.approx(0.9**4)
    assert bs[1] / base[1] == pytest.approx(0.9**3)
    scaled = signal_curves_np([50.0], [1200.0], physics(plds_ms=[2000.0]), {"m0_scale": [1.1]})[0]
    np.testing.assert_allclose(scaled, 1.1 * base)
    shifted = signal_curves_np([50.0], [1200.0], physics(plds_ms=[2000.0]), {"pld_offset_ms": [100.0]})[0]
    np.testing.assert_allclose(shifted, signal_curves_np([50.0], [1200.0], physics(plds_ms=[2100.0]))[0])


def test_torch_numpy_agree_and_per_voxel_params_broadcast():
    ph = physics()
    cbf, att = np.array([[10.0, 60.0], [90.0, 30.0]]), np.array([[500.0, 1300.0], [2500.0, 3900.0]])
    params = {"t1_blood_ms": np.array([[1500.0, 1600.0], [1700.0, 1800.0]])}
    t = signal_curves(torch.from_numpy(cbf), torch.from_numpy(att), ph, {k: torch.from_numpy(v) for k, v in params.items()})
    n = signal_curves_np(cbf, att, ph, params)
    assert t.shape == (2, 2, 12)
    np.testing.assert_allclose(t.numpy(), n, rtol=1e-12)
    single = signal_curves_np([90.0], [2500.0], physics(t1_blood_ms=1700.0))[0]
    np.testing.assert_allclose(n[1, 0], single, rtol=1e-12)


def test_signals_are_differentiable():
    cbf = torch.tensor([50.0], requires_grad=True)
    att = torch.tensor([1500.0], requires_grad=True)
    signal_curves(cbf, att, physics()).sum().backward()
    assert torch.isfinite(cbf.grad).all() and torch.isfinite(att.grad).all() and att.grad.abs().sum() > 0


def numeric_jacobian(cbf, att, ph, h=(1e-4, 1e-2)):
    jc = (signal_curves_np([cbf + h[0]], [att], ph) - signal_curves_np([cbf - h[0]], [att], ph))[0] / (2 * h[0])
    ja = (signal_curves_np([cbf], [att + h[1]], ph) - signal_curves_np([cbf], [att - h[1]], ph))[0] / (2 * h[1])
    return np.stack([jc, ja], axis=-1)


@pytest.mark.parametrize("model", ["blood_t1", "buxton_full"])
@pytest.mark.parametrize("cbf, att", [(60.0, 1300.0), (25.0, 2200.0), (80.0, 700.0)])
def test_crlb_against_numeric_jacobian(model, cbf, att):
    ph = physics(pcasl_model=model)
    sigma = noise_sigma(5.0, ph)
    j = numeric_jacobian(cbf, att, ph)
    _, j_code = signal_jacobian(np.array([cbf]), np.array([att]), ph)
    np.testing.assert_allclose(j_code[0], j, rtol=1e-4, atol=1e-12)
    inv = np.linalg.inv(j.T @ j / sigma**2)
    var_cbf, var_att = crlb(torch.tensor([cbf]), torch.tensor([att]), ph, sigma)
    assert float(var_cbf[0]) == pytest.approx(inv[0, 0], rel=1e-3)
    assert float(var_att[0]) == pytest.approx(inv[1, 1], rel=1e-3)


def test_crlb_infinite_when_att_unidentifiable():
    # PCASL only, every PLD before the bolus: the signal is 0 whatever ATT → singular Fisher information.
    ph = physics(modes=["pcasl"], plds_ms=[200.0, 300.0])
    var_cbf, var_att = crlb(torch.tensor([50.0]), torch.tensor([3500.0]), ph, 1e-3)
    assert math.isinf(float(var_att[0]))


def test_snr_definition_and_noise_level():
    ph = physics()
    s_ref = reference_signal(ph)
    gm = signal_curves_np([60.0], [1300.0], ph)[0]
    assert s_ref == pytest.approx(gm.mean())
    assert noise_sigma(4.0, ph) == pytest.approx(s_ref / 4.0)
    clean = torch.zeros((4, 12, 64, 64), dtype=torch.float64)
    sigma = noise_sigma(5.0, ph)
    noisy = add_noise(clean, torch.full((4,), sigma, dtype=torch.float64), "gaussian", torch.Generator().manual_seed(0))
    assert float(noisy.std()) == pytest.approx(sigma, rel=0.02)
    rician = add_noise(clean, torch.full((4,), sigma, dtype=torch.float64), "rician", torch.Generator().manual_seed(0))
    assert float(rician.mean()) == pytest.approx(sigma * math.sqrt(math.pi / 2), rel=0.02)


@pytest.mark.parametrize("field, value, match", [
    ("modes", ["pasl"], "physics.modes"), ("plds_ms", [], "physics.plds_ms"),
    ("pcasl_model", "foo", "physics.pcasl_model"), ("tau_ms", 0.0, "physics.tau_ms")])
def test_check_physics_names_the_field(field, value, match):
    with pytest.raises(ValueError, match=match):
        check_physics(physics(**{field: value}))


@pytest.mark.parametrize("modes", [["pcasl"], ["pcasl", "vsasl"]])
def test_buxton_full_closed_form_jacobian_matches_finite_differences(modes):
    """pcasl_buxton_full_jac against central differences of the signal, away from the branch kinks."""
    ph = {**PHYSICS_DEFAULTS, "pcasl_model": "buxton_full", "modes": modes}
    rng = np.random.default_rng(0)
    cbf = torch.tensor(rng.uniform(5, 150, 300), dtype=torch.float64)
    att = torch.tensor(rng.uniform(150, 3900, 300), dtype=torch.float64)
    sig, jac = signal_jacobian(cbf, att, ph)
    torch.testing.assert_close(sig, signal_curves(cbf, att, ph), rtol=1e-12, atol=1e-15)
    dc = (signal_curves(cbf + 1e-4, att, ph) - signal_curves(cbf - 1e-4, att, ph)) / 2e-4
    da = (signal_curves(cbf, att + 1e-3, ph) - signal_curves(cbf, att - 1e-3, ph)) / 2e-3
    assert float((jac[..., 0] - dc).abs().max() / dc.abs().max()) < 1e-7
    assert float((jac[..., 1] - da).abs().max() / da.abs().max()) < 1e-6
    np_sig, np_jac = signal_jacobian(cbf.numpy(), att.numpy(), ph)  # the numpy path gives the same
    np.testing.assert_allclose(np_jac, jac.numpy(), rtol=1e-12, atol=1e-18)
