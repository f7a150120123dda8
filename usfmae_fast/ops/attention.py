"""Public ``attention`` ops: non-causal softmax attention, plain ``[B, H, N, d]`` and packed
(reads the qkv projection ``[B, N, 3, H, d]``, writes ``[B, N, H*d]``).

Backends: "torch" (SDPA), "triton" (``usfmae::attention_triton``), and the compiled "cpu" / "cuda"
kernels ``usfmae::attention_fwd`` / ``attention_packed_fwd`` (fake kernels and autograd are
registered here). The compiled kernels take self-attention shapes (k and v shaped like q, which
is what a ViT has); other shapes run SDPA with a warning.
"""
from __future__ import annotations

import functools
import math
import warnings

import torch
import torch.nn.functional as F

from . import _backend, _checks, _ext, _kernel_checks, reference
from .triton import _utils as _triton_utils

for _op, _describe, _packed in (("attention", _kernel_checks.describe_attention, False),
                                ("attention_packed", _kernel_checks.describe_attention_packed, True)):
    _backend.define(_op, _kernel_checks.AttentionSpec, _describe,
                    functools.partial(_kernel_checks.check_attention, packed=_packed),
                    _kernel_checks.attention_examples)


def _sdpa(q, k, v, scale):
    out = F.scaled_dot_product_attention(q, k, v, scale=scale)
    if q.is_cuda:
        return out
    # PyTorch's CPU flash kernel returns zeros for a query row holding NaN at short lengths
    # (N <= 16, the MAE encoder after masking small images); the reference and every other
    # backend return NaN there. A non-finite q element makes q * 0 NaN: that row becomes NaN.
    return out + (q * 0).sum(-1, keepdim=True)


def _sdpa_packed(qkv, scale):
    return reference.merge_heads(_sdpa(*reference.split_qkv(qkv), scale))


_backend.register("attention", "torch", _sdpa, ("cpu", "cuda"))
_backend.register("attention_packed", "torch", _sdpa_packed, ("cpu", "cuda"))
# The CUDA kernels' CUDA-core path keeps d / 32 values per lane (csrc/cuda/attention_simple.cuh);
# their tensor-core path (mma.sync m16n8k16) takes fp16 / bf16 at these head dims.
_CUDA_MAX_HEAD_DIM = 128
_CUDA_TENSOR_CORE_HEAD_DIMS = (32, 64, 128)
_LOW_PRECISION = (torch.float16, torch.bfloat16)


def _triton_takes(spec) -> str | None:
    if _triton_utils.dtype_refusal(spec.dtype):
        return _triton_utils.dtype_refusal(spec.dtype)
    if max(spec.d_qk, spec.d_v) > _triton_attention.MAX_HEAD_DIM:
        return f"the triton backend takes head_dim <= {_triton_attention.MAX_HEAD_DIM}"
    return None


def _triton_prefer(spec) -> bool:
    # fp32 tiles spill registers on sm_90 (every config): SDPA is faster there
    return spec.dtype in _LOW_PRECISION


def _compiled_takes(spec) -> str | None:
    if not spec.same_shape:
        return "the compiled attention kernels take k and v shaped like q"
    if spec.device == "cuda" and spec.d_qk > _CUDA_MAX_HEAD_DIM:
        return f"the cuda backend takes head_dim <= {_CUDA_MAX_HEAD_DIM}"
    return None


def _compiled_prefer(spec) -> bool:
    # on a GPU only where the tensor-core path runs; its CUDA-core path loses to SDPA / Triton.
    # fp64 (gradient checks, exactness tests) goes to SDPA: our fp32 log-sum-exp limits it to
    # ~1e-7 relative.
    if spec.dtype == torch.float64:
        return False
    return spec.device != "cuda" or (spec.dtype in _LOW_PRECISION
                                     and spec.d_qk in _CUDA_TENSOR_CORE_HEAD_DIMS)


if _triton_utils.IMPORTED:
    from .triton import attention as _triton_attention
    for _op, _fn in (("attention", _triton_attention.attention),
                     ("attention_packed", _triton_attention.attention_packed)):
        _triton_utils.register(_op, _fn, takes=_triton_takes, prefer=_triton_prefer)


def _unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 or t.shape[-1] <= 1 else t.contiguous()


def _register_compiled() -> None:
    """Fake kernels and autograd of the compiled attention ops, and their "cpu" / "cuda" backends."""
    def fwd_fake(q, k, v, scale):
        return q.new_empty(q.shape), q.new_empty(q.shape[:3], dtype=torch.float32)

    def bwd_fake(grad_out, q, k, v, out, lse, scale):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    def packed_fwd_fake(qkv, scale):
        b, n, _, h, d = qkv.shape
        return qkv.new_empty(b, n, h * d), qkv.new_empty(b, h, n, dtype=torch.float32)

    def packed_bwd_fake(grad_out, qkv, out, lse, scale):
        return qkv.new_empty(qkv.shape)

    def setup_context(ctx, inputs, output):
        *tensors, ctx.scale = inputs
        ctx.save_for_backward(*tensors, *output)
        ctx.mark_non_differentiable(output[1])

    def backward(ctx, grad_out, _grad_lse):
        *inputs, out, lse = ctx.saved_tensors
        grads = torch.ops.usfmae.attention_bwd(_unit_last_stride(grad_out), *inputs, out, lse,
                                               ctx.scale)
        return *grads, None

    def packed_backward(ctx, grad_out, _grad_lse):
        qkv, out, lse = ctx.saved_tensors
        return torch.ops.usfmae.attention_packed_bwd(_unit_last_stride(grad_out), qkv, out, lse,
                                                     ctx.scale), None

    for op, fake in (("attention_fwd", fwd_fake), ("attention_bwd", bwd_fake),
                     ("attention_packed_fwd", packed_fwd_fake),
                     ("attention_packed_bwd", packed_bwd_fake)):
        torch.library.register_fake(f"usfmae::{op}")(fake)
    def no_double_backward(ctx, *grads):
        raise RuntimeError("the compiled attention backward is not differentiable (no double "
                           "backward); use backend 'torch' for higher-order gradients")

    for op in ("attention_bwd", "attention_packed_bwd"):
        torch.library.register_autograd(f"usfmae::{op}", no_double_backward)
    torch.library.register_autograd("usfmae::attention_fwd", backward,
                                    setup_context=setup_context)
    torch.library.register_autograd("usfmae::attention_packed_fwd", packed_backward,
                                    setup_context=setup_context)

    def head_dim_fits(name, t):
        if t.device.type == "cuda" and t.shape[-1] > _CUDA_MAX_HEAD_DIM:
            raise ValueError(f"{name}: the cuda backend takes head_dim <= {_CUDA_MAX_HEAD_DIM}, "
                             f"got {t.shape[-1]} (use backend 'triton' or 'torch')")

    def compiled(q, k, v, scale):
        if not q.shape == k.shape == v.shape:
            warnings.warn("the compiled attention kernels take k and v shaped like q; running "
                          f"SDPA for q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}",
                          stacklevel=3)
            return _sdpa(q, k, v, scale)
        head_dim_fits("q", q)
        q, k, v = (_unit_last_stride(t) for t in (q, k, v))
        return torch.ops.usfmae.attention_fwd(q, k, v, _default_scale(q, scale))[0]

    def compiled_packed(qkv, scale):
        head_dim_fits("qkv", qkv)
        return torch.ops.usfmae.attention_packed_fwd(qkv, _default_scale(qkv, scale))[0]

    for key in ("CPU", "CUDA"):
        backend = key.lower()
        _backend.register("attention", backend, compiled, (backend,),
                          _ext.compiled_unavailable("attention_fwd", key), _compiled_takes,
                          _compiled_prefer)
        _backend.register("attention_packed", backend, compiled_packed, (backend,),
                          _ext.compiled_unavailable("attention_packed_fwd", key), _compiled_takes,
                          _compiled_prefer)


def _default_scale(t: torch.Tensor, scale: float | None) -> float:
    return t.shape[-1] ** -0.5 if scale is None else scale


if _ext.has_kernel("attention_fwd", "CPU") or _ext.has_kernel("attention_fwd", "CUDA"):
    _register_compiled()


def _scale(scale) -> float | None:
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))
                              or not math.isfinite(scale) or scale <= 0):
        raise ValueError(f"scale must be None or a finite positive number, got {scale!r}")
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
    scale = _scale(scale)
    _, fn = _backend.resolve("attention", q, k, v, scale)
    return fn(q, k, v, scale)


def attention_packed(qkv: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention on the qkv projection output ``[B, N, 3, H, d]``; returns ``[B, N, H*d]``."""
    _checks.tensor("qkv", qkv, 5, "[B, N, 3, H, d]")
    if qkv.shape[2] != 3:
        raise ValueError(f"qkv must have shape [B, N, 3, H, d], got {tuple(qkv.shape)}")
    scale = _scale(scale)
    _, fn = _backend.resolve("attention_packed", qkv, scale)
    return fn(qkv, scale)
