"""Slim ViT pieces with the parameter names of fb/mae and timm, attention through ``ops``."""
from __future__ import annotations

import torch
from timm.layers import DropPath
from torch import nn

from .. import ops

LN_EPS = 1e-6


def pair(size) -> tuple[int, int]:
    """``224 -> (224, 224)``; ``(H, W)`` stays as it is."""
    if isinstance(size, bool) or not isinstance(size, (int, tuple, list)):
        raise TypeError(f"img_size must be an int or (height, width), got {size!r}")
    size = (size, size) if isinstance(size, int) else tuple(size)
    if len(size) != 2 or not all(isinstance(s, int) and not isinstance(s, bool) and s > 0
                                 for s in size):
        raise ValueError(f"img_size must be a positive int or (height, width), got {size!r}")
    return size


def layer_norm(dim: int) -> nn.LayerNorm:
    return nn.LayerNorm(dim, eps=LN_EPS)


class PatchEmbed(nn.Module):
    """Image ``[B, C, H, W]`` -> patch tokens ``[B, (H/p)*(W/p), D]`` (row-major patches)."""

    def __init__(self, img_size=224, patch_size: int = 16, in_chans: int = 3, embed_dim: int = 768):
        super().__init__()
        self.img_size = pair(img_size)
        if isinstance(patch_size, bool) or not isinstance(patch_size, int) or patch_size <= 0:
            raise ValueError(f"patch_size must be a positive int, got {patch_size!r}")
        for side, name in zip(self.img_size, ("height", "width")):
            if side % patch_size:
                raise ValueError(f"img_size {name} {side} is not divisible by patch_size "
                                 f"{patch_size}")
        self.patch_size = patch_size
        self.grid_size = (self.img_size[0] // patch_size, self.img_size[1] // patch_size)
        self.num_patches = self.grid_size[0] * self.grid_size[1]
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)


class Attention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim)
        return self.proj(ops.attention_packed(qkv))


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden_dim: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """Pre-norm transformer block (timm ``Block`` without layer scale)."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm1 = layer_norm(dim)
        self.attn = Attention(dim, num_heads, qkv_bias=True)
        self.norm2 = layer_norm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x)))
        return x + self.drop_path(self.mlp(self.norm2(x)))


def sincos_1d(embed_dim: int, pos: torch.Tensor) -> torch.Tensor:
    """fb/mae ``get_1d_sincos_pos_embed_from_grid``: ``[M] -> [M, D]`` (sin half, cos half)."""
    omega = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2.0)
    omega = 1.0 / 10000 ** omega
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]
    return torch.cat([out.sin(), out.cos()], dim=1)


def sincos_2d(embed_dim: int, grid_size, cls_token: bool = False) -> torch.Tensor:
    """fb/mae ``get_2d_sincos_pos_embed`` for a (rows, cols) grid: ``[rows*cols (+1), D]`` fp32.

    As in fb/mae (``np.meshgrid(grid_w, grid_h)``) the first half of the channels encodes the
    column of a patch and the second half its row; the cls position is all zeros.
    """
    if embed_dim % 4:
        raise ValueError(f"embed_dim {embed_dim} must be divisible by 4 for 2-D sin-cos embeddings")
    rows, cols = pair(grid_size)
    row, col = torch.meshgrid(torch.arange(rows, dtype=torch.float32),
                              torch.arange(cols, dtype=torch.float32), indexing="ij")
    emb = torch.cat([sincos_1d(embed_dim // 2, col), sincos_1d(embed_dim // 2, row)], dim=1)
    if cls_token:
        emb = torch.cat([emb.new_zeros(1, embed_dim), emb], dim=0)
    return emb.float()
