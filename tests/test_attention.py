"""attention and attention_packed: every usable backend against ops/reference.py."""
import os
import random

import pytest
import torch

from _tolerance import allowed_error
from conftest import requires_cuda, usable_backends
from usfmae_fast import ops
from usfmae_fast.ops import reference
from usfmae_fast.ops.triton import _utils as triton_utils

FUZZ_CASES = int(os.environ.get("USFMAE_FUZZ_CASES", "200"))  # gpu_check.py shortens the fuzz
CPU_BACKENDS = usable_backends("attention_packed", "cpu")
SEQ_LENS = (1, 49, 50, 97, 197, 200)
# The Triton kernels run on the GPU when there is one, otherwise in Triton's interpreter on CPU.
TRITON_DEVICE = triton_utils.DEVICES[0]
requires_triton = pytest.mark.skipif(
    "triton" not in usable_backends("attention_packed", TRITON_DEVICE),
    reason=f"triton backend unusable: {triton_utils.unavailable()}")


def _grads(fn, *inputs, grad=None):
    """[output, grad of each input] of ``fn(*inputs)`` for the output gradient ``grad``."""
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    if grad is None:
        grad = torch.ones_like(out) * 0.1 + torch.arange(out.shape[-1], device=out.device) * 0.01
    out.backward(grad.to(out.dtype))
    return [out.detach()] + [t.grad for t in leaves]


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("seq", SEQ_LENS)
@pytest.mark.parametrize("head_dim", [32, 64, 128])
def test_packed_matches_reference(backend, backend_name, seq, head_dim):
    backend(backend_name)
    qkv = torch.randn(3, seq, 3, 2, head_dim)
    expected = _grads(reference.attention_packed, qkv)
    got = _grads(ops.attention_packed, qkv)
    assert got[0].shape == (3, seq, 2 * head_dim)
    for e, g in zip(expected, got):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@pytest.mark.filterwarnings("ignore:the compiled attention kernels take k and v shaped like q")
@pytest.mark.parametrize("backend_name", usable_backends("attention", "cpu"))
@pytest.mark.parametrize("seq_q, seq_k", [(50, 50), (197, 197), (7, 33)])
def test_unpacked_matches_reference(backend, backend_name, seq_q, seq_k):
    backend(backend_name)
    q, k, v = torch.randn(2, 3, seq_q, 64), torch.randn(2, 3, seq_k, 64), torch.randn(2, 3, seq_k, 64)
    for scale in (None, 0.2):
        expected = _grads(lambda *t: reference.attention(*t, scale), q, k, v)
        got = _grads(lambda *t: ops.attention(*t, scale=scale), q, k, v)
        for e, g in zip(expected, got):
            torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


def _low_precision_errors(qkv, dtype):
    """Max error of ops.attention_packed (output and gradient) and of the reference run in
    ``dtype``, both against the fp64 reference."""
    grad = torch.randn(qkv.shape[0], qkv.shape[1], qkv.shape[3] * qkv.shape[4], device=qkv.device)
    exact = _grads(reference.attention_packed, qkv.double(), grad=grad)
    low = _grads(reference.attention_packed, qkv.to(dtype), grad=grad)
    ours = _grads(ops.attention_packed, qkv.to(dtype), grad=grad)
    return [((o.double() - e).abs().max(), (t.double() - e).abs().max())
            for o, t, e in zip(ours, low, exact)]


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_pytorchs(backend, backend_name, dtype):
    if backend_name == "triton" and dtype == torch.bfloat16 and triton_utils.INTERPRET:
        pytest.skip("Triton's interpreter has no bfloat16 (tl.dot returns garbage); "
                    "bf16 is tested on a CUDA device")
    backend(backend_name)
    for ours_err, torch_err in _low_precision_errors(torch.randn(2, 97, 3, 4, 64), dtype):
        assert ours_err <= allowed_error(torch_err, 1e-6)


def test_torch_compile_matches_eager():
    qkv = torch.randn(2, 50, 3, 2, 32)
    torch.testing.assert_close(torch.compile(ops.attention_packed, fullgraph=True)(qkv),
                               ops.attention_packed(qkv))


@pytest.mark.parametrize("call, exc, name", [
    (lambda: ops.attention_packed(torch.randn(2, 5, 3, 4)), ValueError, "qkv"),
    (lambda: ops.attention_packed(torch.randn(2, 5, 2, 4, 8)), ValueError, "qkv"),
    (lambda: ops.attention_packed(torch.ones(2, 5, 3, 4, 8, dtype=torch.int32)), TypeError, "qkv"),
    (lambda: ops.attention_packed(torch.randn(5, 2, 3, 4, 8).transpose(0, 1)), ValueError, "qkv"),
    (lambda: ops.attention_packed(torch.randn(2, 5, 3, 4, 8), scale=-1.0), ValueError, "scale"),
    (lambda: ops.attention(torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 16), torch.randn(2, 4, 5, 8)),
     ValueError, "k"),
    (lambda: ops.attention(torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8), torch.randn(2, 4, 6, 8)),
     ValueError, "v"),
    (lambda: ops.attention(torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8).half(),
                           torch.randn(2, 4, 5, 8)), TypeError, "k"),
    (lambda: ops.attention(torch.randn(2, 4, 5, 8), torch.randn(2, 4, 5, 8),
                           torch.randn(2, 4, 5, 8, device="meta")), ValueError, "v"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call()


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("seq", SEQ_LENS)
def test_cuda_low_precision(backend, dtype, seq):
    for name in usable_backends("attention_packed", "cuda"):
        backend(name)
        qkv = torch.randn(4, seq, 3, 12, 64, device="cuda")
        for ours_err, torch_err in _low_precision_errors(qkv, dtype):
            assert ours_err <= allowed_error(torch_err, 1e-6), name


def _fuzz_case(rng):
    """Random shapes, layout (packed, strided views of a packed projection, separate tensors
    with their own key length), dtype and scale. Long sequences get few heads: the interpreter
    runs the kernels one program at a time."""
    layout = rng.choice(("packed", "views", "separate"))
    n_q, d = rng.randint(1, 210), rng.choice((32, 64, 128))
    n_kv = rng.randint(1, 210) if layout == "separate" else n_q
    b, h = rng.randint(1, 3), rng.randint(1, 3)
    while b * h > max(1, 150 // max(n_q, n_kv)):
        b, h = rng.randint(1, 3), rng.randint(1, 3)
    dtype = rng.choice((torch.float32, torch.float16))
    scale = rng.choice((None, rng.uniform(0.05, 0.3)))
    if layout == "packed":
        fn = lambda *t: ops.attention_packed(*t, scale=scale)  # noqa: E731
        ref = lambda *t: reference.attention_packed(*t, scale)  # noqa: E731
        inputs = [torch.randn(b, n_q, 3, h, d)]
    else:
        fn = lambda *t: ops.attention(*t, scale=scale)  # noqa: E731
        ref = lambda *t: reference.attention(*t, scale)  # noqa: E731
        inputs = (reference.split_qkv(torch.randn(b, n_q, 3, h, d)) if layout == "views" else
                  [torch.randn(b, h, n, d) for n in (n_q, n_kv, n_kv)])
    inputs = [t.to(TRITON_DEVICE, dtype) for t in inputs]
    case = f"{layout} b={b} h={h} n={n_q}/{n_kv} d={d} {dtype} scale={scale}"
    return fn, ref, inputs, dtype, case


@requires_triton
def test_triton_fuzz_200_cases(backend):
    backend("triton")
    rng = random.Random(0)
    torch.manual_seed(0)
    for _ in range(FUZZ_CASES):
        fn, ref, inputs, dtype, case = _fuzz_case(rng)
        out_shape = ref(*inputs).shape
        grad = torch.randn(out_shape, device=TRITON_DEVICE)
        expected = _grads(ref, *(t.float() for t in inputs), grad=grad)
        got = _grads(fn, *inputs, grad=grad)
        tol = 2e-5 if dtype == torch.float32 else 2e-3
        for name, e, g in zip(("out", "grad 1", "grad 2", "grad 3"), expected, got):
            assert g.dtype == dtype and g.shape == e.shape, f"{name}: {case}"
            magnitude = max(e.abs().max().item(), 1.0)  # errors grow with it
            torch.testing.assert_close(g.float(), e, rtol=tol, atol=tol * magnitude,
                                       msg=lambda m: f"{name} ({case}): {m}")


@requires_triton
@pytest.mark.parametrize("d_qk, d_v", [(8, 8), (48, 48), (80, 24), (256, 256)])
def test_triton_other_head_dims_and_strides(backend, d_qk, d_v):
    backend("triton")
    q = torch.randn(1, 2, 37, d_qk, device=TRITON_DEVICE)
    k = torch.randn(1, 2, d_qk, 45, device=TRITON_DEVICE).transpose(2, 3)  # last stride != 1
    v = torch.randn(1, 2, 45, d_v, device=TRITON_DEVICE)
    grad = torch.randn(d_v, device=TRITON_DEVICE).expand(1, 2, 37, d_v)  # zero strides
    expected = _grads(reference.attention, q, k, v, grad=grad)
    for e, g in zip(expected, _grads(ops.attention, q, k, v, grad=grad)):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-5)


@requires_triton
def test_triton_opcheck():
    """The forward ops with inputs that require grad (autograd registration), the backward ops
    on the forward's outputs."""
    q, k, v = (torch.randn(1, 2, n, 16, device=TRITON_DEVICE) for n in (5, 7, 7))
    torch.library.opcheck(torch.ops.usfmae.attention_triton.default,
                          (*(t.requires_grad_() for t in (q, k, v)), 0.3))
    q, k, v = (t.detach() for t in (q, k, v))
    out, lse = torch.ops.usfmae.attention_triton(q, k, v, 0.3)
    torch.library.opcheck(torch.ops.usfmae.attention_triton_backward.default,
                          (torch.randn_like(out), q, k, v, out, lse, 0.3))
    qkv = torch.randn(1, 5, 3, 2, 16, device=TRITON_DEVICE)
    torch.library.opcheck(torch.ops.usfmae.attention_packed_triton.default,
                          (qkv.requires_grad_(), 0.3))
    qkv = qkv.detach()
    out, lse = torch.ops.usfmae.attention_packed_triton(qkv, 0.3)
    torch.library.opcheck(torch.ops.usfmae.attention_packed_triton_backward.default,
                          (torch.randn_like(out), qkv, out, lse, 0.3))


@requires_triton
def test_triton_torch_compile_matches_eager(backend):
    backend("triton")
    qkv = torch.randn(2, 50, 3, 2, 32, device=TRITON_DEVICE)
    compiled = torch.compile(ops.attention_packed, fullgraph=True)
    for e, g in zip(_grads(ops.attention_packed, qkv), _grads(compiled, qkv)):
        torch.testing.assert_close(g, e)


def _on_triton_device(*shape, dtype=torch.float32, device=None):
    return torch.randn(*shape, dtype=dtype, device=device or TRITON_DEVICE)


@requires_triton
@pytest.mark.parametrize("call, exc, name", [
    (lambda: ops.attention_packed(_on_triton_device(1, 4, 3, 1, 300)), ValueError, "head_dim"),
    (lambda: ops.attention(_on_triton_device(1, 1, 4, 8), _on_triton_device(1, 1, 4, 8),
                           _on_triton_device(1, 1, 4, 264)), ValueError, "v"),
    (lambda: ops.attention_packed(_on_triton_device(1, 4, 3, 1, 8, dtype=torch.float64)),
     TypeError, "qkv"),
    (lambda: ops.attention(*(_on_triton_device(1, 1, 4, 8, dtype=torch.float64) for _ in "qkv")),
     TypeError, "q"),
    (lambda: ops.attention(_on_triton_device(1, 1, 4, 8), _on_triton_device(1, 1, 4, 8),
                           _on_triton_device(1, 1, 4, 8, device="meta")), ValueError, "v"),
    pytest.param(
        lambda: ops.attention_packed(_on_triton_device(1, 4, 3, 1, 8, dtype=torch.bfloat16)),
        TypeError, "qkv", marks=pytest.mark.skipif(
            not triton_utils.INTERPRET, reason="bf16 is refused only by the interpreter")),
])
def test_triton_bad_input_names_the_argument(backend, call, exc, name):
    backend("triton")
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call()


@pytest.mark.parametrize("backend_name", usable_backends("attention_packed", TRITON_DEVICE))
@pytest.mark.parametrize("seq", [5, 16, 50])
@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
@pytest.mark.parametrize("where", ["q", "k", "v"])
def test_nan_and_inf_propagate_as_in_the_reference(backend, backend_name, seq, value, where):
    # PyTorch's CPU SDPA zeroed a query row holding NaN at N <= 16 (issue 15, item 4)
    backend(backend_name)
    qkv = torch.randn(2, seq, 3, 2, 16, device=TRITON_DEVICE)
    qkv[1, seq // 2, "qkv".index(where), 1, 3] = value
    got, expected = ops.attention_packed(qkv), reference.attention_packed(qkv)
    assert torch.equal(got.isnan(), expected.isnan())
    torch.testing.assert_close(got.nan_to_num(), expected.nan_to_num(), rtol=1e-4, atol=1e-5)
    q, k, v = (t.contiguous() for t in reference.split_qkv(qkv))
    assert torch.equal(ops.attention(q, k, v).isnan(), reference.attention(q, k, v).isnan())


@pytest.mark.parametrize("scale", [float("nan"), float("inf"), -float("inf"), 0.0, -0.5, True])
def test_scale_must_be_finite_and_positive(scale):
    qkv = torch.randn(1, 5, 3, 1, 8)
    with pytest.raises(ValueError, match=r"\bscale\b"):
        ops.attention_packed(qkv, scale=scale)
    with pytest.raises(ValueError, match=r"\bscale\b"):
        ops.attention(*reference.split_qkv(qkv), scale=scale)
