"""The records that cross from segmentation to measurement, reporting and the app (no torch, no model)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from ..data.io import Volume

__all__ = ["LOCATIONS", "Click", "ComponentMeasurement", "LocationEvidence", "Measurements", "SegmentationResult"]

# The location classes of a hemorrhage component, in the words a report uses for the subtype.
LOCATIONS = ("intraparenchymal", "intraventricular", "subdural", "epidural", "subarachnoid", "indeterminate")


@dataclass
class Click:
    """A click in the input file's voxel indices (``space='voxel'``) or in RAS world mm (``'mm'``)."""

    position: tuple[float, float, float]
    positive: bool = True
    space: str = "voxel"


@dataclass
class LocationEvidence:
    """The numbers a component's location class is decided from (``sam3d.predict.location``), in world mm.

    ``inner_table_distance_mm``: the component's closest approach to the inner table of the skull;
    ``depth_mm``: its farthest reach below the inner table; ``thickness_mm``: the diameter of the
    largest ball inside it; ``span_mm``: its longest diameter on one axial slice (ABC/2's A);
    ``table_contact_fraction``: share of its surface voxels lying against the inner table;
    ``ventricle_overlap_fraction``: share of its voxels inside the ventricular system estimated from
    the scan; ``midline_distance_mm``: closest approach to the head's midsagittal plane (0 when it
    crosses); ``crosses_midline``: voxels on both sides of that plane; ``shape``: crescentic,
    lentiform or globular (extra-axial collections are crescentic or lentiform). The table and
    ventricle figures are None on a scan without a skull to measure from."""

    inner_table_distance_mm: float | None
    depth_mm: float | None
    thickness_mm: float
    span_mm: float
    table_contact_fraction: float | None
    ventricle_overlap_fraction: float | None
    midline_distance_mm: float
    crosses_midline: bool
    shape: str


@dataclass
class ComponentMeasurement:
    """One connected hemorrhage component (26-connected on the input grid), largest first in
    ``Measurements.components``.

    ``volume_ml``: planimetric (voxel count x |det(affine)|); ``abc2_ml``: Kothari's ABC/2 with
    ``abc2_axes_mm`` = [A, B, C] in world mm (A the longest diameter on the axial slice of largest
    area, B the longest perpendicular to A there, C the weighted slice count x slice thickness);
    ``side``: left / right / bilateral in patient coordinates; ``location``: one of ``LOCATIONS``;
    ``region``: lobe or compartment (frontal, parietal, temporal, occipital, basal ganglia,
    thalamus, posterior fossa, convexity, lateral ventricle, ...) or "indeterminate";
    ``centroid_mm``: RAS world mm; ``slice_extent``: first and last axial slice index holding it."""

    volume_ml: float
    abc2_ml: float
    abc2_axes_mm: list[float]
    side: str
    location: str
    region: str
    centroid_mm: list[float]
    slice_extent: list[int]
    evidence: LocationEvidence

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> ComponentMeasurement:
        return cls(**{**record, "evidence": LocationEvidence(**record["evidence"])})


@dataclass
class Measurements:
    """The segmentation's numbers for one scan. ``abc2_ml`` is the sum of the components' ABC/2;
    ``location`` is the largest component's location class ("none" for an empty mask);
    ``components`` holds one record per component, largest first (``component_volumes_ml`` is
    their planimetric volumes, kept for readers of older JSON)."""

    total_volume_ml: float
    num_components: int
    component_volumes_ml: list[float]
    side: str  # left / right / bilateral / none, in patient coordinates
    slice_extent: list[int] | None  # first and last axial slice index (input grid) holding hemorrhage
    craniocaudal_extent_mm: float
    centroid_voxel: list[float] | None
    centroid_mm: list[float] | None
    abc2_ml: float = 0.0
    location: str = "none"
    components: list[ComponentMeasurement] = field(default_factory=list)

    @classmethod
    def from_json(cls, record: dict[str, Any]) -> Measurements:
        """The record ``asdict`` wrote (``SegmentationResult.to_json``), nested components included;
        a record written before components existed reads with none."""
        components = [ComponentMeasurement.from_json(c) for c in record.get("components", [])]
        return cls(**{**record, "components": components})


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
