#!/usr/bin/env python
"""Scan → hemorrhage mask → measurements → BLIP-2 report checked against the measurements.

    sam3d-report --segmentation_checkpoint outputs/demo/sam3d/best_model.pth \\
        --report_model outputs/demo/blip/report_model --input scan.nii.gz --output_dir outputs/report
    sam3d-report --report_model ... --input chest.png --modality xray   # X-ray: report only

Writes per scan ``<stem>_report.json`` (report, generated text, structured findings, contradiction
flags, measurements) and ``<stem>_report.txt``, plus the mask, measurements and overlays of
``sam3d-predict`` for CT; for DICOM, the SEG and an SR holding the measurements and the report's
FINDINGS and IMPRESSION. ``--dicomweb URL --study UID [--store]`` reads from and stores back to an
archive, as in ``sam3d-predict``. Without --no_correct, an impression that contradicts the measured
hemorrhage (presence, side, volume) is replaced by one stated from the measurements; either way the
contradictions are listed.
"""

from __future__ import annotations

import sys
from pathlib import Path

from blip.app.grounded import ScanReporter
from blip.data.reports import infer_modality
from blip.model import generation_settings
from ich_engine.checkpoint import lock_output_dir
from ich_engine.cli import console_main
from ich_engine.config import CommandLineParser, ConfigError
from ich_engine.distributed import resolve_device
from sam3d.predict.postprocessing import hyperdense_options
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
    p.add_argument("--report_model", required=True, help="folder written by `sam3d-report-train` (report_model/)")
    p.add_argument("--segmentation_checkpoint", help="SAM-Med3D checkpoint for CT (omit for X-ray only)")
    p.add_argument("--input", help="a scan, a DICOM folder, an X-ray image, a folder or a CSV (or --dicomweb)")
    p.add_argument("--output_dir", required=True)
    p.add_argument("--modality", choices=["auto", "ct", "xray"], default="auto")
    p.add_argument("--click", nargs="+", action="append", metavar="X Y Z [pos|neg]")
    p.add_argument("--click_space", choices=["voxel", "mm"], default="voxel")
    p.add_argument("--no_correct", action="store_true", help="flag contradictions but keep the generated impression")
    p.add_argument("--num_beams", type=int, default=3)
    p.add_argument("--max_new_tokens", type=int, default=100)
    p.add_argument("--repetition_penalty", type=float, default=1.0)
    p.add_argument("--no_repeat_ngram_size", type=int, default=0)
    add_scan_arguments(p)
    add_hyperdense_argument(p)
    add_archive_arguments(p)
    p.add_argument("--device", default="auto")
    args = p.parse_args(argv)
    check_source_arguments(p, args)

    if not (Path(args.report_model) / "config.json").is_file():
        p.error(
            f"--report_model {args.report_model}: not a report model folder (no config.json; "
            "`sam3d-report-train` writes one as output_dir/report_model)"
        )
    if args.segmentation_checkpoint and not Path(args.segmentation_checkpoint).is_file():
        p.error(f"--segmentation_checkpoint {args.segmentation_checkpoint}: file not found")
    if args.dicomweb and args.modality == "xray":
        p.error(f"--dicomweb {args.dicomweb}: studies are read as CT; --modality xray reads image files only")
    clicks = parse_clicks(args.click, args.click_space)
    # Every input named, the study retrieved, the output folder locked and output names checked, before
    # the models load.
    with open_scans(args) as scans, lock_output_dir(args.output_dir):
        stems = output_stems(scans.inputs)
        reporter = ScanReporter(
            args.segmentation_checkpoint,
            args.report_model,
            str(resolve_device(args.device)),
            correct=not args.no_correct,
            generation=generation_settings(args),
            segmenter_options=hyperdense_options(args.hyperdense_only),
        )
        out = Path(args.output_dir)
        out.mkdir(parents=True, exist_ok=True)

        def report(path: str) -> dict:
            name = scans.name(path)
            modality = "ct" if scans.archive else infer_modality(path) if args.modality == "auto" else args.modality
            if modality == "ct" and reporter.segmenter is None:
                raise ConfigError(
                    f"{name}: CT needs --segmentation_checkpoint (the report is checked against the mask)"
                )
            scan = reporter.run(scans.read(path, args) if modality == "ct" else path, modality, clicks, out)
            scan = scan.write(out, stems[path])
            print(f"== {name} ({modality})")
            if scan.segmentation is not None:
                print(f"geometry: {scan.segmentation.volume.geometry.summary()}")
            print(scan.report)
            if scan.grounding is not None:
                corrected = " (impression corrected)" if scan.grounding.corrected else ""
                for flag in scan.grounding.flags:
                    print(f"  contradiction: {flag}{corrected}")
            if args.store:
                assert scan.segmentation is not None  # --store reads a study from the archive: CT
                print(scans.store(scan.segmentation.files))
            return {"source": name, "modality": modality, "report": scan.files["report_json"]}

        return run_batch(scans.inputs, report, args.fail_fast, out / "reports.json", scans.name)


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
