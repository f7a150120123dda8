"""Every op's backward with random upstream gradients, on every usable backend, against
ops/reference.py.

Training never sends a backward pass a gradient of ones: GradScaler multiplies the loss by 2**16,
accumulation divides it, a loss term has a weight, and the gradient reaching an op's output
may be non-contiguous (from a transpose) or broadcast (from a sum). A backward that ignores or
mis-strides its incoming gradient passes every test that calls ``.backward()`` on a scalar
loss. Here each gradient is computed for such upstream gradients and compared with the
reference run in fp64; low precision follows the flash-attention rule of the other op tests:
the backend's error is at most twice the error of the reference's own run in that dtype, plus a
floor.
"""
import pytest
import torch

from _tolerance import assert_within_twice_torch
from conftest import usable_backends
from usfmae_fast import ops
from usfmae_fast.ops import reference
from usfmae_fast.ops.triton import _utils as triton_utils

DEVICES = ("cpu", "cuda") if torch.cuda.is_available() else ("cpu",)
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
FLOOR = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
LAYOUTS = ("contiguous", "transposed", "broadcast")
# Upstream gradients of a scalar loss: a weight, a sign flip, accumulation over 3 steps,
# GradScaler's initial scale, and a loss term switched off.
LOSS_UPSTREAMS = (0.37, -2.0, 1 / 3, 2.0**16, 0.0)


def _cases(op: str):
    """(device, backend, dtype) for every usable backend of op; no bf16 in Triton's interpreter."""
    return [pytest.param(device, name, dtype, id=f"{device}-{name}-{str(dtype)[6:]}")
            for device in DEVICES for name in usable_backends(op, device) for dtype in DTYPES
            if not (name == "triton" and triton_utils.INTERPRET and dtype == torch.bfloat16)]


def _upstream(shape, layout, dtype, device, gen):
    """A random gradient of ``shape``: contiguous, a transposed (non-contiguous) view, or one
    value per row broadcast along the last dimension (stride 0), as a sum would send."""
    if layout == "contiguous":
        grad = torch.randn(shape, generator=gen)
    elif layout == "transposed":
        grad = torch.randn(*shape[:-2], shape[-1], shape[-2], generator=gen).transpose(-1, -2)
    else:
        grad = torch.randn(*shape[:-1], 1, generator=gen).expand(shape)
    return grad.to(device=device, dtype=dtype)


def _grads(fn, inputs, upstream, dtype=None, wrt=None):
    """Gradients of ``fn(*inputs)`` w.r.t. the inputs numbered in ``wrt`` (default: all) for the
    output gradient ``upstream``, with inputs and upstream cast to ``dtype`` first when given."""
    wrt = range(len(inputs)) if wrt is None else wrt
    leaves = [t.detach().to(dtype or t.dtype).requires_grad_(i in wrt)
              for i, t in enumerate(inputs)]
    fn(*leaves).backward(upstream if dtype is None else upstream.to(dtype))
    return [leaves[i].grad for i in wrt]


def _assert_close(name, got, exact, low_precision_run, floor, scale):
    """got within twice the error of low_precision_run against exact (fp64), plus floor * scale,
    where scale is the largest exact gradient of the call (gradients of a mean over many values
    are tiny, so no absolute floor of 1)."""
    assert got.shape == exact.shape, name
    if got.numel() == 0:
        return
    assert torch.isfinite(got).all(), f"{name}: not finite"
    assert_within_twice_torch(name, got, exact, low_precision_run, floor * scale)


def _check(op_fn, reference_fn, inputs, upstream, dtype):
    """The op's gradients against the fp64 reference, allowing twice the reference's own error
    in ``dtype``; the inputs are already in ``dtype``."""
    got = _grads(op_fn, inputs, upstream)
    exact = _grads(reference_fn, inputs, upstream, torch.float64)
    own_run = _grads(reference_fn, inputs, upstream)
    scale = max(e.abs().max().item() for e in exact if e.numel())
    for i, (g, e, r) in enumerate(zip(got, exact, own_run)):
        assert g.dtype == inputs[i].dtype
        _assert_close(f"grad {i}", g, e, r, FLOOR[dtype], scale)


# ------------------------------------------------------------------------------ random_masking

MASKING_SHAPES = ((1, 1, 3), (3, 50, 7), (2, 197, 48), (5, 97, 130))


@pytest.mark.parametrize("device, backend_name, dtype", _cases("random_masking"))
def test_random_masking_backward(backend, device, backend_name, dtype):
    """Gathers are exact: the gradient of x equals the reference's bit for bit."""
    backend(backend_name)
    gen = torch.Generator().manual_seed(0)
    for i, (n, length, dim) in enumerate(MASKING_SHAPES):
        x = torch.randn(n, length, dim, generator=gen).to(device=device, dtype=dtype)
        noise = torch.rand(n, length, generator=gen).to(device)
        num_keep = reference.num_kept(length, 0.75)
        upstream = _upstream((n, num_keep, dim), LAYOUTS[i % 3], dtype, device, gen)
        got = _grads(lambda t: ops.random_masking(t, 0.75, noise)[0], [x], upstream)[0]
        expected = _grads(lambda t: reference.random_masking(t, 0.75, noise)[0], [x], upstream)[0]
        assert got.dtype == dtype and torch.equal(got, expected), (n, length, dim)


# ----------------------------------------------------------------------------------- attention

ATTENTION_SHAPES = ((1, 1, 1, 32), (2, 3, 50, 64), (1, 2, 97, 40), (1, 2, 77, 128))
SCALES = (None, 0.3, None, 0.1)


@pytest.mark.parametrize("device, backend_name, dtype", _cases("attention"))
def test_attention_backward(backend, device, backend_name, dtype):
    backend(backend_name)
    gen = torch.Generator().manual_seed(1)
    for i, (shape, scale) in enumerate(zip(ATTENTION_SHAPES, SCALES)):
        q, k, v = (torch.randn(shape, generator=gen).to(device=device, dtype=dtype)
                   for _ in range(3))
        upstream = _upstream(shape, LAYOUTS[i % 3], dtype, device, gen)
        _check(lambda *t: ops.attention(*t, scale=scale),
               lambda *t: reference.attention(*t, scale), [q, k, v], upstream, dtype)


@pytest.mark.parametrize("device, backend_name, dtype", _cases("attention_packed"))
def test_attention_packed_backward(backend, device, backend_name, dtype):
    backend(backend_name)
    gen = torch.Generator().manual_seed(2)
    for i, ((b, h, n, d), scale) in enumerate(zip(ATTENTION_SHAPES, SCALES)):
        qkv = torch.randn(b, n, 3, h, d, generator=gen).to(device=device, dtype=dtype)
        upstream = _upstream((b, n, h * d), LAYOUTS[i % 3], dtype, device, gen)
        _check(lambda t: ops.attention_packed(t, scale),
               lambda t: reference.attention_packed(t, scale), [qkv], upstream, dtype)


# ------------------------------------------------------------------------------------ mae_loss

# (N, C, H, W, p): L = 16, 49, 97 (1 x 97), 4 with p = 7
LOSS_SHAPES = ((1, 1, 16, 16, 4), (3, 3, 28, 28, 4), (2, 1, 4, 388, 4), (2, 3, 14, 14, 7))


def _loss_inputs(shape, dtype, device, gen):
    """imgs and mask in fp32 and pred in dtype, as the decoder's output under autocast."""
    n, c, h, w, p = shape
    length = (h // p) * (w // p)
    imgs = torch.rand(n, c, h, w, generator=gen).to(device)
    pred = torch.randn(n, length, p * p * c, generator=gen).to(device=device, dtype=dtype)
    mask = (torch.rand(n, length, generator=gen) < 0.75).float().to(device)
    mask[0, 0] = 1
    return imgs, pred, mask


@pytest.mark.parametrize("upstream", LOSS_UPSTREAMS)
@pytest.mark.parametrize("device, backend_name, dtype", _cases("mae_loss"))
def test_mae_loss_backward_scales_by_the_upstream_gradient(backend, device, backend_name, dtype,
                                                           upstream):
    backend(backend_name)
    gen = torch.Generator().manual_seed(3)
    for shape in LOSS_SHAPES:
        imgs, pred, mask = _loss_inputs(shape, dtype, device, gen)
        for norm_pix_loss in (False, True):
            def loss(fn):
                return lambda i, p, m: fn(i, p, m, shape[-1], norm_pix_loss)
            inputs, grad = [imgs, pred, mask], torch.tensor(upstream)
            (got,) = _grads(loss(ops.mae_loss), inputs, grad, wrt=(1,))
            (exact,) = _grads(loss(reference.mae_loss), inputs, grad, torch.float64, wrt=(1,))
            (own_run,) = _grads(loss(reference.mae_loss), inputs, grad, wrt=(1,))
            assert got.dtype == dtype
            _assert_close(f"grad_pred {shape} norm={norm_pix_loss}", got, exact, own_run,
                          FLOOR[dtype], exact.abs().max().item())


@pytest.mark.parametrize("device, backend_name", [
    pytest.param(device, name, id=f"{device}-{name}") for device in DEVICES
    for name in usable_backends("mae_loss", device)])
def test_mae_loss_fp16_gradient_under_a_grad_scaler_scale(backend, device, backend_name):
    """A ViT-B decoder's loss (p = 16, 768 values per patch) under fp16 autocast with GradScaler
    at 2**15: d loss / d pred is about 4e-6, below fp16's normal range, so a backward that rounds
    it to fp16 before applying the scale is off by ~1 % (4x PyTorch's largest error, before
    17233f8 fixed it)."""
    backend(backend_name)
    gen = torch.Generator().manual_seed(4)
    imgs, pred, mask = _loss_inputs((4, 3, 224, 224, 16), torch.float16, device, gen)

    def loss(i, p, m, fn=ops.mae_loss):
        return fn(i, p, m, 16, True)
    inputs, grad = [imgs, pred, mask], torch.tensor(2.0**15)
    (got,) = _grads(loss, inputs, grad, wrt=(1,))
    (exact,) = _grads(lambda *t: loss(*t, fn=reference.mae_loss), inputs, grad, torch.float64,
                      wrt=(1,))
    (own_run,) = _grads(lambda *t: loss(*t, fn=reference.mae_loss), inputs, grad, wrt=(1,))
    _assert_close("grad_pred", got, exact, own_run, 0.0, 0.0)
