#!/usr/bin/env python
"""Evaluate a SAM-Med3D checkpoint: on a CSV of scans with masks (SAM-Med3D's click protocol), or
the whole pipeline on a folder or CSV of scans (``--input``), with or without masks.

    sam3d-evaluate --checkpoint outputs/sam3d/best_model.pth --csv test.csv \\
        --mask_dir masks/ --output_dir outputs/sam3d/eval --num_clicks 5
    sam3d-evaluate --checkpoint best_model.pth --input scans/ [--mask_dir masks/ | --normal] \\
        --output_dir outputs/eval_scans

``--input`` (a folder of volumes and DICOM series folders, or a CSV with ``path`` and optionally
``mask`` and ``ich`` columns) runs what ``sam3d-predict`` runs, automatic mode with its
post-processing, on each scan's own grid, and writes ``per_scan.csv`` and ``summary.json``: Dice and
volume error of bleeds with masks, false-positive mL of normal scans (an empty mask, ``ich`` 0, or every
scan with ``--normal``: a folder of normal head CTs without masks).

Each scan goes through the validation preprocessing (the checkpoint's own; official checkpoints get
the official one), gets ``--num_clicks`` simulated clicks from its ground truth (seeded), and is
scored on the model's grid with that grid's true spacing: Dice, NSD at --nsd_tolerance_mm, HD95 in
mm, and predicted vs true hemorrhage volume in mL. The true volume is measured on the original mask
at its original spacing, so a lesion larger than the model's crop shows up as volume error (and is
flagged ``lesion_truncated``). Hemorrhage-free scans are predicted without prompts;
``dice_automatic`` scores the prompt-free prediction of hemorrhage scans (automatic mode).

Writes ``per_case.csv`` and ``summary.json`` to --output_dir.
"""

from __future__ import annotations

import argparse
import csv
import json
import math
import sys
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from ich_engine.checkpoint import lock_output_dir
from ich_engine.cli import console_main
from ich_engine.config import CommandLineParser, ConfigError
from ich_engine.distributed import resolve_device
from sam3d.data.dataset import build_segmentation_dataset, read_manifest
from sam3d.data.io import load_volume, scan_inputs
from sam3d.data.preprocessing import Preprocessing
from sam3d.data.transforms import build_transforms
from sam3d.metrics import dice_score, surface_metrics, volume_ml
from sam3d.modeling import load_trained_sam3d
from sam3d.predict.postprocessing import hyperdense_options
from sam3d.predict.scan_evaluation import find_scans_and_masks, score, summarize
from sam3d.predict.scans import add_hyperdense_argument, add_scan_arguments, read_scan
from sam3d.predict.segmenter import HemorrhageSegmenter
from sam3d.task import SegmentationTask

COLUMNS = [
    "row",
    "patient_id",
    "path",
    "ich",
    "dice_first_click",
    "dice",
    "dice_automatic",
    "nsd",
    "hd95_mm",
    "true_volume_ml",
    "pred_volume_ml",
    "volume_error_ml",
    "lesion_truncated",
]


def _summary(rows: list[dict]) -> dict[str, Any]:
    positives = [r for r in rows if r["ich"] == 1]
    negatives = [r for r in rows if r["ich"] == 0]

    def stats(key: str, subset: list[dict]) -> dict[str, float | int | None]:
        values = np.array([r[key] for r in subset], dtype=float)
        finite = values[np.isfinite(values)]
        if finite.size == 0:
            return {"mean": None, "median": None, "n": 0, "n_undefined": int(values.size)}
        return {
            "mean": float(finite.mean()),
            "median": float(np.median(finite)),
            "n": int(finite.size),
            "n_undefined": int(values.size - finite.size),
        }

    summary: dict[str, Any] = {
        "cases": len(rows),
        "hemorrhage_cases": len(positives),
        "hemorrhage_free_cases": len(negatives),
    }
    for key in ("dice_first_click", "dice", "dice_automatic", "nsd", "hd95_mm", "volume_error_ml"):
        summary[key] = stats(key, positives)
    summary["abs_volume_error_ml"] = stats("abs_volume_error_ml", positives)
    summary["lesions_truncated_by_crop"] = sum(r["lesion_truncated"] for r in positives)
    if negatives:
        summary["hemorrhage_free_predicted_empty"] = float(np.mean([r["pred_volume_ml"] == 0 for r in negatives]))
        summary["false_positive_volume_ml"] = stats("pred_volume_ml", negatives)
    return summary


def main(argv=None) -> int:
    p = CommandLineParser(description=__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--csv", help="path,ich,patient_id CSV (as for training): the click protocol on the model's crop")
    p.add_argument(
        "--input",
        help="the whole pipeline (automatic, post-processed) on a folder of volumes and DICOM series folders, "
        "or a CSV with a 'path' column (and optionally 'mask', 'ich')",
    )
    p.add_argument("--mask_dir", help="masks named like the scans (required with --csv)")
    p.add_argument(
        "--normal", action="store_true", help="with --input: every scan is a normal head CT (false-positive mL)"
    )
    p.add_argument("--output_dir", required=True)
    p.add_argument("--model_type", default=None, help="architecture of an official checkpoint (default vit_b_ori)")
    p.add_argument("--num_clicks", type=int, default=5)
    p.add_argument("--nsd_tolerance_mm", type=float, default=1.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default="auto")
    p.add_argument("--skip_invalid", action="store_true", help="skip bad rows (listed in summary.json)")
    add_hyperdense_argument(p)
    add_scan_arguments(p)
    args = p.parse_args(argv)
    if (args.csv is None) == (args.input is None):
        p.error("give --csv (the click protocol) or --input (the whole pipeline), exactly one")
    if args.csv is not None and args.mask_dir is None:
        p.error("--csv needs --mask_dir (the click protocol simulates clicks from the masks)")
    if args.normal and args.input is None:
        p.error("--normal goes with --input")
    if args.input is not None:
        scans = find_scans_and_masks(
            scan_inputs(args.input),
            args.input if args.input.lower().endswith(".csv") else None,
            args.mask_dir,
            args.normal,
        )
        with lock_output_dir(args.output_dir):
            return evaluate_scans(args, scans)
    if args.num_clicks < 1:
        raise ConfigError(f"--num_clicks must be >= 1 (each scan is scored after its clicks), got {args.num_clicks}")

    with lock_output_dir(args.output_dir):  # before the model loads: a folder that cannot hold the results
        return evaluate(args)


def evaluate(args: argparse.Namespace) -> int:
    device = resolve_device(args.device)
    model, meta = load_trained_sam3d(args.checkpoint, args.model_type)
    model.to(device).eval()
    preprocessing = Preprocessing.from_checkpoint(meta, args.checkpoint)
    spacing = preprocessing.target_spacing_mm
    manifest, skipped = read_manifest(args.csv, args.mask_dir, validate="full", skip_invalid=args.skip_invalid)
    dataset = build_segmentation_dataset(manifest, build_transforms(preprocessing, train=False))
    task = SegmentationTask(val_num_clicks=args.num_clicks, spacing_mm=spacing, seed=args.seed)
    generator = torch.Generator().manual_seed(args.seed)

    results = []
    for row, index in zip(manifest, tqdm(range(len(dataset)), desc="evaluating", unit="scan")):
        item = dataset[index]
        batch = {"image": item["image"][None], "label": item["label"][None]}
        out = task.predict_batch(model, batch, device, generator)
        target, first, prediction = out["targets"], out["first"], out["last"] > 0
        true_ml = 0.0
        if row.mask_path is not None:
            mask = load_volume(row.mask_path)
            true_ml = float((mask.array > 0).sum()) * mask.voxel_volume_ml  # |det| of the file's affine
        pred_ml = volume_ml(prediction.cpu(), spacing)
        crop_ml = volume_ml(target.cpu(), spacing)
        surface = surface_metrics(prediction[0], target[0], spacing, args.nsd_tolerance_mm)
        results.append(
            {
                "row": row.row,
                "patient_id": row.patient_id,
                "path": row.path,
                "ich": row.ich,
                "dice_first_click": dice_score(first > 0, target)[0].item() if row.ich else float("nan"),
                "dice": dice_score(prediction, target)[0].item() if row.ich else float("nan"),
                "dice_automatic": dice_score(out["automatic"] > 0, target)[0].item() if row.ich else float("nan"),
                "nsd": surface["nsd"] if row.ich else float("nan"),
                "hd95_mm": surface["hd95_mm"] if row.ich else float("nan"),
                "true_volume_ml": round(true_ml, 3),
                "pred_volume_ml": round(pred_ml, 3),
                "volume_error_ml": round(pred_ml - true_ml, 3),
                "abs_volume_error_ml": round(abs(pred_ml - true_ml), 3),
                # Resampling changes voxel counts a little; a loss of more than 5% means the crop cut the lesion.
                "lesion_truncated": bool(true_ml > 0 and crop_ml < 0.95 * true_ml),
            }
        )

    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "per_case.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=COLUMNS, extrasaction="ignore")
        writer.writeheader()
        for r in results:
            writer.writerow({k: ("" if isinstance(v, float) and math.isnan(v) else v) for k, v in r.items()})
    summary = {
        "checkpoint": args.checkpoint,
        "csv": args.csv,
        "num_clicks": args.num_clicks,
        "spacing_mm": spacing,
        "nsd_tolerance_mm": args.nsd_tolerance_mm,
        **_summary(results),
        "skipped_rows": skipped,
    }
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))

    def fmt(key: str) -> str:
        value = summary[key]["mean"]
        return "n/a" if value is None else f"{value:.3f}"

    print(
        f"{summary['hemorrhage_cases']} hemorrhage scans: Dice {fmt('dice')}, NSD {fmt('nsd')}, "
        f"HD95 {fmt('hd95_mm')} mm, |volume error| {fmt('abs_volume_error_ml')} mL"
    )
    print(f"written: {output_dir / 'per_case.csv'}, {output_dir / 'summary.json'}")
    return 0


def evaluate_scans(args: argparse.Namespace, scans: list) -> int:
    segmenter = HemorrhageSegmenter(
        args.checkpoint, resolve_device(args.device), args.model_type, **hyperdense_options(args.hyperdense_only)
    )
    rows = []
    for scan in tqdm(scans, desc="evaluating", unit="scan"):
        rows.append(score(scan, segmenter.predict(read_scan(scan.path, args))))
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    with open(output_dir / "per_scan.csv", "w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    summary = {"checkpoint": args.checkpoint, "input": args.input, **summarize(rows)}
    (output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    for r in rows:
        scored = f"Dice {r['dice']}, volume error {r['volume_error']}" if r["dice"] != "" else ""
        normal = f"normal, false positive {r['false_positive_ml']} mL" if r["normal"] == 1 else ""
        print(f"{r['scan']}: measured {r['measured_ml']} mL {r['location']} {scored or normal}".rstrip())
    print(
        f"{summary['bleeds_with_masks']} bleeds with masks: mean Dice {summary['dice_mean']}, median |volume error| "
        f"{summary['median_abs_volume_error']}; {summary['normal_scans']} normal scans: largest false positive "
        f"{summary['normal_false_positive_ml_max']} mL"
    )
    print(f"written: {output_dir / 'per_scan.csv'}, {output_dir / 'summary.json'}")
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
