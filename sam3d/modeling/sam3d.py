"""Sam3D: the assembly of image encoder, prompt encoder and mask decoder."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from .image_encoder import ImageEncoderViT
from .mask_decoder import MaskDecoder3D
from .prompt_encoder import PromptEncoder3D

if TYPE_CHECKING:
    from .build import Sam3DConfig


class Sam3D(nn.Module):
    """SAM-Med3D. The encoder runs once per scan; the light decoder runs once per click round.

    State-dict keys are the official ones (``image_encoder.*``, ``prompt_encoder.*``, ``mask_decoder.*``).
    """

    config: Sam3DConfig  # the architecture it was built from; set by build_sam3d and load_trained_sam3d

    def __init__(
        self, image_encoder: ImageEncoderViT, prompt_encoder: PromptEncoder3D, mask_decoder: MaskDecoder3D
    ) -> None:
        super().__init__()
        self.image_encoder = image_encoder
        self.prompt_encoder = prompt_encoder
        self.mask_decoder = mask_decoder

    @property
    def img_size(self) -> int:
        return self.image_encoder.img_size

    def decode(
        self,
        image_embeddings: torch.Tensor,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """One click round.

        image_embeddings (B, C, *E); points (B, N, 3) in input-voxel coordinates with labels (B, N);
        mask_inputs (B, 1, *4E) previous low-res logits. Returns low-res logits (B, 1, *4E), IoU (B, 1).
        """
        sparse, dense = self.prompt_encoder(
            points=None if points is None else (points, labels), boxes=None, masks=mask_inputs
        )
        if points is None and mask_inputs is None and image_embeddings.shape[0] > 1:
            sparse = sparse.expand(image_embeddings.shape[0], -1, -1)
            dense = dense.expand(image_embeddings.shape[0], -1, -1, -1, -1)
        return self.mask_decoder(
            image_embeddings=image_embeddings,
            image_pe=self.prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse.to(image_embeddings.dtype),
            dense_prompt_embeddings=dense.to(image_embeddings.dtype),
            multimask_output=False,
        )

    def upsample_logits(self, low_res_logits: torch.Tensor) -> torch.Tensor:
        """Low-res logits (B, 1, *4E) → logits at the input size, trilinear as in SAM-Med3D."""
        return F.interpolate(low_res_logits, size=(self.img_size,) * 3, mode="trilinear", align_corners=False)

    def forward(
        self,
        images: torch.Tensor,
        points: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        mask_inputs: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """images (B, 1, S, S, S) → (logits (B, 1, S, S, S), IoU (B, 1)) for one click round."""
        low_res, iou = self.decode(self.image_encoder(images), points, labels, mask_inputs)
        return self.upsample_logits(low_res), iou
