"""The records that cross from segmentation to measurement, reporting and the app (no torch, no model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..data.io import Volume

__all__ = ["Click", "Measurements", "SegmentationResult"]


@dataclass
class Click:
    """A click in the input file's voxel indices (``space='voxel'``) or in RAS world mm (``'mm'``)."""

    position: tuple[float, float, float]
    positive: bool = True
    space: str = "voxel"


@dataclass
class Measurements:
    total_volume_ml: float
    num_components: int
    component_volumes_ml: list[float]
    side: str  # left / right / bilateral / none, in patient coordinates
    slice_extent: list[int] | None  # first and last axial slice index (input grid) holding hemorrhage
    craniocaudal_extent_mm: float
    centroid_voxel: list[float] | None
    centroid_mm: list[float] | None


@dataclass
class SegmentationResult:
    """What the CLI writes: the mask (input shape and affine), its measurements and where files went.

    ``volume`` is the scan as read (array, affine, geometry record, DICOM series) so writing the
    outputs reads nothing again.
    """

    source: str
    mask: np.ndarray = field(repr=False)
    volume: Volume = field(repr=False)
    measurements: Measurements
    mode: str
    postprocessing: dict[str, Any] = field(default_factory=dict)
    files: dict[str, Any] = field(default_factory=dict)

    @property
    def affine(self) -> np.ndarray:
        return self.volume.affine

    def to_json(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "mode": self.mode,
            "shape": list(self.mask.shape),
            "spacing_mm": list(self.volume.spacing_mm),
            "voxel_volume_ml": self.volume.voxel_volume_ml,
            "geometry": self.volume.geometry.to_json(),
            "geometry_summary": self.volume.geometry.summary(),
            "measurements": asdict(self.measurements),
            "postprocessing": self.postprocessing,
            "files": self.files,
        }
