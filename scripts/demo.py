#!/usr/bin/env python
"""The main job on the embedded default (`make demo`): synthetic head CTs → fine-tuned SAM-Med3D →
evaluation → exported encoder. Runs on 2 CPU cores in a few minutes.

    python scripts/demo.py --output_dir outputs/demo
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402
from engine.config import parse_with_config  # noqa: E402
from sam3d.data.synthetic import make_synthetic_ich  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--output_dir", default="outputs/demo")
    p.add_argument("--num_cases", type=int, default=24)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--config", default=str(REPO / "configs" / "sam3d_demo.yaml"))
    args = p.parse_args(argv)
    os.environ.setdefault("WANDB_MODE", "disabled")
    out = Path(args.output_dir)
    started = time.time()

    print(f"[1/3] synthetic head CTs with hemorrhages -> {out / 'data'}", flush=True)
    data = make_synthetic_ich(out / "data", num_cases=args.num_cases, seed=args.seed, val_fraction=0.25)

    print("[2/3] fine-tuning SAM-Med3D (small) on them", flush=True)
    train_argv = [
        "--config", args.config, "--train_csv", str(data["train_csv"]), "--val_csv", str(data["val_csv"]),
        "--mask_dir", str(data["mask_dir"]), "--output_dir", str(out / "sam3d"), "--cache_dir", str(out / "cache"),
        "--seed", str(args.seed),
    ]
    train_args = parse_with_config(train.build_parser(), train_argv)
    for message in train.check_config(train_args):
        print(f"WARNING: {message}", file=sys.stderr)
    result = train.run_training(train_args)

    print("[3/3] evaluating the best checkpoint on the validation scans", flush=True)
    from scripts.evaluate_seg import main as evaluate

    evaluate(["--checkpoint", result["outputs"]["best_model"], "--csv", str(data["val_csv"]),
              "--mask_dir", str(data["mask_dir"]), "--output_dir", str(out / "sam3d" / "eval"),
              "--num_clicks", str(train_args.val_num_clicks)])
    summary = json.loads((out / "sam3d" / "eval" / "summary.json").read_text())

    print("\n=== demo finished in %.1f min ===" % ((time.time() - started) / 60))
    print(f"training stopped: {result['stop_reason']}")
    print(f"best validation Dice {result['best_metric']:.3f} (epoch {result['best_epoch']}, "
          f"{train_args.val_num_clicks} simulated clicks)")
    vol = summary["abs_volume_error_ml"]["mean"]
    print(f"evaluation: Dice {summary['dice']['mean']:.3f}, NSD {summary['nsd']['mean']:.3f}, "
          f"mean |volume error| {vol:.1f} mL over {summary['hemorrhage_cases']} hemorrhage scans; "
          f"hemorrhage-free scans predicted empty: {summary.get('hemorrhage_free_predicted_empty', 'n/a')}")
    for name, path in result["outputs"].items():
        print(f"{name}: {path}")
    print(f"training summary: {result['summary_path']}")
    print(f"per-case evaluation: {out / 'sam3d' / 'eval' / 'per_case.csv'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
