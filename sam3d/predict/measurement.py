"""Measurement: a binary mask on the scan's grid → the radiologist's numbers, in world space."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..data.geometry import axial_axis
from ..data.io import Volume
from .abc2 import abc2
from .location import IntracranialFrame, classify_location, locate_component, region_of
from .postprocessing import intracranial_mask
from .records import ComponentMeasurement, Measurements

__all__ = ["HEAD_THRESHOLD_HU", "head_centre_x_mm", "measure", "measure_in_frame"]

HEAD_THRESHOLD_HU = -500.0  # voxels above this are the head (its midline splits left from right)


def head_centre_x_mm(volume: Volume) -> float:
    """World x (RAS mm) of the head's centre: the mean position of the voxels above HEAD_THRESHOLD_HU."""
    head = volume.array > HEAD_THRESHOLD_HU
    # The mean index along each axis from the head's projections, not from every head voxel's index
    # (tens of millions on a thin-slice scan).
    mean_index = [
        float(np.average(np.arange(n), weights=head.sum(axis=tuple(a for a in range(3) if a != axis))))
        for axis, n in enumerate(head.shape)
    ]
    return float(volume.affine[0, :3] @ mean_index + volume.affine[0, 3])


def measure(
    mask: np.ndarray, volume: Volume, head_midline_x_mm: float | None = None, intracranial: np.ndarray | None = None
) -> Measurements:
    """Radiologist's numbers for a binary mask on the input grid, in world space through ``volume``'s
    affine: a voxel's volume is |det(affine)|, side and extents come from world positions; each
    component gets its ABC/2 and location class (:mod:`.location`). ``intracranial``: the scan's
    ``intracranial_mask`` computed before (computed here if None and the mask is not empty)."""
    if not mask.any():
        return Measurements(0.0, 0, [], "none", None, 0.0, None, None)
    if head_midline_x_mm is None:
        head_midline_x_mm = head_centre_x_mm(volume)
    if intracranial is None:
        intracranial = intracranial_mask(volume)
    frame = IntracranialFrame.from_scan(volume, intracranial, head_midline_x_mm)
    return measure_in_frame(mask, volume, frame, head_midline_x_mm)


def measure_in_frame(
    mask: np.ndarray, volume: Volume, frame: IntracranialFrame | None, head_midline_x_mm: float | None = None
) -> Measurements:
    """:func:`measure` with the scan's :class:`IntracranialFrame` computed before (None: no skull to
    measure from), as a prepared scan keeps it from click to click."""
    mask = mask.astype(bool)
    # Components are found in the mask's bounding box (a click's prediction is a small part of a
    # thin-slice scan); their voxel indices are the scan's.
    found = ndimage.find_objects(mask.astype(np.uint8))
    if not found:
        return Measurements(0.0, 0, [], "none", None, 0.0, None, None)
    (extent,) = found
    offset = np.array([s.start for s in extent])
    labels, count = ndimage.label(mask[extent], structure=np.ones((3, 3, 3)))
    voxel_ml = volume.voxel_volume_ml
    if head_midline_x_mm is None:
        head_midline_x_mm = frame.midline_x_mm if frame is not None else head_centre_x_mm(volume)
    axial = axial_axis(volume.affine)
    components = []
    for number, box in enumerate(ndimage.find_objects(labels), start=1):
        voxels = np.argwhere(labels[box] == number) + [s.start for s in box] + offset
        components.append(_component(voxels, volume, frame, head_midline_x_mm, axial, mask))
    components.sort(key=lambda c: c.volume_ml, reverse=True)
    idx = np.argwhere(mask[extent]) + offset
    world = idx @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    slices = idx[:, axial]
    return Measurements(
        total_volume_ml=round(float(mask.sum()) * voxel_ml, 2),
        num_components=int(count),
        component_volumes_ml=[c.volume_ml for c in components],
        side=_side(world, head_midline_x_mm),
        slice_extent=[int(slices.min()), int(slices.max())],
        # One slice's own superior-inferior reach added: the centres span one step less than the voxels.
        craniocaudal_extent_mm=round(float(world[:, 2].max() - world[:, 2].min() + abs(volume.affine[2, axial])), 1),
        centroid_voxel=[round(float(v), 1) for v in idx.mean(0)],
        centroid_mm=[round(float(v), 1) for v in world.mean(0)],
        abc2_ml=round(sum(c.abc2_ml for c in components), 2),
        location=components[0].location,
        components=components,
    )


def _side(world: np.ndarray, head_midline_x_mm: float) -> str:
    # RAS+: world x grows toward the patient's right. A side holding < 10% of the blood is noise.
    right = float((world[:, 0] > head_midline_x_mm).mean())
    return "bilateral" if 0.1 <= right <= 0.9 else ("right" if right > 0.9 else "left")


def _component(
    voxels: np.ndarray,
    volume: Volume,
    frame: IntracranialFrame | None,
    head_midline_x_mm: float,
    axial: int,
    mask: np.ndarray,
) -> ComponentMeasurement:
    world = voxels @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    centroid = world.mean(0)
    estimate = abc2(voxels, volume.affine)
    evidence = locate_component(voxels, volume, frame, estimate, head_midline_x_mm, mask)
    location = classify_location(evidence)
    return ComponentMeasurement(
        volume_ml=round(len(voxels) * volume.voxel_volume_ml, 2),
        abc2_ml=round(estimate.volume_ml, 2),
        abc2_axes_mm=[round(estimate.a_mm, 1), round(estimate.b_mm, 1), round(estimate.c_mm, 1)],
        side=_side(world, head_midline_x_mm),
        location=location,
        region=region_of(location, centroid, evidence, frame),
        centroid_mm=[round(float(v), 1) for v in centroid],
        slice_extent=[int(voxels[:, axial].min()), int(voxels[:, axial].max())],
        evidence=evidence,
    )
