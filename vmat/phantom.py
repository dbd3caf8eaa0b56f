"""Synthetic DICOM-RT prostate patients (CT, RTSTRUCT, RTDOSE, RTPLAN), written with pydicom.

    python -m vmat.phantom --output-dir data/vmat/synthetic_raw --n-cases 8
    python -m vmat.phantom --config configs/vmat/phantom_smoke.yaml --output-dir runs/demo/vmat/raw

Each case folder holds standards-conformant files with uninformative names in nested folders (readers
must identify them by Modality), CT slices whose InstanceNumber runs against their position (readers
must sort by ImagePositionPatient), ROI names drawn from real-world spellings plus distractor ROIs that
must not match, an RTDOSE on its own grid (different spacing and origin) and an RTPLAN with the SIB
prescription (PTV70 70 Gy / PTV56 56 Gy in 28 fractions). ``ground_truth.json`` next to the DICOM files
records what a correct reader must recover (PTV70 D95 of the dose on its own grid with the analytic
mask, structure volumes, ROI names used). Anatomy: vmat.phantom_anatomy; dose: vmat.phantom_dose.

``--broken KIND`` writes deliberately broken cases for tests: missing_ptv56, missing_rtdose,
contour_outside_ct, mismatched_frame, compressed_ct, dose_outside_ct, empty_contour, no_prescription
(RTPLAN without dose references: the reader falls back to beam doses), no_rtplan.

Settings: the ``phantom`` section of the vmat config (vmat/defaults.py) and ``seed``; ``--output-dir`` gets
only the case folders (``--output`` is its deprecated spelling).
"""

from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.cli import add_deprecated_alias, make_parser, start_run
from common.errors import run_cli
from common.runlog import progress, write_json
from vmat.defaults import VMAT_DEFAULTS
from vmat.phantom_anatomy import EllipticCylinder, ct_numbers, plane_contours, sample_anatomy
from vmat.phantom_dose import PlanParams, arcs_to_angles, compute_dose
from vmat.rt_writer import PatientInfo, write_ct_series, write_rtdose, write_rtplan, write_rtstruct
from vmat.structures import load_structure_map

BROKEN_KINDS = ("missing_ptv56", "missing_rtdose", "contour_outside_ct", "mismatched_frame", "compressed_ct",
                "dose_outside_ct", "empty_contour", "no_prescription", "no_rtplan")


@dataclass
class PhantomCase:
    """What the generator knows exactly (for tests and ground_truth.json)."""

    case_id: str
    hu: np.ndarray
    ct_origin_xyz: np.ndarray
    ct_spacing_zyx: tuple
    masks_ct: dict
    dose: np.ndarray
    dose_origin_xyz: np.ndarray
    dose_spacing_zyx: tuple
    masks_dose: dict
    roi_names: dict
    arcs: list
    isocenter_xyz: tuple
    anatomy: object
    prescription_gy: float
    low_dose_gy: float
    n_fractions: int
    extras: dict = field(default_factory=dict)

    def d95_truth(self, name: str = "PTV70") -> float:
        """D95 (5th percentile) of the generated dose inside the analytic mask on the dose grid."""
        return float(np.percentile(self.dose[self.masks_dose[name]], 5))


def grid_points(origin_xyz, spacing_zyx, shape_zyx):
    """Patient coordinates (x, y, z) of every voxel centre of a canonical grid, as (z, y, x) arrays."""
    zs = origin_xyz[2] + np.arange(shape_zyx[0]) * spacing_zyx[0]
    ys = origin_xyz[1] + np.arange(shape_zyx[1]) * spacing_zyx[1]
    xs = origin_xyz[0] + np.arange(shape_zyx[2]) * spacing_zyx[2]
    z, y, x = np.meshgrid(zs, ys, xs, indexing="ij")
    return x, y, z


def _pick_name(rng: np.random.Generator, canonical: str, variants: dict) -> str:
    options = [canonical, *variants.get(canonical, [])]
    return str(options[int(rng.integers(len(options)))])


def generate_case(cfg: dict, index: int, seed: int) -> PhantomCase:
    """Draw one patient: anatomy, CT numbers, masks on both grids, dose on its own grid."""
    rng = np.random.default_rng([seed, index])
    anatomy = sample_anatomy(rng, include_bowel=rng.uniform() < cfg["bowel_probability"])
    ct_shape = tuple(int(v) for v in cfg["ct"]["shape_zyx"])
    ct_spacing = tuple(float(v) for v in cfg["ct"]["spacing_zyx_mm"])
    iso = np.asarray(anatomy.isocenter_xyz)
    # CT centred near the isocentre (a whole-mm origin, as scanners write it).
    ct_origin = np.round(iso - (np.array(ct_shape[::-1]) - 1) / 2 * np.array(ct_spacing[::-1]) + rng.uniform(-5, 5, 3))
    x, y, z = grid_points(ct_origin, ct_spacing, ct_shape)
    hu = ct_numbers(anatomy, x, y, z, rng, cfg["ct"]["noise_hu"])
    masks_ct = {"Body": anatomy.body.inside(x, y, z)}
    for name, solid in anatomy.structures.items():
        masks_ct[name] = solid.inside(x, y, z) & masks_ct["Body"]

    # Dose grid: its own spacing, origin shifted by a fraction of a voxel, covering the body in x/y and
    # the CT's z range.
    dspacing = tuple(float(v) for v in cfg["dose_grid"]["spacing_zyx_mm"])
    (bcx, bcy), (bax, bay) = anatomy.body.center_xy, anatomy.body.semi_axes_xy
    margin = float(cfg["dose_grid"]["margin_mm"])
    lo = np.array([bcx - bax - margin, bcy - bay - margin, ct_origin[2]]) + rng.uniform(0, 1, 3) * np.array(dspacing[::-1])
    hi = np.array([bcx + bax + margin, bcy + bay + margin, ct_origin[2] + (ct_shape[0] - 1) * ct_spacing[0]])
    dshape = tuple(int(v) for v in (np.floor((hi - lo) / np.array(dspacing[::-1])) + 1)[::-1])
    dx, dy, dz = grid_points(lo, dspacing, dshape)
    masks_dose = {"Body": anatomy.body.inside(dx, dy, dz)}
    for name, solid in anatomy.structures.items():
        masks_dose[name] = solid.inside(dx, dy, dz) & masks_dose["Body"]

    pcfg = cfg["plan"]
    n_arcs = int(rng.integers(pcfg["n_arcs"][0], pcfg["n_arcs"][1] + 1))
    start = rng.uniform(0, 360)
    arcs = [((start + 40 * i) % 360, (start + 40 * i) % 360 + 358.0 * (1 if i % 2 == 0 else -1)) for i in range(n_arcs)]
    arcs = [(a, b) if b >= a else (a, a + abs(b - a)) for a, b in arcs]  # angle sampling is direction-free
    params = PlanParams(gantry_angles_deg=arcs_to_angles(arcs, int(pcfg["beams_per_arc"])),
                        penumbra_mm=float(rng.uniform(*pcfg["penumbra_mm"])),
                        oar_sparing=float(rng.uniform(*pcfg["oar_sparing"])),
                        scatter_fraction=float(pcfg["scatter_fraction"]),
                        scatter_sigma_mm=float(pcfg["scatter_sigma_mm"]),
                        attenuation_per_mm=float(pcfg["attenuation_per_mm"]))
    dose = compute_dose(dx, dy, dz, masks_dose, anatomy.body, iso, params, dspacing,
                        float(pcfg["prescription_gy"]), float(pcfg["low_dose_gy"]))
    variants = load_structure_map(cfg["structure_map"])
    raw_map = json.loads(Path(variants.source).read_text(encoding="utf-8"))
    roi_names = {name: _pick_name(rng, name, raw_map) for name in ["Body", *anatomy.structures]}
    return PhantomCase(case_id=f"{cfg['case_prefix']}_{index:03d}", hu=hu, ct_origin_xyz=ct_origin,
                       ct_spacing_zyx=ct_spacing, masks_ct=masks_ct, dose=dose, dose_origin_xyz=lo,
                       dose_spacing_zyx=dspacing, masks_dose=masks_dose, roi_names=roi_names, arcs=arcs,
                       isocenter_xyz=tuple(float(v) for v in iso), anatomy=anatomy,
                       prescription_gy=float(pcfg["prescription_gy"]), low_dose_gy=float(pcfg["low_dose_gy"]),
                       n_fractions=int(pcfg["n_fractions"]),
                       extras={"penumbra_mm": params.penumbra_mm, "oar_sparing": params.oar_sparing, "n_arcs": n_arcs})


def _roi_contours(solid, z_values, resolution):
    contours = []
    for z in z_values:
        contours.extend(plane_contours(solid, float(z), resolution))
    return contours


def write_case(case: PhantomCase, folder: str | Path, cfg: dict, seed: int = 0, broken: str | None = None) -> Path:
    """Write the case as DICOM files (names and folders carry no meaning) + ground_truth.json."""
    if broken is not None and broken not in BROKEN_KINDS:
        raise ValueError(f"unknown broken kind {broken!r}; choose from {BROKEN_KINDS}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng([seed, 7919, sum(case.case_id.encode())])
    info = PatientInfo.deterministic(case.case_id, seed)
    nz = case.hu.shape[0]
    order = rng.permutation(nz)
    names = [f"IM{int(o):05d}" for o in order]  # names unrelated to position
    instance_numbers = [nz - k for k in range(nz)]  # InstanceNumber runs against the z order
    ct_dir = folder / "series_a" / "sub"
    slices = write_ct_series(ct_dir, case.hu, case.ct_origin_xyz, case.ct_spacing_zyx, info,
                             cfg["ct"]["rescale_slope"], cfg["ct"]["rescale_intercept"], names, instance_numbers, seed)
    if broken == "compressed_ct":
        _recompress_without_decoder(slices[nz // 2]["path"])

    z_values = [s["z"] for s in slices]
    resolution = float(cfg["contour_resolution_mm"])
    rois = [{"name": case.roi_names["Body"], "type": "EXTERNAL",
             "contours": _roi_contours(EllipticCylinder(case.anatomy.body.center_xy, case.anatomy.body.semi_axes_xy,
                                                        (min(z_values), max(z_values))), z_values,
                                          float(cfg["body_contour_resolution_mm"]))}]
    for name, solid in case.anatomy.structures.items():
        if broken == "missing_ptv56" and name == "PTV56":
            continue
        contours = _roi_contours(solid, z_values, resolution)
        if broken == "contour_outside_ct" and name == "Bladder":
            shifted = contours[0].copy()
            shifted[:, 2] = max(z_values) + 10 * case.ct_spacing_zyx[0]
            contours.append(shifted)
        if broken == "empty_contour" and name == "Rectum":
            contours = []  # the ROI is listed but has no contour data
        rois.append({"name": case.roi_names[name], "type": "PTV" if name.startswith("PTV") else "ORGAN",
                     "contours": contours})
    # ROIs that must stay unmatched (whole-name matching, no substring matches).
    some_contour = next(r["contours"][:1] for r in rois[1:] if r["contours"])
    for name in cfg["distractor_rois"]:
        rois.append({"name": name, "type": "ORGAN", "contours": some_contour})
    frame = "1.2.826.0.1.3680043.8.498.1" if broken == "mismatched_frame" else None
    write_rtstruct(folder / "rt" / "object_b.dcm", rois, slices, info, seed, frame_of_reference_uid=frame)

    plan_uid = None
    if broken != "no_rtplan":
        targets = {"PTV70": case.prescription_gy}
        if broken != "missing_ptv56":
            targets["PTV56"] = case.low_dose_gy
        _, plan_uid = write_rtplan(folder / "rt" / "plan" / "x1.dcm", info, targets, case.n_fractions, case.arcs,
                                   case.isocenter_xyz, seed, include_prescription=broken != "no_prescription")
    if broken != "missing_rtdose":
        origin = case.dose_origin_xyz.copy()
        if broken == "dose_outside_ct":
            origin[0] += 2000.0
        write_rtdose(folder / "rt" / "d.dcm", case.dose, origin, case.dose_spacing_zyx, info, seed,
                     referenced_plan_uid=plan_uid)
    voxel_cc = float(np.prod(case.ct_spacing_zyx)) / 1000.0
    truth = {"case_id": case.case_id, "broken": broken, "prescription_gy": case.prescription_gy,
             "ptv70_d95_gy": case.d95_truth("PTV70"), "roi_names": case.roi_names, "arcs": case.arcs,
             "volumes_cc_ct_grid": {k: float(v.sum() * voxel_cc) for k, v in case.masks_ct.items()},
             "ct_spacing_zyx_mm": list(case.ct_spacing_zyx), "dose_spacing_zyx_mm": list(case.dose_spacing_zyx),
             **case.extras}
    write_json(folder / "ground_truth.json", truth)
    return folder


def _recompress_without_decoder(path: Path) -> None:
    """Re-label one slice as MPEG-2 encapsulated pixel data, which no installed handler decodes."""
    import pydicom
    from pydicom.encaps import encapsulate

    ds = pydicom.dcmread(str(path))
    ds.file_meta.TransferSyntaxUID = "1.2.840.10008.1.2.4.100"  # MPEG2 Main Profile @ Main Level
    ds.PixelData = encapsulate([b"\x00\x00\x01\xb3" + b"\x00" * 60])
    ds["PixelData"].VR = "OB"
    ds.save_as(str(path), enforce_file_format=True)


def main(argv: list[str] | None = None) -> dict:
    parser = make_parser(__doc__)  # --output-dir: the folder that receives one sub-folder per case
    add_deprecated_alias(parser, "--output", "--output-dir", dest="output_dir", type=Path)
    parser.add_argument("--n-cases", type=int, default=None, help="overrides n_cases")
    parser.add_argument("--broken", choices=BROKEN_KINDS, default=None, help="write every case broken this way")
    args = parser.parse_args(argv)
    if args.output_dir is None:
        parser.error("--output-dir RAW (receives one sub-folder per case) is required")
    # The output holds only case folders (preprocessing reads every sub-folder as a case): no run files there.
    run = start_run(argparse.Namespace(**{**vars(args), "output_dir": None}), domain="vmat", defaults=VMAT_DEFAULTS,
                    argv=argv, create_dir=False)
    cfg = run.cfg["phantom"]
    n_cases = int(args.n_cases if args.n_cases is not None else cfg["n_cases"])
    seed = int(run.cfg["seed"])
    rows = []
    for index in progress(range(n_cases), desc="synthetic patients", total=n_cases):
        case = generate_case(cfg, index, seed)
        write_case(case, args.output_dir / case.case_id, cfg, seed, broken=args.broken)
        rows.append({"case_id": case.case_id, "ptv70_d95_gy": case.d95_truth("PTV70"), "n_arcs": case.extras["n_arcs"]})
    run.log(f"[vmat] wrote {n_cases} synthetic DICOM-RT patients to {args.output_dir}")
    return run.finish({"n_cases": n_cases, "output": str(args.output_dir), "cases": rows})


if __name__ == "__main__":
    raise SystemExit(run_cli(main))
