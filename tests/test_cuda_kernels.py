"""The CUDA kernels of usfmae_fast._C (csrc/cuda), called directly as torch.ops.usfmae.*, against
ops/reference.py: values and gradients on awkward shapes, a seeded fuzz per op, bad input.

Low-precision results follow the flash-attention rule: their error against an fp64 reference is
at most twice the error of PyTorch's own run in the same dtype. Every test is skipped without a
CUDA device or without the op's CUDA kernel.
"""
import math
import os
import random

import pytest
import torch

from _tolerance import assert_within_twice_torch
from conftest import requires_cuda
from usfmae_fast.ops import _ext, reference

DEVICE = "cuda"
FUZZ_CASES = int(os.environ.get("USFMAE_FUZZ_CASES", "200"))  # gpu_check.py shortens the fuzz
SEQ_LENS = (1, 49, 50, 97, 197, 200)
LOW_PRECISION = (torch.float16, torch.bfloat16)


def dtype_id(value):
    """Test ids such as bfloat16 or float32-bfloat16-float32 instead of dtype0."""
    if isinstance(value, tuple):
        return "-".join(map(dtype_id, value))
    return str(value).removeprefix("torch.")


def requires_kernels(*ops):
    missing = [op for op in ops if not _ext.has_kernel(op, "CUDA")]
    return pytest.mark.skipif(bool(missing), reason=f"no CUDA kernel for {', '.join(missing)} "
                              f"({_ext.LOAD_MESSAGE})")


masking_kernels = requires_kernels("random_masking", "random_masking_backward")
loss_kernel = requires_kernels("mae_loss_fused")
attention_kernels = requires_kernels("attention_fwd", "attention_bwd", "attention_packed_fwd",
                                     "attention_packed_bwd")
pytestmark = requires_cuda


def _randn(*shape, dtype=torch.float32, gen=None):
    return torch.randn(*shape, generator=gen).to(dtype).to(DEVICE)


def _within_twice_torch(got, expected, torch_run, name):
    # The slack covers results PyTorch happens to get exact (e.g. a zero dq for one key).
    slack = 1e-5 * max(expected.abs().max().item() if expected.numel() else 0.0, 1.0)
    assert_within_twice_torch(name, got, expected, torch_run, slack)


# --- random_masking ------------------------------------------------------------------------

def _check_masking(x, noise, num_keep):
    got = torch.ops.usfmae.random_masking(x, noise, num_keep)
    # The reference runs on the CPU, whose stable sort defines the contract: -0.0 == +0.0,
    # NaN after every number, ties to the lower index.
    x_ref = x.detach().cpu().requires_grad_(True)
    expected = reference.mask_by_noise(x_ref, noise.cpu(), num_keep)
    for name, g, e in zip(("x_masked", "mask", "ids_restore"), got, expected):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        assert torch.equal(g.cpu(), e), name
    grad = torch.randn(got[0].shape).to(x.dtype).to(x.device)
    expected[0].backward(grad.cpu())
    grad_x = torch.ops.usfmae.random_masking_backward(grad, got[2])
    assert torch.equal(grad_x.cpu(), x_ref.grad)


@masking_kernels
@pytest.mark.parametrize("length", SEQ_LENS + (1024, 4096))
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64],
                         ids=dtype_id)
@pytest.mark.parametrize("dim", [1, 7, 768])  # element-wise copies, and 16-byte ones
def test_random_masking_matches_reference(length, dtype, dim):
    gen = torch.Generator().manual_seed(length * dim)
    n = 2 if length > 1000 else 3
    x = _randn(n, length, dim, dtype=dtype, gen=gen)
    _check_masking(x, torch.rand(n, length, generator=gen).to(DEVICE), length // 4)


@masking_kernels
@pytest.mark.parametrize("noise_dtype", [torch.float32, torch.float64, torch.float16,
                                         torch.bfloat16], ids=dtype_id)
def test_random_masking_ties_nan_infinity_and_signed_zero(noise_dtype):
    noise = torch.randint(0, 4, (5, 197)).float()
    noise[1, ::7] = math.nan
    noise[2, ::5], noise[2, 1::5] = -0.0, 0.0
    noise[3, ::3], noise[3, 1::3] = math.inf, -math.inf
    noise[4] = math.nan
    for num_keep in (0, 49, 197):
        _check_masking(_randn(5, 197, 24), noise.to(noise_dtype).to(DEVICE), num_keep)


@masking_kernels
def test_random_masking_unaligned_rows_use_element_copies():
    storage = _randn(2 * 50 * 768 + 1, dtype=torch.bfloat16)
    _check_masking(storage[1:].view(2, 50, 768), torch.rand(2, 50).to(DEVICE), 12)


@masking_kernels
def test_random_masking_fuzz():
    rng = random.Random(0)
    for _ in range(FUZZ_CASES):
        n, length, dim = rng.randint(1, 5), rng.randint(1, 300), rng.randint(1, 100)
        dtype = rng.choice((torch.float32, torch.float16, torch.bfloat16, torch.float64))
        noise = torch.randint(0, rng.choice((3, 1000)), (n, length)).to(
            rng.choice((torch.float32, torch.float64, torch.float16)))
        _check_masking(_randn(n, length, dim, dtype=dtype), noise.to(DEVICE),
                       rng.randint(0, length))


# --- mae_loss_fused ----------------------------------------------------------------------------

MAE_DTYPES = [  # (imgs, pred, mask)
    (torch.float32,) * 3, (torch.bfloat16,) * 3, (torch.float16,) * 3,
    (torch.float32, torch.bfloat16, torch.float32), (torch.float32, torch.float32, torch.float64),
    (torch.float64,) * 3,
]


def _mae_inputs(n, c, h, w, p, dtypes, gen=None):
    length = (h // p) * (w // p)
    imgs = _randn(n, c, h, w, dtype=dtypes[0], gen=gen)
    pred = _randn(n, length, p * p * c, dtype=dtypes[1], gen=gen)
    mask = (torch.rand(n, length, generator=gen) < 0.75).to(dtypes[2]).to(DEVICE)
    mask.view(-1)[0] = 1.0  # never an all-visible batch
    return imgs, pred, mask


def _mae_reference(imgs, pred, mask, p, norm, dtype=None):
    """Loss and gradient of the reference in `dtype`, or in the inputs' own dtypes (None)."""
    imgs, pred, mask = (t if dtype is None else t.to(dtype) for t in (imgs, pred, mask))
    leaf = pred.detach().requires_grad_(True)
    loss = reference.mae_loss(imgs, leaf, mask, p, norm)
    loss.backward()
    return loss.detach(), leaf.grad


def _check_mae_loss(imgs, pred, mask, p, norm):
    loss, grad = torch.ops.usfmae.mae_loss_fused(imgs, pred, mask, p, norm, True)
    loss_only, empty = torch.ops.usfmae.mae_loss_fused(imgs, pred, mask, p, norm, False)
    dtype = torch.promote_types(torch.promote_types(imgs.dtype, pred.dtype), mask.dtype)
    assert loss.shape == () and loss.dtype == dtype and empty.shape == (0,)
    torch.testing.assert_close(loss, loss_only, rtol=0, atol=0, equal_nan=True)
    assert grad.shape == pred.shape and grad.dtype == pred.dtype
    exact = _mae_reference(imgs, pred, mask, p, norm, torch.float64)
    if exact[0].isnan():  # norm_pix_loss on one-value patches: no unbiased variance, as torch.var
        assert loss.isnan() and torch.equal(grad.isnan(), exact[1].isnan())
        return
    if dtype == torch.float64:
        torch.testing.assert_close(loss, exact[0], rtol=1e-12, atol=1e-14)
    else:  # computed in fp32 from the same inputs, then rounded to dtype
        rtol = max(2e-5, torch.finfo(dtype).eps)
        torch.testing.assert_close(loss.double(), exact[0], rtol=rtol, atol=1e-6)
    if pred.dtype in LOW_PRECISION:
        torch_run = _mae_reference(imgs, pred, mask, p, norm)
        _within_twice_torch(grad, exact[1], torch_run[1], "grad_pred")
    else:
        tol = 1e-12 if pred.dtype == torch.float64 else 1e-5
        torch.testing.assert_close(grad.double(), exact[1], rtol=tol, atol=tol * 1e-3)


@loss_kernel
@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 4), (3, 3, 32, 32, 16), (2, 1, 12, 20, 4),
                                   (5, 3, 14, 14, 7), (2, 3, 224, 224, 16), (2, 3, 64, 64, 32),
                                   (3, 3, 6, 9, 3)])
@pytest.mark.parametrize("dtypes", MAE_DTYPES, ids=dtype_id)
def test_mae_loss_matches_reference(norm_pix_loss, shape, dtypes):
    *dims, p = shape
    imgs, pred, mask = _mae_inputs(*dims, p, dtypes, torch.Generator().manual_seed(sum(shape)))
    _check_mae_loss(imgs, pred, mask, p, norm_pix_loss)


@loss_kernel
def test_mae_loss_is_deterministic_and_nan_without_masked_patches():
    imgs, pred, mask = _mae_inputs(64, 3, 32, 32, 8, (torch.float32,) * 3)
    runs = [torch.ops.usfmae.mae_loss_fused(imgs, pred, mask, 8, True, True) for _ in range(3)]
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))
    loss, grad = torch.ops.usfmae.mae_loss_fused(imgs, pred, torch.zeros_like(mask), 8, True, True)
    assert loss.isnan() and grad.isnan().all()  # 0 / 0, as the reference


@loss_kernel
@pytest.mark.filterwarnings("ignore:var\\(\\)")  # one-value patches, see _check_mae_loss
def test_mae_loss_fuzz():
    rng = random.Random(1)
    for _ in range(FUZZ_CASES):
        p, c = rng.choice((1, 2, 3, 4, 8, 16)), rng.choice((1, 3))
        dims = (rng.randint(1, 4), c, p * rng.randint(1, 5), p * rng.randint(1, 5))
        dtypes = tuple(rng.choice((torch.float32, torch.bfloat16, torch.float16)) for _ in range(3))
        imgs, pred, mask = _mae_inputs(*dims, p, dtypes)
        _check_mae_loss(imgs, pred, mask, p, rng.random() < 0.5)


# --- attention ---------------------------------------------------------------------------------

def _attention_autograd(q, k, v, grad_out, scale, dtype):
    leaves = [t.detach().to(dtype).requires_grad_(True) for t in (q, k, v)]
    out = reference.attention(*leaves, scale)
    out.backward(grad_out.to(dtype))
    return [out.detach()] + [t.grad for t in leaves]


def _check_attention(q, k, v, scale, packed=None):
    """q, k, v [B, H, N, d] (views of `packed` [B, N, 3, H, d] when given)."""
    grad_out = torch.randn(q.shape).to(q.dtype).to(DEVICE)
    if packed is None:
        out, lse = torch.ops.usfmae.attention_fwd(q, k, v, scale)
        got = [out, *torch.ops.usfmae.attention_bwd(grad_out, q, k, v, out, lse, scale)]
    else:
        flat_grad = reference.merge_heads(grad_out)
        out_flat, lse = torch.ops.usfmae.attention_packed_fwd(packed, scale)
        grad_qkv = torch.ops.usfmae.attention_packed_bwd(flat_grad, packed, out_flat, lse, scale)
        assert out_flat.shape == flat_grad.shape and grad_qkv.shape == packed.shape
        out = out_flat.unflatten(2, (q.shape[1], q.shape[3])).transpose(1, 2)
        got = [out, *reference.split_qkv(grad_qkv)]
    assert all(g.dtype == q.dtype for g in got) and lse.dtype == torch.float32
    exact = _attention_autograd(q, k, v, grad_out, scale, torch.float64)
    scores = (q.double() @ k.double().transpose(-2, -1)) * scale
    torch.testing.assert_close(lse.double(), torch.logsumexp(scores, -1), rtol=0, atol=1e-4)
    names = ("out", "dq", "dk", "dv")
    if q.dtype in LOW_PRECISION:
        torch_run = _attention_autograd(q, k, v, grad_out, scale, q.dtype)
        for name, g, e, t in zip(names, got, exact, torch_run):
            _within_twice_torch(g, e, t, name)
    else:
        # fp32, and fp64 too: its backward takes P from the fp32 lse of the schema.
        for name, g, e in zip(names, got, exact):
            torch.testing.assert_close(g.double(), e, rtol=1e-5, atol=1e-5, msg=name)
    return got


def _packed_inputs(b, n, h, d, dtype, gen=None):
    qkv = _randn(b, n, 3, h, d, dtype=dtype, gen=gen)
    return (*reference.split_qkv(qkv), qkv)


@attention_kernels
@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=dtype_id)
def test_attention_packed_matches_reference(seq, head_dim, dtype):
    q, k, v, qkv = _packed_inputs(2, seq, 3, head_dim, dtype, torch.Generator().manual_seed(seq))
    _check_attention(q, k, v, head_dim ** -0.5, packed=qkv)


@attention_kernels
@pytest.mark.parametrize("seq", [1, 50, 65, 197])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32, torch.float64],
                         ids=dtype_id)
@pytest.mark.parametrize("layout", ["contiguous", "transposed", "strided"])
def test_attention_unpacked_matches_reference(seq, dtype, layout):
    gen = torch.Generator().manual_seed(seq)

    def make(n):  # [B, H, N, 64] in different memory layouts
        if layout == "transposed":
            return _randn(2, n, 3, 64, dtype=dtype, gen=gen).transpose(1, 2)
        if layout == "strided":
            return _randn(2, 3, n, 128, dtype=dtype, gen=gen)[..., 32:96]
        return _randn(2, 3, n, 64, dtype=dtype, gen=gen)

    _check_attention(make(seq), make(seq), make(seq), 0.2)


@attention_kernels
@pytest.mark.parametrize("head_dim", [8, 40, 72, 100])  # CUDA-core path in every dtype
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
def test_attention_other_head_dims(head_dim, dtype):
    _check_attention(*_packed_inputs(2, 97, 2, head_dim, dtype)[:3], head_dim ** -0.5)


@attention_kernels
def test_attention_unaligned_input_is_copied_not_misread():
    storage = _randn(2 * 50 * 3 * 2 * 64 + 1, dtype=torch.bfloat16)
    qkv = storage[1:].view(2, 50, 3, 2, 64)
    _check_attention(*reference.split_qkv(qkv), 0.125, packed=qkv)


@attention_kernels
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=dtype_id)
def test_attention_is_deterministic(dtype):
    q, k, v, qkv = _packed_inputs(4, 197, 4, 64, dtype)
    grad = torch.randn(4, 197, 256).to(dtype).to(DEVICE)
    runs = []
    for _ in range(3):
        out, lse = torch.ops.usfmae.attention_packed_fwd(qkv, 0.125)
        runs.append((out, lse, torch.ops.usfmae.attention_packed_bwd(grad, qkv, out, lse, 0.125)))
    assert all(torch.equal(a, b) for run in runs[1:] for a, b in zip(run, runs[0]))


@attention_kernels
def test_attention_fuzz():
    rng = random.Random(2)
    for _ in range(FUZZ_CASES):
        b, h, d = rng.randint(1, 3), rng.randint(1, 3), rng.choice((16, 32, 40, 64, 128))
        dtype = rng.choice((torch.float32, torch.float16, torch.bfloat16))
        scale = rng.uniform(0.05, 0.5)
        q, k, v, qkv = _packed_inputs(b, rng.randint(1, 260), h, d, dtype)
        _check_attention(q, k, v, scale, packed=qkv if rng.random() < 0.5 else None)


# --- bad input -----------------------------------------------------------------------------

def _bad_calls():
    """(name, call, argument the error must name); tensors are built when the test runs."""
    x, t4 = _randn(2, 5, 3), _randn(2, 4, 5, 8)
    qkv, flat = _randn(2, 5, 3, 4, 8), _randn(2, 5, 32)
    lse = torch.zeros(2, 4, 5, device=DEVICE)
    ops = torch.ops.usfmae
    return [
        (lambda: ops.random_masking(_randn(4, 5), torch.rand(4, 5, device=DEVICE), 2), "x"),
        (lambda: ops.random_masking(x, torch.rand(2, 6, device=DEVICE), 2), "noise"),
        (lambda: ops.random_masking(x, torch.rand(2, 5), 2), "noise"),
        (lambda: ops.random_masking(x, torch.rand(2, 5, device=DEVICE), 6), "num_keep"),
        (lambda: ops.random_masking(_randn(1, 4097, 2), torch.rand(1, 4097, device=DEVICE), 2),
         "x"),
        (lambda: ops.random_masking_backward(x, torch.zeros(2, 5, device=DEVICE)), "ids_restore"),
        (lambda: ops.mae_loss_fused(_randn(2, 3, 8), _randn(2, 4, 48), _randn(2, 4), 4, False,
                                    True), "imgs"),
        (lambda: ops.mae_loss_fused(_randn(2, 3, 8, 8), _randn(2, 4, 47), _randn(2, 4), 4, False,
                                    True), "pred"),
        (lambda: ops.mae_loss_fused(_randn(2, 3, 8, 8), _randn(2, 4, 48), _randn(2, 5), 4, False,
                                    True), "mask"),
        (lambda: ops.mae_loss_fused(_randn(2, 3, 8, 8), _randn(2, 4, 48), _randn(2, 4), 0, False,
                                    True), "patch_size"),
        (lambda: ops.mae_loss_fused(_randn(2, 3, 8, 8), _randn(2, 4, 48), torch.ones(2, 4), 4,
                                    False, True), "mask"),
        (lambda: ops.mae_loss_fused(_randn(1, 4, 128, 128), _randn(1, 1, 65536), _randn(1, 1),
                                    128, False, True), "pred"),
        (lambda: ops.attention_fwd(_randn(2, 4, 5), t4, t4, 0.5), "q"),
        (lambda: ops.attention_fwd(t4, _randn(2, 4, 5, 16), t4, 0.5), "k"),
        (lambda: ops.attention_fwd(t4, t4, _randn(2, 4, 6, 8), 0.5), "v"),
        (lambda: ops.attention_fwd(t4, t4.half(), t4, 0.5), "k"),
        (lambda: ops.attention_fwd(t4, t4, t4.cpu(), 0.5), "v"),
        (lambda: ops.attention_fwd(t4, _randn(2, 4, 0, 8), _randn(2, 4, 0, 8), 0.5), "k"),
        (lambda: ops.attention_fwd(_randn(1, 1, 5, 256), _randn(1, 1, 5, 256),
                                   _randn(1, 1, 5, 256), 0.5), "q"),
        (lambda: ops.attention_fwd(t4, t4, t4, -1.0), "scale"),
        (lambda: ops.attention_fwd(t4, t4, t4, math.nan), "scale"),
        (lambda: ops.attention_bwd(t4[..., :4], t4, t4, t4, t4, lse, 0.5), "grad_out"),
        (lambda: ops.attention_bwd(t4, t4, t4, t4, t4.half(), lse, 0.5), "out"),
        (lambda: ops.attention_bwd(t4, t4, t4, t4, t4, lse.double(), 0.5), "lse"),
        (lambda: ops.attention_packed_fwd(_randn(2, 5, 2, 4, 8), 0.5), "qkv"),
        (lambda: ops.attention_packed_fwd(qkv.transpose(3, 4), 0.5), "qkv"),
        (lambda: ops.attention_packed_fwd(qkv.int(), 0.5), "qkv"),
        (lambda: ops.attention_packed_bwd(flat[..., :16], qkv, flat, lse, 0.5), "grad_out"),
        (lambda: ops.attention_packed_bwd(flat, qkv, flat, lse[:, :2], 0.5), "lse"),
    ]


@masking_kernels
@loss_kernel
@attention_kernels
def test_bad_input_raises_naming_the_argument():
    for call, name in _bad_calls():
        with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
            call()
