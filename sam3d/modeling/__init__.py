from .build import (
    MODEL_CONFIGS,
    Sam3DConfig,
    build_sam3d,
    load_sam3d_weights,
    load_trained_sam3d,
    model_config,
    sam_model_registry3D,
)
from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D
from .sam3d import Sam3D

__all__ = [
    "ImageEncoderViT",
    "MODEL_CONFIGS",
    "MaskDecoder3D",
    "PromptEncoder3D",
    "Sam3D",
    "Sam3DConfig",
    "build_sam3d",
    "load_sam3d_weights",
    "load_trained_sam3d",
    "model_config",
    "sam_model_registry3D",
]
