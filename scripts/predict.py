#!/usr/bin/env python
"""Segment hemorrhage in head CTs: mask in the input geometry, measurements JSON, PNG overlays.

    python scripts/predict.py --checkpoint outputs/sam3d/best_model.pth --input scan.nii.gz --output_dir out/
    python scripts/predict.py --checkpoint ... --input scans/            # every volume / DICOM folder inside
    python scripts/predict.py --checkpoint ... --input test.csv          # the `path` column
    python scripts/predict.py --checkpoint ... --input scan.nii.gz --click 120 98 14 --click 130 90 14 neg

Without --click the whole head is covered by sliding windows (automatic mode). Clicks are voxel
indices of the input file, or RAS millimetres with --click_space mm; "neg" marks a background click.

Post-processing, on by default and recorded under "postprocessing" in each measurements JSON:
predictions outside the intracranial space (found in the scan: bone above --bone_hu, the cavity it
encloses on each axial slice, eroded by --intracranial_margin_mm) are cleared, and connected
components smaller than --min_component_ml are dropped. A component holding a positive click is
always kept whole. Use --no-intracranial_mask for skull-stripped scans or after a craniectomy, and
--min_component_ml 0 to keep every component.
"""

from __future__ import annotations

import argparse
import csv
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from engine.distributed import resolve_device  # noqa: E402
from sam3d.predict import (  # noqa: E402
    BONE_THRESHOLD_HU,
    INTRACRANIAL_MARGIN_MM,
    MIN_COMPONENT_ML,
    Click,
    HemorrhageSegmenter,
)

VOLUME_SUFFIXES = (".nii", ".nii.gz", ".nrrd", ".mha", ".mhd", ".pkl", ".pickle", ".npy", ".npz")


def _inputs(spec: str) -> list[str]:
    path = Path(spec)
    if path.suffix == ".csv":
        with open(path, newline="") as handle:
            rows = list(csv.DictReader(handle))
        if not rows or "path" not in rows[0]:
            raise SystemExit(f"{path}: expected a CSV with a 'path' column")
        return [str(p if Path(p).is_absolute() else path.parent / p) for p in (r["path"] for r in rows)]
    if path.is_dir():
        volumes = sorted(str(p) for p in path.iterdir() if p.name.endswith(VOLUME_SUFFIXES))
        dicom_dirs = sorted(str(p) for p in path.iterdir() if p.is_dir())
        found = volumes + dicom_dirs
        if not found:
            raise SystemExit(f"{path}: no volumes ({', '.join(VOLUME_SUFFIXES)}) or DICOM folders inside")
        # A folder of .dcm files is itself one DICOM series.
        return found if volumes or not any(path.glob("*.dcm")) else [str(path)]
    if not path.exists():
        raise SystemExit(f"--input {path}: not found")
    return [str(path)]


def _clicks(raw: list[list[str]] | None, space: str) -> list[Click]:
    clicks = []
    for values in raw or []:
        if len(values) not in (3, 4) or (len(values) == 4 and values[3] not in ("pos", "neg")):
            raise SystemExit(f"--click {' '.join(values)}: expected X Y Z [pos|neg]")
        clicks.append(Click(tuple(float(v) for v in values[:3]), positive=len(values) == 3 or values[3] == "pos", space=space))
    return clicks


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--input", required=True, help="a volume, a DICOM series folder, a folder of volumes, or a CSV")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model_type", default=None, help="architecture of an official checkpoint (default vit_b_ori)")
    p.add_argument("--click", nargs="+", action="append", metavar="X Y Z [pos|neg]")
    p.add_argument("--click_space", choices=["voxel", "mm"], default="voxel")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (automatic mode)")
    p.add_argument("--threshold", type=float, default=0.5)
    p.add_argument("--intracranial_mask", action=argparse.BooleanOptionalAction, default=True,
                   help="clear predictions outside the skull's cavity (default on)")
    p.add_argument("--bone_hu", type=float, default=BONE_THRESHOLD_HU, help="HU from which a voxel is bone")
    p.add_argument("--intracranial_margin_mm", type=float, default=INTRACRANIAL_MARGIN_MM,
                   help="erode the intracranial mask by this many mm off the inner table")
    p.add_argument("--min_component_ml", type=float, default=MIN_COMPONENT_ML,
                   help="drop connected components smaller than this (mL); 0 keeps all")
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    if args.min_component_ml < 0 or args.intracranial_margin_mm < 0:
        p.error("--min_component_ml and --intracranial_margin_mm must be >= 0")

    segmenter = HemorrhageSegmenter(
        args.checkpoint, resolve_device(args.device), args.model_type, args.overlap,
        restrict_intracranial=args.intracranial_mask, min_component_ml=args.min_component_ml,
        bone_hu=args.bone_hu, margin_mm=args.intracranial_margin_mm,
    )
    clicks = _clicks(args.click, args.click_space)
    results = []
    for path in _inputs(args.input):
        result = segmenter.save(segmenter.predict(path, clicks, args.threshold), args.output_dir)
        m = result.measurements
        print(f"{path}: {m.total_volume_ml:.1f} mL in {m.num_components} component(s), side {m.side} "
              f"-> {result.files['mask']}")
        results.append(result.to_json())
    (Path(args.output_dir) / "predictions.json").write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
