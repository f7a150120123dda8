"""timm ``VisionTransformer`` entry points for USF-MAE encoders exported by
:func:`usfmae_fast.models.checkpoint.export_timm`.

``timm.create_model("usfmae_vit_base_patch16_224", checkpoint_path="enc.safetensors")`` (after
importing ``usfmae_fast.models``) gives features identical to ``forward_features``. The final
``norm`` stays on the tokens (``fc_norm=False``) whatever ``global_pool``, because that is the
norm the encoder was pretrained with. For a classification head (``num_classes > 0``) load
through timm's pretrained path, which drops the missing head instead of failing the strict load:
``create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), num_classes=2)``;
it also resamples the position embedding for another ``img_size``.
"""
from __future__ import annotations

from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models.vision_transformer import VisionTransformer, checkpoint_filter_fn

from .mae import PRESETS


def timm_kwargs(config: dict) -> dict:
    """``VisionTransformer`` kwargs for the encoder of a MaskedAutoencoderViT ``config``."""
    keys = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio")
    kwargs = {k: config[k] for k in keys if k in config}
    if isinstance(kwargs.get("img_size"), list):
        kwargs["img_size"] = tuple(kwargs["img_size"])
    return dict(kwargs, qkv_bias=True, fc_norm=False, num_classes=0)


def _cfg() -> dict:
    return dict(url="", num_classes=0, input_size=(3, 224, 224), pool_size=None, crop_pct=1.0,
                interpolation="bicubic", fixed_input_size=False, mean=IMAGENET_DEFAULT_MEAN,
                std=IMAGENET_DEFAULT_STD, first_conv="patch_embed.proj", classifier="head",
                license="apache-2.0")


NAMES = {size: f"usfmae_vit_{size}_patch{p['patch_size']}_224" for size, p in PRESETS.items()}
default_cfgs = generate_default_cfgs({name: _cfg() for name in NAMES.values()})


def _create(size: str, pretrained: bool, **kwargs) -> VisionTransformer:
    args = dict(timm_kwargs(PRESETS[size]), img_size=224)
    args.pop("num_classes")
    return build_model_with_cfg(VisionTransformer, NAMES[size], pretrained,
                                pretrained_filter_fn=checkpoint_filter_fn,
                                feature_cfg=dict(feature_cls="getter"), **{**args, **kwargs})


@register_model
def usfmae_vit_tiny_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create("tiny", pretrained, **kwargs)


@register_model
def usfmae_vit_small_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create("small", pretrained, **kwargs)


@register_model
def usfmae_vit_base_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create("base", pretrained, **kwargs)


@register_model
def usfmae_vit_large_patch16_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create("large", pretrained, **kwargs)


@register_model
def usfmae_vit_huge_patch14_224(pretrained: bool = False, **kwargs) -> VisionTransformer:
    return _create("huge", pretrained, **kwargs)
