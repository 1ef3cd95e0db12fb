"""SAM ViT image encoder for 3-D volumes (SAM-Med3D) and 2-D images (segment-anything).

One implementation serves both: ``spatial_dims=3`` reproduces SAM-Med3D's ``ImageEncoderViT3D``
(keys ``rel_pos_d/h/w``), ``spatial_dims=2`` segment-anything's ``ImageEncoderViT`` (``rel_pos_h/w``).
Tokens are kept channels-last, (B, *grid, C), as in the official code, so that the absolute position
embedding (1, *grid, C) and the window partition index the same way.

Window attention. The official code zero-pads the grid (after norm1) to whole windows and attends
the padded tokens too; the released weights were trained that way (SAM-Med3D's 8^3 grid becomes one
14^3 window, 2232 of its 2744 tokens padding). ``window_attention="padding_free"`` (the default)
computes the same function on the real tokens only: a padded token is zero after norm1, so its key
is the qkv bias b_k and its value b_v, and all padded keys of a window act on a real query through
one number, the log of the summed exp(score) over the padded positions. The decomposed relative
position bias is a sum of per-axis terms, so that sum factorises into one-axis sums (whole window
minus the real box), computed in log space. Each real query then attends its real keys plus one
virtual key (value b_v, additive bias = that log mass). ``"reference"`` runs the padded computation.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from .common import LayerNormNd, MLPBlock, conv_nd

REL_POS_AXES = {2: ("h", "w"), 3: ("d", "h", "w")}
WINDOW_ATTENTION = ("padding_free", "reference")


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


def _window_rel_pos(tables: Sequence[torch.Tensor], window: int) -> list[torch.Tensor]:
    return [get_rel_pos(window, window, table) for table in tables]


def padded_window_bias(
    q: torch.Tensor, tables: Sequence[torch.Tensor], real: Sequence[int], window: int, pad_q: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """The relative-position bias of a zero-padded window, for its real tokens only.

    q: (B*heads, N, C) queries of the real box ``real`` (N = prod(real)) at the start of a window of
    ``window`` per axis; pad_q: (B*heads, C), the query of a padded token (the qkv bias).

    Returns (bias (B*heads, N, N) between real tokens, log_mass (B*heads, N)): ``log_mass`` is
    log sum over the window's padded key positions of exp(bias), the relative-position part of the
    virtual key's logit. Shapes follow :func:`decomposed_rel_pos_bias`, including SAM-Med3D's 3-D
    broadcasting: its height and width terms read q at grid positions named by the key's depth and
    height index, which lie in the padding for keys past the real box, so those read ``pad_q``.
    """
    rel = _window_rel_pos(tables, window)  # each (window, window, C): [query coordinate, key coordinate]
    batch, tokens, dim = q.shape
    r_q = q.reshape(batch, *real, dim)
    if len(real) == 2:
        r0, r1 = real
        t0 = torch.einsum("bxyc,xkc->bxyk", r_q, rel[0][:r0])  # varies with the key's first index
        t1 = torch.einsum("bxyc,ykc->bxyk", r_q, rel[1][:r1])  # and with its second
        bias = t0[..., :r0, None] + t1[..., None, :r1]
        whole = t0.logsumexp(-1) + t1.logsumexp(-1)
        box = t0[..., :r0].logsumexp(-1) + t1[..., :r1].logsumexp(-1)
    else:
        r0, r1, r2 = real
        # q at (x, y, c) for every c of the window: real for c < r2, the padded query beyond.
        q_ext = torch.cat([r_q, pad_q[:, None, None, None, :].expand(batch, r0, r1, window - r2, dim)], dim=3)
        t0 = torch.einsum("bxyzc,xkc->bxyzk", r_q, rel[0][:r0])  # (x, y, query z; key k)
        t1 = torch.einsum("bxyzc,ykc->bxyzk", q_ext, rel[1][:r1])  # (x, y; key's first index, key k)
        t2 = torch.einsum("bxyzc,zkc->bxyzk", q_ext, rel[2])  # (x, y; key's second index, key k)
        bias = t0[:, :, :, :, None, None, :r2] + t1[:, :, :, None, :r0, None, :r2] + t2[:, :, :, None, None, :r1, :r2]
        # For each key k the sum over the other two key axes is a product of two one-axis sums.
        whole = (t0 + (t1.logsumexp(3) + t2.logsumexp(3))[:, :, :, None, :]).logsumexp(-1)
        box = (
            t0[..., :r2] + (t1[:, :, :, :r0, :r2].logsumexp(3) + t2[:, :, :, :r1, :r2].logsumexp(3))[:, :, :, None, :]
        ).logsumexp(-1)
    # log(e^whole - e^box) without cancellation: box < whole whenever the window has padding.
    log_mass = whole + torch.log(-torch.expm1(box - whole))
    return bias.reshape(batch, tokens, tokens), log_mass.reshape(batch, tokens)


class Attention(nn.Module):
    """Multi-head self-attention with optional decomposed relative position bias.

    ``forward(x, window_size)`` with x the real box at the start of a zero-padded window attends as
    if the padding were there (see the module docstring), on the real tokens only.
    """

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

    def forward(self, x: torch.Tensor, window_size: int = 0) -> torch.Tensor:
        batch, *grid, _ = x.shape
        tokens = math.prod(grid)
        qkv = self.qkv(x).reshape(batch, tokens, 3, self.num_heads, -1).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.reshape(3, batch * self.num_heads, tokens, -1).unbind(0)
        bias = None
        if window_size and any(s < window_size for s in grid):
            bias, k, v = self._with_padding_key(q, k, v, grid, window_size, batch)
        elif self.use_rel_pos:
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

    def _with_padding_key(self, q, k, v, real, window, batch):
        """Bias (B*heads, N, N + 1), keys and values with one virtual key appended: a window's padded
        tokens folded into a zero key with value b_v whose logit is the log of their summed exp(score)."""
        head_dim = q.shape[-1]
        if self.qkv.bias is not None:
            pad_q, pad_k, pad_v = (
                b.reshape(self.num_heads, head_dim).repeat(batch, 1) for b in self.qkv.bias.reshape(3, -1)
            )
        else:
            pad_q = pad_k = pad_v = q.new_zeros(q.shape[0], head_dim)
        # At least float32, under autocast too: the padded mass is summed in exp space.
        work = torch.promote_types(self.qkv.weight.dtype, torch.float32)
        with torch.autocast(q.device.type, enabled=False):
            q_work = q.to(work)
            if self.use_rel_pos:
                tables = [getattr(self, name).to(work) for name in self.rel_pos_names]
                bias, log_mass = padded_window_bias(q_work, tables, real, window, pad_q.to(work))
            else:
                bias = q_work.new_zeros(q.shape[0], q.shape[1], q.shape[1])
                log_mass = q_work.new_full(q.shape[:2], math.log(window ** len(real) - math.prod(real)))
            column = self.scale * (q_work @ pad_k.to(work)[:, :, None]) + log_mass[..., None]
            bias = torch.cat([bias, column], dim=-1)
        k = torch.cat([k, k.new_zeros(k.shape[0], 1, head_dim)], dim=1)
        v = torch.cat([v, pad_v.to(v.dtype)[:, None, :]], dim=1)
        return bias, k, v


def _split_windows(x: torch.Tensor, sizes: Sequence[int]) -> torch.Tensor:
    """(B, *grid, C) with grid a multiple of ``sizes`` → windows (B*n, *sizes, C), row-major."""
    batch, *grid, channels = x.shape
    n = len(grid)
    view = [batch]
    for g, s in zip(grid, sizes):
        view += [g // s, s]
    order = [0] + [1 + 2 * i for i in range(n)] + [2 + 2 * i for i in range(n)] + [1 + 2 * n]
    return x.view(*view, channels).permute(*order).reshape(-1, *sizes, channels)


def _merge_windows(windows: torch.Tensor, grid: Sequence[int], batch: int) -> torch.Tensor:
    """Inverse of :func:`_split_windows`: (B*n, *sizes, C) → (B, *grid, C)."""
    sizes = windows.shape[1:-1]
    n = len(grid)
    counts = [g // s for g, s in zip(grid, sizes)]
    x = windows.reshape(batch, *counts, *sizes, -1)
    order = [0]
    for i in range(n):
        order += [1 + i, 1 + n + i]
    order.append(1 + 2 * n)
    return x.permute(*order).reshape(batch, *grid, -1)


def window_partition(x: torch.Tensor, window_size: int) -> tuple[torch.Tensor, tuple[int, ...]]:
    """Zero-pad (B, *grid, C) to multiples of window_size and split into windows (B*n, *window, C).

    This is the official computation (``window_attention="reference"``): the padded tokens take
    part in attention.
    """
    grid = x.shape[1:-1]
    pads = [(window_size - s % window_size) % window_size for s in grid]
    if any(pads):
        pad_arg: list[int] = [0, 0]
        for p in reversed(pads):
            pad_arg += [0, p]
        x = F.pad(x, pad_arg)
    padded = tuple(s + p for s, p in zip(grid, pads))
    return _split_windows(x, [window_size] * len(grid)), padded


def window_unpartition(
    windows: torch.Tensor, window_size: int, padded: Sequence[int], grid: Sequence[int]
) -> torch.Tensor:
    """Inverse of :func:`window_partition`, dropping the padding: (B*n, *window, C) → (B, *grid, C)."""
    counts = [s // window_size for s in padded]
    x = _merge_windows(windows, padded, windows.shape[0] // math.prod(counts))
    return x[(slice(None),) + tuple(slice(0, s) for s in grid)].contiguous()


def padding_free_window_attention(attn: Attention, x: torch.Tensor, window_size: int) -> torch.Tensor:
    """What ``window_partition`` → ``attn`` → ``window_unpartition`` computes, on real tokens only.

    Along each axis the grid splits into whole windows and, when it is not a multiple of the window,
    one last partial window whose real tokens sit at its start. Windows of the same real extent are
    attended together: one group for SAM-Med3D's 8^3 grid, up to 2^dims in general.
    """
    batch, *grid, _ = x.shape
    if all(g <= window_size for g in grid):
        return attn(x, window_size)
    spans = [
        [(0, g - g % window_size, window_size)] * (g >= window_size)
        + [(g - g % window_size, g, g % window_size)] * (g % window_size > 0)
        for g in grid
    ]
    out = torch.empty_like(x)
    for group in itertools.product(*spans):
        box = (slice(None), *(slice(start, stop) for start, stop, _ in group))
        part = x[box]
        windows = _split_windows(part, [size for _, _, size in group])
        out[box] = _merge_windows(attn(windows, window_size), part.shape[1:-1], batch)
    return out


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
        window_attention: str = "padding_free",
    ) -> None:
        super().__init__()
        if window_attention not in WINDOW_ATTENTION:
            raise ValueError(f"window_attention must be one of {WINDOW_ATTENTION}, got {window_attention!r}")
        self.window_attention = window_attention
        self.norm1 = nn.LayerNorm(dim, eps=norm_eps)
        attn_size = [window_size] * len(input_size) if window_size > 0 else list(input_size)
        self.attn = Attention(dim, num_heads, qkv_bias, use_rel_pos, attn_size, use_sdpa)
        self.norm2 = nn.LayerNorm(dim, eps=norm_eps)
        self.mlp = MLPBlock(dim, int(dim * mlp_ratio), nn.GELU)
        self.window_size = window_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shortcut = x
        x = self.norm1(x)
        if self.window_size > 0 and self.window_attention == "padding_free":
            x = padding_free_window_attention(self.attn, x, self.window_size)
        elif self.window_size > 0:
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
        window_attention: str = "padding_free",
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
                window_attention,
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
