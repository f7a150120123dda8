"""Triton ``mae_loss``: fb/mae ``forward_loss`` in one pass over ``imgs`` and ``pred``.

A program takes BLOCK_ROWS patches (rows of ``pred [N*L, P]``, P = p*p*C padded to BLOCK_P;
BLOCK_ROWS * BLOCK_P = TILE elements, or one patch when it is larger) and
gathers each one's target pixels straight from ``imgs [N, C, H, W]`` by address arithmetic, so
the patchified target never exists in memory. It writes each patch's masked loss (summed
afterwards by torch, deterministically: no atomics) and, when asked, the finished gradient
``2 (pred - target) mask_l / (P * mask.sum())``: autograd then only scales it by the incoming
gradient, and neither input is read again.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import _utils

DTYPES = _utils.DTYPES + (torch.float64,)


def _footprint(config, args):
    """Shared memory for the per-patch sums; words per thread for one tile in the compute dtype
    (the loss dtype: fp64 tiles spill at 16 warps, where a thread has 128 registers)."""
    rows = max(config.kwargs["TILE"] // args["BLOCK_P"], 1)
    size = args["patch_loss_ptr"].dtype.itemsize
    return _utils.Footprint(rows * config.num_warps * size + 1024,
                            rows * args["BLOCK_P"] * size / 4 / (32 * config.num_warps))


@_utils.autotune(
    [triton.Config({"TILE": 4096}, num_warps=8),
     triton.Config({"TILE": 2048}, num_warps=4),
     triton.Config({"TILE": 4096}, num_warps=4),
     triton.Config({"TILE": 8192}, num_warps=8),
     triton.Config({"TILE": 16384}, num_warps=16),
     triton.Config({"TILE": 1024}, num_warps=4)],
    key=["PATCH", "C", "NORM", "WITH_GRAD"], footprint=_footprint, max_words=64)
@triton.heuristics({"BLOCK_ROWS": lambda args: max(args["TILE"] // args["BLOCK_P"], 1)})
@triton.jit
def _mae_loss_kernel(imgs_ptr, pred_ptr, mask_ptr, mask_sum_ptr, patch_loss_ptr, grad_ptr, rows, L,
                     H, W, GRID_W, PATCH: tl.constexpr, C: tl.constexpr, NORM: tl.constexpr,
                     WITH_GRAD: tl.constexpr, BLOCK_P: tl.constexpr, TILE: tl.constexpr,
                     BLOCK_ROWS: tl.constexpr):
    P = PATCH * PATCH * C
    dtype = patch_loss_ptr.dtype.element_ty
    offs_r = tl.program_id(0) * BLOCK_ROWS + tl.arange(0, BLOCK_ROWS)
    row_ok = offs_r < rows
    offs_e = tl.arange(0, BLOCK_P)
    ok = row_ok[:, None] & (offs_e < P)[None, :]

    # Element e of a patch is pixel (e // (p*C), e // C % p) of channel e % C.
    image, patch = offs_r // L, offs_r % L
    patch_origin = (image.to(tl.int64) * C * H * W
                    + (patch // GRID_W) * PATCH * W + (patch % GRID_W) * PATCH)
    pixel = (offs_e % C) * H * W + (offs_e // (PATCH * C)) * W + offs_e // C % PATCH
    target = tl.load(imgs_ptr + patch_origin[:, None] + pixel[None, :], mask=ok, other=0.0)
    target = target.to(dtype)
    offs = offs_r.to(tl.int64)[:, None] * P + offs_e[None, :]
    pred = tl.load(pred_ptr + offs, mask=ok, other=0.0).to(dtype)
    if NORM:
        mean = tl.sum(target, axis=1) / P
        target = tl.where(ok, target - mean[:, None], 0.0)
        var = tl.sum(target * target, axis=1) / (P - 1)
        target = target * (1.0 / tl.sqrt(var + 1.0e-6))[:, None]

    diff = pred - target
    weight = tl.load(mask_ptr + offs_r, mask=row_ok, other=0.0).to(dtype)
    tl.store(patch_loss_ptr + offs_r, tl.sum(diff * diff, axis=1) / P * weight, mask=row_ok)
    if WITH_GRAD:
        scale = 2 * weight / (P * tl.load(mask_sum_ptr))
        tl.store(grad_ptr + offs, (diff * scale[:, None]).to(grad_ptr.dtype.element_ty), mask=ok)


@_utils.on_input_device
def mae_loss_forward(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                     norm_pix_loss: bool, with_grad: bool, compute_dtype: torch.dtype):
    """``(loss, grad_pred)`` of ``pred [N, L, p*p*C]`` against ``imgs [N, C, H, W]`` on the
    ``mask [N, L]`` == 1 patches, computed in ``compute_dtype`` (fp32 or fp64). ``grad_pred`` is
    d loss / d pred in pred's dtype when ``with_grad``, an empty tensor otherwise. The inputs
    are contiguous with consistent shapes (the public op checks them)."""
    for name, t in (("imgs", imgs), ("pred", pred), ("mask", mask)):
        _utils.check_dtype(name, t, DTYPES)
    n, channels, height, width = imgs.shape
    length, dim = pred.shape[1:]
    rows = n * length
    mask_sum = mask.sum(dtype=compute_dtype)
    patch_loss = torch.empty(rows, dtype=compute_dtype, device=pred.device)
    grad_pred = torch.empty_like(pred) if with_grad else pred.new_empty(0)
    grid = lambda meta: (triton.cdiv(rows, meta["BLOCK_ROWS"]),)  # noqa: E731
    _mae_loss_kernel[grid](imgs, pred, mask, mask_sum, patch_loss, grad_pred, rows, length, height,
                           width, width // patch_size, PATCH=patch_size, C=channels,
                           NORM=norm_pix_loss, WITH_GRAD=with_grad,
                           BLOCK_P=triton.next_power_of_2(dim))
    return patch_loss.sum() / mask_sum, grad_pred
