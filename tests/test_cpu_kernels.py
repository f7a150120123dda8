"""The C++ CPU kernels (csrc/cpu/) called directly through torch.ops.usfmae, against
ops/reference.py: values and gradients on awkward shapes in every dtype, a seeded fuzz per op,
and bad input that must raise RuntimeError naming the argument.

Low-precision results follow the flash-attention rule: the kernel's error against an fp64 run of
the reference is at most twice the error of the reference's own run in that dtype, plus a floor.
"""
import os
import random
import subprocess
import sys

import pytest
import torch

from _tolerance import assert_within_twice_torch
from usfmae_fast import ops
from usfmae_fast.ops import _ext, reference

DTYPES = [torch.float32, torch.float64, torch.float16, torch.bfloat16]
LENGTHS = (1, 49, 50, 97, 197, 200)
FLOOR = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2e-3, torch.bfloat16: 1.6e-2}
# The schema keeps lse in fp32, so fp64 backward passes are as exact as an fp32 log-sum-exp.
FP32_LSE_FLOOR = 2e-6


def _needs_cpu_kernel(op: str):
    reason = (_ext.LOAD_MESSAGE if not _ext.LOADED
              else f"usfmae_fast._C has no CPU kernel for usfmae::{op}")
    return pytest.mark.skipif(not _ext.has_kernel(op, "CPU"), reason=reason)


def _check(name, got, exact, torch_run, floor):
    """got (any dtype) within 2x the error of torch_run against the fp64 result exact, + floor."""
    assert got.shape == exact.shape, name
    if got.numel() == 0:
        return
    scale = max(1.0, exact.abs().max().item())
    assert_within_twice_torch(name, got, exact, torch_run, floor * scale)


# ---------------------------------------------------------------------------------- mae_loss

def _mae_inputs(n, c, h, w, p, dtype, gen):
    length = (h // p) * (w // p)
    imgs = torch.rand(n, c, h, w, generator=gen).to(dtype)
    pred = torch.randn(n, length, p * p * c, generator=gen).to(dtype)
    mask = (torch.rand(n, length, generator=gen) < 0.75).to(dtype)
    mask[0, 0] = 1
    return imgs, pred, mask


def _mae_reference(imgs, pred, mask, p, norm, dtype=None):
    """Loss and d loss / d pred of the reference, computed in dtype (default: the inputs')."""
    imgs, pred, mask = (t if dtype is None else t.to(dtype) for t in (imgs, pred, mask))
    pred = pred.detach().clone().requires_grad_(True)
    loss = reference.mae_loss(imgs, pred, mask, p, norm)
    loss.backward()
    return loss.detach(), pred.grad


def _check_mae_loss(imgs, pred, mask, p, norm):
    loss, grad = torch.ops.usfmae.mae_loss_fused(imgs, pred, mask, p, norm, True)
    torch_loss, torch_grad = _mae_reference(imgs, pred, mask, p, norm)
    exact_loss, exact_grad = _mae_reference(imgs, pred, mask, p, norm, torch.float64)
    assert loss.dtype == torch_loss.dtype and loss.dim() == 0
    assert grad.dtype == pred.dtype
    floor = max(FLOOR[t.dtype] for t in (imgs, pred, mask))
    _check("loss", loss, exact_loss, torch_loss, floor)
    _check("grad_pred", grad, exact_grad, torch_grad, floor)


MAE_SHAPES = [  # (N, C, H, W, p): L = 16, 49, 50 (5 x 10), 97 (1 x 97), 197, 200; p = 7 and 1
    (1, 1, 16, 16, 4), (3, 3, 28, 28, 4), (2, 1, 20, 40, 4), (3, 3, 4, 388, 4),
    (1, 1, 4, 788, 4), (5, 2, 40, 80, 4), (2, 3, 14, 14, 7), (3, 3, 5, 7, 1)]


@_needs_cpu_kernel("mae_loss_fused")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("shape", MAE_SHAPES)
def test_mae_loss_matches_reference(shape, norm_pix_loss, dtype):
    gen = torch.Generator().manual_seed(hash((shape, norm_pix_loss)) % 2**31)
    *dims, p = shape
    imgs, pred, mask = _mae_inputs(*dims, p, dtype, gen)
    _check_mae_loss(imgs, pred, mask, p, norm_pix_loss)


@_needs_cpu_kernel("mae_loss_fused")
@pytest.mark.parametrize("imgs_dtype, pred_dtype, mask_dtype", [
    (torch.float32, torch.bfloat16, torch.float32), (torch.bfloat16, torch.float32, torch.float16),
    (torch.float16, torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32, torch.float64),
    (torch.float64, torch.float16, torch.float32)])
def test_mae_loss_mixed_dtypes(imgs_dtype, pred_dtype, mask_dtype):
    imgs, pred, mask = _mae_inputs(3, 3, 24, 32, 8, torch.float32, torch.Generator().manual_seed(0))
    _check_mae_loss(imgs.to(imgs_dtype), pred.to(pred_dtype), mask.to(mask_dtype), 8, True)


@_needs_cpu_kernel("mae_loss_fused")
def test_mae_loss_without_grad_and_thread_count_independent():
    imgs, pred, mask = _mae_inputs(4, 3, 64, 48, 8, torch.float32, torch.Generator().manual_seed(1))
    loss, grad = torch.ops.usfmae.mae_loss_fused(imgs, pred, mask, 8, True, True)
    loss_only, empty = torch.ops.usfmae.mae_loss_fused(imgs, pred, mask, 8, True, False)
    assert empty.shape == (0,) and torch.equal(loss_only, loss)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.usfmae.mae_loss_fused(imgs, pred, mask, 8, True, True)
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(single[0], loss) and torch.equal(single[1], grad)


@_needs_cpu_kernel("mae_loss_fused")
@pytest.mark.filterwarnings(r"ignore:var\(\)")
def test_mae_loss_nan_cases_match_reference():
    # One pixel per patch: the unbiased variance is 0 / 0. An all-visible mask: 0 / 0 loss.
    imgs, pred, mask = _mae_inputs(2, 1, 3, 3, 1, torch.float32, torch.Generator().manual_seed(2))
    for args in ((imgs, pred, mask, 1, True), (imgs, pred, torch.zeros_like(mask), 1, False)):
        loss, grad = torch.ops.usfmae.mae_loss_fused(*args, True)
        expected_loss, expected_grad = _mae_reference(*args)
        torch.testing.assert_close(loss, expected_loss, equal_nan=True)
        torch.testing.assert_close(grad, expected_grad, equal_nan=True)


@_needs_cpu_kernel("mae_loss_fused")
def test_mae_loss_fuzz_200_cases():
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(200):
        p, c = rng.choice((1, 2, 3, 4, 5, 8)), rng.randint(1, 4)
        h, w = p * rng.randint(1, 7), p * rng.randint(1, 7)
        dtype = rng.choice((torch.float32, torch.float64))
        imgs, pred, mask = _mae_inputs(rng.randint(1, 4), c, h, w, p, dtype, gen)
        _check_mae_loss(imgs, pred, mask, p, rng.random() < 0.5 and p * p * c > 1)


@_needs_cpu_kernel("mae_loss_fused")
@pytest.mark.parametrize("imgs, pred, mask, p, name", [
    (torch.rand(2, 3, 8), torch.randn(2, 4, 12), torch.ones(2, 4), 2, "imgs"),
    (torch.rand(2, 3, 8, 8), torch.randn(2, 4, 48), torch.ones(2, 4), 0, "patch_size"),
    (torch.rand(2, 3, 8, 6), torch.randn(2, 4, 48), torch.ones(2, 4), 4, "patch_size"),
    (torch.rand(2, 3, 8, 8), torch.randn(2, 4, 47), torch.ones(2, 4), 4, "pred"),
    (torch.rand(2, 3, 8, 8), torch.randn(2, 4, 48), torch.ones(2, 5), 4, "mask"),
    (torch.rand(2, 3, 8, 8), torch.randn(2, 4, 48), torch.ones(2, 4, dtype=torch.int32), 4, "mask"),
    (torch.ones(2, 3, 8, 8, dtype=torch.uint8), torch.randn(2, 4, 48), torch.ones(2, 4), 4, "imgs"),
    (torch.rand(2, 3, 8, 8), torch.randn(2, 48, 4).transpose(1, 2), torch.ones(2, 4), 4, "pred"),
])
def test_mae_loss_rejects_bad_input(imgs, pred, mask, p, name):
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        torch.ops.usfmae.mae_loss_fused(imgs, pred, mask, p, True, True)


# --------------------------------------------------------------------------------- attention

def _attention_reference(q, k, v, go, scale, dtype=None):
    """out, lse and (dq, dk, dv) of the reference attention, computed in dtype."""
    q, k, v, go = (t.detach().to(dtype or t.dtype) for t in (q, k, v, go))
    q, k, v = (t.clone().requires_grad_(True) for t in (q, k, v))
    out = reference.attention(q, k, v, scale)
    lse = torch.logsumexp((q @ k.transpose(-2, -1)) * scale, dim=-1)
    out.backward(go)
    return out.detach(), lse.detach(), (q.grad, k.grad, v.grad)


def _check_attention(q, k, v, scale, gen):
    go = torch.randn(q.shape, generator=gen).to(q.dtype)
    out, lse = torch.ops.usfmae.attention_fwd(q, k, v, scale)
    grads = torch.ops.usfmae.attention_bwd(go, q, k, v, out, lse, scale)
    torch_out, torch_lse, torch_grads = _attention_reference(q, k, v, go, scale)
    exact_out, exact_lse, exact_grads = _attention_reference(q, k, v, go, scale, torch.float64)
    assert out.dtype == q.dtype and lse.dtype == torch.float32 and out.is_contiguous()
    floor = FLOOR[q.dtype]
    _check("out", out, exact_out, torch_out, floor)
    _check("lse", lse, exact_lse, torch_lse, max(floor, FP32_LSE_FLOOR))
    for name, got, exact, torch_run in zip(("dq", "dk", "dv"), grads, exact_grads, torch_grads):
        assert got.dtype == q.dtype, name
        _check(name, got, exact, torch_run, max(floor, FP32_LSE_FLOOR))


def _check_attention_packed(qkv, scale, gen):
    b, n, _, h, d = qkv.shape
    go = torch.randn(b, n, h * d, generator=gen).to(qkv.dtype)
    out, lse = torch.ops.usfmae.attention_packed_fwd(qkv, scale)
    grad_qkv = torch.ops.usfmae.attention_packed_bwd(go, qkv, out, lse, scale)

    def packed_reference(dtype=None):
        x = qkv.detach().to(dtype or qkv.dtype).requires_grad_(True)
        y = reference.attention_packed(x, scale)
        y.backward(go.to(y.dtype))
        return y.detach(), x.grad
    (torch_out, torch_grad), (exact_out, exact_grad) = packed_reference(), packed_reference(
        torch.float64)
    assert out.shape == (b, n, h * d) and grad_qkv.shape == qkv.shape
    _check("out", out, exact_out, torch_out, FLOOR[qkv.dtype])
    _check("grad_qkv", grad_qkv, exact_grad, torch_grad, max(FLOOR[qkv.dtype], FP32_LSE_FLOOR))


@_needs_cpu_kernel("attention_fwd")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", LENGTHS)
def test_attention_matches_reference(length, dtype):
    gen = torch.Generator().manual_seed(length)
    d = (24, 40, 64, 72)[length % 4]
    q, k, v = (torch.randn(3, 2, length, d, generator=gen).to(dtype) for _ in range(3))
    _check_attention(q, k, v, d ** -0.5, gen)


@_needs_cpu_kernel("attention_packed_fwd")
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("length", LENGTHS)
def test_attention_packed_matches_reference(length, dtype):
    gen = torch.Generator().manual_seed(length)
    qkv = torch.randn(3, length, 3, 2, 40, generator=gen).to(dtype)
    _check_attention_packed(qkv, 0.3, gen)


@_needs_cpu_kernel("attention_fwd")
def test_attention_strided_views_and_thread_counts_give_identical_results():
    gen = torch.Generator().manual_seed(3)
    qkv = torch.randn(3, 50, 3, 4, 24, generator=gen)
    q, k, v = reference.split_qkv(qkv)  # [B, H, N, d] views with strides
    go = torch.randn(3, 50, 4, 24, generator=gen).transpose(1, 2)
    out, lse = torch.ops.usfmae.attention_fwd(q, k, v, 0.2)
    grads = torch.ops.usfmae.attention_bwd(go, q, k, v, out, lse, 0.2)
    dense = [t.contiguous() for t in (q, k, v, go)]
    assert torch.equal(torch.ops.usfmae.attention_fwd(*dense[:3], 0.2)[0], out)
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        single = torch.ops.usfmae.attention_bwd(dense[3], *dense[:3], out, lse, 0.2)
    finally:
        torch.set_num_threads(threads)
    assert all(torch.equal(a, b) for a, b in zip(single, grads))
    packed_out, packed_lse = torch.ops.usfmae.attention_packed_fwd(qkv, 0.2)
    assert torch.equal(packed_out, reference.merge_heads(out)) and torch.equal(packed_lse, lse)


@_needs_cpu_kernel("attention_fwd")
def test_attention_fuzz_200_cases():
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    for _ in range(200):
        b, h, n, d = rng.randint(1, 3), rng.randint(1, 3), rng.randint(1, 40), rng.randint(1, 70)
        dtype, scale = rng.choice((torch.float32, torch.float64)), rng.uniform(0.05, 1.0)
        if rng.random() < 0.5:
            q, k, v = (torch.randn(b, h, n, d, generator=gen).to(dtype) for _ in range(3))
            _check_attention(q, k, v, scale, gen)
        else:
            _check_attention_packed(torch.randn(b, n, 3, h, d, generator=gen).to(dtype), scale, gen)


BASELINE_CHECK = """
import random, torch
import test_cpu_kernels as t
assert torch.backends.cpu.get_cpu_capability() == "DEFAULT"
gen = torch.Generator().manual_seed(0)
for n, d, dtype in [(1, 8, torch.float32), (50, 40, torch.float32), (97, 64, torch.float64),
                    (197, 24, torch.bfloat16)]:
    t._check_attention(*(torch.randn(2, 3, n, d, generator=gen).to(dtype) for _ in range(3)), 0.2,
                       gen)
    t._check_attention_packed(torch.randn(2, n, 3, 2, d, generator=gen).to(dtype), 0.2, gen)
print("baseline ok")
"""


@_needs_cpu_kernel("attention_fwd")
def test_attention_baseline_vector_path_matches_reference():
    """The kernels without AVX2 (16-byte vectors), as on CPUs where torch runs its DEFAULT code."""
    path = os.pathsep.join([os.path.dirname(__file__), os.environ.get("PYTHONPATH", "")])
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default", PYTHONPATH=path)
    result = subprocess.run([sys.executable, "-c", BASELINE_CHECK], capture_output=True, text=True,
                            env=env)
    assert result.returncode == 0, result.stderr
    assert "baseline ok" in result.stdout


_Q, _OUT, _LSE = torch.randn(2, 3, 5, 8), torch.zeros(2, 3, 5, 8), torch.zeros(2, 3, 5)
_QKV, _OUT_PACKED = torch.randn(2, 5, 3, 4, 8), torch.zeros(2, 5, 32)
_LSE_PACKED = torch.zeros(2, 4, 5)


@_needs_cpu_kernel("attention_fwd")
@pytest.mark.parametrize("op, args, name", [
    ("attention_fwd", (torch.randn(3, 5, 8), _Q, _Q, 0.5), "q"),
    ("attention_fwd", (_Q.to(torch.int32), _Q, _Q, 0.5), "q"),
    ("attention_fwd", (_Q.transpose(2, 3), _Q.transpose(2, 3), _Q.transpose(2, 3), 0.5), "q"),
    ("attention_fwd", (_Q, torch.randn(2, 3, 6, 8), _Q, 0.5), "k"),
    ("attention_fwd", (_Q, _Q, _Q.double(), 0.5), "v"),
    ("attention_fwd", (_Q, _Q, _Q, 0.0), "scale"),
    ("attention_fwd", (_Q, _Q, _Q, float("nan")), "scale"),
    ("attention_bwd", (torch.randn(2, 3, 5, 7), _Q, _Q, _Q, _OUT, _LSE, 0.5), "grad_out"),
    ("attention_bwd", (_Q, _Q, _Q, _Q, _OUT.half(), _LSE, 0.5), "out"),
    ("attention_bwd", (_Q, _Q, _Q, _Q, _OUT, _LSE.double(), 0.5), "lse"),
    ("attention_bwd", (_Q, _Q, _Q, _Q, _OUT, torch.zeros(2, 3, 4), 0.5), "lse"),
    ("attention_packed_fwd", (torch.randn(2, 5, 2, 4, 8), 0.5), "qkv"),
    ("attention_packed_fwd", (torch.randn(2, 5, 3, 8, 4).transpose(3, 4), 0.5), "qkv"),
    ("attention_packed_fwd", (_QKV, -1.0), "scale"),
    ("attention_packed_bwd", (torch.zeros(2, 5, 31), _QKV, _OUT_PACKED, _LSE_PACKED, 0.5),
     "grad_out"),
    ("attention_packed_bwd", (_OUT_PACKED, _QKV, torch.zeros(2, 5, 4, 8), _LSE_PACKED, 0.5), "out"),
    ("attention_packed_bwd", (_OUT_PACKED, _QKV, _OUT_PACKED.bfloat16(), _LSE_PACKED, 0.5), "out"),
    ("attention_packed_bwd", (_OUT_PACKED, _QKV, _OUT_PACKED, torch.zeros(2, 5, 4), 0.5), "lse"),
])
def test_attention_rejects_bad_input(op, args, name):
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        getattr(torch.ops.usfmae, op)(*args)


# ---------------------------------------------------------------------------- random_masking

@_needs_cpu_kernel("random_masking")
def test_random_masking_fuzz_200_cases_bit_exact():
    """Ties, NaN, signed zeros and infinities in the noise; every noise and x dtype."""
    rng, gen = random.Random(0), torch.Generator().manual_seed(0)
    special = torch.tensor([float("nan"), -float("nan"), 0.0, -0.0, float("inf"), -float("inf")])
    for _ in range(200):
        n, length, dim = rng.randint(1, 5), rng.randint(1, 230), rng.randint(0, 40)
        x = torch.randn(n, length, dim, generator=gen).to(rng.choice(DTYPES))
        noise = torch.randint(0, 6, (n, length), generator=gen).float() / 4
        picks = torch.rand(n, length, generator=gen) < 0.2
        noise[picks] = special[torch.randint(0, 6, (int(picks.sum()),), generator=gen)]
        noise = noise.to(rng.choice(DTYPES))
        num_keep = rng.randint(0, length)
        got = torch.ops.usfmae.random_masking(x, noise, num_keep)
        expected = reference.mask_by_noise(x, noise, num_keep)
        for name, g, e in zip(("x_masked", "mask", "ids_restore"), got, expected):
            assert g.dtype == e.dtype and torch.equal(g, e), name
        grad = torch.randn(got[0].shape, generator=gen).to(x.dtype)
        x_ref = x.clone().requires_grad_(True)
        reference.mask_by_noise(x_ref, noise, num_keep)[0].backward(grad)
        assert torch.equal(torch.ops.usfmae.random_masking_backward(grad, got[2]), x_ref.grad)


# ------------------------------------------------------------------------------------ opcheck

def _opcheck_cases():
    gen = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 3, 9, 16, generator=gen, requires_grad=True) for _ in range(3))
    out, lse = torch.ops.usfmae.attention_fwd(q, k, v, 0.25)
    qkv = torch.randn(2, 9, 3, 3, 16, generator=gen, requires_grad=True)
    packed_out, packed_lse = torch.ops.usfmae.attention_packed_fwd(qkv, 0.25)
    imgs, pred, mask = _mae_inputs(2, 3, 8, 12, 4, torch.float32, gen)
    return [
        ("attention_fwd", (q, k, v, 0.25)),
        ("attention_bwd", (torch.randn(2, 3, 9, 16, generator=gen), q.detach(), k.detach(),
                           v.detach(), out.detach(), lse, 0.25)),
        ("attention_packed_fwd", (qkv, 0.25)),
        ("attention_packed_bwd", (torch.randn(2, 9, 48, generator=gen), qkv.detach(),
                                  packed_out.detach(), packed_lse, 0.25)),
        ("mae_loss_fused", (imgs, pred.requires_grad_(True), mask, 4, True, True)),
        ("mae_loss_fused", (imgs, pred.detach(), mask, 4, False, False)),
    ]


@_needs_cpu_kernel("attention_fwd")
@_needs_cpu_kernel("mae_loss_fused")
@pytest.mark.parametrize("index", range(6))
def test_opcheck_compiled_ops(index):
    """Schema, fake kernel, autograd registration and AOT dispatch of each compiled op."""
    op, args = _opcheck_cases()[index]
    torch.library.opcheck(getattr(torch.ops.usfmae, op).default, args)


@_needs_cpu_kernel("attention_fwd")
def test_attention_double_backward_is_a_clear_error(backend):
    backend("cpu")
    qkv = torch.randn(1, 5, 3, 2, 8, requires_grad=True)
    out = ops.attention_packed(qkv)
    (grad,) = torch.autograd.grad(out.square().sum(), qkv, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        grad.sum().backward()


@_needs_cpu_kernel("attention_fwd")
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_attention_backward_sums_delta_in_fp32(dtype):
    """delta = rowsum(dO * O) of the backward must be summed in fp32 for bf16 / fp16 inputs.

    Head dim 128 with column 0 of v and dO at 16 (each row's first product is 256) and the other
    127 products near 0.9: a running sum kept in bf16 stops growing at 256 (0.9 is below half of
    bf16's spacing 2 there) and loses ~114 of ~370; in fp16 each of the 127 steps rounds to a
    spacing of 0.25. The rest of v is 1 + small noise, so dP - delta is small while delta is
    large, and an error in delta dominates dS = P (dP - delta), hence dq and dk. Measured: a bf16
    sum misses the allowed error (2x PyTorch's own run, whose dP is one rounding of ~370) by 72x,
    an fp16 sum by 11x; the fp32 sum stays within 4 % of it."""
    gen = torch.Generator().manual_seed(11)
    b, h, n, d = 2, 2, 97, 128
    q = 0.5 * torch.randn(b, h, n, d, generator=gen)
    k = torch.randn(b, h, n, d, generator=gen)
    v = 1 + 0.1 * torch.randn(b, h, n, d, generator=gen)
    go = 0.8 + 0.2 * torch.rand(b, h, n, d, generator=gen)
    v[..., 0] = go[..., 0] = 16
    q, k, v, go = (t.to(dtype) for t in (q, k, v, go))
    scale = d ** -0.5
    out, lse = torch.ops.usfmae.attention_fwd(q, k, v, scale)
    grads = torch.ops.usfmae.attention_bwd(go, q, k, v, out, lse, scale)
    _, _, torch_grads = _attention_reference(q, k, v, go, scale)
    _, _, exact_grads = _attention_reference(q, k, v, go, scale, torch.float64)
    for name, got, exact, torch_run in zip(("dq", "dk", "dv"), grads, exact_grads, torch_grads):
        _check(name, got, exact, torch_run, FLOOR[dtype])
    # The packed kernel shares the backward: the same rows through [B, N, 3, H, d].
    qkv = torch.stack([t.transpose(1, 2) for t in (q, k, v)], dim=2)
    packed_out, packed_lse = torch.ops.usfmae.attention_packed_fwd(qkv, scale)
    grad_qkv = torch.ops.usfmae.attention_packed_bwd(reference.merge_heads(go), qkv, packed_out,
                                                     packed_lse, scale)
    for i, (name, exact, torch_run) in enumerate(zip(("dq", "dk", "dv"), exact_grads,
                                                     torch_grads)):
        _check(f"packed {name}", grad_qkv[:, :, i].transpose(1, 2), exact, torch_run,
               FLOOR[dtype])
