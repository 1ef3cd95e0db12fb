"""Write CT series the way scanners write them, from a function of world position (tests, examples).

Each slice is sampled at the true LPS position of every pixel, so a reader can be checked against
the analytic truth: gantry tilt (image rows tilted, positions moving along the table), uneven or
missing slice steps, per-slice rescale, MONOCHROME1, files in any order and without extensions,
and the multi-frame Enhanced CT layout.
"""

from __future__ import annotations

import datetime
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, EnhancedCTImageStorage, ExplicitVRLittleEndian, generate_uid

from .dicom import pixel_positions

__all__ = ["SeriesSpec", "table_positions", "write_ct_series", "write_enhanced_ct"]

HUFunction = Callable[[np.ndarray], np.ndarray]  # (N, 3) LPS mm -> (N,) HU


def table_positions(
    steps_mm: Sequence[float],
    tilt_deg: float = 0.0,
    first_z_mm: float = -60.0,
    origin_xy_mm: tuple[float, float] = (-100.0, -100.0),
) -> tuple[np.ndarray, tuple[float, ...]]:
    """ImagePositionPatient of each slice and the ImageOrientationPatient of a gantry-tilted scan.

    The table moves along z, so every position shares x and y and z advances by ``steps_mm``; the
    gantry tilt turns the image rows about the patient's left-right axis by ``tilt_deg``.
    Returns (positions (N, 3) LPS mm, orientation (6,)).
    """
    z = first_z_mm + np.concatenate([[0.0], np.cumsum(steps_mm)])
    positions = np.stack([np.full_like(z, origin_xy_mm[0]), np.full_like(z, origin_xy_mm[1]), z], axis=1)
    t = np.deg2rad(tilt_deg)
    return positions, (1.0, 0.0, 0.0, 0.0, float(np.cos(t)), float(np.sin(t)))


@dataclass
class SeriesSpec:
    """What one series looks like; positions and orientation usually come from :func:`table_positions`."""

    positions: np.ndarray
    orientation: tuple[float, ...]
    rows: int = 64
    columns: int = 64
    pixel_spacing: tuple[float, float] = (3.2, 3.2)  # (row spacing, column spacing), DICOM's order
    gantry_tilt_deg: float = 0.0
    description: str = "HEAD 5mm"
    series_number: int = 2
    image_type: tuple[str, ...] = ("ORIGINAL", "PRIMARY", "AXIAL")
    slopes: Sequence[float] | float = 1.0
    intercepts: Sequence[float] | float = -1024.0
    photometric: str = "MONOCHROME2"  # MONOCHROME1 inverts the display only: the rescale still gives HU
    series_uid: str = field(default_factory=generate_uid)
    study_uid: str = "1.2.826.0.1.3680043.8.498.1"
    frame_of_reference_uid: str = "1.2.826.0.1.3680043.8.498.2"

    def per_slice(self, values: Sequence[float] | float) -> np.ndarray:
        return np.broadcast_to(np.asarray(values, dtype=np.float64), (len(self.positions),))


def _stored(hu: np.ndarray, slope: float, intercept: float) -> np.ndarray:
    return np.clip(np.rint((hu - intercept) / slope), 0, 4095).astype(np.uint16)


def _common(spec: SeriesSpec, sop_class: str) -> Dataset:
    now = datetime.datetime(2026, 1, 1, 9, 0, 0)
    ds = Dataset()
    ds.SOPClassUID = sop_class
    ds.PatientName, ds.PatientID, ds.PatientBirthDate, ds.PatientSex = "Phantom^Head", "PHANTOM01", "19700101", "O"
    ds.StudyInstanceUID, ds.StudyID, ds.AccessionNumber = spec.study_uid, "1", "A1"
    ds.StudyDate, ds.StudyTime, ds.ReferringPhysicianName = now.strftime("%Y%m%d"), now.strftime("%H%M%S"), ""
    ds.SeriesInstanceUID, ds.SeriesNumber, ds.SeriesDescription = spec.series_uid, spec.series_number, spec.description
    ds.Modality, ds.Manufacturer, ds.ManufacturerModelName = "CT", "sam3d-ich", "synthetic"
    ds.FrameOfReferenceUID, ds.PositionReferenceIndicator = spec.frame_of_reference_uid, ""
    ds.Rows, ds.Columns = spec.rows, spec.columns
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, spec.photometric
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 12, 11, 0
    ds.KVP, ds.GantryDetectorTilt = 120, spec.gantry_tilt_deg
    ds.BodyPartExamined, ds.PatientPosition, ds.AcquisitionNumber = "HEAD", "HFS", 1
    return ds


def _save(ds: Dataset, path: Path) -> None:
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID, meta.MediaStorageSOPInstanceUID = ds.SOPClassUID, ds.SOPInstanceUID
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.file_meta = meta
    ds.save_as(path, enforce_file_format=True)


def write_ct_series(
    folder: str | Path, spec: SeriesSpec, hu_at: HUFunction, extension: str = ".dcm", order: Sequence[int] | None = None
) -> list[Path]:
    """One CT Image Storage file per slice; returns the paths in slice order.

    ``order`` gives the InstanceNumber / file-name order of the slices (a permutation), so readers
    that trust file names or instance numbers instead of positions are caught; ``extension=""``
    writes files without one, as many PACS exports do.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    slopes, intercepts = spec.per_slice(spec.slopes), spec.per_slice(spec.intercepts)
    order = list(range(len(spec.positions))) if order is None else list(order)
    paths = []
    for k, position in enumerate(spec.positions):
        hu = hu_at(
            pixel_positions(position, spec.orientation, spec.rows, spec.columns, spec.pixel_spacing).reshape(-1, 3)
        ).reshape(spec.rows, spec.columns)
        stored = _stored(hu, slopes[k], intercepts[k])
        ds = _common(spec, CTImageStorage)
        ds.SOPInstanceUID = generate_uid()
        ds.ImageType = list(spec.image_type)
        ds.InstanceNumber = order.index(k) + 1
        ds.ImagePositionPatient = [round(float(v), 4) for v in position]
        ds.ImageOrientationPatient = [round(float(v), 6) for v in spec.orientation]
        ds.PixelSpacing = [float(v) for v in spec.pixel_spacing]
        ds.SliceThickness = 5.0
        ds.RescaleSlope, ds.RescaleIntercept, ds.RescaleType = float(slopes[k]), float(intercepts[k]), "HU"
        ds.PixelData = stored.tobytes()
        path = folder / f"IM{ds.InstanceNumber:04d}{extension}"
        _save(ds, path)
        paths.append(path)
    return paths


def write_enhanced_ct(path: str | Path, spec: SeriesSpec, hu_at: HUFunction) -> Path:
    """All slices as frames of one Enhanced CT Image Storage file (per-frame positions and rescale)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    slopes, intercepts = spec.per_slice(spec.slopes), spec.per_slice(spec.intercepts)
    ds = _common(spec, EnhancedCTImageStorage)
    ds.SOPInstanceUID, ds.InstanceNumber = generate_uid(), 1
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL", "NONE"]
    ds.NumberOfFrames = len(spec.positions)
    shared = Dataset()
    orientation, measures = Dataset(), Dataset()
    orientation.ImageOrientationPatient = [round(float(v), 6) for v in spec.orientation]
    measures.PixelSpacing, measures.SliceThickness = [float(v) for v in spec.pixel_spacing], 5.0
    shared.PlaneOrientationSequence, shared.PixelMeasuresSequence = [orientation], [measures]
    ds.SharedFunctionalGroupsSequence = [shared]
    frames, pixels = [], []
    for k, position in enumerate(spec.positions):
        frame, plane, rescale = Dataset(), Dataset(), Dataset()
        plane.ImagePositionPatient = [round(float(v), 4) for v in position]
        rescale.RescaleSlope, rescale.RescaleIntercept, rescale.RescaleType = (
            float(slopes[k]),
            float(intercepts[k]),
            "HU",
        )
        frame.PlanePositionSequence, frame.PixelValueTransformationSequence = [plane], [rescale]
        frames.append(frame)
        hu = hu_at(
            pixel_positions(position, spec.orientation, spec.rows, spec.columns, spec.pixel_spacing).reshape(-1, 3)
        ).reshape(spec.rows, spec.columns)
        pixels.append(_stored(hu, slopes[k], intercepts[k]))
    ds.PerFrameFunctionalGroupsSequence = frames
    ds.PixelData = np.stack(pixels).tobytes()
    _save(ds, path)
    return path
