"""attention and attention_packed: every usable backend against ops/reference.py."""
import pytest
import torch

from conftest import requires_cuda, usable_backends
from usfmae_fast import ops
from usfmae_fast.ops import reference

CPU_BACKENDS = usable_backends("attention_packed", "cpu")
SEQ_LENS = (1, 49, 50, 97, 197, 200)


def _grads(fn, *inputs):
    leaves = [t.detach().clone().requires_grad_(True) for t in inputs]
    out = fn(*leaves)
    out.backward(torch.ones_like(out) * 0.1 + torch.arange(out.shape[-1], device=out.device) * 0.01)
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


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_pytorchs(backend, backend_name, dtype):
    backend(backend_name)
    qkv = torch.randn(2, 97, 3, 4, 64)
    exact = reference.attention_packed(qkv.double())
    torch_err = (reference.attention_packed(qkv.to(dtype)).double() - exact).abs().max()
    ours_err = (ops.attention_packed(qkv.to(dtype)).double() - exact).abs().max()
    assert ours_err <= 2 * torch_err + 1e-6


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
        exact = reference.attention_packed(qkv.double())
        torch_err = (reference.attention_packed(qkv.to(dtype)).double() - exact).abs().max()
        ours_err = (ops.attention_packed(qkv.to(dtype)).double() - exact).abs().max()
        assert ours_err <= 2 * torch_err + 1e-6
