"""Reports grounded in measurements: scan → segmentation → measurements → BLIP-2 report, checked.

A generated report may contradict what the segmentation measured ("no hemorrhage" next to a measured
12 mL, the wrong side, a volume off by half, a subdural where the mask lies in the parenchyma). The
findings labeler reads the generated text, the contradictions are listed as flags, and with
``correct=True`` the findings sentences that state them are left out and the impression is replaced
by one stated from the measurements. The measurements always enter the report as a structured line, and
as conditioning for generation when the report model was trained with it (``blip.conditioning``).
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any

from blip.app.scan_report import ScanReport
from blip.conditioning import MIN_HEMORRHAGE_ML, context_from_measurements, fill_volume_slot
from blip.data.reports import join_sections, split_sections
from blip.evaluation.labeler import CT_SUBTYPES, NEGATIVE, POSITIVE, UNCERTAIN, label_ct_report
from blip.model import Blip2ReportModel
from ich_engine.config import ConfigError
from ich_engine.stage_timing import stage
from sam3d.data.io import Volume, load_volume
from sam3d.predict import HemorrhageSegmenter
from sam3d.predict.records import Click, ComponentMeasurement, Measurements, SegmentationResult

__all__ = [
    "LOCATION_SUBTYPES",
    "MIN_HEMORRHAGE_ML",
    "GroundedReport",
    "ScanReporter",
    "caveat_not_a_head_ct",
    "contradictions",
    "ground_report",
    "measured_impression",
    "measured_subtypes",
    "structured_findings",
    "subtype_contradictions",
]
_VOLUME = re.compile(r"(\d+(?:\.\d+)?)\s*(?:ml|mL|cc|milliliters?)\b")
_SENTENCE_END = re.compile(r"(?<=[.!?;])\s+")
# The labeler's subtype of each location class of the mask ("indeterminate" supports none).
LOCATION_SUBTYPES = {
    "intraparenchymal": "IPH",
    "intraventricular": "IVH",
    "subarachnoid": "SAH",
    "subdural": "SDH",
    "epidural": "EDH",
}


def _located(m: Measurements, min_ml: float) -> list[ComponentMeasurement]:
    """The components a report should describe: those of ``min_ml`` or more (the largest if none is),
    whose location could be determined, largest first."""
    kept = [c for c in m.components if c.volume_ml >= min_ml] or m.components[:1]
    return [c for c in kept if c.location in LOCATION_SUBTYPES]


def measured_subtypes(m: Measurements, min_ml: float = MIN_HEMORRHAGE_ML) -> set[str]:
    """The labeler's subtypes (IPH, SDH, ...) the mask's components are located in."""
    return {LOCATION_SUBTYPES[c.location] for c in _located(m, min_ml)}


def _location_phrase(m: Measurements, min_ml: float) -> str:
    """ "intraparenchymal (parietal)", "subdural (convexity) and intraventricular (lateral ventricle)"."""
    phrases = dict.fromkeys(f"{c.location} ({c.region})" for c in _located(m, min_ml))
    return " and ".join(phrases)


def structured_findings(m: Measurements, min_ml: float = MIN_HEMORRHAGE_ML) -> str:
    """One sentence a radiologist can check against the mask."""
    if m.slice_extent is None or m.total_volume_ml < min_ml:  # no extent: an empty mask
        return f"Automated segmentation: no hemorrhage detected ({m.total_volume_ml:.1f} mL)."
    parts = f"{m.num_components} component" + ("s" if m.num_components != 1 else "")
    largest = f", largest {m.component_volumes_ml[0]:.1f} mL" if m.num_components > 1 else ""
    location = _location_phrase(m, min_ml)
    abc2 = f" (ABC/2 {m.abc2_ml:.1f} mL)" if m.components else ""
    return (
        f"Automated segmentation: {m.side} {location + ' ' if location else ''}hemorrhage, "
        f"{m.total_volume_ml:.1f} mL{abc2} in {parts}{largest}, "
        f"axial slices {m.slice_extent[0]}-{m.slice_extent[1]} "
        f"(craniocaudal extent {m.craniocaudal_extent_mm:.0f} mm)."
    )


def measured_impression(m: Measurements, min_ml: float = MIN_HEMORRHAGE_ML) -> str:
    if m.total_volume_ml < min_ml:
        return "No acute intracranial hemorrhage identified by automated segmentation."
    location = _location_phrase(m, min_ml) or "intracranial"
    return f"Acute {m.side} {location} hemorrhage, approximately {m.total_volume_ml:.0f} mL."


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
        flags += _subtype_contradictions(labels, m, min_ml)
    return flags


def subtype_contradictions(text: str, m: Measurements, min_ml: float = MIN_HEMORRHAGE_ML) -> list[str]:
    """The flag (one or none) for subtypes ``text`` names where the mask's components are not located
    (a report that names fewer, or none, is not contradicted; an indeterminate location checks nothing)."""
    return _subtype_contradictions(label_ct_report(text), m, min_ml) if m.total_volume_ml >= min_ml else []


def _subtype_contradictions(labels: dict, m: Measurements, min_ml: float) -> list[str]:
    located = measured_subtypes(m, min_ml)
    said = {subtype for subtype in CT_SUBTYPES if labels[subtype] == POSITIVE}
    if not located or labels["hemorrhage"] != POSITIVE or said <= located:
        return []
    return [f"report says {'+'.join(sorted(said))}, segmentation locates {'+'.join(sorted(located))}"]


def _consistent_sentences(findings: str, m: Measurements, min_ml: float) -> str:
    """``findings`` without the sentences that state something the measurements contradict."""
    kept = [
        sentence
        for sentence in _SENTENCE_END.split(findings)
        if label_ct_report(sentence)["hemorrhage"] is None or not _contradictions(sentence, m, min_ml)
    ]
    return " ".join(kept)


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
        findings = _consistent_sentences(findings, m, min_ml)
        impression = measured_impression(m, min_ml)
    report = join_sections(" ".join(part for part in (findings, structured) if part), impression)
    return GroundedReport(report, generated, structured, flags, corrected)


def caveat_not_a_head_ct(grounded: GroundedReport, not_a_head_ct: list[str]) -> GroundedReport:
    """``grounded`` with a sentence in front of its impression when the scan cannot be a whole head CT
    (``Geometry.not_a_head_ct``): a negative result on it must never read as "no hemorrhage" alone."""
    if not not_a_head_ct:
        return grounded
    findings, impression = split_sections(grounded.report)
    caveat = (
        f"The scan does not look like a head CT ({'; '.join(not_a_head_ct)}): "
        "this result cannot exclude intracranial hemorrhage."
    )
    return replace(grounded, report=join_sections(findings, f"{caveat} {impression}".strip()))


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
    ) -> ScanReport:
        """Report one scan: a path, or for CT a Volume already read (so it is read once, with its
        DICOM series choice). With ``output_dir`` the mask files are written there."""
        source = scan.source if isinstance(scan, Volume) else str(scan)
        if modality != "ct" or self.segmenter is None:
            text = self.generate(scan, modality)
            findings, impression = split_sections(text)
            return ScanReport(source, modality, text, findings, impression)
        volume = scan if isinstance(scan, Volume) else load_volume(scan)
        segmentation = self.segmenter.predict(volume, clicks)
        return replace(self.report_segmentation(volume, segmentation, output_dir, clicks=clicks), source=source)

    def report_segmentation(
        self,
        volume: Volume,
        segmentation: SegmentationResult,
        output_dir: str | os.PathLike | None = None,
        generated: str | None = None,
        clicks: list[Click] | None = None,
    ) -> ScanReport:
        """The grounded report of a segmented CT scan. ``generated``: the model's text when it is
        already written (an unconditioned model's does not depend on the segmentation); else it is
        generated here."""
        assert self.segmenter is not None  # a segmentation came from it
        text = self.generate(volume, "ct", segmentation.measurements) if generated is None else generated
        grounded = caveat_not_a_head_ct(
            ground_report(text, segmentation.measurements, self.correct), volume.geometry.not_a_head_ct
        )
        findings, impression = split_sections(grounded.report)
        if output_dir is not None:  # after the report: a scan whose report fails leaves no mask files behind
            segmentation = self.segmenter.save(segmentation, output_dir, report_sections=(findings, impression))
        return ScanReport(
            volume.source, "ct", grounded.report, findings, impression, segmentation, grounded, tuple(clicks or ())
        )
