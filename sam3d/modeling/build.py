"""Builder registry for SAM-Med3D models and loading of their checkpoints.

Each registry entry fixes the hyperparameters of one model, as segment-anything's ``build_sam`` does.
``vit_b_ori`` is the released SAM-Med3D / SAM-Med3D-turbo architecture; ``tiny`` is the small case of
the parity fixture; ``small`` is the CPU-friendly configuration used by the demo and the system check.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from ich_engine.checkpoint import CheckpointError, extract_state_dict, load_checkpoint, load_state_dict_strict
from ich_engine.config import from_known_keys

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .sam3d import Sam3D


@dataclass
class Sam3DConfig:
    """Every hyperparameter of the official constructor; defaults are ``vit_b_ori``."""

    img_size: int = 128
    patch_size: int = 16
    in_chans: int = 1
    encoder_embed_dim: int = 768
    encoder_depth: int = 12
    encoder_num_heads: int = 12
    mlp_ratio: float = 4.0
    window_size: int = 14
    global_attn_indexes: tuple[int, ...] = (2, 5, 8, 11)
    use_rel_pos: bool = True
    use_abs_pos: bool = True
    qkv_bias: bool = True
    norm_eps: float = 1e-6
    prompt_embed_dim: int = 384
    mask_in_chans: int = 16
    decoder_depth: int = 2
    decoder_num_heads: int = 8
    decoder_mlp_dim: int = 2048
    attention_downsample_rate: int = 2
    num_multimask_outputs: int = 3
    iou_head_depth: int = 3
    iou_head_hidden_dim: int = 256
    use_sdpa: bool = field(default=True, metadata={"help": "fused attention kernel (same outputs)"})
    window_attention: str = field(
        default="padding_free",
        metadata={
            "help": "'padding_free' (same outputs, real tokens only) or 'reference' (the official padded windows)"
        },
    )

    def __post_init__(self) -> None:
        self.global_attn_indexes = tuple(int(i) for i in self.global_attn_indexes)
        if self.prompt_embed_dim % 3:
            raise ValueError(f"prompt_embed_dim {self.prompt_embed_dim} must be divisible by 3 (3-D Fourier PE)")
        if self.encoder_embed_dim % self.encoder_num_heads:
            raise ValueError(
                f"encoder_embed_dim {self.encoder_embed_dim} not divisible by {self.encoder_num_heads} heads"
            )

    @property
    def image_embedding_size(self) -> int:
        return self.img_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        d = dataclasses.asdict(self)
        d["global_attn_indexes"] = list(self.global_attn_indexes)
        return d

    @classmethod
    def from_dict(cls, values: Mapping[str, Any]) -> Sam3DConfig:
        return from_known_keys(cls, values)


def build_image_encoder(config: Sam3DConfig) -> ImageEncoderViT:
    return ImageEncoderViT(
        spatial_dims=3,
        img_size=config.img_size,
        patch_size=config.patch_size,
        in_chans=config.in_chans,
        embed_dim=config.encoder_embed_dim,
        depth=config.encoder_depth,
        num_heads=config.encoder_num_heads,
        mlp_ratio=config.mlp_ratio,
        out_chans=config.prompt_embed_dim,
        qkv_bias=config.qkv_bias,
        norm_eps=config.norm_eps,
        use_abs_pos=config.use_abs_pos,
        use_rel_pos=config.use_rel_pos,
        window_size=config.window_size,
        global_attn_indexes=config.global_attn_indexes,
        use_sdpa=config.use_sdpa,
        window_attention=config.window_attention,
    )


def build_from_config(config: Sam3DConfig) -> Sam3D:
    grid = config.image_embedding_size
    return Sam3D(
        image_encoder=build_image_encoder(config),
        prompt_encoder=PromptEncoder3D(
            embed_dim=config.prompt_embed_dim,
            image_embedding_size=(grid,) * 3,
            input_image_size=(config.img_size,) * 3,
            mask_in_chans=config.mask_in_chans,
        ),
        mask_decoder=MaskDecoder3D(
            transformer_dim=config.prompt_embed_dim,
            num_multimask_outputs=config.num_multimask_outputs,
            transformer_depth=config.decoder_depth,
            transformer_num_heads=config.decoder_num_heads,
            transformer_mlp_dim=config.decoder_mlp_dim,
            attention_downsample_rate=config.attention_downsample_rate,
            iou_head_depth=config.iou_head_depth,
            iou_head_hidden_dim=config.iou_head_hidden_dim,
        ),
    )


MODEL_CONFIGS: dict[str, Callable[[], Sam3DConfig]] = {
    "vit_b_ori": lambda: Sam3DConfig(),
    "tiny": lambda: Sam3DConfig(
        img_size=64,
        encoder_embed_dim=96,
        encoder_depth=4,
        encoder_num_heads=4,
        global_attn_indexes=(1, 3),
        prompt_embed_dim=48,
    ),
    # Patch 8 keeps an 8^3 token grid at 64^3 input, the released model's grid, at CPU cost; window 0:
    # every block attends globally (the demo's and the tests' models were trained so).
    "small": lambda: Sam3DConfig(
        img_size=64,
        patch_size=8,
        encoder_embed_dim=96,
        encoder_depth=4,
        encoder_num_heads=4,
        window_size=0,
        global_attn_indexes=(),
        prompt_embed_dim=96,
        decoder_mlp_dim=256,
    ),
}


def model_config(model_type: str, **overrides: Any) -> Sam3DConfig:
    """Registry config by name, with optional overrides of any field."""
    if model_type not in MODEL_CONFIGS:
        raise KeyError(f"unknown model_type '{model_type}'; choose one of {sorted(MODEL_CONFIGS)}")
    config = MODEL_CONFIGS[model_type]()
    return dataclasses.replace(config, **overrides) if overrides else config


def load_sam3d_weights(model: Sam3D, checkpoint: str | os.PathLike) -> None:
    """Strictly load official or own checkpoints: ``{'model_state_dict': ...}``, a bare state dict,
    with or without DDP's ``module.`` prefix."""
    state = extract_state_dict(load_checkpoint(checkpoint), checkpoint)
    load_state_dict_strict(model, state, str(checkpoint))


def build_sam3d(model_type: str | Sam3DConfig = "vit_b_ori", checkpoint: str | os.PathLike | None = None) -> Sam3D:
    """Build a registry model (or one from an explicit config) and optionally load a checkpoint."""
    config = model_type if isinstance(model_type, Sam3DConfig) else model_config(model_type)
    model = build_from_config(config)
    model.config = config
    if checkpoint is not None:
        load_sam3d_weights(model, checkpoint)
    return model


def load_trained_sam3d(checkpoint: str | os.PathLike, model_type: str | None = None) -> tuple[Sam3D, dict[str, Any]]:
    """A model from a checkpoint of this toolkit (its config travels inside) or an official one
    (``model_type`` names the architecture, default ``vit_b_ori``). Returns (model, checkpoint
    metadata such as ``preprocessing``; for official checkpoints only the input size)."""
    payload = load_checkpoint(checkpoint)
    if isinstance(payload, Mapping) and "image_encoder_state_dict" in payload:
        raise CheckpointError(
            f"{checkpoint}: an exported encoder (sam_encoder.pth: image encoder and visual "
            "projection only); segmentation needs the training checkpoint (best_model.pth) or an "
            "official SAM-Med3D checkpoint"
        )
    own = isinstance(payload, Mapping) and "model_config" in payload and model_type is None
    config = Sam3DConfig.from_dict(payload["model_config"]) if own else model_config(model_type or "vit_b_ori")
    model = build_from_config(config)
    model.config = config
    load_state_dict_strict(model, extract_state_dict(payload, checkpoint), str(checkpoint))
    meta = {k: payload[k] for k in ("preprocessing", "model_type", "epoch", "best_metric") if own and k in payload}
    # The contract's roi_size is the model's input cube: one value, the architecture's (an official
    # checkpoint, or one run as another model_type, brings no contract that could say otherwise).
    meta["preprocessing"] = {**meta.get("preprocessing", {}), "roi_size": [config.img_size] * 3}
    return model, meta


sam_model_registry3D = {name: (lambda checkpoint=None, _n=name: build_sam3d(_n, checkpoint)) for name in MODEL_CONFIGS}
