"""Model shapes and gradients at tiny sizes, diffusion sampling, sliding-window equivalence."""

import numpy as np
import pytest
import torch

from common.checkpoint import build_model
from common.sliding_window import sliding_window_inference
from vmat.models import DiffusionDoseModel, UNet3D


def test_unet_forward_backward_and_film():
    torch.manual_seed(0)
    model = UNet3D(5, 1, channels=[4, 8, 16], cond_dim=3, groups=2)
    x = torch.randn(2, 5, 8, 12, 16)
    cond = torch.randn(2, 3)
    out = model(x, cond)
    assert out.shape == (2, 1, 8, 12, 16)
    out.mean().backward()
    assert all(p.grad is not None for p in model.parameters())
    with torch.no_grad():  # FiLM starts as the identity; once trained, the condition changes the output
        for module in model.modules():
            if getattr(module, "film", None) is not None:
                module.film.weight.normal_(0, 0.5)
        assert not torch.allclose(model(x, cond), model(x, cond + 1.0))
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.randn(1, 5, 6, 12, 16), cond[:1])


def test_default_unet_matches_the_seeds_size():
    model = UNet3D(11, 1, cond_dim=19)  # 48/96/192/384 + 384 bottleneck, 4 poolings
    n = sum(p.numel() for p in model.parameters())
    assert model.n_pool == 4 and 20e6 < n < 40e6  # 34.1 M; the seed reports ~23.7 M for its variant


def test_cascade_returns_both_stages():
    model = build_model("vmat.models.CascadeUNet3D", {"in_channels": 4, "channels": [4, 8], "cond_dim": 2, "groups": 2})
    x, cond = torch.randn(1, 4, 8, 8, 8), torch.randn(1, 2)
    first, second = model(x, cond, return_stages=True)
    assert first.shape == second.shape == (1, 1, 8, 8, 8)
    (first.mean() + second.mean()).backward()
    assert model.stage2.stem.weight.shape[1] == 5  # inputs + stage-1 dose
    assert torch.equal(model(x, cond), second)


@pytest.mark.parametrize("prediction", ["eps", "v"])
def test_diffusion_loss_and_two_step_sampling(prediction):
    torch.manual_seed(0)
    model = DiffusionDoseModel(3, cond_dim=2, channels=[4, 8], groups=2, num_steps=50, prediction=prediction,
                               sampling_steps=2)
    image, cond = torch.randn(2, 3, 8, 8, 8), torch.randn(2, 2)
    target = torch.rand(2, 1, 8, 8, 8)
    loss = model(image, cond, target, mask=torch.ones_like(target))
    assert loss.ndim == 0 and torch.isfinite(loss)
    loss.backward()
    assert model.net.stem.weight.grad is not None
    samples = model.sample(image, cond, n_samples=2, steps=2, generator=torch.Generator().manual_seed(1))
    assert samples.shape == (2, 2, 1, 8, 8, 8)
    assert samples.min() >= 0 and samples.max() <= model.dose_scale_max  # dose / Rx range after unscaling
    again = model.sample(image, cond, n_samples=2, steps=2, generator=torch.Generator().manual_seed(1))
    assert torch.equal(samples, again)  # DDIM with eta = 0 is deterministic given the seed
    assert not torch.equal(samples[0], samples[1])  # different noise, different samples (uncertainty)


def test_sliding_window_reproduces_full_volume_for_equivariant_model():
    """A pointwise network is translation equivariant with no border effects: blended windows equal the
    full-volume forward pass exactly (Gaussian and constant blending)."""
    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv3d(3, 6, 1), torch.nn.SiLU(), torch.nn.Conv3d(6, 1, 1))
    x = torch.randn(1, 3, 13, 17, 19)
    with torch.no_grad():
        full = net(x)
        for mode in ("gaussian", "constant"):
            out = sliding_window_inference(x, (8, 8, 8), net, overlap=0.5, mode=mode, batch_size=3)
            torch.testing.assert_close(out, full, rtol=1e-5, atol=1e-5)


def test_ensemble_predictor_tta_and_spread(tiny_npz, tmp_path):
    """A checkpoint rebuilt by EnsemblePredictor: dose in Gy, zero outside the body, a spread from TTA."""
    from common.checkpoint import save_checkpoint
    from vmat.case_io import list_cases, load_case
    from vmat.data import INPUT_DEFAULTS, make_input_spec
    from vmat.inference import EnsemblePredictor

    case = load_case(list_cases(tiny_npz)[0])
    spec = make_input_spec(case["structure_names"], case["meta"]["target_doses_gy"], INPUT_DEFAULTS, 50.0)
    for i, name in enumerate(["a", "b"]):
        torch.manual_seed(i)
        model = build_model("vmat.models.UNet3D", {"in_channels": spec["n_channels"], "channels": [4, 8],
                                                   "cond_dim": spec["cond_dim"], "groups": 2})
        save_checkpoint(tmp_path / name / "checkpoint_last.pt", model, domain="vmat",
                        preprocessing={"input_spec": spec, "patch_size": [16, 16, 16]})
    window = {"window_zyx": list(case["ct"].shape)}
    single = EnsemblePredictor([tmp_path / "a"], {"tta_flip": False, **window}).predict(case)
    assert single["n_outputs"] == 1 and np.all(single["dose_std"] == 0)
    both = EnsemblePredictor([tmp_path / "a", tmp_path / "b"], {"tta_flip": True, **window}).predict(case)
    assert both["n_outputs"] == 4 and both["dose_std"].max() > 0
    outside = case["possible_dose_mask"] == 0
    assert np.all(both["dose"][outside] == 0) and both["dose"].max() <= 1.5 * case["prescription_gy"]
