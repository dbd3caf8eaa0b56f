"""Stage-1 localizer and stage-2 classifier: shapes, attention, heatmap decoding, checkpoints."""

import numpy as np
import pytest
import torch

from common.checkpoint import build_model, load_model, save_checkpoint
from rsna_spine.models import (
    AttentionMIL,
    HeatmapLocalizer,
    SpineClassifier,
    build_backbone,
    decode_heatmaps,
    heatmap_loss,
    heatmap_targets,
)

TINY = {"backbone": "efficientnet_v2_tiny", "tiny_channels": [4, 8, 8], "gru_hidden": 6, "gru_layers": 1,
        "attention_hidden": 5, "level_dim": 3, "condition_dim": 2, "head_hidden": 7, "dropout": 0.0,
        "bias_init": [0.5, -0.2, -1.0]}


def test_classifier_forward_shapes_attention_and_bias():
    torch.manual_seed(0)
    model = SpineClassifier(**TINY).eval()
    images = torch.rand(3, 5, 3, 32, 32)
    out = model(images, torch.tensor([0, 2, 4]), torch.tensor([1, 3, 0]))
    assert out["logits"].shape == (3, 3) and out["attention"].shape == (3, 5)
    torch.testing.assert_close(out["attention"].sum(dim=1), torch.ones(3))
    assert torch.all(out["attention"] >= 0)
    torch.testing.assert_close(model.head[-1].bias.detach(), torch.tensor([0.5, -0.2, -1.0]))
    # the two learning-rate groups partition the parameters
    backbone = {id(p) for p in model.backbone_parameters()}
    head = {id(p) for p in model.head_parameters()}
    assert backbone.isdisjoint(head) and backbone | head == {id(p) for p in model.parameters()}


def test_attention_mil_weights_sum_to_one_and_pool_a_convex_combination():
    mil = AttentionMIL(4, 3)
    feats = torch.randn(2, 6, 4)
    pooled, weights = mil(feats)
    torch.testing.assert_close(weights.sum(1), torch.ones(2))
    torch.testing.assert_close(pooled, (feats * weights[..., None]).sum(1))


@pytest.mark.parametrize("shape, slice_kernel", [((16, 48, 48), 3), ((1, 40, 40), 1), ((9, 20, 22), 3)])
def test_localizer_output_shape(shape, slice_kernel):
    model = HeatmapLocalizer(5, channels=[4, 8, 8], slice_kernel=slice_kernel)
    out = model(torch.rand(2, 1, *shape))
    assert out.shape == (2, 5, shape[0], (shape[1] + 1) // 2, (shape[2] + 1) // 2)


def test_heatmap_decoding_recovers_a_sub_voxel_peak():
    coords = torch.tensor([[[3.0, 5.5, 7.25], [2.0, 4.0, 9.0]]])  # away from the borders (truncation)
    target = heatmap_targets(coords, (6, 12, 14), (0.8, 1.0, 1.0))
    torch.testing.assert_close(target.flatten(2).sum(-1), torch.ones(1, 2))
    decoded, conf = decode_heatmaps(torch.log(target + 1e-12), window=3)
    torch.testing.assert_close(decoded, coords, atol=0.02, rtol=0)
    assert torch.all(conf > 0.9)
    # a second mode elsewhere (the other foramen) does not pull the local soft-argmax
    two = target[:, :1] + 0.8 * heatmap_targets(torch.tensor([[[3.0, 5.5, 1.0]]]), (6, 12, 14), (0.8, 1, 1))
    decoded, _ = decode_heatmaps(torch.log(two + 1e-12), window=2)
    assert decoded[0, 0, 2].item() == pytest.approx(7.25, abs=0.05)


def test_heatmap_loss_masks_points_and_stays_connected():
    logits = torch.zeros(1, 2, 4, 6, 6, requires_grad=True)
    coords = torch.tensor([[[1.5, 2.5, 2.5], [0.0, 0.0, 0.0]]])
    loss = heatmap_loss(logits, coords, torch.tensor([[1.0, 0.0]]), (1, 1, 1), coord_weight=0.0)
    assert loss.item() == pytest.approx(np.log(4 * 6 * 6), rel=1e-6)  # uniform softmax: CE = log(#voxels)
    empty = heatmap_loss(logits, coords, torch.zeros(1, 2), (1, 1, 1))
    empty.backward()
    assert empty.item() == 0.0 and logits.grad is not None


def test_checkpoint_rebuilds_the_classifier(tmp_path):
    torch.manual_seed(1)
    model = build_model("rsna_spine.models.SpineClassifier", TINY).eval()
    path = save_checkpoint(tmp_path / "c.pt", model, domain="rsna_spine", preprocessing={"conditions": ["x"]})
    rebuilt, ckpt = load_model(path, expected_domain="rsna_spine")
    x = torch.rand(2, 3, 3, 24, 24)
    level, cond = torch.tensor([1, 2]), torch.tensor([0, 4])
    torch.testing.assert_close(rebuilt(x, level, cond)["logits"], model(x, level, cond)["logits"])
    assert ckpt["preprocessing"]["conditions"] == ["x"]


def test_backbone_weights_from_a_local_file_and_clear_errors(tmp_path):
    import torchvision

    reference = torchvision.models.efficientnet_v2_s(weights=None)
    torch.save(reference.state_dict(), tmp_path / "weights.pth")
    features, dim = build_backbone("efficientnet_v2_s", str(tmp_path / "weights.pth"))
    assert dim == 1280
    torch.testing.assert_close(features[0][0].weight, reference.features[0][0].weight)
    with pytest.raises(FileNotFoundError, match="not found"):
        build_backbone("efficientnet_v2_s", str(tmp_path / "absent.pth"))
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("resnet9000")


def test_backbone_weights_that_do_not_fit_are_refused_naming_the_file(tmp_path):
    import torchvision

    from common.errors import InputError

    state = torchvision.models.efficientnet_v2_s(weights=None).state_dict()
    partial = {k: v for k, v in state.items() if not k.startswith("features.7.")}  # last stage absent
    torch.save(partial, tmp_path / "partial.pth")
    with pytest.raises(InputError, match=r"partial\.pth: .* tensors fit efficientnet_v2_s \(missing \['7\."):
        build_backbone("efficientnet_v2_s", str(tmp_path / "partial.pth"))
    torch.save(state, tmp_path / "full.pth")
    data = (tmp_path / "full.pth").read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    with pytest.raises(InputError, match=r"cut\.pth: .*not a readable torchvision state dict"):
        build_backbone("efficientnet_v2_s", str(tmp_path / "cut.pth"))
