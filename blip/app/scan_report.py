"""One scan's result on the scan → report path, typed end to end, and its one writer.

``ScanReporter.run`` returns a :class:`ScanReport`; ``sam3d-report``, the web app and the demo read
its fields (the mask and measurements in memory, the grounding with its flags) and write it with
:meth:`ScanReport.write`, so the report files have one layout and are always written atomically.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ich_engine.checkpoint import atomic_write
from sam3d.predict.records import Click, Measurements, SegmentationResult

if TYPE_CHECKING:  # grounded imports this module for its return type
    from .grounded import GroundedReport

__all__ = ["ScanReport"]


@dataclass(frozen=True)
class ScanReport:
    """``report`` is what a reader gets: for CT the grounded text (generated findings, the structured
    line, the impression corrected where it contradicted the measurements), for an X-ray the
    generated text. CT reports carry the segmentation (mask, measurements, mask files) and the
    grounding (generated text, flags); ``files`` names the report files once written."""

    source: str
    modality: str
    report: str
    findings: str
    impression: str
    segmentation: SegmentationResult | None = None
    grounding: GroundedReport | None = None
    clicks: tuple[Click, ...] = ()
    files: dict[str, str] = field(default_factory=dict)

    @property
    def measurements(self) -> Measurements | None:
        return self.segmentation.measurements if self.segmentation is not None else None

    @property
    def generated(self) -> str:
        """The language model's own text, before grounding."""
        return self.grounding.generated if self.grounding is not None else self.report

    def to_json(self) -> dict[str, Any]:
        record: dict[str, Any] = {"source": self.source, "modality": self.modality}
        if self.clicks:
            record["clicks"] = [[*click.position, click.positive] for click in self.clicks]
        record.update(report=self.report, findings=self.findings, impression=self.impression)
        if self.grounding is not None:
            record.update(asdict(self.grounding))
        if self.segmentation is not None:
            record["segmentation"] = self.segmentation.to_json()
        return record

    def write(self, output_dir: str | os.PathLike, stem: str) -> ScanReport:
        """``<stem>_report.json`` (:meth:`to_json`) and ``<stem>_report.txt`` (the report) in
        ``output_dir``, each written to a temporary file and renamed; returns the report with ``files``."""
        json_path, text_path = Path(output_dir) / f"{stem}_report.json", Path(output_dir) / f"{stem}_report.txt"
        record = json.dumps(self.to_json(), indent=2, default=str)
        atomic_write(json_path, lambda tmp: tmp.write_text(record))
        atomic_write(text_path, lambda tmp: tmp.write_text(self.report + "\n"))
        return dataclasses.replace(self, files={"report_json": str(json_path), "report_txt": str(text_path)})
