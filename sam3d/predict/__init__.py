"""Scan → hemorrhage mask in the scan's own geometry, measurements and overlays (Python API).

In the parts MONAI bundles name:

- ``inference``: preprocessing by the model's contract, sliding-window (automatic) or click-driven
  (interactive) probabilities, mapped back onto the scan's grid;
- ``postprocessing``: intracranial space, hyperdense gate, skull base, small components;
- ``measurement``: volume, side, extents in world space;
- ``records``: ``Click``, ``Measurements``, ``SegmentationResult`` (what reporting and the app use);
- ``segmenter``: :class:`HemorrhageSegmenter`, which runs them in turn and writes the files.
"""

from .inference import AUTOMATIC_THRESHOLD, THRESHOLD, Sam3DInferer, check_head_ct, to_input_grid
from .measurement import measure
from .postprocessing import (
    BONE_THRESHOLD_HU,
    INTRACRANIAL_MARGIN_MM,
    MAX_BLOOD_HU,
    MIN_COMPONENT_HU,
    MIN_COMPONENT_ML,
    MIN_VOXEL_HU,
    SKULL_BASE_MARGIN_MM,
    hyperdense_gate,
    hyperdense_options,
    intracranial_mask,
    postprocess_mask,
    skull_base_bone,
)
from .records import Click, Measurements, SegmentationResult
from .segmenter import HemorrhageSegmenter

__all__ = [
    "AUTOMATIC_THRESHOLD",
    "BONE_THRESHOLD_HU",
    "INTRACRANIAL_MARGIN_MM",
    "MAX_BLOOD_HU",
    "MIN_COMPONENT_HU",
    "MIN_COMPONENT_ML",
    "MIN_VOXEL_HU",
    "SKULL_BASE_MARGIN_MM",
    "THRESHOLD",
    "Click",
    "HemorrhageSegmenter",
    "Measurements",
    "Sam3DInferer",
    "SegmentationResult",
    "check_head_ct",
    "hyperdense_gate",
    "hyperdense_options",
    "intracranial_mask",
    "measure",
    "postprocess_mask",
    "skull_base_bone",
    "to_input_grid",
]
