"""Every autotune config of every Triton kernel, forced in turn, matches ops/reference.py
(forward and backward, fp32 and fp16, odd shapes), so that no config is first run by a user on a
GPU; and every launch runs on the device of its tensors.

Without a GPU this runs in Triton's interpreter (where autotuning runs only the first config
that fits, so the others would go untested).
"""
from __future__ import annotations

import contextlib

import pytest
import torch

from conftest import requires_cuda
from usfmae_fast.ops import reference
from usfmae_fast.ops.triton import _utils

pytestmark = pytest.mark.skipif(_utils.unavailable() is not None,
                                reason=f"triton cannot run: {_utils.unavailable()}")
if _utils.IMPORTED:
    from usfmae_fast.ops.triton import attention, mae_loss, random_masking

DEVICE = _utils.DEVICES[0]
DTYPES = (torch.float32, torch.float16)


@contextlib.contextmanager
def only(tuner, config):
    """``tuner`` runs ``config`` alone, whatever the prune would keep: its prune returns just
    that config (one config is not tuned), its cache of choices is empty meanwhile."""
    prune, cache = tuner.early_config_prune, tuner.cache
    tuner.early_config_prune, tuner.cache = (lambda configs, named_args, **kwargs: [config]), {}
    try:
        yield
    finally:
        tuner.early_config_prune, tuner.cache = prune, cache


def _tuner(name: str):
    return {"fwd": attention._fwd, "fused": attention._bwd_fused, "dkdv": attention._bwd_dkdv,
            "dq": attention._bwd_dq, "masking fwd": random_masking._random_masking_kernel,
            "masking bwd": random_masking._random_masking_backward_kernel,
            "mae_loss": mae_loss._mae_loss_kernel}[name]


def _every_config(*names):
    """(tuner name, config index) of every config of the named tuners."""
    if not _utils.IMPORTED:
        return []
    return [pytest.param(name, i, id=f"{name}-{i}")
            for name in names for i in range(len(_tuner(name).configs))]


def _close(got, expected, dtype, what):
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    magnitude = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * magnitude,
                               msg=lambda m: f"{what}: {m}")


# Shapes that take each backward path: (n_q, n_kv, d_qk, d_v); odd lengths and head dims.
_FUSED = (50, 37, 24, 24)      # one key tile of 64 (BLOCK_D 32): dk, dv and dq in one kernel
_SPLIT = (33, 70, 72, 40)      # keys past one tile at BLOCK_D 128: dk/dv kernel, then dq kernel


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, index", _every_config("fwd", "fused", "dkdv", "dq"))
def test_attention_config_matches_reference(name, index, dtype):
    n_q, n_kv, d_qk, d_v = _FUSED if name == "fused" else _SPLIT
    torch.manual_seed(index)
    q = torch.randn(2, 3, n_q, d_qk, device=DEVICE).to(dtype)
    k = torch.randn(2, 3, n_kv, d_qk, device=DEVICE).to(dtype)
    v = torch.randn(2, 3, n_kv, d_v, device=DEVICE).to(dtype)
    grad = torch.randn(2, 3, n_q, d_v, device=DEVICE).to(dtype)
    leaves = [t.float().requires_grad_() for t in (q, k, v)]
    expected = reference.attention(*leaves, 0.3)
    expected.backward(grad.float())

    assert (name == "fused") == attention._fuse_backward(attention._sizes(q, k, v), q)
    tuner = _tuner(name)
    config = tuner.configs[index]
    with only(tuner, config):
        out = torch.empty(2, 3, n_q, d_v, device=DEVICE, dtype=dtype)
        lse = attention.attention_forward(q, k, v, 0.3, out)
        grads = [torch.empty_like(t) for t in (q, k, v)]
        attention.attention_backward(grad, q, k, v, out, lse, 0.3, *grads)
        assert tuner.best_config == config
    _close(out, expected, dtype, "out")
    for what, got, leaf in zip(("dq", "dk", "dv"), grads, leaves):
        _close(got, leaf.grad, dtype, what)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("name, index", _every_config("masking fwd", "masking bwd"))
def test_masking_config_matches_reference(name, index, dtype):
    torch.manual_seed(index)
    x = torch.randn(3, 37, 24, device=DEVICE).to(dtype)
    noise = torch.rand(3, 37, device=DEVICE)
    num_keep = reference.num_kept(37, 0.75)
    expected = reference.mask_by_noise(x, noise, num_keep)
    tuner = _tuner(name)
    with only(tuner, tuner.configs[index]):
        got = random_masking.random_masking_forward(x, noise, None, num_keep)
        grad = torch.randn_like(got[0])
        grad_x = random_masking.random_masking_backward(grad, got[2])
        assert tuner.best_config == tuner.configs[index]
    for what, g, e in zip(("x_masked", "mask", "ids_restore"), got, expected):
        assert torch.equal(g, e), what
    leaf = x.clone().requires_grad_()
    reference.mask_by_noise(leaf, noise, num_keep)[0].backward(grad)
    assert torch.equal(grad_x, leaf.grad)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("norm_pix_loss", [False, True])
@pytest.mark.parametrize("name, index", _every_config("mae_loss"))
def test_mae_loss_config_matches_reference(name, index, dtype, norm_pix_loss):
    torch.manual_seed(index)
    imgs = torch.randn(2, 3, 24, 40, device=DEVICE).to(dtype)  # 3 x 5 patches of 8 x 8 x 3
    pred = torch.randn(2, 15, 192, device=DEVICE).to(dtype)
    mask = (torch.rand(2, 15, device=DEVICE) < 0.75).to(dtype)
    leaf = pred.float().requires_grad_()
    expected = reference.mae_loss(imgs.float(), leaf, mask.float(), 8, norm_pix_loss)
    expected.backward()
    tuner = _tuner(name)
    with only(tuner, tuner.configs[index]):
        loss, grad = mae_loss.mae_loss_forward(imgs, pred, mask, 8, norm_pix_loss, True,
                                               torch.float32)
        assert tuner.best_config == tuner.configs[index]
    _close(loss, expected.detach(), dtype, "loss")
    _close(grad, leaf.grad, dtype, "grad pred")


@pytest.mark.parametrize("dtype", DTYPES)
def test_rows_not_16_byte_aligned_are_padded(dtype):
    """Head dim 37: the ops pad the rows to 16 bytes (the kernels' footprints assume it) and
    cut the padding off again, forward and backward."""
    torch.manual_seed(0)
    qkv = torch.randn(2, 45, 3, 2, 37, device=DEVICE).to(dtype)
    q, k, v = reference.split_qkv(qkv)
    assert not attention._aligned_rows(q, k, v)
    assert attention._aligned_rows(*attention._aligned(q, k, v))
    for fn, ref, inputs in ((attention.attention_packed, reference.attention_packed, [qkv]),
                            (attention.attention, reference.attention, [q, k, v])):
        leaves = [t.detach().clone().requires_grad_() for t in inputs]
        out = fn(*leaves, None)
        grad = torch.randn_like(out)
        out.backward(grad)
        exact = [t.detach().float().requires_grad_() for t in inputs]
        expected = ref(*exact)
        expected.backward(grad.float())
        _close(out, expected, dtype, f"{fn.__name__} out")
        for leaf, e in zip(leaves, exact):
            _close(leaf.grad, e.grad, dtype, f"{fn.__name__} grad")


def test_launch_runs_on_the_tensors_device(monkeypatch):
    """The launcher enters the CUDA device of its first tensor (faked here: no GPU needed)."""
    entered = []

    @contextlib.contextmanager
    def device(d):
        entered.append(d)
        yield

    class OnSecondGpu:
        device = torch.device("cuda", 1)

    monkeypatch.setattr(torch.cuda, "device", device)
    launched = _utils.on_input_device(lambda t, x: (entered.copy(), x))
    assert launched(OnSecondGpu(), 5) == ([torch.device("cuda", 1)], 5)
    assert launched(torch.zeros(1), 6) == ([torch.device("cuda", 1)], 6)  # CPU: no device entered
    assert entered == [torch.device("cuda", 1)]


@requires_cuda
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
def test_second_gpu_while_the_first_is_current():
    torch.cuda.set_device(0)
    qkv = torch.randn(2, 50, 3, 2, 64, device="cuda:1", dtype=torch.float16, requires_grad=True)
    out = attention.attention_packed(qkv, None)
    out.float().square().sum().backward()
    expected = reference.attention_packed(qkv.detach().float())
    torch.testing.assert_close(out.float(), expected, rtol=2e-3, atol=2e-3)
    assert qkv.grad.device == torch.device("cuda", 1) and qkv.grad.isfinite().all()
