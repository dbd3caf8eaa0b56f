"""An analytic lumbar-spine phantom in patient coordinates, with the graded narrowings built into anatomy.

Coordinates are DICOM LPS in mm: +x patient left, +y posterior, +z superior. The phantom is a function
``render(anatomy, xyz, sequence)`` evaluated at any patient points, so every series (sagittal T1,
sagittal T2, axial T2, tilted axial stacks) is sampled from the same 3D anatomy with exact geometry.

Anatomy (simplified from standard lumbar MR anatomy):
- vertebral bodies L1..S1 (marrow with a cortical rim) and five discs L1/L2..L5/S1 stacked along z,
  following a lordotic curve (the canal centre moves anteriorly in mid-lumbar levels);
- the thecal sac (CSF: bright on T2, dark on T1) posterior to the bodies, surrounded by epidural fat;
- lateral recesses (subarticular zones): CSF lobes at the posterolateral corners of the sac, bordered by
  the facet joints;
- neural foramina: fat-filled ovals (bright on T1) between the pedicles ~24 mm from midline, each with a
  dark exiting nerve root;
- laminae, ligamentum flavum, spinous processes, paraspinal muscle, subcutaneous fat.

Severity is anatomy, not metadata (the criteria radiologists grade by):
- spinal canal stenosis: the sac's AP (and, less, lateral) diameter shrinks at the disc level
  (disc bulge + ligamentum flavum), narrowing fraction n;
- subarticular stenosis: the facet joint grows medially into the lateral recess at the disc level and the
  recess CSF shrinks (severe: the recess is filled by facet);
- foraminal narrowing: the fat of the foramen shrinks around the nerve root (severe: root surrounded by no
  fat).
n is drawn per grade from separated ranges (``NARROWING_RANGES``) so the grade is recoverable from pixels,
with per-study anatomical variation, bias field and noise added by the series renderer.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from rsna_spine.constants import CONDITIONS, LEVELS

# Narrowing fraction n by grade (normal/mild, moderate, severe): disjoint ranges with gaps.
NARROWING_RANGES = ((0.0, 0.25), (0.42, 0.58), (0.72, 0.9))

# Tissue intensities (arbitrary MR units before the per-series scale) for T1 and T2.
TISSUES = {
    #              T1    T2
    "air": (0.0, 0.0),
    "muscle": (320.0, 170.0),
    "fat": (760.0, 470.0),
    "marrow": (520.0, 330.0),
    "cortex": (140.0, 90.0),
    "disc": (290.0, 640.0),
    "annulus": (230.0, 220.0),
    "csf": (120.0, 960.0),
    "ligament": (190.0, 110.0),
    "nerve": (260.0, 210.0),
}

LEVEL_SPACING_MM = 36.0  # distance between consecutive discs (scaled per study)
DISC_HEIGHT_MM = 9.0
FORAMEN_OFFSET_MM = 24.0  # lateral distance of the neural foramina from the midline
RECESS_OFFSET_MM = 12.0  # lateral distance of the lateral recesses
FACET_OFFSET_MM = 19.0  # lateral distance of the facet joints (their medial edge bounds the recess)


@dataclass
class SpineAnatomy:
    """Per-study anatomy. ``grades[condition][level]`` is 0/1/2; ``narrowing`` the matching fraction n."""

    center_mm: np.ndarray  # (x0, y0, z0): canal centre at the L3/L4 disc without lordosis
    scale: float = 1.0  # level spacing factor
    lordosis_mm: float = 6.0  # anterior shift of the canal at mid-lumbar level
    canal_ap_mm: float = 7.5  # thecal sac AP semi-axis
    canal_lat_mm: float = 10.0  # thecal sac lateral semi-axis
    body_depth_mm: float = 32.0
    disc_t2_factor: np.ndarray = field(default_factory=lambda: np.ones(5))  # degeneration darkens discs
    grades: dict = field(default_factory=dict)
    narrowing: dict = field(default_factory=dict)
    texture: np.ndarray = field(default_factory=lambda: np.zeros((6, 5)))  # (freq xyz, phase, amplitude)

    # ------------------------------------------------------------------------------------- geometry
    def disc_z(self) -> np.ndarray:
        """z of the five disc centres, L1/L2 (top) to L5/S1."""
        return self.center_mm[2] + self.scale * LEVEL_SPACING_MM * (2.0 - np.arange(5))

    def canal_y(self, z: np.ndarray) -> np.ndarray:
        """Canal centre y along z: lordosis brings the mid-lumbar canal anteriorly (smaller y)."""
        half = 2.6 * self.scale * LEVEL_SPACING_MM
        t = np.clip((z - self.center_mm[2]) / half, -1.5, 1.5)
        return self.center_mm[1] - self.lordosis_mm * (1.0 - t**2)

    def landmark(self, condition: str, level: str) -> np.ndarray:
        """Patient point (mm) an annotator would click for this condition and level (Kaggle convention:
        spinal canal on the midline sagittal, foramina on parasagittal slices, subarticular on axial)."""
        z = float(self.disc_z()[LEVELS.index(level)])
        x0, yc = float(self.center_mm[0]), float(self.canal_y(np.array([z]))[0])
        side = 1.0 if condition.startswith("left") else -1.0  # LPS: patient left is +x
        if condition == "spinal_canal_stenosis":
            return np.array([x0, yc, z])
        if "foraminal" in condition:
            return np.array([x0 + side * FORAMEN_OFFSET_MM, yc - 1.0, z + 4.0])
        return np.array([x0 + side * RECESS_OFFSET_MM, yc + 3.0, z])


def sample_anatomy(rng: np.random.Generator, grades: dict) -> SpineAnatomy:
    """Random per-study anatomy with the given grades; narrowing fractions drawn from NARROWING_RANGES."""
    narrowing = {}
    for condition in CONDITIONS:
        narrowing[condition] = {}
        for level in LEVELS:
            grade = grades[condition][level]
            low, high = NARROWING_RANGES[int(grade) if grade is not None and grade >= 0 else 0]
            narrowing[condition][level] = float(rng.uniform(low, high))
    worst = np.array([max(narrowing[c][lv] for c in CONDITIONS) for lv in LEVELS])
    texture = np.c_[rng.uniform(0.03, 0.12, (6, 3)) * rng.choice([-1, 1], (6, 3)),
                    rng.uniform(0, 2 * np.pi, 6), rng.uniform(0.02, 0.05, 6)]
    return SpineAnatomy(
        center_mm=np.array([rng.uniform(-3, 3), rng.uniform(-4, 4), rng.uniform(-8, 8)]),
        scale=float(rng.uniform(0.93, 1.07)),
        lordosis_mm=float(rng.uniform(3.0, 9.0)),
        canal_ap_mm=float(rng.uniform(6.8, 8.2)),
        canal_lat_mm=float(rng.uniform(9.3, 10.8)),
        body_depth_mm=float(rng.uniform(29.0, 35.0)),
        disc_t2_factor=1.0 - 0.35 * worst * rng.uniform(0.6, 1.0, 5),
        grades=grades, narrowing=narrowing, texture=texture)


def render(anatomy: SpineAnatomy, xyz: np.ndarray, sequence: str) -> np.ndarray:
    """Noise-free intensity at patient points ``xyz`` (N, 3) for ``sequence`` "T1" or "T2"."""
    col = 0 if sequence == "T1" else 1
    val = {name: v[col] for name, v in TISSUES.items()}
    xyz = np.asarray(xyz, dtype=np.float32)
    a = anatomy
    x0, y0 = float(a.center_mm[0]), float(a.center_mm[1])
    x, y, z = xyz[:, 0], xyz[:, 1], xyz[:, 2]
    dx_all = x - x0

    # soft tissue: body ellipse (muscle with texture), subcutaneous fat near its edge
    body = (dx_all / 150.0) ** 2 + ((y - y0 + 20.0) / 115.0) ** 2
    out = np.where(body <= 1.0, np.float32(val["muscle"]), np.float32(0.0))
    out[(body > 0.78) & (body <= 1.0)] = val["fat"]
    tex = np.zeros_like(x)
    for fx, fy, fz, phase, amp in a.texture:
        tex += np.float32(amp) * np.sin(np.float32(fx) * x + np.float32(fy) * y + np.float32(fz) * z
                                        + np.float32(phase))
    out *= 1.0 + tex

    # everything else lives in a box around the spine: evaluate it on that subset only
    discs = a.disc_z()
    top, bottom = discs[0] + 34.0 * a.scale, discs[-1] - 34.0 * a.scale
    yc_all = a.canal_y(z).astype(np.float32)
    box = ((z < top) & (z > bottom) & (np.abs(dx_all) < 33.0) & (y - yc_all > -(a.canal_ap_mm + 2.0
           + a.body_depth_mm)) & (y - yc_all < a.canal_ap_mm + 43.0))
    idx = np.flatnonzero(box)
    if idx.size == 0:
        return out.astype(np.float32)
    dx, dy, zz = dx_all[idx], (y - yc_all)[idx], z[idx]
    sub = out[idx]
    half_disc = 0.5 * DISC_HEIGHT_MM * a.scale
    dz_all = np.abs(zz[:, None] - discs[None, :].astype(np.float32))
    nearest = np.argmin(dz_all, axis=1)
    dz_disc = dz_all[np.arange(len(zz)), nearest]
    at_disc = dz_disc <= half_disc

    # spinous processes and interspinous ligament (posterior midline)
    m = (np.abs(dx) < 5.0) & (dy > a.canal_ap_mm + 9.0) & (dy < a.canal_ap_mm + 42.0)
    sub[m] = np.where(dz_disc[m] > 9.0 * a.scale, val["marrow"], val["ligament"])

    # vertebral bodies and discs (anterior column): superellipse in (x, y)
    front = -(a.canal_ap_mm + 1.5)
    cy = (dy - (front - a.body_depth_mm / 2)) / (a.body_depth_mm / 2)
    shape = (np.abs(dx) / 21.0) ** 4 + np.abs(cy) ** 4
    column = (shape <= 1.0) & (dy < front) & (dy > front - a.body_depth_mm)
    sub[column] = val["marrow"]
    sub[column & ((shape > 0.55) | (np.abs(dz_disc - half_disc) < 1.6))] = val["cortex"]
    disc = column & at_disc
    nucleus = disc & ((np.abs(dx) / 13.0) ** 2 + (cy / 0.7) ** 2 <= 1.0)
    sub[disc] = val["annulus"]
    sub[nucleus] = val["disc"] * (a.disc_t2_factor[nearest[nucleus]] if sequence == "T2" else 1.0)

    # pedicles / facet block lateral to the canal, with the foramen cut out at each disc
    lateral = (np.abs(dx) > 15.0) & (np.abs(dx) < 31.0) & (dy > -14.0) & (dy < 12.0)
    sub[lateral] = val["marrow"]
    for side, cond in ((1.0, "left_neural_foraminal_narrowing"), (-1.0, "right_neural_foraminal_narrowing")):
        sel = np.flatnonzero((side * dx > 17.0) & (side * dx < 31.0) & (np.abs(dy + 1.0) < 7.0))
        for li, level in enumerate(LEVELS):
            cz = discs[li] + 4.0
            near = sel[np.abs(zz[sel] - cz) < 10.5]
            if near.size == 0:
                continue
            ell = ((dy[near] + 1.0) / 6.5) ** 2 + ((zz[near] - cz) / 10.0) ** 2
            sub[near[ell <= 1.0]] = val["ligament"]  # narrowed away: disc bulge / osteophyte / ligament
            fat_scale = max(1.0 - a.narrowing[cond][level], 0.05) ** 2
            sub[near[ell <= fat_scale]] = val["fat"]
            root = ((dy[near] + 2.0) / 2.4) ** 2 + ((zz[near] - (cz + 4.0)) / 2.4) ** 2 <= 1.0
            sub[near[root]] = val["nerve"]

    # laminae (bone at vertebral levels, ligamentum flavum at the discs), epidural fat
    m = (np.abs(dx) < 15.0) & (dy > a.canal_ap_mm + 2.0) & (dy < a.canal_ap_mm + 9.0)
    sub[m] = np.where(dz_disc[m] > 6.0, val["marrow"], val["ligament"])
    sub[(dx / (a.canal_lat_mm + 3.0)) ** 2 + (dy / (a.canal_ap_mm + 2.5)) ** 2 <= 1.0] = val["fat"]

    # narrowing profiles along z (Gaussian bumps centred on the discs)
    def profile(condition: str, sigma: float) -> np.ndarray:
        amounts = np.array([a.narrowing[condition][lv] for lv in LEVELS], dtype=np.float32)
        return np.clip(amounts[nearest] * np.exp(-0.5 * (dz_disc / sigma) ** 2), 0.0, 1.0)

    # thecal sac: AP and lateral semi-axes shrink at stenotic discs
    n_can = profile("spinal_canal_stenosis", 4.5)
    ap = np.maximum(a.canal_ap_mm * (1.0 - n_can), 0.3)
    lat = a.canal_lat_mm * (1.0 - 0.45 * n_can)
    sub[(dx / a.canal_lat_mm) ** 2 + (dy / a.canal_ap_mm) ** 2 <= 1.0] = val["ligament"]
    sub[(dx / lat) ** 2 + (dy / ap) ** 2 <= 1.0] = val["csf"]

    # lateral recesses (CSF lobes at the posterolateral corners of the sac), then the facet joints, which
    # grow medially into the recess with subarticular stenosis (facet hypertrophy)
    for side, cond in ((1.0, "left_subarticular_stenosis"), (-1.0, "right_subarticular_stenosis")):
        n_sub = profile(cond, 5.0)
        s = np.maximum(1.0 - n_sub, 0.05)
        lobe = ((side * dx - RECESS_OFFSET_MM) / (6.5 * s)) ** 2 + ((dy - 3.0) / (5.0 * s)) ** 2 <= 1.0
        sub[lobe] = val["csf"]
        radius = 4.5 + 6.0 * n_sub
        r2 = (side * dx - FACET_OFFSET_MM) ** 2 + (dy - 8.0) ** 2
        sub[r2 <= radius**2] = val["cortex"]
        sub[r2 <= (radius - 1.8) ** 2] = val["marrow"]
    out[idx] = sub
    return out.astype(np.float32)
