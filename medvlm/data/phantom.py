"""Synthetic head-and-neck CT phantom: anatomy, disease drawn from a clinical record, RT structures.

Geometry is defined in millimetres in a patient frame (x to the patient's right, y anterior, z superior:
RAS), so any grid and spacing can be sampled. Case ``i`` under seed ``s`` depends only on ``(s, i)``.
No library draws anatomical phantoms with radiotherapy structures, so this is written here.
"""
from __future__ import annotations

import datetime as dt
import math
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
from scipy import ndimage

from medvlm.data.clinical import DiseasePlan, NodePlan, elective_levels, sample_record
from medvlm.vocabulary import LATERAL_SUBSITES, ClinicalRecord
from medvlm.data.identifiers import SyntheticIdentity, sample_identity
from medvlm.data.reports import Report, render_report
from medvlm.vocabulary import NODE_MARGIN_MM, STRUCTURE_NAMES

HU_AIR, HU_FAT, HU_MUSCLE, HU_CSF, HU_CORD, HU_BRAIN = -1000.0, -100.0, 40.0, 8.0, 35.0, 37.0
HU_PAROTID, HU_THYROID, HU_CARTILAGE, HU_VESSEL, HU_VEIN = 10.0, 95.0, 200.0, 165.0, 145.0
HU_CANCELLOUS, HU_CORTICAL, HU_TOOTH, HU_DISC = 380.0, 1100.0, 1500.0, 85.0
HU_MIN, HU_MAX = -1024.0, 3071.0

# Neck-level regions (elliptic cylinders in the patient frame; sigma = +1 right, -1 left):
# (centre x magnitude, centre y, semi-axis x, semi-axis y, z low, z high), millimetres.
LEVEL_GEOMETRY_MM = {
    "Ib": (22.0, 34.0, 12.0, 11.0, 8.0, 24.0),
    "II": (32.0, -4.0, 13.0, 15.0, 4.0, 44.0),
    "III": (30.0, 0.0, 12.0, 13.0, -22.0, 4.0),
    "IV": (26.0, 4.0, 12.0, 12.0, -50.0, -22.0),
}
# Primary-tumour centres per subsite (x magnitude towards the tumour side, y, z), millimetres.
PRIMARY_CENTRE_MM = {
    "oral tongue": (15.0, 32.0, 28.0),
    "tonsil": (20.0, 10.0, 34.0),
    "base of tongue": (0.0, 20.0, 18.0),
    "larynx": (0.0, 24.0, -18.0),
    "hypopharynx": (14.0, 12.0, -8.0),
    "nasopharynx": (0.0, 12.0, 68.0),
}
# Where a T4 tumour moves to reach the neighbour it invades.
T4_CENTRE_MM = {
    "mandible": (28.0, 40.0, 24.0),
    "midline": (7.0, 14.0, 30.0),
    "cartilage": (10.0, 28.0, -16.0),
    "skull base": (0.0, 6.0, 76.0),
}


@dataclass
class PhantomConfig:
    """Grid and variability of the phantom. ``shape``/``spacing_mm`` are along x (R), y (A), z (S)."""

    shape: tuple[int, int, int] = (64, 64, 64)
    spacing_mm: tuple[float, float, float] = (3.0, 3.0, 3.0)
    scale_range: tuple[float, float] = (0.93, 1.07)
    neck_length_range: tuple[float, float] = (0.94, 1.06)
    shift_mm: float = 6.0
    rotation_deg: float = 4.0
    noise_sigma_hu: tuple[float, float] = (10.0, 25.0)
    bias_field_hu: float = 20.0
    dental_streak_probability: float = 0.35
    structure_size_range: tuple[float, float] = (0.9, 1.1)

    def __post_init__(self) -> None:
        from medvlm.errors import ConfigError

        self.shape = tuple(int(v) for v in self.shape)  # type: ignore[assignment]
        self.spacing_mm = tuple(float(v) for v in self.spacing_mm)  # type: ignore[assignment]
        if len(self.shape) != 3 or min(self.shape) < 8:
            raise ConfigError(f"phantom shape must be three sizes >= 8 voxels, got {self.shape}")
        if len(self.spacing_mm) != 3 or min(self.spacing_mm) <= 0 or not all(map(math.isfinite, self.spacing_mm)):
            raise ConfigError(f"phantom spacing_mm must be three positive numbers, got {self.spacing_mm}")


@dataclass
class PhantomCase:
    """One generated case: HU volume, multi-label masks, affine, clinical record and report."""

    case_id: str
    index: int
    image_hu: np.ndarray  # float32 (X, Y, Z), Hounsfield units
    labels: np.ndarray  # uint8 (C, X, Y, Z), one binary channel per structure
    affine: np.ndarray  # 4x4 voxel -> RAS millimetres
    record: ClinicalRecord
    plan: DiseasePlan
    identity: SyntheticIdentity
    report: Report
    label_names: tuple[str, ...] = STRUCTURE_NAMES
    meta: dict = field(default_factory=dict)

    @property
    def spacing_mm(self) -> tuple[float, float, float]:
        return tuple(float(v) for v in np.linalg.norm(self.affine[:3, :3], axis=0))  # type: ignore[return-value]

    def mask(self, name: str) -> np.ndarray:
        """Boolean mask of one structure by its TG-263 name."""
        return self.labels[self.label_names.index(name)].astype(bool)


def _rotation(rx: float, ry: float, rz: float) -> np.ndarray:
    cx, sx, cy, sy, cz, sz = math.cos(rx), math.sin(rx), math.cos(ry), math.sin(ry), math.cos(rz), math.sin(rz)
    r_x = np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
    r_y = np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    r_z = np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
    return r_z @ r_y @ r_x


class _Grid:
    """Voxel grid with patient-frame ("local") coordinates, and boxes of voxels around local regions.

    Primitives are evaluated only inside their bounding box so a case costs milliseconds.
    """

    def __init__(self, shape: Sequence[int], spacing_mm: Sequence[float], local_from_world: np.ndarray):
        self.shape = tuple(shape)
        self.spacing_mm = tuple(float(v) for v in spacing_mm)
        spacing = np.asarray(spacing_mm, dtype=np.float64)
        origin = -(np.asarray(shape) - 1) / 2.0 * spacing  # grid centred on the world origin
        self.affine = np.eye(4)
        self.affine[:3, :3] = np.diag(spacing)
        self.affine[:3, 3] = origin
        local_from_voxel = local_from_world @ self.affine
        self.voxel_from_local = np.linalg.inv(local_from_voxel)
        idx = [np.arange(n, dtype=np.float32) for n in shape]
        ii, jj, kk = np.meshgrid(*idx, indexing="ij")
        m = local_from_voxel.astype(np.float32)
        self.x = m[0, 0] * ii + m[0, 1] * jj + m[0, 2] * kk + m[0, 3]
        self.y = m[1, 0] * ii + m[1, 1] * jj + m[1, 2] * kk + m[1, 3]
        self.z = m[2, 0] * ii + m[2, 1] * jj + m[2, 2] * kk + m[2, 3]

    def box(self, lo: Sequence[float], hi: Sequence[float]) -> tuple[slice, slice, slice] | None:
        corners = np.array([[a, b, c, 1.0] for a in (lo[0], hi[0]) for b in (lo[1], hi[1]) for c in (lo[2], hi[2])])
        vox = (self.voxel_from_local @ corners.T)[:3]
        start = np.maximum(np.floor(vox.min(axis=1)).astype(int) - 1, 0)
        stop = np.minimum(np.ceil(vox.max(axis=1)).astype(int) + 2, self.shape)
        if np.any(stop <= start):
            return None
        return tuple(slice(int(a), int(b)) for a, b in zip(start, stop))  # type: ignore[return-value]

    def coords(self, box):
        return self.x[box], self.y[box], self.z[box]


class _EmptyMasks(dict):
    """Named masks; a structure outside the field of view is an empty mask, not a missing key."""

    def __init__(self, shape):
        super().__init__()
        self.shape = shape

    def __missing__(self, name: str) -> np.ndarray:
        self[name] = np.zeros(self.shape, dtype=bool)
        return self[name]


class _Canvas:
    """HU image plus named masks, painted primitive by primitive in anatomical order."""

    def __init__(self, grid: _Grid):
        self.grid = grid
        self.image = np.full(grid.shape, HU_AIR, dtype=np.float32)
        self.masks: dict[str, np.ndarray] = _EmptyMasks(grid.shape)

    def mask(self, name: str) -> np.ndarray:
        return self.masks[name]

    def ellipsoid(self, centre, semi, *, jitter_fn=None) -> tuple[tuple[slice, ...], np.ndarray] | None:
        lo = [c - s * 1.3 for c, s in zip(centre, semi)]
        hi = [c + s * 1.3 for c, s in zip(centre, semi)]
        box = self.grid.box(lo, hi)
        if box is None:
            return None
        x, y, z = self.grid.coords(box)
        dx, dy, dz = (x - centre[0]) / semi[0], (y - centre[1]) / semi[1], (z - centre[2]) / semi[2]
        r2 = dx * dx + dy * dy + dz * dz
        if jitter_fn is None:
            return box, r2 <= 1.0
        r = np.sqrt(r2) + 1e-6
        return box, r <= 1.0 + jitter_fn(dx / r, dy / r, dz / r)

    def cylinder(self, centre_xy, semi_xy, z_range, *, centre_fn=None) -> tuple[tuple[slice, ...], np.ndarray] | None:
        """Elliptic cylinder along z; ``centre_fn(z) -> (cx, cy)`` lets it curve with height."""
        reach = max(semi_xy) + (12.0 if centre_fn is not None else 0.0)
        lo = [centre_xy[0] - reach, centre_xy[1] - reach, z_range[0]]
        hi = [centre_xy[0] + reach, centre_xy[1] + reach, z_range[1]]
        box = self.grid.box(lo, hi)
        if box is None:
            return None
        x, y, z = self.grid.coords(box)
        cx, cy = centre_fn(z) if centre_fn is not None else centre_xy
        inside = ((x - cx) / semi_xy[0]) ** 2 + ((y - cy) / semi_xy[1]) ** 2 <= 1.0
        return box, inside & (z >= z_range[0]) & (z <= z_range[1])

    def paint(self, region, value: float | np.ndarray | None, *, mask: str | None = None, only=None, protect=None):
        """Set HU (``value``) and/or add to ``mask`` where ``region`` holds, optionally restricted by
        ``only`` (full-size bool) and never over ``protect`` (full-size bool)."""
        if region is None:
            return
        box, inside = region
        if only is not None:
            inside = inside & only[box]
        if protect is not None:
            inside = inside & ~protect[box]
        if value is not None:
            view = self.image[box]
            view[inside] = value if np.isscalar(value) else value[box][inside]
        if mask is not None:
            self.mask(mask)[box] |= inside

    def full(self, region) -> np.ndarray:
        out = np.zeros(self.grid.shape, dtype=bool)
        if region is not None:
            out[region[0]] = region[1]
        return out


def _lobulation(rng: np.random.Generator, amplitude: float, lobes: int = 4):
    """A smooth random radial modulation on the unit sphere: irregular, lobulated tumour outlines."""
    directions = rng.normal(size=(lobes, 3))
    directions /= np.linalg.norm(directions, axis=1, keepdims=True)
    weights = rng.uniform(0.5, 1.0, size=lobes)
    weights /= weights.sum()
    frequencies = rng.uniform(1.5, 3.0, size=lobes)
    phases = rng.uniform(0, 2 * math.pi, size=lobes)

    def modulation(ux, uy, uz):
        total = 0.0
        for d, w, f, p in zip(directions, weights, frequencies, phases):
            total = total + w * np.cos(f * (d[0] * ux + d[1] * uy + d[2] * uz) * math.pi + p)
        return amplitude * total

    return modulation


def _sized_region(canvas: "_Canvas", centre, semi: np.ndarray, lobes, allowed: np.ndarray, target_mm: float) -> np.ndarray:
    """A lobulated region inside ``allowed`` whose measured greatest dimension matches ``target_mm``.

    Lobulation and clipping change the extent, so the semi-axes are rescaled until the measurement
    (what a radiologist reports, and what T/N stage depends on) agrees within half a voxel.
    """
    spacing = canvas.grid.spacing_mm
    region = np.zeros(canvas.grid.shape, dtype=bool)
    for _ in range(5):
        region = canvas.full(canvas.ellipsoid(centre, semi, jitter_fn=lobes)) & allowed
        components, count = ndimage.label(region)
        if count > 1:  # clipping by bone or air split it: one lesion is one connected piece
            region = components == (np.argmax(np.bincount(components.ravel())[1:]) + 1)
        measured = greatest_dimension_mm(region, spacing)
        if measured == 0 or abs(measured - target_mm) <= min(spacing) / 2:
            break
        semi = semi * (target_mm / measured)
    return region


def greatest_dimension_mm(mask: np.ndarray, spacing_mm: Sequence[float]) -> float:
    """Largest edge-to-edge extent of a mask along the grid axes, in millimetres (0 for an empty mask)."""
    if not mask.any():
        return 0.0
    extents = []
    for axis, spacing in enumerate(spacing_mm):
        other = tuple(a for a in range(mask.ndim) if a != axis)
        present = np.flatnonzero(mask.any(axis=other))
        extents.append((present[-1] - present[0] + 1) * spacing)
    return float(max(extents))


class HNCPhantom:
    """Generator of synthetic head-and-neck CT cases.

    Example:
        >>> phantom = HNCPhantom(PhantomConfig(shape=(64, 64, 64)), seed=0)
        >>> case = phantom.case(3)          # identical on every run and machine
        >>> case.image_hu.shape, case.labels.shape
        ((64, 64, 64), (9, 64, 64, 64))
    """

    def __init__(self, config: PhantomConfig | None = None, seed: int = 0):
        self.config = config or PhantomConfig()
        self.seed = int(seed)

    def _streams(self, index: int) -> dict[str, np.random.Generator]:
        # Independent streams per aspect, so changing e.g. the noise model leaves anatomy unchanged.
        names = ("record", "identity", "anatomy", "disease", "noise", "report")
        children = np.random.SeedSequence([self.seed, int(index)]).spawn(len(names))
        return {name: np.random.Generator(np.random.PCG64(child)) for name, child in zip(names, children)}

    def case(self, index: int, *, report_family: str = "train") -> PhantomCase:
        """Generate case ``index`` (0-based); ``report_family`` is ``"train"`` or ``"heldout"`` phrasing."""
        rng = self._streams(index)
        identity = sample_identity(rng["identity"])
        record, plan = sample_record(rng["record"], number=index + 1, unit_no=identity.unit_no)
        # The record decides age; the identity's date of birth follows it so the report is consistent.
        identity.date_of_birth = identity.exam_date - dt.timedelta(days=int(plan.age_years * 365.25 + rng["identity"].integers(1, 360)))
        plan.sex = identity.sex
        image, masks, affine, meta = self._draw(record, plan, rng["anatomy"], rng["disease"], rng["noise"])
        report = render_report(record, plan, identity, rng["report"], family=report_family, measurements=meta)
        labels = np.stack([masks.get(name, np.zeros(image.shape, bool)) for name in STRUCTURE_NAMES]).astype(np.uint8)
        return PhantomCase(
            case_id=f"hnc_{index + 1:04d}", index=index, image_hu=image, labels=labels, affine=affine,
            record=record, plan=plan, identity=identity, report=report, meta=meta,
        )

    def record_and_report(self, index: int, *, report_family: str = "train") -> tuple[ClinicalRecord, Report]:
        """Case ``index``'s record and a report, without drawing the volume (fast; for text work).

        The report quotes planned sizes instead of sizes measured on the drawn masks, so its numbers can
        differ by a few millimetres from :meth:`case`'s report; identifiers and clinical fields are equal.
        """
        rng = self._streams(index)
        identity = sample_identity(rng["identity"])
        record, plan = sample_record(rng["record"], number=index + 1, unit_no=identity.unit_no)
        identity.date_of_birth = identity.exam_date - dt.timedelta(days=int(plan.age_years * 365.25 + rng["identity"].integers(1, 360)))
        plan.sex = identity.sex
        return record, render_report(record, plan, identity, rng["report"], family=report_family)

    # ------------------------------------------------------------------ drawing
    def _draw(self, record: ClinicalRecord, plan: DiseasePlan, rng: np.random.Generator,
              disease_rng: np.random.Generator, noise_rng: np.random.Generator):
        cfg = self.config
        scale = rng.uniform(*cfg.scale_range)
        neck_length = rng.uniform(*cfg.neck_length_range)
        shift = rng.uniform(-cfg.shift_mm, cfg.shift_mm, size=3)
        angles = np.radians(rng.uniform(-cfg.rotation_deg, cfg.rotation_deg, size=3))
        size = lambda: rng.uniform(*cfg.structure_size_range)  # noqa: E731 - per-structure size factor

        # world = R @ diag(scale, scale, scale * neck_length) @ local + shift
        world_from_local = np.eye(4)
        world_from_local[:3, :3] = _rotation(*angles) @ np.diag([scale, scale, scale * neck_length])
        world_from_local[:3, 3] = shift
        grid = _Grid(cfg.shape, cfg.spacing_mm, np.linalg.inv(world_from_local))
        canvas = _Canvas(grid)
        side_sign = {"right": 1.0, "left": -1.0}

        nodes = self._place_nodes(plan.nodes, disease_rng) if not record.postoperative else []

        # Body outline: face/mandible level above, neck below, shoulders at the bottom; nodes bulge it.
        def body_centre(z):
            t = np.clip((z + 5.0) / 20.0, 0.0, 1.0)
            t = t * t * (3 - 2 * t)
            return 0.0 * z, 6.0 * t

        def body_semi(z):
            t = np.clip((z + 5.0) / 20.0, 0.0, 1.0)
            t = t * t * (3 - 2 * t)
            shoulders = np.maximum(0.0, -70.0 - z) * 1.0
            return 58.0 + 8.0 * t + shoulders, 55.0 + 13.0 * t

        x, y, z = grid.x, grid.y, grid.z
        bx, by = body_centre(z)
        sx, sy = body_semi(z)
        body = ((x - bx) / sx) ** 2 + ((y - by) / sy) ** 2 <= 1.0
        fat_mm = rng.uniform(4.0, 8.0)
        inner = ((x - bx) / (sx - fat_mm)) ** 2 + ((y - by) / (sy - fat_mm)) ** 2 <= 1.0
        for node in nodes:
            if node["size_mm"] > 40:
                bulge = canvas.ellipsoid(node["centre"], [s + fat_mm + 4 for s in node["semi"]])
                canvas.paint(bulge, None, mask="_bulge")
        if canvas.masks["_bulge"].any():
            body |= canvas.masks["_bulge"]
            inner |= canvas.masks["_bulge"] & ~ndimage.binary_erosion(body, iterations=2)
        canvas.image[body] = HU_FAT
        canvas.image[inner] = HU_MUSCLE
        canvas.masks["_body"] = body

        # Muscles with fat planes: sternocleidomastoids run from mastoid (back, up) to sternum (front, down).
        for sigma in (1.0, -1.0):
            def scm_centre(zz, sigma=sigma):
                u = (60.0 - zz) / 150.0
                return sigma * (52.0 - 37.0 * u), -8.0 + 43.0 * u
            canvas.paint(canvas.cylinder((sigma * 40, 10), (9.5, 7.5), (-96, 62), centre_fn=scm_centre), HU_FAT + 20, only=inner)
            canvas.paint(canvas.cylinder((sigma * 40, 10), (7.0, 5.0), (-96, 60), centre_fn=scm_centre), HU_MUSCLE + 5, only=inner)
            # parapharyngeal fat pad
            canvas.paint(canvas.ellipsoid((sigma * 24, 4, 40), (5, 7, 12)), HU_FAT, only=inner)

        # Parotid glands (Parotid_R on +x), fatty glandular tissue.
        for name, sigma in (("Parotid_R", 1.0), ("Parotid_L", -1.0)):
            s = size()
            region = canvas.ellipsoid((sigma * 49, -14, 46), (10 * s, 14 * s, 15 * s))
            canvas.paint(region, HU_PAROTID + rng.uniform(-8, 8), mask=name, only=inner)

        # Thyroid gland lobes and isthmus.
        for sigma in (1.0, -1.0):
            canvas.paint(canvas.ellipsoid((sigma * 15, 26, -52), (7, 9, 12)), HU_THYROID)
        canvas.paint(canvas.ellipsoid((0, 33, -54), (10, 4, 5)), HU_THYROID)

        # Carotid arteries and jugular veins (contrast enhanced).
        for sigma in (1.0, -1.0):
            canvas.paint(canvas.cylinder((sigma * 22, 4), (3.5, 3.5), (-96, 70), centre_fn=lambda zz, s=sigma: (s * (22 - 0.03 * zz), 4 - 0.03 * zz)), HU_VESSEL, mask="_vessel")
            canvas.paint(canvas.cylinder((sigma * 31, -2), (5.5, 5.0), (-96, 70), centre_fn=lambda zz, s=sigma: (s * (31 + 0.04 * zz), -2 - 0.05 * zz)), HU_VEIN, mask="_vessel")

        # Cervical spine: bodies with discs, posterior arch, canal with CSF and spinal cord.
        period = 18.0
        for k, z_top in enumerate(np.arange(62.0, -110.0, -period)):
            z_lo, z_hi = z_top - period + 4.0, z_top
            canvas.paint(canvas.cylinder((0, -8), (10.5, 8.5), (z_lo, z_hi)), HU_CORTICAL, mask="_bone")
            canvas.paint(canvas.cylinder((0, -8), (8.0, 6.0), (z_lo + 1.5, z_hi - 1.5)), HU_CANCELLOUS + rng.uniform(-60, 60))
            canvas.paint(canvas.cylinder((0, -8), (10.0, 8.0), (z_top - period, z_lo)), HU_DISC)
            canvas.paint(canvas.cylinder((0, -27), (11.5, 11.5), (z_lo, z_hi)), HU_CORTICAL * 0.7, mask="_bone")
            spinous = canvas.grid.box((-3, -48, z_lo), (3, -36, z_hi))
            if spinous is not None:
                canvas.paint((spinous, np.ones(tuple(s.stop - s.start for s in spinous), bool)), HU_CORTICAL * 0.75, mask="_bone", only=inner)
        canal = canvas.cylinder((0, -27), (7.5, 7.5), (-110, 76))
        canvas.paint(canal, HU_CSF, mask="_canal")
        canvas.masks["_bone"] &= ~canvas.masks["_canal"]
        cord = canvas.cylinder((0, -27), (4.5 * size(), 4.0), (-110, 75))
        canvas.paint(cord, HU_CORD, mask="SpinalCord")

        # Skull base above the foramen magnum (z > 75 mm): posterior fossa in an occipital shell, clivus
        # in front of the brainstem. The brainstem continues the cord upwards.
        fossa_outer = canvas.full(canvas.cylinder((0, -30), (42, 34), (75, 200))) & (grid.y < -4)
        fossa_inner = canvas.full(canvas.cylinder((0, -30), (37, 29), (78, 200)))
        foramen = canvas.full(canvas.cylinder((0, -27), (9, 9), (70, 80)))
        shell = fossa_outer & ~fossa_inner & ~foramen & body
        canvas.image[shell] = HU_CORTICAL * 0.85
        canvas.masks["_bone"] |= shell
        canvas.image[fossa_inner & fossa_outer & body] = HU_BRAIN
        canvas.paint(canvas.cylinder((0, -6), (10, 5), (62, 200)), HU_CORTICAL * 0.75, mask="_bone")
        s = size()
        brainstem = canvas.ellipsoid((0, -24, 96), (11 * s, 10 * s, 22))
        canvas.paint(brainstem, HU_CORD, mask="Brainstem", only=canvas.full(canvas.cylinder((0, -24), (30, 30), (75.5, 200))))
        canvas.masks["_bone"] &= ~canvas.masks["Brainstem"]

        # Mandible: U-shaped body plus rami, cortical shell around cancellous bone; teeth on the ridge.
        chin_y, angle_x, angle_y = 58.0 * size(), 46.0, 2.0
        k = (chin_y - angle_y) / angle_x**2
        box = grid.box((-angle_x - 8, angle_y - 10, 10), (angle_x + 8, chin_y + 8, 62))
        mx, my, mz = grid.coords(box)
        arc_distance = np.abs(my - (chin_y - k * mx**2)) / np.sqrt(1 + (2 * k * mx) ** 2)
        mandible_body = (arc_distance <= 4.5) & (np.abs(mx) <= angle_x) & (mz >= 12) & (mz <= 31)
        ramus = np.zeros_like(mandible_body)
        for sigma in (1.0, -1.0):
            ramus |= (((mx - sigma * 46) / 4.5) ** 2 + ((my - 0.0) / 9.0) ** 2 <= 1.0) & (mz >= 14) & (mz <= 58)
        mandible = mandible_body | ramus
        cancellous = ((arc_distance <= 2.0) & (np.abs(mx) <= angle_x - 2) & (mz >= 14) & (mz <= 29))
        canvas.paint((box, mandible), HU_CORTICAL, mask="Bone_Mandible")
        canvas.paint((box, cancellous), HU_CANCELLOUS + 60)
        teeth_lower = (np.abs(my - (chin_y - 3 - k * mx**2)) <= 3.0) & (np.abs(mx) <= angle_x - 10) & (mz > 31) & (mz <= 38)
        teeth_upper = (np.abs(my - (chin_y - 3 - k * mx**2)) <= 3.0) & (np.abs(mx) <= angle_x - 10) & (mz > 39) & (mz <= 46)
        canvas.paint((box, teeth_lower | teeth_upper), HU_TOOTH, mask="_teeth")
        canvas.masks["_bone"] |= canvas.masks["Bone_Mandible"] | canvas.masks["_teeth"]
        # Hyoid bone.
        canvas.paint(canvas.cylinder((0, 30), (16, 8), (2, 7)), HU_CANCELLOUS + 100, mask="_bone",
                     only=canvas.full(canvas.cylinder((0, 30), (16, 8), (2, 7))) & ~canvas.full(canvas.cylinder((0, 28), (13, 5.5), (0, 9))))

        # Larynx with thyroid/cricoid cartilage; airway from nasopharynx to trachea.
        larynx_region = canvas.cylinder((0, 24), (17 * size(), 14), (-38, -2))
        canvas.paint(larynx_region, HU_MUSCLE + 5, mask="Larynx")
        thyroid_cartilage = canvas.full(canvas.cylinder((0, 24), (17, 14), (-30, -6))) & ~canvas.full(canvas.cylinder((0, 24), (14, 11), (-40, 0)))
        thyroid_cartilage &= grid.y > 20
        canvas.image[thyroid_cartilage] = HU_CARTILAGE
        canvas.paint(canvas.cylinder((0, 24), (12, 11), (-38, -30)), HU_CARTILAGE,
                     only=~canvas.full(canvas.cylinder((0, 24), (9, 8), (-40, -28))))
        canvas.masks["_cartilage"] = thyroid_cartilage
        airway_parts = [
            canvas.cylinder((0, 14), (11, 7), (55, 75)),  # nasopharynx
            canvas.cylinder((0, 8), (9, 6), (12, 55)),  # oropharynx
            canvas.cylinder((0, 12), (10, 5), (-5, 12)),  # laryngopharynx
            canvas.cylinder((0, 24), (5, 7), (-35, -5)),  # laryngeal vestibule / glottis
            canvas.cylinder((0, 26), (9, 8), (-140, -35)),  # trachea
        ]
        for sigma in (1.0, -1.0):
            airway_parts.append(canvas.cylinder((sigma * 13, 12), (3.5, 4.0), (-20, 0)))  # piriform sinuses
        canvas.paint(canvas.cylinder((0, 26), (11, 10), (-140, -35)), HU_CARTILAGE - 50)  # tracheal rings
        for part in airway_parts:
            canvas.paint(part, HU_AIR, mask="_airway")

        # Normal small lymph nodes along the jugular chain (not GTV).
        dissected = record.postoperative
        for sigma in (1.0, -1.0):
            for _ in range(0 if dissected else int(rng.integers(2, 5))):
                level = LEVEL_GEOMETRY_MM[("II", "III", "IV")[int(rng.integers(0, 3))]]
                centre = (sigma * (level[0] + rng.uniform(-6, 6)), level[1] + rng.uniform(-6, 6), rng.uniform(level[4], level[5]))
                r = rng.uniform(2.5, 4.0)
                canvas.paint(canvas.ellipsoid(centre, (r, r, r * 1.4)), HU_MUSCLE - 5, only=inner, protect=canvas.masks["_bone"])

        # Disease: primary tumour (or postoperative bed) and involved nodes.
        bone = canvas.masks["_bone"]
        meta: dict = {"scale": float(scale), "neck_length": float(neck_length), "shift_mm": [float(v) for v in shift],
                      "rotation_deg": [float(math.degrees(a)) for a in angles]}
        sigma_primary = side_sign.get(record.laterality, 0.0)
        if record.subsite not in LATERAL_SUBSITES:
            sigma_primary = 0.0
        centre = PRIMARY_CENTRE_MM[record.subsite]
        if plan.t4_invasion:
            centre = T4_CENTRE_MM[plan.t4_invasion] if plan.t4_invasion != "midline" or sigma_primary else (0.0, 20.0, 20.0)
        centre = (sigma_primary * centre[0] + disease_rng.uniform(-2, 2) * (sigma_primary != 0),
                  centre[1] + disease_rng.uniform(-2, 2), centre[2] + disease_rng.uniform(-3, 3))
        amplitude = 0.12
        elongation = disease_rng.uniform(0.7, 0.95, size=2)
        semi_unit = np.array([1.0, elongation[0], elongation[1]])[disease_rng.permutation(3)]
        # Local mm are scaled by the case's global scale in the world: size the tumour in world mm.
        semi = semi_unit * plan.tumour_size_mm / 2.0 / (1.0 + amplitude) / scale
        lobes = _lobulation(disease_rng, amplitude)
        if record.postoperative:
            bed = canvas.ellipsoid(centre, semi * 0.8, jitter_fn=lobes)
            canvas.paint(bed, HU_FAT + 50, only=body, protect=bone)
            meta["primary_greatest_dimension_mm"] = 0.0
        else:
            invades_bone = plan.t4_invasion in ("mandible", "cartilage", "skull base")
            allowed = body if invades_bone else body & ~bone
            # Lobulation and clipping change the extent: rescale until the measured greatest dimension
            # (what a radiologist reports, and what T stage depends on) matches the planned size.
            tumour = _sized_region(canvas, centre, semi, lobes, allowed, plan.tumour_size_mm)
            tumour_hu = HU_MUSCLE + disease_rng.uniform(15.0, 40.0)
            # the mass may bulge into the airway lumen next to it, never outside the body
            canvas.image[tumour] = tumour_hu
            canvas.masks["GTVp"] = tumour
            meta["primary_greatest_dimension_mm"] = greatest_dimension_mm(tumour, cfg.spacing_mm)
            meta["primary_invades_bone"] = bool(invades_bone and (tumour & bone).any())
        node_sizes = []
        node_allowed = body & ~bone & ~canvas.masks["_airway"]
        for node in nodes:
            lobes_n = _lobulation(disease_rng, 0.05, lobes=3)
            node_mask = _sized_region(canvas, node["centre"], np.asarray(node["semi"]), lobes_n, node_allowed, node["size_mm"])
            canvas.image[node_mask] = HU_MUSCLE + disease_rng.uniform(15.0, 35.0)
            canvas.mask("GTVn")[node_mask] = True
            if node["necrotic"]:
                canvas.paint(canvas.ellipsoid(node["centre"], [s * 0.5 for s in node["semi"]]), HU_CSF + 5, only=node_mask)
            node_sizes.append(greatest_dimension_mm(node_mask, cfg.spacing_mm))
        meta["node_sizes_mm"] = node_sizes
        meta["node_sides"] = [node["side"] for node in nodes]

        # Elective nodal target: selected levels on the decided side(s), plus involved nodes + 5 mm.
        ctv = np.zeros(grid.shape, dtype=bool)
        for side, levels in elective_levels(record).items():
            sigma = side_sign[side]
            for level in levels:
                cx, cy, ax, ay, z_lo, z_hi = LEVEL_GEOMETRY_MM[level]
                region = canvas.cylinder((sigma * cx, cy), (ax, ay), (z_lo, z_hi))
                if region is not None:
                    ctv[region[0]] |= region[1]
        gtvn = canvas.mask("GTVn")
        if gtvn.any():
            distance_mm = ndimage.distance_transform_edt(~gtvn, sampling=cfg.spacing_mm)
            ctv |= distance_mm <= NODE_MARGIN_MM
        ctv &= body & ~bone & ~canvas.masks["_airway"]
        ctv |= gtvn
        canvas.masks["CTVn"] = ctv
        meta["ctvn_sides"] = sorted(elective_levels(record))

        # Organ masks never include bone or air that was painted over them afterwards.
        canvas.masks["Parotid_R"] = canvas.mask("Parotid_R") & ~bone
        canvas.masks["Parotid_L"] = canvas.mask("Parotid_L") & ~bone

        image = canvas.image
        # Smooth bias field inside the body (beam hardening / cupping-like), then dental streaks, then noise.
        phases = noise_rng.uniform(0, 2 * math.pi, size=3)
        freqs = noise_rng.uniform(0.008, 0.02, size=3)
        bias = (np.cos(freqs[0] * grid.x + phases[0]) + np.cos(freqs[1] * grid.y + phases[1]) + np.cos(freqs[2] * grid.z + phases[2])) / 3.0
        image += (cfg.bias_field_hu * bias * body).astype(np.float32)
        if noise_rng.random() < cfg.dental_streak_probability:
            teeth = canvas.masks["_teeth"]
            if teeth.any():
                add_dental_streaks(image, teeth, noise_rng)
                meta["dental_streaks"] = True
        sigma_noise = noise_rng.uniform(*cfg.noise_sigma_hu)
        image += noise_rng.standard_normal(grid.shape, dtype=np.float32) * np.float32(sigma_noise)
        np.clip(image, HU_MIN, HU_MAX, out=image)
        meta["noise_sigma_hu"] = float(sigma_noise)
        masks = {name: canvas.masks[name] for name in STRUCTURE_NAMES}
        return np.round(image).astype(np.float32), masks, grid.affine, meta

    def _place_nodes(self, nodes: Sequence[NodePlan], rng: np.random.Generator) -> list[dict]:
        placed = []
        used: dict[tuple[str, str], int] = {}
        for node in nodes:
            cx, cy, ax, ay, z_lo, z_hi = LEVEL_GEOMETRY_MM[node.level]
            sigma = 1.0 if node.side == "right" else -1.0
            count = used.get((node.side, node.level), 0)
            used[(node.side, node.level)] = count + 1
            radius = node.size_mm / 2.0
            z_mid = (z_lo + z_hi) / 2.0 + (count * 16.0 - 8.0 * (count > 0))
            if radius > 25:  # N3 masses extend beyond one level
                z_mid = (z_lo + z_hi) / 2.0 - 6.0
            semi = [radius * rng.uniform(0.75, 0.9), radius * rng.uniform(0.75, 0.9), radius]
            semi = [s / 1.05 for s in semi]
            centre = (sigma * (cx + rng.uniform(-3, 3) + max(0.0, radius - 12) * 0.35), cy + rng.uniform(-3, 3), z_mid + rng.uniform(-3, 3))
            placed.append({"centre": centre, "semi": semi, "size_mm": node.size_mm, "necrotic": node.necrotic, "side": node.side})
        return placed


def add_dental_streaks(image: np.ndarray, teeth: np.ndarray, rng: np.random.Generator, amplitude: float | None = None) -> None:
    """Metal/dental streaks, in place: alternating bright and dark rays from the teeth in the axial slices
    they occupy. ``amplitude`` (HU) defaults to a draw from the phantom's 150-400 HU."""
    slices = np.flatnonzero(teeth.any(axis=(0, 1)))
    count = int(rng.integers(6, 14))
    drawn = rng.uniform(150.0, 400.0)  # drawn either way: the phantom's random stream does not depend on ``amplitude``
    amplitude = drawn if amplitude is None else float(amplitude)
    phase = rng.uniform(0, 2 * math.pi)
    for k in slices:
        pts = np.argwhere(teeth[:, :, k])
        if len(pts) == 0:
            continue
        ci, cj = pts.mean(axis=0)
        ii, jj = np.meshgrid(np.arange(image.shape[0]), np.arange(image.shape[1]), indexing="ij")
        angle = np.arctan2(jj - cj, ii - ci)
        distance = np.hypot(ii - ci, jj - cj) + 1.0
        rays = np.cos(count * angle + phase) ** 15 - np.cos(count * angle + phase + math.pi / 2) ** 15
        image[:, :, k] += (amplitude * rays * np.exp(-distance / (image.shape[0] / 4))).astype(np.float32) * (image[:, :, k] > -500)
