"""Patient-level train / val / test splits, including cohorts of one, two or three patients.

``preprocess.split`` gives the share of patients per split, ``[train, val, test]``. A share of 0 leaves
that split empty on purpose: ``[0, 0, 1]`` puts every patient in test (evaluating a trained model on a
small labelled cohort), ``[0.85, 0, 0.15]`` trains without a val split (validation scripts then take the
classical criterion from the config, see abr.evaluation.classical_criterion). ``preprocess.required_splits``
names the splits that must not end up empty (the run stops with an error naming the key); any other split of
positive share that ends up empty is reported in the log and meta.json.
"""

from __future__ import annotations

import numpy as np

from common.config import ConfigError

SPLITS = ("train", "val", "test")
FILL_ORDER = (0, 2, 1)  # a small cohort fills train first, then test; val is the first to stay empty


def check_shares(shares) -> np.ndarray:
    """``preprocess.split`` as shares summing to 1; an error naming the key for anything else."""
    try:
        values = np.asarray(shares, dtype=np.float64)
    except (TypeError, ValueError):
        values = np.array([np.nan])
    if values.shape != (3,) or not np.all(np.isfinite(values)) or np.any(values < 0) or values.sum() <= 0:
        raise ConfigError(f"preprocess.split must be three non-negative shares [train, val, test] with a positive "
                          f"sum (e.g. [0.7, 0.15, 0.15], or [0, 0, 1] for everything in test), got {shares!r}")
    return values / values.sum()


def stratified_patient_split(patient_class: dict, shares, seed: int) -> dict:
    """Patient id -> split index (0 train, 1 val, 2 test).

    Patients of each class (their most common class) are shuffled and cut by ``shares``. A class with at
    least as many patients as there are splits of positive share puts one patient in each of them. Then, over
    the whole cohort, a split of positive share that is still empty takes one patient from the largest split
    holding two or more, filling train, then test, then val: with the default shares one patient goes to
    train, two to train and test, three to one split each."""
    shares = check_shares(shares)
    positive = [i for i in range(3) if shares[i] > 0]
    rng = np.random.default_rng(seed)
    out: dict = {}
    by_class: dict[int, list] = {}
    for pid, cls in sorted(patient_class.items()):
        by_class.setdefault(cls, []).append(pid)
    for _, pids in sorted(by_class.items()):
        pids = list(rng.permutation(pids))
        n = len(pids)
        n_val, n_test = int(round(shares[1] * n)), int(round(shares[2] * n))
        if n >= len(positive):
            n_val = max(n_val, 1) if shares[1] > 0 else 0
            n_test = max(n_test, 1) if shares[2] > 0 else 0
        n_val = min(n_val, n)
        n_test = min(n_test, n - n_val)  # two shares rounded up can exceed the class
        n_train = n - n_val - n_test
        if shares[0] == 0:  # no training share: what rounding left goes to the larger evaluation split
            n_val, n_test = (n_val + n_train, n_test) if shares[1] > shares[2] else (n_val, n_test + n_train)
            n_train = 0
        for i, pid in enumerate(pids):
            out[pid] = 0 if i < n_train else 1 if i < n_train + n_val else 2
    for split in FILL_ORDER:
        if shares[split] <= 0 or split in out.values():
            continue
        sizes = {s: sum(1 for v in out.values() if v == s) for s in range(3)}
        donor = max(range(3), key=lambda s: (sizes[s], -s))
        if sizes[donor] < 2:
            continue
        candidates = sorted(pid for pid, s in out.items() if s == donor)
        out[candidates[int(rng.integers(len(candidates)))]] = split
    return out


def empty_splits(split_of_patient: dict, shares) -> list[str]:
    """Names of the splits of positive share that hold no patient."""
    shares = check_shares(shares)
    used = set(split_of_patient.values())
    return [name for i, name in enumerate(SPLITS) if shares[i] > 0 and i not in used]


def check_required(split_of_patient: dict, required, source) -> None:
    """``preprocess.required_splits``: an error naming the key and the cohort when one of them is empty."""
    from common.errors import InputError

    unknown = [name for name in required if name not in SPLITS]
    if unknown:
        raise ConfigError(f"preprocess.required_splits: unknown split(s) {unknown}; valid: {list(SPLITS)}")
    counts = {name: sum(1 for v in split_of_patient.values() if v == i) for i, name in enumerate(SPLITS)}
    missing = [name for name in required if counts[name] == 0]
    if missing:
        raise InputError(f"preprocess.required_splits needs patients in {missing}, but the {len(split_of_patient)} "
                         f"patient(s) give {counts}; change preprocess.split (e.g. [0, 0, 1] to evaluate every "
                         "patient) or required_splits", source)
