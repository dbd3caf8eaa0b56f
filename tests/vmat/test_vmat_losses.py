"""Each loss: value on tiny hand-made volumes and a gradient that reaches the prediction."""

import numpy as np
import pytest
import torch

from vmat.losses import (
    LOSS_DEFAULTS,
    AsymmetricPTVLoss,
    DoseLoss,
    DVHAwareLoss,
    GradientLoss3D,
    StructureWeightedMSE,
    VGGPerceptualLoss2D,
    sobel_gradient,
)


def _grad_of(loss_fn, pred, *args):
    pred = pred.clone().requires_grad_(True)
    value = loss_fn(pred, *args)
    value.backward()
    return value.detach(), pred.grad


def test_sobel_gradient_of_a_ramp_is_its_slope():
    x = torch.arange(6, dtype=torch.float32)
    ramp = (0.5 * x).expand(5, 5, 6)[None, None].clone()  # slope 0.5 per voxel along x
    g = sobel_gradient(ramp)
    assert torch.allclose(g[:, 2], torch.full_like(g[:, 2], 0.5)) and torch.allclose(g[:, :2], torch.zeros_like(g[:, :2]))


def test_gradient_loss_value_and_grad():
    x = torch.arange(6, dtype=torch.float32)
    target = (0.5 * x).expand(5, 5, 6)[None, None].clone()
    pred = torch.zeros_like(target)
    value, grad = _grad_of(GradientLoss3D(), pred, target)
    # |0 - 0.5| on the x component, 0 on the others: mean over 3 components = 0.5 / 3
    assert value.item() == pytest.approx(0.5 / 3)
    assert grad is not None and grad.abs().sum() > 0
    assert GradientLoss3D()(target, target).item() == 0.0


def test_vgg_loss_refuses_missing_weights(tmp_path):
    with pytest.raises(RuntimeError, match="VGG16 weights file not found"):
        VGGPerceptualLoss2D(weights_path=tmp_path / "none.pth")


def test_vgg_loss_without_cached_weights_says_so(monkeypatch, tmp_path):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache; no download allowed
    with pytest.raises(RuntimeError, match="needs ImageNet VGG16 weights"):
        VGGPerceptualLoss2D(allow_download=False)


def test_vgg_loss_with_local_weights(tmp_path):
    from vmat.losses import vgg16_features_to_relu3_3

    torch.manual_seed(0)
    features = vgg16_features_to_relu3_3()
    path = tmp_path / "vgg16_features.pth"
    torch.save({f"features.{k}": v for k, v in features.state_dict().items()}, path)
    loss = VGGPerceptualLoss2D(weights_path=path, slice_stride=2)
    target = torch.rand(1, 1, 4, 16, 16)
    value, grad = _grad_of(loss, target * 0.5, target)
    assert value.item() > 0 and grad.abs().sum() > 0
    assert loss(target, target).item() == 0.0
    assert not any(p.requires_grad for p in loss.features.parameters())


def test_dvh_loss_values_and_gradient():
    names = ["PTV70", "Rectum"]
    masks = torch.zeros(1, 2, 1, 4, 5)
    masks[0, 0, 0, :2] = 1  # 10 target voxels
    masks[0, 1, 0, 2:] = 1  # 10 rectum voxels
    target = torch.zeros(1, 1, 1, 4, 5)
    target[0, 0, 0, :2] = 1.0
    target[0, 0, 0, 2:] = 0.5
    loss = DVHAwareLoss(names, {"PTV70": 70.0}, [{"structure": "Rectum", "metric": "V50Gy", "op": "<", "value": 50.0}],
                        percentiles=[95.0], softness=0.02, min_voxels=5)
    rx = torch.tensor([70.0])
    assert loss(target, target, masks, rx).item() == pytest.approx(
        float(torch.relu(torch.sigmoid(torch.tensor((0.5 - 50 / 70) / 0.02)) - 0.5)) / 5)  # only the hinge term
    pred = target.clone()
    pred[0, 0, 0, :2] = 0.9  # target underdosed by 0.1 Rx everywhere: D95 and mean each off by 0.1
    value, grad = _grad_of(loss, pred, target, masks, rx)
    # terms: |ΔD95| = 0.1, |Δmean| = 0.1 (target); |Δmean| = 0, |ΔV50| = 0, hinge ≈ 0 (rectum)
    assert value.item() == pytest.approx(0.2 / 5, abs=1e-4)
    assert grad[0, 0, 0, :2].abs().sum() > 0


def test_structure_weighted_mse_weights_in_mm():
    names = ["PTV70", "Rectum"]
    masks = torch.zeros(1, 2, 1, 1, 8)
    masks[0, 0, 0, 0, 0] = 1
    masks[0, 1, 0, 0, 7] = 1
    sdf_mm = torch.tensor([[0, 3, 6, 9, 12, 4, 2, -1.0]])  # rectum SDF in mm along the row
    sdf_scaled = torch.zeros(1, 2, 1, 1, 8)
    sdf_scaled[0, 1, 0, 0] = sdf_mm / 50.0  # stored scaled by the 50 mm clip
    body = torch.ones(1, 1, 1, 1, 8)
    loss = StructureWeightedMSE(names, ["PTV70"], sdf_clip_mm=50.0, boundary_mm=5.0)
    w = loss.weight_map(masks, sdf_scaled, body)[0, 0, 0, 0]
    # voxel 0 in the PTV: 2.0; |sdf| <= 5 mm (voxels 1, 5, 6, 7): 1.5; farther (2, 3, 4): 0.5
    assert w.tolist() == [2.0, 1.5, 0.5, 0.5, 0.5, 1.5, 1.5, 1.5]
    pred, target = torch.zeros(1, 1, 1, 1, 8), torch.ones(1, 1, 1, 1, 8)
    value, grad = _grad_of(loss, pred, target, masks, sdf_scaled, body)
    assert value.item() == pytest.approx(1.0)  # weighted mean of a uniform error of 1
    assert grad[0, 0, 0, 0, 0] / grad[0, 0, 0, 0, 2] == pytest.approx(4.0)  # 2.0 vs 0.5


def test_asymmetric_ptv_loss():
    masks = torch.ones(1, 1, 1, 1, 2)
    target = torch.ones(1, 1, 1, 1, 2)
    pred = torch.tensor([0.9, 1.1]).view(1, 1, 1, 1, 2)
    value, grad = _grad_of(AsymmetricPTVLoss([0], under_weight=3.0, over_weight=1.0), pred, target, masks)
    assert value.item() == pytest.approx((3 * 0.01 + 1 * 0.01) / 2)
    assert grad[0, 0, 0, 0, 0] == pytest.approx(-3 * 2 * 0.1 / 2) and grad[0, 0, 0, 0, 1] == pytest.approx(2 * 0.1 / 2)


def test_dose_loss_combination_and_uncertainty_weighting():
    spec = {"structure_names": ["PTV70", "Rectum"], "target_doses_gy": {"PTV70": 70.0}, "sdf_clip_mm": 50.0}
    cfg = {**LOSS_DEFAULTS, "gradient_weight": 0.1, "asymmetric_ptv_weight": 0.5, "uncertainty_weighting": True}
    loss = DoseLoss(cfg, spec)
    assert sorted(dict(loss.named_parameters())) == ["weighting.log_vars.asymmetric_ptv", "weighting.log_vars.base",
                                                      "weighting.log_vars.gradient"]
    torch.manual_seed(0)
    batch = {"target": torch.rand(1, 1, 6, 6, 6), "body": torch.ones(1, 1, 6, 6, 6), "masks": torch.ones(1, 2, 6, 6, 6),
             "input": torch.zeros(1, 5, 6, 6, 6), "rx_gy": torch.tensor([70.0])}
    pred = torch.rand(1, 1, 6, 6, 6, requires_grad=True)
    total, terms = loss(pred, batch)
    assert set(terms) == {"base", "gradient", "asymmetric_ptv"}
    # log σ² = 0 at init: total = Σ 0.5 · term
    assert total.item() == pytest.approx(0.5 * sum(terms.values()), rel=1e-5)
    total.backward()
    assert pred.grad is not None and all(p.grad is not None for p in loss.parameters())
    assert DoseLoss({**LOSS_DEFAULTS}, spec)(pred, batch)[0].item() == pytest.approx(float((pred.detach() - batch["target"]).abs().mean()), rel=1e-5)
    assert np.isfinite(terms["base"])
