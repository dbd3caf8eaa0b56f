"""Analytic pelvic anatomy for synthetic prostate patients: shapes, random per-case sampling, CT numbers.

Every structure is an analytic solid in patient coordinates (mm, DICOM LPS: +x patient left,
+y posterior, +z superior), so ground-truth masks on any grid are exact point tests, and planar contours
for the RTSTRUCT are traced on a fine grid of each CT slice plane (cv2.findContours with hole hierarchy).
Sizes follow adult male pelvic anatomy: prostate ~30-60 cc, bladder ~150-350 cc, femoral heads of
radius ~22-25 mm about 90-100 mm from the midline, rectum ~30 mm wide running posterior to the prostate.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


# ------------------------------------------------------------------------------------------------ shapes
@dataclass
class Ellipsoid:
    center: tuple[float, float, float]
    semi_axes: tuple[float, float, float]

    def inside(self, x, y, z, margin: float = 0.0):
        cx, cy, cz = self.center
        ax, ay, az = (a + margin for a in self.semi_axes)
        return ((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 + ((z - cz) / az) ** 2 <= 1.0

    def bbox(self):
        c, a = np.asarray(self.center), np.asarray(self.semi_axes)
        return c - a, c + a


@dataclass
class EllipticCylinder:
    """Axis along z; an optional z range (capped)."""

    center_xy: tuple[float, float]
    semi_axes_xy: tuple[float, float]
    z_range: tuple[float, float] = (-np.inf, np.inf)

    def inside(self, x, y, z, margin: float = 0.0):
        (cx, cy), (ax, ay) = self.center_xy, (a + margin for a in self.semi_axes_xy)
        return (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0) & (z >= self.z_range[0]) & (z <= self.z_range[1])

    def bbox(self):
        (cx, cy), (ax, ay) = self.center_xy, self.semi_axes_xy
        return (np.array([cx - ax, cy - ay, self.z_range[0]]), np.array([cx + ax, cy + ay, self.z_range[1]]))


@dataclass
class Tube:
    """Elliptic cross-section whose centre moves linearly with z (the rectum curving posteriorly)."""

    center_xy_at_z0: tuple[float, float]
    slope_xy_per_mm: tuple[float, float]
    semi_axes_xy: tuple[float, float]
    z0: float
    z_range: tuple[float, float]

    def center_at(self, z):
        return (self.center_xy_at_z0[0] + self.slope_xy_per_mm[0] * (z - self.z0),
                self.center_xy_at_z0[1] + self.slope_xy_per_mm[1] * (z - self.z0))

    def inside(self, x, y, z, margin: float = 0.0):
        cx, cy = self.center_at(z)
        ax, ay = (a + margin for a in self.semi_axes_xy)
        return (((x - cx) / ax) ** 2 + ((y - cy) / ay) ** 2 <= 1.0) & (z >= self.z_range[0]) & (z <= self.z_range[1])

    def bbox(self):
        zs = np.array(self.z_range)
        cx, cy = self.center_at(zs)
        ax, ay = self.semi_axes_xy
        return (np.array([min(cx) - ax, min(cy) - ay, zs[0]]), np.array([max(cx) + ax, max(cy) + ay, zs[1]]))


@dataclass
class Union:
    parts: list

    def inside(self, x, y, z, margin: float = 0.0):
        out = self.parts[0].inside(x, y, z, margin)
        for part in self.parts[1:]:
            out = out | part.inside(x, y, z, margin)
        return out

    def bbox(self):
        boxes = [p.bbox() for p in self.parts]
        return np.min([b[0] for b in boxes], axis=0), np.max([b[1] for b in boxes], axis=0)


@dataclass
class Difference:
    base: object
    minus: object

    def inside(self, x, y, z, margin: float = 0.0):
        return self.base.inside(x, y, z, margin) & ~self.minus.inside(x, y, z, -margin)

    def bbox(self):
        return self.base.bbox()


def grown(shape: Ellipsoid, margin_mm: float, posterior_margin_mm: float | None = None) -> Ellipsoid:
    """An ellipsoid enlarged by a margin (the usual CTV→PTV expansion, posterior margin often smaller).

    A smaller posterior margin is modelled by shifting the centre anteriorly (−y) by half the difference.
    """
    post = margin_mm if posterior_margin_mm is None else posterior_margin_mm
    ax, ay, az = shape.semi_axes
    cx, cy, cz = shape.center
    return Ellipsoid((cx, cy - (margin_mm - post) / 2, cz), (ax + margin_mm, ay + (margin_mm + post) / 2, az + margin_mm))


# --------------------------------------------------------------------------------------------- anatomy
@dataclass
class Anatomy:
    """Solids of one patient. ``structures`` maps canonical names to solids (Bowel may be missing)."""

    body: EllipticCylinder
    structures: dict
    bones: list
    rectal_gas: Tube | None
    isocenter_xyz: tuple[float, float, float]
    extras: dict = field(default_factory=dict)


def sample_anatomy(rng: np.random.Generator, include_bowel: bool = True) -> Anatomy:
    """Draw one patient. The prostate centre is the isocentre near the origin."""
    u = rng.uniform
    body = EllipticCylinder((0.0, -25.0 + u(-5, 5)), (u(150, 185), u(105, 125)))
    prostate = Ellipsoid((u(-4, 4), u(-4, 6), u(-6, 6)), (u(19, 25), u(15, 20), u(16, 22)))
    px, py, pz = prostate.center
    sv = Ellipsoid((px, py + u(12, 18), pz + prostate.semi_axes[2] + u(4, 10)), (u(18, 26), u(7, 10), u(9, 13)))
    ptv70 = grown(prostate, 7.0, posterior_margin_mm=5.0)
    ptv56 = Union([grown(prostate, 9.0, posterior_margin_mm=6.0), grown(sv, 7.0)])
    rectum_ry = u(13, 17)
    rectum = Tube(center_xy_at_z0=(px + u(-3, 3), py + prostate.semi_axes[1] + rectum_ry + u(-2, 3)),
                  slope_xy_per_mm=(0.0, u(0.05, 0.25)), semi_axes_xy=(u(15, 20), rectum_ry), z0=pz,
                  z_range=(pz - u(35, 45), pz + u(55, 75)))
    bladder = Ellipsoid((px + u(-5, 5), py - u(30, 42), pz + u(30, 42)), (u(35, 48), u(28, 36), u(28, 36)))
    head_r = u(21, 25)
    head_y, head_z = py + u(-5, 5), pz + u(-8, 4)
    femur_l = Ellipsoid((u(88, 100), head_y, head_z), (head_r, head_r, head_r))  # +x = patient's left
    femur_r = Ellipsoid((-u(88, 100), head_y, head_z), (head_r, head_r, head_r))
    structures = {"PTV70": ptv70, "PTV56": ptv56, "Prostate": prostate, "Rectum": rectum, "Bladder": bladder,
                  "Femur_L": femur_l, "Femur_R": femur_r}
    if include_bowel:
        bz = bladder.center[2] + bladder.semi_axes[2] + u(5, 15)
        bowel = Difference(Ellipsoid((u(-10, 10), body.center_xy[1] - u(5, 25), bz + 25), (u(80, 110), u(45, 60), 35.0)),
                           bladder)
        structures["Bowel"] = bowel
    # Bones for the CT only: femoral necks/shafts running laterally and inferiorly, pubic symphysis, sacrum.
    bones = [femur_l, femur_r]
    for side in (+1, -1):
        bones.append(Tube((side * (femur_l.center[0] + 20), head_y), (side * 0.25, 0.0), (14, 14), head_z,
                          (head_z - 140, head_z)))
    bones.append(Ellipsoid((px, bladder.center[1] - bladder.semi_axes[1] - 14, pz + 5), (14, 10, 22)))
    bones.append(Tube((px, rectum.center_xy_at_z0[1] + rectum_ry + 25), (0.0, 0.35), (45, 14), pz, (pz + 20, pz + 200)))
    gas = None
    if rng.uniform() < 0.6:
        gas = Tube(rectum.center_xy_at_z0, rectum.slope_xy_per_mm, (rectum.semi_axes_xy[0] * 0.45, rectum_ry * 0.45),
                   rectum.z0, (rectum.z_range[0] + 15, rectum.z_range[1] - 15))
    return Anatomy(body=body, structures=structures, bones=bones, rectal_gas=gas, isocenter_xyz=prostate.center)


def ct_numbers(anatomy: Anatomy, x, y, z, rng: np.random.Generator, noise_hu: float = 10.0) -> np.ndarray:
    """Hounsfield units on given coordinates: air, fat rim, muscle, organs, bone, rectal gas, noise."""
    hu = np.full(np.broadcast(x, y, z).shape, -1000.0, dtype=np.float32)
    body = anatomy.body.inside(x, y, z)
    (cx, cy), (ax, ay) = anatomy.body.center_xy, anatomy.body.semi_axes_xy
    inner = EllipticCylinder((cx, cy), (ax - 20.0, ay - 18.0)).inside(x, y, z)
    hu[body] = -90.0  # subcutaneous fat
    hu[body & inner] = 45.0  # muscle / soft tissue
    s = anatomy.structures
    hu[s["Bladder"].inside(x, y, z) & body] = 12.0
    hu[s["Prostate"].inside(x, y, z) & body] = 40.0
    hu[s["Rectum"].inside(x, y, z) & body] = 35.0
    if "Bowel" in s:
        bowel = s["Bowel"].inside(x, y, z) & body
        hu[bowel] = 25.0
    for bone in anatomy.bones:
        inside = bone.inside(x, y, z) & body
        hu[inside] = 650.0
    if anatomy.rectal_gas is not None:
        hu[anatomy.rectal_gas.inside(x, y, z) & body] = -750.0
    hu = hu + rng.normal(0.0, noise_hu, size=hu.shape).astype(np.float32) * body
    return hu


# -------------------------------------------------------------------------------------------- contours
def plane_contours(solid, z_mm: float, resolution_mm: float = 0.5, pad_mm: float = 2.0) -> list[np.ndarray]:
    """Closed planar contours (each (N, 3) xyz mm) of ``solid`` on the plane z = ``z_mm``.

    The solid is sampled on a ``resolution_mm`` grid over its bounding box; cv2.findContours (RETR_CCOMP)
    returns outer borders and hole borders as separate polygons, which DICOM combines by XOR.
    """
    import cv2

    lo, hi = solid.bbox()
    if not (lo[2] - 1e-6 <= z_mm <= hi[2] + 1e-6):
        return []
    xs = np.arange(lo[0] - pad_mm, hi[0] + pad_mm + resolution_mm, resolution_mm)
    ys = np.arange(lo[1] - pad_mm, hi[1] + pad_mm + resolution_mm, resolution_mm)
    gx, gy = np.meshgrid(xs, ys)  # rows follow y, columns x
    # Traced polygons run through the centres of border samples, half a sample inside the sampled set;
    # sampling the solid grown by half a sample (an approximate offset for these shapes) removes that bias.
    mask = solid.inside(gx, gy, np.full_like(gx, z_mm), 0.5 * resolution_mm).astype(np.uint8)
    if not mask.any():
        return []
    found = cv2.findContours(mask, cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    contours = found[-2]
    out = []
    for contour in contours:
        pts = contour.reshape(-1, 2).astype(np.float64)
        if len(pts) < 3:
            continue
        world = np.column_stack([xs[0] + pts[:, 0] * resolution_mm, ys[0] + pts[:, 1] * resolution_mm,
                                 np.full(len(pts), z_mm)])
        out.append(world)
    return out
