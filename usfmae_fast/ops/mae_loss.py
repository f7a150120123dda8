"""Public ``mae_loss`` op (fb/mae ``forward_loss``).

The "torch" backend is the custom op ``usfmae::mae_loss``: it computes in fp32 (fp64 for fp64
inputs), and its backward recomputes the target from ``imgs`` instead of keeping it, so autograd
holds only the inputs. The "triton" backend (``usfmae::mae_loss_triton``) and the compiled
"cpu" / "cuda" backends (``usfmae::mae_loss_fused``) make one fused pass that returns the loss
and, when pred needs a gradient, that gradient too, which autograd keeps and scales. The gradient flows to ``pred`` only (as in MAE pretraining).
"""
from __future__ import annotations

import torch

from . import _backend, _checks, _ext, _kernel_checks, reference
from .triton import _utils as _triton

_backend.define("mae_loss", _kernel_checks.LossSpec, _kernel_checks.describe_loss,
                _kernel_checks.check_loss, _kernel_checks.loss_examples)


def _loss_dtype(imgs, pred, mask):
    return torch.promote_types(torch.promote_types(pred.dtype, imgs.dtype), mask.dtype)


def _compute_dtype(imgs, pred, mask):
    return torch.promote_types(_loss_dtype(imgs, pred, mask), torch.float32)


def _check_inputs(imgs, pred, mask, patch_size) -> int:
    """Checks the op's arguments (each error names its argument); returns the patch size."""
    _checks.tensor("imgs", imgs, 4, "[N, C, H, W]")
    _checks.tensor("pred", pred, 3, "[N, L, p*p*C]")
    _checks.tensor("mask", mask, 2, "[N, L]")
    p = _checks.positive_int("patch_size", patch_size)
    n, c, h, w = imgs.shape
    _checks.divisible("image height", h, p)
    _checks.divisible("image width", w, p)
    length = (h // p) * (w // p)
    _checks.shape("pred", pred, (n, length, p * p * c), "[N, L, p*p*C]")
    _checks.shape("mask", mask, (n, length), "[N, L]")
    _checks.same_device(imgs=imgs, pred=pred, mask=mask)
    return p


def _target(imgs, patch_size, norm_pix_loss, dtype):
    target = reference.patchify(imgs.to(dtype), patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) * torch.rsqrt(var + 1.0e-6)
    return target


@torch.library.custom_op("usfmae::mae_loss", mutates_args=())
def _mae_loss_op(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
                 norm_pix_loss: bool) -> torch.Tensor:
    dtype = _compute_dtype(imgs, pred, mask)
    per_patch = (pred.to(dtype) - _target(imgs, patch_size, norm_pix_loss, dtype)).square()
    weights = mask.to(dtype)
    return ((per_patch.mean(dim=-1) * weights).sum() / weights.sum()).to(
        _loss_dtype(imgs, pred, mask))


@_mae_loss_op.register_fake
def _(imgs, pred, mask, patch_size, norm_pix_loss):
    return pred.new_empty((), dtype=_loss_dtype(imgs, pred, mask))


@torch.library.custom_op("usfmae::mae_loss_backward", mutates_args=())
def _mae_loss_backward_op(grad: torch.Tensor, imgs: torch.Tensor, pred: torch.Tensor,
                          mask: torch.Tensor, patch_size: int,
                          norm_pix_loss: bool) -> torch.Tensor:
    dtype = _compute_dtype(imgs, pred, mask)
    weights = mask.to(dtype)
    coeff = (2.0 / (pred.shape[-1] * weights.sum())) * grad.to(dtype)
    diff = pred.to(dtype) - _target(imgs, patch_size, norm_pix_loss, dtype)
    return (diff * (weights * coeff).unsqueeze(-1)).to(pred.dtype)


@_mae_loss_backward_op.register_fake
def _(grad, imgs, pred, mask, patch_size, norm_pix_loss):
    return torch.empty_like(pred)


def _setup_context(ctx, inputs, output):
    imgs, pred, mask, patch_size, norm_pix_loss = inputs
    ctx.save_for_backward(imgs, pred, mask)
    ctx.patch_size, ctx.norm_pix_loss = patch_size, norm_pix_loss


def _backward(ctx, grad):
    imgs, pred, mask = ctx.saved_tensors
    grad_pred = _mae_loss_backward_op(grad, imgs, pred, mask, ctx.patch_size, ctx.norm_pix_loss)
    return None, grad_pred, None, None, None


_mae_loss_op.register_autograd(_backward, setup_context=_setup_context)
_backend.register("mae_loss", "torch", _mae_loss_op, ("cpu", "cuda"))


def _fused_fake(imgs, pred, mask, patch_size, norm_pix_loss, with_grad):
    return (pred.new_empty((), dtype=_loss_dtype(imgs, pred, mask)),
            torch.empty_like(pred) if with_grad else pred.new_empty(0))


def _setup_fused_context(ctx, inputs, output):
    ctx.with_grad = inputs[5]
    ctx.save_for_backward(output[1])
    ctx.mark_non_differentiable(output[1])


def _fused_backward(ctx, grad, _grad_of_grad_pred):
    if not ctx.needs_input_grad[1]:
        return (None,) * 6
    if not ctx.with_grad:
        raise RuntimeError("the fused mae_loss ran with with_grad=False, so it has no "
                           "gradient for pred; call it with with_grad=True")
    (grad_pred,) = ctx.saved_tensors
    return None, grad * grad_pred, None, None, None, None


def _fused_loss(op):
    """The public signature on a fused op ``(imgs, pred, mask, p, norm, with_grad) -> (loss,
    grad_pred)``: the gradient is computed in the same pass only when autograd will need it.

    That gradient waits in autograd for the upstream one, which a GradScaler makes 2**16 or
    more: kept in fp16 it overflows to inf (inf * 0 = NaN on the kept patches), and at ViT-B size
    (768 values a patch) it is an fp16 subnormal before it is scaled. So an fp16 / bf16 ``pred``
    reaches the kernel as fp32, its gradient is kept in fp32, and autograd rounds it to pred's
    dtype only after scaling it (the backward of ``.float()``)."""
    def loss(imgs, pred, mask, patch_size, norm_pix_loss):
        with_grad = pred.requires_grad and torch.is_grad_enabled()
        if with_grad and pred.dtype in (torch.float16, torch.bfloat16):
            dtype = _loss_dtype(imgs, pred, mask)
            return op(imgs, pred.float(), mask, patch_size, norm_pix_loss, True)[0].to(dtype)
        return op(imgs, pred, mask, patch_size, norm_pix_loss, with_grad)[0]
    return loss


if _triton.IMPORTED:
    from .triton import mae_loss as _triton_mae_loss

    @torch.library.custom_op("usfmae::mae_loss_triton", mutates_args=())
    def _mae_loss_triton_op(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor,
                            patch_size: int, norm_pix_loss: bool,
                            with_grad: bool) -> tuple[torch.Tensor, torch.Tensor]:
        _check_inputs(imgs, pred, mask, patch_size)
        loss, grad_pred = _triton_mae_loss.mae_loss_forward(
            imgs, pred, mask, patch_size, norm_pix_loss, with_grad,
            _compute_dtype(imgs, pred, mask))
        return loss.to(_loss_dtype(imgs, pred, mask)), grad_pred

    _mae_loss_triton_op.register_fake(_fused_fake)
    _mae_loss_triton_op.register_autograd(_fused_backward, setup_context=_setup_fused_context)
    def _triton_takes(spec) -> str | None:
        return next(filter(None, (_triton.dtype_refusal(d, _triton_mae_loss.DTYPES)
                                  for d in (spec.imgs, spec.pred, spec.mask))), None)

    _triton.register("mae_loss", _fused_loss(_mae_loss_triton_op), takes=_triton_takes)

_COMPILED = "usfmae::mae_loss_fused"
if _ext.has_kernel("mae_loss_fused", "CPU") or _ext.has_kernel("mae_loss_fused", "CUDA"):
    torch.library.register_fake(_COMPILED)(_fused_fake)
    torch.library.register_autograd(_COMPILED, _fused_backward,
                                    setup_context=_setup_fused_context)
    _compiled_loss = _fused_loss(torch.ops.usfmae.mae_loss_fused)
    _backend.register("mae_loss", "cpu", _compiled_loss, ("cpu",),
                      _ext.compiled_unavailable("mae_loss_fused", "CPU"))
    _backend.register("mae_loss", "cuda", _compiled_loss, ("cuda",),
                      _ext.compiled_unavailable("mae_loss_fused", "CUDA"))


def mae_loss(imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor, patch_size: int,
             norm_pix_loss: bool = False) -> torch.Tensor:
    """Mean squared error of ``pred [N, L, p*p*C]`` against the patchified ``imgs [N, C, H, W]``
    on the removed patches (``mask`` 1), per-patch normalised when ``norm_pix_loss``."""
    p = _check_inputs(imgs, pred, mask, patch_size)
    _, fn = _backend.resolve("mae_loss", imgs, pred, mask, p, bool(norm_pix_loss))
    return fn(imgs, pred, mask, p, bool(norm_pix_loss))
