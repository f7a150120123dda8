"""Triton ``random_masking``: rank each row's noise by compare-and-count, gather the kept tokens.

One launch does the forward. Program (n, d) of the grid (N, cdiv(D, BLOCK_D)) ranks row n of the
noise itself (rank_i = how many entries torch.argsort(stable=True) puts before entry i: NaN last,
ties to the lower index), copies the D-slice d of every kept token (rank < K) to
``x_masked[n, rank]``, and program (n, 0) also writes ``mask`` (rank >= K) and ``ids_restore``
(= rank). Ranking costs O(L^2) compares per program, tiled so no [L, L] tile is ever held.

Tokens move as integers of the same width, so copies are bit-exact for every float dtype (and
bf16 works in the interpreter, which has no bf16 arithmetic).
"""
from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import _utils

_INT_OF_SIZE = {1: torch.int8, 2: torch.int16, 4: torch.int32, 8: torch.int64}


def _as_int(t: torch.Tensor) -> torch.Tensor:
    return t.view(_INT_OF_SIZE[t.element_size()])


@functools.cache
def _bits_of_one(dtype: torch.dtype) -> int:
    """1.0 in ``dtype`` as the integer the kernel stores through the mask's integer view."""
    return _as_int(torch.ones((), dtype=dtype)).item()


@triton.jit
def _sort_keys(noise_ptr, seed_ptr, row_start, offs, L, HAS_NOISE: tl.constexpr):
    """Integers that order the row's noise as torch.sort does: -0.0 == 0.0, every NaN equal and
    last. Entries past L key as NaN."""
    if HAS_NOISE:
        noise = tl.load(noise_ptr + row_start + offs, mask=offs < L, other=float("nan"))
    else:
        noise = tl.where(offs < L, tl.rand(tl.load(seed_ptr), row_start + offs), float("nan"))
    if noise.dtype == tl.float64:
        magnitude = tl.abs(noise).to(tl.int64, bitcast=True)
        nan_key = 0x7FF0000000000001
    else:
        magnitude = tl.abs(noise).to(tl.int32, bitcast=True)
        nan_key = 0x7F800001
    # Every NaN's magnitude bits exceed those of +inf; the clamp gives them all one key.
    magnitude = tl.minimum(magnitude, nan_key)
    # ~m < 0 orders the negatives by decreasing magnitude; -0.0 is not < 0, so keys as 0.0.
    return tl.where(noise < 0, ~magnitude, magnitude)


@triton.jit
def _ranks(noise_ptr, seed_ptr, row_start, i0, L, HAS_NOISE: tl.constexpr,
           BLOCK_L: tl.constexpr):
    """Rank (int64) of the row's entries i0 + [0, BLOCK_L): how many entries sort before each.
    Entries past L rank >= L."""
    offs_i = i0 + tl.arange(0, BLOCK_L)
    keys = _sort_keys(noise_ptr, seed_ptr, row_start, offs_i, L, HAS_NOISE)
    key_i = keys[:, None]
    # Entry j sorts before entry i when key_j <= key_i for j < i and key_j < key_i for j > i,
    # so only the diagonal tile compares indices. Counts accumulate per pair and are summed once.
    before = tl.zeros((BLOCK_L, BLOCK_L), dtype=tl.int32)
    for j0 in range(0, i0, BLOCK_L):
        key_j = _sort_keys(noise_ptr, seed_ptr, row_start, j0 + tl.arange(0, BLOCK_L), L,
                           HAS_NOISE)[None, :]
        before += (key_j <= key_i).to(tl.int32)
    lower_index = offs_i[None, :] < offs_i[:, None]
    before += tl.where(lower_index, keys[None, :] <= key_i, keys[None, :] < key_i).to(tl.int32)
    for j0 in range(i0 + BLOCK_L, L, BLOCK_L):
        key_j = _sort_keys(noise_ptr, seed_ptr, row_start, j0 + tl.arange(0, BLOCK_L), L,
                           HAS_NOISE)[None, :]
        before += (key_j < key_i).to(tl.int32)
    return tl.sum(before, axis=1).to(tl.int64)


def _footprint(tokens: str, ranks: bool):
    """Footprint of a config: shared memory for the per-row sums of the [BLOCK_L, BLOCK_L]
    comparisons (forward, ``ranks``; nothing else is staged), words per thread for the tile of
    the ``tokens`` argument and those comparisons."""
    def footprint(config, args):
        block_l, block_d = config.kwargs["BLOCK_L"], config.kwargs["BLOCK_D"]
        tile = block_l * block_d * args[tokens].dtype.itemsize / 4 + ranks * block_l * block_l
        return _utils.Footprint(ranks * block_l * config.num_warps * 4 + 1024,
                                tile / (32 * config.num_warps))
    return footprint


_MAX_WORDS = 96  # spills begin past it (int64 tokens at 128 words, tests/test_triton_aot.py)


@_utils.autotune(
    [triton.Config({"BLOCK_L": 64, "BLOCK_D": 256}, num_warps=8),
     triton.Config({"BLOCK_L": 32, "BLOCK_D": 256}, num_warps=4),
     triton.Config({"BLOCK_L": 32, "BLOCK_D": 512}, num_warps=8),
     triton.Config({"BLOCK_L": 16, "BLOCK_D": 1024}, num_warps=8),
     triton.Config({"BLOCK_L": 64, "BLOCK_D": 128}, num_warps=4),
     triton.Config({"BLOCK_L": 32, "BLOCK_D": 128}, num_warps=4)],
    key=["L", "D", "HAS_NOISE"], footprint=_footprint("x_ptr", ranks=True), max_words=_MAX_WORDS)
@triton.jit
def _random_masking_kernel(x_ptr, noise_ptr, seed_ptr, x_masked_ptr, mask_ptr, ids_restore_ptr,
                           L, D, K, mask_one, HAS_NOISE: tl.constexpr, BLOCK_L: tl.constexpr,
                           BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    pid_d = tl.program_id(1)
    lanes = tl.arange(0, BLOCK_L)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    row_start = row * L
    x_ptrs = x_ptr + row.to(tl.int64) * L * D + lanes[:, None] * D + offs_d[None, :]
    x_masked_row = x_masked_ptr + row.to(tl.int64) * K * D + offs_d[None, :]
    for i0 in range(0, L, BLOCK_L):
        offs_i = i0 + lanes
        rank = _ranks(noise_ptr, seed_ptr, row_start, i0, L, HAS_NOISE, BLOCK_L)
        copy = (rank < K)[:, None] & d_ok
        tl.store(x_masked_row + rank[:, None] * D, tl.load(x_ptrs, mask=copy), mask=copy)
        if pid_d == 0:
            removed = tl.where(rank < K, 0, mask_one).to(mask_ptr.dtype.element_ty)
            tl.store(mask_ptr + row_start + offs_i, removed, mask=offs_i < L)
            tl.store(ids_restore_ptr + row_start + offs_i, rank, mask=offs_i < L)
        x_ptrs += BLOCK_L * D


@_utils.autotune(
    [triton.Config({"BLOCK_L": 64, "BLOCK_D": 256}, num_warps=8),
     triton.Config({"BLOCK_L": 16, "BLOCK_D": 256}, num_warps=4),
     triton.Config({"BLOCK_L": 32, "BLOCK_D": 256}, num_warps=8),
     triton.Config({"BLOCK_L": 8, "BLOCK_D": 512}, num_warps=4),
     triton.Config({"BLOCK_L": 16, "BLOCK_D": 512}, num_warps=8),
     triton.Config({"BLOCK_L": 8, "BLOCK_D": 1024}, num_warps=8)],
    key=["L", "D"], footprint=_footprint("grad_x_masked_ptr", ranks=False), max_words=_MAX_WORDS)
@triton.jit
def _random_masking_backward_kernel(grad_x_masked_ptr, ids_restore_ptr, grad_x_ptr, L, D, K,
                                    BLOCK_L: tl.constexpr, BLOCK_D: tl.constexpr):
    row = tl.program_id(0)
    lanes = tl.arange(0, BLOCK_L)
    offs_d = tl.program_id(1) * BLOCK_D + tl.arange(0, BLOCK_D)
    d_ok = offs_d[None, :] < D
    grad_x_masked_row = grad_x_masked_ptr + row.to(tl.int64) * K * D + offs_d[None, :]
    grad_x_ptrs = grad_x_ptr + row.to(tl.int64) * L * D + lanes[:, None] * D + offs_d[None, :]
    ids_ptrs = ids_restore_ptr + row * L + lanes
    for i0 in range(0, L, BLOCK_L):
        in_row = lanes < L - i0
        rank = tl.load(ids_ptrs, mask=in_row, other=K)[:, None]
        grads = tl.load(grad_x_masked_row + rank * D, mask=(rank < K) & d_ok, other=0)
        tl.store(grad_x_ptrs, grads, mask=in_row[:, None] & d_ok)
        ids_ptrs += BLOCK_L
        grad_x_ptrs += BLOCK_L * D


def _grid(n: int, dim: int):
    # At least one program per row, so that mask and ids_restore are written even when D == 0.
    return lambda meta: (n, max(triton.cdiv(dim, meta["BLOCK_D"]), 1))


@_utils.on_input_device
def random_masking_forward(x: torch.Tensor, noise: torch.Tensor | None,
                           seed: torch.Tensor | None, num_keep: int):
    """``(x_masked [N, K, D], mask [N, L], ids_restore [N, L])`` of ``x [N, L, D]`` (contiguous,
    any float dtype) keeping the ``num_keep`` entries of lowest ``noise [N, L]``; when ``noise``
    is None it is drawn in the kernel (uniform, Philox) from ``seed``, a 0-dim integer tensor on
    x's device."""
    n, length, dim = x.shape
    if noise is not None and noise.dtype != torch.float64:
        noise = noise.float()  # exact, and the kernel then only ranks fp32 or fp64 keys
    x_masked = x.new_empty(n, num_keep, dim)
    mask = x.new_empty(n, length)
    ids_restore = torch.empty(n, length, dtype=torch.int64, device=x.device)
    _random_masking_kernel[_grid(n, dim)](
        _as_int(x), noise, seed, _as_int(x_masked), _as_int(mask), ids_restore, length, dim,
        num_keep, _bits_of_one(x.dtype), HAS_NOISE=noise is not None)
    return x_masked, mask, ids_restore


@_utils.on_input_device
def random_masking_backward(grad_x_masked: torch.Tensor, ids_restore: torch.Tensor):
    """``grad_x [N, L, D]``: row l is ``grad_x_masked[n, ids_restore[n, l]]`` when that index is
    below K, zero otherwise (the removed patches). Both inputs contiguous, ids int64."""
    n, num_keep, dim = grad_x_masked.shape
    length = ids_restore.shape[1]
    grad_x = grad_x_masked.new_empty(n, length, dim)
    _random_masking_backward_kernel[_grid(n, dim)](
        _as_int(grad_x_masked), ids_restore, _as_int(grad_x), length, dim, num_keep)
    return grad_x
