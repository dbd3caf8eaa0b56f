"""Hearing-loss class names (Turkish, as in the clinical export), their ASCII/English aliases, and the
ABR waves the pipeline reads.

The clinical table spells classes in Turkish with dotted capitals (SNİK, İTİK, NÖROPATİ). Exports that
passed through ASCII tools carry SNIK / ITIK / NOROPATI, and English reports use SNHL / CHL / ANSD.
:func:`canonical_class` maps any of them to the canonical Turkish name; anything else is an error that
lists what is accepted.
"""

from __future__ import annotations

import unicodedata

from common.errors import InputError

# Canonical names in the order of the class index (the original's order; NORMAL is the majority).
CLASS_NAMES: tuple[str, ...] = ("NORMAL", "SNİK", "İTİK", "TOTAL", "NÖROPATİ")
CLASS_DESCRIPTIONS = {
    "NORMAL": "normal hearing",
    "SNİK": "sensorineural hearing loss (sensörinöral işitme kaybı)",
    "İTİK": "conductive hearing loss (iletim tipi işitme kaybı)",
    "TOTAL": "total / profound loss, no response",
    "NÖROPATİ": "auditory neuropathy spectrum disorder",
}
# Extra spellings, compared after folding (see _fold): upper case, Turkish letters to ASCII, no spaces.
CLASS_ALIASES = {
    "NORMAL": ("NORMAL", "NORMALHEARING", "NH"),
    "SNİK": ("SNIK", "SNHL", "SENSORINEURAL", "SENSORINORAL"),
    "İTİK": ("ITIK", "CHL", "CONDUCTIVE", "ILETIM"),
    "TOTAL": ("TOTAL", "PROFOUND", "NORESPONSE"),
    "NÖROPATİ": ("NOROPATI", "NEUROPATHY", "ANSD", "AN", "AUDITORYNEUROPATHY"),
}
# ASCII transliteration (file names, consoles without Turkish glyphs).
CLASS_ASCII = {"NORMAL": "NORMAL", "SNİK": "SNIK", "İTİK": "ITIK", "TOTAL": "TOTAL", "NÖROPATİ": "NOROPATI"}

WAVES: tuple[str, ...] = ("I", "III", "V")
WAVE_V = WAVES.index("V")


def _fold(text: str) -> str:
    """Upper-case ASCII skeleton: 'Nöropati' / 'NÖROPATİ' / 'noropati ' -> 'NOROPATI'.

    Turkish dotless ı and dotted İ both fold to I; combining marks are dropped (NFKD), as are spaces,
    hyphens and underscores.
    """
    text = str(text).strip().replace("ı", "i").replace("İ", "I")
    decomposed = unicodedata.normalize("NFKD", text)
    stripped = "".join(ch for ch in decomposed if not unicodedata.combining(ch))
    return "".join(ch for ch in stripped.upper() if ch.isalnum())


_LOOKUP: dict[str, str] = {}
for _name, _aliases in CLASS_ALIASES.items():
    _LOOKUP[_fold(_name)] = _name
    for _alias in _aliases:
        _LOOKUP[_fold(_alias)] = _name


def canonical_class(value, where: str = "") -> str:
    """Canonical class name for ``value``; raises InputError (a ValueError) naming ``where`` and the accepted names."""
    key = _fold(value) if value is not None else ""
    if key in _LOOKUP:
        return _LOOKUP[key]
    accepted = ", ".join(f"{name} ({'/'.join(CLASS_ALIASES[name])})" for name in CLASS_NAMES)
    prefix = f"{where}: " if where else ""
    raise InputError(f"{prefix}unknown hearing-loss class {value!r}; accepted: {accepted}")


def class_index(value, where: str = "") -> int:
    return CLASS_NAMES.index(canonical_class(value, where))


UNKNOWN_CLASS = -1  # a recording's class index when the class is not known (the class loss skips it)
UNKNOWN_WORDS = {"", "UNKNOWN", "NA", "NAN", "NONE", "BILINMIYOR", "BILINMEYEN"}  # after _fold; "?" and "-" fold to ""


def class_index_or_unknown(value, where: str = "") -> int:
    """:func:`class_index`, or UNKNOWN_CLASS for an empty cell, NaN, "unknown", "?", "-" (a typo stays an error)."""
    if value is None or (isinstance(value, float) and value != value) or _fold(value) in UNKNOWN_WORDS:
        return UNKNOWN_CLASS
    return class_index(value, where)
