"""The manifest format existing users have: a CSV of scans plus a folder of hemorrhage masks.

CSV columns ``path,ich,patient_id`` (any further columns are kept as per-item metadata):

- ``path``: the scan (any format ``sam3d.data.io.load_volume`` reads), absolute or relative to the
  CSV file's folder.
- ``ich``: 1 if the scan shows intracranial hemorrhage, else 0.
- ``patient_id``: used to keep one patient's scans on one side of a train/validation split.

The mask of ``049.pkl`` is ``mask_dir/049.nii.gz`` (first found of ``VOLUME_EXTENSIONS``), voxel
values 0 = background, 1 = hemorrhage, on the scan's voxel grid. ``ich=0`` scans may have no mask.

Every problem is reported with the CSV file, its line number and the scan path, because a bad row
in a few thousand otherwise only shows up as a crash deep inside a DataLoader worker.
"""

from __future__ import annotations

import csv
import hashlib
import os
import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from monai.data import Dataset, PersistentDataset
from monai.data.utils import pickle_hashing
from monai.utils import TraceKeys
from tqdm import tqdm

from ich_engine.errors import UserError
from ich_engine.safe_unpickling import torch_safe_globals
from sam3d.data.io import (
    VOLUME_EXTENSIONS,
    Volume,
    VolumeReadError,
    align_mask_to_volume,
    load_volume,
    strip_volume_extension,
)

__all__ = [
    "REQUIRED_COLUMNS",
    "ManifestError",
    "ManifestRow",
    "build_segmentation_dataset",
    "check_no_scan_in_both",
    "read_manifest",
    "scan_fingerprint",
]

REQUIRED_COLUMNS = ("path", "ich", "patient_id")
_RAGGED = "\0ragged"  # a key no CSV header can hold: the row's cell count differs from the header's


# PersistentDataset reads its cache with torch.load(weights_only=True). The cached MetaTensors' transform
# history (kept so predictions can be inverted) holds TraceKeys and numpy arrays, which that loader
# refuses unless allowlisted; without this every cache hit is discarded as "corrupt" and recomputed.
torch.serialization.add_safe_globals(torch_safe_globals(TraceKeys))


class ManifestError(UserError, ValueError):
    """A manifest row (or the whole CSV) is unusable; the message names the CSV, the row and the path."""


@dataclass
class ManifestRow:
    """One usable scan.

    Attributes:
        row: line number in the CSV, header = line 1 (data row k is line k + 1).
        path: absolute path of the scan.
        ich: 1 = hemorrhage present, 0 = absent.
        patient_id: as written in the CSV.
        mask_path: absolute mask path, or None for an ``ich=0`` scan without a mask.
        extra: the CSV's other columns for this row, as strings.
        csv: the CSV the row is in.
        fingerprint: a hash of the scan's decoded voxels and affine (``validate="full"`` only), the
            same for the same scan under any file name, path or patient ID.
    """

    row: int
    path: str
    ich: int
    patient_id: str
    mask_path: str | None
    extra: dict = field(default_factory=dict)
    csv: str = ""
    fingerprint: str | None = None


class _RowProblem(Exception):
    """Internal: why one row is unusable; becomes a ManifestError or a skipped entry."""


def read_manifest(
    csv_path: str | os.PathLike, mask_dir: str | os.PathLike | None, validate: str = "full", skip_invalid: bool = False
) -> tuple[list[ManifestRow], list[dict]]:
    """Read and check a manifest CSV.

    Args:
        csv_path: the CSV; relative scan paths are resolved against its folder.
        mask_dir: folder of masks named after each scan's stem (relative to the working directory);
            None when no scan has a mask.
        validate: ``"paths"`` checks the CSV and that files exist. ``"full"`` also reads every scan and
            mask once (progress bar): readable, no NaN/Inf, mask on the scan's grid (same shape,
            affines equal within 1e-3 mm), mask values in {0, 1}, non-empty mask iff ``ich=1``.
        skip_invalid: instead of raising on the first bad row, leave it out, warn, and report it in
            the second return value.

    Returns:
        (rows, skipped): the usable rows in CSV order, and ``{"row", "path", "reason"}`` for each
        left-out row (empty unless ``skip_invalid``).

    Raises:
        ManifestError: an unreadable CSV, a missing column, no data rows, no usable row left, or
            (without ``skip_invalid``) the first bad row.
    """
    if validate not in ("full", "paths"):
        raise ValueError(f"validate must be 'full' or 'paths', got {validate!r}")
    csv_path = Path(csv_path)
    mask_dir = Path(mask_dir) if mask_dir is not None else None
    if mask_dir is not None and not mask_dir.is_dir():
        raise ManifestError(f"{csv_path}: mask_dir {mask_dir} is not a folder")
    records = _read_csv(csv_path)

    rows: list[ManifestRow] = []
    skipped: list[dict] = []
    unknown_geometry: list[str] = []

    def reject(line: int, path: str, reason: str) -> None:
        if not skip_invalid:
            raise ManifestError(f"{csv_path}, row {line} ({path}): {reason}")
        skipped.append({"row": line, "path": path, "reason": reason})
        warnings.warn(f"skipping {csv_path}, row {line} ({path}): {reason}", stacklevel=3)

    checks = []  # rows that passed the cheap checks, to be read when validate == "full"
    for line, record in records:
        path = record.get("path", "")
        try:
            checks.append(_parse_row(line, record, csv_path, mask_dir))
        except _RowProblem as problem:
            reject(line, path, str(problem))
    checks = _without_duplicates(checks, reject)

    if validate == "paths":
        rows = checks
    else:
        by_content: dict[str, ManifestRow] = {}
        for row in tqdm(checks, desc=f"checking {csv_path.name}", unit="scan"):
            try:
                if not _check_files(row):
                    unknown_geometry.append(row.path)
                first = by_content.setdefault(row.fingerprint or "", row)
                if first is not row:
                    raise _RowProblem(f"the same scan as row {first.row} ({first.path}): equal voxels and affine")
                rows.append(row)
            except _RowProblem as problem:
                reject(row.row, row.path, str(problem))

    if unknown_geometry:
        warnings.warn(
            f"{csv_path}: {len(unknown_geometry)} scan(s) carry no voxel spacing or orientation "
            f"(e.g. {unknown_geometry[0]}); 1 mm isotropic voxels are assumed, so resampling to the "
            f"target spacing may change their physical size. Store spacing/affine with them if known.",
            stacklevel=2,
        )
    if not rows:
        raise ManifestError(f"{csv_path}: no usable rows left; all {len(skipped)} were skipped: {skipped}")
    return rows, skipped


def check_no_scan_in_both(train: list[ManifestRow], val: list[ManifestRow], allowed: bool = False) -> None:
    """The same scan (by :func:`scan_fingerprint`) in training and validation, under any path or patient
    ID, makes validation score what was trained on: ManifestError naming both rows, unless ``allowed``
    (``--allow_patient_overlap``: one scan is one patient's)."""
    trained = {r.fingerprint: r for r in train if r.fingerprint}
    both = [(trained[r.fingerprint], r) for r in val if r.fingerprint in trained]
    if both and not allowed:
        t, v = both[0]
        raise ManifestError(
            f"{v.csv}, row {v.row} ({v.path}) is the same scan as {t.csv}, row {t.row} ({t.path}): equal voxels "
            f"and affine{f', and {len(both) - 1} more such pair(s)' if len(both) > 1 else ''}; validation would "
            "score scans it trained on: take them out of one split, or pass --allow_patient_overlap"
        )


def _without_duplicates(rows: list[ManifestRow], reject) -> list[ManifestRow]:
    """A scan listed twice, or two scans taking one mask file (``site1/scan.nii.gz`` and
    ``site2/scan.nii.gz`` both matched to ``masks/scan.nii.gz`` by stem), would train on the wrong
    thing without a word: the later row is rejected, naming the earlier one."""
    kept: list[ManifestRow] = []
    by_path: dict[str, ManifestRow] = {}
    by_mask: dict[str, ManifestRow] = {}
    for row in rows:
        if row.path in by_path:
            reject(row.row, row.path, f"duplicate of row {by_path[row.path].row} (the same scan listed twice)")
            continue
        first = by_mask.get(row.mask_path) if row.mask_path else None
        if first is not None:
            reject(
                row.row,
                row.path,
                f"takes the same mask {row.mask_path} as row {first.row} ({first.path}); scans "
                "in different folders with one file name need a 'mask' column naming each mask",
            )
            continue
        by_path[row.path] = row
        if row.mask_path:
            by_mask[row.mask_path] = row
        kept.append(row)
    return kept


def _read_csv(csv_path: Path) -> list[tuple[int, dict]]:
    """(line number, {column: stripped value}) for each non-blank data row."""
    try:
        with open(csv_path, newline="", encoding="utf-8-sig") as f:  # utf-8-sig: Excel's BOM
            reader = csv.DictReader(f)
            columns = [c.strip() for c in reader.fieldnames or []]
            reader.fieldnames = columns
            if not columns:
                header = ",".join(REQUIRED_COLUMNS)
                raise ManifestError(f"{csv_path}: the CSV is empty; expected the header {header}")
            missing = [c for c in REQUIRED_COLUMNS if c not in columns]
            if missing:
                raise ManifestError(
                    f"{csv_path}, row 1 (header): missing required column(s) {missing}; found columns {columns}"
                )
            records = []
            for record in reader:
                # DictReader puts the cells past the header's under the key None and fills a short
                # row's missing columns with None: both are a row that does not say what it seems to.
                extra, missing = record.get(None) or [], [k for k, v in record.items() if k is not None and v is None]
                values = {k: (v or "").strip() for k, v in record.items() if k is not None}
                if extra or missing:
                    cells = len(columns) + len(extra) - len(missing)
                    values[_RAGGED] = f"has {cells} cell(s), the header has {len(columns)} ({', '.join(columns)})"
                if any(values.values()):
                    records.append((reader.line_num, values))
    except (OSError, UnicodeDecodeError, csv.Error) as e:
        raise ManifestError(f"{csv_path}: cannot read the CSV ({type(e).__name__}: {e})") from e
    if not records:
        raise ManifestError(
            f"{csv_path}: the CSV has a header but no data rows, so there is nothing to train or "
            f"evaluate on; add one row per scan: path,ich,patient_id"
        )
    return records


def _parse_row(line: int, record: dict, csv_path: Path, mask_dir: Path | None) -> ManifestRow:
    """Cheap checks: as many cells as the header, values well-formed, scan exists, a mask exists where ``ich=1``."""
    if _RAGGED in record:
        raise _RowProblem(record[_RAGGED])
    csv_dir = csv_path.parent
    if not record["path"]:
        raise _RowProblem("'path' is empty")
    if not record["patient_id"]:
        raise _RowProblem("'patient_id' is empty")
    try:
        ich = float(record["ich"])
    except ValueError:
        ich = None
    if ich not in (0.0, 1.0):
        raise _RowProblem(f"'ich' must be 0 or 1, got {record['ich']!r}")
    path = Path(record["path"]).expanduser()
    path = path if path.is_absolute() else csv_dir / path
    if not path.exists():
        raise _RowProblem(f"volume file not found: {path}")
    mask_path = None
    tried = []
    if record.get("mask"):  # an explicit mask per row: the clean design for multi-site data
        explicit = Path(record["mask"]).expanduser()
        explicit = explicit if explicit.is_absolute() else csv_dir / explicit
        if not explicit.is_file():
            raise _RowProblem(f"mask file not found: {explicit} (the row's 'mask' column)")
        mask_path = str(explicit)
    elif mask_dir is not None:
        stem = strip_volume_extension(path.name)
        tried = [mask_dir / f"{stem}{ext}" for ext in VOLUME_EXTENSIONS]
        mask_path = next((str(p) for p in tried if p.is_file()), None)
    if ich == 1 and mask_path is None:
        names = ", ".join(p.name for p in tried) if tried else "no mask_dir given"
        raise _RowProblem(f"ich=1 but no mask found in {mask_dir} (tried {names})")
    extra = {k: v for k, v in record.items() if k not in (*REQUIRED_COLUMNS, "mask")}
    return ManifestRow(line, str(path), int(ich), record["patient_id"], mask_path, extra, str(csv_path))


def scan_fingerprint(volume: Volume) -> str:
    """A hash of the decoded voxels (values, shape, type) and the affine (to 1 µm): one scan copied under
    another name, path or patient ID has the same one."""
    digest = hashlib.blake2b(digest_size=16)
    digest.update(f"{volume.array.shape}{volume.array.dtype}".encode())
    digest.update(np.ascontiguousarray(volume.array).tobytes())
    digest.update(np.round(volume.affine, 3).tobytes())
    return digest.hexdigest()


def _check_files(row: ManifestRow) -> bool:
    """Read the scan and mask once and check them (and take the scan's fingerprint); returns whether
    the geometry is known."""
    try:
        volume = load_volume(row.path)  # also rejects NaN/Inf and non-3-D shapes
        row.fingerprint = scan_fingerprint(volume)
        if row.mask_path is None:
            return volume.geometry_known
        volume, mask = align_mask_to_volume(volume, load_volume(row.mask_path))
    except VolumeReadError as e:
        raise _RowProblem(str(e)) from e
    values = mask.array
    if not np.all((values == 0) | (values == 1)):
        found = np.unique(values)
        raise _RowProblem(
            f"mask {row.mask_path} must contain only 0 and 1, found values {found[:10].tolist()}"
            + (" ..." if found.size > 10 else "")
        )
    has_lesion = bool(values.any())
    if row.ich == 1 and not has_lesion:
        raise _RowProblem(f"ich=1 but mask {row.mask_path} is all zero")
    if row.ich == 0 and has_lesion:
        raise _RowProblem(f"ich=0 but mask {row.mask_path} marks {int(values.sum())} hemorrhage voxel(s)")
    return volume.geometry_known


def build_segmentation_dataset(
    rows: list[ManifestRow], transform, cache_dir: str | os.PathLike | None = None
) -> Dataset:
    """Dataset of transformed manifest rows, ready for ``monai.data.DataLoader``.

    Each item: ``image`` (C, D, H, W) float32, ``label`` (1, D, H, W) float32, ``ich`` (int),
    ``patient_id`` (str), ``path`` (str), ``row`` (int) and ``extra`` (dict of the CSV's other
    columns). ``label`` enters the transform as the mask path or None (empty mask).

    With ``cache_dir``, a ``monai.data.PersistentDataset`` stores the deterministic prefix of
    ``transform`` (up to its first random transform) on disk. The cache key covers the item, the
    scan and mask files' size and modification time, and the cached transforms, so editing a file or
    the preprocessing config does not serve stale data.
    """
    items = [
        {
            "image": r.path,
            "label": r.mask_path,
            "ich": r.ich,
            "patient_id": r.patient_id,
            "path": r.path,
            "row": r.row,
            "csv": r.csv,
            "extra": dict(r.extra),
        }
        for r in rows
    ]
    if cache_dir is None:
        return _ManifestDataset(items, transform)
    return _PersistentManifestDataset(
        items,
        transform,
        cache_dir=Path(cache_dir),
        hash_func=_item_hash,
        hash_transform=pickle_hashing,
        track_meta=True,
    )


class _RowErrors:
    """A data error met while an item is loaded (``--validate_data paths`` reads nothing up front) is
    the same one line the validation pass gives, naming the CSV row; any other error is a bug and
    passes unchanged."""

    data: Sequence[dict]

    def _transform(self, index: int):
        try:
            return super()._transform(index)  # type: ignore[misc]
        except Exception as err:
            cause: BaseException | None = err
            while cause is not None and not isinstance(cause, UserError):
                cause = cause.__cause__ or cause.__context__
            if cause is None:
                raise
            item = self.data[index]
            raise ManifestError(f"{item['csv']}, row {item['row']} ({item['path']}): {cause}") from err


class _ManifestDataset(_RowErrors, Dataset):
    pass


class _PersistentManifestDataset(_RowErrors, PersistentDataset):
    pass


def _item_hash(item: dict) -> bytes:
    """Cache key of an item: its fields plus the size and mtime of the scan and mask files."""
    stamps = [(os.stat(p).st_size, os.stat(p).st_mtime_ns) for p in (item["image"], item["label"]) if p]
    return pickle_hashing({**item, "file_stamps": stamps})
