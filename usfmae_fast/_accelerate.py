"""``usfmae_fast.accelerate(model)``: our attention, masking and loss ops inside an existing timm
``VisionTransformer`` or fb/mae-style model, in place, keeping every parameter object.

Attention modules get a subclass of their own class (``FastAttention``) whose forward runs
``ops.attention_packed`` where that is the same math as the original forward and calls the
original forward otherwise. An fb/mae ``MaskedAutoencoderViT`` also gets ``random_masking`` and
``forward_loss`` bound to versions on ``ops.random_masking`` and ``ops.mae_loss``.
(The module is private because a public ``usfmae_fast.accelerate`` module would shadow the
function of the same name on the package.)
"""
from __future__ import annotations

import functools
import inspect
import warnings

import torch
from timm.models.vision_transformer import Attention as TimmAttention
from torch import nn

from . import ops
from .models.mae import MaskedAutoencoderViT
from .models.vit import Attention as OurAttention

# Children of the pre-1.0 timm Attention that fb/mae and many repos copy; a class with any other
# child, a parameter or buffer of its own, or forward arguments besides x does something else.
_OLD_TIMM_CHILDREN = {"qkv", "q_norm", "k_norm", "attn_drop", "proj", "proj_drop"}


def _is_identity(module) -> bool:
    return module is None or isinstance(module, nn.Identity)


class _FastAttention:
    """Put in front of an attention class: ``ops.attention_packed`` when that is the original's
    math (no mask, no causal flag, no q/k norm, no attention dropout at work, a dtype and head dim
    the backend takes), the original forward otherwise."""

    def forward(self, x, *args, **kwargs):
        # timm's extra arguments are attn_mask=None and is_causal=False; anything else falls back
        extras_unset = all(a is None or a is False for a in (*args, *kwargs.values()))
        dropping = self.training and getattr(getattr(self, "attn_drop", None), "p", 0.0) > 0
        if (not extras_unset or dropping or x.dim() != 3
                or not (_is_identity(getattr(self, "q_norm", None))
                        and _is_identity(getattr(self, "k_norm", None)))):
            return super().forward(x, *args, **kwargs)
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, -1)
        # timm's SDPA path uses the default d ** -0.5 and its manual path self.scale: mirror it
        scale = None if getattr(self, "fused_attn", False) else getattr(self, "scale", None)
        if ops.backend_refusal("attention_packed", qkv, scale) is not None:  # the set backend's limits
            return super().forward(x, *args, **kwargs)
        out = ops.attention_packed(qkv, scale)
        if getattr(self, "norm", None) is not None:  # timm scale_norm (Identity by default)
            out = self.norm(out)
        if getattr(self, "gate", None) is not None:  # timm gated attention
            out = out * self.gate(x).sigmoid()
        out = self.proj(out)
        return self.proj_drop(out) if hasattr(self, "proj_drop") else out

    def __reduce_ex__(self, protocol):
        # pickle (torch.save of a whole model, deepcopy) rebuilds the fast subclass from the
        # original class, so it loads wherever the original class does
        _, _, *state = super().__reduce_ex__(protocol)
        return (_new_fast, (type(self).original_class,), *state)


@functools.lru_cache(maxsize=None)
def _fast_class(base: type) -> type:
    return type(f"Fast{base.__name__}", (_FastAttention, base),
                {"original_class": base, "__module__": __name__})


def _new_fast(base: type):
    cls = _fast_class(base)
    return cls.__new__(cls)


def _is_old_timm_attention(m: nn.Module) -> bool:
    """The pre-1.0 timm Attention (fb/mae, DeiT and their copies), recognised by its layout."""
    qkv, heads = getattr(m, "qkv", None), getattr(m, "num_heads", None)
    if not (isinstance(qkv, nn.Linear) and isinstance(getattr(m, "proj", None), nn.Module)
            and isinstance(heads, int) and heads > 0 and qkv.out_features % (3 * heads) == 0
            and (hasattr(m, "head_dim") or hasattr(m, "scale"))):
        return False
    if {name for name, _ in m.named_children()} - _OLD_TIMM_CHILDREN:
        return False
    if list(m.parameters(recurse=False)) or list(m.buffers(recurse=False)):
        return False
    params = list(inspect.signature(type(m).forward).parameters.values())[1:]
    return len(params) == 1 and params[0].kind in (params[0].POSITIONAL_ONLY,
                                                   params[0].POSITIONAL_OR_KEYWORD)


def _swappable(m: nn.Module) -> bool:
    if isinstance(m, (_FastAttention, OurAttention)):  # done already / ours already uses ops
        return False
    if isinstance(m, TimmAttention):  # a subclass with its own forward does something else
        return type(m).forward is TimmAttention.forward
    return _is_old_timm_attention(m)


def _mae_random_masking(self, x: torch.Tensor, mask_ratio: float):
    """fb/mae ``random_masking`` on ``ops.random_masking``: the same ``torch.rand(N, L)`` noise,
    drawn the same way, so a given RNG state gives bit-identical results."""
    if isinstance(mask_ratio, bool) or not 0 < mask_ratio < 1:  # fb/mae also takes 0; ops not
        return type(self).random_masking(self, x, mask_ratio)
    noise = torch.rand(x.shape[0], x.shape[1], device=x.device)
    x_masked, mask, ids_restore = ops.random_masking(x.contiguous(), mask_ratio, noise)
    return x_masked, mask.to(torch.get_default_dtype()), ids_restore  # fb/mae: torch.ones dtype


def _mae_forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor):
    """fb/mae ``forward_loss`` on ``ops.mae_loss`` (which differentiates ``pred`` only)."""
    if imgs.requires_grad or mask.requires_grad:
        return type(self).forward_loss(self, imgs, pred, mask)
    return ops.mae_loss(imgs.contiguous(), pred.contiguous(), mask.contiguous(),
                        _square_patch(self), bool(self.norm_pix_loss))


def _square_patch(model) -> int | None:
    p = getattr(getattr(model, "patch_embed", None), "patch_size", None)
    if isinstance(p, (tuple, list)) and len(p) == 2 and p[0] == p[1]:
        p = p[0]
    return p if isinstance(p, int) and not isinstance(p, bool) and p > 0 else None


def _takes(method, count: int) -> bool:
    try:
        params = inspect.signature(method).parameters.values()
    except (TypeError, ValueError):
        return False
    return len(params) == count and all(p.kind == p.POSITIONAL_OR_KEYWORD for p in params)


def _bound(model: nn.Module, name: str, fn) -> bool:
    return getattr(getattr(model, name, None), "func", None) is fn


def _bind_mae_methods(model: nn.Module, masking: bool, loss: bool) -> None:
    """Binds our random_masking / forward_loss on an fb/mae-style MAE (ours has them already).
    A partial, unlike a bound method, pickles and deep-copies with the model it is bound to."""
    if (isinstance(model, MaskedAutoencoderViT) or not hasattr(model, "forward_encoder")
            or not hasattr(model, "forward_decoder")):
        return
    if (masking and not _bound(model, "random_masking", _mae_random_masking)
            and _takes(getattr(model, "random_masking", None), 2)):
        model.random_masking = functools.partial(_mae_random_masking, model)
    if (loss and not _bound(model, "forward_loss", _mae_forward_loss)
            and _takes(getattr(model, "forward_loss", None), 3)
            and hasattr(model, "norm_pix_loss") and _square_patch(model) is not None):
        model.forward_loss = functools.partial(_mae_forward_loss, model)


def accelerate(model: nn.Module, *, attention: bool = True, masking: bool = True,
               loss: bool = True, verbose: bool = False) -> nn.Module:
    """Swap our fused ops into ``model`` in place and return it.

    Every timm ``Attention`` (and pre-1.0 timm-style attention, as in fb/mae) runs
    ``ops.attention_packed`` whenever that is the same math, and its original forward otherwise
    (attention mask, causal, q/k norm, attention dropout while training, a dtype or head dim the
    backend cannot take). On an fb/mae ``MaskedAutoencoderViT``, ``random_masking`` and
    ``forward_loss`` run ``ops.random_masking`` and ``ops.mae_loss``. Parameters, state_dict keys
    and RNG use stay as they were; calling it again changes nothing. What is accelerated is
    recorded in ``model._usfmae_accelerated``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if attention:
        for m in model.modules():
            if _swappable(m):
                m.__class__ = _fast_class(type(m))
    _bind_mae_methods(model, masking, loss)
    summary = {"attention": sum(isinstance(m, _FastAttention) for m in model.modules()),
               "random_masking": _bound(model, "random_masking", _mae_random_masking),
               "forward_loss": _bound(model, "forward_loss", _mae_forward_loss)}
    model._usfmae_accelerated = summary
    if not any(summary.values()):
        warnings.warn(f"usfmae_fast.accelerate found nothing to accelerate in "
                      f"{type(model).__name__}: no timm-style Attention module and no fb/mae "
                      "random_masking / forward_loss; the model is unchanged", stacklevel=2)
    elif verbose:
        print(f"usfmae_fast.accelerate: {type(model).__name__}: {summary['attention']} attention "
              f"modules, random_masking {summary['random_masking']}, "
              f"forward_loss {summary['forward_loss']}")
    return model
