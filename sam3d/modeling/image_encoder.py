"""SAM ViT image encoder for 3-D volumes (SAM-Med3D) and 2-D images (segment-anything).

One implementation serves both: ``spatial_dims=3`` reproduces SAM-Med3D's ``ImageEncoderViT3D``
(keys ``rel_pos_d/h/w``), ``spatial_dims=2`` segment-anything's ``ImageEncoderViT`` (``rel_pos_h/w``).
Tokens are kept channels-last, (B, *grid, C), as in the official code, so that the absolute position
embedding (1, *grid, C) and the window partition index the same way.
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .common import LayerNormNd, MLPBlock, conv_nd

REL_POS_AXES = {2: ("h", "w"), 3: ("d", "h", "w")}


class PatchEmbed(nn.Module):
    """Non-overlapping patches by a strided convolution: (B, C_in, *S) → (B, *S/patch, C)."""

    def __init__(self, spatial_dims: int, patch_size: int, in_chans: int, embed_dim: int) -> None:
        super().__init__()
        self.proj = conv_nd(spatial_dims)(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).movedim(1, -1)


def get_rel_pos(q_size: int, k_size: int, rel_pos: torch.Tensor) -> torch.Tensor:
    """Relative position embeddings (q_size, k_size, C) for one axis, resized if the table is shorter."""
    max_rel_dist = int(2 * max(q_size, k_size) - 1)
    if rel_pos.shape[0] != max_rel_dist:
        rel_pos = F.interpolate(
            rel_pos.reshape(1, rel_pos.shape[0], -1).permute(0, 2, 1), size=max_rel_dist, mode="linear"
        )
        rel_pos = rel_pos.reshape(-1, max_rel_dist).permute(1, 0)
    q_coords = torch.arange(q_size, device=rel_pos.device)[:, None] * max(k_size / q_size, 1.0)
    k_coords = torch.arange(k_size, device=rel_pos.device)[None, :] * max(q_size / k_size, 1.0)
    relative_coords = (q_coords - k_coords) + (k_size - 1) * max(q_size / k_size, 1.0)
    return rel_pos[relative_coords.long()]


def decomposed_rel_pos_bias(
    q: torch.Tensor, rel_pos: Sequence[torch.Tensor], q_size: Sequence[int], k_size: Sequence[int]
) -> torch.Tensor:
    """Additive attention bias of MViTv2's decomposed relative positions, one term per axis.

    q: (B*heads, N_q, C). Returns (B*heads, N_q, N_k).

    2-D follows segment-anything. 3-D follows SAM-Med3D, whose broadcasting is not the textbook one:
    the depth term varies along the key's w axis, the height and width terms are indexed by the key's
    d and h positions in place of the query's w position. It only type-checks for cubic grids, and the
    released weights were trained with it, so it is reproduced here exactly.
    """
    letters = "xyz"[: len(q_size)]
    batch, _, dim = q.shape
    r_q = q.reshape(batch, *q_size, dim)
    rel = [
        torch.einsum(f"b{letters}c,{letters[axis]}kc->b{letters}k", r_q, get_rel_pos(q_size[axis], k_size[axis], table))
        for axis, table in enumerate(rel_pos)
    ]
    if len(q_size) == 2:
        bias = rel[0][:, :, :, :, None] + rel[1][:, :, :, None, :]
    else:
        if len(set(q_size)) != 1 or tuple(q_size) != tuple(k_size):
            raise ValueError(f"SAM-Med3D relative positions need a cubic token grid, got {tuple(q_size)}")
        bias = rel[0][:, :, :, :, None, None] + rel[1][:, :, :, None, :, None] + rel[2][:, :, :, None, None, :]
    return bias.reshape(batch, math.prod(q_size), math.prod(k_size))


class Attention(nn.Module):
    """Multi-head self-attention with optional decomposed relative position bias."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        qkv_bias: bool,
        use_rel_pos: bool,
        input_size: Sequence[int] | None,
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.scale = head_dim**-0.5
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)
        self.use_rel_pos = use_rel_pos
        self.use_sdpa = use_sdpa
        if use_rel_pos:
            if input_size is None:
                raise ValueError("input_size is required when use_rel_pos is True")
            axes = REL_POS_AXES[len(input_size)]
            for name, size in zip(axes, input_size):
                self.register_parameter(f"rel_pos_{name}", nn.Parameter(torch.zeros(2 * size - 1, head_dim)))
            self.rel_pos_names = tuple(f"rel_pos_{name}" for name in axes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, *grid, _ = x.shape
        tokens = math.prod(grid)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)
        bias = None
        if self.use_rel_pos:
            tables = [getattr(self, name) for name in self.rel_pos_names]
            bias = decomposed_rel_pos_bias(q, tables, grid, grid)
        if self.use_sdpa:
            # The fused kernel never keeps the softmax matrix for backward; the bias is still N x N.
            out = F.scaled_dot_product_attention(
                q, k, v, attn_mask=None if bias is None else bias.to(q.dtype), scale=self.scale
            )
        else:
            attn = (q * self.scale) @ k.transpose(-2, -1)
            if bias is not None:
                attn = attn + bias
            out = attn.softmax(dim=-1) @ v
        out = out.view(batch, self.num_heads, *grid, -1).movedim(1, -2).reshape(batch, *grid, -1)
        return self.proj(out)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad (B, *grid, C) to multiples of window_size and split into windows (B*n, *window, C).

    The padded tokens take part in attention, exactly as in the official code: with SAM-Med3D's
    8^3 grid and window 14 the whole grid becomes one 14^3 window of which 2232 tokens are padding.
    """
    batch, *grid, channels = x.shape
    n = len(grid)
    pads = [(window_size - s % window_size) % window_size for s in grid]
    if any(pads):
        pad_arg: list[int] = [0, 0]
        for p in reversed(pads):
            pad_arg += [0, p]
        x = F.pad(x, pad_arg)
    padded = [s + p for s, p in zip(grid, pads)]
    view = [batch]
    for s in padded:
        view += [s // window_size, window_size]
    x = x.view(*view, channels)
    order = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [1 + 2 * n]
    windows = x.permute(*order).contiguous().view(-1, *([window_size] * n), channels)
    return windows, tuple(padded)


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded: Sequence[int], grid: Sequence[int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`, dropping the padding: (B*n, *window, C) → (B, *grid, C)."""
    n = len(grid)
    counts = [s // window_size for s in padded]
    batch = windows.shape[0] // math.prod(counts)
    x = windows.view(batch, *counts, *([window_size] * n), -1)
    order = [0]
    for i in range(n):
        order += [1 + i, 1 + n + i]
    order.append(1 + 2 * n)
    x = x.permute(*order).contiguous().view(batch, *padded, -1)
    return x[(slice(None),) + tuple(slice(0, s) for s in grid)].contiguous()


class Block(nn.Module):
    """Pre-norm transformer block with window (window_size > 0) or global attention."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float,
        qkv_bias: bool,
        norm_eps: float,
        use_rel_pos: bool,
        window_size: int,
        input_size: Sequence[int],
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        attn_size = [window_size] * len(input_size) if window_size > 0 else list(input_size)
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, attn_size, use_sdpa)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0:
            grid = x.shape[1:-1]
            x, padded = window_partition(x, self.window_size)
            x = window_unpartition(self.attn(x), self.window_size, padded, grid)
        else:
            x = self.attn(x)
        x = shortcut + x
        return x + self.mlp(self.norm2(x))


class ImageEncoderViT(nn.Module):
    """ViT backbone + convolutional neck: (B, in_chans, *img) → (B, out_chans, *img/patch).

    For SAM-Med3D ``vit_b_ori``: (B, 1, 128, 128, 128) → (B, 384, 8, 8, 8).
    """

    def __init__(
        self,
        spatial_dims: int = 3,
        img_size: int = 128,
        patch_size: int = 16,
        in_chans: int = 1,
        embed_dim: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        out_chans: int = 384,
        qkv_bias: bool = True,
        norm_eps: float = 1e-6,
        use_abs_pos: bool = True,
        use_rel_pos: bool = True,
        window_size: int = 14,
        global_attn_indexes: Sequence[int] = (2, 5, 8, 11),
        use_sdpa: bool = True,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"img_size {img_size} is not a multiple of patch_size {patch_size}")
        bad = [i for i in global_attn_indexes if not 0 <= i < depth]
        if bad:
            raise ValueError(f"global_attn_indexes {bad} outside the {depth} encoder blocks")
        self.spatial_dims = spatial_dims
        self.img_size = img_size
        self.grid_size = (img_size // patch_size,) * spatial_dims
        self.patch_embed = PatchEmbed(spatial_dims, patch_size, in_chans, embed_dim)
        self.pos_embed = nn.Parameter(torch.zeros(1, *self.grid_size, embed_dim)) if use_abs_pos else None
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                mlp_ratio,
                qkv_bias,
                norm_eps,
                use_rel_pos,
                0 if i in global_attn_indexes else window_size,
                self.grid_size,
                use_sdpa,
            )
            for i in range(depth)
        )
        conv = conv_nd(spatial_dims)
        self.neck = nn.Sequential(
            conv(embed_dim, out_chans, kernel_size=1, bias=False),
            LayerNormNd(out_chans),
            conv(out_chans, out_chans, kernel_size=3, padding=1, bias=False),
            LayerNormNd(out_chans),
        )
        self.gradient_checkpointing = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        if self.pos_embed is not None:
            x = x + self.pos_embed
        for block in self.blocks:
            if self.gradient_checkpointing and self.training and torch.is_grad_enabled():
                # Recomputing a block in backward trades ~30% time for not storing its activations.
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x)
        return self.neck(x.movedim(-1, 1))
