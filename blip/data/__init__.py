"""Report data: manifests pairing images with reports, report text conventions, IU X-ray loaders."""

from blip.data.iu_xray import IndianaReports, read_indiana, read_r2gen_annotation
from blip.data.reports import (
    DEID_TOKEN,
    ReportManifestError,
    ReportRecord,
    clean_report,
    join_sections,
    normalize_for_metrics,
    read_report_manifest,
    split_sections,
    write_report_manifest,
)

__all__ = [
    "DEID_TOKEN",
    "IndianaReports",
    "ReportManifestError",
    "ReportRecord",
    "clean_report",
    "join_sections",
    "normalize_for_metrics",
    "read_indiana",
    "read_r2gen_annotation",
    "read_report_manifest",
    "split_sections",
    "write_report_manifest",
]
