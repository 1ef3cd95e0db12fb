#!/usr/bin/env python
"""Check how a DICOM series was read: HU of the loaded volume at the true position of every acquired pixel.

    sam3d-check-dicom --input path/to/series_folder [--series_uid UID] [--allow_gaps]
    sam3d-check-dicom --list path/to/export      # the CT series of a folder, a CD or PACS export


Reads the series as every tool here does (sam3d.data.io.load_volume), then for each acquired slice
looks the volume up (trilinear) at the world position of each of its head pixels (HU above
--head_hu) and compares with the HU the file holds. A misplaced slice shows as a large error where
the anatomy changes; a correct read stays near 0 on the acquired slices. Prints the geometry
record, the error per slice and overall (median, 90th percentile), and writes JSON with --output.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np

from ich_engine.cli import console_main
from ich_engine.config import CommandLineParser, ConfigError
from sam3d.data.dicom import choose_series, find_series, frame_hu, sample_frames
from sam3d.data.errors import VolumeReadError
from sam3d.predict.scans import add_scan_arguments, read_scan


def list_series(folder: Path) -> int:
    """Print the table of ``folder``'s CT series (the default choice marked) and the skipped objects."""
    if not folder.is_dir():
        raise ConfigError(f"--list {folder}: not a folder")
    found, skipped = find_series(folder)
    print(f"{folder}: {len(found)} CT series")
    print(f"  {'':2}{'number':>6}  {'slices':>6}  {'description':<28} uid")
    try:
        chosen, left_out = choose_series(found, str(folder)) if found else (None, [])
        why = {s["uid"]: s["why"] for s in left_out}
    except VolumeReadError as err:  # a tie: listed all the same, the reason under the table
        chosen, why = None, {}
        print(f"  no default: {err}")
    for s in found:
        mark = "*" if s is chosen else " "
        number = "" if s.number is None else str(s.number)
        reason = f"  ({why[s.uid]})" if s.uid in why else ""
        print(f"  {mark} {number:>6}  {len(s.frames):>6}  {s.description[:28]:<28} {s.uid}{reason}")
    if chosen is not None:
        print("  * read by default")
    if skipped:
        print("skipped: " + ", ".join(f"{n} {kind}" for kind, n in sorted(skipped.items())))
    return 0


def main(argv=None) -> int:
    p = CommandLineParser(description=__doc__)
    task = p.add_mutually_exclusive_group(required=True)
    task.add_argument("--input", help="a DICOM series folder or one of its files")
    task.add_argument(
        "--list",
        metavar="FOLDER",
        help="print the CT series found in FOLDER and below it, which one is read by default and why the "
        "others are not, and the objects skipped; reads no pixels",
    )
    p.add_argument("--head_hu", type=float, default=-500.0, help="pixels above this HU are compared")
    p.add_argument("--output", help="write the figures as JSON here")
    add_scan_arguments(p)
    args = p.parse_args(argv)
    if args.list:
        return list_series(Path(args.list))
    volume = read_scan(args.input, args)
    if volume.dicom is None:
        raise ConfigError(f"--input {args.input}: not a DICOM series (it read as {volume.geometry.format})")
    written = np.stack(frame_hu(volume.dicom.frames))
    looked_up = sample_frames(volume.array, volume.affine, volume.dicom)
    head = written > args.head_hu
    error = np.abs(looked_up - written)
    print(f"{args.input}: {volume.geometry.summary()}")
    per_slice = []
    for frame, err, inside in zip(volume.dicom.frames, error, head):
        median = float(np.median(err[inside])) if inside.any() else float("nan")
        per_slice.append({"file": frame.path, "frame": frame.index, "median_hu_error": round(median, 2)})
        name = Path(frame.path).name + ("" if frame.index is None else f" frame {frame.index + 1}")
        print(
            f"  {name}: "
            + (
                f"median |HU error| {median:.1f} over {int(inside.sum())} head pixels"
                if inside.any()
                else "no head pixels"
            )
        )
    overall = {
        "median_hu_error": round(float(np.median(error[head])), 2),
        "p90_hu_error": round(float(np.percentile(error[head], 90)), 2),
        "head_pixels": int(head.sum()),
    }
    print(
        f"overall: median |HU error| {overall['median_hu_error']:.2f}, 90th percentile "
        f"{overall['p90_hu_error']:.2f} over {overall['head_pixels']} head pixels"
    )
    if args.output:
        Path(args.output).write_text(
            json.dumps({"geometry": volume.geometry.to_json(), **overall, "slices": per_slice}, indent=2)
        )
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
