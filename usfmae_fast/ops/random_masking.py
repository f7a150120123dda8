"""Public ``random_masking`` op: checks, backend dispatch, and the torch.library registration
(autograd + fake kernel) of the compiled ``usfmae::random_masking`` (C++ CPU and CUDA)."""
from __future__ import annotations

import torch

from . import _backend, _checks, _ext, reference

OP = "usfmae::random_masking"


def _masking_compiled(x, noise, num_keep):
    return torch.ops.usfmae.random_masking(x, noise, num_keep)


if _ext.LOADED:
    @torch.library.register_fake(OP)
    def _fake(x, noise, num_keep):
        n, length, dim = x.shape
        return (x.new_empty(n, num_keep, dim), x.new_empty(n, length),
                x.new_empty(n, length, dtype=torch.int64))

    @torch.library.register_fake("usfmae::random_masking_backward")
    def _fake_backward(grad_x_masked, ids_restore):
        n, length = ids_restore.shape
        return grad_x_masked.new_empty(n, length, grad_x_masked.shape[2])

    def _setup_context(ctx, inputs, output):
        _, ids_restore = output[0], output[2]
        ctx.save_for_backward(ids_restore)
        ctx.mark_non_differentiable(output[1], output[2])

    def _backward(ctx, grad_x_masked, _grad_mask, _grad_ids):
        (ids_restore,) = ctx.saved_tensors
        grad_x = torch.ops.usfmae.random_masking_backward(grad_x_masked.contiguous(),
                                                           ids_restore)
        return grad_x, None, None

    torch.library.register_autograd(OP, _backward, setup_context=_setup_context)


_COMPILED_KEYS = {key: _ext.has_kernel("random_masking", key) for key in ("CPU", "CUDA")}


def _compiled_unavailable(key: str):
    def reason() -> str | None:
        if not _ext.LOADED:
            return _ext.LOAD_MESSAGE
        if not _COMPILED_KEYS[key]:
            return f"usfmae_fast._C was built without {key} kernels"
        if key == "CUDA" and not torch.cuda.is_available():
            return "no CUDA device"
        return None
    return reason


_backend.register("random_masking", "torch", reference.mask_by_noise, ("cpu", "cuda"))
_backend.register("random_masking", "cpu", _masking_compiled, ("cpu",),
                  _compiled_unavailable("CPU"))
_backend.register("random_masking", "cuda", _masking_compiled, ("cuda",),
                  _compiled_unavailable("CUDA"))


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Keep the ``int(L * (1 - mask_ratio))`` patches of ``x [N, L, D]`` with the smallest noise.

    Returns ``(x_masked [N, K, D], mask [N, L], ids_restore [N, L])`` exactly as fb/mae's
    ``random_masking`` given the same ``noise`` (uniform noise is drawn when it is None); ties
    in the noise go to the lower index. The gradient flows to ``x``.
    """
    _checks.tensor("x", x, 3, "[N, L, D]")
    ratio = _checks.mask_ratio(mask_ratio)
    n, length, _ = x.shape
    if noise is None:
        noise = torch.rand(n, length, device=x.device)
    else:
        _checks.tensor("noise", noise, 2, "[N, L]")
        _checks.shape("noise", noise, (n, length), "[N, L]")
        _checks.same_device(x=x, noise=noise)
    _, fn = _backend.resolve("random_masking", x.device.type)
    return fn(x, noise, reference.num_kept(length, ratio))
