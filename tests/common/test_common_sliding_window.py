import pytest
import torch

from common.sliding_window import importance_map, sliding_window_inference


@pytest.mark.parametrize("mode", ["gaussian", "constant"])
@pytest.mark.parametrize("shape, window", [((2, 2, 10, 13, 7), (8, 8, 8)), ((1, 2, 20, 9), (8, 8))])
def test_reproduces_full_forward_of_translation_equivariant_model(mode, shape, window):
    torch.manual_seed(0)
    conv = torch.nn.Conv3d(2, 3, 1) if len(window) == 3 else torch.nn.Conv2d(2, 3, 1)
    x = torch.randn(shape)
    out = sliding_window_inference(x, window, conv, overlap=0.5, mode=mode, batch_size=3)
    assert out.shape == (shape[0], 3, *shape[2:])
    assert torch.allclose(out, conv(x), atol=1e-5)


def test_constant_mode_is_exact_for_a_local_model_away_from_padding():
    """A 3×3 conv with windows fully inside the image: overlapping windows agree in their interior."""
    torch.manual_seed(1)
    conv = torch.nn.Conv2d(1, 1, 3, padding=1)
    x = torch.randn(1, 1, 16, 16)
    out = sliding_window_inference(x, (16, 16), conv, overlap=0.25, mode="constant")
    assert torch.allclose(out, conv(x), atol=1e-6)


def test_importance_map_and_errors():
    weights = importance_map((5, 5))
    assert weights.max() == 1.0 and weights[2, 2] == 1.0 and weights.min() >= 1e-3
    assert weights[0, 2] < weights[1, 2] < weights[2, 2]
    with pytest.raises(ValueError, match="overlap"):
        sliding_window_inference(torch.zeros(1, 1, 4, 4), (2, 2), lambda t: t, overlap=1.0)
    with pytest.raises(ValueError, match="spatial dims"):
        sliding_window_inference(torch.zeros(1, 1, 4, 4), (2, 2, 2), lambda t: t)
