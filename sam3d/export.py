"""Export of the fine-tuned image encoder for report generation (``sam_encoder.pth``).

Layout, as existing users load it::

    ckpt = torch.load("outputs/sam_encoder.pth")
    model.visual_encoder.load_state_dict(ckpt["image_encoder_state_dict"])

plus what is needed to rebuild the encoder and feed it correctly: the model config, the visual-token
projection, and the preprocessing the encoder was trained with.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import Any

import torch

from ich_engine.checkpoint import CheckpointError, atomic_save, load_checkpoint, load_state_dict_strict

from .data.preprocessing import Preprocessing
from .modeling.build import Sam3DConfig, build_image_encoder
from .modeling.image_encoder import ImageEncoderViT
from .modeling.sam3d import Sam3D
from .modeling.visual_tokens import VisualTokenProjector

EXPORT_FORMAT = "sam3d-encoder-v1"
ENCODER_FILE = "sam_encoder.pth"  # what train.py writes beside its checkpoints


def export_encoder(
    model: Sam3D,
    path: str | os.PathLike,
    config: Sam3DConfig,
    visual_tokens: int = 256,
    preprocessing: Preprocessing | Mapping[str, Any] | None = None,
    source: str | None = None,
    seed: int = 0,
) -> dict[str, Any]:
    """Write ``sam_encoder.pth`` atomically and return what was written."""
    generator_state = torch.random.get_rng_state()
    torch.manual_seed(seed)  # the projector's initialisation is reproducible per export
    projector = VisualTokenProjector(config.prompt_embed_dim, visual_tokens)
    torch.random.set_rng_state(generator_state)
    payload = {
        "format": EXPORT_FORMAT,
        "image_encoder_state_dict": {k: v.detach().cpu() for k, v in model.image_encoder.state_dict().items()},
        "visual_projection_state_dict": projector.state_dict(),
        "model_config": config.to_dict(),
        "visual_tokens": visual_tokens,
        "embedding_shape": [config.prompt_embed_dim] + [config.image_embedding_size] * 3,
        "preprocessing": Preprocessing.coerce(preprocessing).for_inference().to_dict(),
        "source_checkpoint": source,
    }
    atomic_save(payload, path)
    return payload


def load_exported_encoder(
    path: str | os.PathLike, map_location: str | torch.device = "cpu"
) -> tuple[ImageEncoderViT, VisualTokenProjector, dict[str, Any]]:
    """Rebuild the encoder and its projector from ``sam_encoder.pth``; returns (encoder, projector, metadata)."""
    payload = load_checkpoint(path, map_location=map_location)
    config = _checked_contract(payload, path)
    encoder = build_image_encoder(config)
    load_state_dict_strict(encoder, payload["image_encoder_state_dict"], f"{path} [image_encoder_state_dict]")
    projector = VisualTokenProjector(config.prompt_embed_dim, int(payload.get("visual_tokens", 256)))
    if "visual_projection_state_dict" in payload:
        load_state_dict_strict(
            projector, payload["visual_projection_state_dict"], f"{path} [visual_projection_state_dict]"
        )
    meta = {k: v for k, v in payload.items() if not k.endswith("state_dict")}
    return encoder, projector, meta


def check_exported_encoder(path: str | os.PathLike) -> None:
    """What :func:`load_exported_encoder` checks before building, read memory-mapped (the weights stay
    on disk): a command checks its encoder before any data is read."""
    _checked_contract(load_checkpoint(path, mmap=True), path)


def _checked_contract(payload: Any, path: str | os.PathLike) -> Sam3DConfig:
    """The export's model config, once it is an export whose preprocessing gives the input channels its
    patch embedding takes (a 3-window brain_window encoder exported with z-score preprocessing would
    fail inside its first convolution, without naming the file)."""
    missing = [k for k in ("image_encoder_state_dict", "model_config") if k not in payload]
    if missing:
        raise CheckpointError(f"{path} is not an encoder export: missing {missing} (found {sorted(payload)})")
    config = Sam3DConfig.from_dict(payload["model_config"])
    preprocessing = Preprocessing.from_checkpoint(payload, str(path))
    if preprocessing.num_input_channels != config.in_chans:
        raise CheckpointError(
            f"{path}: the encoder takes {config.in_chans} input channel(s), but the preprocessing exported "
            f"with it (normalization {preprocessing.normalization!r}"
            + (
                f", hu_windows {list(map(list, preprocessing.hu_windows))}"
                if preprocessing.normalization == "brain_window"
                else ""
            )
            + f") gives {preprocessing.num_input_channels}; export it again with the preprocessing it was trained with"
        )
    return config
