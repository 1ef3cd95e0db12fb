"""Read a CT volume or mask from any format users have, keeping its geometry, and write NIfTI safely.

Every reader returns a :class:`Volume` in one convention, nibabel's: ``array`` is indexed by voxel
axes (i, j, k) and ``affine`` maps ``(i, j, k, 1)`` to RAS+ world millimetres. Formats read through
SimpleITK (NRRD, MHA/MHD) are converted from ITK's (z, y, x) arrays and LPS geometry, the same
conversion MONAI's ``ITKReader`` does, so one scan gives the same array and affine in every format.
DICOM series are stacked from every slice's own position (:mod:`sam3d.data.dicom`), so gantry tilt
and uneven steps keep their true geometry; the affine may then be sheared. ``Volume.geometry``
records how the grid was obtained.

Anything wrong with a file raises :class:`VolumeReadError` with the file's path and the reason, so a
data problem in a folder of thousands of scans can be found without a debugger.
"""

from __future__ import annotations

import csv
import io
import os
import pickle
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import nibabel as nib
import numpy as np
import pydicom
import SimpleITK as sitk

from ich_engine.checkpoint import atomic_write
from ich_engine.safe_unpickling import ARRAY_PICKLE_GLOBALS
from ich_engine.stage_timing import stage

from .dicom import Series, is_dicom_file, read_dicom_folder
from .errors import VolumeReadError
from .geometry import Geometry, corner_distance_mm, slice_tilt_deg, voxel_volume_ml

__all__ = [
    "VOLUME_EXTENSIONS",
    "SUPPORTED_FORMATS",
    "Volume",
    "VolumeReadError",
    "align_mask_to_volume",
    "is_dicom_file",
    "is_volume_file",
    "load_volume",
    "save_nifti",
    "scan_inputs",
    "strip_volume_extension",
]

_NIFTI_EXTS = (".nii.gz", ".nii")
_ITK_EXTS = (".nrrd", ".mha", ".mhd")
_NPZ_KEYS = ("image", "array", "arr_0", "data")
_PICKLE_ARRAY_KEYS = ("image", "array", "data", "volume", "img")
# The one list of volume file extensions (masks are looked up in this order too). Longest first so
# ".nii.gz" is stripped whole.
VOLUME_EXTENSIONS = _NIFTI_EXTS + _ITK_EXTS + (".npy", ".npz", ".pkl", ".pickle")
SUPPORTED_FORMATS = ", ".join(VOLUME_EXTENSIONS) + ", a DICOM file (any name) or a folder holding a DICOM series"


@dataclass
class Volume:
    """One 3-D image on its voxel grid.

    Attributes:
        array: shape (I, J, K). float32 for floating-point data; integer data (masks, raw int16 CT)
            keeps its integer dtype so label values stay exact (bool becomes uint8).
        affine: 4x4 float64, voxel index (i, j, k, 1) -> RAS+ world position in mm.
        spacing_mm: voxel size along i, j, k in mm (the affine's column norms).
        source: the path the volume was read from.
            For a sheared grid (gantry tilt) these are not the voxel's extents: use
            :attr:`voxel_volume_ml` for volumes.
        source: the path the volume was read from.
        geometry_known: False when the file carried no geometry (``.npy``, ``.npz``, a bare pickled
            array): spacing is then assumed 1 mm and the affine the identity, which silently changes
            the physical size after resampling, so callers should warn.
        geometry: how the grid was obtained (format, tilt, steps, resampling, DICOM series chosen).
        dicom: the DICOM series read (frames with their files and positions), for results written
            back onto the original slices (DICOM SEG); None for other formats.
    """

    array: np.ndarray
    affine: np.ndarray
    spacing_mm: tuple[float, float, float]
    source: str
    geometry_known: bool = True
    geometry: Geometry = field(default_factory=lambda: Geometry("array"))
    dicom: Series | None = field(default=None, repr=False)

    @property
    def voxel_volume_ml(self) -> float:
        return voxel_volume_ml(self.affine)


def is_volume_file(path: str | os.PathLike) -> bool:
    """A file whose name says it is a volume this module reads (DICOM files are known by content)."""
    return Path(path).name.lower().endswith(VOLUME_EXTENSIONS)


def scan_inputs(spec: str | os.PathLike) -> list[str]:
    """The scans a CLI's ``--input`` names, each one input for :func:`load_volume`.

    - a CSV: its ``path`` column (relative paths from the CSV's folder);
    - a folder holding DICOM files (any names, extensions or none): that folder, one series input,
      plus any volume files beside them;
    - a folder of volumes and/or DICOM series folders: each of them;
    - anything else: itself.

    Raises VolumeReadError naming the path when nothing usable is found.
    """
    path = Path(spec)
    if not path.exists():
        raise VolumeReadError(f"{path}: not found")
    if path.suffix.lower() == ".csv":
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "path" not in rows[0]:
            raise VolumeReadError(f"{path}: expected a CSV with a 'path' column and at least one row")
        return [str(p if Path(p).is_absolute() else path.parent / p) for p in (row["path"] for row in rows)]
    if not path.is_dir():
        return [str(path)]
    entries = sorted(path.iterdir())
    files = [p for p in entries if p.is_file()]
    found = [str(p) for p in files if is_volume_file(p)]
    if any(is_dicom_file(p) for p in files if not is_volume_file(p)):
        found.insert(0, str(path))
    found += [
        str(p)
        for p in entries
        if p.is_dir() and any(is_dicom_file(f) or is_volume_file(f) for f in p.iterdir() if f.is_file())
    ]
    if not found:
        raise VolumeReadError(
            f"{path}: no volumes ({', '.join(VOLUME_EXTENSIONS)}), DICOM files or DICOM series folders inside"
        )
    return found


def strip_volume_extension(name: str) -> str:
    """Return a file or folder name without its volume extension (``049.nii.gz`` -> ``049``)."""
    lower = name.lower()
    for ext in VOLUME_EXTENSIONS:
        if lower.endswith(ext):
            return name[: -len(ext)]
    return name


def load_volume(path: str | os.PathLike, series: str | None = None, allow_gaps: bool = False) -> Volume:
    """Read a 3-D volume from NIfTI, NRRD, MHA/MHD, a DICOM series folder, NPY, NPZ or pickle.

    Size-1 axes beyond the three spatial ones (a 4-D NIfTI with one channel) are dropped; arrays
    without geometry drop every size-1 axis (a saved ``(1, X, Y, Z)`` tensor). For a DICOM folder,
    ``series`` picks a SeriesInstanceUID or a SeriesDescription match and ``allow_gaps`` accepts
    missing slices (interpolated) and duplicate positions (first kept); see :mod:`sam3d.data.dicom`.

    Raises:
        VolumeReadError: missing, unreadable or unsupported file, refused pickle content, a shape that
            is not 3-D, or NaN/Inf voxels. The message names the file.
    """
    with stage("read"):
        return _load_volume(path, series, allow_gaps)


def _load_volume(path: str | os.PathLike, series: str | None, allow_gaps: bool) -> Volume:
    source = str(path)
    p = Path(path)
    if not p.exists():
        raise VolumeReadError(f"{source}: file does not exist")
    lower = p.name.lower()
    if p.is_dir() or is_dicom_file(p):
        return _read_dicom(p, series, allow_gaps)
    reader: Callable[[Path], tuple[np.ndarray, np.ndarray | None, Geometry]]
    if lower.endswith(_NIFTI_EXTS):
        reader = _read_nifti
    elif lower.endswith(_ITK_EXTS):
        reader = _read_itk_file
    elif lower.endswith(".npy"):
        reader = _read_npy
    elif lower.endswith(".npz"):
        reader = _read_npz
    elif lower.endswith((".pkl", ".pickle")):
        reader = _read_pickle
    else:
        raise VolumeReadError(f"{source}: unsupported file type; supported: {SUPPORTED_FORMATS}")
    try:
        array, affine, geometry = reader(p)
    except VolumeReadError:
        raise
    except Exception as e:  # any reader failure on a corrupt or truncated file
        raise VolumeReadError(f"{source}: cannot read ({type(e).__name__}: {e})") from e
    return _validated(array, affine, source, geometry)


def _read_dicom(path: Path, series: str | None, allow_gaps: bool) -> Volume:
    """A series folder, or one DICOM file standing for the series it belongs to (read from its folder)."""
    try:
        if not path.is_dir() and series is None:
            series = str(
                pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID"]).SeriesInstanceUID
            )
        array, affine, geometry, chosen = read_dicom_folder(path if path.is_dir() else path.parent, series, allow_gaps)
    except VolumeReadError:
        raise
    except Exception as e:  # pydicom/GDCM failures on corrupt files
        raise VolumeReadError(f"{path}: cannot read the DICOM series ({type(e).__name__}: {e})") from e
    volume = _validated(array, affine, str(path), geometry)
    volume.dicom = chosen
    return volume


def save_nifti(path: str | os.PathLike, array: np.ndarray, affine: np.ndarray) -> None:
    """Write ``array`` (I, J, K) with its voxel->RAS mm ``affine`` to ``.nii``/``.nii.gz`` atomically.

    The file is written to a temporary name in the same folder and moved into place with
    ``os.replace``, so a crash never leaves a half-written file under ``path``. bool is stored as
    uint8 and int64 as int32 (NIfTI readers handle int64 poorly).
    """
    path = Path(path)
    if not path.name.lower().endswith(_NIFTI_EXTS):
        raise ValueError(f"{path}: save_nifti writes .nii or .nii.gz files only")
    array = np.asarray(array)
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4):
        raise ValueError(f"{path}: affine must be 4x4, got shape {affine.shape}")
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif array.dtype in (np.int64, np.uint64):
        if array.size and (array.min() < np.iinfo(np.int32).min or array.max() > np.iinfo(np.int32).max):
            raise ValueError(f"{path}: int64 values do not fit the int32 NIfTI type")
        array = array.astype(np.int32)
    image = nib.Nifti1Image(array, affine)
    image.header.set_xyzt_units("mm")
    image.set_qform(affine, code=1)  # both codes "scanner" so ITK-based tools read the same geometry
    image.set_sform(affine, code=1)
    atomic_write(path, lambda tmp: nib.save(image, str(tmp)))  # nibabel compresses by the .gz name


def align_mask_to_volume(volume: Volume, mask: Volume, atol_mm: float = 1e-3) -> tuple[Volume, Volume]:
    """Check that ``mask`` lies on ``volume``'s voxel grid and fill in geometry one side lacks.

    Users often store the scan as a bare array (``.pkl``/``.npy``) and the mask as NIfTI; the two are
    then voxel-aligned by construction and the side with geometry lends it to the other. When both
    carry geometry, their affines must agree within ``atol_mm``.

    Returns:
        (volume, mask), with the known affine copied onto the one whose geometry was unknown.

    Raises:
        VolumeReadError: "shape mismatch" or "geometry mismatch", naming both files.
    """
    if mask.array.shape != volume.array.shape:
        raise VolumeReadError(
            f"shape mismatch: mask {mask.source} has shape {mask.array.shape}, "
            f"volume {volume.source} has shape {volume.array.shape}"
        )
    if volume.geometry_known and mask.geometry_known:
        if not np.allclose(mask.affine, volume.affine, rtol=0.0, atol=atol_mm):
            raise VolumeReadError(
                f"geometry mismatch: affine of mask {mask.source} {_format_affine(mask.affine)} differs "
                f"from affine of volume {volume.source} {_format_affine(volume.affine)} (voxel -> RAS mm)"
            )
    elif volume.geometry_known:
        mask = _with_affine(mask, volume.affine)
    elif mask.geometry_known:
        volume = _with_affine(volume, mask.affine)
    return volume, mask


# ----------------------------------------------------------------------------------------------
# Readers: each returns (array, affine or None) in (i, j, k) / RAS convention; None = no geometry.


SFORM_QFORM_TOLERANCE_MM = 1.0


def _read_nifti(path: Path) -> tuple[np.ndarray, np.ndarray, Geometry]:
    """nibabel's choice of affine (sform, else qform), with a warning when the two disagree.

    dcm2niix writes a tilted scan's shear into the sform only (a qform cannot hold a shear), so the
    two differ there by design; which one a tool uses decides where every voxel is.
    """
    image = nib.load(str(path), mmap=False)  # no file handle left open behind the array
    if not isinstance(image, nib.Nifti1Image):  # Nifti2Image is one too
        raise VolumeReadError(f"{path}: not a NIfTI image (nibabel read it as {type(image).__name__})")
    sform, sform_code = image.header.get_sform(coded=True)
    qform, qform_code = image.header.get_qform(coded=True)
    used = "sform" if sform_code else "qform" if qform_code else "pixdim (no sform or qform code)"
    # nibabel's header check turns a zero voxel size into 1 mm when loading: read the stored one.
    with nib.openers.ImageOpener(str(path)) as handle:
        stored = type(image.header).from_fileobj(handle, check=False)
    pixdim = [float(v) for v in stored["pixdim"][1:4]]
    if not sform_code and any(not np.isfinite(v) or v <= 0 for v in pixdim):
        raise VolumeReadError(
            f"{path}: voxel size unknown: pixdim {pixdim} has a zero or negative entry and "
            "there is no sform to place the grid"
        )
    geometry = Geometry("nifti", used)
    if sform_code and qform_code:
        gap = corner_distance_mm(sform, qform, image.shape)
        if gap > SFORM_QFORM_TOLERANCE_MM:
            geometry.warn(
                f"{path}: sform and qform place the grid up to {gap:.1f} mm apart; the sform "
                f"(code {int(sform_code)}) is used, as nibabel and dcm2niix do"
            )
    # asanyarray applies the scaling slope/intercept; unscaled integer data stays integer.
    return np.asanyarray(image.dataobj), image.affine, geometry


def _read_itk_file(path: Path) -> tuple[np.ndarray, np.ndarray, Geometry]:
    return (*_from_sitk(sitk.ReadImage(str(path)), path), Geometry("itk", "origin, spacing and direction"))


def _from_sitk(image: sitk.Image, source: Path) -> tuple[np.ndarray, np.ndarray]:
    """ITK array (z, y, x) + LPS geometry -> array (x, y, z) + RAS affine, as MONAI's ITKReader."""
    n_components = image.GetNumberOfComponentsPerPixel()
    if n_components != 1:
        raise VolumeReadError(f"{source}: {n_components} components per voxel, expected 1")
    dim = image.GetDimension()
    if dim < 3:
        raise VolumeReadError(f"{source}: {dim}-D image {image.GetSize()}, expected a 3-D volume")
    array = sitk.GetArrayFromImage(image).transpose()  # reverses all axes: (.., z, y, x) -> (x, y, z, ..)
    direction = np.asarray(image.GetDirection(), dtype=np.float64).reshape(dim, dim)[:3, :3]
    affine = np.eye(4)
    affine[:3, :3] = direction @ np.diag(image.GetSpacing()[:3])
    affine[:3, 3] = image.GetOrigin()[:3]
    affine[:2] *= -1  # LPS -> RAS: negate the world x and y rows
    return array, affine


def _read_npy(path: Path) -> tuple[np.ndarray, None, Geometry]:
    return np.load(path, allow_pickle=False), None, Geometry("array")


def _read_npz(path: Path) -> tuple[np.ndarray, None, Geometry]:
    with np.load(path, allow_pickle=False) as archive:
        keys = list(archive.files)
        key = next((k for k in _NPZ_KEYS if k in keys), keys[0] if len(keys) == 1 else None)
        if key is None:
            raise VolumeReadError(
                f"{path}: cannot tell which array is the volume; expected one of {list(_NPZ_KEYS)} "
                f"or a single array, found keys {keys}"
            )
        return archive[key], None, Geometry("array")


def _read_pickle(path: Path) -> tuple[np.ndarray, np.ndarray | None, Geometry]:
    """A pickled ndarray, or a dict with the array and optional ``spacing`` (3) / ``affine`` (4x4)."""
    with open(path, "rb") as f:
        obj = _ArrayOnlyUnpickler(f, str(path)).load()
    if isinstance(obj, np.ndarray):
        return obj, None, Geometry("array")
    if not isinstance(obj, dict):
        raise VolumeReadError(f"{path}: pickle holds a {type(obj).__name__}, expected a numpy array or dict")
    key = next((k for k in _PICKLE_ARRAY_KEYS if k in obj), None)
    if key is None:
        raise VolumeReadError(
            f"{path}: pickled dict has no array under {list(_PICKLE_ARRAY_KEYS)}; found keys {list(obj)}"
        )
    array = np.asarray(obj[key])
    affine = None
    if obj.get("affine") is not None:
        affine = np.asarray(obj["affine"], dtype=np.float64)
        if affine.shape != (4, 4):
            raise VolumeReadError(f"{path}: 'affine' must be 4x4, got shape {affine.shape}")
    if obj.get("spacing") is not None:
        spacing = np.asarray(obj["spacing"], dtype=np.float64).ravel()
        if spacing.shape != (3,) or not np.all(spacing > 0):
            raise VolumeReadError(f"{path}: 'spacing' must be 3 positive numbers, got {obj['spacing']!r}")
        if affine is None:
            affine = np.diag([*spacing, 1.0])  # axis-aligned: voxel axes taken as R, A, S
        elif not np.allclose(_spacing(affine), spacing, atol=1e-3):
            raise VolumeReadError(
                f"{path}: 'spacing' {spacing.tolist()} disagrees with the affine's voxel size {list(_spacing(affine))}"
            )
    return (
        array,
        affine,
        Geometry(
            "array",
            "pickled affine"
            if obj.get("affine") is not None
            else "pickled spacing"
            if obj.get("spacing") is not None
            else "",
        ),
    )


class _ArrayOnlyUnpickler(pickle.Unpickler):
    """Unpickler that can rebuild numpy arrays, numbers and containers and nothing else.

    Plain ``pickle.load`` runs whatever callable the file names (``os.system``...), and ``.pkl``
    volumes come from users, so every global a pickle asks for must be in ``ARRAY_PICKLE_GLOBALS``.
    """

    def __init__(self, file: io.BufferedReader, source: str):
        super().__init__(file)
        self._source = source

    def find_class(self, module: str, name: str):
        try:
            return ARRAY_PICKLE_GLOBALS[(module, name)]
        except KeyError:
            raise VolumeReadError(
                f"{self._source}: refused to unpickle '{module}.{name}'; only numpy arrays, numbers and "
                f"dict/list/tuple containers are allowed in .pkl volumes"
            ) from None


# ----------------------------------------------------------------------------------------------
# Validation shared by all formats.


def _validated(array: np.ndarray, affine: np.ndarray | None, source: str, geometry: Geometry) -> Volume:
    array = np.asarray(array)
    if array.dtype == bool:
        array = array.astype(np.uint8)
    elif np.issubdtype(array.dtype, np.floating):
        n_bad = int(np.count_nonzero(~np.isfinite(array)))
        if n_bad:
            raise VolumeReadError(f"{source}: {n_bad} NaN/Inf voxel(s) out of {array.size}")
        array = array.astype(np.float32, copy=False)
    elif not np.issubdtype(array.dtype, np.integer):
        raise VolumeReadError(f"{source}: unsupported voxel type {array.dtype}, expected numbers")
    if array.size == 0:
        raise VolumeReadError(f"{source}: volume is empty (shape {array.shape})")
    original_shape = array.shape
    if affine is None:
        array = array.squeeze()  # no geometry to keep consistent: drop every size-1 axis
    elif array.ndim > 3:
        array = array.squeeze(axis=tuple(a for a in range(3, array.ndim) if array.shape[a] == 1))
    if array.ndim != 3:
        raise VolumeReadError(
            f"{source}: expected a 3-D volume (4-D allowed with one channel), got shape {original_shape}"
        )
    geometry_known = affine is not None
    affine = np.asarray(affine, dtype=np.float64) if geometry_known else np.eye(4)
    if geometry_known:
        _check_plausible_grid(affine, array.shape, source)
    if geometry_known and geometry.format != "dicom":
        geometry.tilt_deg = round(slice_tilt_deg(affine), 2)  # a sheared NIfTI (dcm2niix's tilted output)
    return Volume(array, affine, _spacing(affine), source, geometry_known, geometry)


MIN_VOXEL_MM, MAX_VOXEL_MM, MAX_EXTENT_MM = 0.01, 50.0, 2000.0


def _check_plausible_grid(affine: np.ndarray, shape: tuple[int, ...], source: str) -> None:
    """A voxel grid no scanner writes (singular, sub-micron or half-decimetre voxels, a field of view
    past 2 m) is an error here, before resampling tries to allocate it."""
    if not np.all(np.isfinite(affine)) or abs(np.linalg.det(affine[:3, :3])) < MIN_VOXEL_MM**3:
        raise VolumeReadError(
            f"{source}: the affine is singular or not finite ({_format_affine(affine)}); the voxel size is unknown"
        )
    spacing = _spacing(affine)
    extent = [n * s for n, s in zip(shape, spacing)]
    if min(spacing) < MIN_VOXEL_MM or max(spacing) > MAX_VOXEL_MM or max(extent) > MAX_EXTENT_MM:
        raise VolumeReadError(
            f"{source}: implausible grid: voxel size {[round(v, 4) for v in spacing]} mm, field "
            f"of view {[round(v) for v in extent]} mm (expected voxels of {MIN_VOXEL_MM:g}-"
            f"{MAX_VOXEL_MM:g} mm and at most {MAX_EXTENT_MM:g} mm per axis)"
        )


def _spacing(affine: np.ndarray) -> tuple[float, float, float]:
    x, y, z = np.linalg.norm(affine[:3, :3], axis=0)
    return float(x), float(y), float(z)


def _format_affine(affine: np.ndarray) -> str:
    """The top three rows on one line, so the message stays one log line."""
    return np.array2string(np.round(affine[:3], 4), separator=", ", suppress_small=True).replace("\n", "")


def _with_affine(volume: Volume, affine: np.ndarray) -> Volume:
    return Volume(volume.array, affine.copy(), _spacing(affine), volume.source, True, volume.geometry, volume.dicom)
