"""Public ``attention`` ops: non-causal softmax attention, plain ``[B, H, N, d]`` and packed
(reads the qkv projection ``[B, N, 3, H, d]``, writes ``[B, N, H*d]``)."""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import _backend, _checks, reference
from .triton import _utils as _triton_utils


def _sdpa(q, k, v, scale):
    return F.scaled_dot_product_attention(q, k, v, scale=scale)


def _sdpa_packed(qkv, scale):
    return reference.merge_heads(_sdpa(*reference.split_qkv(qkv), scale))


_backend.register("attention", "torch", _sdpa, ("cpu", "cuda"))
_backend.register("attention_packed", "torch", _sdpa_packed, ("cpu", "cuda"))
if _triton_utils.IMPORTED:
    from .triton import attention as _triton_attention
    _triton_utils.register("attention", _triton_attention.attention)
    _triton_utils.register("attention_packed", _triton_attention.attention_packed)


def _scale(scale) -> float | None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or scale <= 0):
        raise ValueError(f"scale must be None or a positive number, got {scale!r}")
    return None if scale is None else float(scale)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
              scale: float | None = None) -> torch.Tensor:
    """softmax(q k^T * scale) v on ``[B, H, N, d]`` tensors; scale defaults to d ** -0.5."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _checks.tensor(name, t, 4, "[B, H, N, d]", contiguous=False)
    _checks.same_device(q=q, k=k, v=v)
    b, h, _, d = q.shape
    _checks.shape("k", k, (b, h, k.shape[2], d), "[B, H, N, d]")
    _checks.shape("v", v, (b, h, k.shape[2], v.shape[3]), "[B, H, N, d]")
    if not q.dtype == k.dtype == v.dtype:
        raise TypeError(f"q, k, v must share a dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    _, fn = _backend.resolve("attention", q.device.type)
    return fn(q, k, v, _scale(scale))


def attention_packed(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention on the qkv projection output ``[B, N, 3, H, d]``; returns ``[B, N, H*d]``."""
    _checks.tensor("qkv", qkv, 5, "[B, N, 3, H, d]")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape [B, N, 3, H, d], got {tuple(qkv.shape)}")
    _, fn = _backend.resolve("attention_packed", qkv.device.type)
    return fn(qkv, _scale(scale))
