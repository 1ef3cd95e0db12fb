#!/usr/bin/env python
"""Export the image encoder of a SAM-Med3D checkpoint as ``sam_encoder.pth`` for report generation.

    sam3d-export-encoder --checkpoint outputs/sam3d/best_model.pth --output outputs/sam3d/sam_encoder.pth
    sam3d-export-encoder --checkpoint sam_med3d_turbo.pth --model_type vit_b_ori --output sam_encoder.pth

Checkpoints written by train.py carry their model config and preprocessing; official ones need
--model_type (default vit_b_ori) and get the official preprocessing.
"""

from __future__ import annotations

import sys

from ich_engine.cli import console_main
from ich_engine.config import CommandLineParser
from sam3d.data.preprocessing import Preprocessing
from sam3d.export import export_encoder
from sam3d.modeling import load_trained_sam3d


def main(argv=None) -> int:
    p = CommandLineParser(description=__doc__)
    p.add_argument("--checkpoint", required=True)
    p.add_argument("--output", required=True)
    p.add_argument("--model_type", default=None, help="registry name when the checkpoint has no model_config")
    p.add_argument("--visual_tokens", type=int, default=256)
    p.add_argument("--seed", type=int, default=0, help="initialisation of the visual-token projection")
    args = p.parse_args(argv)

    model, meta = load_trained_sam3d(args.checkpoint, args.model_type)
    # Official checkpoints were trained with the official preprocessing, which is the default here.
    preprocessing = Preprocessing.from_checkpoint(meta, args.checkpoint)
    export_encoder(
        model, args.output, model.config, args.visual_tokens, preprocessing, source=args.checkpoint, seed=args.seed
    )
    print(
        f"exported image encoder ({sum(p.numel() for p in model.image_encoder.parameters()) / 1e6:.1f} M parameters) "
        f"to {args.output}"
    )
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
