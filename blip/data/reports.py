"""Report manifests: which image goes with which report, and the report text conventions.

A manifest is a CSV or JSONL file with one study per row:

- ``image`` (required): a volume file, a DICOM folder or a 2D image, absolute or relative to the
  manifest's folder. Several images (e.g. frontal and lateral views) are a JSON list, or in a CSV
  cell paths separated by ``;``.
- ``report``, or ``findings`` and/or ``impression``: the text. When ``report`` is missing or empty
  it is built from the sections with :func:`join_sections`; when the section columns are missing
  or empty they are cut out of ``report`` with :func:`split_sections`.
- optional ``modality`` (``ct`` / ``xray``; inferred from the image suffix when absent), ``split``
  (``train`` / ``val`` / ``test``; ``train`` when absent) and ``id`` (the image name when absent).
  Every other column is kept in :attr:`ReportRecord.extra`.

The canonical training target is ``"FINDINGS: <findings> IMPRESSION: <impression>"``: one fixed
format lets a model learn where the impression starts, lets :func:`split_sections` recover both
parts from generated text, and keeps metrics comparable between data sets whose reports arrive with
or without headers.

Every problem is reported with the file, the row and what was expected, because a bad row among a
few thousand otherwise shows up as a crash deep inside a DataLoader worker.
"""

from __future__ import annotations

import csv
import json
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from ich_engine.checkpoint import atomic_write
from ich_engine.errors import UserError
from sam3d.data.io import strip_volume_extension

__all__ = [
    "DEID_TOKEN",
    "IMAGE_2D_SUFFIXES",
    "MODALITIES",
    "SPLITS",
    "ReportManifestError",
    "ReportRecord",
    "clean_report",
    "infer_modality",
    "join_sections",
    "manifest_volume_ml",
    "normalize_for_metrics",
    "read_report_manifest",
    "split_sections",
    "write_report_manifest",
]

MODALITIES = ("ct", "xray")
SPLITS = ("train", "val", "test")
IMAGE_2D_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")
# Redacted words become one visible placeholder rather than disappearing: deleting them leaves
# broken sentences ("There are no of a pleural effusion"), and collapsing a run ("XXXX XXXX XXXX")
# to one token stops a model from learning to count redactions. Metrics drop it on both sides.
DEID_TOKEN = "[REDACTED]"
_RECORD_FIELDS = ("image", "report", "findings", "impression", "modality", "split", "id")


class ReportManifestError(UserError, ValueError):
    """A report manifest (or one of its rows) is unusable; the message names the file and the row."""


@dataclass
class ReportRecord:
    """One study: its image(s) and its report.

    Attributes:
        image: absolute path of the volume file, DICOM folder or 2D image; a list for several views.
        report: the full cleaned report text.
        findings, impression: the cleaned sections; either may be "".
        modality: "ct" or "xray".
        split: "train", "val" or "test".
        id: study identifier, unique within a manifest.
        source_row: where the study came from: the 1-based line in the file (a CSV header is line 1;
            a quoted multi-line CSV record counts from its first line).
        extra: every other column of the row, plus loader-specific facts (e.g. ``image_exists``).
    """

    image: str | list[str]
    report: str
    findings: str
    impression: str
    modality: str
    split: str
    id: str
    source_row: int
    extra: dict = field(default_factory=dict)

    @property
    def images(self) -> list[str]:
        """``image`` as a list, so callers need not branch on one view versus several."""
        return [self.image] if isinstance(self.image, str) else list(self.image)


# ------------------------------------------------------------------------------------ report text

_DEID_RUN = re.compile(r"X{4}(?:\s+X{4})*")
# "1." / "2)" list markers at the start of the text or of a sentence; "1.5 cm" and "T12." are kept
# because a marker must be followed by whitespace and preceded by the start or sentence punctuation.
_LIST_MARKER = re.compile(r"(?:^|(?<=[.;:!?]))\s*\d{1,2}[.)](?=\s)")
_REPEATED_PUNCT = re.compile(r"([.,;:!?])(?:\s*\1)+")
_SPACE_BEFORE_PUNCT = re.compile(r"\s+([.,;:!?])")
_MISSING_SPACE = re.compile(r"(?<=[a-z])\.(?=[A-Z][a-z])")  # "apex.There" -> "apex. There"
_SECTION_HEADER = re.compile(
    r"(?:^|(?<=[.!?\n]))[ \t]*(findings|impressions?|conclusions?)[ \t]*(?::|-+|–|—|$)", re.IGNORECASE | re.MULTILINE
)


def clean_report(text) -> str:
    """Deterministic clean-up of a report, keeping its case and its words.

    Collapses whitespace; replaces each run of de-identification words ``XXXX`` by ``DEID_TOKEN``;
    removes numbered-list markers (``1.``, ``2)``) that radiologists put in impressions; collapses
    repeated punctuation (``..``, ``, ,``) and spaces before punctuation; inserts the space missing
    after a sentence-ending period. ``None`` and NaN (a pandas empty cell) give "".
    Case is kept because it carries meaning for readers (``IMPRESSION``, ``T12``); metrics use
    :func:`normalize_for_metrics`.
    """
    if text is None or (isinstance(text, float) and math.isnan(text)):
        return ""
    text = " ".join(str(text).split())
    text = _DEID_RUN.sub(DEID_TOKEN, text)
    text = _LIST_MARKER.sub(" ", text)
    text = _SPACE_BEFORE_PUNCT.sub(r"\1", text)
    text = _REPEATED_PUNCT.sub(r"\1", text)
    text = _MISSING_SPACE.sub(". ", text)
    return " ".join(text.split())


def normalize_for_metrics(text) -> str:
    """Cleaned, lower-cased text without the de-identification placeholder, for BLEU/ROUGE/labelers.

    Scoring on case or on redactions would reward guessing what the data set hid, not reporting.
    """
    return clean_report(clean_report(text).replace(DEID_TOKEN, " ")).lower()


def split_sections(text) -> tuple[str, str]:
    """(findings, impression) of a report with headers such as ``FINDINGS:``, ``Findings -``,
    ``IMPRESSION:``, ``Conclusion`` (case-insensitive; a bare header must end its line).

    ``CONCLUSION`` counts as impression; repeated sections are joined. Text before the first header
    counts as findings only when there is no findings header (a report that starts with its findings
    unlabelled); otherwise it is another section (indication, comparison) and is not returned.
    Text without any header is all findings: ``(text, "")``. Both parts are cleaned.
    """
    text = "" if text is None else str(text)
    headers = list(_SECTION_HEADER.finditer(text))
    if not headers:
        return clean_report(text), ""
    sections: dict[str, list[str]] = {"findings": [], "impression": []}
    preamble = text[: headers[0].start()]
    for header, following in zip(headers, headers[1:] + [None]):
        name = "findings" if header.group(1).lower() == "findings" else "impression"
        end = following.start() if following is not None else len(text)
        sections[name].append(text[header.end() : end])
    if not sections["findings"]:
        sections["findings"].append(preamble)
    return clean_report(" ".join(sections["findings"])), clean_report(" ".join(sections["impression"]))


def join_sections(findings, impression) -> str:
    """The canonical report ``"FINDINGS: ... IMPRESSION: ..."``; an empty section is left out."""
    parts = [
        f"{header} {body}"
        for header, body in (("FINDINGS:", clean_report(findings)), ("IMPRESSION:", clean_report(impression)))
        if body
    ]
    return " ".join(parts)


# ------------------------------------------------------------------------------------ manifests


def infer_modality(image: str) -> str:
    """``xray`` for a 2D image file (``IMAGE_2D_SUFFIXES``), else ``ct`` (volumes, DICOM folders)."""
    return "xray" if Path(image).suffix.lower() in IMAGE_2D_SUFFIXES else "ct"


def _default_id(image: str) -> str:
    name = Path(image).name
    stripped = strip_volume_extension(name)
    return stripped if stripped != name else Path(name).stem


def _text(value) -> str:
    return "" if value is None else str(value).strip()


def _image_list(value, where: str) -> list[str]:
    if isinstance(value, (list, tuple)):
        images = [_text(v) for v in value]
    elif isinstance(value, str):
        images = [p.strip() for p in value.split(";")]
    else:
        raise ReportManifestError(f"{where}: 'image' must be a path or a list of paths, found {value!r}")
    if not images or not all(images):
        raise ReportManifestError(f"{where}: empty 'image' ({value!r})")
    return images


def manifest_volume_ml(value: Any, where: str) -> float | None:
    """A row's ``volume_ml`` cell as mL (None when the cell is empty or missing: an X-ray, a CT without
    measurements); anything but a number >= 0 is a ReportManifestError naming ``where``, the row."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        volume_ml = math.nan if isinstance(value, bool) else float(value)
    except (TypeError, ValueError):
        volume_ml = math.nan
    if not math.isfinite(volume_ml) or volume_ml < 0:
        raise ReportManifestError(
            f"{where}: volume_ml {value!r} is not a volume in mL (expected a number >= 0, 0 for no hemorrhage)"
        )
    return volume_ml


def _record_from_row(row: dict, line: int, where: str, folder: Path, check_files: bool) -> ReportRecord:
    """Validate one manifest row (a dict of column -> value) and build its record."""
    has_text_column = any(k in row for k in ("report", "findings", "impression"))
    if "image" not in row or not has_text_column:
        raise ReportManifestError(
            f"{where}: expected columns 'image' and 'report' (or 'findings'/'impression'), found {sorted(row)}"
        )
    images = [str(folder / os.path.expanduser(p)) for p in _image_list(row["image"], where)]
    if check_files:
        missing = [p for p in images if not os.path.exists(p)]
        if missing:
            raise ReportManifestError(f"{where}: image not found: {', '.join(missing)}")

    report = clean_report(row.get("report"))
    findings, impression = clean_report(row.get("findings")), clean_report(row.get("impression"))
    if report and not (findings or impression):
        findings, impression = split_sections(row["report"])  # raw text: bare headers end a line
    if not report:
        report = join_sections(findings, impression)
    if not report:
        raise ReportManifestError(f"{where}: empty report, and findings and impression are empty too")

    modality = _text(row.get("modality")).lower() or infer_modality(images[0])
    if modality not in MODALITIES:
        raise ReportManifestError(f"{where}: unknown modality {row.get('modality')!r}, expected one of {MODALITIES}")
    split = _text(row.get("split")).lower() or "train"
    if split not in SPLITS:
        raise ReportManifestError(f"{where}: unknown split {row.get('split')!r}, expected one of {SPLITS}")
    extra = {k: v for k, v in row.items() if k not in _RECORD_FIELDS}
    manifest_volume_ml(row.get("volume_ml"), where)  # read at its first use; a bad cell stops the read here
    return ReportRecord(
        image=images[0] if len(images) == 1 else images,
        report=report,
        findings=findings,
        impression=impression,
        modality=modality,
        split=split,
        id=_text(row.get("id")) or _default_id(images[0]),
        source_row=line,
        extra=extra,
    )


def csv_rows(path: Path):
    """(line, row) for each CSV record; ``line`` is where the record starts (header = line 1)."""
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        if reader.fieldnames is None:
            return
        start = reader.line_num + 1
        for row in reader:
            if None in row:  # more cells than header columns
                raise ReportManifestError(
                    f"{path}, line {start}: {len(row) - 1 + len(row[None])} cells for "
                    f"{len(reader.fieldnames)} header columns {reader.fieldnames}"
                )
            if any(_text(v) for v in row.values()):
                yield start, row
            start = reader.line_num + 1


def table_rows(path: Path):
    """(line, row) of a CSV or JSONL file, by suffix; any other suffix is a ReportManifestError."""
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return csv_rows(path)
    if suffix in (".jsonl", ".ndjson"):
        return jsonl_rows(path)
    raise ReportManifestError(f"{path}: unknown manifest format {suffix!r}, expected .csv, .jsonl or .ndjson")


def jsonl_rows(path: Path):
    with open(path, encoding="utf-8") as handle:
        for line, text in enumerate(handle, start=1):
            if not text.strip():
                continue
            try:
                row = json.loads(text)
            except json.JSONDecodeError as err:
                raise ReportManifestError(f"{path}, line {line}: not valid JSON ({err.msg})") from None
            if not isinstance(row, dict):
                raise ReportManifestError(f"{path}, line {line}: expected a JSON object, found {type(row).__name__}")
            yield line, row


def read_report_manifest(path, split: str | None = None, check_files: bool = True) -> list[ReportRecord]:
    """Read a CSV (``.csv``) or JSONL (``.jsonl`` / ``.ndjson``) report manifest.

    ``split``: keep only that split (``train`` / ``val`` / ``test``); a manifest without any row of it
    is an error, because an empty validation set would otherwise pass unnoticed until the metrics.
    ``check_files``: require every image path to exist.

    Raises ReportManifestError (a ValueError) for an empty manifest, missing columns, an empty report,
    a missing image, an unknown modality or split, or a duplicate id; FileNotFoundError for a missing
    manifest.
    """
    path = Path(path).expanduser().resolve()
    if split is not None and split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS} or None, got {split!r}")
    if not path.is_file():
        raise FileNotFoundError(f"report manifest not found: {path}")
    rows = table_rows(path)
    records: list[ReportRecord] = []
    first_row_of_id: dict[str, int] = {}
    for line, row in rows:
        where = f"{path}, line {line}"
        record = _record_from_row(row, line, where, path.parent, check_files)
        if record.id in first_row_of_id:
            raise ReportManifestError(
                f"{where}: duplicate id {record.id!r} (first on line {first_row_of_id[record.id]})"
            )
        first_row_of_id[record.id] = line
        records.append(record)
    if not records:
        raise ReportManifestError(f"{path}: empty manifest (no data rows)")
    if split is None:
        return records
    selected = [r for r in records if r.split == split]
    if not selected:
        found = sorted({r.split for r in records})
        raise ReportManifestError(f"{path}: no rows of split {split!r}; splits found: {found}")
    return selected


def write_report_manifest(records, path) -> None:
    """Write records as a JSONL manifest that :func:`read_report_manifest` reads back unchanged.

    Image paths under the manifest's folder are stored relative to it, so a data folder can be moved
    or shared as a whole; others stay absolute. ``extra`` keys become top-level columns again and
    ``source_row`` is not stored (it describes the file a record was read from). Written to a temp
    file in the same folder and renamed into place, so an interrupted run never leaves half a manifest.
    """
    path = Path(path).expanduser().resolve()
    path.parent.mkdir(parents=True, exist_ok=True)

    def relative(image: str) -> str:
        image_path = Path(image)
        return image_path.relative_to(path.parent).as_posix() if image_path.is_relative_to(path.parent) else image

    lines = []
    for record in records:
        row = {k: v for k, v in asdict(record).items() if k not in ("source_row", "extra")}
        clash = sorted(set(record.extra) & set(row))
        if clash:
            raise ValueError(f"record {record.id!r}: extra keys {clash} clash with manifest columns")
        row["image"] = [relative(p) for p in record.image] if isinstance(record.image, list) else relative(record.image)
        row.update(record.extra)
        lines.append(json.dumps(row, ensure_ascii=False))
    atomic_write(path, lambda tmp: tmp.write_text("".join(line + "\n" for line in lines), encoding="utf-8"))
