"""Fused softmax attention, FlashAttention-2 style (non-causal, no dropout): Triton kernels,
their ``attention_forward`` / ``attention_backward`` launchers, and the torch custom ops behind
the "triton" backend of ``ops.attention`` and ``ops.attention_packed``.

Every kernel addresses its ``[B, H, N, d]`` operands through (batch, head, row) strides with a
contiguous last dim, so the same kernels read the packed qkv projection ``[B, N, 3, H, d]``,
write the ``[B, N, H*d]`` output and the ``[B, N, 3, H, d]`` gradient in place: no copies.
Unless rows are not 16-byte aligned (a head dim like 37 in fp16): the ops then pad the head dim
with zeros, since such rows load element by element and spill registers.

Backward, without atomics: when the whole key sequence fits one tile (short sequences, the
normal case in a ViT), one program per (batch, head) computes dk, dv and dq together. Longer
sequences run a dk/dv kernel (one program per key block, looping over query blocks) and a dq
kernel (one program per query block). delta = rowsum(dO * O) is recomputed from the O and dO
tiles where it is needed, which costs less than a separate pass and its launch at these sizes.

Every dot passes input_precision="ieee": exact fp32 products for fp32 inputs (no TF32); fp16 and
bf16 operands run on tensor cores either way. Accumulation is fp32 throughout. fp32 dots run on
the FMA units: correct, with small tiles that keep registers up to head dim 128 on sm_90, but
far slower than tensor cores (and spilling at head dim 256).

Autotuning: each kernel's configs are pruned per key by the shared memory and registers their
tiles need for the dtype and head dim (see _footprint and _utils.autotune).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from .. import reference
from . import _utils

MAX_HEAD_DIM = 256
# The fused backward keeps dk and dv for the whole key sequence in registers: it runs when
# BLOCK_N * (BLOCK_DQK + BLOCK_DV) stays within this (N <= 256 at d <= 32, 128 at d=64, 64 at
# d=128), and never for more than 256 keys.
FUSED_BWD_ELEMENTS = 128 * 128
FUSED_BWD_MAX_KEYS = 256
_LOG2E = tl.constexpr(math.log2(math.e))


@triton.jit
def _tile(base, b, h, stride_b, stride_h, stride_n, rows, cols, ALIGN: tl.constexpr):
    # int64 offsets: a [B, H, N, d] view (of a packed buffer) may span more than 2**31 elements.
    # ALIGN divides every stride: Triton itself only knows whether one is a multiple of 16, and
    # without the hint it loads rows of a head dim like 72 one element at a time.
    head = tl.multiple_of(b.to(tl.int64) * stride_b + h.to(tl.int64) * stride_h, ALIGN)
    row = tl.multiple_of(rows.to(tl.int64) * stride_n, ALIGN)
    return base + head + (row[:, None] + cols[None, :])


@triton.jit
def _row(start, stride, ALIGN: tl.constexpr):
    """Offset of row ``start`` (ALIGN: see _tile)."""
    return tl.multiple_of(start * stride, ALIGN)


@triton.jit
def _attn_fwd(Q, K, V, O, LSE,
              stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
              stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
              H, N_Q, N_KV, Q_BUCKET, KV_BUCKET, qk_scale,
              D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr,
              BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
              ALIGN: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    dqk_ok = (dqk < D_QK)[None, :]
    dv_ok = (dv < D_V)[None, :]
    rows_ok = rows < N_Q
    q = tl.load(_tile(Q, b, h, stride_qb, stride_qh, stride_qn, rows, dqk, ALIGN),
                mask=rows_ok[:, None] & dqk_ok, other=0.0)
    k_ptrs = _tile(K, b, h, stride_kb, stride_kh, stride_kn, cols, dqk, ALIGN)
    v_ptrs = _tile(V, b, h, stride_vb, stride_vh, stride_vn, cols, dv, ALIGN)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)  # running row max, log2 units
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    for start in range(0, N_KV, BLOCK_N):
        kv_ok = (start + cols) < N_KV
        k = tl.load(k_ptrs + _row(start, stride_kn, ALIGN), mask=kv_ok[:, None] & dqk_ok,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        s = tl.where(kv_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        v = tl.load(v_ptrs + _row(start, stride_vn, ALIGN), mask=kv_ok[:, None] & dv_ok,
                    other=0.0)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision="ieee")
        m_i = m_new
    acc = acc / l_i[:, None]
    tl.store(_tile(O, b, h, stride_ob, stride_oh, stride_on, rows, dv, ALIGN),
             acc.to(O.dtype.element_ty), mask=rows_ok[:, None] & dv_ok)
    tl.store(LSE + bh * N_Q + rows, (m_i + tl.log2(l_i)) / _LOG2E, mask=rows_ok)


@triton.jit
def _attn_bwd_dkdv(Q, K, V, O, DO, LSE, DQ, DK, DV,
                   stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                   stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                   stride_dob, stride_doh, stride_don, stride_dqb, stride_dqh, stride_dqn,
                   stride_dkb, stride_dkh, stride_dkn, stride_dvb, stride_dvh, stride_dvn,
                   H, N_Q, N_KV, Q_BUCKET, KV_BUCKET, qk_scale, scale,
                   D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr,
                   BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   ALIGN: tl.constexpr, FUSE_DQ: tl.constexpr):
    # Works on transposed scores (keys x queries) so that no [BLOCK_N, BLOCK_M] tile is
    # transposed in registers. FUSE_DQ: this program holds every key, so it also writes dq.
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    kv_rows = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.arange(0, BLOCK_M)
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    dqk_ok = (dqk < D_QK)[None, :]
    dv_ok = (dv < D_V)[None, :]
    kv_ok = kv_rows < N_KV
    k = tl.load(_tile(K, b, h, stride_kb, stride_kh, stride_kn, kv_rows, dqk, ALIGN),
                mask=kv_ok[:, None] & dqk_ok, other=0.0)
    v = tl.load(_tile(V, b, h, stride_vb, stride_vh, stride_vn, kv_rows, dv, ALIGN),
                mask=kv_ok[:, None] & dv_ok, other=0.0)
    q_ptrs = _tile(Q, b, h, stride_qb, stride_qh, stride_qn, rows, dqk, ALIGN)
    do_ptrs = _tile(DO, b, h, stride_dob, stride_doh, stride_don, rows, dv, ALIGN)
    o_ptrs = _tile(O, b, h, stride_ob, stride_oh, stride_on, rows, dv, ALIGN)
    if FUSE_DQ:
        dq_ptrs = _tile(DQ, b, h, stride_dqb, stride_dqh, stride_dqn, rows, dqk, ALIGN)
    grad_k = tl.zeros([BLOCK_N, BLOCK_DQK], tl.float32)
    grad_v = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
    for start in range(0, N_Q, BLOCK_M):
        q_ok = (start + rows) < N_Q
        q = tl.load(q_ptrs + _row(start, stride_qn, ALIGN), mask=q_ok[:, None] & dqk_ok,
                    other=0.0)
        do = tl.load(do_ptrs + _row(start, stride_don, ALIGN), mask=q_ok[:, None] & dv_ok,
                     other=0.0)
        o = tl.load(o_ptrs + _row(start, stride_on, ALIGN), mask=q_ok[:, None] & dv_ok,
                    other=0.0)
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        lse = tl.load(LSE + bh * N_Q + start + rows, mask=q_ok, other=0.0) * _LOG2E
        s_t = tl.dot(k, tl.trans(q), input_precision="ieee") * qk_scale
        p_t = tl.exp2(tl.where(kv_ok[:, None], s_t, float("-inf")) - lse[None, :])
        grad_v = tl.dot(p_t.to(do.dtype), do, grad_v, input_precision="ieee")
        dp_t = tl.dot(v, tl.trans(do), input_precision="ieee")
        ds_t = (p_t * (dp_t - delta[None, :])).to(q.dtype)
        grad_k = tl.dot(ds_t, q, grad_k, input_precision="ieee")
        if FUSE_DQ:
            grad_q = tl.dot(tl.trans(ds_t), k, input_precision="ieee") * scale
            tl.store(dq_ptrs + _row(start, stride_dqn, ALIGN), grad_q.to(DQ.dtype.element_ty),
                     mask=q_ok[:, None] & dqk_ok)
    tl.store(_tile(DK, b, h, stride_dkb, stride_dkh, stride_dkn, kv_rows, dqk, ALIGN),
             (grad_k * scale).to(DK.dtype.element_ty), mask=kv_ok[:, None] & dqk_ok)
    tl.store(_tile(DV, b, h, stride_dvb, stride_dvh, stride_dvn, kv_rows, dv, ALIGN),
             grad_v.to(DV.dtype.element_ty), mask=kv_ok[:, None] & dv_ok)


@triton.jit
def _attn_bwd_dq(Q, K, V, O, DO, LSE, DQ,
                 stride_qb, stride_qh, stride_qn, stride_kb, stride_kh, stride_kn,
                 stride_vb, stride_vh, stride_vn, stride_ob, stride_oh, stride_on,
                 stride_dob, stride_doh, stride_don,
                 stride_dqb, stride_dqh, stride_dqn,
                 H, N_Q, N_KV, Q_BUCKET, KV_BUCKET, qk_scale, scale,
                 D_QK: tl.constexpr, D_V: tl.constexpr, BLOCK_DQK: tl.constexpr,
                 BLOCK_DV: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                 ALIGN: tl.constexpr):
    bh = tl.program_id(0)
    b, h = bh // H, bh % H
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = tl.arange(0, BLOCK_N)
    dqk = tl.arange(0, BLOCK_DQK)
    dv = tl.arange(0, BLOCK_DV)
    dqk_ok = (dqk < D_QK)[None, :]
    dv_ok = (dv < D_V)[None, :]
    rows_ok = rows < N_Q
    q = tl.load(_tile(Q, b, h, stride_qb, stride_qh, stride_qn, rows, dqk, ALIGN),
                mask=rows_ok[:, None] & dqk_ok, other=0.0)
    do = tl.load(_tile(DO, b, h, stride_dob, stride_doh, stride_don, rows, dv, ALIGN),
                 mask=rows_ok[:, None] & dv_ok, other=0.0)
    o = tl.load(_tile(O, b, h, stride_ob, stride_oh, stride_on, rows, dv, ALIGN),
                mask=rows_ok[:, None] & dv_ok, other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    lse = tl.load(LSE + bh * N_Q + rows, mask=rows_ok, other=0.0) * _LOG2E
    k_ptrs = _tile(K, b, h, stride_kb, stride_kh, stride_kn, cols, dqk, ALIGN)
    v_ptrs = _tile(V, b, h, stride_vb, stride_vh, stride_vn, cols, dv, ALIGN)
    grad_q = tl.zeros([BLOCK_M, BLOCK_DQK], tl.float32)
    for start in range(0, N_KV, BLOCK_N):
        kv_ok = (start + cols) < N_KV
        k = tl.load(k_ptrs + _row(start, stride_kn, ALIGN), mask=kv_ok[:, None] & dqk_ok,
                    other=0.0)
        v = tl.load(v_ptrs + _row(start, stride_vn, ALIGN), mask=kv_ok[:, None] & dv_ok,
                    other=0.0)
        s = tl.dot(q, tl.trans(k), input_precision="ieee") * qk_scale
        p = tl.exp2(tl.where(kv_ok[None, :], s, float("-inf")) - lse[:, None])
        dp = tl.dot(do, tl.trans(v), input_precision="ieee")
        ds = (p * (dp - delta[:, None])).to(k.dtype)
        grad_q = tl.dot(ds, k, grad_q, input_precision="ieee")
    tl.store(_tile(DQ, b, h, stride_dqb, stride_dqh, stride_dqn, rows, dqk, ALIGN),
             (grad_q * scale).to(DQ.dtype.element_ty), mask=rows_ok[:, None] & dqk_ok)


def _footprint(kernel: str, tensor_core: list, fp32: list):
    """Footprint of a config of ``kernel`` ("fwd", "dq", "dkdv", or "fused": dkdv with dq):
    None unless it is in the list for the input dtype (``tensor_core`` for fp16/bf16, ``fp32``)
    and its tiles fit within the bucketed sequences.

    Shared memory (bytes): Triton stages the dot operands loaded in the loop ``num_stages``
    times over and the ones loaded before it once, converts the scores (fp32 dots, and the
    fused kernel's transposed ones) through it, plus barriers; an upper bound of what Triton
    3.8 allocates on sm_90 (tests/test_triton_aot.py holds it to that). Words per thread: the
    fp32 accumulators and score tiles plus the 16-bit operands held in registers, for rows
    aligned to 16 bytes (what attention() and attention_packed() pass). fp32 dots run on the
    FMA units in a layout this does not model (0: only their short list of small tiles keeps
    them in check)."""
    def footprint(config, args):
        m = config.kwargs["BLOCK_M"]
        n = config.kwargs.get("BLOCK_N", args.get("BLOCK_N"))
        size = args["Q"].dtype.itemsize
        if (config not in (fp32 if size == 4 else tensor_core)
                or m > args["Q_BUCKET"] or n > args["KV_BUCKET"]):
            return None
        dqk, dv, stages = args["BLOCK_DQK"], args["BLOCK_DV"], max(config.num_stages, 1)
        if kernel == "fwd":  # q once; k, v per stage
            shared = m * dqk + stages * n * (dqk + dv) + m * n
            acc, scores, operands = m * dv, m * n, m * dqk
        elif kernel == "dq":  # q, do once; k, v per stage
            shared = m * (dqk + dv) + stages * n * (dqk + dv) + m * n
            acc, scores, operands = m * dqk, 2 * m * n, m * (dqk + dv)
        else:  # k, v once; q, do, o per stage
            fused = kernel == "fused"
            shared = n * (dqk + dv) + stages * m * (dqk + 2 * dv) + (1 + fused) * m * n
            acc, scores, operands = n * (dqk + dv) + 2 * fused * m * dqk, 2 * m * n, n * (dqk + dv)
        words = 0.0 if size == 4 else (acc + scores + operands * size / 4) / (32 * config.num_warps)
        return _utils.Footprint(shared * size + 1024, words)
    return footprint


def _autotune(kernel: str, max_words: float, tensor_core: list, fp32: list, fn):
    """``tensor_core``, ``fp32``: the configs for fp16/bf16 and for fp32 inputs as (BLOCK_M,
    BLOCK_N or None when the launcher sets it, num_warps, num_stages), the one expected best
    for the ViT sequences (N = 50, 197) on sm_90 first, the smallest last (it fits head dim
    256). ``max_words``: the words a thread holds without spilling (measured on sm_90 by
    tests/test_triton_aot.py)."""
    def configs(tiles):
        return [triton.Config({"BLOCK_M": m} | ({"BLOCK_N": n} if n else {}), num_warps=w,
                              num_stages=s) for m, n, w, s in tiles]
    tensor_core, fp32 = configs(tensor_core), configs(fp32)
    return _utils.autotune(tensor_core + [c for c in fp32 if c not in tensor_core],
                           key=["Q_BUCKET", "KV_BUCKET", "D_QK", "D_V"],
                           footprint=_footprint(kernel, tensor_core, fp32),
                           max_words=max_words)(fn)


# fp32 products (exact, no TF32) run on the FMA units with a whole row of operands per thread:
# only small tiles stay in registers.
_fwd = _autotune("fwd", 128,
                 [(128, 128, 8, 2), (64, 64, 4, 2), (128, 64, 8, 2), (64, 128, 4, 2),
                  (64, 32, 8, 2)],
                 [(64, 32, 8, 2), (32, 32, 8, 2)], _attn_fwd)
_bwd_fused = _autotune("fused", 176, [(64, None, 8, 2), (32, None, 8, 2)],
                       [(16, None, 8, 2), (32, None, 8, 2)], _attn_bwd_dkdv)
_bwd_dkdv = _autotune("dkdv", 160,
                      [(64, 128, 8, 2), (32, 128, 8, 2), (32, 64, 8, 2), (32, 32, 8, 2)],
                      [(16, 64, 8, 2), (32, 32, 8, 2), (32, 64, 8, 2), (16, 32, 8, 2)],
                      _attn_bwd_dkdv)
_bwd_dq = _autotune("dq", 192,
                    [(128, 64, 8, 2), (128, 128, 8, 2), (64, 64, 4, 2), (64, 32, 8, 2)],
                    [(32, 64, 8, 2), (32, 32, 8, 2)], _attn_bwd_dq)


def _bhn(t: torch.Tensor) -> tuple[int, int, int]:
    return t.stride()[:3]


def _block_d(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _bucket(n: int) -> int:
    """Autotuning key of a sequence length: the tile that covers it (one for all N <= 64)."""
    return max(64, triton.next_power_of_2(n))


def _align(*tensors: torch.Tensor) -> int:
    """The largest power of two up to 16 that divides every batch, head and row stride."""
    return math.gcd(16, *(stride for t in tensors for stride in _bhn(t)))


def _sizes(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *others: torch.Tensor) -> dict:
    """The size arguments of every kernel (ALIGN: see _tile) for q, k, v and ``others``."""
    n_q, n_kv, d_qk, d_v = q.shape[2], k.shape[2], q.shape[3], v.shape[3]
    return dict(H=q.shape[1], N_Q=n_q, N_KV=n_kv, Q_BUCKET=_bucket(n_q), KV_BUCKET=_bucket(n_kv),
                D_QK=d_qk, D_V=d_v, BLOCK_DQK=_block_d(d_qk), BLOCK_DV=_block_d(d_v),
                ALIGN=_align(q, k, v, *others))


def _grid(bh: int, n: int, block: str):
    return lambda meta: (bh, triton.cdiv(n, meta[block]))


@_utils.on_input_device
def attention_forward(q, k, v, scale: float, out: torch.Tensor) -> torch.Tensor:
    """Write softmax(q k^T * scale) v into ``out``; all ``[B, H, N, d]`` with last stride 1.
    Returns the row log-sum-exp of the scaled scores, fp32 ``[B, H, N_q]``."""
    b, h, n_q = q.shape[:3]
    lse = torch.empty(b, h, n_q, device=q.device, dtype=torch.float32)
    _fwd[_grid(b * h, n_q, "BLOCK_M")](q, k, v, out, lse, *_bhn(q), *_bhn(k), *_bhn(v), *_bhn(out),
                                       qk_scale=scale * _LOG2E.value, **_sizes(q, k, v, out))
    return lse


def _fuse_backward(sizes: dict, q: torch.Tensor) -> bool:
    """Whether the backward runs as one fused kernel: the keys fit one tile that fits the
    registers (see FUSED_BWD_ELEMENTS) and a config of it fits the device."""
    block_n = sizes["KV_BUCKET"]
    return (block_n <= FUSED_BWD_MAX_KEYS
            and block_n * (sizes["BLOCK_DQK"] + sizes["BLOCK_DV"]) <= FUSED_BWD_ELEMENTS
            and _utils.any_fits(_bwd_fused, dict(sizes, Q=q, BLOCK_N=block_n)))


@_utils.on_input_device
def attention_backward(grad_out, q, k, v, out, lse, scale: float, grad_q, grad_k, grad_v) -> None:
    """Write the gradients of :func:`attention_forward` into ``grad_q/k/v`` (any strides with
    a contiguous last dim, e.g. views of one packed buffer)."""
    b, h, n_q = q.shape[:3]
    sizes = _sizes(q, k, v, out, grad_out, grad_q, grad_k, grad_v)
    common = dict(qk_scale=scale * _LOG2E.value, scale=scale, **sizes)
    inputs = (q, k, v, out, grad_out, lse)
    strides = (*_bhn(q), *_bhn(k), *_bhn(v), *_bhn(out), *_bhn(grad_out))
    if _fuse_backward(sizes, q):
        _bwd_fused[(b * h, 1)](*inputs, grad_q, grad_k, grad_v, *strides, *_bhn(grad_q),
                               *_bhn(grad_k), *_bhn(grad_v), BLOCK_N=sizes["KV_BUCKET"],
                               FUSE_DQ=True, **common)
        return
    _bwd_dkdv[_grid(b * h, k.shape[2], "BLOCK_N")](
        *inputs, None, grad_k, grad_v, *strides, *_bhn(grad_q), *_bhn(grad_k), *_bhn(grad_v),
        FUSE_DQ=False, **common)
    _bwd_dq[_grid(b * h, n_q, "BLOCK_M")](*inputs, grad_q, *strides, *_bhn(grad_q), **common)


def _last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def _aligned_rows(q, k, v) -> bool:
    return _align(q, k, v) * q.element_size() >= 16


def _aligned(q, k, v):
    """q, k, v with a contiguous last dim and rows 16-byte aligned, zero-padded along the head
    dim when they are not: rows of a head dim like 37 in fp16 would load element by element,
    without asynchronous copies, and spill registers. Zero columns leave the scores unchanged
    and add zero columns to the output (cut off by the caller)."""
    q, k, v = (_last_dim_contiguous(t) for t in (q, k, v))
    if _aligned_rows(q, k, v):
        return q, k, v
    multiple = 16 // q.element_size()
    return tuple(F.pad(t, (0, -t.shape[-1] % multiple)).contiguous() for t in (q, k, v))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """``[B, N, H*d]`` -> its ``[B, H, N, d]`` view."""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


@torch.library.custom_op("usfmae::attention_triton", mutates_args=())
def _attention_op(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    out = q.new_empty(*q.shape[:3], v.shape[3])
    return out, attention_forward(q, k, v, scale, out)


@_attention_op.register_fake
def _(q, k, v, scale):
    return q.new_empty(*q.shape[:3], v.shape[3]), q.new_empty(q.shape[:3], dtype=torch.float32)


@torch.library.custom_op("usfmae::attention_triton_backward", mutates_args=())
def _attention_backward_op(grad_out: torch.Tensor, q: torch.Tensor, k: torch.Tensor,
                           v: torch.Tensor, out: torch.Tensor, lse: torch.Tensor,
                           scale: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    grads = q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)
    attention_backward(_last_dim_contiguous(grad_out), q, k, v, out, lse, scale, *grads)
    return grads


@_attention_backward_op.register_fake
def _(grad_out, q, k, v, out, lse, scale):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    *tensors, ctx.scale = inputs
    ctx.save_for_backward(*tensors, *output)
    ctx.mark_non_differentiable(output[1])


def _backward(ctx, grad_out, _grad_lse):
    return *_attention_backward_op(grad_out, *ctx.saved_tensors, ctx.scale), None


_attention_op.register_autograd(_backward, setup_context=_setup_context)


@torch.library.custom_op("usfmae::attention_packed_triton", mutates_args=())
def _attention_packed_op(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    b, n, _, h, d = qkv.shape
    out = qkv.new_empty(b, n, h * d)
    return out, attention_forward(*reference.split_qkv(qkv), scale, _heads(out, h))


@_attention_packed_op.register_fake
def _(qkv, scale):
    b, n, _, h, d = qkv.shape
    return qkv.new_empty(b, n, h * d), qkv.new_empty(b, h, n, dtype=torch.float32)


@torch.library.custom_op("usfmae::attention_packed_triton_backward", mutates_args=())
def _attention_packed_backward_op(grad_out: torch.Tensor, qkv: torch.Tensor, out: torch.Tensor,
                                  lse: torch.Tensor, scale: float) -> torch.Tensor:
    heads = qkv.shape[3]
    grad_qkv = qkv.new_empty(qkv.shape)
    attention_backward(_heads(_last_dim_contiguous(grad_out), heads), *reference.split_qkv(qkv),
                       _heads(out, heads), lse, scale, *reference.split_qkv(grad_qkv))
    return grad_qkv


@_attention_packed_backward_op.register_fake
def _(grad_out, qkv, out, lse, scale):
    return qkv.new_empty(qkv.shape)


def _backward_packed(ctx, grad_out, _grad_lse):
    return _attention_packed_backward_op(grad_out, *ctx.saved_tensors, ctx.scale), None


_attention_packed_op.register_autograd(_backward_packed, setup_context=_setup_context)


def _check_head_dim(name: str, d: int) -> None:
    if d > MAX_HEAD_DIM:
        raise ValueError(f"{name}: the triton backend takes head_dim <= {MAX_HEAD_DIM}, got {d}")


def attention(q, k, v, scale: float | None) -> torch.Tensor:
    """The "triton" backend of ``ops.attention`` (arguments already checked there)."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        _utils.check_dtype(name, t)
    _check_head_dim("q", q.shape[-1])
    _check_head_dim("v", v.shape[-1])
    d_v = v.shape[-1]
    out = _attention_op(*_aligned(q, k, v), q.shape[-1] ** -0.5 if scale is None else scale)[0]
    return out if out.shape[-1] == d_v else out[..., :d_v]


def attention_packed(qkv, scale: float | None) -> torch.Tensor:
    """The "triton" backend of ``ops.attention_packed`` (arguments already checked there)."""
    _utils.check_dtype("qkv", qkv)
    _check_head_dim("qkv", qkv.shape[-1])
    if not _aligned_rows(*reference.split_qkv(qkv)):  # attention() pads them
        return reference.merge_heads(attention(*reference.split_qkv(qkv), scale))
    return _attention_packed_op(qkv, qkv.shape[-1] ** -0.5 if scale is None else scale)[0]
