"""Class names: Turkish canonical names, ASCII and English aliases, clear errors."""

import pytest

from abr.labels import CLASS_NAMES, canonical_class, class_index


@pytest.mark.parametrize("raw, expected", [
    ("NORMAL", "NORMAL"), ("normal ", "NORMAL"),
    ("SNİK", "SNİK"), ("SNIK", "SNİK"), ("snık", "SNİK"), ("SNHL", "SNİK"), ("sensorineural", "SNİK"),
    ("İTİK", "İTİK"), ("ITIK", "İTİK"), ("itik", "İTİK"), ("CHL", "İTİK"),
    ("TOTAL", "TOTAL"), ("Total", "TOTAL"),
    ("NÖROPATİ", "NÖROPATİ"), ("NOROPATI", "NÖROPATİ"), ("Nöropati", "NÖROPATİ"), ("ANSD", "NÖROPATİ"),
])
def test_aliases_map_to_canonical_names(raw, expected):
    assert canonical_class(raw) == expected


def test_class_order_is_the_original_one():
    assert CLASS_NAMES == ("NORMAL", "SNİK", "İTİK", "TOTAL", "NÖROPATİ")
    assert class_index("noropati") == 4


def test_unknown_class_names_the_place_and_the_accepted_names():
    with pytest.raises(ValueError, match=r"Hear_Loss row 7: unknown hearing-loss class 'MIXED'.*SNİK"):
        canonical_class("MIXED", "Hear_Loss row 7")
