"""Structure-name normalization, mapping and left/right pairing."""

import json

import pytest

from vmat.structures import (
    StructureMap,
    StructureMapError,
    left_right_permutation,
    load_structure_map,
    mirror_name,
    normalize_name,
    target_dose_from_name,
)


@pytest.mark.parametrize("raw, expected", [
    ("PTV70", "ptv70"), (" PTV_70 Gy ", "ptv70"), ("PTV 70Gy", "ptv70"), ("ptv-70", "ptv70"),
    ("PTV7000cGy", "ptv7000"), ("Femur_L", "femurl"), ("Left Femur", "leftfemur"), ("Rectum.O", "rectumo"),
])
def test_normalize_name(raw, expected):
    assert normalize_name(raw) == expected


@pytest.mark.parametrize("name, dose", [("PTV70", 70.0), ("PTV_56Gy", 56.0), ("PTV7000cGy", 70.0),
                                        ("PTV 50.4", 50.4), ("Rectum", None), ("Bladder70", None)])
def test_target_dose_from_name(name, dose):
    assert target_dose_from_name(name) == dose


@pytest.mark.parametrize("roi, canonical", [
    ("PTV_70", "PTV70"), ("ptv 70 gy", "PTV70"), ("PTV_High", "PTV70"), ("PTV_56Gy", "PTV56"), ("Rect", "Rectum"),
    ("Urinary Bladder", "Bladder"), ("FemoralHead_L", "Femur_L"), ("Right Femur", "Femur_R"), ("BowelBag", "Bowel"),
    ("External", "Body"), ("Parotid_L", "LeftParotid"),
    # whole-name matching only: these contain a canonical name but are different structures
    ("PTV70_eval", None), ("z_PTV70_ring", None), ("Rectum_PRV5", None), ("Couch_Surface", None),
])
def test_default_map_matches_whole_names_only(roi, canonical):
    assert load_structure_map().match(roi) == canonical


def test_assign_unites_several_rois_and_lists_unmatched():
    smap = StructureMap({"Bowel": ["SmallBowel", "LargeBowel"], "Rectum": []})
    groups, unmatched = smap.assign(["SmallBowel", "LargeBowel", "Rectum", "Marker"])
    assert groups == {"Bowel": ["SmallBowel", "LargeBowel"], "Rectum": ["Rectum"]}
    assert unmatched == ["Marker"]


def test_conflicting_variant_is_a_clear_error(tmp_path):
    path = tmp_path / "map.json"
    path.write_text(json.dumps({"PTV70": ["PTV_High"], "PTV56": ["PTV High"]}), encoding="utf-8")
    with pytest.raises(StructureMapError, match="listed under both 'PTV70' and 'PTV56'"):
        load_structure_map(path)


def test_bad_map_files(tmp_path):
    with pytest.raises(StructureMapError, match="not found"):
        load_structure_map(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json", encoding="utf-8")
    with pytest.raises(StructureMapError, match="not valid JSON"):
        load_structure_map(bad)
    bad.write_text(json.dumps({"PTV70": "PTV_70"}), encoding="utf-8")
    with pytest.raises(StructureMapError, match="must be a list"):
        load_structure_map(bad)


@pytest.mark.parametrize("name, mirror", [("Femur_L", "Femur_R"), ("Femur_R", "Femur_L"), ("LeftParotid", "RightParotid"),
                                          ("RightParotid", "LeftParotid"), ("Kidney Lt", "Kidney Rt"), ("Rectum", None),
                                          ("Bladder", None), ("PTV70", None)])
def test_mirror_name(name, mirror):
    assert mirror_name(name) == mirror


def test_left_right_permutation():
    names = ["PTV70", "Femur_L", "Rectum", "Femur_R"]
    assert left_right_permutation(names) == [0, 3, 2, 1]
    with pytest.raises(ValueError, match="partner 'Femur_R'"):
        left_right_permutation(["PTV70", "Femur_L"])
