"""Stratified train/val/test splits on up to seven factors, with rare strata merged so every split is valid.

The original planned ``train_test_split(stratify=key)`` on a 7-factor key (redshift, magnitude, seeing,
psf_fwhm, pixel_scale, survey, label): that makes >1,000 strata and sklearn refuses strata with fewer than
two members. Here:
1. continuous factors are binned by quantiles (redshift, magnitude: 5 bins; seeing, psf_fwhm, pixel_scale:
   3 bins; missing values get their own bin), categorical ones are taken as they are;
2. a stratum smaller than ``min_stratum_size`` is coarsened by dropping factors from the end of the
   priority list (label is never dropped while the data set has both classes) until it is large enough;
   what is still too small is pooled per label (then over everything);
3. each stratum is shuffled and cut by the split fractions; rounding leftovers go to the splits furthest
   behind their global target, so split sizes track the fractions overall and in every stratum; finally every split is checked to be non-empty and to
   hold both classes whenever the data set does (with enough rows).
"""

from __future__ import annotations

import numpy as np
import pandas as pd

DEFAULT_FACTORS = ("label", "survey", "redshift", "magnitude", "seeing", "psf_fwhm", "pixel_scale")
FACTOR_COLUMNS = {"redshift": "z_phot", "magnitude": "magnitude", "seeing": "seeing", "psf_fwhm": "psf_fwhm",
                  "pixel_scale": "pixel_scale", "survey": "survey", "label": "label"}
QUANTILE_BINS = {"redshift": 5, "magnitude": 5, "seeing": 3, "psf_fwhm": 3, "pixel_scale": 3}


class SplitError(ValueError):
    """Splits that cannot be made valid (too few rows for the requested fractions)."""


def factor_labels(df: pd.DataFrame, factor: str) -> pd.Series:
    """Stratum labels of one factor: quantile bins for continuous factors, the value for categorical ones."""
    column = FACTOR_COLUMNS.get(factor, factor)
    if column not in df.columns:
        raise KeyError(f"stratification factor '{factor}' needs column '{column}', which the catalogue lacks")
    values = df[column]
    bins = QUANTILE_BINS.get(factor)
    if bins is None:
        return values.astype(str)
    numeric = pd.to_numeric(values, errors="coerce")
    out = pd.Series("nan", index=df.index, dtype=object)
    finite = numeric.notna()
    if finite.sum() > 0:
        if numeric[finite].nunique() < 2:  # a constant factor (e.g. one survey's pixel scale) is one bin
            out[finite] = "q0"
        else:
            codes = pd.qcut(numeric[finite], q=bins, labels=False, duplicates="drop")
            out[finite] = "q" + codes.fillna(0).astype(int).astype(str)
    return out


def merged_strata(df: pd.DataFrame, factors: tuple[str, ...] | list[str], min_stratum_size: int) -> pd.Series:
    """One stratum key per row after merging rare strata (see the module docstring)."""
    factors = list(factors)
    if len(factors) > 7:
        raise ValueError(f"at most 7 stratification factors, got {len(factors)}: {factors}")
    parts = {f: factor_labels(df, f) for f in factors}
    keep_label = "label" in factors and df[FACTOR_COLUMNS["label"]].nunique() > 1
    keys = pd.Series("", index=df.index, dtype=object)
    assigned = pd.Series(False, index=df.index)
    for depth in range(len(factors), 0, -1):
        used = factors[:depth]
        if keep_label and "label" not in used:
            used = ["label"] + used
        key = pd.Series("|".join(f"{f}" for f in used), index=df.index) + ":" + \
            pd.concat([parts[f] for f in used], axis=1).astype(str).agg("|".join, axis=1)
        counts = key[~assigned].value_counts()
        good = ~assigned & key.map(counts).ge(min_stratum_size)
        keys[good] = key[good]
        assigned |= good
        if assigned.all():
            return keys
    rest = ~assigned
    pooled = ("pooled|label:" + parts["label"]) if keep_label else pd.Series("pooled", index=df.index)
    keys[rest] = pooled[rest]
    # a pooled group that is still too small joins the largest stratum of its label (or overall)
    counts = keys.value_counts()
    for key_value in [k for k, c in counts.items() if c < min_stratum_size and k.startswith("pooled")]:
        rows = keys == key_value
        candidates = keys[~rows]
        if keep_label:
            same = df.loc[~rows, FACTOR_COLUMNS["label"]] == df.loc[rows, FACTOR_COLUMNS["label"]].iloc[0]
            candidates = candidates[same] if same.any() else candidates
        if len(candidates):
            keys[rows] = candidates.value_counts().index[0]
    return keys


def _allocate(n: int, fractions: np.ndarray, deficit: np.ndarray) -> np.ndarray:
    """Round n·fractions to integers summing to n; the leftover rows go to the splits furthest behind
    their global target (``deficit`` = target − assigned so far, over the strata already visited), so the
    split sizes stay on target even when every stratum is small."""
    raw = n * fractions
    counts = np.floor(raw).astype(int)
    behind = deficit + raw - counts
    for i in np.argsort(-behind, kind="stable")[: n - counts.sum()]:
        counts[i] += 1
    return counts


def stratified_split(df: pd.DataFrame, fractions: dict[str, float], factors=DEFAULT_FACTORS,
                     seed: int = 0, min_stratum_size: int | None = None) -> tuple[pd.Series, pd.Series]:
    """Assign each row a split name. Returns (split per row, stratum key per row).

    ``fractions``: e.g. {"train": 0.7, "val": 0.15, "test": 0.15} (normalized). ``min_stratum_size``
    defaults to the number of splits (so each stratum can reach each split).
    """
    names = list(fractions)
    frac = np.array([float(fractions[n]) for n in names])
    if (frac < 0).any() or frac.sum() <= 0:
        raise SplitError(f"split fractions must be >= 0 with a positive sum, got {fractions}")
    frac = frac / frac.sum()
    active = [n for n, f in zip(names, frac) if f > 0]
    if len(df) < len(active):
        raise SplitError(f"{len(df)} rows cannot fill {len(active)} non-empty splits {active}")
    min_size = int(min_stratum_size or len(active))
    keys = merged_strata(df, factors, min_size)
    rng = np.random.default_rng(seed)
    split = pd.Series("", index=df.index, dtype=object)
    deficit = np.zeros(len(names))
    for key in sorted(keys.unique()):
        rows = np.array(keys.index[keys == key])
        rng.shuffle(rows)
        counts = _allocate(len(rows), frac, deficit)
        deficit += len(rows) * frac - counts
        start = 0
        for name, count in zip(names, counts):
            split[rows[start:start + count]] = name
            start += count
    _repair(df, split, active, rng)
    return split, keys


def _repair(df: pd.DataFrame, split: pd.Series, active: list[str], rng: np.random.Generator) -> None:
    """Guarantee every active split is non-empty and holds both labels when the data set allows it."""
    labels = pd.to_numeric(df[FACTOR_COLUMNS["label"]], errors="coerce") if "label" in df.columns else None
    for name in active:
        if (split == name).sum() == 0:
            donor = split.value_counts().index[0]
            row = rng.choice(np.array(split.index[split == donor]))
            split[row] = name
    if labels is None:
        return
    for value in (0, 1):
        have = labels == value
        if have.sum() < len(active):
            continue
        for name in active:
            if ((split == name) & have).sum() == 0:
                donors = [n for n in active if ((split == n) & have).sum() > 1]
                if not donors:
                    raise SplitError(f"cannot give split '{name}' a row with label {value}")
                donor = max(donors, key=lambda n: ((split == n) & have).sum())
                row = rng.choice(np.array(split.index[(split == donor) & have]))
                split[row] = name


def balance_report(df: pd.DataFrame, split: pd.Series, factors=DEFAULT_FACTORS) -> dict:
    """Per factor and split: the share of each stratum label, and the largest absolute deviation of a
    split's share from the whole data set (0 = perfectly balanced)."""
    report: dict = {"n_rows": int(len(df)), "split_sizes": {str(k): int(v) for k, v in split.value_counts().items()},
                    "factors": {}}
    for factor in factors:
        labels = factor_labels(df, factor)
        overall = labels.value_counts(normalize=True)
        per_split = {}
        worst = 0.0
        for name in sorted(split.unique()):
            share = labels[split == name].value_counts(normalize=True).reindex(overall.index, fill_value=0.0)
            per_split[str(name)] = {str(k): round(float(v), 4) for k, v in share.items()}
            worst = max(worst, float((share - overall).abs().max()))
        report["factors"][factor] = {"overall": {str(k): round(float(v), 4) for k, v in overall.items()},
                                     "per_split": per_split, "max_abs_deviation": round(worst, 4)}
    return report
