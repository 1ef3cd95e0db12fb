"""Projection of encoder tokens to the width report generation consumes (``--visual_tokens``)."""

from __future__ import annotations

import torch
from torch import nn


class VisualTokenProjector(nn.Module):
    """(B, C, *E) image embedding → (B, prod(E), visual_tokens) token sequence.

    Segmentation does not train it; it is exported beside the encoder as the starting point of the
    report model's vision-to-language bridge, so both sides agree on the token width.
    """

    def __init__(self, in_dim: int, visual_tokens: int = 256) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(in_dim)
        self.proj = nn.Linear(in_dim, visual_tokens)

    def forward(self, image_embeddings: torch.Tensor) -> torch.Tensor:
        tokens = image_embeddings.flatten(2).transpose(1, 2)
        return self.proj(self.norm(tokens))
