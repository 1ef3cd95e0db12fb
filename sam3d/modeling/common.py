"""Layers shared by the encoder, prompt encoder and mask decoder (2-D and 3-D)."""

from __future__ import annotations

import torch
from torch import nn


class LayerNormNd(nn.Module):
    """LayerNorm over the channel axis of a channels-first tensor (B, C, *spatial).

    Same computation and parameter names (``weight``, ``bias``) as segment-anything's LayerNorm2d and
    SAM-Med3D's LayerNorm3d, so official checkpoints load unchanged.
    """

    def __init__(self, num_channels: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(1, keepdim=True)
        var = (x - mean).pow(2).mean(1, keepdim=True)
        x = (x - mean) / torch.sqrt(var + self.eps)
        shape = (1, -1) + (1,) * (x.dim() - 2)
        return self.weight.view(shape) * x + self.bias.view(shape)


# The official code names them after the dimensionality; both are the same layer here.
LayerNorm2d = LayerNormNd
LayerNorm3d = LayerNormNd


class MLPBlock(nn.Module):
    """Transformer feed-forward block: Linear → activation → Linear (keys ``lin1``, ``lin2``)."""

    def __init__(self, embedding_dim: int, mlp_dim: int, act: type[nn.Module] = nn.GELU) -> None:
        super().__init__()
        self.lin1 = nn.Linear(embedding_dim, mlp_dim)
        self.lin2 = nn.Linear(mlp_dim, embedding_dim)
        self.act = act()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin2(self.act(self.lin1(x)))


def conv_nd(spatial_dims: int) -> type[nn.Module]:
    """``nn.Conv2d`` or ``nn.Conv3d``; the encoder is one implementation for X-rays and CT."""
    if spatial_dims not in (2, 3):
        raise ValueError(f"spatial_dims must be 2 or 3, got {spatial_dims}")
    return nn.Conv2d if spatial_dims == 2 else nn.Conv3d
