"""Train the BLIP-2 report model on the shared engine.

    sam3d-report-train --config sam3d/configs/blip_tiny_ct.yaml --train_manifest train.jsonl --val_manifest val.jsonl \\
        --encoder outputs/sam3d/sam_encoder.pth
    sam3d-report-train --config ... --resume                       # continue from output_dir/latest_model.pth

Every flag is a setting of ``blip.training.train.ReportTrainingConfig`` (what each does, and the outputs in
--output_dir: that module's documentation and docs/report_generation.md); ``blip.training.train.run_training``
runs the same from Python.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from blip.data.reports import split_sections
from blip.training.train import ReportTrainingConfig, run_training
from ich_engine.cli import console_main
from ich_engine.config import parse_with_config
from ich_engine.run import is_main_process
from ich_engine.trainer import print_outcome


def build_parser() -> argparse.ArgumentParser:
    """One flag per :class:`ReportTrainingConfig` setting, plus ``--config``."""
    return ReportTrainingConfig.parser(__doc__)


def main(argv: Sequence[str] | None = None) -> int:
    """Configuration errors end as one line (exit 2) through ``ich_engine.cli.run_main``, before any data is read."""
    config = ReportTrainingConfig.from_flags(parse_with_config(build_parser(), argv))
    for message in config.warnings():
        print(f"WARNING: {message}", file=sys.stderr)
    result = run_training(config)
    if is_main_process():
        for sample in result.get("samples", []):
            findings, impression = split_sections(sample["generated"])
            context = f"  measurements given: {sample['context']}\n" if sample["context"] else ""
            context += f"  predicted: {sample['diagnosis']}\n" if sample["diagnosis"] else ""
            print(
                f"sample {sample['id']} ({sample['modality']})\n{context}  reference: {sample['reference']}\n"
                f"  generated: {sample['generated']}\n  findings: {findings}\n  impression: {impression}\n"
                f"  cross-attention: {sample['attention_overlay']}"
            )
        print_outcome(result, "val loss")
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
