"""Head-CT phantoms with real anatomy: an average normal head CT, deformed per case, with the
structures a model must not call blood and bleeds of all five kinds.

Why this exists: the geometric phantoms of :mod:`sam3d.data.synthetic` have no skull base, petrous
bone, air cells, sinuses, orbits, tentorium, dense venous sinuses or calcifications, so a model that
only saw them paints blood over a normal skull base. The shape prior here is real: the average head
CT of ``ct_template/`` (Rorden's ``scct``, made from real scans, 2 mm, BSD licence, with the CSF
probability map ``sccsf``), in MNI space. Each case

* deforms it: a random pose (yaw, pitch up to 15 degrees as heads lie in a gantry, roll), scale per
  axis and a smooth displacement field of a few mm;
* restores the skull's contrast (the average smears cortical bone to a few hundred HU) and adds
  what the average lost: the falx and tentorium (thin dural sheets, 35-60 HU), dense venous sinuses
  (superior sagittal, straight and transverse, 50-70 HU, against the inner table like a subdural),
  calcifications at their usual sites (pineal, choroid plexus glomus, globus pallidus, falx plaques;
  most over 100 HU, some 60-100 HU like blood), beam hardening between the petrous bones and streaks
  across the posterior fossa, correlated noise and the scanner's point-spread; a thick slice is the
  average of its slab, so bone and sinuses blur into the slices above and below as on a 5 mm scan;
* paints one bleed, or none: intraparenchymal (lobar, deep, cerebellar), subdural (a crescent over a
  convexity, thin ones 2-5 mm), epidural (a lens), subarachnoid (sulcal blood under a convexity or in
  a Sylvian fissure), intraventricular (layering in the dependent horns or a cast);
* sometimes hands the scan over the way users do: skull-stripped and clipped to a brain window, or
  only clipped.

Every structure is defined in template (MNI) millimetres and so moves with the head. The mask marks
the painted blood only. :func:`synthesize_template_case` returns the same :class:`SyntheticCase` and
truth records as :func:`sam3d.data.synthetic.synthesize_case`, plus ``mimics`` (what was painted that
is not blood) and ``variant``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any, cast

import nibabel as nib
import numpy as np
from scipy import ndimage as ndi

from sam3d.data.synthetic import (
    _GOLDEN,
    _HU_MAX,
    _HU_MIN,
    _SPLIT_STREAM,
    SyntheticCase,
    _check_fraction,
    _check_triple,
    _noise_and_blur,
    _upsample,
    _upsample_plan,
    truth_record,
)

TEMPLATE_DIR = Path(__file__).parent / "ct_template"
TEMPLATE_KINDS = ("intraparenchymal", "subdural", "intraventricular", "epidural", "subarachnoid")
# Shares among positive cases: IPH commonest; thin subdurals and subarachnoid blood are the hard ones.
_KIND_SHARES = (
    ("intraparenchymal", 0.30),
    ("subdural", 0.28),
    ("intraventricular", 0.12),
    ("epidural", 0.12),
    ("subarachnoid", 0.18),
)
DEFAULT_TEMPLATE_FOV_MM = (200.0, 240.0, 160.0)
_ANATOMY, _LESION, _NOISE = 10, 11, 12  # random streams, apart from the geometric generator's
_COARSE_MM = 3.0  # the template-coordinate map is smooth: computed every ~3 mm and upsampled
_BONE_KNEE_HU = 120.0  # above it the average's smeared bone is stretched back to cortical HU
_CAVITY_BONE_HU = 90.0  # the average's bone, even where smeared thin, is above it; brain is below
_CSF_SHELL = 0.1  # CSF probability that outlines the intracranial space on every slice
_NECK_Z_MM = -60.0  # below the foramen magnum: no cavity
_CSF_HU_RANGE, _CORTEX_HU_RANGE = (2.0, 10.0), (33.0, 40.0)
_READ_AS_BLOOD_MAX_HU = 100.0  # a slab averaged above it reads as bone (white in every brain window)
_SUB_SLICE_MM = 1.25  # finer than the template's 2 mm: the slab average of a thick slice sees its profile

# Sites in template (MNI) mm for the patient's right side (x > 0); left is x -> -x.
_IPH_SITES = {
    "basal ganglia": (24.0, 2.0, 2.0),
    "thalamus": (13.0, -18.0, 6.0),
    "frontal": (30.0, 32.0, 22.0),
    "parietal": (34.0, -46.0, 38.0),
    "temporal": (44.0, -16.0, -12.0),
    "occipital": (24.0, -78.0, 10.0),
    "cerebellum": (22.0, -62.0, -34.0),
}
_CONVEXITY_DIRECTIONS = {  # unit-ish directions from the head centre for extra-axial collections
    "frontal": (0.55, 0.75, 0.35),
    "parietal": (0.75, -0.35, 0.55),
    "temporal": (0.95, 0.0, -0.2),
    "occipital": (0.45, -0.85, 0.2),
}
_CENTRE_MNI = np.array([0.0, -18.0, 8.0])


@dataclass(frozen=True)
class _Template:
    hu: np.ndarray  # HU, smeared bone not yet restored
    csf: np.ndarray  # CSF probability 0..1
    depth_mm: np.ndarray  # below the inner table inside the cavity, negative outside
    vox_from_mni: np.ndarray  # 4x4


def cormack_to_hu(cormack: np.ndarray) -> np.ndarray:
    """The template's Cormack units (compressed bone range) back to HU, as its README gives them."""
    c = np.asarray(cormack, dtype=np.float64)
    x = np.where(c <= 3100.0, (c + 9000.0) / 11.0, (c - 900.0) / 2.0)
    return np.where(c <= 900.0, c - 1024.0, x - 1024.0).astype(np.float32)


@lru_cache(maxsize=1)
def load_template() -> _Template:
    ct = cast(nib.Nifti1Image, nib.load(TEMPLATE_DIR / "scct.nii.gz"))  # the shipped template is NIfTI
    hu = cormack_to_hu(ct.get_fdata())
    csf_image = cast(nib.Nifti1Image, nib.load(TEMPLATE_DIR / "sccsf.nii.gz"))
    csf = np.clip(csf_image.get_fdata(), 0.0, 1.0).astype(np.float32)
    # The average smears the thin temporal squama and skull base to 60-100 HU, so no bone threshold
    # closes a ring there; the CSF that lines the whole inner table does. On each axial slice the
    # CSF shell (probability above _CSF_SHELL) is closed and filled; bone and the neck are removed.
    slice_plane = np.ones((3, 3, 1), dtype=bool)
    shell = ndi.binary_closing(csf > _CSF_SHELL, slice_plane, border_value=0)
    cavity = ndi.binary_fill_holes(shell, slice_plane) & (hu < _CAVITY_BONE_HU)
    cavity[..., : int(np.rint(np.linalg.inv(ct.affine) @ [0, 0, _NECK_Z_MM, 1])[2])] = False
    labels, count = ndi.label(cavity)
    if count > 1:
        cavity = labels == 1 + int(np.argmax(ndi.sum_labels(cavity, labels, np.arange(1, count + 1))))
    # A slice whose shell stayed open is a hole between its neighbours: filled in 3-D.
    cavity = ndi.binary_fill_holes(ndi.binary_closing(cavity, iterations=2)) & (hu < _CAVITY_BONE_HU)
    step = float(abs(ct.affine[0, 0]))
    depth = ndi.distance_transform_edt(cavity) * step - ndi.distance_transform_edt(~cavity) * step
    return _Template(hu, csf, depth.astype(np.float32), np.linalg.inv(ct.affine))


def _restore_bone(hu: np.ndarray, gain: float) -> np.ndarray:
    """Stretch HU above the knee by ``gain``: the average's 300-420 HU skull back to 1000-1700 HU."""
    return np.where(hu > _BONE_KNEE_HU, _BONE_KNEE_HU + (hu - _BONE_KNEE_HU) * gain, hu).astype(np.float32)


def _draw_kind(index: int, seed: int, positive_fraction: float) -> str:
    """'none' for a share 1 - positive_fraction of indices (golden-ratio sequence), else a kind."""
    u = (np.random.default_rng([seed, _SPLIT_STREAM]).random() + index * _GOLDEN) % 1.0
    if u >= positive_fraction:
        return "none"
    v, cumulative = u / positive_fraction, 0.0
    for kind, share in _KIND_SHARES:
        cumulative += share
        if v < cumulative:
            return kind
    return _KIND_SHARES[-1][0]


def _template_coordinates(rng, shape, spacing, origin) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Template (MNI) mm of every voxel of the case's grid: a random pose, scale and smooth
    displacement of the head. The map is smooth, so it is computed every ~3 mm and upsampled."""
    yaw, pitch, roll = (math.radians(rng.uniform(-a, a)) for a in (8.0, 15.0, 6.0))
    cz, sz, cx, sx, cy, sy = (
        math.cos(yaw),
        math.sin(yaw),
        math.cos(pitch),
        math.sin(pitch),
        math.cos(roll),
        math.sin(roll),
    )
    rotation = (
        np.array([[cz, -sz, 0], [sz, cz, 0], [0, 0, 1]])
        @ np.array([[1, 0, 0], [0, cx, -sx], [0, sx, cx]])
        @ np.array([[cy, 0, sy], [0, 1, 0], [-sy, 0, cy]])
    )
    matrix = rotation / rng.uniform(0.92, 1.08, 3)[None, :]  # a head 8% larger is 8% less template
    centre = _CENTRE_MNI + rng.uniform(-3.0, 3.0, 3)
    waves = []
    for _ in range(6):
        direction = rng.standard_normal(3)
        wave = direction / np.linalg.norm(direction) * 2.0 * math.pi / rng.uniform(70.0, 160.0)
        waves.append((wave, rng.uniform(0.0, 2.0 * math.pi), rng.normal(0.0, 1.0, 3)))
    factors = [max(1, int(round(_COARSE_MM / sp))) for sp in spacing]
    plans, axes = [], []
    for n, f, sp, o in zip(shape, factors, spacing, origin):
        n_coarse, plan = _upsample_plan(n, f)
        plans.append(plan)
        axes.append(o + sp * f * np.arange(n_coarse))
    world = np.stack(np.meshgrid(*axes, indexing="ij"), axis=-1)
    template = world @ matrix.T + centre
    for wave, phase, amplitude in waves:
        template += np.sin(world @ wave + phase)[..., None] * amplitude
    x, y, z = (_upsample(np.ascontiguousarray(template[..., a], dtype=np.float32), plans) for a in range(3))
    return x, y, z


class _Head:
    """The case's voxels in template mm (qx, qy, qz) and the template's fields sampled there."""

    def __init__(self, q: tuple[np.ndarray, np.ndarray, np.ndarray]):
        self.qx, self.qy, self.qz = q
        template = load_template()
        a = template.vox_from_mni
        index = [a[i, 0] * self.qx + a[i, 1] * self.qy + a[i, 2] * self.qz + a[i, 3] for i in range(3)]
        self.hu = ndi.map_coordinates(template.hu, index, order=1, mode="nearest")
        self.csf = ndi.map_coordinates(template.csf, index, order=1, mode="nearest")
        self.depth = ndi.map_coordinates(template.depth_mm, index, order=1, mode="nearest")
        self.inside = self.depth > 0.0

    def near(self, centre, radius: float) -> tuple[np.ndarray, ...]:
        """Indices of the voxels within ``radius`` mm (template) of ``centre``."""
        d2 = (self.qx - centre[0]) ** 2 + (self.qy - centre[1]) ** 2 + (self.qz - centre[2]) ** 2
        return np.nonzero(d2 <= radius * radius)

    def offsets(self, where, centre) -> np.ndarray:
        return np.stack([self.qx[where] - centre[0], self.qy[where] - centre[1], self.qz[where] - centre[2]], axis=-1)

    def tentorium_z(self, where=...) -> np.ndarray:
        """Height (template z, mm) of the tentorium above (qx, qy): a tent from its apex behind the
        midbrain, down to the transverse sinuses behind and the petrous ridges at the sides."""
        qx, qy = self.qx[where], self.qy[where]
        return -4.0 + 0.22 * np.minimum(qy + 48.0, 0.0) - 0.3 * np.maximum(qy + 48.0, 0.0) - 0.42 * np.abs(qx)


def _ellipsoid(head: _Head, centre, semi, rng) -> tuple[np.ndarray, ...]:
    """Indices of a randomly oriented ellipsoid (template mm) inside the cavity."""
    where = head.near(centre, float(max(semi)))
    q, r = np.linalg.qr(rng.standard_normal((3, 3)))
    local = head.offsets(where, centre) @ (q * np.sign(np.diag(r)))
    keep = np.sum((local / semi) ** 2, axis=1) <= 1.0
    keep &= head.inside[where]
    return tuple(w[keep] for w in where)


def _paint_mimics(img: np.ndarray, head: _Head, rng) -> tuple[np.ndarray, list[str]]:
    """Falx, tentorium, dense venous sinuses and calcifications: painted into ``img``; returns a label
    image of what was painted (MIMIC_CODES) and the names of the mimics present."""
    labels = np.zeros(img.shape, dtype=np.uint8)
    present = []
    inside, depth, qx, qy, qz = head.inside, head.depth, head.qx, head.qy, head.qz
    sheet = rng.uniform(0.4, 0.8)
    falx = inside & (np.abs(qx) < sheet) & (depth < rng.uniform(30.0, 45.0)) & (qy > -95.0)
    img[falx] = rng.uniform(38.0, 58.0)
    labels[falx] = MIMIC_CODES["dura"]
    back = np.nonzero(inside & (qy < -20.0) & ~((np.abs(qx) < 14.0) & (qy > -55.0)))
    tent_z = head.tentorium_z(back)
    tentorium = np.abs(qz[back] - tent_z) < sheet
    img[tuple(w[tentorium] for w in back)] = rng.uniform(35.0, 55.0)
    labels[tuple(w[tentorium] for w in back)] = MIMIC_CODES["dura"]
    present += ["falx", "tentorium"]
    # Venous sinuses lie against the table or in the dural folds, as dense as blood in a concentrated patient.
    sinus_hu = rng.uniform(50.0, 70.0) if rng.random() < 0.8 else rng.uniform(40.0, 50.0)
    sagittal = inside & (depth < 5.0) & (np.abs(qx) < 0.9 * (5.0 - depth)) & ((qz > 15.0) | (qy < -70.0))
    transverse_box = np.nonzero(inside & (depth < 6.0) & (qy < -60.0))
    transverse = np.abs(qz[transverse_box] - head.tentorium_z(transverse_box)) < 3.0
    straight_box = np.nonzero(inside & (np.abs(qx) < 2.5) & (qy < -50.0) & (qy > -90.0))
    straight = np.abs(qz[straight_box] - head.tentorium_z(straight_box)) < 2.5
    for where in (
        np.nonzero(sagittal),
        tuple(w[transverse] for w in transverse_box),
        tuple(w[straight] for w in straight_box),
    ):
        img[where] = sinus_hu
        labels[where] = MIMIC_CODES["sinus"]
    present.append("dense venous sinuses" if sinus_hu >= 50.0 else "venous sinuses")
    # Calcifications: (name, right-side site, radius range mm, HU range, prevalence, both sides).
    for name, site, radii, hus, prevalence, paired in (
        ("pineal calcification", (0.0, -30.0, 3.0), (1.5, 3.5), (100.0, 400.0), 0.7, False),
        ("choroid plexus calcification", (27.0, -42.0, 14.0), (2.0, 4.0), (70.0, 250.0), 0.6, True),
        ("basal ganglia calcification", (19.0, -3.0, -1.0), (1.0, 2.5), (60.0, 150.0), 0.3, True),
        ("falx calcification", (0.0, 0.0, 0.0), (1.5, 4.0), (150.0, 600.0), 0.3, False),
    ):
        if rng.random() >= prevalence:
            continue
        hu, radius = rng.uniform(*hus), rng.uniform(*radii)
        centre = np.array(site) + rng.normal(0.0, 2.0, 3)
        if name == "falx calcification":  # a flat plaque on the falx below the vertex
            centre = np.array([0.0, rng.uniform(-40.0, 40.0), rng.uniform(45.0, 60.0)])
            semi = np.array([0.6, radius * 2.0, radius])
        else:
            semi = radius * rng.uniform(0.7, 1.3, 3)
        for sign in (1.0, -1.0) if paired else (1.0,):
            where = _ellipsoid(head, centre * [sign, 1.0, 1.0], semi, rng)
            img[where] = np.maximum(img[where], hu)
            labels[where] = MIMIC_CODES["calcification"]
        present.append(name)
    # The skull base: what the issue calls petrous and sellar regions, for the tests' 0 mL rule.
    petrous = (
        inside & (np.abs(qx) > 18.0) & (np.abs(qx) < 55.0) & (qy > -50.0) & (qy < -8.0) & (qz < -18.0) & (qz > -50.0)
    )
    sellar = inside & (np.abs(qx) < 12.0) & (qy > -18.0) & (qy < 6.0) & (qz < -4.0) & (qz > -28.0)
    labels[(petrous | sellar) & (labels == 0)] = MIMIC_CODES["skull base"]
    return labels, present


def _beam_hardening(img: np.ndarray, head: _Head, rng) -> None:
    """The dark band between the petrous bones and streaks across the posterior fossa."""
    inside, qx, qy, qz = head.inside, head.qx, head.qy, head.qz
    fossa = np.nonzero(inside & (qz < -12.0) & (qz > -55.0) & (qy < -5.0))
    x, y, z = qx[fossa], qy[fossa], qz[fossa]
    band = np.exp(-(((z + 30.0) / 5.0) ** 2) - ((y + 30.0) / 12.0) ** 2) * (np.abs(x) < 35.0)
    shade = -rng.uniform(8.0, 28.0) * band
    for _ in range(int(rng.integers(3, 8))):
        angle = rng.uniform(0.0, math.pi)
        apex = np.array([rng.choice([-1.0, 1.0]) * rng.uniform(15.0, 30.0), rng.uniform(-38.0, -22.0)])
        distance = (x - apex[0]) * math.sin(angle) - (y - apex[1]) * math.cos(angle)
        shade += rng.choice([-1.0, 1.0]) * rng.uniform(6.0, 18.0) * np.exp(-((distance / 0.8) ** 2))
    img[fossa] += shade.astype(np.float32)


def _bleed(head: _Head, kind: str, rng) -> tuple[np.ndarray, dict[str, Any]]:
    """The blood's voxels (bool) and its truth extras (side, region, blood HU, thickness)."""
    mask = np.zeros(head.qx.shape, dtype=bool)
    side = "right" if rng.random() < 0.5 else "left"
    sign = 1.0 if side == "right" else -1.0
    qx, qy, qz, depth, inside = head.qx, head.qy, head.qz, head.depth, head.inside
    extras: dict[str, Any] = {"side": side, "max_thickness_mm": None, "oedema": False, "hydrocephalus": False}
    if kind == "intraparenchymal":
        region = str(rng.choice(list(_IPH_SITES), p=[0.3, 0.12, 0.15, 0.15, 0.1, 0.08, 0.1]))
        top_ml = {"thalamus": 20.0, "cerebellum": 25.0, "basal ganglia": 50.0}.get(region, 70.0)
        volume_ml = float(math.exp(rng.uniform(math.log(2.0), math.log(top_ml))))
        radius = (3.0 * volume_ml * 1000.0 / (4.0 * math.pi)) ** (1.0 / 3.0)
        centre = np.array(_IPH_SITES[region]) * [sign, 1.0, 1.0] + rng.normal(0.0, 3.0, 3)
        parts = [_ellipsoid(head, centre, radius * rng.uniform(0.8, 1.2, 3), rng)]
        for _ in range(int(rng.integers(1, 3))):
            offset = rng.standard_normal(3)
            parts.append(
                _ellipsoid(
                    head,
                    centre + offset / np.linalg.norm(offset) * 0.5 * radius,
                    radius * rng.uniform(0.45, 0.7, 3),
                    rng,
                )
            )
        for part in parts:
            mask[part] = True
        mask &= depth > 1.5  # brain, not the extra-axial space
        extras["region"] = region
        extras["blood_hu"] = rng.uniform(58.0, 82.0)
        extras["oedema"] = bool(rng.random() < 0.6)
    elif kind in ("subdural", "epidural", "subarachnoid"):
        region = str(rng.choice(list(_CONVEXITY_DIRECTIONS)))
        direction = np.array(_CONVEXITY_DIRECTIONS[region]) * [sign, 1.0, 1.0] + rng.normal(0.0, 0.08, 3)
        direction /= np.linalg.norm(direction)
        half_angle = math.radians(
            {"subdural": rng.uniform(35.0, 60.0), "epidural": rng.uniform(18.0, 30.0)}.get(
                kind, rng.uniform(20.0, 35.0)
            )
        )
        where = np.nonzero(inside & (sign * qx > 3.0) & (qz > -30.0) & (depth < 30.0))
        offsets = head.offsets(where, _CENTRE_MNI)
        cosine = offsets @ direction / np.maximum(np.linalg.norm(offsets, axis=1), 1e-6)
        angle = np.arccos(np.clip(cosine, -1.0, 1.0)) / half_angle
        d = depth[where]
        if kind == "subdural":
            thickness = rng.uniform(2.0, 5.0) if rng.random() < 0.4 else rng.uniform(6.0, 16.0)
            # A crescent: nearly its full thickness over most of its arc, tapering at the edges.
            keep = (angle < 1.0) & (d < thickness * np.clip(1.0 - angle**4, 0.0, 1.0) ** 0.5)
            extras["max_thickness_mm"] = thickness
            extras["blood_hu"] = rng.uniform(58.0, 80.0)
        elif kind == "epidural":
            thickness = rng.uniform(10.0, 24.0)
            keep = (angle < 1.0) & (d < thickness * np.sqrt(np.clip(1.0 - angle**2, 0.0, 1.0)))  # a lens
            extras["blood_hu"] = rng.uniform(60.0, 85.0)
        else:
            # Sulcal blood: the CSF under one convexity patch (or in a Sylvian fissure) replaced by blood.
            if rng.random() < 0.35:
                region = "sylvian fissure"
                fissure = np.array([sign * 42.0, 4.0, -4.0])
                angle = np.linalg.norm(offsets + _CENTRE_MNI - fissure, axis=1) / 18.0
            keep = (angle < 1.0) & (head.csf[where] > rng.uniform(0.3, 0.45)) & (d < 16.0)
            extras["blood_hu"] = rng.uniform(48.0, 70.0)
        mask[tuple(w[keep] for w in where)] = True
        extras["region"] = "sulcal" if kind == "subarachnoid" else "convexity"
    else:  # intraventricular
        ventricles = inside & (head.csf > 0.55) & (depth > 15.0) & (np.abs(qx) < 32.0) & (qz > -12.0) & (qz < 30.0)
        ventricles &= (qy > -62.0) & ~((np.abs(qx) < 3.0) & (qz > 12.0))  # not the fissure above them
        if rng.random() < 0.3:
            extras["side"] = "bilateral"
        else:
            ventricles &= sign * qx > 0.0
        # Supine, blood layers in the dependent (posterior) horns; sometimes it casts the ventricle.
        level = np.inf if rng.random() < 0.25 else rng.uniform(-42.0, -22.0)
        mask = ventricles & (qy < level)
        extras["region"] = "lateral ventricle"
        extras["blood_hu"] = rng.uniform(55.0, 78.0)
        extras["hydrocephalus"] = False
    return mask, extras


MIMIC_CODES = {"dura": 1, "sinus": 2, "calcification": 3, "skull base": 4}
VARIANTS = ("full", "skull_stripped", "brain_window")


def _slab_mean(field: np.ndarray, sub: int) -> np.ndarray:
    """Each run of ``sub`` sub-slices made into one slice: the mean over the slab (a flat slice profile)."""
    return field.reshape(field.shape[:2] + (field.shape[2] // sub, sub)).mean(axis=-1, dtype=np.float32)


def _slab_labels(labels: np.ndarray, sub: int) -> np.ndarray:
    """Per slice, the mimic label carried by most of the slab's sub-slices that carry one."""
    codes = sorted(MIMIC_CODES.values())
    counts = np.stack([_slab_mean(labels == code, sub) for code in codes], axis=-1)
    return np.where(counts.max(axis=-1) > 0, np.asarray(codes, dtype=np.uint8)[counts.argmax(axis=-1)], 0).astype(
        np.uint8
    )


def synthesize_template_case(
    index: int,
    seed: int = 0,
    spacing_mm=(0.45, 0.45, 5.0),
    ich_type: str | None = None,
    positive_fraction: float = 0.6,
    fov_mm=DEFAULT_TEMPLATE_FOV_MM,
    variant: str | None = None,
) -> tuple[SyntheticCase, np.ndarray]:
    """Render case ``index`` of the template-anatomy dataset of ``seed``: the case and its mimic
    label image (``MIMIC_CODES``: dura, sinus, calcification, skull base; 0 elsewhere).

    ``ich_type``: one of ``TEMPLATE_KINDS``, ``'none'``, or None to draw it (golden-ratio sequence of
    ``(seed, index)``). ``variant``: one of ``VARIANTS`` or None to draw it (8% skull-stripped and
    clipped to the brain window 0-80 HU, 5% only clipped). The head (pose, mimics, noise) depends
    only on ``(seed, index)``: ``ich_type='none'`` gives the same head without the bleed.
    """
    if not isinstance(index, (int, np.integer)) or index < 0:
        raise ValueError(f"index must be a non-negative integer, got {index!r}")
    if not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
    if ich_type is not None and ich_type not in TEMPLATE_KINDS + ("none",):
        raise ValueError(f"ich_type must be one of {TEMPLATE_KINDS + ('none',)} or None, got {ich_type!r}")
    if variant is not None and variant not in VARIANTS:
        raise ValueError(f"variant must be one of {VARIANTS} or None, got {variant!r}")
    positive_fraction = _check_fraction("positive_fraction", positive_fraction)
    spacing, fov = _check_triple("spacing_mm", spacing_mm), _check_triple("fov_mm", fov_mm)
    shape = tuple(int(round(f / sp)) for f, sp in zip(fov, spacing))
    if min(shape) < 16:
        raise ValueError(
            f"spacing_mm={spacing} is too coarse for fov_mm={fov}: grid {shape} has an axis under 16 voxels"
        )
    index, seed = int(index), int(seed)
    kind = ich_type if ich_type is not None else _draw_kind(index, seed, positive_fraction)
    rng = np.random.default_rng([seed, index, _ANATOMY])
    origin = [-(n - 1) / 2.0 * sp for n, sp in zip(shape, spacing)]
    affine = np.diag([*spacing, 1.0])
    affine[:3, 3] = origin
    # A thick slice is the average of its slab (the scanner's slice profile), not a plane through its
    # centre: the head is drawn on sub-slices of at most _SUB_SLICE_MM and averaged per slice, so
    # bone, sinuses and the table blur into the brain above and below as on a real 5 mm scan.
    sub = math.ceil(spacing[2] / _SUB_SLICE_MM - 1e-6)
    sub += 1 - sub % 2  # odd: "at least half the slab" is then a strict majority, neither union nor intersection
    fine_shape = (shape[0], shape[1], shape[2] * sub)
    fine_spacing = (spacing[0], spacing[1], spacing[2] / sub)
    fine_origin = [origin[0], origin[1], origin[2] - (sub - 1) / 2.0 * fine_spacing[2]]
    head = _Head(_template_coordinates(rng, fine_shape, fine_spacing, fine_origin))
    img = _restore_bone(head.hu, rng.uniform(4.0, 6.0))
    # The average smears the inner table into a 60-150 HU band a few mm deep, which no real scan shows
    # (its table is sharp to a voxel): near the table the cavity is rebuilt from the CSF map (sulcal CSF
    # over cortex), blending into the template's own brain below 8 mm.
    surface = _CSF_HU_RANGE[0] + rng.uniform(0.0, 8.0), rng.uniform(*_CORTEX_HU_RANGE)
    near = np.clip((8.0 - head.depth) / 4.0, 0.0, 1.0)[head.inside]
    cortex = surface[0] * head.csf[head.inside] + surface[1] * (1.0 - head.csf[head.inside])
    img[head.inside] = near * cortex + (1.0 - near) * np.clip(head.hu[head.inside], -5.0, 55.0)
    # The inner table the average lost where skulls are thin: a cortical shell around the cavity,
    # except where the template has air (sinuses and air cells stay pneumatised).
    table = (head.depth <= 0.0) & (head.depth > -rng.uniform(2.5, 4.0)) & (head.hu > -300.0)
    img[table] = np.maximum(img[table], rng.uniform(900.0, 1400.0))
    mimics, present = _paint_mimics(img, head, rng)
    _beam_hardening(img, head, rng)
    drawn = rng.random()
    variant = variant or ("skull_stripped" if drawn < 0.08 else "brain_window" if drawn < 0.13 else "full")
    noise_hu = rng.uniform(3.5, 7.0)

    no_bleed: dict[str, Any] = {"side": "none", "region": "none"}
    mask, extras = (
        (np.zeros(fine_shape, dtype=bool), no_bleed)
        if kind == "none"
        else _bleed(head, kind, np.random.default_rng([seed, index, _LESION]))
    )
    if kind != "none":
        mask &= mimics != MIMIC_CODES["calcification"]  # blood surrounds a calcified plexus, it does not replace it
        mimics[mask] = 0  # blood over a dural fold or sinus wall is blood
        if extras.get("oedema"):
            # A rim of oedema around a parenchymal bleed (not in the mask).
            rim = ndi.binary_dilation(mask, iterations=3) & ~mask & head.inside
            img[rim] = np.minimum(img[rim], rng.uniform(16.0, 22.0))
        img[mask] = extras["blood_hu"]
    if sub > 1:
        # The bleed where it fills at least half the slab and the slice does not read as bone (a thin
        # subdural sliced obliquely against the table averages to bone's density: no reader draws it).
        img, blood, mimics = _slab_mean(img, sub), _slab_mean(mask, sub), _slab_labels(mimics, sub)
        mask = (blood >= 0.5) & (img <= _READ_AS_BLOOD_MAX_HU)
        mimics[mask] = 0
    img = _noise_and_blur(img, np.random.default_rng([seed, index, _NOISE]), noise_hu, spacing)
    if variant == "skull_stripped":
        img[_slab_mean(head.inside, sub) < 0.5] = 0.0
    if variant != "full":
        img = np.clip(img, 0.0, 80.0)
    image_hu = np.clip(np.rint(img), _HU_MIN, _HU_MAX).astype(np.int16)
    case_id = f"case_{index:03d}"
    meta = truth_record(
        case_id,
        index,
        kind,
        mask,
        affine,
        spacing,
        side=extras["side"],
        region=extras["region"],
        shift_mm=0.0,
        max_thickness_mm=extras.get("max_thickness_mm"),
        oedema=bool(extras.get("oedema")),
        hydrocephalus=bool(extras.get("hydrocephalus")),
        blood_hu=extras.get("blood_hu"),
        head_centre_mm=(0.0, 0.0, 0.0),
    )
    meta.update({"anatomy": "template", "variant": variant, "mimics": present})
    return SyntheticCase(case_id, image_hu, mask.astype(np.uint8), affine, spacing, meta), mimics
