"""Site templates (configs/vmat/site_*.yaml) and structure names extended in YAML (TG-263 spellings)."""

import csv

import pytest

from common.config import load_config
from common.errors import NothingProcessedError
from tests.vmat.rt_fixture import write_patient
from vmat.defaults import VMAT_DEFAULTS
from vmat.preprocess_vmat import main
from vmat.structures import StructureMapError, load_structure_map

SITES = {"prostate": "PTV70", "prostate_bed": "PTV66", "head_neck": "PTV70", "lung": "PTV60"}


@pytest.mark.parametrize("site, target", SITES.items())
def test_site_templates_load_and_name_their_structures(site, target):
    cfg = load_config(f"configs/vmat/site_{site}.yaml", defaults=VMAT_DEFAULTS)
    pre = cfg["preprocess"]
    assert pre["site"] == site and target in pre["structures"]["required"]
    assert set(pre["structures"]["required"]) <= set(pre["structures"]["channels"] or pre["structures"]["required"])
    smap = load_structure_map(pre["structures"]["map_file"])
    assert all(smap.match(name) == name for name in pre["structures"]["channels"] or [])  # canonical names
    assert {c["structure"] for c in cfg["constraints"]} <= set(pre["structures"]["channels"] or SITES)


@pytest.mark.parametrize("tg263, canonical", [
    ("Femur_Head_L", "Femur_L"), ("Bowel_Bag", "Bowel"), ("Bowel_Small", "Bowel"), ("Parotid_R", "RightParotid"),
    ("Bone_Mandible", "Mandible"), ("Lung_L", "Lung_L"), ("Lungs", "Lungs"), ("Heart", "Heart"),
    ("SpinalCord", "SpinalCord"), ("PTV_6600", "PTV66"), ("CTV_ProstateBed", "ProstateBed"), ("External", "Body"),
])
def test_tg263_names_map(tg263, canonical):
    assert load_structure_map().match(tg263) == canonical


def test_extra_names_from_yaml_extend_the_map():
    smap = load_structure_map(extra={"Rectum": ["Rect_Custom"], "Spleen": ["Lien"]})
    assert smap.match("rect custom") == "Rectum" and smap.match("Lien") == "Spleen"
    with pytest.raises(StructureMapError, match="both 'Rectum' and 'Bladder'"):
        load_structure_map(extra={"Bladder": ["Rect"]})


def test_prostate_bed_patient_without_prostate(tmp_path):
    """A prostatectomy patient (no Prostate ROI, target PTV_6600, TG-263 femoral heads, a clinic's own rectum
    spelling added in YAML) is skipped by the prostate template and preprocessed by the prostate-bed one."""
    write_patient(tmp_path / "raw" / "bed", rename={"Prostate": None, "PTV_56": None, "PTV_70": "PTV_6600",
                                                   "Femur_L": "Femur_Head_L", "Femur_R": "Femur_Head_R",
                                                   "Rectum": "Rect_Custom"})
    with pytest.raises(NothingProcessedError):
        main(["--data", str(tmp_path / "raw"), "--output-dir", str(tmp_path / "a")])
    rows = list(csv.DictReader((tmp_path / "a" / "manifest.csv").open(encoding="utf-8")))
    assert rows[0]["reason"].startswith("missing_structure") and "Prostate" in rows[0]["reason"]
    summary = main(["--config", "configs/vmat/site_prostate_bed.yaml", "--data", str(tmp_path / "raw"),
                    "--output-dir", str(tmp_path / "b"), "--set", "preprocess.sanity.enforce=false",
                    "--set", 'preprocess.structures.extra_names={"Rectum": ["Rect_Custom"]}'])
    assert summary["n_ok"] == 1 and summary["site"] == "prostate_bed"
    assert summary["structure_names"][:2] == ["PTV66", "ProstateBed"] and summary["target_doses_gy"] == {"PTV66": 66.0}
