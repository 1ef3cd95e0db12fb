"""LAVIS BLIP-2 checkpoints → ``QFormerBridge`` weights.

    sam3d-convert-lavis --lavis ckpt.pth --output bridge.pth [--vision-width 384 ...]

An ``--output`` without a ``.pth``/``.pt``/``.bin`` suffix is written as a ``save_pretrained`` folder.
The key mapping, and which parts restart: ``blip.convert_lavis``.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Sequence

import torch

from blip.convert_lavis import load_lavis_into_bridge
from blip.qformer import QFormerBridge, QFormerBridgeConfig
from ich_engine.checkpoint import atomic_save
from ich_engine.cli import console_main
from ich_engine.config import CommandLineParser


def main(argv: Sequence[str] | None = None) -> int:
    parser = CommandLineParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lavis", required=True, help="LAVIS BLIP-2 checkpoint (.pth)")
    parser.add_argument(
        "--output", required=True, help="bridge.pth (torch file: model, config, notes) or a save_pretrained folder"
    )
    parser.add_argument("--seed", type=int, default=0, help="seed of the re-initialised interface weights")
    for field in dataclasses.fields(QFormerBridgeConfig):
        parser.add_argument(f"--{field.name.replace('_', '-')}", type=type(field.default), default=field.default)
    args = parser.parse_args(argv)

    fields = dataclasses.fields(QFormerBridgeConfig)
    config = QFormerBridgeConfig(**{field.name: getattr(args, field.name) for field in fields})
    torch.manual_seed(args.seed)
    bridge = QFormerBridge(config)
    notes = load_lavis_into_bridge(bridge, args.lavis)
    if os.path.splitext(args.output)[1] in (".pth", ".pt", ".bin"):
        atomic_save({"model": bridge.state_dict(), "config": config.to_dict(), "notes": notes}, args.output)
    else:
        bridge.save_pretrained(args.output)
    for note in notes:
        print(note)
    print(f"wrote {args.output}")
    return 0


console = console_main(main)

if __name__ == "__main__":
    sys.exit(console())
