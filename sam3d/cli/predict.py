#!/usr/bin/env python
"""Segment hemorrhage in head CTs: mask in the input geometry, measurements JSON, PNG overlays.

    sam3d-predict --checkpoint outputs/sam3d/best_model.pth --input scan.nii.gz --output_dir out/
    sam3d-predict --checkpoint ... --input scans/            # every volume / DICOM folder inside
    sam3d-predict --checkpoint ... --input test.csv          # the `path` column
    sam3d-predict --checkpoint ... --input scan.nii.gz --click 120 98 14 --click 130 90 14 neg

Without --click the whole head is covered by sliding windows (automatic mode). Clicks are voxel
indices of the input file, or RAS millimetres with --click_space mm; "neg" marks a background click.

DICOM series are stacked from every slice's own position: gantry tilt and uneven slice steps keep
their true geometry (recorded under "geometry" in each measurements JSON), and the mask is also
written as DICOM SEG on the original slices (<stem>_seg.dcm), the measurements as DICOM SR
(<stem>_sr.dcm). See --series_uid and --allow_gaps.

    sam3d-predict --checkpoint ... --dicomweb http://pacs:8042/dicom-web --study UID --store

reads the study from a DICOMweb archive instead of --input and, with --store, stores the SEG and SR
back into it (credentials from SAM3D_DICOMWEB_USER / SAM3D_DICOMWEB_PASSWORD or SAM3D_DICOMWEB_TOKEN).

Post-processing, on by default and recorded under "postprocessing" in each measurements JSON:
predictions outside the intracranial space (found in the scan: bone above --bone_hu, the cavity it
encloses on each axial slice, eroded by --intracranial_margin_mm) are cleared, components that are
not hyperdense (acute blood) are dropped and trimmed to their hyperdense voxels, voxels within
--skull_base_margin_mm of the skull base's bone are cleared, and connected components smaller than
--min_component_ml are dropped. A component holding a positive click is always kept whole.
Skull-stripped scans are recognised (their brain is the intracranial space). Use
--no-intracranial_mask after a craniectomy, --no-hyperdense_only for subacute or chronic blood, and
--min_component_ml 0 to keep every component.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ich_engine.checkpoint import lock_output_dir
from ich_engine.cli import console_main
from ich_engine.config import CommandLineParser
from ich_engine.distributed import resolve_device
from sam3d.predict import (
    AUTOMATIC_THRESHOLD,
    BONE_THRESHOLD_HU,
    INTRACRANIAL_MARGIN_MM,
    MIN_COMPONENT_ML,
    SKULL_BASE_MARGIN_MM,
    THRESHOLD,
    HemorrhageSegmenter,
    hyperdense_options,
)
from sam3d.predict.scans import (
    add_archive_arguments,
    add_hyperdense_argument,
    add_scan_arguments,
    check_source_arguments,
    open_scans,
    output_stems,
    parse_clicks,
    run_batch,
)


def main(argv=None) -> int:
    p = CommandLineParser(description=__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument(
        "--input",
        help="a volume, a DICOM file or series folder (files with or without extensions), a folder of "
        "volumes and series folders, or a CSV with a 'path' column (or --dicomweb)",
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model_type", default=None, help="architecture of an official checkpoint (default vit_b_ori)")
    p.add_argument("--click", nargs="+", action="append", metavar="X Y Z [pos|neg]")
    p.add_argument("--click_space", choices=["voxel", "mm"], default="voxel")
    p.add_argument("--overlap", type=float, default=0.5, help="sliding-window overlap (automatic mode)")
    p.add_argument(
        "--threshold",
        type=float,
        default=None,
        help=f"probability from which a voxel is blood (default {AUTOMATIC_THRESHOLD:g} in automatic mode with "
        f"--hyperdense_only, else {THRESHOLD:g})",
    )
    p.add_argument(
        "--intracranial_mask",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="clear predictions outside the skull's cavity (default on)",
    )
    p.add_argument("--bone_hu", type=float, default=BONE_THRESHOLD_HU, help="HU from which a voxel is bone")
    p.add_argument(
        "--intracranial_margin_mm",
        type=float,
        default=INTRACRANIAL_MARGIN_MM,
        help="erode the intracranial mask by this many mm off the inner table",
    )
    p.add_argument(
        "--skull_base_margin_mm",
        type=float,
        default=SKULL_BASE_MARGIN_MM,
        help="clear predictions this close to the skull base's bone (petrous ridges, clivus, sella); 0 keeps them",
    )
    p.add_argument(
        "--min_component_ml",
        type=float,
        default=MIN_COMPONENT_ML,
        help="drop connected components smaller than this (mL); 0 keeps all",
    )
    add_hyperdense_argument(p)
    add_scan_arguments(p)
    add_archive_arguments(p)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    check_source_arguments(p, args)
    for flag in ("min_component_ml", "intracranial_margin_mm", "skull_base_margin_mm"):
        if getattr(args, flag) < 0:
            p.error(f"--{flag} {getattr(args, flag):g}: expected >= 0")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        p.error(f"--threshold {args.threshold:g}: a probability strictly between 0 and 1 is expected")
    if not 0.0 <= args.overlap < 1.0:
        p.error(f"--overlap {args.overlap:g}: expected 0 <= overlap < 1")
    if not Path(args.checkpoint).is_file():
        p.error(f"--checkpoint {args.checkpoint}: file not found")
    device = resolve_device(args.device)
    clicks = parse_clicks(args.click, args.click_space)
    # Every input named, the study retrieved, the output folder locked and output names checked, before
    # the model loads.
    with open_scans(args) as scans, lock_output_dir(args.output_dir):
        stems = output_stems(scans.inputs)
        segmenter = HemorrhageSegmenter(
            args.checkpoint,
            device,
            args.model_type,
            args.overlap,
            restrict_intracranial=args.intracranial_mask,
            min_component_ml=args.min_component_ml,
            bone_hu=args.bone_hu,
            margin_mm=args.intracranial_margin_mm,
            skull_base_margin_mm=args.skull_base_margin_mm,
            **hyperdense_options(args.hyperdense_only),
        )
        out = Path(args.output_dir)

        def predict(path: str) -> dict:
            volume = scans.read(path, args)
            result = segmenter.save(segmenter.predict(volume, clicks, args.threshold), out, stem=stems[path])
            m = result.measurements
            dicom = [result.files[key] for key in ("dicom_seg", "dicom_sr") if key in result.files]
            problems = volume.geometry.not_a_head_ct
            caveat = f"; NOT A HEAD CT, so it cannot exclude hemorrhage: {'; '.join(problems)}" if problems else ""
            print(
                f"{volume.source}: {m.total_volume_ml:.1f} mL in {m.num_components} component(s), side {m.side}, "
                f"ABC/2 {m.abc2_ml:.1f} mL, location {m.location}{caveat} "
                f"-> {', '.join([result.files['mask'], *dicom])}"
            )
            print(f"  geometry: {volume.geometry.summary()}")
            if args.store:
                print(f"  {scans.store(result.files)}")
            return result.to_json()

        return run_batch(scans.inputs, predict, args.fail_fast, out / "predictions.json", scans.name)


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
