"""Loaders for the Indiana University chest X-ray collection (IU X-ray, Open-i).

Two published layouts of the same studies:

- the R2Gen ``annotation.json`` that the report-generation papers evaluate on (train/val/test,
  report = the findings section, two views per study), read by :func:`read_r2gen_annotation`;
- the Open-i / Kaggle CSV pair ``indiana_reports.csv`` + ``indiana_projections.csv``, which also
  holds the impressions and the human-assigned MeSH / Problems labels that a findings labeler is
  checked against, read by :func:`read_indiana`.

Image files are often kept apart from the text (or only partly present), so both loaders check
files only on request; every record says in ``extra['image_exists']`` whether all its images exist.
"""

from __future__ import annotations

import csv
import json
import re
from collections import defaultdict
from pathlib import Path
from typing import NamedTuple

from blip.data.reports import SPLITS, ReportManifestError, ReportRecord, clean_report, join_sections, split_sections

__all__ = ["IndianaReports", "read_indiana", "read_r2gen_annotation"]

INDIANA_REPORT_COLUMNS = ("uid", "MeSH", "Problems", "image", "indication", "comparison", "findings", "impression")
INDIANA_PROJECTION_COLUMNS = ("uid", "filename", "projection")
# "1000_IM-0003-1001.dcm.png" -> study "IM-0003"; R2Gen names that study "CXR1000_IM-0003".
_STUDY_OF_FILENAME = re.compile(r"^(\d+_IM-\d+)-\d+")


def _images(root: Path, names) -> tuple[list[str], bool]:
    paths = [str(root / name) for name in names]
    return paths, all(Path(p).is_file() for p in paths)


def _check_images(records: list[ReportRecord], path: Path) -> None:
    missing = [r for r in records if not r.extra["image_exists"]]
    if missing:
        raise ReportManifestError(
            f"{path}: {len(missing)} of {len(records)} studies have missing images, first: id "
            f"{missing[0].id!r} (source row {missing[0].source_row}) -> {missing[0].images}"
        )


def read_r2gen_annotation(path, image_root, check_files: bool = False) -> dict[str, list[ReportRecord]]:
    """Read R2Gen's IU X-ray ``annotation.json`` into ``{'train', 'val', 'test'}`` record lists.

    The published file names its test split with four spaces (``"    "``); keys are matched after
    stripping whitespace, so that key and a proper ``"test"`` both give ``test``. ``image_path``
    entries are relative to ``image_root``. The report is R2Gen's text (the findings section), so
    ``findings`` is the cleaned report and ``impression`` is "". ``source_row`` is the 1-based
    position within its split's list. ``check_files``: raise when any image is missing.
    """
    path, root = Path(path), Path(image_root)
    with open(path, encoding="utf-8") as handle:
        annotation = json.load(handle)
    if not isinstance(annotation, dict):
        raise ReportManifestError(f"{path}: expected a JSON object with split keys, found {type(annotation).__name__}")
    names = {key: (key.strip() or "test") for key in annotation}
    unknown = [key for key, name in names.items() if name not in SPLITS]
    if unknown:
        raise ReportManifestError(f"{path}: unknown split keys {unknown}, expected {SPLITS} (or '    ' for test)")

    result: dict[str, list[ReportRecord]] = {name: [] for name in SPLITS}
    for key, entries in annotation.items():
        split = names[key]
        for position, entry in enumerate(entries, start=1):
            where = f"{path}, split {key!r}, entry {position}"
            missing = [k for k in ("id", "report", "image_path") if k not in entry]
            if missing:
                raise ReportManifestError(f"{where}: missing keys {missing}, found {sorted(entry)}")
            report = clean_report(entry["report"])
            if not report:
                raise ReportManifestError(f"{where} (id {entry['id']!r}): empty report")
            views = entry["image_path"]
            if isinstance(views, str):
                views = [views]
            images, exists = _images(root, views)
            extra = {k: v for k, v in entry.items() if k not in ("id", "report", "image_path", "split")}
            extra["image_exists"] = exists
            result[split].append(
                ReportRecord(
                    image=images,
                    report=report,
                    findings=report,
                    impression="",
                    modality="xray",
                    split=split,
                    id=str(entry["id"]),
                    source_row=position,
                    extra=extra,
                )
            )
    if check_files:
        _check_images([r for records in result.values() for r in records], path)
    return result


class IndianaReports(NamedTuple):
    """What :func:`read_indiana` kept, and what it left out with the reason (never silently).

    ``skipped`` maps a reason to the uids it applies to.
    """

    records: list[ReportRecord]
    skipped: dict[str, list[str]]

    def summary(self) -> str:
        parts = [f"{len(self.records)} reports kept"]
        parts += [f"{len(uids)} skipped: {reason}" for reason, uids in self.skipped.items() if uids]
        return "; ".join(parts)


def _read_csv(path: Path, required: tuple[str, ...]):
    with open(path, newline="", encoding="utf-8-sig") as handle:
        reader = csv.DictReader(handle)
        missing = [c for c in required if c not in (reader.fieldnames or [])]
        if missing:
            raise ReportManifestError(f"{path}: missing columns {missing}, found {reader.fieldnames}")
        start = reader.line_num + 1
        for row in reader:
            yield start, row
            start = reader.line_num + 1


def read_indiana(
    reports_csv, projections_csv, image_root, views=("Frontal",), check_files: bool = False
) -> IndianaReports:
    """Read the Open-i CSV pair into one record per report, with the images of the chosen ``views``.

    ``views``: projections to attach (``Frontal``, ``Lateral``), in that order; ``image`` is one path
    or a list when a study has several. Reports with neither findings nor impression, and reports
    without an image of the chosen views, are skipped and listed in ``skipped``.
    ``report`` is the canonical ``join_sections(findings, impression)``; a findings cell that itself
    holds an ``IMPRESSION:`` header is split. ``id`` is the uid; ``extra`` keeps ``uid``, ``MeSH``,
    ``Problems`` (labels as ``;``-separated strings), ``indication``, ``comparison``, ``projections``,
    ``r2gen_ids`` (the R2Gen study ids of the images, for joining with :func:`read_r2gen_annotation`)
    and ``image_exists``. Split is ``train``: the CSVs define none. ``check_files``: raise when a kept
    record's image is missing.
    """
    reports_csv, projections_csv, root = Path(reports_csv), Path(projections_csv), Path(image_root)
    wanted = {view.lower(): rank for rank, view in enumerate(views)}
    by_uid = defaultdict(list)  # uid -> [(view rank, line, filename, projection)]
    for line, row in _read_csv(projections_csv, INDIANA_PROJECTION_COLUMNS):
        rank = wanted.get(row["projection"].strip().lower())
        if rank is not None:
            by_uid[row["uid"].strip()].append((rank, line, row["filename"].strip(), row["projection"].strip()))

    records: list[ReportRecord] = []
    skipped: dict[str, list[str]] = {"no findings and no impression": [], f"no {'/'.join(views)} image": []}
    for line, row in _read_csv(reports_csv, INDIANA_REPORT_COLUMNS):
        uid = row["uid"].strip()
        findings, impression = split_sections(row["findings"])
        impression = clean_report(f"{impression} {row['impression'] or ''}")
        if not (findings or impression):
            skipped["no findings and no impression"].append(uid)
            continue
        projections = sorted(by_uid.get(uid, []))
        if not projections:
            skipped[f"no {'/'.join(views)} image"].append(uid)
            continue
        filenames = [name for _, _, name, _ in projections]
        images, exists = _images(root, filenames)
        study_ids = sorted({f"CXR{m.group(1)}" for m in map(_STUDY_OF_FILENAME.match, filenames) if m})
        extra = {
            "uid": uid,
            "MeSH": row["MeSH"].strip(),
            "Problems": row["Problems"].strip(),
            "indication": clean_report(row["indication"]),
            "comparison": clean_report(row["comparison"]),
            "projections": [projection for _, _, _, projection in projections],
            "r2gen_ids": study_ids,
            "image_exists": exists,
        }
        records.append(
            ReportRecord(
                image=images[0] if len(images) == 1 else images,
                report=join_sections(findings, impression),
                findings=findings,
                impression=impression,
                modality="xray",
                split="train",
                id=uid,
                source_row=line,
                extra=extra,
            )
        )
    if check_files:
        _check_images(records, reports_csv)
    return IndianaReports(records, skipped)
