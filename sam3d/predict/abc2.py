"""ABC/2 (Kothari et al., Stroke 1996): the bedside estimate of a hemorrhage's volume, in world mm.

A is the longest diameter on the axial slice where the hemorrhage's area is largest, B the longest
diameter perpendicular to A on that slice, C the number of slices holding it, each weighted by its
area against that largest one (>= 75%: 1, 25-75%: 0.5, < 25%: 0), times the slice thickness;
the volume is A x B x C / 2. The slices are the scan's own (acquired, possibly tilted) planes, the
thickness is the distance between them along their normal (a sheared grid's step is longer), and
diameters are measured in the plane in millimetres, so storage order, tilt and spacing do not change
the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy.spatial import ConvexHull

from ..data.geometry import axial_axis

__all__ = ["Abc2", "abc2"]

# Kothari's weights: a slice counts fully from 75% of the largest area, half from 25%.
FULL_SLICE_SHARE, HALF_SLICE_SHARE = 0.75, 0.25
_PIXEL_CORNERS = np.array([[-0.5, -0.5], [-0.5, 0.5], [0.5, -0.5], [0.5, 0.5]])


@dataclass(frozen=True)
class Abc2:
    """ABC/2 of one hemorrhage: the three diameters (mm), the estimate (mL), and the largest slice
    (its index on the axial axis, its area and the area of its convex hull, in mm^2)."""

    a_mm: float
    b_mm: float
    c_mm: float
    volume_ml: float
    largest_slice: int
    largest_area_mm2: float
    hull_area_mm2: float


def abc2(voxels: np.ndarray, affine: np.ndarray) -> Abc2:
    """ABC/2 of the voxels ``voxels`` (N x 3 indices of one hemorrhage on the grid of ``affine``).

    Diameters are Feret diameters of the union of the slice's pixels (a pixel is a parallelogram of
    the two in-plane steps), so a one-pixel hemorrhage has the pixel's extent, not zero.
    """
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    axial = axial_axis(affine)
    row, col = (axis for axis in range(3) if axis != axial)
    # An orthonormal basis of the slice plane: in-plane positions in mm whatever the storage order.
    e1 = directions[:, row] / np.linalg.norm(directions[:, row])
    e2 = directions[:, col] - (directions[:, col] @ e1) * e1
    e2 /= np.linalg.norm(e2)
    in_plane = np.array([[directions[:, row] @ e1, directions[:, col] @ e1], [0.0, directions[:, col] @ e2]])
    pixel_area_mm2 = abs(float(np.linalg.det(in_plane)))
    thickness_mm = abs(float(np.linalg.det(directions))) / pixel_area_mm2

    first = int(voxels[:, axial].min())
    counts = np.bincount(voxels[:, axial] - first)
    largest = int(np.argmax(counts))
    share = counts / counts[largest]
    weights = np.where(share >= FULL_SLICE_SHARE, 1.0, np.where(share >= HALF_SLICE_SHARE, 0.5, 0.0))

    pixels = voxels[voxels[:, axial] == first + largest][:, [row, col]].astype(np.float64)
    corners = (pixels[:, None, :] + _PIXEL_CORNERS[None]).reshape(-1, 2) @ in_plane.T
    hull = ConvexHull(corners)
    vertices = corners[hull.vertices]
    # A is the longest distance between hull vertices; B the hull's extent perpendicular to it.
    gaps = vertices[:, None, :] - vertices[None, :, :]
    lengths = np.linalg.norm(gaps, axis=2)
    i, j = np.unravel_index(int(np.argmax(lengths)), lengths.shape)
    a_mm = float(lengths[i, j])
    across = np.array([-gaps[i, j, 1], gaps[i, j, 0]]) / a_mm
    b_mm = float(np.ptp(vertices @ across))
    c_mm = float(weights.sum()) * thickness_mm
    return Abc2(
        a_mm=a_mm,
        b_mm=b_mm,
        c_mm=c_mm,
        volume_ml=a_mm * b_mm * c_mm / 2.0 / 1000.0,
        largest_slice=first + largest,
        largest_area_mm2=float(counts[largest]) * pixel_area_mm2,
        hull_area_mm2=float(hull.volume),  # a 2-D hull's "volume" is its area
    )
