"""Reports grounded in measurements: scan → segmentation → measurements → BLIP-2 report, checked.

A generated report may contradict what the segmentation measured ("no hemorrhage" next to a measured
12 mL, the wrong side, a volume off by half). The findings labeler reads the generated text, the
contradictions are listed as flags, and with ``correct=True`` the impression is replaced by one
stated from the measurements. The measurements always enter the report as a structured line, and
as conditioning for generation when the report model was trained with it (``blip.conditioning``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from sam3d.data.io import Volume, load_volume
from sam3d.engine.config import ConfigError
from sam3d.engine.stage_timing import stage
from sam3d.predict import HemorrhageSegmenter
from sam3d.predict.records import Click, Measurements

from .conditioning import MIN_HEMORRHAGE_ML, context_from_measurements, fill_volume_slot
from .data.reports import join_sections, split_sections
from .labeler import NEGATIVE, POSITIVE, UNCERTAIN, label_ct_report

__all__ = [
    "MIN_HEMORRHAGE_ML",
    "GroundedReport",
    "ScanReporter",
    "contradictions",
    "ground_report",
    "measured_impression",
    "structured_findings",
]
_VOLUME = re.compile(r"(\d+(?:\.\d+)?)\s*(?:ml|mL|cc|milliliters?)\b")


def structured_findings(m: Measurements, min_ml: float = MIN_HEMORRHAGE_ML) -> str:
    """One sentence a radiologist can check against the mask."""
    if m.slice_extent is None or m.total_volume_ml < min_ml:  # no extent: an empty mask
        return f"Automated segmentation: no hemorrhage detected ({m.total_volume_ml:.1f} mL)."
    parts = f"{m.num_components} component" + ("s" if m.num_components != 1 else "")
    largest = f", largest {m.component_volumes_ml[0]:.1f} mL" if m.num_components > 1 else ""
    return (
        f"Automated segmentation: {m.side} hemorrhage, {m.total_volume_ml:.1f} mL in {parts}{largest}, "
        f"axial slices {m.slice_extent[0]}-{m.slice_extent[1]} "
        f"(craniocaudal extent {m.craniocaudal_extent_mm:.0f} mm)."
    )


def measured_impression(m: Measurements, min_ml: float = MIN_HEMORRHAGE_ML) -> str:
    if m.total_volume_ml < min_ml:
        return "No acute intracranial hemorrhage identified by automated segmentation."
    return f"Acute {m.side} intracranial hemorrhage, approximately {m.total_volume_ml:.0f} mL."


def contradictions(text: str, m: Measurements, min_ml: float = MIN_HEMORRHAGE_ML) -> list[str]:
    """Statements of ``text`` that the measurements contradict (empty when consistent). The impression
    is also read on its own: "IMPRESSION: No acute hemorrhage." after findings that describe one is
    positive for the whole text, yet it is the sentence a reader acts on."""
    flags = _contradictions(text, m, min_ml)
    findings, impression = split_sections(text)
    if findings and impression:
        flags += [f"impression: {flag}" for flag in _contradictions(impression, m, min_ml) if flag not in flags]
    return flags


def _contradictions(text: str, m: Measurements, min_ml: float) -> list[str]:
    labels = label_ct_report(text)
    measured = m.total_volume_ml >= min_ml
    flags = []
    if measured and labels["hemorrhage"] in (NEGATIVE, None):
        flags.append(f"report does not describe a hemorrhage, segmentation measured {m.total_volume_ml:.1f} mL")
    if not measured and labels["hemorrhage"] in (POSITIVE, UNCERTAIN):
        flags.append(f"report describes a hemorrhage, segmentation found none ({m.total_volume_ml:.1f} mL)")
    if measured and labels["hemorrhage"] == POSITIVE and labels["side"] not in ("none", m.side):
        flags.append(f"report says {labels['side']}, segmentation is {m.side}")
    if measured:
        for value in (float(v) for v in _VOLUME.findall(text)):
            if abs(value - m.total_volume_ml) > max(5.0, 0.5 * m.total_volume_ml):
                flags.append(f"report states {value:g} mL, segmentation measured {m.total_volume_ml:.1f} mL")
    return flags


@dataclass
class GroundedReport:
    report: str  # what to show: generated findings + structured line, impression corrected if flagged
    generated: str  # the language model's text, untouched
    structured_findings: str
    flags: list[str] = field(default_factory=list)
    corrected: bool = False


def ground_report(
    generated: str, m: Measurements, correct: bool = True, min_ml: float = MIN_HEMORRHAGE_ML
) -> GroundedReport:
    findings, impression = split_sections(generated)
    structured = structured_findings(m, min_ml)
    flags = contradictions(generated, m, min_ml)
    corrected = bool(flags) and correct
    if corrected:
        impression = measured_impression(m, min_ml)
    report = join_sections(" ".join(part for part in (findings, structured) if part), impression)
    return GroundedReport(report, generated, structured, flags, corrected)


class ScanReporter:
    """The whole path for one scan; CT scans are segmented and grounded, X-ray images only reported.
    A report model conditioned on measurements (``config.condition_on_measurements``) reads the
    segmentation's measurement sentence before it writes, so a CT scan is segmented first."""

    def __init__(
        self,
        segmentation_checkpoint: str | os.PathLike | None,
        report_model: str | os.PathLike,
        device: str = "cpu",
        correct: bool = True,
        generation: dict | None = None,
        segmenter_options: Mapping[str, Any] | None = None,
    ) -> None:
        """``segmenter_options``: ``HemorrhageSegmenter`` keywords (post-processing)."""
        from .model import Blip2ReportModel

        self.segmenter = (
            HemorrhageSegmenter(segmentation_checkpoint, device, **(segmenter_options or {}))
            if segmentation_checkpoint
            else None
        )
        self.model = Blip2ReportModel.from_pretrained(report_model).to(device).eval()
        if self.model.config.condition_on_measurements and self.segmenter is None:
            raise ConfigError(f"{report_model} is conditioned on measurements: it needs --segmentation_checkpoint")
        self.device = device
        self.correct = correct
        self.generation = dict(generation or {})

    @property
    def conditioned(self) -> bool:
        return self.model.config.condition_on_measurements

    def generate(
        self, scan: str | os.PathLike | Volume, modality: str, measurements: Measurements | None = None
    ) -> str:
        """The model's report for one image (a path, or a CT Volume already read); ``measurements``
        are required by (and only given to) a conditioned model's CT reports, whose volume slot they fill."""
        if self.conditioned and modality == "ct" and measurements is None:
            raise ValueError("this report model is conditioned on measurements: segment the scan first")
        with stage("report LM"):
            image = self.model.processor.images([scan if isinstance(scan, Volume) else str(scan)], modality)
            if not (self.conditioned and modality == "ct"):
                return self.model.generate(image.to(self.device), modality, None, **self.generation)[0]
            assert measurements is not None
            context = [context_from_measurements(measurements)]
            text = self.model.generate(image.to(self.device), modality, context, **self.generation)[0]
            return fill_volume_slot(text, measurements.total_volume_ml)

    def run(
        self,
        scan: str | os.PathLike | Volume,
        modality: str = "ct",
        clicks: list[Click] | None = None,
        output_dir: str | os.PathLike | None = None,
    ) -> dict[str, Any]:
        """Report one scan: a path, or for CT a Volume already read (so it is read once, with its
        DICOM series choice)."""
        result: dict[str, Any] = {
            "source": scan.source if isinstance(scan, Volume) else str(scan),
            "modality": modality,
        }
        if modality != "ct" or self.segmenter is None:
            text = self.generate(scan, modality)
            findings, impression = split_sections(text)
            result.update(report=text, findings=findings, impression=impression)
            return result
        volume = scan if isinstance(scan, Volume) else load_volume(scan)
        segmentation = self.segmenter.predict(volume, clicks)
        text = self.generate(volume, modality, segmentation.measurements)
        grounded = ground_report(text, segmentation.measurements, self.correct)
        findings, impression = split_sections(grounded.report)
        if output_dir is not None:  # after the report: a scan whose report fails leaves no mask files behind
            segmentation = self.segmenter.save(segmentation, output_dir, report_sections=(findings, impression))
        result.update(segmentation=segmentation.to_json(), findings=findings, impression=impression, **asdict(grounded))
        return result
