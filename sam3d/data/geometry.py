"""What a scan's voxel grid is in world space, and the record of how it was obtained.

An affine here maps voxel indices (i, j, k, 1) to RAS+ millimetres (nibabel's convention). It may
be sheared: a gantry-tilted CT stacks tilted image planes along the table, so the slice axis is not
perpendicular to the image plane. Everything that turns voxels into millimetres or millilitres goes
through the functions below, which hold for any affine, never through products of voxel sizes.
"""

from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

__all__ = [
    "Geometry",
    "GeometryWarning",
    "axial_axis",
    "corner_distance_mm",
    "grid_corners",
    "slice_tilt_deg",
    "voxel_volume_ml",
]


class GeometryWarning(UserWarning):
    """A scan whose geometry needed a decision: gantry tilt, uneven steps, series left out, sform/qform."""


def voxel_volume_ml(affine: np.ndarray) -> float:
    """Volume of one voxel in mL: |det| of the affine's 3x3 part (exact for sheared grids too)."""
    return abs(float(np.linalg.det(np.asarray(affine, dtype=np.float64)[:3, :3]))) / 1000.0


def axial_axis(affine: np.ndarray) -> int:
    """The voxel axis whose step points most nearly superior (the axis that numbers axial slices)."""
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    return int(np.argmax(np.abs(directions[2]) / np.linalg.norm(directions, axis=0)))


def slice_tilt_deg(affine: np.ndarray, axis: int | None = None) -> float:
    """Angle between the slice axis and the normal of the other two: the gantry tilt of a sheared grid."""
    directions = np.asarray(affine, dtype=np.float64)[:3, :3]
    axis = axial_axis(affine) if axis is None else axis
    a, b = (directions[:, i] for i in range(3) if i != axis)
    normal = np.cross(a, b)
    step = directions[:, axis]
    cosine = abs(float(normal @ step)) / (np.linalg.norm(normal) * np.linalg.norm(step))
    return float(np.degrees(np.arccos(min(1.0, float(cosine)))))


def grid_corners(shape: tuple[int, ...]) -> np.ndarray:
    """Voxel indices (3, 8) of the first and last voxel along each of the grid's three axes."""
    return np.array(np.meshgrid(*[[0, n - 1] for n in shape[:3]], indexing="ij"), dtype=np.float64).reshape(3, -1)


def corner_distance_mm(first: np.ndarray, second: np.ndarray, shape: tuple[int, ...]) -> float:
    """Largest distance between the world positions the two affines give the grid's 8 corners."""
    corners = grid_corners(shape)
    corners = np.vstack([corners, np.ones(corners.shape[1])])
    return float(np.max(np.linalg.norm((first @ corners - second @ corners)[:3], axis=0)))


@dataclass
class Geometry:
    """How a volume's grid was obtained from its file: shown in measurements, reports and the app.

    ``tilt_deg`` is measured from the slice positions (DICOM) or the affine's shear (NIfTI);
    ``slice_steps_mm`` lists each distinct step along the slice normal with its count, in slice
    order; ``resampled`` says the grid is not the file's own (uneven steps equalised, missing
    slices interpolated). ``series``/``series_left_out`` describe DICOM series choice, ``objects_skipped``
    the files beside it that are not CT slices. ``not_a_head_ct`` lists what rules the volume out as a
    whole head CT (``sam3d.predict.check_head_ct``), each also a note.
    """

    format: str
    affine_from: str = ""
    tilt_deg: float = 0.0
    gantry_tilt_tag_deg: float | None = None
    slice_steps_mm: list[list[float]] = field(default_factory=list)
    resampled: bool = False
    resampled_step_mm: float | None = None
    interpolated_gaps_mm: list[list[float]] = field(default_factory=list)
    dropped_duplicates: list[str] = field(default_factory=list)
    series: dict[str, Any] | None = None
    series_left_out: list[dict[str, Any]] = field(default_factory=list)
    objects_skipped: dict[str, int] = field(default_factory=dict)  # files not read as slices, by kind
    rescale_varies: bool = False
    photometric: str | None = None
    multiframe: bool = False
    notes: list[str] = field(default_factory=list)
    not_a_head_ct: list[str] = field(default_factory=list)

    def warn(self, message: str) -> None:
        """Record ``message`` and raise it as a :class:`GeometryWarning` (what a user must know); a
        message already recorded (the same scan segmented again) is not repeated."""
        if message in self.notes:
            return
        self.notes.append(message)
        warnings.warn(message, GeometryWarning, stacklevel=3)

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """One line for a CLI or the app, e.g. ``DICOM series 1.2.3 'HEAD 5mm' (28 files); tilt 18.5°``."""
        parts = []
        if self.series:
            parts.append(
                f"DICOM series {self.series['uid']} '{self.series['description']}' ({self.series['files']} files)"
            )
        else:
            parts.append(self.format + (f" ({self.affine_from})" if self.affine_from else ""))
        if self.tilt_deg >= 0.1:
            parts.append(f"gantry tilt {self.tilt_deg:.1f}°")
        if len(self.slice_steps_mm) > 1:
            parts.append("slice steps " + ", ".join(f"{s:g} mm x{int(n)}" for s, n in self.slice_steps_mm))
        if self.resampled:
            parts.append(f"resampled to {self.resampled_step_mm:g} mm steps")
        if self.series_left_out:
            parts.append(f"{len(self.series_left_out)} other series left out")
        if self.objects_skipped:
            parts.append("skipped " + ", ".join(f"{n} {kind}" for kind, n in sorted(self.objects_skipped.items())))
        return "; ".join(parts)
