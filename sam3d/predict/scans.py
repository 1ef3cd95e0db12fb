"""What the scan-reading command lines share (predict, report): input flags, clicks, batches."""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import warnings
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ich_engine.checkpoint import atomic_write
from ich_engine.config import ConfigError
from ich_engine.errors import UserError
from sam3d.data.dicomweb import PASSWORD_ENV, TOKEN_ENV, USER_ENV, DICOMwebArchive
from sam3d.data.io import Volume, load_volume, scan_inputs, strip_volume_extension
from sam3d.predict.postprocessing import MIN_COMPONENT_HU, MIN_VOXEL_HU
from sam3d.predict.records import Click

__all__ = [
    "ScanSource",
    "add_archive_arguments",
    "add_hyperdense_argument",
    "add_scan_arguments",
    "open_scans",
    "output_stems",
    "parse_clicks",
    "read_scan",
    "run_batch",
]


def add_hyperdense_argument(parser: argparse.ArgumentParser) -> None:
    """--hyperdense_only / --no-hyperdense_only (sam3d.predict.hyperdense_gate)."""
    parser.add_argument(
        "--hyperdense_only",
        action=argparse.BooleanOptionalAction,
        default=True,
        help=f"keep acute (hyperdense) blood only: components a quarter of which reaches {MIN_COMPONENT_HU:g} HU, "
        f"trimmed to their half-maximum edge (>= {MIN_VOXEL_HU:g} HU); --no-hyperdense_only for subacute or "
        "chronic hemorrhage",
    )


def add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    """--series_uid and --allow_gaps: how a DICOM folder becomes one volume (see sam3d.data.dicom)."""
    parser.add_argument(
        "--series_uid",
        "--series",
        default=None,
        help="DICOM folders and studies holding several series: the SeriesInstanceUID, or part of the "
        "SeriesDescription, of the one to read (default: the axial, non-localizer series "
        "with the most slices); with --dicomweb only that series is retrieved",
    )
    parser.add_argument(
        "--fail_fast",
        action="store_true",
        help="stop at the first scan that fails (default: record it, go on, exit 1 at the end)",
    )
    parser.add_argument(
        "--allow_gaps",
        action="store_true",
        help="DICOM: accept missing slices (interpolated) and duplicate positions (first kept) "
        "instead of stopping; both are recorded in the geometry",
    )


def read_scan(path: str, args: argparse.Namespace) -> Volume:
    return load_volume(path, series=args.series_uid, allow_gaps=args.allow_gaps)


def add_archive_arguments(parser: argparse.ArgumentParser) -> None:
    """--input's alternative, a study in a DICOMweb archive, and --store (see sam3d.data.dicomweb)."""
    g = parser.add_argument_group("DICOMweb archive (instead of --input)")
    g.add_argument(
        "--dicomweb",
        metavar="URL",
        help="the archive's DICOMweb root (e.g. http://pacs:8042/dicom-web): the study's CT series are "
        f"retrieved (QIDO-RS, WADO-RS) and read as a DICOM folder; credentials from {TOKEN_ENV} (bearer) "
        f"or {USER_ENV} and {PASSWORD_ENV} (basic), a private CA from REQUESTS_CA_BUNDLE",
    )
    g.add_argument("--study", metavar="UID", help="the StudyInstanceUID to read from --dicomweb")
    g.add_argument(
        "--store",
        action="store_true",
        help="store the SEG and the SR back into the study, in one STOW-RS request (nothing is stored without it)",
    )
    g.add_argument("--dicomweb_timeout", type=float, default=30.0, help="seconds to wait for each answer")
    g.add_argument(
        "--dicomweb_retries",
        type=int,
        default=3,
        help="tries after the first when the archive cannot be reached or is busy (429, 502, 503, 504)",
    )


def check_source_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Exactly one of --input and --dicomweb (with --study); --store only with --dicomweb."""
    if args.input is not None and args.dicomweb is not None:
        parser.error(f"--input {args.input} and --dicomweb {args.dicomweb}: give one source of scans, not both")
    if args.input is None and args.dicomweb is None:
        parser.error("no scans: give --input (a file, folder or CSV) or --dicomweb URL --study UID")
    if args.dicomweb and not args.study:
        parser.error(f"--dicomweb {args.dicomweb}: --study UID (the StudyInstanceUID to read) is missing")
    if args.study and not args.dicomweb:
        parser.error(f"--study {args.study}: needs --dicomweb URL (the archive holding it)")
    if args.store and not args.dicomweb:
        parser.error(
            "--store stores results into the --dicomweb archive they were read from; give --dicomweb and --study"
        )
    if args.dicomweb_timeout <= 0 or args.dicomweb_retries < 0:
        parser.error("--dicomweb_timeout must be > 0 and --dicomweb_retries >= 0")


@dataclass
class ScanSource:
    """The scans a command reads: ``--input``'s, or the study ``--dicomweb`` retrieved into a folder."""

    inputs: list[str]
    archive: DICOMwebArchive | None = None
    study_uid: str | None = None
    names: dict[str, str] = field(default_factory=dict)

    def name(self, path: str) -> str:
        """How an input is shown and recorded: a retrieved study by its DICOMweb address, not the
        temporary folder it was read from."""
        return self.names.get(path, path)

    def read(self, path: str, args: argparse.Namespace) -> Volume:
        volume = read_scan(path, args)
        volume.source = self.name(path)
        return volume

    def store(self, files: Mapping[str, Any]) -> str:
        """``--store``: one scan's SEG and SR into the study they were measured on; returns a line saying so."""
        if self.archive is None or self.study_uid is None:
            raise ValueError("only a study read from --dicomweb is stored back")
        if "dicom_seg" not in files:
            return f"nothing stored in {self.name(self.inputs[0])}: {files['not_written']['dicom_seg']}"
        paths = [Path(files[kind]) for kind in ("dicom_seg", "dicom_sr") if kind in files]
        self.archive.store(self.study_uid, paths)
        return f"stored {', '.join(p.name for p in paths)} in {self.name(self.inputs[0])}"


@contextlib.contextmanager
def open_scans(args: argparse.Namespace) -> Iterator[ScanSource]:
    """``--input``'s scans, or the ``--dicomweb`` study's CT series retrieved into a temporary folder
    named by the study UID (so outputs are named by it), deleted when the command ends."""
    if args.dicomweb is None:
        yield ScanSource(scan_inputs(args.input))
        return
    archive = DICOMwebArchive(args.dicomweb, args.dicomweb_timeout, args.dicomweb_retries)
    with tempfile.TemporaryDirectory(prefix="sam3d-dicomweb-") as tmp:
        folder = str(archive.retrieve_ct(args.study, args.series_uid, Path(tmp) / args.study))
        yield ScanSource([folder], archive, args.study, {folder: f"{archive.url}/studies/{args.study}"})


def parse_clicks(raw: list[list[str]] | None, space: str) -> list[Click]:
    """``--click X Y Z [pos|neg]`` values → clicks; a malformed one is a ConfigError naming it."""
    clicks = []
    for values in raw or []:
        if len(values) not in (3, 4) or (len(values) == 4 and values[3] not in ("pos", "neg")):
            raise ConfigError(f"--click {' '.join(values)}: expected X Y Z [pos|neg]")
        try:
            position = (float(values[0]), float(values[1]), float(values[2]))
        except ValueError:
            raise ConfigError(f"--click {' '.join(values)}: X Y Z must be numbers") from None
        clicks.append(Click(position, positive=len(values) == 3 or values[3] == "pos", space=space))
    return clicks


def output_stems(inputs: Sequence[str]) -> dict[str, str]:
    """Each input's output name stem; two inputs with one stem (``scan.nii.gz`` and ``scan.nrrd``)
    would overwrite each other's outputs, so that is refused before any work."""
    stems: dict[str, str] = {}
    for path in inputs:
        stems[path] = strip_volume_extension(Path(path).name)
    seen: dict[str, str] = {}
    for path, stem in stems.items():
        if stem in seen:
            raise ConfigError(
                f"--input: {seen[stem]} and {path} would both write outputs named '{stem}_*'; "
                "rename one or run them into separate --output_dir"
            )
        seen[stem] = path
    return stems


def run_batch(
    inputs: Sequence[str],
    process: Callable[[str], dict[str, Any]],
    fail_fast: bool,
    record_path: Path,
    name: Callable[[str], str] = str,
) -> int:
    """``process`` each input and write the records to ``record_path`` (JSON list, atomically, after
    each scan, so a batch that stops keeps the records of the scans done); a scan that fails is recorded
    as ``{"source", "error"}`` and the batch goes on (``fail_fast``: the error ends the batch instead);
    ``name`` says how an input is shown and recorded. Records an earlier run left there for other
    sources are kept (the command holds the folder's lock, so no run writes beside it). Returns the
    exit code: 1 if any scan failed."""
    earlier = _earlier_records(record_path)
    records: list[dict[str, Any]] = []

    def write() -> None:
        done = {r["source"] for r in records}
        text = json.dumps([r for r in earlier if r.get("source") not in done] + records, indent=2)
        atomic_write(record_path, lambda tmp: tmp.write_text(text))

    for path in inputs:
        try:
            records.append(process(path))
        except Exception as err:
            if fail_fast:
                raise
            reason = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            source = name(path)
            print(f"error: {source}: {reason}" if source not in reason else f"error: {reason}", file=sys.stderr)
            records.append({"source": source, "error": reason})
        write()
    failed = sum("error" in r for r in records)
    if failed:
        print(f"{failed} of {len(records)} scan(s) failed; see {record_path}", file=sys.stderr)
    return 1 if failed else 0


def _earlier_records(record_path: Path) -> list[dict[str, Any]]:
    """The records an earlier run wrote to ``record_path``; one that cannot be read is kept aside as
    ``<name>.unreadable`` (with a warning) rather than overwritten."""
    if not record_path.is_file():
        return []
    try:
        records = json.loads(record_path.read_text())
        if isinstance(records, list) and all(isinstance(r, dict) for r in records):
            return records
    except (OSError, UnicodeDecodeError, json.JSONDecodeError):
        pass
    aside = record_path.with_name(record_path.name + ".unreadable")
    os.replace(record_path, aside)
    warnings.warn(f"{record_path}: not a list of records; kept aside as {aside}", stacklevel=2)
    return []
