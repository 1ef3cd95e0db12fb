"""Measurement: a binary mask on the scan's grid → the radiologist's numbers, in world space."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from ..data.geometry import axial_axis
from ..data.io import Volume
from .records import Measurements

__all__ = ["HEAD_THRESHOLD_HU", "head_centre_x_mm", "measure"]

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


def measure(mask: np.ndarray, volume: Volume, head_midline_x_mm: float | None = None) -> Measurements:
    """Radiologist's numbers for a binary mask on the input grid, in world space through ``volume``'s
    affine: a voxel's volume is |det(affine)|, side and extents come from world positions."""
    mask = mask.astype(bool)
    labels, count = ndimage.label(mask, structure=np.ones((3, 3, 3)))
    voxel_ml = volume.voxel_volume_ml
    sizes = ndimage.sum_labels(mask, labels, index=range(1, count + 1)) if count else []
    component_ml = sorted((round(float(s) * voxel_ml, 2) for s in sizes), reverse=True)
    if count == 0:
        return Measurements(0.0, 0, [], "none", None, 0.0, None, None)
    idx = np.argwhere(mask)
    world = idx @ volume.affine[:3, :3].T + volume.affine[:3, 3]
    if head_midline_x_mm is None:
        head_midline_x_mm = head_centre_x_mm(volume)
    # RAS+: world x grows toward the patient's right. A side holding < 10% of the blood is noise.
    right = float((world[:, 0] > head_midline_x_mm).mean())
    side = "bilateral" if 0.1 <= right <= 0.9 else ("right" if right > 0.9 else "left")
    axial = axial_axis(volume.affine)
    slices = idx[:, axial]
    return Measurements(
        total_volume_ml=round(float(mask.sum()) * voxel_ml, 2),
        num_components=int(count),
        component_volumes_ml=component_ml,
        side=side,
        slice_extent=[int(slices.min()), int(slices.max())],
        # One slice's own superior-inferior reach added: the centres span one step less than the voxels.
        craniocaudal_extent_mm=round(float(world[:, 2].max() - world[:, 2].min() + abs(volume.affine[2, axial])), 1),
        centroid_voxel=[round(float(v), 1) for v in idx.mean(0)],
        centroid_mm=[round(float(v), 1) for v in world.mean(0)],
    )
