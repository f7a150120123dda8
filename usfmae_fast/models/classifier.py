"""Classifier checkpoints, written and read in one place: fine-tuning saves them,
``usfmae-fast scorecam`` / ``evaluate`` / ``predict`` load them.

Accepted checkpoints: a state dict of a timm classifier *with its head*, as ``.safetensors`` or
a ``torch.save`` file (``.pth`` / ``.pt``; read with ``weights_only=True``), bare or under
"model" / "state_dict" (timm's ``train.py`` checkpoints, DDP / compile prefixes stripped). The
architecture is the timm model name ``model_name`` (``--model``), or the checkpoint's "arch"
entry (timm ``train.py`` writes one; in safetensors: metadata "arch"), with optional extra
``create_model`` kwargs in "model_kwargs" (a dict, or JSON in safetensors metadata).
``num_classes`` is read off the head, a ViT's ``img_size`` off its position embedding. USF-MAE
encoders exported with ``export_timm`` and fine-tuned with a head load as
``usfmae_vit_{size}_patch16_224``; DenseNet-169 baselines as timm's ``densenet169``.

Fine-tuned checkpoints (:func:`write_classifier`) are safetensors with metadata "arch",
"model_kwargs", "classes", "mean", "std" and ``FINETUNE_KEY`` (how the checkpoint was made).
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import safetensors
import safetensors.torch
import torch
from torch import nn

from ..runtime.files import atomic_write
from .checkpoint import load_state_dict, read_file, unwrap_state_dict

FINETUNE_KEY = "usfmae_finetune"  # safetensors metadata: JSON of how the checkpoint was made


def write_classifier(path, state_dict: dict[str, torch.Tensor], *, arch: str, model_kwargs: dict,
                     classes: list[str], mean, std, info: dict | None = None) -> Path:
    """A safetensors checkpoint that :func:`load_classifier` / :func:`load_finetuned` read."""
    kwargs = {k: v for k, v in model_kwargs.items() if k != "num_classes"}
    meta = {"format": "pt", "arch": arch, "model_kwargs": json.dumps(kwargs),
            "classes": json.dumps(list(classes)), "mean": json.dumps(list(mean)),
            "std": json.dumps(list(std)), FINETUNE_KEY: json.dumps(info or {})}
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(state_dict, tmp, meta))


def read_classifier(path) -> tuple[dict, dict]:
    """``(state_dict, meta)``; meta holds "arch" and "model_kwargs" when the file names them."""
    path = Path(path)
    checkpoint, metadata = read_file(path, "ckpt:")
    if path.suffix == ".safetensors":
        meta = {k: metadata[k] for k in ("arch", "model_kwargs") if k in metadata}
        if "model_kwargs" in meta:
            meta["model_kwargs"] = json.loads(meta["model_kwargs"])
    else:
        meta = ({k: checkpoint[k] for k in ("arch", "model_kwargs") if k in checkpoint}
                if isinstance(checkpoint, dict) else {})
    return unwrap_state_dict(checkpoint, path), meta


def _vit_img_size(state_dict: dict) -> int | None:
    if "pos_embed" not in state_dict or "patch_embed.proj.weight" not in state_dict:
        return None
    tokens = state_dict["pos_embed"].shape[1]
    prefix = int("cls_token" in state_dict) + (state_dict["reg_token"].shape[1]
                                                 if "reg_token" in state_dict else 0)
    for patches in (tokens - prefix, tokens):  # timm's no_embed_class keeps only patches
        side = math.isqrt(patches)
        if side * side == patches:
            return side * state_dict["patch_embed.proj.weight"].shape[-1]
    return None


def load_classifier(path, model_name: str | None = None, **model_kwargs) -> nn.Module:
    """A timm classifier built from ``model_name`` (or the checkpoint's "arch") with the
    checkpoint's weights, in eval mode (see the module docstring for the formats)."""
    import timm

    from . import timm_models  # noqa: F401 - registers the usfmae_vit_* names with timm
    state_dict, meta = read_classifier(path)
    name = model_name or meta.get("arch")
    if not name:
        raise ValueError(f"model: {str(path)!r} does not name its architecture (no 'arch' "
                         "entry); pass a timm model name, e.g. usfmae_vit_base_patch16_224 "
                         "or densenet169")
    if not timm.is_model(name):
        raise ValueError(f"model: {name!r} is not a timm model name")
    cfg = timm.models.get_pretrained_cfg(name)
    head = getattr(cfg, "classifier", None) or "head"
    if f"{head}.weight" not in state_dict:
        raise ValueError(f"ckpt: {str(path)!r} has no classification head ('{head}.weight'); "
                         "Score-CAM explains a classifier's class scores")
    kwargs = dict(num_classes=state_dict[f"{head}.weight"].shape[0])
    img_size = _vit_img_size(state_dict)
    if img_size is not None:
        kwargs["img_size"] = img_size
    model = timm.create_model(name, pretrained=False,
                              **{**kwargs, **meta.get("model_kwargs", {}), **model_kwargs})
    return load_state_dict(model, state_dict).eval()


def expected_input(model: nn.Module) -> tuple[int | None, tuple[int, int] | None]:
    """``(channels, (height, width) or None when any size works)`` of a timm ViT or a CNN."""
    patch_embed = getattr(model, "patch_embed", None)
    if patch_embed is not None and hasattr(patch_embed, "proj"):
        size = None if getattr(model, "dynamic_img_size", False) else tuple(patch_embed.img_size)
        return patch_embed.proj.in_channels, size
    first = next((m for m in model.modules() if isinstance(m, nn.Conv2d)), None)
    return (first.in_channels if first is not None else None), None


def model_input(model: nn.Module) -> tuple[int, tuple[int, int], tuple, tuple]:
    """``(channels, (height, width), mean, std)`` the model's images are prepared with."""
    cfg = getattr(model, "pretrained_cfg", None) or {}
    channels, size = expected_input(model)
    default = tuple(cfg.get("input_size", (3, 224, 224)))
    channels = channels or default[0]
    mean = tuple(cfg.get("mean", (0.5,) * channels))
    std = tuple(cfg.get("std", (0.5,) * channels))
    if len(mean) != channels:  # a gray model with RGB statistics: their average
        mean, std = (float(np.mean(mean)),) * channels, (float(np.mean(std)),) * channels
    return channels, size or default[1:], mean, std


@dataclass
class LoadedClassifier:
    model: nn.Module              # eval mode
    classes: list[str]
    in_chans: int
    img_size: int
    mean: list[float]
    std: list[float]
    info: dict = field(default_factory=dict)

    def describe(self) -> dict:
        return {"classes": self.classes, "in_chans": self.in_chans, "img_size": self.img_size,
                "mean": self.mean, "std": self.std, "info": self.info}


def load_finetuned(path, model_name: str | None = None) -> LoadedClassifier:
    """A classifier checkpoint (ours, or any that ``load_classifier`` reads) with its classes
    (``"0"``, ``"1"``, ... when it names none) and input preparation."""
    model = load_classifier(path, model_name)
    meta = {}
    if Path(path).suffix == ".safetensors":
        with safetensors.safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
    channels, size, mean, std = model_input(model)
    classes = json.loads(meta["classes"]) if "classes" in meta else \
        [str(i) for i in range(model.num_classes)]
    if len(classes) != model.num_classes:
        raise ValueError(f"ckpt: {str(path)!r} names {len(classes)} classes but its head has "
                         f"{model.num_classes} outputs")
    return LoadedClassifier(model, classes, channels, int(size[0]), list(mean), list(std),
                            json.loads(meta.get(FINETUNE_KEY, "{}")))
