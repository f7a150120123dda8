"""Ground truth for every op: plain PyTorch, exactly the semantics of fb/mae ``models_mae.py``.

Every backend (C++ CPU, CUDA, Triton) is tested against these functions. They are written for
clarity, not speed, and they do not validate their arguments (the public ops in
``usfmae_fast.ops`` do).
"""
from __future__ import annotations

import math

import torch


def patchify(imgs: torch.Tensor, patch_size: int) -> torch.Tensor:
    """``[N, C, H, W] -> [N, L, p*p*C]`` with patches row-major and pixels in (p, p, C) order."""
    n, c, h, w = imgs.shape
    p = patch_size
    gh, gw = h // p, w // p
    x = imgs.reshape(n, c, gh, p, gw, p)
    x = torch.einsum("nchpwq->nhwpqc", x)
    return x.reshape(n, gh * gw, p * p * c)


def unpatchify(x: torch.Tensor, patch_size: int, grid: tuple[int, int] | None = None,
               in_chans: int | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`. ``grid`` = (patch rows, patch cols); square when omitted."""
    n, length, dim = x.shape
    p = patch_size
    gh, gw = grid if grid is not None else (math.isqrt(length),) * 2
    c = in_chans if in_chans is not None else dim // (p * p)
    x = x.reshape(n, gh, gw, p, p, c)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(n, c, gh * p, gw * p)


def num_kept(length: int, mask_ratio: float) -> int:
    """Number of patches the encoder sees: ``int(L * (1 - mask_ratio))`` as in fb/mae."""
    return int(length * (1 - mask_ratio))


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """fb/mae ``random_masking`` with a stable sort (ties go to the lower index).

    Returns ``x_masked [N, K, D]`` (kept patches in ascending-noise order), ``mask [N, L]``
    (0 kept, 1 removed, dtype of ``x``) and ``ids_restore [N, L]`` (int64).
    """
    n, length, _ = x.shape
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    return mask_by_noise(x, noise, num_kept(length, mask_ratio))


def mask_by_noise(x: torch.Tensor, noise: torch.Tensor, num_keep: int):
    """:func:`random_masking` with the number of kept patches given directly."""
    n, length, dim = x.shape
    ids_shuffle = torch.argsort(noise, dim=1, stable=True)
    ids_restore = torch.argsort(ids_shuffle, dim=1, stable=True)
    ids_keep = ids_shuffle[:, :num_keep]
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, dim))
    mask = torch.ones(n, length, device=x.device, dtype=x.dtype)
    mask[:, :num_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)
    return x_masked, mask, ids_restore


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None):
    """Non-causal softmax attention on ``[B, H, N, d]`` tensors, no dropout (timm/fb-mae)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    attn = (q @ k.transpose(-2, -1)) * scale
    attn = attn.softmax(dim=-1)
    return attn @ v


def split_qkv(qkv: torch.Tensor):
    """``[B, N, 3, H, d]`` qkv projection -> q, k, v as ``[B, H, N, d]`` views."""
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)


def merge_heads(out: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, d]`` -> ``[B, N, H*d]``."""
    b, h, n, d = out.shape
    return out.transpose(1, 2).reshape(b, n, h * d)


def attention_packed(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention that reads the qkv projection ``[B, N, 3, H, d]`` and returns ``[B, N, H*d]``."""
    return merge_heads(attention(*split_qkv(qkv), scale))


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix_loss: bool) -> torch.Tensor:
    """fb/mae ``forward_loss``: mean squared error on removed patches, optionally on per-patch
    normalised pixels (unbiased variance, eps 1e-6)."""
    target = patchify(imgs, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)
    return (loss * mask).sum() / mask.sum()

