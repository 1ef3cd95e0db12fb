"""Train the BLIP-2 report model on the shared engine.

    sam3d-report-train --config sam3d/configs/blip_tiny_ct.yaml --train_manifest train.jsonl --val_manifest val.jsonl \\
        --encoder outputs/sam3d/sam_encoder.pth
    sam3d-report-train --config ... --resume                       # continue from output_dir/latest_model.pth

Manifests are ``blip.data.reports`` CSV/JSONL files (columns image, report, modality ...). Without
``--val_manifest`` both sets come from the ``split`` column of ``--train_manifest``. Without ``--lm`` a
tiny GPT-2 (tokenizer trained on the training reports) is built into ``output_dir/lm`` and reused on resume.

CT and X-ray in one run: a manifest may mix modalities. The model then gets both towers (the CT one
from ``--encoder`` / ``--ct_model_type``, the X-ray one from ``--xray_encoder`` / ``--xray_model_type``)
sharing one Q-Former and LM, each modality with its own prompt; every batch holds one modality, and
validation covers both (``val_loss`` over all studies, ``val_loss_ct`` / ``val_loss_xray`` per modality).
A tower loaded from a checkpoint (``--encoder``, ``--xray_encoder``) stays fixed and a randomly
initialised one trains, unless ``--freeze_vision`` / ``--no-freeze_vision`` (both towers) or
``--freeze_ct_tower`` / ``--freeze_xray_tower`` (or their ``--no-`` forms, per tower) say otherwise. The
fixed pretrained tower is BLIP-2's recipe: the report loss alone teaches a tower little before it has
taught the Q-Former to read it (what joint training from the first step did here:
docs/report_generation.md). ``--diagnosis_prompt`` adds a findings head on the tower's tokens whose
labels lead each prompt (``blip.diagnosis``).

BLIP-2's two stages: ``--stage 1`` trains the Q-Former alone with ITC, ITM and ITG (``blip.training.stage1``;
no language model runs) and writes the bridge to ``output_dir/qformer`` (``QFormerBridge.save_pretrained``
plus the stage-1 heads); ``--init_from <that folder>`` starts a run's bridge from it: stage 2 behind the
LM, or more stage 1 on other data (heads included). ``--stage 2`` without ``--init_from`` starts from a
fresh bridge.

Outputs in --output_dir: best_model.pth, latest_model.pth (engine checkpoints), report_model/
(``Blip2ReportModel.save_pretrained`` of the best model; stage 1: qformer/, the bridge and heads),
val_samples.json (generated reports of the
latest validation), attention/<id>_attention.png (Q-Former cross-attention over the image of the first
validation study of each modality), config.json, training_summary_<timestamp>.json.
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
