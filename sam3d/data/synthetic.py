"""Seeded synthetic head-CT phantoms with intracranial haemorrhage (ICH) and voxel masks.

Why this exists: head CT with voxel-level ICH masks is scarce and cannot be shipped with an
open-source toolkit, yet every stage of the SAM-Med3D pipeline (loading, fine-tuning, evaluation,
report generation) needs inputs that look and behave like the real thing. These phantoms reproduce
what matters to those stages: Hounsfield units of the right tissues, clinical anisotropic spacing,
a correct NIfTI affine, the three commonest bleed patterns with their typical locations and mass
effect, hemorrhage-free controls, and per-case metadata from which labels and text reports derive.

Coordinate convention (the one nibabel calls RAS+)
--------------------------------------------------
Arrays have shape ``(nx, ny, nz)`` and are indexed ``[i, j, k]``; axial slices are
``image[:, :, k]``. Voxel ``(i, j, k)`` maps to world millimetres by
``affine = [[sx, 0, 0, ox], [0, sy, 0, oy], [0, 0, sz, oz], [0, 0, 0, 1]]`` with positive
``sx, sy, sz``, so ``nibabel.aff2axcodes(affine) == ('R', 'A', 'S')``: ``i`` increases toward the
patient's Right, ``j`` toward Anterior and ``k`` toward Superior. The patient's LEFT is therefore at
small ``i`` (world x below the head's midline). The origin puts the centre of the grid at world
(0, 0, 0); the head centre is within a few mm of it. ``side`` in the metadata is always the
patient's side (``left`` = the half of the head with smaller world x), never a screen side.

Anatomy model
-------------
Smooth "depth" fields (mm below the skin, below the inner skull table, below the brain surface)
are built with vectorised numpy on a coarse grid (about 1.8 mm in-plane at full size) and
linearly upsampled, so tissue boundaries are smooth at any voxel size and no Python loop touches
voxels. Layers from outside in: air (-1000 HU), scalp (~+40 HU with a fat band), skull (two cortical
tables of 1100-1500 HU around diploe), CSF rim (~+5 HU), cortex (~+38 HU) folded by radial sulci,
white matter (~+28 HU), deep grey nuclei, lateral and third ventricles, interhemispheric fissure
with falx, optional choroid/pineal calcifications. CT noise (4-8 HU, spatially correlated) and a
mild in-plane point-spread blur are applied last. Geometry is sampled at voxel centres, so thick
slices show less through-plane partial volume than a real scanner would.

Hemorrhage kinds (acute blood, 55-80 HU; the mask marks blood only):

* ``intraparenchymal``: irregular lobulated blob in a lobe or the basal ganglia, often with a
  hypodense oedema rim (~+20 HU, not in the mask);
* ``subdural``: crescent between the inner table and the compressed brain over one convexity;
* ``intraventricular``: blood layering in the dependent (posterior, patient supine) part of one or
  both lateral ventricles, sometimes casting a whole ventricle, sometimes with hydrocephalus.

Large bleeds shift the ventricles and septum away from the bleed (``midline_shift_mm``), bow the
falx and compress the ipsilateral ventricle. The anatomy of case ``k`` depends only on
``(seed, k)``; bleed draws and image noise use separate random streams, so rendering the same case
with ``ich_type='none'`` gives its hemorrhage-free twin.

Output layout written by :func:`make_synthetic_ich`::

    output_dir/volumes/<case_id>.nii.gz   int16 CT in HU
    output_dir/masks/<case_id>.nii.gz     uint8 mask (1 = hemorrhage), same grid and affine
    output_dir/train.csv, val.csv[, test.csv]   path,ich,patient_id,ich_type,side,region,...
    output_dir/cases.json                 per-case metadata incl. lesion centroid (voxel and mm)
                                          and the case's report (report, findings, impression)
    output_dir/reports_train.jsonl, reports_val.jsonl[, reports_test.jsonl]
                                          report manifests (blip.data.reports format), one per split

Reports are written by :func:`sam3d.data.synthetic_reports.write_ct_report` from the metadata only,
with their own random stream, so they never change an image, a mask or a CSV.
"""

from __future__ import annotations

import csv
import io
import json
import math
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi
from tqdm import tqdm

from ich_engine.checkpoint import atomic_write
from sam3d.data.io import save_nifti
from sam3d.data.synthetic_reports import report_manifest_row, write_ct_report

ICH_TYPES = ("intraparenchymal", "subdural", "intraventricular")
ANATOMIES = ("geometric", "template")
DEFAULT_SPACING_MM = (0.45, 0.45, 5.0)
DEFAULT_FOV_MM = (200.0, 240.0, 160.0)
CSV_COLUMNS = (
    "path",
    "ich",
    "patient_id",
    "ich_type",
    "side",
    "region",
    "volume_ml",
    "midline_shift_mm",
    "mass_effect",
    "spacing",
)

# Share of each kind among positive cases (IPH is the commonest ICH, IVH alone the rarest).
_TYPE_SHARES = (("intraparenchymal", 0.45), ("subdural", 0.35), ("intraventricular", 0.20))
# Golden-ratio sequence step: a low-discrepancy sequence keeps the positive fraction and the type
# mix close to the requested ones for any number of cases, while each case's draw depends only on
# (seed, index).
_GOLDEN = (math.sqrt(5.0) - 1.0) / 2.0
# Independent random streams per case (appended to the SeedSequence entropy (seed, index)).
_ANATOMY, _LESION, _NOISE, _REPORT = 0, 1, 2, 3
_SPLIT_STREAM = 0x5B17
_HU_MIN, _HU_MAX = -1024, 3071
_COARSE_STEP_MM = 1.8  # target in-plane step of the coarse geometry grid at head_scale 1
_PSF_SIGMA_MM = 0.4  # in-plane point-spread blur (partial volume), sigma in mm
# Sulci are where the radial unit-variance noise is near zero; a band |noise| < w is about
# 2 * w * 2.8 mm wide: a ~0.7 mm CSF cleft lined by ~1.5 mm of grey matter on each side.
_SULCUS_CSF, _SULCUS_GREY = 0.13, 0.55
# Lateral-ventricle centreline: distance from the midline (mm) at antero-posterior positions y (mm).
_VENTRICLE_Y = (-52.0, -40.0, -30.0, -15.0, 0.0, 12.0, 22.0, 30.0)
_VENTRICLE_X = (16.0, 20.0, 19.0, 10.0, 5.5, 4.5, 6.5, 9.0)
_LOBE_DIRECTIONS = {  # typical lobar bleed direction for the patient's right side, brain-normalised
    "frontal": (0.45, 0.80, 0.25),
    "parietal": (0.50, -0.25, 0.75),
    "temporal": (0.90, 0.05, -0.35),
    "occipital": (0.35, -0.90, 0.15),
}


@dataclass
class SyntheticCase:
    """One rendered phantom.

    ``image_hu``: int16 ``(nx, ny, nz)`` CT in HU; ``mask``: uint8 same shape, 1 = hemorrhage;
    ``affine``: 4x4 float64 voxel-to-RAS+ (mm); ``spacing_mm``: voxel size (x, y, z) in mm;
    ``metadata``: the CSV extra columns plus ``case_id``, ``patient_id``, ``ich``, lesion centroid
    (``centroid_voxel``, ``centroid_mm``; ``None`` when hemorrhage-free) and descriptive extras
    used by report generation.
    """

    case_id: str
    image_hu: np.ndarray
    mask: np.ndarray
    affine: np.ndarray
    spacing_mm: tuple[float, float, float]
    metadata: dict


@dataclass(frozen=True)
class _Anatomy:
    """Per-case anatomy draws. Lengths are in mm already multiplied by ``head_scale``."""

    centre: np.ndarray  # head centre in world mm (3,)
    head_semi: np.ndarray  # outer (skin) ellipsoid semi-axes, mm (3,)
    shape_coef: np.ndarray  # head-shape quadratic form in the unit direction (3, 3)
    skull_coef: np.ndarray  # skull-thickness quadratic form (3, 3)
    scalp: float
    fat_start: float
    fat_end: float
    skull: float
    csf_rim: float
    gm_thick: float
    sulcal_depth: float
    hu_fat: float
    hu_soft: float
    hu_cortical: float
    hu_diploe: float
    hu_csf: float
    hu_gm: float
    hu_wm: float
    hu_deep: float
    hu_falx: float
    ventricle_scale: float
    choroid_hu: float  # 0 = no choroid plexus calcification
    pineal_hu: float  # 0 = no pineal calcification
    noise_hu: float
    scale: float  # head_scale, for the anatomy templates defined at full size

    @property
    def brain_semi(self) -> np.ndarray:
        """Semi-axes (mm) of the ellipsoid the brain surface approximately follows."""
        return self.head_semi - (self.scalp + self.skull + self.csf_rim)


@dataclass(frozen=True)
class _Lesion:
    """Per-case hemorrhage draws (lengths in mm, already scaled)."""

    ich_type: str
    side: str
    region: str
    hu_blood: float = 0.0
    shift: float = 0.0  # signed midline shift along world x, mm (away from bleed)
    hydrocephalus: bool = False
    # intraparenchymal
    blobs: tuple = ()  # ((centre(3,), rotation(3,3), semi(3,)), ...)
    lobes: tuple = ()  # ((wave vector(3,), phase), ...) boundary lobulation
    radius: float = 0.0
    oedema_width: float = 0.0
    hu_oedema: float = 0.0
    # subdural
    direction: np.ndarray | None = None
    max_thickness: float = 0.0
    half_angle: float = 0.0
    # intraventricular
    fluid_level_y: float = 0.0  # blood fills the ventricle posterior to this y (mm)

    @property
    def sign(self) -> int:
        """+1 for a bleed on the patient's right (world +x), -1 for left."""
        return 1 if self.side == "right" else -1


class _Grid:
    """Head-centred voxel-centre coordinates (mm, float32) of a regular grid, plus box lookups."""

    def __init__(self, shape, spacing, origin, centre):
        self.axes = [(origin[a] + spacing[a] * np.arange(shape[a]) - centre[a]).astype(np.float32) for a in range(3)]

    def box(self, lo, hi) -> tuple[slice, slice, slice]:
        """Index slices of the voxels whose centres lie in the axis-aligned box [lo, hi] (mm)."""
        x, y, z = (
            slice(int(np.searchsorted(c, a, "left")), int(np.searchsorted(c, b, "right")))
            for c, a, b in zip(self.axes, lo, hi)
        )
        return x, y, z

    def local(self, sl):
        """Broadcastable x (n,1,1), y (1,n,1), z (1,1,n) coordinates of a box."""
        x, y, z = (c[s] for c, s in zip(self.axes, sl))
        return x[:, None, None], y[None, :, None], z[None, None, :]


def _u(rng, lo, hi) -> float:
    return float(rng.uniform(lo, hi))


def _quadratic_form(rng, amplitude) -> np.ndarray:
    """Random symmetric 3x3 matrix: a smooth, low-order variation over head directions."""
    m = rng.normal(0.0, amplitude, (3, 3))
    return (m + m.T) / 2.0


def _random_rotation(rng) -> np.ndarray:
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    return q * np.sign(np.diag(r))


def _draw_anatomy(rng, head_scale: float) -> _Anatomy:
    s = head_scale
    hu_wm = _u(rng, 25.0, 30.0)
    hu_gm = hu_wm + _u(rng, 8.0, 12.0)
    return _Anatomy(
        centre=np.array([_u(rng, -3, 3), _u(rng, -3, 3), _u(rng, -11, -5)]) * s,
        head_semi=np.array([82.0, 100.0, 74.0]) * rng.uniform(0.95, 1.05, 3) * s,
        shape_coef=_quadratic_form(rng, 0.02),
        skull_coef=_quadratic_form(rng, 0.12),
        scalp=_u(rng, 4.0, 6.5) * s,
        fat_start=1.0 * s,
        fat_end=_u(rng, 2.0, 3.2) * s,
        skull=_u(rng, 5.0, 8.0) * s,
        csf_rim=_u(rng, 1.0, 3.0) * s,
        gm_thick=_u(rng, 2.5, 3.5) * s,
        sulcal_depth=_u(rng, 8.0, 13.0) * s,
        hu_fat=_u(rng, -110.0, -70.0),
        hu_soft=_u(rng, 35.0, 45.0),
        hu_cortical=_u(rng, 1100.0, 1500.0),
        hu_diploe=_u(rng, 450.0, 750.0),
        hu_csf=_u(rng, 2.0, 10.0),
        hu_gm=hu_gm,
        hu_wm=hu_wm,
        hu_deep=hu_wm + 0.8 * (hu_gm - hu_wm),
        hu_falx=_u(rng, 45.0, 70.0),
        ventricle_scale=_u(rng, 0.8, 1.25),
        choroid_hu=_u(rng, 100.0, 250.0) if rng.random() < 0.6 else 0.0,
        pineal_hu=_u(rng, 120.0, 220.0) if rng.random() < 0.5 else 0.0,
        noise_hu=_u(rng, 4.0, 8.0),
        scale=s,
    )


def _draw_type(index: int, seed: int, positive_fraction: float) -> str:
    """Stratified draw: 'none' for a share 1 - positive_fraction of indices, else a bleed kind."""
    offset = np.random.default_rng([seed, _SPLIT_STREAM]).random()
    u = (offset + index * _GOLDEN) % 1.0
    if u >= positive_fraction:
        return "none"
    v = u / positive_fraction
    cumulative = 0.0
    for kind, share in _TYPE_SHARES:
        cumulative += share
        if v < cumulative:
            return kind
    return _TYPE_SHARES[-1][0]


def _draw_lesion(rng, ich_type: str, anat: _Anatomy) -> _Lesion:
    s = anat.scale
    if ich_type == "none":
        return _Lesion("none", "none", "none")
    if ich_type == "intraventricular":
        side = str(rng.choice(["left", "right", "bilateral"], p=[0.35, 0.35, 0.30]))
        casting = rng.random() < 0.2
        return _Lesion(
            ich_type,
            side,
            "lateral ventricle",
            hu_blood=_u(rng, 55.0, 72.0),
            hydrocephalus=bool(rng.random() < 0.35),
            fluid_level_y=(np.inf if casting else _u(rng, -32.0, -12.0) * s),
        )
    side = "left" if rng.random() < 0.5 else "right"
    sign = 1 if side == "right" else -1
    if ich_type == "subdural":
        thickness = _u(rng, 4.0, 18.0)
        direction = np.array([sign * _u(rng, 0.75, 0.95), _u(rng, -0.35, 0.45), _u(rng, 0.0, 0.5)])
        shift = -sign * min(12.0, 0.6 * (thickness - 5.0)) * s if thickness > 9.0 else 0.0
        return _Lesion(
            ich_type,
            side,
            "convexity",
            hu_blood=_u(rng, 60.0, 80.0),
            shift=shift,
            direction=direction / np.linalg.norm(direction),
            max_thickness=thickness * s,
            half_angle=math.radians(_u(rng, 40.0, 70.0)),
        )
    # intraparenchymal
    region = str(rng.choice(list(_LOBE_DIRECTIONS) + ["basal ganglia"], p=[0.2, 0.2, 0.15, 0.1, 0.35]))
    lo_ml, hi_ml = (3.0, 45.0) if region == "basal ganglia" else (4.0, 70.0)
    nominal_ml = float(math.exp(rng.uniform(math.log(lo_ml), math.log(hi_ml))))
    radius = (3.0 * nominal_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)  # mm at full size
    if region == "basal ganglia":
        centre = np.array([sign * 21.0, 3.0, -1.0]) + rng.normal(0.0, 2.5, 3)
    else:
        d = np.array(_LOBE_DIRECTIONS[region]) * [sign, 1, 1] + rng.normal(0.0, 0.08, 3)
        surface = d / np.linalg.norm(d) * anat.brain_semi / s
        depth = radius + _u(rng, 4.0, 10.0)
        centre = surface * (1.0 - depth / np.linalg.norm(surface))
    blobs = [(centre, _random_rotation(rng), radius * rng.uniform(0.8, 1.2, 3))]
    for _ in range(int(rng.integers(1, 4))):
        offset = rng.standard_normal(3)
        offset *= 0.5 * radius / np.linalg.norm(offset)
        blobs.append((centre + offset, _random_rotation(rng), radius * rng.uniform(0.4, 0.7, 3)))
    lobes = []
    for _ in range(3):
        k = rng.standard_normal(3)
        k *= 2.0 * math.pi / (radius * _u(rng, 0.8, 1.5) * np.linalg.norm(k))
        lobes.append((k / s, _u(rng, 0.0, 2.0 * math.pi)))
    shift = -sign * min(10.0, 1.0 + 0.14 * (nominal_ml - 25.0)) * s if nominal_ml > 25.0 else 0.0
    return _Lesion(
        ich_type,
        side,
        region,
        hu_blood=_u(rng, 58.0, 78.0),
        shift=shift,
        blobs=tuple((c * s, rot, semi * s) for c, rot, semi in blobs),
        lobes=tuple(lobes),
        radius=radius * s,
        oedema_width=(_u(rng, 2.0, 6.0) * s if rng.random() < 0.7 else 0.0),
        hu_oedema=_u(rng, 16.0, 22.0),
    )


def _upsample_plan(n: int, factor: int):
    """Coarse size and linear-interpolation (index, weight) from a grid of every factor-th voxel."""
    if factor == 1:
        return n, None
    n_coarse = (n - 1) // factor + 1 + (1 if (n - 1) % factor else 0)
    t = np.arange(n) / factor
    lo = np.minimum(np.floor(t).astype(np.intp), n_coarse - 2)
    return n_coarse, (lo, (t - lo).astype(np.float32))


def _upsample(field: np.ndarray, plans) -> np.ndarray:
    """Separable linear upsampling of a coarse float32 field to the full grid."""
    for axis, plan in enumerate(plans):
        if plan is None:
            continue
        lo, w = plan
        shape = [1, 1, 1]
        shape[axis] = -1
        delta = np.diff(field, axis=axis)
        out = np.take(field, lo, axis=axis)
        out += np.take(delta, lo, axis=axis) * w.reshape(shape)
        field = out
    return field


def _direction_form(coef, ux, uy, uz):
    """Evaluate u^T coef u for unit-direction arrays."""
    u = (ux, uy, uz)
    return sum(coef[a, b] * u[a] * u[b] for a in range(3) for b in range(3))


def _surface_noise(rng, x, y, z, semi, sigma_mm):
    """Unit-variance smooth noise (correlation ~``sigma_mm``) that varies slowly along rays.

    Sampling an isotropic noise volume at a point pulled most of the way toward its projection
    onto the brain ellipsoid makes the iso-surfaces run roughly radially (like sulci between gyri)
    while still bending with depth. Shapes follow x, y, z broadcasting.
    """
    step_mm = sigma_mm / 1.5  # fine enough for linear interpolation of a field this smooth
    half = semi + 4.0 * sigma_mm
    n = np.ceil(2.0 * half / step_mm).astype(int) + 1
    volume = ndi.gaussian_filter(rng.standard_normal(tuple(n), dtype=np.float32), 1.5, mode="wrap")
    volume /= volume.std()
    r = np.maximum(np.sqrt((x / semi[0]) ** 2 + (y / semi[1]) ** 2 + (z / semi[2]) ** 2), 0.05) ** 0.75
    coords = [np.broadcast_to((c / r + h) / step_mm, r.shape) for c, h in zip((x, y, z), half)]
    return ndi.map_coordinates(volume, coords, order=1, mode="nearest").astype(np.float32)


def _coarse_fields(grid_c: _Grid, anat: _Anatomy, lesion: _Lesion, rng) -> dict:
    """Smooth geometry fields on the coarse grid (mm, float32).

    ``skin``: depth below the skin; ``table``: depth below the inner skull table; ``brain``: depth
    below the (possibly compressed) brain surface; ``cortex``: ``brain`` minus a smooth thickness
    variation; ``sulci``: radial unit-variance noise whose near-zero set forms the sulci;
    ``subdural`` (only for subdural bleeds): depth below the inner surface of the haematoma.
    """
    x, y, z = (c.astype(np.float64) for c in grid_c.local((slice(None),) * 3))
    a, b, c = anat.head_semi
    radius = np.sqrt(x * x + y * y + z * z)
    safe = np.maximum(radius, 1e-6)
    ux, uy, uz = x / safe, y / safe, z / safe
    r = np.sqrt((x / a) ** 2 + (y / b) ** 2 + (z / c) ** 2)
    grad = np.sqrt((x / a**2) ** 2 + (y / b**2) ** 2 + (z / c**2) ** 2) / np.maximum(r, 1e-6)
    bump = _direction_form(anat.shape_coef, ux, uy, uz)
    skin = (1.0 + bump - r) / np.maximum(grad, 1e-9)  # first-order distance to the surface
    skull = anat.skull * (1.0 + _direction_form(anat.skull_coef, ux, uy, uz))
    table = skin - anat.scalp - np.clip(skull, 0.6 * anat.skull, 1.6 * anat.skull)
    fields = {"skin": skin, "table": table}
    surface = table - anat.csf_rim
    if lesion.ich_type == "subdural":
        direction = lesion.direction
        assert direction is not None  # every subdural draw has one (_draw_lesion)
        angle = np.arccos(np.clip(ux * direction[0] + uy * direction[1] + uz * direction[2], -1, 1))
        # Nearly uniform thickness that falls off only near the rim: a crescent, not a lens.
        taper = np.clip(1.0 - (angle / lesion.half_angle) ** 4, 0.0, 1.0) ** 0.5
        same_side = np.clip(lesion.sign * x / (3.0 * anat.scale), 0.0, 1.0)
        thickness = lesion.max_thickness * taper * same_side
        fields["subdural"] = table - thickness
        # The haematoma replaces the CSF rim and pushes the brain surface inward.
        rim = anat.csf_rim * np.clip(1.0 - thickness / (2.0 * anat.scale), 0.0, 1.0)
        surface = table - thickness - rim
    semi = anat.brain_semi
    fields["brain"] = surface
    fields["cortex"] = surface - 1.2 * anat.scale * _surface_noise(rng, x, y, z, semi, 6.0 * anat.scale)
    fields["sulci"] = _surface_noise(rng, x, y, z, semi, 2.8 * anat.scale)
    return {k: np.broadcast_to(v, r.shape).astype(np.float32) for k, v in fields.items()}


def _ellipsoid(grid: _Grid, centre, semi):
    """(slices, inside) for an axis-aligned ellipsoid given in head-centred mm."""
    centre, semi = np.asarray(centre, float), np.asarray(semi, float)
    sl = grid.box(centre - semi, centre + semi)
    x, y, z = grid.local(sl)
    v = ((x - centre[0]) / semi[0]) ** 2 + ((y - centre[1]) / semi[1]) ** 2 + ((z - centre[2]) / semi[2]) ** 2
    return sl, v <= 1.0


def _lateral_ventricle(grid: _Grid, sign: int, shift: float, width_scale: float, s: float):
    """(slices, inside) of one lateral ventricle, frontal horn to occipital horn.

    The centreline runs closest to the midline at the septum (~2 mm gap), the frontal horns turn
    anterolaterally, the bodies diverge posteriorly to the atria and the occipital horns; it arches
    upward over the thalami. Full-size template in mm, multiplied by ``s``.
    """
    y_post, y_ant = -52.0 * s, 30.0 * s
    sl = grid.box((shift - 40 * s, y_post, -20 * s), (shift + 40 * s, y_ant, 40 * s))
    x, y, z = grid.local(sl)
    yy = y / s
    xc = shift + sign * s * np.interp(yy, _VENTRICLE_Y, _VENTRICLE_X)
    zc = s * np.where(yy > -5.0, 15.0 - 0.010 * (yy + 5.0) ** 2, 15.0 - 0.005 * (yy + 5.0) ** 2)
    atrium = np.exp(-(((yy + 30.0) / 10.0) ** 2))
    wx = s * width_scale * (3.5 + 2.5 * atrium)
    wz = s * width_scale * (8.0 + 2.0 * atrium)
    y_mid, half_len = (y_post + y_ant) / 2.0, (y_ant - y_post) / 2.0
    v = ((x - xc) / wx) ** 2 + ((z - zc) / wz) ** 2 + ((y - y_mid) / half_len) ** 4
    return sl, v <= 1.0


def _paint_deep(img, brain, ventricles, grid: _Grid, anat: _Anatomy, lesion: _Lesion) -> dict:
    """Paint falx/fissure, deep grey nuclei, ventricles and calcifications, shifted by mass effect.

    Fills the bool array ``ventricles`` in place and returns ``{side: (slices, inside)}`` for the two
    lateral ventricles (side -1 = patient left) so intraventricular blood can fill them.
    """
    s, d = anat.scale, lesion.shift
    # Interhemispheric fissure with falx; the falx bows less than the septum (subfalcine shift).
    bsemi = anat.brain_semi
    sl = grid.box((min(0.0, d) - 2 * s, -bsemi[1], -bsemi[2]), (max(0.0, d) + 2 * s, bsemi[1], bsemi[2]))
    x, y, z = grid.local(sl)
    falx_x = 0.6 * d * np.clip(1.0 - (y / bsemi[1]) ** 2, 0.0, 1.0)
    # The fissure stops at the corpus callosum and deep structures (the "core").
    core = (x / (35 * s)) ** 2 + ((y + 5 * s) / (45 * s)) ** 2 + ((z + 10 * s) / (36 * s)) ** 2 <= 1.0
    fissure = (np.abs(x - falx_x) < 1.3 * s) & ~core & brain[sl]
    img[sl][fissure] = anat.hu_csf
    img[sl][fissure & (np.abs(x - falx_x) < 0.5 * s)] = anat.hu_falx

    for side in (-1, 1):
        for centre, semi in (
            ((10, -12, 0), (8, 13, 9)),  # thalamus
            ((21, 3, -1), (5.5, 14, 10)),  # lentiform nucleus
            ((11, 17, 9), (4, 8, 7)),  # caudate head
        ):
            c = (side * centre[0] * s + d, centre[1] * s, centre[2] * s)
            sl, inside = _ellipsoid(grid, c, np.array(semi) * s)
            img[sl][inside & brain[sl]] = anat.hu_deep

    scale = anat.ventricle_scale * (1.45 if lesion.hydrocephalus else 1.0)
    lateral = {}
    for side in (-1, 1):
        width = scale
        if d != 0.0:  # the bleed's side (opposite to the shift) is compressed, the other dilates
            width *= 0.65 if side == -np.sign(d) else 1.1
        sl, inside = _lateral_ventricle(grid, side, d, width, s)
        inside &= brain[sl]
        ventricles[sl] |= inside
        lateral[side] = (sl, inside)
    sl, inside = _ellipsoid(grid, (d, -5 * s, -2 * s), np.array([1.8 * scale, 11, 8]) * s)
    ventricles[sl] |= inside & brain[sl]
    img[ventricles] = anat.hu_csf

    calcs = [((side * 17, -30, 12), anat.choroid_hu, 2.2) for side in (-1, 1)]
    calcs.append(((0, -18, -2), anat.pineal_hu, 2.0))
    for centre, hu, radius in calcs:
        if hu:
            c = (centre[0] * s + d, centre[1] * s, centre[2] * s)
            sl, inside = _ellipsoid(grid, c, [radius * s] * 3)
            img[sl][inside] = hu
    return lateral


def _paint_iph(img, mask, brain, ventricles, grid: _Grid, lesion: _Lesion, s: float):
    """Lobulated union of rotated ellipsoids, clipped to parenchyma on the bleed's side of the falx."""
    centre = lesion.blobs[0][0]
    reach = 1.9 * lesion.radius + lesion.oedema_width
    sl = grid.box(centre - reach, centre + reach)
    x, y, z = grid.local(sl)
    r2 = None
    for c, rot, semi in lesion.blobs:
        dx, dy, dz = x - c[0], y - c[1], z - c[2]
        q = sum(((rot[0, k] * dx + rot[1, k] * dy + rot[2, k] * dz) / semi[k]) ** 2 for k in range(3))
        r2 = q if r2 is None else np.minimum(r2, q)
    assert r2 is not None  # an intraparenchymal lesion has at least one blob (blobs[0] is its centre)
    dx, dy, dz = x - centre[0], y - centre[1], z - centre[2]
    lobulation = 1.0 + 0.08 * sum(np.cos(k[0] * dx + k[1] * dy + k[2] * dz + ph) for k, ph in lesion.lobes)
    f = np.sqrt(r2) * lobulation
    parenchyma = brain[sl] & ~ventricles[sl] & (lesion.sign * x > 1.0 * s)
    blood = (f <= 1.0) & parenchyma
    if lesion.oedema_width:
        oedema = (f <= 1.0 + lesion.oedema_width / lesion.radius) & parenchyma & ~blood
        img[sl][oedema] = lesion.hu_oedema
    img[sl][blood] = lesion.hu_blood
    mask[sl] |= blood


def _paint_ivh(img, mask, grid: _Grid, lesion: _Lesion, lateral: dict):
    """Blood in the dependent (posterior: patient supine) part of one or both lateral ventricles."""
    sides = (-1, 1) if lesion.side == "bilateral" else (lesion.sign,)
    for side in sides:
        sl, inside = lateral[side]
        _, y, _ = grid.local(sl)
        blood = inside & (y < lesion.fluid_level_y)
        img[sl][blood] = lesion.hu_blood
        mask[sl] |= blood


def _noise_and_blur(img, rng, noise_hu: float, spacing) -> np.ndarray:
    """Add CT noise and the point-spread blur in one filtering pass.

    White noise is added before the blur with its std pre-scaled by the blur's noise-reduction
    factor, so the result is correlated noise of std ``noise_hu`` (HU) on a blurred image.
    """
    sigmas = [(_PSF_SIGMA_MM / sp) if _PSF_SIGMA_MM / sp >= 0.2 else 0.0 for sp in spacing]
    reduction = 1.0
    for sigma in sigmas:
        if sigma:
            radius = int(4.0 * sigma + 0.5)
            delta = np.zeros(2 * radius + 1)
            delta[radius] = 1.0
            reduction *= math.sqrt(float((ndi.gaussian_filter1d(delta, sigma) ** 2).sum()))
    img += rng.standard_normal(img.shape, dtype=np.float32) * np.float32(noise_hu / reduction)
    if any(sigmas):
        img = ndi.gaussian_filter(img, sigmas)
    return img


def _check_triple(name: str, value) -> tuple[float, float, float]:
    """Three positive finite millimetre values (spacing or field of view), else ValueError."""
    try:
        triple = tuple(float(v) for v in value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{name} must be three positive numbers (mm), got {value!r}") from err
    if len(triple) != 3 or not all(math.isfinite(v) and v > 0 for v in triple):
        raise ValueError(f"{name} must be three positive finite numbers (mm), got {value!r}")
    return triple


def _check_fraction(name: str, value: float) -> float:
    if not (isinstance(value, (int, float)) and 0.0 <= value <= 1.0):
        raise ValueError(f"{name} must be in [0, 1], got {value!r}")
    return float(value)


def _check_common(spacing_mm, head_scale, fov_mm):
    """Validate the grid arguments; return (spacing, shape) of the voxel grid."""
    spacing = _check_triple("spacing_mm", spacing_mm)
    fov = _check_triple("fov_mm", fov_mm)
    if not (isinstance(head_scale, (int, float)) and math.isfinite(head_scale) and 0.0 < head_scale <= 2.0):
        raise ValueError(f"head_scale must be in (0, 2], got {head_scale!r}")
    shape = tuple(int(round(f * head_scale / sp)) for f, sp in zip(fov, spacing))
    if min(shape) < 16:
        raise ValueError(
            f"spacing_mm={spacing} is too coarse for head_scale={head_scale}: grid {shape} has an axis under 16 voxels"
        )
    return spacing, shape


def _spacing_str(spacing) -> str:
    return "x".join(str(float(v)) for v in spacing)


def _patient_id(index: int) -> str:
    return f"SYN{index:03d}"


def synthesize_case(
    index: int,
    seed: int = 0,
    spacing_mm=DEFAULT_SPACING_MM,
    ich_type: str | None = None,
    head_scale: float = 1.0,
    positive_fraction: float = 0.6,
    fov_mm=DEFAULT_FOV_MM,
) -> SyntheticCase:
    """Render case ``index`` of the dataset defined by ``seed``.

    The grid covers ``fov_mm * head_scale`` (mm, x/y/z) at ``spacing_mm``; the default gives
    ``(444, 533, 32)`` voxels of 0.45 x 0.45 x 5 mm. ``head_scale`` shrinks the head and the field of
    view together (a miniature head) so tests and smoke runs stay small; ``volume_ml`` and
    ``midline_shift_mm`` are measured in the miniature.

    ``ich_type``: one of ``ICH_TYPES`` or ``'none'`` to force a kind; ``None`` draws it from the
    golden-ratio sequence of ``(seed, index)``: 'none' for a share ``1 - positive_fraction`` of the
    indices, otherwise IPH/SDH/IVH in proportions 45/35/20. The anatomy draws depend only on
    ``(seed, index)`` (``head_scale`` scales them), so forcing ``ich_type='none'`` gives the same
    head without the bleed. Same arguments give byte-identical arrays.

    Raises ValueError for invalid arguments, or when the grid is too coarse to resolve the bleed.
    """
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    positive_fraction = _check_fraction("positive_fraction", positive_fraction)
    if ich_type is not None and ich_type not in ICH_TYPES + ("none",):
        raise ValueError(f"ich_type must be one of {ICH_TYPES + ('none',)} or None, got {ich_type!r}")
    spacing, shape = _check_common(spacing_mm, head_scale, fov_mm)
    index, seed = int(index), int(seed)
    kind = ich_type if ich_type is not None else _draw_type(index, seed, positive_fraction)

    anat_rng = np.random.default_rng([seed, index, _ANATOMY])
    anat = _draw_anatomy(anat_rng, float(head_scale))
    lesion = _draw_lesion(np.random.default_rng([seed, index, _LESION]), kind, anat)

    origin = [-(n - 1) / 2.0 * sp for n, sp in zip(shape, spacing)]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    grid = _Grid(shape, spacing, origin, anat.centre)
    factors = [max(1, int(round(_COARSE_STEP_MM * head_scale / sp))) for sp in spacing]
    plans, coarse_shape = [], []
    for n, f in zip(shape, factors):
        n_coarse, plan = _upsample_plan(n, f)
        coarse_shape.append(n_coarse)
        plans.append(plan)
    grid_c = _Grid(coarse_shape, [sp * f for sp, f in zip(spacing, factors)], origin, anat.centre)
    fields = {k: _upsample(v, plans) for k, v in _coarse_fields(grid_c, anat, lesion, anat_rng).items()}

    img = np.full(shape, -1000.0, dtype=np.float32)
    skin, table = fields["skin"], fields["table"]
    img[skin >= 0] = anat.hu_soft
    img[(skin >= anat.fat_start) & (skin < anat.fat_end)] = anat.hu_fat
    bone = (skin >= anat.scalp) & (table < 0)
    below_outer = skin[bone] - anat.scalp
    depth_in_bone = below_outer / np.maximum(below_outer - table[bone], 1e-3)  # 0 outer .. 1 inner
    img[bone] = np.where(np.abs(depth_in_bone - 0.5) < 0.2, anat.hu_diploe, anat.hu_cortical)
    intracranial = table >= 0
    img[intracranial] = anat.hu_csf
    brain = fields["brain"] >= 0
    img[brain] = anat.hu_wm
    cortex, sulci = fields["cortex"], np.abs(fields["sulci"])
    img[brain & (cortex < anat.gm_thick)] = anat.hu_gm
    img[brain & (cortex < anat.sulcal_depth + anat.gm_thick) & (sulci < _SULCUS_GREY)] = anat.hu_gm
    img[brain & (cortex < anat.sulcal_depth) & (sulci < _SULCUS_CSF)] = anat.hu_csf

    ventricles = np.zeros(shape, dtype=bool)
    lateral = _paint_deep(img, brain, ventricles, grid, anat, lesion)
    mask = np.zeros(shape, dtype=bool)
    if kind == "intraparenchymal":
        _paint_iph(img, mask, brain, ventricles, grid, lesion, anat.scale)
    elif kind == "subdural":
        mask = intracranial & (fields["subdural"] < 0)
        img[mask] = lesion.hu_blood
    elif kind == "intraventricular":
        _paint_ivh(img, mask, grid, lesion, lateral)

    img = _noise_and_blur(img, np.random.default_rng([seed, index, _NOISE]), anat.noise_hu, spacing)
    image_hu = np.clip(np.rint(img), _HU_MIN, _HU_MAX).astype(np.int16)

    case_id = f"case_{index:03d}"
    metadata = _metadata(case_id, index, kind, lesion, anat, mask, affine, spacing)
    return SyntheticCase(case_id, image_hu, mask.astype(np.uint8), affine, spacing, metadata)


def _metadata(case_id, index, kind, lesion: _Lesion, anat: _Anatomy, mask, affine, spacing) -> dict:
    return truth_record(
        case_id,
        index,
        kind,
        mask,
        affine,
        spacing,
        side=lesion.side,
        region=lesion.region,
        shift_mm=lesion.shift,
        max_thickness_mm=lesion.max_thickness if kind == "subdural" else None,
        oedema=bool(lesion.oedema_width),
        hydrocephalus=lesion.hydrocephalus,
        blood_hu=lesion.hu_blood if kind != "none" else None,
        head_centre_mm=anat.centre,
    )


def truth_record(
    case_id: str,
    index: int,
    kind: str,
    mask: np.ndarray,
    affine: np.ndarray,
    spacing,
    *,
    side: str,
    region: str,
    shift_mm: float,
    max_thickness_mm: float | None,
    oedema: bool,
    hydrocephalus: bool,
    blood_hu: float | None,
    head_centre_mm,
) -> dict:
    """A phantom's truth: the CSV columns plus centroid (voxel and RAS mm), extent and descriptive
    extras, measured from the painted ``mask``. Raises ValueError when a bleed left no voxel."""
    voxels = np.nonzero(mask)
    count = int(voxels[0].size)
    if kind != "none" and count == 0:
        raise ValueError(
            f"{case_id}: the {kind} hemorrhage is not resolved at spacing_mm={spacing}; "
            "use a finer spacing_mm or a larger head_scale"
        )
    meta = {
        "case_id": case_id,
        "patient_id": _patient_id(index),
        "ich": int(count > 0),
        "ich_type": kind,
        "side": side,
        "region": region,
        "volume_ml": round(count * float(np.prod(spacing)) / 1000.0, 1),
        "midline_shift_mm": round(abs(shift_mm), 1),
        "mass_effect": int(shift_mm != 0.0),
        "spacing": _spacing_str(spacing),
        "spacing_mm": list(spacing),
        "shape": list(mask.shape),
        "axcodes": "".join(nib.aff2axcodes(affine)),
        "head_centre_mm": [round(float(v), 2) for v in head_centre_mm],
        "centroid_voxel": None,
        "centroid_mm": None,
        "extent_mm": None,
        "max_thickness_mm": None if max_thickness_mm is None else round(max_thickness_mm, 1),
        "oedema": oedema,
        "hydrocephalus": hydrocephalus,
        "blood_hu": None if blood_hu is None else round(blood_hu, 1),
    }
    if count:
        centroid = np.array([v.mean() for v in voxels])
        meta["centroid_voxel"] = [round(float(v), 2) for v in centroid]
        meta["centroid_mm"] = [round(float(v), 2) for v in affine[:3, :3] @ centroid + affine[:3, 3]]
        meta["extent_mm"] = [round(float((v.max() - v.min() + 1) * sp), 1) for v, sp in zip(voxels, spacing)]
    return meta


def _write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def _split_counts(n_split: int, pools: list[list]) -> list[int]:
    """Largest-remainder allocation of ``n_split`` items across class pools, proportional to size."""
    total = sum(len(p) for p in pools)
    quotas = [n_split * len(p) / total for p in pools]
    counts = [min(len(p), int(math.floor(q))) for p, q in zip(pools, quotas)]
    order = sorted(range(len(pools)), key=lambda i: quotas[i] - math.floor(quotas[i]), reverse=True)
    while sum(counts) < n_split:
        for i in order:
            if sum(counts) < n_split and counts[i] < len(pools[i]):
                counts[i] += 1
    return counts


def _assign_splits(patient_labels: dict, n_val: int, n_test: int, seed: int) -> dict:
    """Seeded, label-stratified patient split: {patient_id: 'train'|'val'|'test'}."""
    rng = np.random.default_rng([seed, _SPLIT_STREAM])
    pools = []
    for label in (0, 1):
        ids = sorted(p for p, y in patient_labels.items() if y == label)
        pools.append([ids[i] for i in rng.permutation(len(ids))])
    split = {p: "train" for p in patient_labels}
    for name, n in (("val", n_val), ("test", n_test)):
        for pool, count in zip(pools, _split_counts(n, pools)):
            for _ in range(count):
                split[pool.pop()] = name
    return split


def _round_half_up(x: float) -> int:
    return int(math.floor(x + 0.5))


def make_synthetic_ich(
    output_dir,
    num_cases: int = 24,
    seed: int = 0,
    val_fraction: float = 0.25,
    test_fraction: float = 0.0,
    spacing_mm=DEFAULT_SPACING_MM,
    positive_fraction: float = 0.6,
    head_scale: float = 1.0,
    progress: bool = True,
    fov_mm=DEFAULT_FOV_MM,
    anatomy: str = "geometric",
) -> dict:
    """Write a synthetic ICH dataset (volumes, masks, split CSVs, cases.json, report manifests).

    Cases ``0 .. num_cases-1`` are rendered with :func:`synthesize_case`, so case k is identical
    whatever ``num_cases`` is. The split is by ``patient_id``, seeded and stratified by ``ich``;
    ``round(num_cases * fraction)`` patients go to val (and test); with ``test_fraction`` 0 no
    test.csv (nor reports_test.jsonl) is written and stale ones are removed. Every file is written
    to a temp name and renamed into place, so an interrupted run never leaves a half-written file.
    Each case's report depends only on ``(seed, index)`` like its image. ``anatomy``: ``"geometric"``
    (this module's phantoms) or ``"template"`` (:mod:`sam3d.data.template_phantom`: the average real
    head, five bleed kinds, mimics; ``head_scale`` must be 1 and each case's mimic labels are written
    to ``mimics/``).

    Returns ``{'train_csv', 'val_csv', 'test_csv', 'reports_train', 'reports_val', 'reports_test',
    'mask_dir', 'cases_json'}`` as ``str`` paths (the test entries are None when test_fraction is 0).
    """
    if isinstance(num_cases, bool) or not isinstance(num_cases, (int, np.integer)) or num_cases < 2:
        raise ValueError(f"num_cases must be an integer >= 2, got {num_cases!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    val_fraction = _check_fraction("val_fraction", val_fraction)
    test_fraction = _check_fraction("test_fraction", test_fraction)
    positive_fraction = _check_fraction("positive_fraction", positive_fraction)
    spacing, _ = _check_common(spacing_mm, head_scale, fov_mm)
    if anatomy not in ANATOMIES:
        raise ValueError(f"anatomy must be one of {ANATOMIES}, got {anatomy!r}")
    if anatomy == "template" and head_scale != 1.0:
        raise ValueError(f"anatomy='template' renders a full-size head: head_scale must be 1, got {head_scale!r}")
    n_val = _round_half_up(num_cases * val_fraction)
    n_test = _round_half_up(num_cases * test_fraction)
    if n_val < 1:
        raise ValueError(f"val_fraction={val_fraction} gives an empty validation split for num_cases={num_cases}")
    if test_fraction > 0 and n_test < 1:
        raise ValueError(f"test_fraction={test_fraction} gives an empty test split for num_cases={num_cases}")
    if n_val + n_test >= num_cases:
        raise ValueError(
            f"val_fraction={val_fraction} + test_fraction={test_fraction} leave no training cases "
            f"for num_cases={num_cases}"
        )

    out = Path(output_dir)
    vol_dir, mask_dir = out / "volumes", out / "masks"
    vol_dir.mkdir(parents=True, exist_ok=True)
    mask_dir.mkdir(parents=True, exist_ok=True)

    # template_phantom builds on this module's records and noise model, so it is imported here.
    from sam3d.data.template_phantom import synthesize_template_case

    records = []
    for index in tqdm(range(num_cases), desc="synthetic ICH", disable=not progress):
        if anatomy == "template":
            case, mimics = synthesize_template_case(index, seed, spacing, None, positive_fraction, fov_mm)
            (out / "mimics").mkdir(exist_ok=True)
            save_nifti(out / "mimics" / f"{case.case_id}.nii.gz", mimics, case.affine)
        else:
            case = synthesize_case(index, seed, spacing, None, head_scale, positive_fraction, fov_mm)
        save_nifti(vol_dir / f"{case.case_id}.nii.gz", case.image_hu, case.affine)
        save_nifti(mask_dir / f"{case.case_id}.nii.gz", case.mask, case.affine)
        meta = dict(case.metadata)
        meta["path"] = f"volumes/{case.case_id}.nii.gz"
        meta["mask_path"] = f"masks/{case.case_id}.nii.gz"
        if anatomy == "template":
            meta["mimics_path"] = f"mimics/{case.case_id}.nii.gz"
        meta.update(write_ct_report(meta, np.random.default_rng([int(seed), index, _REPORT])))
        records.append(meta)

    labels: dict[str, int] = {}
    for r in records:
        labels[r["patient_id"]] = max(labels.get(r["patient_id"], 0), r["ich"])
    split = _assign_splits(labels, n_val, n_test, int(seed))
    for r in records:
        r["split"] = split[r["patient_id"]]

    result: dict[str, str | None] = {
        "train_csv": None,
        "val_csv": None,
        "test_csv": None,
        "reports_train": None,
        "reports_val": None,
        "reports_test": None,
    }
    for name in ("train", "val", "test"):
        rows = [r for r in records if r["split"] == name]
        if name == "test" and n_test == 0:
            # A test.csv left by an earlier run would list cases that are now in train/val.
            (out / "test.csv").unlink(missing_ok=True)
            (out / "reports_test.jsonl").unlink(missing_ok=True)
            continue
        buffer = io.StringIO()
        writer = csv.writer(buffer, lineterminator="\n")
        writer.writerow(CSV_COLUMNS)
        writer.writerows([r[c] for c in CSV_COLUMNS] for r in rows)
        path = out / f"{name}.csv"
        _write_text(path, buffer.getvalue())
        result[f"{name}_csv"] = str(path)
        reports = out / f"reports_{name}.jsonl"
        _write_text(reports, "".join(json.dumps(report_manifest_row(r)) + "\n" for r in rows))
        result[f"reports_{name}"] = str(reports)
    cases_json = out / "cases.json"
    _write_text(cases_json, json.dumps(records, indent=2) + "\n")
    result["mask_dir"] = str(mask_dir)
    result["cases_json"] = str(cases_json)
    return result
