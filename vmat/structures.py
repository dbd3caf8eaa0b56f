"""Structure names: map the many spellings of clinical ROI names to canonical names.

The mapping is a JSON file ``{canonical: [variant, ...]}`` (``configs/vmat/structure_map.json``; users
extend it). Names are compared after :func:`normalize_name` (case, spaces, underscores, hyphens, dots
and a "Gy"/"cGy" unit after a number are ignored), and only as whole names: a partial match (the
original's ``"rect" in name``) would map "Rectum_PRV" or "z_Rectum_avoid" onto the rectum.

Left/right pairs (``Femur_L``/``Femur_R``, ``LeftParotid``/``RightParotid``) are found by name so the
left-right flip augmentation can swap their channels (:func:`left_right_permutation`).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

from common.errors import InputError

log = logging.getLogger(__name__)

REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_MAP_FILE = "configs/vmat/structure_map.json"

# Canonical prostate SIB structures (seed 004) in channel order, and the OpenKBP head-and-neck set
# (Babier et al. 2021, provided_code/data_loader.py: OARs first, then targets).
PROSTATE_STRUCTURES = ("PTV70", "PTV56", "Prostate", "Rectum", "Bladder", "Femur_L", "Femur_R", "Bowel")
OPENKBP_STRUCTURES = ("Brainstem", "SpinalCord", "RightParotid", "LeftParotid", "Esophagus", "Larynx",
                      "Mandible", "PTV56", "PTV63", "PTV70")


class StructureMapError(InputError):
    """An unusable structure map; the message names the file and the offending entry."""


def normalize_name(name: str) -> str:
    """Lower-case alphanumerics only, with a dose unit after a number dropped.

    >>> normalize_name(" PTV_70 Gy "), normalize_name("Femur-L"), normalize_name("PTV 7000cGy")
    ('ptv70', 'femurl', 'ptv7000')
    """
    text = str(name).strip().lower()
    text = re.sub(r"(?<=\d)[\s_\-.]*c?gy\b", "", text)
    return re.sub(r"[^0-9a-z]+", "", text)


def target_dose_from_name(name: str) -> float | None:
    """Dose in Gy encoded in a target name: "PTV70" → 70.0, "PTV_56Gy" → 56.0, "PTV7000cGy" → 70.0."""
    text = str(name).lower()
    match = re.search(r"(\d+(?:[.,]\d+)?)\s*(c?gy)?", text)
    if not match or not text.lstrip().startswith(("ptv", "ctv", "gtv")):
        return None
    value = float(match.group(1).replace(",", "."))
    if match.group(2) == "cgy" or value >= 1000:
        value /= 100.0
    return value


class StructureMap:
    """Canonical names and their variants, compared by :func:`normalize_name`.

    Args:
        mapping: {canonical: [variants]}; the canonical name always matches itself.
        source: where the mapping came from (named in error messages).
    """

    def __init__(self, mapping: Mapping[str, Sequence[str]], source: str = "<mapping>"):
        if not isinstance(mapping, Mapping) or not mapping:
            raise StructureMapError(f"{source}: expected a non-empty JSON object {{canonical: [variants]}}")
        self.source = source
        self.canonical = list(mapping)
        self._lookup: dict[str, str] = {}
        for canonical, variants in mapping.items():
            if isinstance(variants, str) or not isinstance(variants, Sequence):
                raise StructureMapError(f"{source}: entry '{canonical}' must be a list of names, "
                                        f"got {type(variants).__name__}")
            for variant in [canonical, *variants]:
                key = normalize_name(variant)
                if not key:
                    raise StructureMapError(f"{source}: entry '{canonical}' has an empty variant {variant!r}")
                other = self._lookup.get(key)
                if other is not None and other != canonical:
                    raise StructureMapError(f"{source}: variant {variant!r} (normalized '{key}') is listed "
                                            f"under both '{other}' and '{canonical}'")
                self._lookup[key] = canonical

    def match(self, roi_name: str) -> str | None:
        """Canonical name for ``roi_name`` or None."""
        return self._lookup.get(normalize_name(roi_name))

    def assign(self, roi_names: Iterable[str]) -> tuple[dict[str, list[str]], list[str]]:
        """Group ROI names by canonical name. Returns ({canonical: [roi names]}, [unmatched names]).

        Several ROIs mapping to one canonical name are all kept (their masks are united).
        """
        groups: dict[str, list[str]] = {}
        unmatched: list[str] = []
        for name in roi_names:
            canonical = self.match(name)
            if canonical is None:
                unmatched.append(name)
            else:
                groups.setdefault(canonical, []).append(name)
        return groups, unmatched

    @property
    def n_variants(self) -> int:
        return len(self._lookup)


def resolve_path(path: str | Path) -> Path:
    """A relative path is looked up in the working folder, then in the repository root."""
    path = Path(path)
    if path.is_absolute() or path.exists():
        return path
    candidate = REPO_ROOT / path
    return candidate if candidate.exists() else path


def load_structure_map(path: str | Path = DEFAULT_MAP_FILE, extra: Mapping[str, Sequence[str]] | None = None) -> StructureMap:
    """Read the JSON mapping (UTF-8); a clear error for a missing or malformed file.

    ``extra`` ({canonical: [variants]}, e.g. ``preprocess.structures.extra_names`` of a YAML config) adds
    spellings to existing canonical names or new canonical names; a variant already listed under another
    canonical name is an error naming both."""
    path = resolve_path(path)
    if not path.is_file():
        raise StructureMapError(f"structure map not found: {path}")
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise StructureMapError(f"{path}: not valid JSON ({exc})") from exc
    data = {k: v for k, v in data.items() if not str(k).startswith("_")}  # "_comment" keys
    source = str(path)
    for canonical, variants in (extra or {}).items():
        if isinstance(variants, str) or not isinstance(variants, Sequence):
            raise StructureMapError(f"preprocess.structures.extra_names: entry '{canonical}' must be a list of names")
        data[canonical] = list(data.get(canonical, [])) + [str(v) for v in variants]
        source = f"{path} + preprocess.structures.extra_names"
    return StructureMap(data, source=source)


# ------------------------------------------------------------------------------------------ left/right
_MIRROR_PATTERNS = [
    (re.compile(r"^(.*[_\s-])L$"), r"\1R"), (re.compile(r"^(.*[_\s-])R$"), r"\1L"),
    (re.compile(r"^(.*[_\s-])Lt$"), r"\1Rt"), (re.compile(r"^(.*[_\s-])Rt$"), r"\1Lt"),
    (re.compile(r"^Left(.*)$"), r"Right\1"), (re.compile(r"^Right(.*)$"), r"Left\1"),
    (re.compile(r"^(.*)Left$"), r"\1Right"), (re.compile(r"^(.*)Right$"), r"\1Left"),
]


def mirror_name(name: str) -> str | None:
    """The name of the contralateral structure ("Femur_L" → "Femur_R"), or None if not lateral."""
    for pattern, replacement in _MIRROR_PATTERNS:
        if pattern.match(name):
            return pattern.sub(replacement, name)
    return None


def left_right_permutation(names: Sequence[str]) -> list[int]:
    """Channel order after a left-right flip: left/right pairs swapped, others in place (``out[c] =
    in[perm[c]]``).

    A lateral channel without its partner in ``names`` would carry a left structure labelled as right
    after the flip, so that is an error rather than a silent mislabel.
    """
    index = {n: i for i, n in enumerate(names)}
    perm = list(range(len(names)))
    for i, name in enumerate(names):
        partner = mirror_name(name)
        if partner is None:
            continue
        if partner not in index:
            raise ValueError(f"channel '{name}' is lateral but its partner '{partner}' is not among the "
                             f"channels {list(names)}: a left-right flip would mislabel it")
        perm[i] = index[partner]
    return perm
