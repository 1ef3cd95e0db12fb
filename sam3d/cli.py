"""What the scan-reading command lines share (predict, report): input flags, clicks, warnings."""

from __future__ import annotations

import argparse
import contextlib
import sys
import warnings
from collections.abc import Iterator

from .data.io import Volume, load_volume
from .predict import Click

__all__ = ["add_scan_arguments", "parse_clicks", "plain_warnings", "read_scan"]


def add_scan_arguments(parser: argparse.ArgumentParser) -> None:
    """--series_uid and --allow_gaps: how a DICOM folder becomes one volume (see sam3d.data.dicom)."""
    parser.add_argument("--series_uid", default=None,
                        help="DICOM folders holding several series: the SeriesInstanceUID, or part of the "
                             "SeriesDescription, of the one to read (default: the axial, non-localizer series "
                             "with the most slices)")
    parser.add_argument("--allow_gaps", action="store_true",
                        help="DICOM: accept missing slices (interpolated) and duplicate positions (first kept) "
                             "instead of stopping; both are recorded in the geometry")


def read_scan(path: str, args: argparse.Namespace) -> Volume:
    return load_volume(path, series=args.series_uid, allow_gaps=args.allow_gaps)


def parse_clicks(raw: list[list[str]] | None, space: str) -> list[Click]:
    """``--click X Y Z [pos|neg]`` values → clicks; a malformed one exits with the flag's usage."""
    clicks = []
    for values in raw or []:
        if len(values) not in (3, 4) or (len(values) == 4 and values[3] not in ("pos", "neg")):
            raise SystemExit(f"--click {' '.join(values)}: expected X Y Z [pos|neg]")
        try:
            position = tuple(float(v) for v in values[:3])
        except ValueError:
            raise SystemExit(f"--click {' '.join(values)}: X Y Z must be numbers") from None
        clicks.append(Click(position, positive=len(values) == 3 or values[3] == "pos", space=space))
    return clicks


@contextlib.contextmanager
def plain_warnings() -> Iterator[None]:
    """Within it, each warning is one line, ``warning: <message>``, on stderr: these are for the user
    (gantry tilt, uneven steps, series left out), not for a developer's file and line."""
    def show(message, category, filename, lineno, file=None, line=None):
        print(f"warning: {message}", file=file or sys.stderr)

    with warnings.catch_warnings():
        warnings.showwarning = show
        yield
