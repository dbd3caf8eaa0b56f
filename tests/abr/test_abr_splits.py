"""Patient splits of small cohorts (1, 2, 3 patients), zero shares, required splits, and evaluation of a
cache whose ears are all in one split."""

from __future__ import annotations

import pytest

from abr.splits import check_shares, empty_splits, stratified_patient_split
from common.config import ConfigError
from common.errors import InputError

DEFAULT_SHARES = [0.7, 0.15, 0.15]


def split_sizes(n_patients: int, shares, n_classes: int = 5) -> list[int]:
    patient_class = {f"p{i}": i % n_classes for i in range(n_patients)}
    assignment = stratified_patient_split(patient_class, shares, seed=0)
    assert sorted(assignment) == sorted(patient_class)
    return [sum(1 for s in assignment.values() if s == split) for split in range(3)]


@pytest.mark.parametrize(("n_patients", "sizes"), [(1, [1, 0, 0]), (2, [1, 0, 1]), (3, [1, 1, 1])])
def test_small_cohorts_fill_train_then_test_then_val(n_patients, sizes):
    assert split_sizes(n_patients, DEFAULT_SHARES) == sizes
    assert split_sizes(n_patients, DEFAULT_SHARES, n_classes=1) == sizes


@pytest.mark.parametrize("n_patients", [1, 2, 3, 40])
def test_zero_shares_stay_empty(n_patients):
    assert split_sizes(n_patients, [0, 0, 1]) == [0, 0, n_patients]
    sizes = split_sizes(n_patients, [0.8, 0, 0.2])
    assert sizes[1] == 0 and sum(sizes) == n_patients
    assert split_sizes(n_patients, [0, 0.5, 0.5])[0] == 0


def test_default_cohort_split_keeps_every_split():
    sizes = split_sizes(200, DEFAULT_SHARES)
    assert all(size > 0 for size in sizes) and sizes[0] > sizes[1] + sizes[2]
    assert empty_splits({"a": 0}, DEFAULT_SHARES) == ["val", "test"]
    assert empty_splits({"a": 2}, [0, 0, 1]) == []


@pytest.mark.parametrize("shares", [[1, 1], [0, 0, 0], [0.5, -0.1, 0.6], "all"])
def test_bad_shares_name_the_key(shares):
    with pytest.raises(ConfigError, match="preprocess.split"):
        check_shares(shares)


@pytest.fixture(scope="module")
def all_test_caches(tiny_config, tmp_path_factory):
    """Caches of 1, 2 and 3 synthetic patients with every ear in test (preprocess.split [0, 0, 1])."""
    from abr.preprocess_abr import main

    caches = {}
    for n in (1, 2, 3):
        out = tmp_path_factory.mktemp(f"abr_all_test_{n}")
        summary = main(["--config", str(tiny_config), "--output-dir", str(out), "--set", f"synthetic.n_patients={n}",
                        "--set", "preprocess.split=[0, 0, 1]"])
        caches[n] = (out, summary)
    return caches


@pytest.mark.parametrize("n_patients", [1, 2, 3])
def test_validate_and_benchmark_a_cohort_that_is_all_test(n_patients, all_test_caches, trained, tiny_config, tmp_path):
    from abr import benchmark_abr, validate_abr

    cache, prep = all_test_caches[n_patients]
    counts = prep["counts"]["series_per_split"]
    assert counts["train"] == counts["val"] == 0 and counts["test"] == prep["counts"]["series"] > 0
    run_dir, _ = trained
    summary = validate_abr.main(["--config", str(tiny_config), "--checkpoint", str(run_dir), "--data", str(cache),
                                 "--output-dir", str(tmp_path / "validate")])
    assert summary["headline"]["n_ears"] == counts["test"]
    assert summary["classical_criterion_source"].startswith("predict.classical_criterion")
    assert 0 <= summary["headline"]["n_off_by_10db_flagged_unsure"] <= summary["headline"]["n_off_by_10db"]
    assert (tmp_path / "validate" / "predictions_ears.csv").read_text(encoding="utf-8").count("\n") == counts["test"] + 1
    if n_patients == 3:  # benchmark and --split all over the same cache
        bench = benchmark_abr.main(["--config", str(tiny_config), "--checkpoint", str(run_dir), "--data", str(cache),
                                    "--split", "all", "--output-dir", str(tmp_path / "bench")])
        assert bench["n_ears"] == counts["test"]


def test_empty_split_and_required_split_errors(all_test_caches, trained, tiny_config, tmp_path):
    from abr import preprocess_abr, train_abr, validate_abr
    from abr.dataset import CacheError

    cache, _ = all_test_caches[1]
    with pytest.raises(CacheError, match="'val' split has no ears"):
        validate_abr.main(["--config", str(tiny_config), "--checkpoint", str(trained[0]), "--data", str(cache),
                           "--split", "val", "--output-dir", str(tmp_path / "validate")])
    with pytest.raises(CacheError, match="preprocess.split"):
        train_abr.main(["--config", str(tiny_config), "--data", str(cache), "--output-dir", str(tmp_path / "train")])
    with pytest.raises(InputError, match="preprocess.required_splits needs patients in \\['val'\\]"):
        preprocess_abr.main(["--config", str(tiny_config), "--output-dir", str(tmp_path / "prep"),
                             "--set", "synthetic.n_patients=2", "--set", "preprocess.required_splits=[train, val]"])
