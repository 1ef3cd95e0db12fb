#!/usr/bin/env python
"""Fine-tune SAM-Med3D to segment intracranial hemorrhage on brain CT.

    python train.py --test                                   # check this machine (< 3 min on CPU)
    python train.py --train_csv train.csv --val_csv val.csv --mask_dir masks/ --checkpoint sam_med3d_turbo.pth
    python train.py --config sam3d/configs/sam3d_vit_b_ori.yaml --resume
    torchrun --nproc_per_node 2 train.py --config ...        # DDP (NCCL on GPUs, gloo on CPUs)

Outputs in --output_dir: best_model.pth, latest_model.pth, sam_encoder.pth, config.json,
training_summary_<timestamp>.json. The CSV format: docs/training.md; every flag: docs/cli.md.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from ich_engine.checkpoint import load_checkpoint
from ich_engine.cli import console_main
from ich_engine.config import parse_with_config
from ich_engine.run import is_main_process
from ich_engine.system_check import run_checks
from ich_engine.trainer import LATEST_CHECKPOINT, print_outcome
from sam3d.data.synthetic import make_synthetic_ich
from sam3d.export import ENCODER_FILE, load_exported_encoder
from sam3d.training import SegmentationTrainingConfig, run_training


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`SegmentationTrainingConfig` setting, plus ``--config`` and ``--test``."""
    return SegmentationTrainingConfig.parser(__doc__)


def system_check_run(output_dir: Path) -> str:
    """Tiny end-to-end run on generated data: forward, backward, AMP, accumulation, checkpoint save,
    reload, resume, export. W&B disabled."""
    os.environ["WANDB_MODE"] = "disabled"
    work = Path(tempfile.mkdtemp(prefix="system_check_", dir=output_dir))
    data = make_synthetic_ich(
        work / "data",
        num_cases=4,
        seed=0,
        val_fraction=0.25,
        spacing_mm=(3.0, 3.0, 5.0),
        positive_fraction=0.75,
        head_scale=0.5,
        progress=False,
    )
    config = SegmentationTrainingConfig(
        train_csv=str(data["train_csv"]),
        val_csv=str(data["val_csv"]),
        mask_dir=str(data["mask_dir"]),
        output_dir=str(work / "run"),
        model_type="small",
        epochs=1,
        batch_size=2,
        gradient_accumulation_steps=2,
        use_mixed_precision=True,
        num_workers=0,
        num_clicks=2,
        val_num_clicks=2,
        preprocessing={"target_spacing_mm": (3, 3, 3)},
        patience=1,
    )
    first = run_training(config)
    checkpoint = load_checkpoint(work / "run" / LATEST_CHECKPOINT)
    if checkpoint["epoch"] != 1 or not torch.isfinite(torch.tensor(first["history"][-1]["train_loss"])):
        raise RuntimeError(f"unexpected checkpoint after one epoch: epoch={checkpoint['epoch']}")
    resumed = run_training(config.replace(epochs=2, resume=True))
    encoder, projector, meta = load_exported_encoder(work / "run" / ENCODER_FILE)
    with torch.no_grad():
        tokens = projector(encoder(torch.zeros(1, 1, encoder.img_size, encoder.img_size, encoder.img_size)))
    return (
        f"2 epochs (1 + resumed 1), val Dice {resumed['history'][-1]['val_dice']:.3f}, "
        f"export {tuple(tokens.shape)} tokens, outputs in {work}"
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Configuration errors end as one line (exit 2) through ``ich_engine.cli.run_main``, before any data is read."""
    args = parse_with_config(build_parser(), argv)
    if args.test:
        output_dir = Path(args.output_dir)
        return 1 if run_checks(output_dir, [("end-to-end tiny training", lambda: system_check_run(output_dir))]) else 0
    config = SegmentationTrainingConfig.from_flags(args)
    for message in config.warnings():
        print(f"WARNING: {message}", file=sys.stderr)
    result = run_training(config)
    if is_main_process():
        print_outcome(result, "val Dice")
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
