"""mae_loss: every usable backend against ops/reference.py, forward and backward."""
import os
import random

import pytest
import torch

from conftest import requires_cuda, usable_backends
from usfmae_fast import ops
from usfmae_fast.ops import reference
from usfmae_fast.ops.triton import _utils as triton_utils

FUZZ_CASES = int(os.environ.get("USFMAE_FUZZ_CASES", "200"))  # gpu_check.py shortens the fuzz
CPU_BACKENDS = usable_backends("mae_loss", "cpu")
requires_triton = pytest.mark.skipif(triton_utils.unavailable() is not None,
                                     reason=f"triton cannot run: {triton_utils.unavailable()}")
TRITON_DEVICE = triton_utils.DEVICES[0]


def _inputs(n, c, h, w, p, dtype=torch.float32, device="cpu"):
    length = (h // p) * (w // p)
    imgs = torch.randn(n, c, h, w, device=device)
    pred = torch.randn(n, length, p * p * c, device=device).to(dtype)
    mask = (torch.rand(n, length, device=device) < 0.75).float()
    mask[0, 0] = 1.0  # never an all-visible batch
    return imgs, pred, mask


def _loss_and_grad(fn, imgs, pred, mask, p, norm):
    pred = pred.detach().clone().requires_grad_(True)
    loss = fn(imgs, pred, mask, p, norm)
    loss.backward()
    return loss.detach(), pred.grad


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("shape", [(1, 1, 16, 16, 4), (3, 3, 32, 32, 16), (2, 1, 12, 20, 4),
                                   (5, 3, 14, 14, 7), (2, 3, 224, 224, 16)])
def test_matches_reference(backend, backend_name, norm_pix_loss, shape):
    backend(backend_name)
    *dims, p = shape
    imgs, pred, mask = _inputs(*dims, p)
    expected = _loss_and_grad(reference.mae_loss, imgs, pred, mask, p, norm_pix_loss)
    got = _loss_and_grad(ops.mae_loss, imgs, pred, mask, p, norm_pix_loss)
    torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_float64_stays_float64(backend, backend_name):
    backend(backend_name)
    imgs, pred, mask = (t.double() for t in _inputs(3, 3, 24, 24, 8))
    expected = _loss_and_grad(reference.mae_loss, imgs, pred, mask, 8, True)
    got = _loss_and_grad(ops.mae_loss, imgs, pred, mask, 8, True)
    assert got[0].dtype == got[1].dtype == torch.float64
    torch.testing.assert_close(got[0], expected[0], rtol=1e-12, atol=1e-14)
    torch.testing.assert_close(got[1], expected[1], rtol=1e-12, atol=1e-16)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_fuzz_200_cases(backend, backend_name):
    """Random shapes, fp32 or fp16 predictions; the reference runs in fp32 on the same values."""
    backend(backend_name)
    rng = random.Random(1)
    for _ in range(FUZZ_CASES):
        p = rng.choice((1, 2, 3, 4, 8))
        dims = (rng.randint(1, 5), rng.choice((1, 3)), p * rng.randint(1, 6), p * rng.randint(1, 6))
        dtype = rng.choice((torch.float32, torch.float16))
        imgs, pred, mask = _inputs(*dims, p, dtype)
        norm = rng.random() < 0.5 and p > 1  # unbiased variance needs > 1 pixel per patch
        expected = _loss_and_grad(reference.mae_loss, imgs, pred.float(), mask, p, norm)
        got = _loss_and_grad(ops.mae_loss, imgs, pred, mask, p, norm)
        assert got[0].dtype == torch.float32 and got[1].dtype == dtype
        torch.testing.assert_close(got[0], expected[0], rtol=1e-5, atol=1e-6)
        # fp16 gradients: within an ulp (1e-3 relative; 6e-8 apart below 2**-14, subnormal).
        tolerance = dict(rtol=1e-5, atol=1e-8) if dtype == torch.float32 else dict(rtol=1e-3,
                                                                                   atol=1e-7)
        torch.testing.assert_close(got[1].float(), expected[1], **tolerance)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_error_at_most_twice_pytorchs(backend, backend_name, dtype):
    """flash-attention's rule: error vs an fp32 reference <= 2x PyTorch's own low-precision run."""
    if backend_name == "triton" and dtype == torch.bfloat16 and triton_utils.INTERPRET:
        pytest.skip("the Triton interpreter has no bfloat16 arithmetic")
    backend(backend_name)
    imgs, pred, mask = _inputs(4, 3, 32, 32, 8)
    exact = _loss_and_grad(reference.mae_loss, imgs, pred, mask, 8, True)
    torch_low = _loss_and_grad(reference.mae_loss, imgs.to(dtype), pred.to(dtype), mask.to(dtype),
                               8, True)
    ours = _loss_and_grad(ops.mae_loss, imgs, pred.to(dtype), mask, 8, True)
    assert ours[1].dtype == dtype
    for e, t, o in zip(exact, torch_low, ours):
        assert (o.float() - e).abs().max() <= 2 * (t.float() - e).abs().max() + 1e-6


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_loss_without_gradient(backend, backend_name):
    backend(backend_name)
    imgs, pred, mask = _inputs(2, 3, 16, 24, 8)
    expected = reference.mae_loss(imgs, pred, mask, 8, True)
    torch.testing.assert_close(ops.mae_loss(imgs, pred, mask, 8, True), expected)
    with torch.no_grad():
        loss = ops.mae_loss(imgs, pred.requires_grad_(True), mask, 8, True)
    assert not loss.requires_grad
    torch.testing.assert_close(loss, expected)


def test_opcheck():
    imgs, pred, mask = _inputs(2, 3, 16, 24, 8)
    pred.requires_grad_(True)
    for norm in (False, True):
        torch.library.opcheck(torch.ops.usfmae.mae_loss.default, (imgs, pred, mask, 8, norm))


@requires_triton
def test_opcheck_triton_op():
    imgs, pred, mask = _inputs(2, 3, 16, 24, 8, device=TRITON_DEVICE)
    for norm in (False, True):
        for with_grad in (False, True):
            torch.library.opcheck(torch.ops.usfmae.mae_loss_triton.default,
                                  (imgs, pred.detach().requires_grad_(with_grad), mask, 8, norm,
                                   with_grad))


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_torch_compile_matches_eager(backend, backend_name):
    backend(backend_name)
    imgs, pred, mask = _inputs(2, 1, 32, 32, 8)
    expected = _loss_and_grad(ops.mae_loss, imgs, pred, mask, 8, True)
    got = _loss_and_grad(torch.compile(ops.mae_loss, fullgraph=True), imgs, pred, mask, 8, True)
    torch.testing.assert_close(got[0], expected[0])
    torch.testing.assert_close(got[1], expected[1])


_IMGS, _PRED, _MASK = _inputs(2, 3, 16, 16, 8)


@pytest.mark.parametrize("args, exc, name", [
    ((_IMGS[0], _PRED, _MASK, 8), ValueError, "imgs"),
    ((_IMGS.long(), _PRED, _MASK, 8), TypeError, "imgs"),
    ((_IMGS, _PRED[:, :3], _MASK, 8), ValueError, "pred"),
    ((_IMGS, _PRED, _MASK[:, :3], 8), ValueError, "mask"),
    ((_IMGS, _PRED, _MASK, 0), ValueError, "patch_size"),
    ((_IMGS, _PRED, _MASK, 8.0), ValueError, "patch_size"),
    ((_IMGS, _PRED, _MASK, 5), ValueError, "patch_size"),
    ((_IMGS, _PRED.transpose(0, 1).contiguous().transpose(0, 1), _MASK, 8), ValueError, "pred"),
    ((_IMGS, _PRED, _MASK.to("meta"), 8), ValueError, "mask"),
])
def test_bad_input_names_the_argument(args, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        ops.mae_loss(*args)


@requires_triton
@pytest.mark.parametrize("name, reshape", [("imgs", lambda t: t[0]), ("pred", lambda t: t[:, :3]),
                                           ("mask", lambda t: t[:, :3])])
def test_triton_op_rejects_bad_input(name, reshape):
    args = dict(zip(("imgs", "pred", "mask"), _inputs(2, 3, 16, 16, 8, device=TRITON_DEVICE)))
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        torch.ops.usfmae.mae_loss_triton(*dict(args, **{name: reshape(args[name])}).values(), 8,
                                         True, False)
    bad_dtype = torch.bfloat16 if triton_utils.INTERPRET else torch.float8_e4m3fn
    with pytest.raises(TypeError, match=rf"\b{name}\b"):
        torch.ops.usfmae.mae_loss_triton(*dict(args, **{name: args[name].to(bad_dtype)}).values(),
                                         8, True, False)


@requires_cuda
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_matches_reference(backend, dtype):
    for name in usable_backends("mae_loss", "cuda"):
        backend(name)
        imgs, pred, mask = _inputs(3, 3, 224, 224, 16, device="cuda")
        exact = _loss_and_grad(reference.mae_loss, imgs, pred, mask, 16, True)
        ours = _loss_and_grad(ops.mae_loss, imgs, pred.to(dtype), mask, 16, True)
        torch.testing.assert_close(ours[0].float(), exact[0], rtol=2e-2, atol=1e-3)
        torch.testing.assert_close(ours[1].float(), exact[1], rtol=2e-2, atol=1e-6)
