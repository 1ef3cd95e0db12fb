"""DICOM CT series → voxel grid with the geometry the scanner wrote into every slice.

Why by hand: ITK's series reader (SimpleITK) takes the first slice's plane normal and one average
step, so a gantry-tilted or uneven series loads misplaced without an error, and highdicom's
``get_volume_from_series`` refuses any series whose positions do not advance along the plane normal,
which every tilted scan does (both measured in ``tests/test_dicom.py`` and ``docs/geometry.md``).
pydicom reads the tags; the stacking below follows DICOM PS3.3 C.7.6.2:

- each frame's plane comes from its own ImagePositionPatient (IPP), ImageOrientationPatient (IOP)
  and PixelSpacing; frames are ordered by IPP projected on the plane normal, never by file name,
  InstanceNumber or SliceThickness;
- a tilted gantry moves the IPPs along the table, not along the normal: the slice axis of the grid
  is then the IPP offset, and the affine is sheared (exact, and what dcm2niix writes too);
- uneven steps (thin posterior fossa, thick vertex) cannot be one affine: the stack is resampled
  along its own axis to the smallest step, each output slice interpolated linearly between the two
  acquired slices around it, so every acquired pixel keeps its exact world position;
- a step much larger than both neighbours is a missing slice and a zero step a duplicate: both stop
  the read with the positions unless ``allow_gaps`` accepts them (then interpolated / dropped, and
  recorded);
- RescaleSlope/Intercept are applied per frame; MONOCHROME1 changes the display, not the HU.

The voxel grid is (column, row, slice), ITK's order, so untilted series give the same array and
affine as before. The affine maps to RAS+ (LPS with x and y negated).
"""

from __future__ import annotations

import contextlib
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Literal, overload

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.errors import InvalidDicomError
from pydicom.uid import UID, generate_uid
from scipy import ndimage

from .errors import SliceGapError, VolumeReadError
from .geometry import Geometry

__all__ = [
    "Frame",
    "Series",
    "choose_series",
    "find_series",
    "frame_hu",
    "is_dicom_file",
    "pixel_positions",
    "read_dicom_folder",
    "sample_frames",
    "unreadable_slices",
]

POSITION_TOLERANCE_MM = 0.1  # slice positions this close to a uniform grid need no resampling
MISSING_STEP_RATIO = 1.5  # a step this much larger than both neighbours means a slice is missing
DUPLICATE_STEP_MM = 0.01
MAX_AXIAL_TILT_DEG = 45.0  # planes tilted further from axial are sagittal/coronal reformats or localizers


def is_dicom_file(path: Path) -> bool:
    """True for a DICOM Part 10 file (``DICM`` after the 128-byte preamble), whatever its name."""
    try:
        with open(path, "rb") as handle:
            header = handle.read(132)
    except OSError:
        return False
    return len(header) == 132 and header[128:] == b"DICM"


@dataclass(frozen=True)
class Frame:
    """One image plane: a single-frame file, or frame ``index`` of a multi-frame file."""

    path: str
    index: int | None
    sop_instance_uid: str
    position: tuple[float, float, float]  # IPP, LPS mm: centre of the first pixel
    orientation: tuple[float, ...]  # IOP: column direction (along a row), then row direction
    pixel_spacing: tuple[float, float]  # (between rows, between columns)
    slope: float
    intercept: float
    frame_of_reference_uid: str = ""  # FrameOfReferenceUID of its file; "" where the file has none


@dataclass
class Series:
    uid: str
    description: str
    number: int | None
    image_type: tuple[str, ...]
    photometric: str
    rows: int
    columns: int
    gantry_tilt_tag_deg: float | None
    frames: list[Frame]

    @property
    def files(self) -> int:
        return len({f.path for f in self.frames})

    @property
    def multiframe(self) -> bool:
        return any(f.index is not None for f in self.frames)

    @property
    def localizer(self) -> bool:
        return "LOCALIZER" in self.image_type

    @property
    def plane_tilt_from_axial_deg(self) -> float:
        normal = _normal(self.frames[0].orientation)
        return float(np.degrees(np.arccos(min(1.0, abs(normal[2])))))

    @property
    def frame_of_reference_uid(self) -> str:
        """The FrameOfReferenceUID a SEG or SR of the series carries: the one its slices carry, also for a
        slice without one (all slices of a series share one geometry); where no slice carries one, a
        UID derived from the SeriesInstanceUID (pydicom's root and a hash of it: the same at every read).

        Raises:
            ValueError: the slices carry different ones (the files named), so no one geometry holds.
        """
        carried: dict[str, str] = {}
        for frame in self.frames:
            if frame.frame_of_reference_uid:
                carried.setdefault(frame.frame_of_reference_uid, frame.path)
        if len(carried) > 1:
            named = ", ".join(f"{uid} in {Path(path).name}" for uid, path in list(carried.items())[:3])
            raise ValueError(
                f"series {self.uid}: its slices carry {len(carried)} different FrameOfReferenceUIDs ({named})"
            )
        return next(iter(carried), None) or generate_uid(entropy_srcs=["FrameOfReferenceUID", self.uid])

    def describe(self) -> dict[str, Any]:
        return {
            "uid": self.uid,
            "description": self.description,
            "number": self.number,
            "files": self.files,
            "frames": len(self.frames),
        }


def pixel_positions(position, orientation, rows: int, columns: int, pixel_spacing) -> np.ndarray:
    """LPS mm of every pixel of one image plane, shape (rows, columns, 3) (DICOM PS3.3 C.7.6.2.1.1)."""
    col_dir, row_dir = np.asarray(orientation[:3], float), np.asarray(orientation[3:], float)
    r = np.arange(rows)[:, None, None] * float(pixel_spacing[0])
    c = np.arange(columns)[None, :, None] * float(pixel_spacing[1])
    return np.asarray(position, float) + c * col_dir + r * row_dir


def sample_frames(array: np.ndarray, affine: np.ndarray, series: Series, order: int = 1) -> np.ndarray:
    """``array`` (on the grid of RAS ``affine``) looked up at every acquired pixel of ``series``:
    float32 (frames, rows, columns) in ``series.frames`` order; outside the grid gives 0."""
    world_to_voxel = np.linalg.inv(affine)
    values = array.astype(np.float32, copy=False)
    planes = []
    for frame in series.frames:
        ras = pixel_positions(
            frame.position, frame.orientation, series.rows, series.columns, frame.pixel_spacing
        ).reshape(-1, 3) * np.array([-1.0, -1.0, 1.0])
        voxel = ras @ world_to_voxel[:3, :3].T + world_to_voxel[:3, 3]
        planes.append(
            ndimage.map_coordinates(values, voxel.T, order=order, mode="constant", cval=0.0).reshape(
                series.rows, series.columns
            )
        )
    return np.stack(planes)


def _normal(orientation) -> np.ndarray:
    normal = np.cross(np.asarray(orientation[:3], float), np.asarray(orientation[3:], float))
    return normal / np.linalg.norm(normal)


@overload
def _floats(value, count: Literal[2], what: str, source: str) -> tuple[float, float]: ...
@overload
def _floats(value, count: Literal[3], what: str, source: str) -> tuple[float, float, float]: ...
@overload
def _floats(value, count: int, what: str, source: str) -> tuple[float, ...]: ...
def _floats(value, count: int, what: str, source: str) -> tuple[float, ...]:
    try:
        numbers = tuple(float(v) for v in value)
    except (TypeError, ValueError):
        numbers = ()
    if len(numbers) != count or not np.all(np.isfinite(numbers)):
        raise VolumeReadError(f"{source}: {what} must be {count} numbers, found {value!r}")
    return numbers


def _functional(ds, frame: int, sequence: str):
    """Item of a functional-group ``sequence`` for ``frame``: the per-frame group first, then the shared one."""
    per_frame, shared = ds.get("PerFrameFunctionalGroupsSequence"), ds.get("SharedFunctionalGroupsSequence")
    for group in (per_frame[frame] if per_frame else None, shared[0] if shared else None):
        if group is not None and sequence in group and len(group[sequence].value):
            return group[sequence][0]
    return None


def _frames_of(ds, path: Path) -> list[Frame]:
    source = str(path)
    uid = str(ds.SOPInstanceUID)
    reference = str(ds.get("FrameOfReferenceUID", "") or "")
    count = int(ds.get("NumberOfFrames", 1) or 1)
    if "PerFrameFunctionalGroupsSequence" not in ds:
        if count != 1:
            raise VolumeReadError(f"{source}: {count} frames without per-frame functional groups (positions unknown)")
        for tag in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
            if tag not in ds:
                raise VolumeReadError(f"{source}: no {tag}; the slice cannot be placed in the patient")
        return [
            Frame(
                source,
                None,
                uid,
                _floats(ds.ImagePositionPatient, 3, "ImagePositionPatient", source),
                _floats(ds.ImageOrientationPatient, 6, "ImageOrientationPatient", source),
                _floats(ds.PixelSpacing, 2, "PixelSpacing", source),
                float(ds.get("RescaleSlope", 1.0) or 1.0),
                float(ds.get("RescaleIntercept", 0.0) or 0.0),
                reference,
            )
        ]
    frames = []
    for i in range(count):
        plane, orientation = _functional(ds, i, "PlanePositionSequence"), _functional(ds, i, "PlaneOrientationSequence")
        measures, rescale = (
            _functional(ds, i, "PixelMeasuresSequence"),
            _functional(ds, i, "PixelValueTransformationSequence"),
        )
        if plane is None or orientation is None or measures is None:
            raise VolumeReadError(f"{source}: frame {i + 1} has no plane position, orientation or pixel spacing")
        frames.append(
            Frame(
                source,
                i,
                uid,
                _floats(plane.ImagePositionPatient, 3, f"frame {i + 1} ImagePositionPatient", source),
                _floats(orientation.ImageOrientationPatient, 6, f"frame {i + 1} ImageOrientationPatient", source),
                _floats(measures.PixelSpacing, 2, f"frame {i + 1} PixelSpacing", source),
                float(rescale.get("RescaleSlope", 1.0)) if rescale else 1.0,
                float(rescale.get("RescaleIntercept", 0.0)) if rescale else 0.0,
                reference,
            )
        )
    return frames


# The storage classes whose objects are CT slices. Everything else in an export (DICOMDIR, SR, SEG,
# RT, presentation states, secondary captures, other modalities' images) is skipped and counted.
CT_IMAGE_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.1": "Enhanced CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.2.2": "Legacy Converted Enhanced CT Image Storage",
}
MEDIA_DIRECTORY_SOP_CLASS = "1.2.840.10008.1.3.10"


def _not_a_ct_image(ds) -> str | None:
    """Why a DICOM object is not a CT slice (a short kind, as counted in the skipped objects), or None."""
    sop_class = str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta"), "MediaStorageSOPClassUID", ""))
    if sop_class == MEDIA_DIRECTORY_SOP_CLASS or "DirectoryRecordSequence" in ds:
        return "DICOMDIR"
    modality = str(ds.get("Modality", "") or "no Modality")
    if modality != "CT":
        return modality
    if sop_class not in CT_IMAGE_SOP_CLASSES:
        return f"CT non-image ({UID(sop_class).name or sop_class})"
    if "Rows" not in ds or "SeriesInstanceUID" not in ds:
        return "CT without pixel rows or series"
    return None


def _not_dicom_reason(path: Path) -> str:
    """Why :func:`is_dicom_file` refuses ``path``, in a few words."""
    try:
        size = path.stat().st_size
    except OSError as err:
        return f"cannot be read: {err.strerror}"
    if size < 132:
        return f"{size} bytes, too short for a DICOM file"
    return "no 'DICM' marker after the 128-byte preamble: truncated or overwritten"


def _name_pattern(name: str) -> str:
    """A file name with its digits as one wildcard: slices of one export share it (IM0005.dcm, I10)."""
    return re.sub(r"\d+", "#", name)


def unreadable_slices(series: Series) -> dict[str, str]:
    """Files beside ``series``' slices, named like them, that are no readable DICOM (path → why): a
    corrupt slice, which the series would otherwise lose silently and a gap check blame on the scanner."""
    patterns = {_name_pattern(Path(f.path).name) for f in series.frames}
    folders = sorted({Path(f.path).parent for f in series.frames})
    return {
        str(path): _not_dicom_reason(path)
        for folder in folders
        for path in sorted(folder.iterdir())
        if path.is_file() and _name_pattern(path.name) in patterns and not is_dicom_file(path)
    }


def find_series(folder: Path, recursive: bool = True) -> tuple[list[Series], dict[str, int]]:
    """Every CT image series among the files of ``folder`` and, with ``recursive``, the folders below
    it (a CD or PACS export: DICOMDIR at the top, nested patient/study/series folders).

    Files are recognised by content, not by name. Only CT image objects are slices. Returns (series
    sorted by UID, count of the files skipped by kind: "non-DICOM", "DICOMDIR", a modality such as
    "MR" or "SEG" or "SR", "CT non-image (...)").
    """
    files = sorted(p for p in (folder.rglob("*") if recursive else folder.iterdir()) if p.is_file())
    by_uid: dict[str, Series] = {}
    skipped: dict[str, int] = {}
    for path in files:
        if not is_dicom_file(path):
            skipped["non-DICOM"] = skipped.get("non-DICOM", 0) + 1
            continue
        try:
            ds = pydicom.dcmread(path, stop_before_pixels=True)
        except (InvalidDicomError, OSError, ValueError) as e:
            raise VolumeReadError(f"{path}: unreadable DICOM file ({e})") from e
        kind = _not_a_ct_image(ds)
        if kind is not None:
            skipped[kind] = skipped.get(kind, 0) + 1
            continue
        series = by_uid.setdefault(
            str(ds.SeriesInstanceUID),
            Series(
                str(ds.SeriesInstanceUID),
                str(ds.get("SeriesDescription", "")),
                int(ds.SeriesNumber) if ds.get("SeriesNumber") not in (None, "") else None,
                tuple(str(v).upper() for v in (ds.get("ImageType") or ())),
                str(ds.get("PhotometricInterpretation", "")),
                int(ds.Rows),
                int(ds.Columns),
                float(ds.GantryDetectorTilt) if ds.get("GantryDetectorTilt") not in (None, "") else None,
                [],
            ),
        )
        if (int(ds.Rows), int(ds.Columns)) != (series.rows, series.columns):
            raise VolumeReadError(
                f"{path}: {ds.Rows}x{ds.Columns} pixels, but series {series.uid} has {series.rows}x{series.columns}"
            )
        series.frames.extend(_frames_of(ds, path))
    return sorted(by_uid.values(), key=lambda s: s.uid), skipped


def _listing(series: list[Series]) -> str:
    return "; ".join(f"{s.uid} '{s.description}' ({len(s.frames)} slices)" for s in series)


def choose_series(candidates: list[Series], source: str, selector: str | None = None) -> tuple[Series, list[dict]]:
    """The series to read and the others with why they were left out.

    ``selector`` is a SeriesInstanceUID or a part of a SeriesDescription (case-insensitive). Without
    it the axial, non-localizer series with the most slices wins; a tie is an error listing both.
    """
    if selector:
        matches = [s for s in candidates if s.uid == selector] or [
            s for s in candidates if selector.lower() in s.description.lower()
        ]
        if len(matches) != 1:
            found = "no series matches" if not matches else f"{len(matches)} series match"
            raise VolumeReadError(
                f"{source}: {found} series {selector!r} (a SeriesInstanceUID or part of a "
                f"SeriesDescription); the folder holds: {_listing(candidates)}"
            )
        chosen = matches[0]
        left_out = [{**s.describe(), "why": "not the series asked for"} for s in candidates if s is not chosen]
        return chosen, left_out

    def unsuitable(s: Series) -> str | None:
        if s.localizer:
            return "localizer"
        if len(s.frames) < 2:
            return "a single slice"
        if s.plane_tilt_from_axial_deg > MAX_AXIAL_TILT_DEG:
            return f"not axial (plane {s.plane_tilt_from_axial_deg:.0f}° from axial)"
        return None

    suitable = [s for s in candidates if unsuitable(s) is None]
    if not suitable:
        if len(candidates) == 1 and len(candidates[0].frames) == 1:
            raise VolumeReadError(
                f"{source}: series {candidates[0].uid} holds a single slice; a volume needs at least 2 slices"
            )
        reasons = "; ".join(f"{s.uid} '{s.description}': {unsuitable(s)}" for s in candidates)
        raise VolumeReadError(f"{source}: no axial CT series with 2 or more slices; found {reasons}")
    most = max(len(s.frames) for s in suitable)
    best = [s for s in suitable if len(s.frames) == most]
    if len(best) > 1:
        raise VolumeReadError(
            f"{source}: {len(best)} series are equally good candidates ({_listing(best)}); "
            "choose one with --series_uid (a UID or part of its description)"
        )
    chosen = best[0]
    left_out = [
        {**s.describe(), "why": unsuitable(s) or f"fewer slices ({len(s.frames)} vs {most})"}
        for s in candidates
        if s is not chosen
    ]
    return chosen, left_out


def frame_hu(frames: list[Frame]) -> list[np.ndarray]:
    """HU of each frame (rows, columns) float32, the rescale of its own frame applied."""
    cache: dict[str, tuple[np.ndarray, bool]] = {}
    out = []
    for frame in frames:
        if frame.path not in cache:
            try:
                ds = pydicom.dcmread(frame.path)
                stored = ds.pixel_array
                rescaled = False
            except Exception as err:  # a transfer syntax pydicom has no decoder for here: GDCM reads it (rescaled)
                try:
                    stored = sitk.GetArrayFromImage(sitk.ReadImage(frame.path))
                except RuntimeError:  # neither decodes it: a truncated or corrupt slice
                    raise VolumeReadError(
                        f"{frame.path}: unreadable DICOM slice ({type(err).__name__}: {err})"
                    ) from err
                rescaled = True
            stored = stored.reshape(-1, *stored.shape[-2:])
            cache[frame.path] = (stored, rescaled)
        stored, rescaled = cache[frame.path]
        plane = stored[frame.index or 0].astype(np.float32)
        out.append(plane if rescaled else plane * np.float32(frame.slope) + np.float32(frame.intercept))
    return out


def _runs(steps: np.ndarray) -> list[list[float]]:
    """Consecutive equal steps (to 0.01 mm) as [step, count] in slice order."""
    runs: list[list[float]] = []
    for step in np.round(steps, 2):
        if runs and abs(runs[-1][0] - step) <= 0.011:
            runs[-1][1] += 1
        else:
            runs.append([float(step), 1])
    return runs


def read_dicom_folder(
    folder: Path, series: str | None = None, allow_gaps: bool = False, recursive: bool = True
) -> tuple[np.ndarray, np.ndarray, Geometry, Series]:
    """Read one CT series of ``folder``: (array (columns, rows, slices), RAS affine, geometry, series).

    Raises:
        VolumeReadError: no series, an ambiguous choice, a single slice, mixed orientations or
            pixel spacings, positions off one line, or (without ``allow_gaps``) missing or
            duplicate slice positions. The message names the folder, the series and the positions.
    """
    source = str(folder)
    if not any(folder.iterdir()):
        raise VolumeReadError(f"{source}: DICOM folder is empty")
    found, skipped = find_series(folder, recursive)
    if not found:
        held = ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items())) or "no files"
        raise VolumeReadError(f"{source}: no CT image series found (only CT slices are read); it holds {held}")
    chosen, left_out = choose_series(found, source, series)
    name = f"{source}: series {chosen.uid} '{chosen.description}'"
    geometry = Geometry(
        "dicom",
        "ImagePositionPatient/ImageOrientationPatient of every slice",
        gantry_tilt_tag_deg=chosen.gantry_tilt_tag_deg,
        series=chosen.describe(),
        series_left_out=left_out,
        objects_skipped=skipped,
        photometric=chosen.photometric,
        multiframe=chosen.multiframe,
    )
    frames = chosen.frames
    orientation = np.asarray(frames[0].orientation)
    spacing = np.asarray(frames[0].pixel_spacing)
    for frame in frames:
        if np.max(np.abs(np.asarray(frame.orientation) - orientation)) > 1e-3:
            raise VolumeReadError(
                f"{name}: mixes image orientations ({frames[0].orientation} and {frame.orientation} in {frame.path})"
            )
        if np.max(np.abs(np.asarray(frame.pixel_spacing) - spacing)) > 1e-3:
            raise VolumeReadError(
                f"{name}: mixes pixel spacings ({tuple(spacing)} and {frame.pixel_spacing} in {frame.path})"
            )
    normal = _normal(orientation)
    distance = np.array([np.dot(f.position, normal) for f in frames])
    order = np.argsort(distance, kind="stable")
    frames, distance = [frames[i] for i in order], distance[order]

    duplicates = np.flatnonzero(np.diff(distance) < DUPLICATE_STEP_MM)
    if duplicates.size:
        pairs = ", ".join(
            f"{Path(frames[i].path).name} and {Path(frames[i + 1].path).name} at {distance[i]:.2f} mm"
            for i in duplicates[:3]
        )
        if not allow_gaps:
            raise SliceGapError(
                f"{name}: {duplicates.size} duplicate slice position(s) ({pairs})",
                "pass --allow_gaps to keep the first slice at each position",
            )
        geometry.dropped_duplicates = [frames[i + 1].path for i in duplicates]
        keep = np.setdiff1d(np.arange(len(frames)), duplicates + 1)
        frames, distance = [frames[i] for i in keep], distance[keep]
    if len(frames) < 2:
        raise VolumeReadError(f"{name}: holds a single slice; a volume needs at least 2 slices")

    positions = np.array([f.position for f in frames])
    span = positions[-1] - positions[0]
    axis = span / np.linalg.norm(span)
    off_line = np.linalg.norm(np.cross(positions - positions[0], axis), axis=1)
    if off_line.max() > 0.5:
        worst = int(np.argmax(off_line))
        raise VolumeReadError(
            f"{name}: slice positions do not lie on one line ({frames[worst].path} is "
            f"{off_line.max():.2f} mm off it); the series cannot be stacked"
        )
    geometry.tilt_deg = round(float(np.degrees(np.arccos(min(1.0, abs(axis @ normal))))), 2)
    unreadable = unreadable_slices(chosen)
    unreadable_text = f"{len(unreadable)} file(s) named like its slices are not readable as DICOM: " + ", ".join(
        f"{Path(path).name} ({why})" for path, why in unreadable.items()
    )
    steps = np.diff(distance)
    geometry.slice_steps_mm = _runs(steps)
    neighbours = np.maximum(np.r_[0.0, steps[:-1]], np.r_[steps[1:], 0.0])
    gaps = np.flatnonzero(steps > MISSING_STEP_RATIO * neighbours) if len(steps) > 1 else np.array([], int)
    if gaps.size:
        where = ", ".join(
            f"{steps[i]:.2f} mm step between {distance[i]:.2f} and {distance[i + 1]:.2f} mm "
            f"({Path(frames[i].path).name}, {Path(frames[i + 1].path).name})"
            for i in gaps[:3]
        )
        if not allow_gaps:
            raise SliceGapError(
                f"{name}: missing slice(s): {where}, against neighbouring steps of {np.median(steps):.2f} mm"
                + (f"; {unreadable_text}" if unreadable else ""),
                "pass --allow_gaps to interpolate across them",
            )
        geometry.interpolated_gaps_mm = [[round(float(distance[i]), 2), round(float(distance[i + 1]), 2)] for i in gaps]
    if unreadable:
        geometry.warn(f"{name}: {unreadable_text}; read without them")

    slices = np.stack([plane.T for plane in frame_hu(frames)], axis=-1)  # (columns, rows, slices)
    uniform = np.linspace(distance[0], distance[-1], len(frames))
    if gaps.size or np.max(np.abs(distance - uniform)) > POSITION_TOLERANCE_MM:
        count = int(round((distance[-1] - distance[0]) / steps.min())) + 1
        targets = np.linspace(distance[0], distance[-1], count)
        upper = np.clip(np.searchsorted(distance, targets, side="right"), 1, len(frames) - 1)
        weight = ((targets - distance[upper - 1]) / (distance[upper] - distance[upper - 1])).astype(np.float32)
        slices = slices[..., upper - 1] * (1 - weight) + slices[..., upper] * weight
        geometry.resampled, geometry.resampled_step_mm = True, round(float(targets[1] - targets[0]), 3)
        # One step of the new grid along the IPP line, so that its normal component is the new step.
        slice_column = axis * (targets[1] - targets[0]) / abs(axis @ normal)
    else:
        slice_column = span / (len(frames) - 1)

    affine = np.eye(4)
    affine[:3, 0] = orientation[:3] * spacing[1]
    affine[:3, 1] = orientation[3:] * spacing[0]
    affine[:3, 2] = slice_column
    affine[:3, 3] = positions[0]
    affine[:2] *= -1  # LPS -> RAS

    if geometry.tilt_deg >= 0.1:
        tag = chosen.gantry_tilt_tag_deg
        geometry.warn(
            f"{name}: gantry tilt {geometry.tilt_deg:.1f}° from the slice positions"
            + (f" (GantryDetectorTilt {tag:g}°)" if tag is not None else "")
            + "; the grid is sheared along the table so every voxel keeps its true position"
        )
        if tag is not None and abs(abs(tag) - geometry.tilt_deg) > 1.0:
            geometry.warn(
                f"{name}: GantryDetectorTilt {tag:g}° disagrees with the {geometry.tilt_deg:.1f}° "
                "the slice positions give; the positions are used"
            )
    if geometry.resampled:
        steps_text = ", ".join(f"{s:g} mm x{int(n)}" for s, n in geometry.slice_steps_mm)
        geometry.warn(
            f"{name}: uneven slice steps ({steps_text}"
            + (f"; {gaps.size} missing slice(s) interpolated" if gaps.size else "")
            + f"); resampled to {geometry.resampled_step_mm:g} mm steps along the slice axis"
        )
    if left_out:
        geometry.warn(
            f"{source}: read series {chosen.uid} '{chosen.description}' ({len(chosen.frames)} slices); "
            "left out " + "; ".join(f"{s['uid']} '{s['description']}' ({s['why']})" for s in left_out)
        )
    if len({(f.slope, f.intercept) for f in frames}) > 1:
        geometry.rescale_varies = True
        geometry.notes.append("RescaleSlope/RescaleIntercept differ between slices; each slice's own was applied")
    if chosen.photometric == "MONOCHROME1":
        geometry.notes.append("MONOCHROME1: inverted for display only; HU come from the rescale as for MONOCHROME2")
    # The SEG and SR go on the slices read, a dropped duplicate left out (highdicom refuses two frames at
    # one position), and carry the series' frame of reference, which a SEG requires.
    kept = replace(chosen, frames=frames)
    lacking = sum(not f.frame_of_reference_uid for f in frames)
    if lacking:
        with contextlib.suppress(ValueError):  # slices that disagree: the SEG writer names them
            reference = kept.frame_of_reference_uid
            source = (
                "derived from the SeriesInstanceUID (all slices of a series share one geometry)"
                if lacking == len(frames)
                else "the one the other slices carry"
            )
            geometry.notes.append(
                f"{lacking} of {len(frames)} slices have no FrameOfReferenceUID; the DICOM SEG and SR use "
                f"{reference}, {source}"
            )

    # Raw CT (slope 1, whole intercept) stays integer HU, as ITK returned it: known from the tags, no pass.
    integral = frames[0].slope == 1.0 and float(frames[0].intercept).is_integer()
    if (
        not geometry.resampled
        and not geometry.rescale_varies
        and integral
        and slices.min() >= -32768
        and slices.max() <= 32767
    ):
        slices = slices.astype(np.int16)
    return slices, affine, geometry, kept
