#!/usr/bin/env python
"""The main job on the embedded default (`make demo`): synthetic head CTs → fine-tuned SAM-Med3D →
exported encoder → BLIP-2 report model → mask, measurements and a grounded report for held-out
scans. Runs on 2 CPU cores in under 10 minutes.

    python scripts/demo.py --output_dir outputs/demo
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

from tqdm import tqdm

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
from engine.cli import run_main  # noqa: E402
from engine.config import CommandLineParser, parse_with_config# noqa: E402
from sam3d.data.synthetic import make_synthetic_ich  # noqa: E402


def main(argv=None) -> int:
    p = CommandLineParser(description=__doc__)
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--num_cases", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--segmentation_config", default=str(REPO / "configs" / "sam3d_demo.yaml"))
    p.add_argument("--report_config", default=str(REPO / "configs" / "blip_tiny_ct.yaml"))
    p.add_argument("--report_epochs", type=int, default=36,
                   help="fewer than the config's 40 so the whole demo stays under 10 minutes on 2 cores")
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    out = Path(args.output_dir)
    started = time.time()

    print(f"[1/5] synthetic head CTs with hemorrhages and their reports -> {out / 'data'}", flush=True)
    data = make_synthetic_ich(out / "data", num_cases=args.num_cases, seed=args.seed, val_fraction=0.25)

    print("[2/5] fine-tuning SAM-Med3D (small) to segment the hemorrhages", flush=True)
    seg_args = parse_with_config(train.build_parser(), [
        "--config", args.segmentation_config, "--train_csv", str(data["train_csv"]), "--val_csv", str(data["val_csv"]),
        "--mask_dir", str(data["mask_dir"]), "--output_dir", str(out / "sam3d"), "--cache_dir", str(out / "cache"),
        "--seed", str(args.seed),
    ])
    for message in train.check_config(seg_args):
        print(f"WARNING: {message}", file=sys.stderr)
    seg = train.run_training(seg_args)

    print("[3/5] evaluating it on the validation scans (simulated clicks)", flush=True)
    from scripts.evaluate_seg import main as evaluate

    evaluate(["--checkpoint", seg["outputs"]["best_model"], "--csv", str(data["val_csv"]), "--mask_dir",
              str(data["mask_dir"]), "--output_dir", str(out / "sam3d" / "eval"), "--num_clicks",
              str(seg_args.val_num_clicks)])
    evaluation = json.loads((out / "sam3d" / "eval" / "summary.json").read_text())

    print("[4/5] training the BLIP-2 report model on the exported encoder", flush=True)
    from blip import train as blip_train

    report_args = parse_with_config(blip_train.build_parser(), [
        "--config", args.report_config, "--train_manifest", str(data["reports_train"]), "--val_manifest",
        str(data["reports_val"]), "--encoder", seg["outputs"]["sam_encoder"], "--output_dir", str(out / "blip"),
        "--seed", str(args.seed), "--epochs", str(args.report_epochs),
        "--num_val_samples", "0",  # no generation in every validation; the held-out step below shows reports
    ])
    reports = blip_train.run_training(report_args)

    print("[5/5] held-out scans: automatic segmentation, measurements, grounded report", flush=True)
    from blip.grounded import MIN_HEMORRHAGE_ML, ScanReporter
    from blip.labeler import label_ct_report

    reporter = ScanReporter(seg["outputs"]["best_model"], reports["outputs"]["report_model"],
                            generation={"num_beams": report_args.num_beams, "max_new_tokens": report_args.max_new_tokens})
    cases = {c["patient_id"]: c for c in json.loads(Path(data["cases_json"]).read_text()) if c["split"] == "val"}
    results = []
    for case in tqdm(cases.values(), desc="reporting", unit="scan"):
        scan = Path(data["cases_json"]).parent / case["path"]
        result = reporter.run(scan, "ct", output_dir=out / "predictions")
        result["true_volume_ml"] = case["volume_ml"]
        result["report_says_hemorrhage"] = label_ct_report(result["generated"])["hemorrhage"] == 1
        results.append(result)
    (out / "predictions" / "held_out_reports.json").write_text(json.dumps(results, indent=2, default=str))

    minutes = (time.time() - started) / 60
    print(f"\n=== demo finished in {minutes:.1f} min ===")
    print(f"segmentation: best validation Dice {seg['best_metric']:.3f} (epoch {seg['best_epoch']}, "
          f"{seg_args.val_num_clicks} simulated clicks); evaluation Dice {evaluation['dice']['mean']:.3f}, "
          f"automatic (no clicks) Dice {evaluation['dice_automatic']['mean']:.3f}")
    print(f"report model: best validation loss {reports['best_metric']:.3f} (epoch {reports['best_epoch']})")
    print("held-out scans, automatic mode (true vs measured hemorrhage volume, generated report's finding):")
    for r in results:
        m = r["segmentation"]["measurements"]
        side = f" ({m['side']})" if m["total_volume_ml"] >= MIN_HEMORRHAGE_ML else ""
        flags = f"  [{len(r['flags'])} contradiction(s) flagged]" if r["flags"] else ""
        print(f"  {Path(r['source']).name}: true {r['true_volume_ml']:6.1f} mL, measured {m['total_volume_ml']:6.1f} mL"
              f"{side}; report says hemorrhage: {'yes' if r['report_says_hemorrhage'] else 'no'}{flags}")
    example = next((r for r in results if r["true_volume_ml"] > 0), results[0])
    print(f"\nreport for {Path(example['source']).name} (true {example['true_volume_ml']} mL):\n{example['report']}")
    print(f"\noutputs: {out.resolve()}")
    for stage, outputs in (("segmentation", seg["outputs"]), ("report", reports["outputs"])):
        for name, path in outputs.items():
            print(f"  {stage} {name}: {path}")
    print(f"  predictions (masks, measurements, overlays, reports): {out / 'predictions'}")
    return 0


if __name__ == "__main__":
    sys.exit(run_main(main))
