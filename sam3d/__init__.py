"""SAM-Med3D fine-tuning for intracranial hemorrhage: model, CT data, clicks, prediction."""

from pathlib import Path

__version__ = "0.1.0"

# Shipped with the package (wheel included): the YAML configs and the stand-in pretrained weights.
CONFIG_DIR = Path(__file__).parent / "configs"
PRETRAINED_DIR = Path(__file__).parent / "pretrained"
