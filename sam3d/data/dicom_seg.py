"""A hemorrhage mask back on the scanner's own slices, written as DICOM SEG (highdicom).

The mask lives on the volume's grid, which for uneven steps is a resampled one; viewers (OHIF,
3D Slicer, a PACS) overlay a SEG on the acquired images, so each acquired frame gets the mask
sampled at the true world position of each of its pixels, and the SEG references that frame's
SOP instance.
"""

from __future__ import annotations

from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from ich_engine.checkpoint import atomic_write

from .dicom import Series, sample_frames

__all__ = [
    "HEMORRHAGE_SEGMENT_NUMBER",
    "TYPE2_COPIED_ATTRIBUTES",
    "hemorrhage_seg",
    "mask_on_frames",
    "source_headers",
    "with_type2_attributes",
    "write_hemorrhage_seg",
]

HEMORRHAGE_SEGMENT_NUMBER = 1  # the SEG's one segment, which the SR's measurements refer to

# Type 2 attributes of the Patient and General Study modules, which a derived object copies from its
# source images. Anonymisers delete them (PS3.15's basic profile allows "X": remove) though the
# source's IOD requires them present, possibly empty; a derived object must have them all the same.
TYPE2_COPIED_ATTRIBUTES = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientSex",
    "StudyDate",
    "StudyTime",
    "ReferringPhysicianName",
    "StudyID",
    "AccessionNumber",
)


def with_type2_attributes(source: pydicom.Dataset) -> pydicom.Dataset:
    """``source`` (in memory, changed in place) with each of :data:`TYPE2_COPIED_ATTRIBUTES` it lacks
    present and empty: what it has is copied as it is, and no patient data is ever made up."""
    for keyword in TYPE2_COPIED_ATTRIBUTES:
        if keyword not in source:
            setattr(source, keyword, "")
    return source


def source_headers(series: Series) -> list[pydicom.Dataset]:
    """The header (no pixels) of each of ``series``' files, in frame order, with the Type 2 attributes a
    derived object copies and the series' frame of reference where a file has none (highdicom requires
    one for CT): single-frame files each hold one frame, a multi-frame file holds them all.

    Raises:
        ValueError: the slices carry different frames of reference (:attr:`Series.frame_of_reference_uid`).
    """
    reference = series.frame_of_reference_uid
    sources: dict[str, pydicom.Dataset] = {}
    for frame in series.frames:
        if frame.path not in sources:
            header = with_type2_attributes(pydicom.dcmread(frame.path, stop_before_pixels=True))
            if not header.get("FrameOfReferenceUID"):
                header.FrameOfReferenceUID = reference
            sources[frame.path] = header
    return list(sources.values())


def mask_on_frames(mask: np.ndarray, affine: np.ndarray, series: Series) -> np.ndarray:
    """bool (frames, rows, columns): ``mask`` (on the grid of RAS ``affine``) at every acquired pixel.

    Linear interpolation of the 0/1 mask, kept where >= 0.5: on a frame that is a grid slice this is
    the mask itself; between grid slices it is the nearer slice's mask, blended at its edge.
    """
    return sample_frames(mask, affine, series, order=1) >= 0.5


def write_hemorrhage_seg(
    path: str | Path, frames_mask: np.ndarray, series: Series, software_version: str, algorithm: str = "SAM-Med3D ICH"
) -> Path:
    """Write :func:`hemorrhage_seg` to ``path`` (atomically)."""
    path = Path(path)
    seg = hemorrhage_seg(frames_mask, series, software_version, algorithm)
    atomic_write(path, lambda tmp: seg.save_as(tmp))
    return path


def hemorrhage_seg(
    frames_mask: np.ndarray, series: Series, software_version: str, algorithm: str = "SAM-Med3D ICH"
) -> hd.seg.Segmentation:
    """A binary SEG of one segment, "Hemorrhage", referencing ``series``' instances frame by frame.

    ``frames_mask`` is (frames, rows, columns) in ``series.frames`` order (:func:`mask_on_frames`).
    Frames without hemorrhage are left out (highdicom's default); a mask with none at all still
    gets a SEG with one empty frame, so a viewer shows "no finding" rather than a missing file.

    Raises:
        ValueError: the series allows no SEG (highdicom's checks of the source images, or slices with
            different frames of reference).
    """
    description = hd.seg.SegmentDescription(
        segment_number=HEMORRHAGE_SEGMENT_NUMBER,
        segment_label="Hemorrhage",
        segmented_property_category=codes.SCT.MorphologicallyAbnormalStructure,
        segmented_property_type=codes.SCT.Hemorrhage,
        algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=hd.AlgorithmIdentificationSequence(
            name=algorithm, version=software_version, family=codes.cid7162.ArtificialIntelligence
        ),
    )
    return hd.seg.Segmentation(
        source_images=source_headers(series),
        pixel_array=frames_mask.astype(np.uint8),
        segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=[description],
        series_instance_uid=hd.UID(),
        series_number=900,
        sop_instance_uid=hd.UID(),
        instance_number=1,
        manufacturer="sam3d-ich",
        manufacturer_model_name=algorithm,
        software_versions=software_version,
        device_serial_number="0",
        series_description="Hemorrhage (automated)",
        omit_empty_frames=bool(frames_mask.any()),
    )
