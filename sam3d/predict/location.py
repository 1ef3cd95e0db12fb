"""Where a hemorrhage lies: each component's location class (the subtype a report names), its region
and the numbers the class is decided from, read from the mask and the scan's own geometry.

A radiologist calls the subtype from the compartment the blood occupies, and the compartments show on
the scan itself:

- the inner table is the edge of the intracranial space (:func:`postprocessing.intracranial_mask`).
  Blood lying against it over a good share of its surface is extra-axial: a crescent that follows
  the convexity is subdural, a lens that bulges into the brain epidural; thin blood that reaches
  from the surface down into the sulci is subarachnoid;
- the ventricles are the CSF-density regions deep to the cortex near the midline (an in-plane
  opening removes the thin CSF of sulci and fissure). Blood in a ventricle replaces its CSF, and a
  ventricle cast with blood shows no CSF at all, so a component also counts as lying in a ventricle
  where its mirror image across the midline does: the lateral ventricles are near-symmetric;
- blood that is neither is intraparenchymal; its lobe is the direction of its centroid from the
  centre of the intracranial space, deep bleeds are basal ganglia or thalamus.

A lobar hematoma often reaches the cortex: a component that touches the table over only a small share
of its surface (under the extra-axial share, whatever its shape) is intraparenchymal; an extra-axial
collection lies against the table. A component that fits no pattern (a globular bleed lying against the
table over much of its surface, or a scan without a skull to measure from) is "indeterminate" rather
than guessed.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from ..data.geometry import axial_axis
from ..data.io import Volume
from .abc2 import Abc2
from .postprocessing import MIN_INTRACRANIAL_ML
from .records import LocationEvidence

__all__ = ["IntracranialFrame", "classify_location", "locate_component", "region_of", "ventricle_estimate"]

CSF_HU = (-20.0, 15.0)  # CSF is 0-15 HU; oedema (16-22) and brain (20-45) stay out after the blur
CSF_BLUR_MM = 1.0  # in-plane, against the 4-8 HU noise of a thin-slice scan
VENTRICLE_MIN_DEPTH_MM = 15.0  # below the inner table: deeper than the CSF rim and most sulci
VENTRICLE_OPENING_MM = 1.0  # removes CSF clefts under 2 mm wide (sulci, the fissure beside the falx)
VENTRICLE_MIN_ML = 0.2
VENTRICLE_MIDLINE_MM = 35.0  # the atria lie ~20 mm off the midline, a large bleed shifts them ~12 mm
VENTRICLE_REACH_MM = 3.0  # the ventricle wall and the asymmetry of the two sides
INTRAVENTRICULAR_SHARE = 0.5
TABLE_CONTACT_MM = 2.5  # a surface voxel this close to the table lies against it (at least 1.5 pixels)
EXTRA_AXIAL_CONTACT = 0.2  # a crescent or lens lies against the table with about half its surface
# Shape on the largest slice: a crescent is long and thin or wraps around (its convex hull holds
# the brain it curves over), a lens is convex and at most a few times longer than thick.
CRESCENT_ASPECT, LENS_MIN_ASPECT, CRESCENT_SOLIDITY = 6.0, 2.0, 0.8
SUBARACHNOID_MAX_THICKNESS_MM, SUBARACHNOID_DEPTH_RATIO = 4.0, 2.5
INTERHEMISPHERIC_MM = 10.0  # an extra-axial collection centred this close to the midline lies along the falx
DEEP_RADIUS = 0.4  # centroid within this share of the intracranial semi-axes from the centre: deep grey


@dataclass(frozen=True)
class IntracranialFrame:
    """The scan's inner-table geometry: the distance (mm) of every intracranial voxel to the table,
    the ventricles estimated from the scan, the midsagittal plane (world x) and the centre and
    semi-axes (RAS mm) of the intracranial space."""

    table_depth_mm: np.ndarray
    ventricles: np.ndarray
    midline_x_mm: float
    centre_mm: np.ndarray
    semi_axes_mm: np.ndarray

    @classmethod
    def from_scan(cls, volume: Volume, intracranial: np.ndarray, midline_x_mm: float) -> IntracranialFrame | None:
        """None when the scan shows no skull to measure from (under MIN_INTRACRANIAL_ML enclosed)."""
        if float(intracranial.sum()) * volume.voxel_volume_ml < MIN_INTRACRANIAL_ML:
            return None
        steps = np.linalg.norm(volume.affine[:3, :3], axis=0)
        # Distances along the grid's own steps: a sheared grid's diagonal is off by the tilt's cosine.
        # In the cavity's bounding box grown by one voxel, whose border is all outside the cavity: every
        # cavity voxel's nearest outside voxel is within it, and the scan around the head is skipped.
        (box,) = ndimage.find_objects(intracranial.astype(np.uint8))
        box = tuple(slice(max(0, b.start - 1), min(n, b.stop + 1)) for b, n in zip(box, intracranial.shape))
        depth = np.zeros(intracranial.shape, np.float32)
        depth[box] = ndimage.distance_transform_edt(intracranial[box], sampling=steps)
        # Every other voxel in plane is plenty for a centre and an extent.
        stride = tuple(slice(None, None, 2) if axis != axial_axis(volume.affine) else slice(None) for axis in range(3))
        sample = np.argwhere(intracranial[stride]) * [2 if s.step else 1 for s in stride]
        world = sample @ volume.affine[:3, :3].T + volume.affine[:3, 3]
        low, high = world.min(0), world.max(0)
        centre = np.array([midline_x_mm, *((low + high) / 2)[1:]])
        ventricles = ventricle_estimate(volume, depth, midline_x_mm)
        return cls(depth, ventricles, midline_x_mm, centre, (high - low) / 2)


def ventricle_estimate(volume: Volume, table_depth_mm: np.ndarray, midline_x_mm: float) -> np.ndarray:
    """The ventricular system as the scan shows it: CSF-density voxels at least VENTRICLE_MIN_DEPTH_MM
    below the inner table, opened in plane, in connected regions of VENTRICLE_MIN_ML or more whose
    centroid lies within VENTRICLE_MIDLINE_MM of the midline."""
    axial = axial_axis(volume.affine)
    steps = np.linalg.norm(volume.affine[:3, :3], axis=0)
    deep = table_depth_mm >= VENTRICLE_MIN_DEPTH_MM
    box = ndimage.find_objects(deep.astype(np.uint8))
    if not box or box[0] is None:
        return np.zeros_like(deep)
    region = box[0]
    sigma = [0.0 if axis == axial else CSF_BLUR_MM / s for axis, s in enumerate(steps)]
    hu = ndimage.gaussian_filter(volume.array[region].astype(np.float32), sigma)
    csf = deep[region] & (hu >= CSF_HU[0]) & (hu <= CSF_HU[1])
    radius = [0 if axis == axial else int(VENTRICLE_OPENING_MM // s) for axis, s in enumerate(steps)]
    disc = np.ones([2 * r + 1 for r in radius], dtype=bool)
    grid = np.ogrid[tuple(slice(-r, r + 1) for r in radius)]
    disc &= sum((g * s) ** 2 for g, s in zip(grid, steps)) <= VENTRICLE_OPENING_MM**2
    csf = ndimage.binary_opening(csf, disc)
    labels, count = ndimage.label(csf, structure=np.ones((3, 3, 3)))
    ventricles = np.zeros_like(deep)
    if count == 0:
        return ventricles
    index = np.arange(1, count + 1)
    sizes_ml = np.asarray(ndimage.sum_labels(csf, labels, index)) * volume.voxel_volume_ml
    centroids = np.asarray(ndimage.center_of_mass(csf, labels, index)).reshape(-1, 3)
    offset = np.array([s.start for s in region], dtype=float)
    centroid_x = (centroids + offset) @ volume.affine[0, :3] + volume.affine[0, 3]
    keep = index[(sizes_ml >= VENTRICLE_MIN_ML) & (np.abs(centroid_x - midline_x_mm) <= VENTRICLE_MIDLINE_MM)]
    ventricles[region] = np.isin(labels, keep)
    return ventricles


def _near(target: Callable[[tuple[slice, ...]], np.ndarray], volume: Volume, world: np.ndarray) -> np.ndarray:
    """For each world point (N x 3), whether it lies within VENTRICLE_REACH_MM of a target voxel;
    ``target(box)`` gives the target voxels in a part of the grid. Only the points' bounding box grown
    by the reach is looked at: every target voxel within reach of a point lies in it, so the answer is
    the whole scan's at the cost of the component's neighbourhood."""
    index = np.rint((world - volume.affine[:3, 3]) @ np.linalg.inv(volume.affine[:3, :3]).T).astype(int)
    steps = np.linalg.norm(volume.affine[:3, :3], axis=0)
    reach = np.array([int(np.ceil(VENTRICLE_REACH_MM / s)) + 1 for s in steps])
    shape = np.array(volume.array.shape[:3])
    low, high = np.maximum(index.min(0) - reach, 0), np.minimum(index.max(0) + reach + 1, shape)
    near = np.zeros(len(world), dtype=bool)
    if np.any(high <= low):  # every point outside the grid (a mirror image past its edge)
        return near
    region = tuple(slice(int(a), int(b)) for a, b in zip(low, high))
    targets = target(region)
    if not targets.any():
        return near
    distance = ndimage.distance_transform_edt(~targets, sampling=steps)
    local = index - low
    inside = np.all((local >= 0) & (local < distance.shape), axis=1)
    near[inside] = distance[tuple(local[inside].T)] <= VENTRICLE_REACH_MM
    return near


def locate_component(
    voxels: np.ndarray,
    volume: Volume,
    frame: IntracranialFrame | None,
    measured: Abc2,
    midline_x_mm: float,
    mask: np.ndarray | None = None,
) -> LocationEvidence:
    """The evidence for one component (``voxels``: N x 3 indices on ``volume``'s grid; ``measured``:
    its ABC/2, whose largest slice gives span and shape; ``mask``: the whole hemorrhage mask, whose
    other deep components can fill the opposite ventricle); table and ventricle figures are None
    without a ``frame``."""
    steps = np.linalg.norm(volume.affine[:3, :3], axis=0)
    world = voxels @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    low = voxels.min(0) - 1
    component = np.zeros(tuple(voxels.max(0) - low + 2), dtype=bool)
    component[tuple((voxels - low).T)] = True
    thickness = 2.0 * float(ndimage.distance_transform_edt(component, sampling=steps).max())
    offsets = world[:, 0] - midline_x_mm
    crosses = bool(offsets.min() < 0.0 < offsets.max())
    aspect = measured.a_mm / max(thickness, 1e-6)
    solidity = measured.largest_area_mm2 / max(measured.hull_area_mm2, 1e-6)
    if aspect >= CRESCENT_ASPECT or (aspect >= LENS_MIN_ASPECT and solidity < CRESCENT_SOLIDITY):
        shape = "crescentic"
    elif aspect >= LENS_MIN_ASPECT:
        shape = "lentiform"
    else:
        shape = "globular"
    evidence = LocationEvidence(
        inner_table_distance_mm=None,
        depth_mm=None,
        thickness_mm=round(thickness, 1),
        span_mm=round(measured.a_mm, 1),
        table_contact_fraction=None,
        ventricle_overlap_fraction=None,
        midline_distance_mm=0.0 if crosses else round(float(np.abs(offsets).min()), 1),
        crosses_midline=crosses,
        shape=shape,
    )
    if frame is None:
        return evidence
    depth = frame.table_depth_mm[tuple(voxels.T)]
    surface = component & ~ndimage.binary_erosion(component)
    surface_depth = frame.table_depth_mm[tuple((np.argwhere(surface) + low).T)]
    contact_mm = max(TABLE_CONTACT_MM, 1.5 * float(np.sort(steps)[1]))
    mirrored = world * [-1.0, 1.0, 1.0] + [2.0 * midline_x_mm, 0.0, 0.0]

    # Blood casting both lateral ventricles leaves no CSF on either side to mirror into: deep blood of
    # the other components counts as ventricle for the mirror image, and so does the component's own
    # when it crosses the midline (both ventricles cast as one component mirror onto each other).
    def opposite(box: tuple[slice, ...]) -> np.ndarray:
        targets = frame.ventricles[box].copy()
        if mask is not None:
            targets |= mask[box] & (frame.table_depth_mm[box] >= VENTRICLE_MIN_DEPTH_MM)
            if not crosses:
                own = voxels - [b.start for b in box]
                own = own[np.all((own >= 0) & (own < targets.shape), axis=1)]
                targets[tuple(own.T)] = frame.ventricles[box][tuple(own.T)]
        return targets

    in_ventricle = _near(lambda box: frame.ventricles[box], volume, world) | _near(opposite, volume, mirrored)
    evidence.inner_table_distance_mm = round(float(depth.min()), 1)
    evidence.depth_mm = round(float(depth.max()), 1)
    evidence.table_contact_fraction = round(float(np.mean(surface_depth <= contact_mm)), 3)
    evidence.ventricle_overlap_fraction = round(float(in_ventricle.mean()), 3)
    return evidence


def classify_location(evidence: LocationEvidence) -> str:
    """The location class (one of ``records.LOCATIONS``) the evidence supports."""
    if evidence.ventricle_overlap_fraction is None or evidence.table_contact_fraction is None:
        return "indeterminate"
    assert evidence.depth_mm is not None and evidence.inner_table_distance_mm is not None  # set together
    if evidence.ventricle_overlap_fraction >= INTRAVENTRICULAR_SHARE:
        return "intraventricular"
    if evidence.inner_table_distance_mm > TABLE_CONTACT_MM:
        return "intraparenchymal"
    sulcal = evidence.depth_mm >= SUBARACHNOID_DEPTH_RATIO * evidence.thickness_mm
    if evidence.thickness_mm <= SUBARACHNOID_MAX_THICKNESS_MM and sulcal:
        return "subarachnoid"
    if evidence.table_contact_fraction >= EXTRA_AXIAL_CONTACT:
        return {"crescentic": "subdural", "lentiform": "epidural"}.get(evidence.shape, "indeterminate")
    return "intraparenchymal"


def region_of(
    location: str, centroid_mm: np.ndarray, evidence: LocationEvidence, frame: IntracranialFrame | None
) -> str:
    """The lobe or compartment of a component of class ``location`` centred at ``centroid_mm``."""
    if frame is None or location == "indeterminate":
        return "indeterminate"
    if location == "intraventricular":
        return "ventricular system" if evidence.crosses_midline else "lateral ventricle"
    if location in ("subdural", "epidural"):
        # Along the falx, not a convexity collection that reaches the midline at the vertex.
        along_falx = abs(float(centroid_mm[0]) - frame.midline_x_mm) < INTERHEMISPHERIC_MM
        return "interhemispheric" if along_falx else "convexity"
    if location == "subarachnoid":
        return "sulcal"
    # Direction from the centre in the intracranial space's own proportions: x right, y anterior, z up.
    x, y, z = (centroid_mm - frame.centre_mm) / frame.semi_axes_mm
    radius = float(np.sqrt(x * x + y * y + z * z))
    if radius < DEEP_RADIUS:
        return "thalamus" if y < -0.1 else "basal ganglia"
    x, y, z = x / radius, y / radius, z / radius
    if z < -0.5 and y < -0.3:
        return "posterior fossa"
    if y > 0.5:
        return "frontal"
    if y < -0.6:
        return "occipital"
    if z < -0.1 and abs(x) > 0.6:
        return "temporal"
    return "parietal"
