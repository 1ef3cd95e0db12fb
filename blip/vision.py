"""Vision towers of the report model: the SAM ViT encoders, 3-D for head CT and 2-D for chest X-ray.

Both towers are ``sam3d.modeling.image_encoder.ImageEncoderViT`` itself (no wrapper), so that
checkpoints keep their official key layout and the exported CT encoder loads the way users do it::

    model.visual_encoder.load_state_dict(torch.load("outputs/sam_encoder.pth")["image_encoder_state_dict"])

Tokens handed to the Q-Former are the neck output flattened: (B, C, *grid) → (B, prod(grid), C), i.e.
(B, 512, 384) for SAM-Med3D ``vit_b_ori`` (128^3 input) and (B, 4096, 256) for SAM ``vit_b`` (1024^2).

Kinds:

- ``sam3d``: built from an exported ``sam_encoder.pth`` (``sam3d.export``; architecture and
  preprocessing travel inside) or from a ``sam3d.modeling`` registry name (``vit_b_ori``, ``tiny``,
  ``small``) with random weights.
- ``sam2d``: segment-anything's image encoder; ``vit_b`` fixes the ``sam_vit_b`` hyperparameters and
  loads ``sam_vit_b_01ec64.pth`` (keys ``image_encoder.*``; prompt encoder and mask decoder are
  ignored with a note). ``tiny`` is a CPU-sized configuration for tests.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ich_engine.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, load_state_dict_strict
from ich_engine.config import from_known_keys
from sam3d.data.preprocessing import Preprocessing
from sam3d.export import load_exported_encoder
from sam3d.modeling.build import Sam3DConfig, build_image_encoder, model_config
from sam3d.modeling.image_encoder import ImageEncoderViT

VISION_KINDS = ("sam3d", "sam2d")

# ImageEncoderViT keyword arguments of the 2-D encoders; ``vit_b`` is segment-anything's ``sam_vit_b``.
SAM2D_CONFIGS: dict[str, dict[str, Any]] = {
    "vit_b": {
        "img_size": 1024,
        "patch_size": 16,
        "in_chans": 3,
        "embed_dim": 768,
        "depth": 12,
        "num_heads": 12,
        "out_chans": 256,
        "window_size": 14,
        "global_attn_indexes": [2, 5, 8, 11],
    },
    "tiny": {
        "img_size": 64,
        "patch_size": 16,
        "in_chans": 3,
        "embed_dim": 48,
        "depth": 2,
        "num_heads": 2,
        "out_chans": 32,
        "window_size": 2,
        "global_attn_indexes": [1],
    },
}

# segment-anything's pixel statistics (ImageNet, 0-255 scale): the 2-D encoder was trained on them.
SAM2D_PIXEL_MEAN = (123.675, 116.28, 103.53)
SAM2D_PIXEL_STD = (58.395, 57.12, 57.375)
SAM2D_CHECKPOINT_PREFIX = "image_encoder."


@dataclass
class VisionTowerConfig:
    """One tower. ``encoder_config`` (the full constructor arguments) is filled in when the tower is
    built, so a saved report model rebuilds its towers without the original checkpoint files;
    ``preprocessing`` is the exported CT encoder's (``sam3d.data.transforms`` config)."""

    kind: str = "sam3d"
    model_type: str = "small"
    checkpoint: str | None = None
    freeze: bool = False
    encoder_config: dict[str, Any] | None = None
    preprocessing: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.kind not in VISION_KINDS:
            raise ValueError(f"vision tower kind must be one of {VISION_KINDS}, got '{self.kind}'")

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> VisionTowerConfig:
        return from_known_keys(cls, values)


@dataclass
class VisionTower:
    """A built tower: the encoder, its resolved config and notes on what loading skipped."""

    encoder: ImageEncoderViT
    config: VisionTowerConfig
    notes: list[str] = field(default_factory=list)


def tower_width(encoder: ImageEncoderViT) -> int:
    """Channels of the neck output, the width of every token."""
    first = encoder.neck[0]
    assert isinstance(first, (nn.Conv2d, nn.Conv3d))  # the neck starts with a 1x1 convolution (conv_nd)
    return first.out_channels


def encoder_tokens(encoder: ImageEncoderViT, images: torch.Tensor) -> torch.Tensor:
    """(B, in_chans, *img) → (B, prod(grid), C): the neck output as a token sequence."""
    return encoder(images).flatten(2).transpose(1, 2)


def build_vision_tower(config: VisionTowerConfig) -> VisionTower:
    """Build (and load) a tower. Precedence: ``checkpoint`` when it is a file to read, else
    ``encoder_config`` (rebuilding a saved model), else the registry ``model_type``."""
    notes: list[str] = []
    config = dataclasses.replace(config)
    if config.kind == "sam3d":
        if config.checkpoint:
            encoder, _, meta = load_exported_encoder(config.checkpoint)
            config.encoder_config = dict(meta["model_config"])
            config.preprocessing = Preprocessing.from_checkpoint(meta, str(config.checkpoint)).to_dict()
            notes.append(f"CT tower: loaded {config.checkpoint} ({meta.get('format', 'unknown format')})")
        else:
            sam3d_config = (
                Sam3DConfig.from_dict(config.encoder_config)
                if config.encoder_config
                else model_config(config.model_type)
            )
            encoder = build_image_encoder(sam3d_config)
            config.encoder_config = sam3d_config.to_dict()
    else:
        if config.encoder_config is None:
            if config.model_type not in SAM2D_CONFIGS:
                raise KeyError(f"unknown sam2d model_type '{config.model_type}'; choose one of {sorted(SAM2D_CONFIGS)}")
            config.encoder_config = dict(SAM2D_CONFIGS[config.model_type])
        encoder = ImageEncoderViT(spatial_dims=2, **config.encoder_config)
        if config.checkpoint:
            notes += load_sam2d_checkpoint(encoder, config.checkpoint)
    if config.freeze:
        encoder.requires_grad_(False)
    return VisionTower(encoder, config, notes)


def load_sam2d_checkpoint(encoder: ImageEncoderViT, path: str | os.PathLike) -> list[str]:
    """Strictly load the ``image_encoder.*`` weights of a segment-anything checkpoint (e.g.
    ``sam_vit_b_01ec64.pth``, a bare state dict); returns a note on the keys it ignored."""
    state = extract_state_dict(load_checkpoint(path), path)
    ours = {k[len(SAM2D_CHECKPOINT_PREFIX) :]: v for k, v in state.items() if k.startswith(SAM2D_CHECKPOINT_PREFIX)}
    if not ours:
        raise CheckpointError(
            f"{path}: no '{SAM2D_CHECKPOINT_PREFIX}*' keys, not a segment-anything checkpoint "
            f"(first keys: {sorted(state)[:5]})"
        )
    load_state_dict_strict(encoder, ours, f"{path} [{SAM2D_CHECKPOINT_PREFIX}*]")
    ignored = sorted({k.split(".")[0] for k in state if not k.startswith(SAM2D_CHECKPOINT_PREFIX)})
    notes = [f"X-ray tower: loaded {len(ours)} tensors from {path}"]
    if ignored:
        notes.append(f"X-ray tower: ignored the parts {ignored} of {path} (not used for reports)")
    return notes
