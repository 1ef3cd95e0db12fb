"""Measurements as conditioning text for CT report generation.

A report model built with ``condition_on_measurements`` reads one short sentence in front of its
prompt — ``[queries] "Segmentation: left hemorrhage, 12.3 mL. Head CT report:" [report]`` — so the
text it writes can follow the volume and side that were measured instead of guessing them from the
image alone. The same sentence is made from two sources, which keeps training and use consistent:

- training: the ``volume_ml`` and ``side`` columns of a report manifest (``make_synthetic_ich`` writes
  them from the ground-truth mask; for real data, measure the reference masks or the segmenter's output);
- use: the :class:`sam3d.predict.Measurements` of the segmentation of the scan being reported.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

MIN_HEMORRHAGE_ML = 0.5  # smaller segmentations are treated as noise, not as a bleed
SIDES = ("left", "right", "bilateral")


def measurement_context(volume_ml: float, side: str, min_ml: float = MIN_HEMORRHAGE_ML) -> str:
    """The conditioning sentence: volume (one decimal) and side, or "no hemorrhage" below ``min_ml``."""
    if volume_ml < min_ml:
        return "Segmentation: no hemorrhage."
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES} for a {volume_ml:.1f} mL hemorrhage, got {side!r}")
    return f"Segmentation: {side} hemorrhage, {volume_ml:.1f} mL."


def context_from_measurements(measurements: Any, min_ml: float = MIN_HEMORRHAGE_ML) -> str:
    """The sentence for a ``sam3d.predict.Measurements`` (``total_volume_ml``, ``side``)."""
    return measurement_context(measurements.total_volume_ml, measurements.side, min_ml)


def context_from_row(row: Mapping[str, Any], where: str, min_ml: float = MIN_HEMORRHAGE_ML) -> str:
    """The sentence for a manifest row's ``volume_ml`` and ``side`` columns; ``where`` names the row
    in the error raised when a column is missing or unreadable."""
    value = row.get("volume_ml")
    try:
        volume_ml = float(value)
    except (TypeError, ValueError):
        volume_ml = math.nan
    if not math.isfinite(volume_ml) or volume_ml < 0:
        raise ValueError(f"{where}: conditioning on measurements needs a volume_ml column with a volume in mL "
                         f"(0 for no hemorrhage), got {value!r}")
    side = str(row.get("side") or "").strip().lower()
    if volume_ml >= min_ml and side not in SIDES:
        raise ValueError(f"{where}: volume_ml is {volume_ml:g} but side is {row.get('side')!r}; "
                         f"expected one of {SIDES}")
    return measurement_context(volume_ml, side, min_ml)
