"""What the scan-reading command lines share (predict, report): input flags, clicks, batches."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from sam3d.engine.checkpoint import atomic_write
from sam3d.engine.config import ConfigError
from sam3d.engine.errors import UserError

from ..data.io import Volume, load_volume, strip_volume_extension
from ..predict.postprocessing import MIN_COMPONENT_HU, MIN_VOXEL_HU
from ..predict.records import Click

__all__ = ["add_hyperdense_argument", "add_scan_arguments", "output_stems", "parse_clicks", "read_scan", "run_batch"]


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
        default=None,
        help="DICOM folders holding several series: the SeriesInstanceUID, or part of the "
        "SeriesDescription, of the one to read (default: the axial, non-localizer series "
        "with the most slices)",
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
    inputs: Sequence[str], process: Callable[[str], dict[str, Any]], fail_fast: bool, record_path: Path
) -> int:
    """``process`` each input and write the records to ``record_path`` (JSON list, atomically); a scan
    that fails is recorded as ``{"source", "error"}`` and the batch goes on (``fail_fast``: the error
    ends the batch instead). Returns the exit code: 1 if any scan failed."""
    records = []
    for path in inputs:
        try:
            records.append(process(path))
        except Exception as err:
            if fail_fast:
                raise
            reason = str(err) if isinstance(err, UserError) else f"{type(err).__name__}: {err}"
            print(f"error: {path}: {reason}" if path not in reason else f"error: {reason}", file=sys.stderr)
            records.append({"source": path, "error": reason})
    text = json.dumps(records, indent=2)
    atomic_write(record_path, lambda tmp: tmp.write_text(text))
    failed = sum("error" in r for r in records)
    if failed:
        print(f"{failed} of {len(records)} scan(s) failed; see {record_path}", file=sys.stderr)
    return 1 if failed else 0
