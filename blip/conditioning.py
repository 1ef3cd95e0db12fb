"""Measurements as conditioning text for CT report generation.

A report model built with ``condition_on_measurements`` reads one short sentence in front of its
prompt — ``[queries] "Segmentation: left hemorrhage, 12.3 mL. Head CT report:" [report]`` — so the
text it writes can follow the volume and side that were measured instead of guessing them from the
image alone. The same sentence is made from two sources, which keeps training and use consistent:

- training: the ``volume_ml`` and ``side`` columns of a report manifest (``make_synthetic_ich`` writes
  them from the ground-truth mask; for real data, measure the reference masks or the segmenter's output);
- use: the :class:`sam3d.predict.records.Measurements` of the segmentation of the scan being reported.

The volume itself is never left to the language model to copy: in the reports a conditioned model
learns from, the measured volume is written as the slot ``<|volume|>`` (:func:`volume_slot_text`),
and the slot of a generated report is filled with the measurement (:func:`fill_volume_slot`), so a
report cannot state a volume other than the one measured.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

from .data.reports import ReportManifestError, manifest_volume_ml

MIN_HEMORRHAGE_ML = 0.5  # smaller segmentations are treated as noise, not as a bleed
SIDES = ("left", "right", "bilateral")
VOLUME_SLOT = "<|volume|>"
_VOLUME_MENTION = re.compile(r"(\d+(?:\.\d+)?)(\s*)(mL|ml|cc)\b")


def format_volume(volume_ml: float) -> str:
    """As radiologists write it: whole millilitres from 10 mL up, one decimal below."""
    return f"{volume_ml:.0f}" if volume_ml >= 10 else f"{volume_ml:.1f}".removesuffix(".0")


def volume_slot_text(report: str, volume_ml: float) -> str:
    """``report`` with each stated volume that is the measured one (within rounding: 0.5 mL or 5%)
    written as :data:`VOLUME_SLOT`; other numbers stay."""

    def slot(match: re.Match) -> str:
        value = float(match.group(1))
        same = abs(value - volume_ml) <= max(0.5, 0.05 * volume_ml)
        return f"{VOLUME_SLOT}{match.group(2)}{match.group(3)}" if same else match.group(0)

    return _VOLUME_MENTION.sub(slot, report)


def fill_volume_slot(text: str, volume_ml: float) -> str:
    """A generated report with its volume slots written as the measured volume."""
    return text.replace(VOLUME_SLOT, format_volume(volume_ml))


def measurement_context(volume_ml: float, side: str, min_ml: float = MIN_HEMORRHAGE_ML) -> str:
    """The conditioning sentence: volume (one decimal) and side, or "no hemorrhage" below ``min_ml``."""
    if volume_ml < min_ml:
        return "Segmentation: no hemorrhage."
    if side not in SIDES:
        raise ValueError(f"side must be one of {SIDES} for a {volume_ml:.1f} mL hemorrhage, got {side!r}")
    return f"Segmentation: {side} hemorrhage, {volume_ml:.1f} mL."


def context_from_measurements(measurements: Any, min_ml: float = MIN_HEMORRHAGE_ML) -> str:
    """The sentence for a ``sam3d.predict.records.Measurements`` (``total_volume_ml``, ``side``)."""
    return measurement_context(measurements.total_volume_ml, measurements.side, min_ml)


def context_from_row(row: Mapping[str, Any], where: str, min_ml: float = MIN_HEMORRHAGE_ML) -> str:
    """The sentence for a manifest row's ``volume_ml`` and ``side`` columns; ``where`` names the row
    in the error raised when a column is missing or unreadable."""
    volume_ml = manifest_volume_ml(row.get("volume_ml"), where)
    if volume_ml is None:
        raise ReportManifestError(
            f"{where}: conditioning on measurements needs a volume_ml column with a volume in mL "
            "(0 for no hemorrhage), found none"
        )
    side = str(row.get("side") or "").strip().lower()
    if volume_ml >= min_ml and side not in SIDES:
        raise ReportManifestError(
            f"{where}: volume_ml is {volume_ml:g} but side is {row.get('side')!r}; expected one of {SIDES}"
        )
    return measurement_context(volume_ml, side, min_ml)
