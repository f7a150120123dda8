"""How a call of each op is described (its *spec*) and how a backend is checked on one.

A spec holds what picks a kernel's code path and its tuned config: the device type, dtypes, and
a shape class (head dims and the sequence bucket for attention; L and D for masking; patch
size, channels and flags for the loss). The check runs the backend on a small input of that
class, forward and backward with a random upstream gradient, and compares it with
``reference.py``: bit-exact for masking, otherwise with the low-precision rule of the tests
(the backend's error against the fp64 reference at most twice PyTorch's own error in the same
dtype, plus a small floor). Inputs come from a fixed seed, so a check is reproducible, and
nothing here touches the caller's random state.
"""
from __future__ import annotations

import operator
from typing import NamedTuple

import torch

from . import reference

# fp64: the compiled attention keeps the row log-sum-exp in fp32 (its schema), which bounds its
# fp64 gradients to ~1e-7 relative; the floor says what the kernels promise, not fp64's epsilon.
_FLOOR = {torch.float64: 1e-6, torch.float32: 2e-5, torch.float16: 1e-5, torch.bfloat16: 1e-4}


# On a GPU the check's input is big enough to fill the device: the Triton autotuner keeps the
# config it picks on the first input of a key, and that is the check's.


class AttentionSpec(NamedTuple):
    device: str
    dtype: torch.dtype
    n_q: int    # the sequence bucket: max(64, next power of two), what picks a tile config
    n_kv: int
    d_qk: int
    d_v: int
    same_shape: bool  # q, k and v of one shape (self-attention; always so when packed)

    @property
    def label(self) -> str:
        return f"d={self.d_qk} N<={self.n_q}" + ("" if self.same_shape else f" Nk<={self.n_kv}")


class MaskingSpec(NamedTuple):
    device: str
    dtype: torch.dtype
    noise: torch.dtype | None  # None: the backend draws the noise itself
    length: int
    dim: int

    @property
    def label(self) -> str:
        return f"L={self.length} D={self.dim} " + ("noise given" if self.noise else "own noise")


class LossSpec(NamedTuple):
    device: str
    imgs: torch.dtype
    pred: torch.dtype
    mask: torch.dtype
    channels: int
    patch: int
    norm: bool
    with_grad: bool

    @property
    def label(self) -> str:
        return f"C={self.channels} p={self.patch}" + (" norm" if self.norm else "")


def _static(n) -> int:
    """A size as an int: under torch.compile with dynamic shapes, index() specializes a symbolic
    size (with a guard), so the spec is a constant and the kernel that runs was checked."""
    return operator.index(n)


def seq_bucket(n) -> int:
    return max(64, 1 << (_static(n) - 1).bit_length())


def _bucket_length(bucket: int) -> int:
    """A sequence length inside ``bucket``, odd where possible: 53, 101, 197, 389, ..."""
    return 3 * bucket // 4 + 5


# The describe_* functions run on every call: a few microseconds (is_cuda is cheaper than
# .device).
def _device_type(t: torch.Tensor) -> str:
    return "cuda" if t.is_cuda else t.device.type


def describe_attention(q, k, v, scale=None) -> AttentionSpec:
    q_shape, k_shape, v_shape = q.shape, k.shape, v.shape
    same_shape = True if q_shape == k_shape == v_shape else False  # a guard, not a SymBool
    return AttentionSpec(_device_type(q), q.dtype, seq_bucket(q_shape[2]), seq_bucket(k_shape[2]),
                         _static(q_shape[3]), _static(v_shape[3]), same_shape)


def describe_attention_packed(qkv, scale=None) -> AttentionSpec:
    shape = qkv.shape
    n, d = seq_bucket(shape[1]), _static(shape[4])
    return AttentionSpec(_device_type(qkv), qkv.dtype, n, n, d, d, True)


def describe_masking(x, noise, num_keep) -> MaskingSpec:
    shape = x.shape
    return MaskingSpec(_device_type(x), x.dtype, None if noise is None else noise.dtype,
                       _static(shape[1]), _static(shape[2]))


def describe_loss(imgs, pred, mask, patch_size, norm_pix_loss) -> LossSpec:
    return LossSpec(_device_type(pred), imgs.dtype, pred.dtype, mask.dtype, _static(imgs.shape[1]),
                    int(patch_size), bool(norm_pix_loss),
                    bool(pred.requires_grad and torch.is_grad_enabled()))


def _randn(shape, dtype, device, gen) -> torch.Tensor:
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(device=device, dtype=dtype)


def _run(fn, inputs, grads_of, upstream):
    """Outputs of ``fn(*inputs)`` and the gradients of ``inputs[i] for i in grads_of`` for the
    given upstream gradient of the first output."""
    leaves = [t.detach().clone().requires_grad_(i in grads_of) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    outputs = out if isinstance(out, tuple) else (out,)
    if not grads_of:
        return [o.detach() for o in outputs]
    wanted = [leaves[i] for i in grads_of]
    grads = torch.autograd.grad(outputs[0], wanted, upstream.to(outputs[0].dtype))
    return [o.detach() for o in outputs] + list(grads)


def _assert_close(names, got, low, exact, dtype) -> None:
    floor = _FLOOR.get(dtype, 1e-5)
    for name, g, lo, e in zip(names, got, low, exact):
        if g.shape != e.shape:
            raise AssertionError(f"{name}: shape {tuple(g.shape)}, expected {tuple(e.shape)}")
        e = e.double()
        err = (g.double() - e).abs().max().item() if e.numel() else 0.0
        base = (lo.double() - e).abs().max().item() if e.numel() else 0.0
        scale = max(e.abs().max().item() if e.numel() else 0.0, 1.0)
        if not err <= 2 * base + floor * scale:  # also false for NaN
            raise AssertionError(f"{name}: max error {err:.3g} vs PyTorch's {base:.3g} in {dtype} "
                                 f"(allowed {2 * base + floor * scale:.3g})")


def _compare(fn, ref, inputs, grads_of, upstream, names, dtype) -> None:
    """``fn`` against ``ref`` run in fp64 (exact) and in the inputs' dtype (PyTorch's error)."""
    exact = _run(ref, [t.double() if t.is_floating_point() else t for t in inputs], grads_of,
                 upstream.double())
    low = _run(ref, inputs, grads_of, upstream)
    got = _run(fn, inputs, grads_of, upstream)
    if len(got) != len(exact):
        raise AssertionError(f"returned {len(got)} tensors, expected {len(exact)}")
    _assert_close(names, got, low, exact, dtype)


def check_attention(fn, spec: AttentionSpec, device, *, packed: bool) -> None:
    gen = torch.Generator().manual_seed(0)
    n_q = _bucket_length(spec.n_q)
    n_kv = n_q if spec.same_shape else _bucket_length(spec.n_kv) - 2  # a length of its own
    scale = 0.7 * spec.d_qk ** -0.5
    b, h = (8, 12) if device.type == "cuda" else (2, 2)
    if packed:
        qkv = _randn((b, n_q, 3, h, spec.d_qk), spec.dtype, device, gen)
        upstream = _randn((b, n_q, h * spec.d_v), torch.float32, device, gen)
        _compare(lambda t: fn(t, scale), lambda t: reference.attention_packed(t, scale), [qkv],
                 [0], upstream, ["out", "grad_qkv"], spec.dtype)
        return
    q = _randn((b, h, n_q, spec.d_qk), spec.dtype, device, gen)
    k = _randn((b, h, n_kv, spec.d_qk), spec.dtype, device, gen)
    v = _randn((b, h, n_kv, spec.d_qk if spec.same_shape else spec.d_v), spec.dtype, device, gen)
    upstream = _randn((b, h, n_q, spec.d_v), torch.float32, device, gen)
    _compare(lambda *t: fn(*t, scale), lambda *t: reference.attention(*t, scale), [q, k, v],
             [0, 1, 2], upstream, ["out", "grad_q", "grad_k", "grad_v"], spec.dtype)


def check_masking(fn, spec: MaskingSpec, device) -> None:
    gen = torch.Generator().manual_seed(0)
    rows, num_keep = 64 if device.type == "cuda" else 4, max(spec.length // 4, 1)
    x = _randn((rows, spec.length, spec.dim), spec.dtype, device, gen)
    upstream = _randn((rows, num_keep, spec.dim), spec.dtype, device, gen)
    if spec.noise is not None:
        noise = torch.rand((rows, spec.length), generator=gen).to(device, spec.noise)
        expected = _run(lambda t: reference.mask_by_noise(t, noise, num_keep), [x], [0], upstream)
        got = _run(lambda t: fn(t, noise, num_keep), [x], [0], upstream)
        for name, g, e in zip(("x_masked", "mask", "ids_restore", "grad_x"), got, expected):
            if g.shape != e.shape or g.dtype != e.dtype or not torch.equal(g, e):
                raise AssertionError(f"{name} differs from reference.mask_by_noise")
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):  # the caller's random state stays as it was
        x_masked, mask, ids, grad_x = _run(lambda t: fn(t, None, num_keep), [x], [0], upstream)
    # Without noise: ids_restore must be a permutation, mask and x_masked consistent with it,
    # and the rows' masks different (a kernel drawing one noise row for all would repeat it).
    if not torch.equal(ids.sort(dim=1).values, torch.arange(spec.length, device=device).expand_as(ids)):
        raise AssertionError("ids_restore is not a permutation of each row")
    expected = reference.mask_by_noise(x, ids.to(torch.float64), num_keep)
    for name, g, e in zip(("x_masked", "mask"), (x_masked, mask), expected):
        if not torch.equal(g, e):
            raise AssertionError(f"{name} does not match the kept patches of ids_restore")
    keep = ids < num_keep
    if not torch.equal(grad_x[keep].reshape(-1), upstream.gather(1, ids.clamp(max=num_keep - 1)
                       .unsqueeze(-1).expand(-1, -1, spec.dim))[keep].reshape(-1)) \
            or grad_x[~keep].abs().sum() != 0:
        raise AssertionError("grad_x is not the upstream gradient scattered to the kept patches")
    if spec.length >= 16 and bool((mask == mask[:1]).all()):
        raise AssertionError("every row got the same mask from self-drawn noise")


def check_loss(fn, spec: LossSpec, device) -> None:
    gen = torch.Generator().manual_seed(0)
    p, c = spec.patch, spec.channels
    n, grid = (32, (8, 8)) if device.type == "cuda" else (2, (2, 3))
    length = grid[0] * grid[1]
    imgs = _randn((n, c, grid[0] * p, grid[1] * p), spec.imgs, device, gen)
    pred = _randn((n, length, p * p * c), spec.pred, device, gen)
    mask = (torch.arange(n * length).reshape(n, length) % 3 != 0).to(device, spec.mask)
    upstream = torch.tensor(0.37, device=device)  # not 1: a backward must scale by it
    dtype = torch.promote_types(spec.pred, spec.imgs)
    _compare(lambda t: fn(imgs, t, mask, p, spec.norm),
             lambda t: reference.mae_loss(imgs.to(t.dtype), t, mask, p, spec.norm), [pred],
             [0] if spec.with_grad else [], upstream, ["loss", "grad_pred"], dtype)


def attention_examples(device: str, dtype: torch.dtype) -> list[AttentionSpec]:
    """The ViT cases: N = 50 and 197 (buckets 64, 256) at head dims 32, 64, 128; 80 and 256 at
    N = 197. fp32 (slow to compile in Triton, never "auto"'s Triton choice): head dim 64 only."""
    cases = ([(64, 64), (256, 64)] if dtype == torch.float32 else
             [(n, d) for d in (32, 64, 128) for n in (64, 256)] + [(256, 80), (256, 256)])
    return [AttentionSpec(device, dtype, n, n, d, d, True) for n, d in cases]


def masking_examples(device: str, dtype: torch.dtype) -> list[MaskingSpec]:
    return [MaskingSpec(device, dtype, noise, length, dim)
            for noise in (torch.float32, None) for length, dim in ((196, 768), (49, 33))]


def loss_examples(device: str, dtype: torch.dtype) -> list[LossSpec]:
    return [LossSpec(device, dtype, dtype, dtype, c, p, norm, True)
            for c, p in ((3, 16), (1, 8)) for norm in (False, True)]
