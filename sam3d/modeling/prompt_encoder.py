"""SAM-Med3D prompt encoder: clicks → sparse tokens, low-res mask → dense embedding."""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import nn

from .common import LayerNorm3d


class PositionEmbeddingRandom3D(nn.Module):
    """Random-Fourier positional encoding; output width is 3 x num_pos_feats ([sin, cos, sin])."""

    positional_encoding_gaussian_matrix: torch.Tensor  # a buffer (register_buffer), saved with the weights

    def __init__(self, num_pos_feats: int = 128, scale: float | None = None) -> None:
        super().__init__()
        scale = 1.0 if scale is None or scale <= 0.0 else scale
        self.register_buffer("positional_encoding_gaussian_matrix", scale * torch.randn((3, num_pos_feats)))

    def _pe_encoding(self, coords: torch.Tensor) -> torch.Tensor:
        """coords in [0, 1], (..., 3) → (..., 3 * num_pos_feats)."""
        coords = 2 * coords - 1
        coords = coords @ self.positional_encoding_gaussian_matrix
        coords = 2 * math.pi * coords
        # The released model was trained with sin repeated as the third block: keep it.
        return torch.cat([torch.sin(coords), torch.cos(coords), torch.sin(coords)], dim=-1)

    def forward(self, size: Sequence[int]) -> torch.Tensor:
        """Dense encoding of a grid, (C, *size).

        The stacking order (cumsum over dim 1, dim 0, dim 2) is the official one: a click at voxel
        (i, j, k) is compared with grid cell (j, i, k). The released weights learned this; keep it.
        """
        x, y, z = size
        grid = torch.ones((x, y, z), device=self.positional_encoding_gaussian_matrix.device, dtype=torch.float32)
        y_embed = (grid.cumsum(dim=0) - 0.5) / y
        x_embed = (grid.cumsum(dim=1) - 0.5) / x
        z_embed = (grid.cumsum(dim=2) - 0.5) / z
        pe = self._pe_encoding(torch.stack([x_embed, y_embed, z_embed], dim=-1))
        return pe.permute(3, 0, 1, 2)

    def forward_with_coords(self, coords_input: torch.Tensor, image_size: Sequence[int]) -> torch.Tensor:
        """Points in voxel units of the model input, (B, N, 3) → (B, N, C)."""
        scale = torch.tensor(image_size, dtype=torch.float32, device=coords_input.device)
        return self._pe_encoding(coords_input.float() / scale)


class PromptEncoder3D(nn.Module):
    """Encodes click prompts and mask prompts for the 3-D mask decoder.

    Points (B, N, 3) in input-voxel coordinates with labels (B, N) (1 positive, 0 negative, -1 padding)
    → sparse (B, N+1, C) (a padding point is appended, as SAM does when no box is given).
    Mask prompt: low-res logits (B, 1, 4*E, 4*E, 4*E) → dense (B, C, E, E, E); without one the learned
    ``no_mask_embed`` fills the grid.
    """

    def __init__(
        self,
        embed_dim: int,
        image_embedding_size: Sequence[int],
        input_image_size: Sequence[int],
        mask_in_chans: int = 16,
    ) -> None:
        super().__init__()
        self.embed_dim = embed_dim
        self.input_image_size = tuple(input_image_size)
        self.image_embedding_size = tuple(image_embedding_size)
        self.pe_layer = PositionEmbeddingRandom3D(embed_dim // 3)
        self.point_embeddings = nn.ModuleList(nn.Embedding(1, embed_dim) for _ in range(2))
        self.not_a_point_embed = nn.Embedding(1, embed_dim)
        self.mask_input_size = tuple(4 * s for s in image_embedding_size)
        self.mask_downscaling = nn.Sequential(
            nn.Conv3d(1, mask_in_chans // 4, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans // 4),
            nn.GELU(),
            nn.Conv3d(mask_in_chans // 4, mask_in_chans, kernel_size=2, stride=2),
            LayerNorm3d(mask_in_chans),
            nn.GELU(),
            nn.Conv3d(mask_in_chans, embed_dim, kernel_size=1),
        )
        self.no_mask_embed = nn.Embedding(1, embed_dim)

    def get_dense_pe(self) -> torch.Tensor:
        """Positional encoding of the image-embedding grid, (1, C, *E)."""
        return self.pe_layer(self.image_embedding_size).unsqueeze(0)

    def _embed_points(self, points: torch.Tensor, labels: torch.Tensor, pad: bool) -> torch.Tensor:
        points = points + 0.5  # voxel centres
        if pad:
            points = torch.cat([points, points.new_zeros((points.shape[0], 1, 3))], dim=1)
            labels = torch.cat([labels, -labels.new_ones((labels.shape[0], 1))], dim=1)
        embedding = self.pe_layer.forward_with_coords(points, self.input_image_size)
        labels = labels[..., None]
        negative, positive = self.point_embeddings
        assert isinstance(negative, nn.Embedding) and isinstance(positive, nn.Embedding)
        embedding = torch.where(labels == -1, self.not_a_point_embed.weight, embedding)
        embedding = embedding + torch.where(labels == 0, negative.weight, 0.0)
        embedding = embedding + torch.where(labels == 1, positive.weight, 0.0)
        return embedding

    def forward(
        self, points: tuple[torch.Tensor, torch.Tensor] | None, boxes: torch.Tensor | None, masks: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (sparse (B, N, C), dense (B, C, *E))."""
        if boxes is not None:
            raise NotImplementedError("SAM-Med3D has no box embeddings; give clicks or a mask prompt")
        if points is not None:
            batch = points[0].shape[0]
        elif masks is not None:
            batch = masks.shape[0]
        else:
            batch = 1
        device = self.no_mask_embed.weight.device
        sparse = torch.empty((batch, 0, self.embed_dim), device=device)
        if points is not None:
            coords, labels = points
            sparse = torch.cat([sparse, self._embed_points(coords, labels, pad=boxes is None)], dim=1)
        if masks is not None:
            dense = self.mask_downscaling(masks)
        else:
            dense = self.no_mask_embed.weight.reshape(1, -1, 1, 1, 1).expand(batch, -1, *self.image_embedding_size)
        return sparse, dense
