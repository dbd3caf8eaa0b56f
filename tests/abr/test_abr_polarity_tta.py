"""Test-time polarity averaging (predict.polarity_tta): the model's outputs on a recording and on its
inverse are combined so that inverting the input changes no threshold, class or peak output."""

import numpy as np
import torch

from abr.dataset import ABRSeriesDataset, load_cache, split_series
from abr.evaluation import gaussian_mixture_of_two, predict
from abr.validate_abr import model_checkpoint


def test_mixture_of_two_gaussians_widens_by_half_the_disagreement():
    mean, sd = gaussian_mixture_of_two(np.array([40.0, 30.0]), np.array([3.0, 4.0]),
                                       np.array([50.0, 30.0]), np.array([3.0, 4.0]))
    np.testing.assert_allclose(mean, [45.0, 30.0])
    np.testing.assert_allclose(sd, [np.sqrt(9.0 + 25.0), 4.0])  # within-pass variance + (half the gap)²


def test_inverted_recordings_give_identical_predictions(trained, tiny_cache):
    model, ckpt = model_checkpoint(trained[0], torch.device("cpu"))
    arrays, _ = load_cache(tiny_cache)
    series = split_series(arrays, "all")
    inverted_arrays = {**arrays, "signal": -arrays["signal"]}
    as_recorded = ABRSeriesDataset(arrays, ckpt["preprocessing"], series)
    inverted = ABRSeriesDataset(inverted_arrays, ckpt["preprocessing"], series)
    cpu = torch.device("cpu")

    plain, plain_inverted = predict(model, as_recorded, cpu), predict(model, inverted, cpu)
    assert not np.array_equal(plain["threshold_db"], plain_inverted["threshold_db"])  # the model alone is not invariant

    tta, tta_inverted = predict(model, as_recorded, cpu, polarity_tta=True), predict(model, inverted, cpu, polarity_tta=True)
    for key in ("threshold_db", "threshold_sd", "class_probs", "outlier_prob", "exist_prob", "latency_ms", "amp_rel"):
        np.testing.assert_array_equal(tta[key], tta_inverted[key], err_msg=key)
    np.testing.assert_array_equal(tta["denoised"], -tta_inverted["denoised"])  # the trace keeps the input's sign
    np.testing.assert_allclose(tta["class_probs"].sum(axis=1), 1.0, rtol=1e-5)
    assert (tta["threshold_sd"] >= np.minimum(plain["threshold_sd"], plain_inverted["threshold_sd"])).all()
