"""One YAML file configures the whole lensing pipeline (simulate → train → validate → benchmark).

Each script checks its own sections strictly (its DEFAULTS) and carries the other scripts' sections as
free-form mappings, so ``configs/lensing/smoke.yaml`` can hold every stage while a typo is still caught
by the script that owns the section.
"""

from __future__ import annotations

SECTIONS = ("seed", "simulate", "convert", "split", "data", "model", "train", "physics", "ensemble", "validate",
            "benchmark", "runtime")


def with_other_sections(defaults: dict) -> dict:
    """``defaults`` plus an empty (free-form) mapping for every pipeline section it does not own."""
    out = dict(defaults)
    for section in SECTIONS:
        if section not in out:
            out[section] = {}
    return out
