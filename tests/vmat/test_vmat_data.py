"""Model inputs and the left-right flip: the patient's left femoral head lands where the right one was."""

import numpy as np
import pytest
import torch

from vmat.case_io import list_cases, load_case
from vmat.data import (
    INPUT_DEFAULTS,
    PatchDataset,
    build_inputs,
    cond_permutation,
    flip_left_right,
    input_channel_permutation,
    make_input_spec,
)


@pytest.fixture(scope="module")
def case_and_spec(tiny_npz):
    case = load_case(list_cases(tiny_npz)[0])
    spec = make_input_spec(case["structure_names"], case["meta"]["target_doses_gy"], INPUT_DEFAULTS, 50.0)
    return case, spec


def _centre_x(mask):
    return np.argwhere(mask)[:, -1].mean()


def test_inputs_channels_and_conditioning(case_and_spec):
    case, spec = case_and_spec
    image, cond = build_inputs(case, spec)
    names = spec["structure_names"]
    assert image.shape == (spec["n_channels"], *case["ct"].shape) and cond.shape == (spec["cond_dim"],)
    rx_map = image[1 + len(names)]
    ptv70, ptv56 = case["masks"][names.index("PTV70")] > 0, case["masks"][names.index("PTV56")] > 0
    assert np.all(rx_map[ptv70] == 1.0) and np.allclose(rx_map[ptv56 & ~ptv70], 0.8)
    assert np.array_equal(image[-1], case["possible_dose_mask"].astype(np.float32))
    assert cond[0] == pytest.approx(70.0 / 70.0) and cond[-2:].tolist() == pytest.approx([1.0, 0.8])


def test_left_femur_is_on_the_patient_left(case_and_spec):
    case, _ = case_and_spec
    names = case["structure_names"]
    # x (last axis) increases toward the patient's left (DICOM +x)
    assert _centre_x(case["masks"][names.index("Femur_L")]) > _centre_x(case["masks"][names.index("Femur_R")])


def test_flip_swaps_left_and_right_channels(case_and_spec):
    case, spec = case_and_spec
    names = spec["structure_names"]
    image, cond = build_inputs(case, spec)
    flipped = flip_left_right(image, input_channel_permutation(spec))
    sdf_l, sdf_r = 1 + names.index("Femur_L"), 1 + names.index("Femur_R")
    # after the flip the Femur_L channel holds the mirrored right femur: it lies where the left one was
    np.testing.assert_array_equal(flipped[sdf_l], image[sdf_r][..., ::-1])
    np.testing.assert_array_equal(flipped[sdf_r], image[sdf_l][..., ::-1])
    np.testing.assert_array_equal(flipped[0], image[0][..., ::-1])  # CT is only mirrored
    assert (_centre_x(flipped[sdf_l] < 0) > _centre_x(flipped[sdf_r] < 0))  # left stays on the left
    np.testing.assert_array_equal(flip_left_right(flipped, input_channel_permutation(spec)), image)  # involution
    swapped = cond[cond_permutation(spec)]  # presence flags of the pair swap with the channels
    assert swapped[1 + names.index("Femur_L")] == cond[1 + names.index("Femur_R")]
    assert swapped[0] == cond[0] and swapped[-2:].tolist() == cond[-2:].tolist()


def test_patch_dataset_flip_and_determinism(case_and_spec, tiny_npz):
    case, spec = case_and_spec
    paths = [str(p) for p in list_cases(tiny_npz)]
    kwargs = {"patch_size": [8, 16, 16], "patches_per_case": 2, "seed": 5}
    plain = PatchDataset(paths, spec, augment={"flip_lr": 0.0}, **kwargs)
    flipped = PatchDataset(paths, spec, augment={"flip_lr": 1.0}, **kwargs)
    a, b = plain[0], flipped[0]
    assert not a["flipped"] and b["flipped"]
    perm = input_channel_permutation(spec)
    torch.testing.assert_close(b["input"], a["input"][perm].flip(-1))
    torch.testing.assert_close(b["target"], a["target"].flip(-1))
    names = spec["structure_names"]
    torch.testing.assert_close(b["masks"][names.index("Femur_L")], a["masks"][names.index("Femur_R")].flip(-1))
    assert a["input"].shape == (spec["n_channels"], 8, 16, 16) and a["target"].shape == (1, 8, 16, 16)
    again = PatchDataset(paths, spec, augment={"flip_lr": 0.0}, **kwargs)[0]
    torch.testing.assert_close(again["input"], a["input"])  # seeded by (seed, epoch, index)
    plain.set_epoch(1)
    assert not torch.equal(plain[0]["input"], a["input"])
    # an (epoch, index) from the tagging sampler gives the patch of that epoch whatever set_epoch said
    torch.testing.assert_close(plain[(0, 0)]["input"], a["input"])
    torch.testing.assert_close(plain[(1, 0)]["input"], plain[0]["input"])


def test_patch_cache_is_bounded_and_changes_nothing(case_and_spec, tiny_npz):
    _, spec = case_and_spec
    paths = [str(p) for p in list_cases(tiny_npz)]
    kwargs = {"patch_size": [8, 16, 16], "patches_per_case": 2, "seed": 3, "augment": {"flip_lr": 0.5}}
    uncached = PatchDataset(paths, spec, cache_mb=0, **kwargs)
    one_case_mb = uncached._case(0)["nbytes"] / 2**20
    assert len(uncached._cases) == 0  # nothing kept with a zero budget
    small = PatchDataset(paths, spec, cache_mb=1.5 * one_case_mb, **kwargs)  # room for one case only
    for index in range(len(small)):
        torch.testing.assert_close(small[index]["input"], uncached[index]["input"])
        torch.testing.assert_close(small[index]["masks"], uncached[index]["masks"])
        assert len(small._cases) == 1 and next(reversed(small._cases)) == index % len(paths)  # the latest case
