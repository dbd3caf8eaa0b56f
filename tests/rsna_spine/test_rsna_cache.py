"""The compact cache (issue 14, item 3): exact 16-bit pixels in byte planes + zlib, at most 0.6x the DICOM
size; a memory budget per process (LRU); resumable decoding with a per-file error log and an estimate."""

import numpy as np
import pandas as pd
import pytest

from rsna_spine.cache import decode_all, series_tasks
from rsna_spine.data import Stack, StackStore, decode_pixels, done_marker, encode_pixels, load_series
from rsna_spine.phantom import sample_anatomy
from rsna_spine.synthetic import SYNTHETIC_DEFAULTS, render_stack, sagittal_stack, sample_grades, write_stack


@pytest.mark.parametrize("values, encoding, atol", [
    (np.array([0, 1, 255, 256, 4095, 65535], dtype=np.float32), "u16", 0.0),  # MR, RescaleSlope 1
    (np.array([-1024, -1, 0, 3071], dtype=np.float32), "u16", 0.0),  # signed: stored with an offset
    (np.array([0.5, 12.25, 1000.3, 3.0e4], dtype=np.float32), "f16", 2.0 ** -11),  # non-integer rescale: float16
    (np.array([1.5, 1.0e6], dtype=np.float32), "float32", 0.0),  # beyond float16: kept float32
])
def test_pixel_encoding_round_trip(values, encoding, atol):
    array = np.tile(values, (2, 3, 1))
    planes, got_encoding, offset = encode_pixels(array)
    assert got_encoding == encoding
    back = decode_pixels(planes, got_encoding, offset)
    assert back.dtype == np.float32 and back.shape == array.shape
    np.testing.assert_allclose(back, array, rtol=atol, atol=0)


def phantom_series(folder, size=128, n=8, seed=1):
    """A synthetic sagittal T2 series written as DICOM, with MR-like content (phantom + Rician noise)."""
    rng = np.random.default_rng(seed)
    cfg = dict(SYNTHETIC_DEFAULTS, sag_size_px=size, sag_slices=[n, n])
    anat = sample_anatomy(rng, sample_grades(rng, cfg["class_priors"], 0.5))
    geom = sagittal_stack(anat, rng, cfg)
    pixels = render_stack(anat, geom, "t2", rng)
    write_stack(folder, pixels, geom, rng.permutation(n) + 31,
                {"study_id": 1, "study_uid": "1.2", "series_uid": "1.2.3", "series_number": 1,
                 "description": "Sagittal T2/STIR"})
    return pixels


def test_cached_stack_is_exact_and_at_most_0_6_of_the_dicom_size(tmp_path):
    phantom_series(tmp_path / "s")
    dicom_bytes = sum(f.stat().st_size for f in (tmp_path / "s").iterdir())
    (stack,) = load_series(tmp_path / "s", 1, 2, "sag_t2")
    path = stack.save(tmp_path / "c.npz")
    loaded = Stack.load(path)
    np.testing.assert_array_equal(loaded.array, stack.array)  # lossless
    np.testing.assert_array_equal(loaded.instance_numbers, stack.instance_numbers)
    ratio = path.stat().st_size / dicom_bytes
    assert ratio <= 0.6, ratio  # 0.56 measured here; 0.57 at 384 px (README)


def test_store_keeps_at_most_its_memory_budget_least_recently_used_first(tmp_path, dicom):
    index_rows = []
    for series in (1, 2, 3):
        geom = dicom.make_geometry("sagittal", n=4, rows=64, cols=64)  # 4 x 64 x 64 float32 = 64 KiB
        dicom.write_series(tmp_path / "dcm" / str(series), geom)
        (stack,) = load_series(tmp_path / "dcm" / str(series), 1, series, "sag_t2")
        stack.save(tmp_path / "cache" / "stacks" / "1" / f"{series}_0.npz")
        index_rows.append({"study_id": 1, "series_id": series, "series_key": "sag_t2", "stack_index": 0,
                           "status": "ok"})
    store = StackStore(tmp_path / "cache", index=pd.DataFrame(index_rows), max_mb=0.13)  # room for two
    a, b = store.get(1, 1, 0), store.get(1, 2, 0)
    assert store.get(1, 1, 0) is a and store.loads == 2  # hit; series 1 is now the most recent
    store.get(1, 3, 0)  # evicts series 2, the least recently used
    assert store.cached_mb <= 0.13 and store.loads == 3
    assert store.get(1, 1, 0) is a and store.loads == 3
    assert store.get(1, 2, 0) is not b and store.loads == 4
    tiny = StackStore(tmp_path / "cache", index=pd.DataFrame(index_rows), max_mb=0.01)  # smaller than a stack
    tiny.get(1, 1, 0)
    tiny.get(1, 1, 0)
    assert tiny.loads == 2 and tiny.cached_mb == 0


def test_decoding_resumes_logs_errors_per_file_and_estimates_up_front(tmp_path, dicom):
    root, cache = tmp_path / "kaggle", tmp_path / "cache"
    ids = [(1, 10), (1, 11), (2, 20)]
    for study, series in ids:
        dicom.write_series(root / "train_images" / str(study) / str(series), dicom.make_geometry("sagittal", n=4))
    data = (root / "train_images" / "2" / "20" / "3.dcm").read_bytes()
    (root / "train_images" / "2" / "20" / "3.dcm").write_bytes(data[:-40])  # truncated pixel data
    pd.DataFrame({"study_id": [s for s, _ in ids] + [2], "series_id": [r for _, r in ids] + [21],
                  "series_description": ["Sagittal T2/STIR"] * 4}).to_csv(root / "train_series_descriptions.csv",
                                                                         index=False)
    lines = []
    tasks = series_tasks(root, "train", cache, [1.0, 99.5], lines.append)
    estimate = {}
    index, _ = decode_all(tasks, 1, lines.append, estimate=estimate)
    assert (estimate["studies"], estimate["series"], estimate["files"]) == (2, 4, 12)
    assert estimate["bytes"] > 0 and estimate["estimated_seconds"] >= 0 and estimate["n_resumed"] == 0
    assert any("GB of DICOM to decode" in m for m in lines) and any("estimated" in m for m in lines)
    errors = pd.read_csv(cache / "decode_errors_train.csv")
    assert any("3.dcm" in m and "cannot decode" in m for m in errors["message"])
    assert any("has no folder" in m for m in errors["message"])  # the listed series 21
    assert (index["status"] == "ok").sum() == 3
    # an interrupted run: one series lost its marker (killed before it finished) -> only that one is redone
    done_marker(cache, 1, 11).unlink()
    again = {}
    index2, _ = decode_all(tasks, 1, lines.append, estimate=again)
    assert again["n_resumed"] == 2 and again["series"] == 2  # series 11 + the missing folder (no marker)
    pd.testing.assert_frame_equal(index2.sort_values("series_id").reset_index(drop=True),
                                  index.sort_values("series_id").reset_index(drop=True))
    assert len(pd.read_csv(cache / "decode_errors_train.csv")) == len(errors)  # resumed errors kept
    forced = {}
    decode_all(tasks, 1, lines.append, reuse=False, estimate=forced)
    assert forced["n_resumed"] == 0
