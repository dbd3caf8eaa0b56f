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


def apply_torch_threads(cfg: dict, log=None) -> None:
    """``runtime.torch_threads`` > 0 sets torch's intra-op threads (on a CPU shared with other jobs, 1 thread
    is often faster than oversubscribed cores); 0 keeps torch's default."""
    import torch

    threads = int((cfg.get("runtime") or {}).get("torch_threads", 0) or 0)
    if threads > 0:
        torch.set_num_threads(threads)
        if log is not None:
            log(f"[lensing] torch intra-op threads: {threads}")
