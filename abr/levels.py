"""Stimulus level references (dB nHL, SPL, peSPL, SL, HL) and the check that an input's levels are in the
reference a trained model learned.

A threshold in dB nHL (human click, relative to normal-hearing listeners) and one in dB SPL (mouse tone
pips, relative to 20 µPa) differ by a stimulus- and device-dependent calibration, not by a constant the
project could assume. So an input in another reference than the checkpoint's is refused unless
``data.level_offset_db`` (added to the input's levels to reach the model's reference) declares the
conversion; outputs are always given back in the input's reference (abr/readers.py subtracts the offset).
"""

from __future__ import annotations

from common.errors import InputError

LEVEL_REFERENCES = ("dB nHL", "dB SPL", "dB peSPL", "dB SL", "dB HL")


def canonical_level_reference(text, source=None) -> str:
    """'nhl', 'dB nHL', 'dBnHL' -> 'dB nHL'; anything not in :data:`LEVEL_REFERENCES` is an error naming the key."""
    key = str(text or "").replace(" ", "").lower().removeprefix("db")
    for name in LEVEL_REFERENCES:
        if name.replace(" ", "").lower().removeprefix("db") == key:
            return name
    raise InputError(f"data.level_reference: {text!r} is not one of {', '.join(LEVEL_REFERENCES)}", source)


def converted_reference(data_cfg_or_meta: dict) -> str:
    """The reference levels are in after ``level_offset_db``: the input's own when the offset is 0; else
    ``converted_level_reference`` when declared, else the input's plus the offset written out. Caches and
    checkpoints from before level references were recorded are dB nHL (human click)."""
    reference = canonical_level_reference(data_cfg_or_meta.get("level_reference") or "dB nHL")
    offset = float(data_cfg_or_meta.get("level_offset_db", 0.0) or 0.0)
    if offset == 0:
        return reference
    declared = data_cfg_or_meta.get("converted_level_reference")
    return canonical_level_reference(declared) if declared else f"{reference} {offset:+g} dB"


def model_level_reference(meta: dict) -> str:
    """The level reference of a cache's or a checkpoint's (``preprocessing``) levels."""
    return meta.get("model_level_reference") or converted_reference(meta)


def check_input_reference(data_cfg: dict, ckpt_meta: dict, source) -> str | None:
    """Refuse an input whose levels (after ``data.level_offset_db``) are not in the checkpoint's reference;
    return a log line describing a declared conversion, else None."""
    given = canonical_level_reference(data_cfg.get("level_reference", "dB nHL"), source)
    converted = converted_reference(data_cfg)
    trained = model_level_reference(ckpt_meta)
    if converted != trained:
        how = (f"data.level_offset_db converts {given} to {converted}" if converted != given
               else f"data.level_reference is {given}")
        raise InputError(f"{how} but the checkpoint was trained on levels in {trained}: set data.level_offset_db "
                         f"to the dB that turn {given} into {trained} (the device's calibration for this stimulus) "
                         f"and data.converted_level_reference: {trained!r}, or use a model trained in {given}",
                         source)
    if converted != given:
        return f"levels converted from {given} to the model's {trained} by {data_cfg['level_offset_db']:+g} dB"
    return None
