#!/usr/bin/env python
"""The main job on the embedded default (`make demo`), the way real work runs: synthetic head CTs →
fine-tune the pretrained SAM-Med3D stand-in → export its encoder → BLIP-2 stage 1 (Q-Former) and
stage 2 (behind the pretrained LM stand-in) → mask, measurements and report for held-out scans →
``<output_dir>/summary.json``. Runs on 2 CPU cores in under 10 minutes.

    sam3d-demo --output_dir outputs/demo [--seed 1] [--image_only]

The stand-ins for released weights (``sam3d/pretrained/``: SAM-Med3D, the report LM, the stage-1
Q-Former) were made by ``sam3d-make-pretrained`` on phantoms of seed 1000, which no demo seed
renders. ``--image_only`` also trains a report model that reads no
measurements and records its reports' figures beside the conditioned one's.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import time
from dataclasses import asdict
from pathlib import Path
from statistics import median

import numpy as np
from tqdm import tqdm

from blip.app.grounded import LOCATION_SUBTYPES
from blip.model import generation_settings
from blip.training.train import ReportTrainingConfig
from blip.training.train import run_training as run_report_training
from ich_engine.checkpoint import atomic_write
from ich_engine.cli import console_main
from ich_engine.config import CommandLineParser
from sam3d import CONFIG_DIR, PRETRAINED_DIR
from sam3d.data.io import load_volume
from sam3d.data.synthetic import make_synthetic_ich
from sam3d.training import SegmentationTrainingConfig
from sam3d.training import run_training as run_segmentation_training

SUBTYPE_WORDS = {**LOCATION_SUBTYPES, "none": "none"}
GOALS = {
    "automatic_dice": (">=", 0.75),
    "median_volume_error": ("<=", 0.10),
    "median_signed_volume_error": ("|<=|", 0.05),  # a bias, either way, is worse than noise
    "max_normal_ml": ("<=", 1.0),
    "side_correct": (">=", 1.0),
    "location_correct": (">=", 0.90),
    "report_presence": (">=", 0.95),
    "report_side": (">=", 0.90),
    "report_subtype": (">=", 0.90),
    "report_subtype_iph": (">=", 0.75),
    "minutes_total": ("<=", 10.0),
}


def report_labels(text: str) -> dict:
    """The labeler's reading of a report in the summary's terms: presence, side, subtype."""
    from blip.evaluation.labeler import CT_SUBTYPES, POSITIVE, label_ct_report

    labels = label_ct_report(text)
    present = labels["hemorrhage"] == POSITIVE
    subtypes = [s for s in CT_SUBTYPES if labels[s] == POSITIVE]
    subtype = "none" if not present else "+".join(subtypes) if subtypes else "unspecified"
    return {"presence": present, "side": labels["side"] if present else "none", "subtype": subtype}


def reporter_vocabulary() -> list[str]:
    from transformers import AutoTokenizer

    return list(AutoTokenizer.from_pretrained(PRETRAINED_DIR / "report_lm", local_files_only=True).get_vocab())


def _words(text: str) -> set[str]:
    return set(re.findall(r"[A-Za-z]+", text))


def train_report_model(
    args, data: dict, encoder: str, out: Path, stage: int, conditioned: bool, init_from: str | None = None
) -> dict:
    stage1 = {"epochs": args.stage1_epochs, "lr": args.stage1_lr} if stage == 1 else {}
    config = ReportTrainingConfig.from_yaml(
        args.report_config,
        train_manifest=str(data["reports_train"]),
        val_manifest=str(data["reports_val"]),
        encoder=encoder,
        output_dir=str(out),
        seed=args.seed,
        # The pretrained LM stays fixed, as in BLIP-2: fine-tuned on a few dozen reports it unlearns
        # what it knew (the impression's side, above all).
        lm=str(PRETRAINED_DIR / "report_lm"),
        lm_mode="frozen",
        stage=stage,
        condition_on_measurements=conditioned,
        num_val_samples=0,  # no generation in every validation; the held-out step shows reports
        init_from=init_from,
        **stage1,
    )
    result = run_report_training(config)
    result["generation"] = generation_settings(config)
    return result


def held_out_cases(reporter, cases: list[dict], root: Path, out: Path, vocabulary: set[str]) -> list[dict]:
    """One summary record per held-out scan: truth, automatic segmentation (Dice on the scan's own grid),
    the generated report and the labeler's reading of it."""
    from blip.app.grounded import MIN_HEMORRHAGE_ML, contradictions, subtype_contradictions

    records = []
    for case in tqdm(cases, desc="reporting", unit="scan"):
        result = reporter.run(load_volume(root / case["path"]), "ct", output_dir=out)
        assert result.segmentation is not None  # a CT report
        measurements = result.segmentation.measurements
        m = asdict(measurements)
        measured = m["total_volume_ml"] >= MIN_HEMORRHAGE_ML
        predicted = result.segmentation.mask > 0
        truth = load_volume(root / case["mask_path"]).array > 0
        total = predicted.sum() + truth.sum()
        positive = case["ich_type"] != "none"
        records.append(
            {
                "case": case["case_id"],
                "true_ml": case["volume_ml"],
                "measured_ml": m["total_volume_ml"],
                "true_side": case["side"] if positive else "none",
                "measured_side": m["side"] if measured else "none",
                "abc2_ml": m["abc2_ml"],
                "true_subtype": SUBTYPE_WORDS[case["ich_type"]],
                "true_location": case["ich_type"],
                "measured_location": m["location"] if measured else "none",
                "component_locations": [c.location for c in measurements.components],
                "component_on_truth": on_truth(predicted, truth, result.segmentation.affine, measurements),
                "dice": round(float(2 * (predicted & truth).sum() / total), 4) if positive else None,
                "report": result.generated,
                "generated_labels": report_labels(result.generated),
                "grounded_report": result.report,
                "report_labels": report_labels(result.report),
                "contradictions": contradictions(result.generated, measurements),
                "subtype_contradictions": len(subtype_contradictions(result.generated, measurements)),
                "words_outside_vocabulary": sorted(_words(result.generated) - vocabulary),
            }
        )
    return records


def on_truth(predicted: np.ndarray, truth: np.ndarray, affine: np.ndarray, measurements) -> list[bool]:
    """For each measured component, whether it overlaps the true mask (matched to the predicted mask's
    26-connected components by their centroid): a component off the truth is a false positive,
    with no true location of its own."""
    from scipy import ndimage

    labels, count = ndimage.label(predicted, structure=np.ones((3, 3, 3)))
    if count == 0:
        return []
    index = np.arange(1, count + 1)
    overlaps = np.asarray(ndimage.maximum(truth, labels, index), dtype=bool).reshape(-1)
    centroids = np.asarray(ndimage.center_of_mass(predicted, labels, index)).reshape(-1, 3)
    world = centroids @ affine[:3, :3].T + affine[:3, 3]
    return [
        bool(overlaps[int(np.argmin(np.linalg.norm(world - np.asarray(c.centroid_mm), axis=1)))])
        for c in measurements.components
    ]


def figures(records: list[dict]) -> dict:
    """The goal figures of the held-out records (see GOALS). ``report_*`` read the grounded report (what
    a reader gets), ``generated_*`` the language model's own text; ``location_correct`` is the share of
    the masks' components on the true bleed whose location class is the scan's true kind;
    ``false_positive_components`` counts the components off the true mask (normal scans included)."""
    positives = [r for r in records if r["true_subtype"] != "none"]
    one_sided = [r for r in positives if r["true_side"] in ("left", "right")]
    normals = [r for r in records if r["true_subtype"] == "none"]
    iph = [r for r in records if r["true_subtype"] == "IPH"]
    located = [
        location == r["true_location"]
        for r in records
        for location, on in zip(r["component_locations"], r["component_on_truth"])
        if on
    ]
    signed = [(r["measured_ml"] - r["true_ml"]) / r["true_ml"] for r in positives]

    def agree(source: str, key: str, among: list[dict]) -> float:
        return round(float(np.mean([r[source][key] == truth(r, key) for r in among])), 4)

    return {
        "automatic_dice": round(float(np.mean([r["dice"] for r in positives])), 4) if positives else None,
        "median_volume_error": round(median(abs(e) for e in signed), 4) if positives else None,
        "median_signed_volume_error": round(median(signed), 4) if positives else None,
        "max_normal_ml": max((r["measured_ml"] for r in normals), default=None),
        "side_correct": round(float(np.mean([r["measured_side"] == r["true_side"] for r in one_sided])), 4)
        if one_sided
        else None,
        "location_correct": round(float(np.mean(located)), 4) if located else None,
        "false_positive_components": sum(not on for r in records for on in r["component_on_truth"]),
        **{f"report_{key}": agree("report_labels", key, records) for key in ("presence", "side", "subtype")},
        "report_subtype_iph": agree("report_labels", "subtype", iph) if iph else None,
        **{f"generated_{key}": agree("generated_labels", key, records) for key in ("presence", "side", "subtype")},
        "reports_with_unknown_words": sum(bool(r["words_outside_vocabulary"]) for r in records),
        "reports_contradicting_measurements": sum(bool(r["contradictions"]) for r in records),
        "subtype_contradictions": sum(r["subtype_contradictions"] for r in records),
    }


def said(labels: dict) -> str:
    return f"{labels['side']} {labels['subtype']}" if labels["presence"] else "no hemorrhage"


def truth(record: dict, key: str):
    return {
        "presence": record["true_subtype"] != "none",
        "side": record["true_side"],
        "subtype": record["true_subtype"],
    }[key]


def goals(measured: dict) -> dict:
    def met(name: str) -> bool | None:
        value = measured.get(name)
        if value is None:
            return None
        op, target = GOALS[name]
        return {">=": value >= target, "<=": value <= target, "|<=|": abs(value) <= target}[op]

    return {
        name: {"goal": f"{op} {target:g}", "measured": measured.get(name), "met": met(name)}
        for name, (op, target) in GOALS.items()
    }


def main(argv=None) -> int:
    p = CommandLineParser(description=__doc__)
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--num_train", type=int, default=24, help="training phantoms")
    p.add_argument("--num_held_out", type=int, default=12, help="held-out phantoms (validation and the reports)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segmentation_config", default=str(CONFIG_DIR / "sam3d_demo.yaml"))
    p.add_argument("--report_config", default=str(CONFIG_DIR / "blip_tiny_ct.yaml"))
    p.add_argument("--stage1_epochs", type=int, default=30)
    p.add_argument("--stage1_lr", type=float, default=3e-4)
    p.add_argument(
        "--stage1",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="BLIP-2 stage 1 from the pretrained Q-Former before stage 2; --no-stage1: stage 2 alone, "
        "from a fresh bridge (the comparison in docs/results.md)",
    )
    p.add_argument(
        "--image_only", action="store_true", help="also train and score a report model without measurement conditioning"
    )
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    out = Path(args.output_dir)
    minutes: dict[str, float] = {}
    clock = [time.time()]

    def lap(name: str) -> None:
        now = time.time()
        minutes[name] = round((now - clock[0]) / 60, 2)
        clock[0] = now

    total = args.num_train + args.num_held_out
    print(f"[1/6] {total} synthetic head CTs with hemorrhages and their reports -> {out / 'data'}", flush=True)
    data = make_synthetic_ich(out / "data", num_cases=total, seed=args.seed, val_fraction=args.num_held_out / total)
    lap("data")

    print("[2/6] fine-tuning the pretrained SAM-Med3D (small) to segment the hemorrhages", flush=True)
    seg_config = SegmentationTrainingConfig.from_yaml(
        args.segmentation_config,
        train_csv=str(data["train_csv"]),
        val_csv=str(data["val_csv"]),
        mask_dir=str(data["mask_dir"]),
        output_dir=str(out / "sam3d"),
        cache_dir=str(out / "cache"),
        checkpoint=str(PRETRAINED_DIR / "sam_med3d_small_ich.pth"),
        seed=args.seed,
    )
    for message in seg_config.warnings():
        print(f"WARNING: {message}", file=sys.stderr)
    seg = run_segmentation_training(seg_config)
    encoder = seg["outputs"]["sam_encoder"]
    lap("segmentation")

    stage1, bridge = None, None
    if args.stage1:
        print("[3/6] BLIP-2 stage 1 from the pretrained Q-Former: ITC, ITM, ITG on the fine-tuned encoder", flush=True)
        stage1 = train_report_model(args, data, encoder, out / "blip_stage1", 1, False, str(PRETRAINED_DIR / "qformer"))
        bridge = stage1["outputs"]["qformer"]
        lap("report_stage1")
    else:
        print("[3/6] BLIP-2 stage 1: skipped (--no-stage1), stage 2 starts from a fresh bridge", flush=True)

    print("[4/6] BLIP-2 stage 2: reports behind the pretrained LM, the bridge from stage 1", flush=True)
    reports = train_report_model(args, data, encoder, out / "blip", 2, True, bridge)
    lap("report_stage2")
    models = {"conditioned": reports}
    if args.image_only:
        print("[4b] the same without measurement conditioning (image only)", flush=True)
        models["image_only"] = train_report_model(args, data, encoder, out / "blip_image_only", 2, False, bridge)
        lap("report_stage2_image_only")

    print("[5/6] held-out scans: automatic segmentation, measurements, report", flush=True)
    from blip.app.grounded import ScanReporter

    root = Path(data["cases_json"]).parent
    cases = [c for c in json.loads(Path(data["cases_json"]).read_text()) if c["split"] == "val"]
    # The report vocabulary: every word of the 5,600 reports the LM stand-in learned the language from.
    vocabulary = set().union(*(_words(token) for token in reporter_vocabulary()))
    records = {}
    for name, result in models.items():
        reporter = ScanReporter(
            seg["outputs"]["best_model"], result["outputs"]["report_model"], generation=result["generation"]
        )
        folder = out / ("predictions" if name == "conditioned" else f"predictions_{name}")
        records[name] = held_out_cases(reporter, cases, root, folder, vocabulary)
    lap("held_out")
    minutes["total"] = round(sum(minutes.values()), 2)

    print("[6/6] summary", flush=True)
    measured = figures(records["conditioned"])
    summary = {
        "seed": args.seed,
        "val_dice": round(float(seg["best_metric"]), 4),
        "automatic_dice": measured["automatic_dice"],
        "minutes": minutes,
        "figures": measured,
        "goals": goals({**measured, "minutes_total": minutes["total"]}),
        "stage1": {k: v for k, v in stage1["history"][stage1["best_epoch"] - 1].items() if k.startswith("val_")}
        if stage1
        else None,
        "report_val": {k: v for k, v in reports["history"][reports["best_epoch"] - 1].items() if k.startswith("val_")},
        "cases": records["conditioned"],
    }
    if "image_only" in records:
        summary["image_only"] = {"figures": figures(records["image_only"]), "cases": records["image_only"]}
    text = json.dumps(summary, indent=2, default=str)
    atomic_write(out / "summary.json", lambda tmp: tmp.write_text(text + "\n"))

    print(f"\n=== demo finished in {minutes['total']:.1f} min (seed {args.seed}) ===")
    print(
        f"segmentation: best validation Dice {seg['best_metric']:.3f} (epoch {seg['best_epoch']}, "
        f"{seg_config.val_num_clicks} simulated clicks); held-out automatic (no clicks) Dice "
        f"{measured['automatic_dice']:.3f}"
    )
    s1 = summary["stage1"]
    retrieval = f"stage 1 image->report R@1 {s1['val_i2t_r1']:.2f}, R@5 {s1['val_i2t_r5']:.2f}; " if s1 else ""
    print(
        f"report model: {retrieval}stage 2 best validation loss {reports['best_metric']:.3f} (epoch "
        f"{reports['best_epoch']}), image gain {summary['report_val'].get('val_image_gain', float('nan')):.3f}"
    )
    print(
        "held-out scans (true vs measured volume, ABC/2, side and location; what the generated report says, "
        "and the grounded report where a subtype was corrected):"
    )
    for r in records["conditioned"]:
        dice = f", Dice {r['dice']:.2f}" if r["dice"] is not None else ""
        grounded = r["report_labels"]
        corrected = f" -> {grounded['subtype']}" if grounded["subtype"] != r["generated_labels"]["subtype"] else ""
        print(
            f"  {r['case']}: true {r['true_ml']:6.1f} mL {r['true_side']:>9} {r['true_subtype']:>4}, measured "
            f"{r['measured_ml']:6.1f} mL (ABC/2 {r['abc2_ml']:6.1f}) {r['measured_side']:>9} "
            f"{SUBTYPE_WORDS.get(r['measured_location'], r['measured_location'])}{dice}; "
            f"report: {said(r['generated_labels'])}{corrected}"
        )
    print(
        f"generated reports (the language model alone): presence {measured['generated_presence']:.2f}, side "
        f"{measured['generated_side']:.2f}, subtype {measured['generated_subtype']:.2f}; subtype contradictions "
        f"flagged and corrected: {measured['subtype_contradictions']}"
    )
    print(f"mask components off the true bleed (false positives): {measured['false_positive_components']}")
    print("goals:")
    for name, goal in summary["goals"].items():
        value = goal["measured"]
        shown = "n/a" if value is None else f"{value:g}"
        print(f"  {name:>26} {goal['goal']:>8}: {shown:>7}  {'met' if goal['met'] else 'NOT met'}")
    if "image_only" in summary:
        f = summary["image_only"]["figures"]
        print(
            f"image-only report model: presence {f['report_presence']:.2f}, side {f['report_side']:.2f}, "
            f"subtype {f['report_subtype']:.2f}"
        )
    example = next((r for r in records["conditioned"] if r["true_subtype"] != "none"), records["conditioned"][0])
    print(
        f"\ngenerated report for {example['case']} (true {example['true_ml']} mL {example['true_side']} "
        f"{example['true_subtype']}):\n{example['report']}"
    )
    print(f"\nsummary: {out / 'summary.json'}")
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
