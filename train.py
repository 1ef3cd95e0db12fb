#!/usr/bin/env python
"""SAM-Med3D fine-tuning, started as SAM-Med3D users start it: ``python train.py --test`` checks the
machine, ``python train.py --config sam3d/configs/sam3d_vit_b_ori.yaml ...`` trains. The same command
is installed as ``sam3d-train``; its code is ``sam3d/cli/train.py``."""

import sys

from sam3d.cli.train import console

if __name__ == "__main__":
    sys.exit(console())
