"""Public ``random_masking`` op: checks, backend dispatch, and the torch.library registrations
(autograd + fake kernels) of the compiled ``usfmae::random_masking`` (C++ CPU and CUDA) and of
``usfmae::random_masking_triton``."""
from __future__ import annotations

import torch

from . import _backend, _checks, _ext, _kernel_checks, reference
from .triton import _utils as _triton

_backend.define("random_masking", _kernel_checks.MaskingSpec, _kernel_checks.describe_masking,
                _kernel_checks.check_masking, _kernel_checks.masking_examples)
# csrc/cuda/random_masking_cuda.cu ranks a row in shared memory: kMaxLength
_CUDA_MAX_LENGTH = 4096


def _cuda_takes(spec) -> str | None:
    if spec.length > _CUDA_MAX_LENGTH:
        return f"the cuda kernel takes L <= {_CUDA_MAX_LENGTH}"
    return None


def _check_inputs(x, noise) -> None:
    _checks.tensor("x", x, 3, "[N, L, D]")
    if noise is not None:
        _checks.tensor("noise", noise, 2, "[N, L]")
        _checks.shape("noise", noise, x.shape[:2], "[N, L]")
        _checks.same_device(x=x, noise=noise)


def _draws_noise(masking):
    """``masking(x, noise, num_keep)`` that draws uniform noise itself when ``noise`` is None."""
    def masking_with_noise(x, noise, num_keep):
        if noise is None:
            noise = torch.rand(x.shape[0], x.shape[1], device=x.device)
        return masking(x, noise, num_keep)
    return masking_with_noise


def _outputs_like(x, num_keep):
    n, length, dim = x.shape
    return (x.new_empty(n, num_keep, dim), x.new_empty(n, length),
            x.new_empty(n, length, dtype=torch.int64))


def _fake_backward(grad_x_masked, ids_restore):
    n, length = ids_restore.shape
    return grad_x_masked.new_empty(n, length, grad_x_masked.shape[2])


def _register_autograd(op: str, backward_op) -> None:
    """The gradient of ``op``'s x_masked flows back to the kept rows of x through ``backward_op``
    (grad_x_masked, ids_restore); mask and ids_restore are not differentiable."""
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(output[2])
        ctx.mark_non_differentiable(output[1], output[2])
        ctx.num_inputs = len(inputs)

    def backward(ctx, grad_x_masked, _grad_mask, _grad_ids):
        (ids_restore,) = ctx.saved_tensors
        grad_x = backward_op(grad_x_masked.contiguous(), ids_restore)
        return (grad_x,) + (None,) * (ctx.num_inputs - 1)

    torch.library.register_autograd(op, backward, setup_context=setup_context)


def _masking_compiled(x, noise, num_keep):
    return torch.ops.usfmae.random_masking(x, noise, num_keep)


if _ext.LOADED:
    @torch.library.register_fake("usfmae::random_masking")
    def _fake(x, noise, num_keep):
        return _outputs_like(x, num_keep)

    torch.library.register_fake("usfmae::random_masking_backward", _fake_backward)
    _register_autograd("usfmae::random_masking", torch.ops.usfmae.random_masking_backward)


_backend.register("random_masking", "torch", _draws_noise(reference.mask_by_noise), ("cpu", "cuda"))
_backend.register("random_masking", "cpu", _draws_noise(_masking_compiled), ("cpu",),
                  _ext.compiled_unavailable("random_masking", "CPU"))
_backend.register("random_masking", "cuda", _draws_noise(_masking_compiled), ("cuda",),
                  _ext.compiled_unavailable("random_masking", "CUDA"), _cuda_takes)


if _triton.IMPORTED:
    from .triton import random_masking as _triton_masking

    @torch.library.custom_op("usfmae::random_masking_triton", mutates_args=())
    def _masking_triton_op(x: torch.Tensor, noise: torch.Tensor | None,
                           seed: torch.Tensor | None,
                           num_keep: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        _check_inputs(x, noise)
        if not 0 <= num_keep <= x.shape[1]:
            raise ValueError(f"num_keep must be in [0, L = {x.shape[1]}], got {num_keep}")
        if noise is None and seed is None:
            raise ValueError("seed is required when noise is None")
        return _triton_masking.random_masking_forward(x, noise, seed, num_keep)

    @_masking_triton_op.register_fake
    def _(x, noise, seed, num_keep):
        return _outputs_like(x, num_keep)

    @torch.library.custom_op("usfmae::random_masking_triton_backward", mutates_args=())
    def _masking_triton_backward_op(grad_x_masked: torch.Tensor,
                                    ids_restore: torch.Tensor) -> torch.Tensor:
        _checks.tensor("grad_x_masked", grad_x_masked, 3, "[N, K, D]")
        _checks.tensor("ids_restore", ids_restore, 2, "[N, L]", floating=False)
        if ids_restore.dtype != torch.int64:
            raise TypeError(f"ids_restore must be int64, got {ids_restore.dtype}")
        _checks.shape("ids_restore", ids_restore, (grad_x_masked.shape[0], ids_restore.shape[1]),
                      "[N, L]")
        _checks.same_device(grad_x_masked=grad_x_masked, ids_restore=ids_restore)
        return _triton_masking.random_masking_backward(grad_x_masked, ids_restore)

    _masking_triton_backward_op.register_fake(_fake_backward)
    _register_autograd("usfmae::random_masking_triton", _masking_triton_backward_op)

    def _masking_triton(x, noise, num_keep):
        # Without noise the kernel draws it from a seed of torch's generator (so torch.manual_seed
        # reproduces it), kept on the device: no host sync, and torch.compile traces it.
        seed = None if noise is not None else torch.randint(2**31 - 1, (), device=x.device)
        return _masking_triton_op(x, noise, seed, num_keep)

    _triton.register("random_masking", _masking_triton)


def random_masking(x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None):
    """Keep the ``int(L * (1 - mask_ratio))`` patches of ``x [N, L, D]`` with the smallest noise.

    Returns ``(x_masked [N, K, D], mask [N, L], ids_restore [N, L])`` exactly as fb/mae's
    ``random_masking`` given the same ``noise`` (uniform noise is drawn when it is None); ties
    in the noise go to the lower index. The gradient flows to ``x``.
    """
    _check_inputs(x, noise)
    ratio = _checks.mask_ratio(mask_ratio)
    num_keep = reference.num_kept(x.shape[1], ratio)
    _, fn = _backend.resolve("random_masking", x, noise, num_keep)
    return fn(x, noise, num_keep)
