"""Scoring the whole pipeline the way users run it: each scan through automatic segmentation with its
post-processing, on the scan's own grid, against a mask where there is one.

The click protocol of ``sam3d-evaluate --csv`` scores the model on its crop; this scores what
``sam3d-predict`` writes: Dice and volume error of bleeds with masks, and on scans known to be normal
(an empty mask, ``ich`` 0 in a CSV, or ``--normal``) every millilitre kept is a false positive.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path
from statistics import median
from typing import Any

import numpy as np

from ..data.io import Volume, VolumeReadError, align_mask_to_volume, is_volume_file, load_volume, strip_volume_extension
from .records import SegmentationResult

__all__ = ["EvaluationScan", "find_scans_and_masks", "score", "summarize"]

FALSE_POSITIVE_LIMIT_ML = 1.0  # a normal scan with more than this is counted as a false-positive scan


@dataclass(frozen=True)
class EvaluationScan:
    """One scan to score: its input (file, series folder), its mask file if any, and whether it is
    known to be normal (True), to hold a bleed (False), or unknown (None: only the measured volume)."""

    path: str
    mask_path: str | None
    normal: bool | None


def _mask_for(scan: str, mask_dir: Path) -> str | None:
    """The mask in ``mask_dir`` named like the scan (any volume extension), or None."""
    stem = strip_volume_extension(Path(scan).name)
    for candidate in sorted(mask_dir.iterdir()):
        if candidate.is_file() and is_volume_file(candidate) and strip_volume_extension(candidate.name) == stem:
            return str(candidate)
    return None


def find_scans_and_masks(
    inputs: list[str], csv_path: str | None, mask_dir: str | None, all_normal: bool
) -> list[EvaluationScan]:
    """Pair each input with its mask: a CSV's ``mask`` column (as in training manifests, relative to
    the CSV) or ``ich`` column, else a file of the same name in ``mask_dir``. Raises VolumeReadError
    naming the first row whose mask file is named but missing, or a scan that says ``ich`` 1 without a
    mask."""
    rows: list[dict[str, str]] = []
    if csv_path is not None:
        with open(csv_path, newline="") as handle:
            rows = list(csv.DictReader(handle))
    scans = []
    for number, scan in enumerate(inputs):
        row = rows[number] if rows else {}
        mask = row.get("mask") or None
        if mask is not None and not Path(mask).is_absolute():
            mask = str(Path(csv_path).parent / mask)  # type: ignore[arg-type]
        if mask is None and mask_dir is not None:
            mask = _mask_for(scan, Path(mask_dir))
        if mask is not None and not Path(mask).exists():
            raise VolumeReadError(f"{csv_path} row {number + 2}: mask {mask}: not found")
        ich = row.get("ich", "").strip()
        normal: bool | None = True if all_normal else {"0": True, "1": False}.get(ich)
        if ich == "1" and mask is None:
            where = f"{csv_path} row {number + 2}" if rows else scan
            raise VolumeReadError(f"{where}: ich is 1 but no mask was found (a 'mask' column or --mask_dir)")
        scans.append(EvaluationScan(scan, mask, normal))
    return scans


def _truth(scan: EvaluationScan, volume: Volume) -> np.ndarray | None:
    if scan.mask_path is None:
        return None
    _, mask = align_mask_to_volume(volume, load_volume(scan.mask_path))
    return np.asarray(mask.array) > 0


def score(scan: EvaluationScan, result: SegmentationResult) -> dict[str, Any]:
    """One row of ``per_scan.csv``: truth, what the pipeline kept, and the scores that apply."""
    truth = _truth(scan, result.volume)
    predicted = result.mask > 0
    voxel_ml = result.volume.voxel_volume_ml
    measured_ml = float(predicted.sum()) * voxel_ml
    true_ml = float(truth.sum()) * voxel_ml if truth is not None else None
    normal = scan.normal if truth is None else not bool(truth.any())  # a mask outranks the CSV's ich
    row: dict[str, Any] = {
        "scan": scan.path,
        "mask": scan.mask_path or "",
        "normal": "" if normal is None else int(normal),
        "true_ml": "" if true_ml is None else round(true_ml, 2),
        "measured_ml": round(measured_ml, 2),
        "dice": "",
        "volume_error": "",
        "false_positive_ml": "",
        "components": result.measurements.num_components,
        "location": result.measurements.location,
        "side": result.measurements.side,
    }
    if normal:
        row["false_positive_ml"] = round(measured_ml, 2)
    elif truth is not None:
        total = int(predicted.sum() + truth.sum())
        row["dice"] = round(2.0 * float((predicted & truth).sum()) / total, 4) if total else ""
        row["volume_error"] = round((measured_ml - true_ml) / true_ml, 4) if true_ml else ""
        row["false_positive_ml"] = round(float((predicted & ~truth).sum()) * voxel_ml, 2)
    return row


def summarize(rows: list[dict[str, Any]]) -> dict[str, Any]:
    """Per-set figures: Dice and volume error over bleeds with masks, false-positive mL over normals."""
    bleeds = [r for r in rows if r["dice"] != ""]
    normals = [r for r in rows if r["normal"] == 1]
    errors = [r["volume_error"] for r in bleeds if r["volume_error"] != ""]
    false_ml = [r["false_positive_ml"] for r in normals]
    return {
        "scans": len(rows),
        "bleeds_with_masks": len(bleeds),
        "normal_scans": len(normals),
        "unknown_scans": sum(r["normal"] == "" for r in rows),
        "dice_mean": round(float(np.mean([r["dice"] for r in bleeds])), 4) if bleeds else None,
        "dice_median": round(float(median(r["dice"] for r in bleeds)), 4) if bleeds else None,
        "median_abs_volume_error": round(float(median(abs(e) for e in errors)), 4) if errors else None,
        "median_signed_volume_error": round(float(median(errors)), 4) if errors else None,
        "normal_false_positive_ml_max": max(false_ml) if false_ml else None,
        "normal_false_positive_ml_mean": round(float(np.mean(false_ml)), 2) if false_ml else None,
        f"normal_scans_over_{FALSE_POSITIVE_LIMIT_ML:g}_ml": sum(v > FALSE_POSITIVE_LIMIT_ML for v in false_ml),
    }
