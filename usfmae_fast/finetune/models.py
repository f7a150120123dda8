"""Classifiers for fine-tuning: timm models built from USF-MAE / MAE / fb-mae checkpoints or
named timm baselines, fb/mae's linear-probe head, and the fine-tuned checkpoint format.

Model names (``--models``):

- ``usfmae``: a timm ``VisionTransformer`` (the ``usfmae_vit_*`` names) initialised from an MAE
  encoder, ``init``: our pretraining ``checkpoint.safetensors`` or training checkpoints, fb/mae
  ``.pth`` (whole MAE or encoder only), USF-MAE ``.pt``, a timm ViT state dict (e.g. from
  ``export_timm``), or a Hugging Face ViTMAE / ViT folder (``models.hf``). Decoder, mask
  token and any old head are dropped, the position embedding is
  resampled to ``img_size``.
- ``vit_scratch``: the same ViT (the architecture of ``init``, else ``vit_size``), random init.
- any timm model name, e.g. the baselines ``densenet169``, ``resnet50``,
  ``vit_base_patch16_224``: random init, or the local file ``weights[name]`` loaded through timm
  (``pretrained_cfg_overlay=dict(file=...)``; first conv adapted to ``in_chans``, the old head
  dropped). Nothing is ever downloaded.
- the suffix ``_linprobe`` (``usfmae_linprobe``, ``vit_scratch_linprobe``, ...): a linear probe
  of that model: frozen encoder, head ``BatchNorm1d(affine=False, eps=1e-6)`` + ``Linear`` as
  fb/mae ``main_linprobe``. The saved checkpoint folds the batch norm into the linear layer
  (exact in eval mode), so every checkpoint is a plain timm classifier.

Gray data and 3-channel checkpoints: the patch embedding is *converted* with
:func:`~usfmae_fast.models.checkpoint.to_grayscale` (exact: the 1-channel model on gray
normalised with the data's mean / std computes what the 3-channel model computes on the gray
image replicated to RGB with the checkpoint's per-channel normalisation; ImageNet's unless the
checkpoint records its own), rather than replicating gray images to 3 channels (3x the input
work for the same function). A 1-channel checkpoint for 3-channel data gets timm's
``adapt_input_conv``.

Pooling: ``global_pool="avg"`` follows fb/mae ``main_finetune``: the pretrained final ``norm``
is dropped and a fresh LayerNorm (``fc_norm``) normalises the pooled feature (our timm names
default to ``fc_norm=False``, which suits feature extraction, not fine-tuning). A linear probe
keeps the pretrained ``norm`` (``fc_norm=False``): its frozen encoder could not train a fresh
one, and the probe's batch norm normalises the feature anyway. ``"token"`` uses the cls token.

Normalisation: the pretraining run's ``data_mean`` / ``data_std`` when the checkpoint records
them (``summary.json`` beside it, or its ``train_config`` metadata); else, for RGB input from
an RGB checkpoint (fb/mae, the USF-MAE release), ImageNet's, which those were pretrained with;
else ``US_MEAN`` / ``US_STD``; a baseline with a weights file uses its own ``pretrained_cfg``
mean / std (averaged over RGB for gray input). They are stored in the fine-tuned checkpoint.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import safetensors
import torch
from torch import nn

from ..data.load.base import US_MEAN, US_STD, channel_values
from ..models import checkpoint as mck
from ..models.classifier import (LoadedClassifier, load_finetuned,  # noqa: F401 - public here
                                 write_classifier)
from ..models.mae import PRESETS
from ..models.timm_models import NAMES as VIT_NAMES
from ..models.timm_models import timm_kwargs
from ..models.vit import pair

MAE_ARCH = "mae"              # a usfmae_vit_* ViT, from an MAE checkpoint or random
PROBE_SUFFIX = "_linprobe"
BASELINES = ("densenet169", "resnet50", "vit_base_patch16_224")
GLOBAL_POOLS = ("avg", "token")


@dataclass
class ModelSpec:
    """One model of a protocol run: ``name`` is its key in the report and its folder."""
    name: str
    arch: str                     # MAE_ARCH or a timm model name
    init: str | None = None       # MAE-family checkpoint (arch == MAE_ARCH)
    like: str | None = None       # a checkpoint whose ViT shape (not weights) a scratch ViT takes
    weights: str | None = None    # local timm weights file (other archs)
    linear_probe: bool = False

    @property
    def pretrained(self) -> bool:
        return bool(self.init or self.weights)

    def describe(self) -> str:
        what = (f"ViT initialised from {Path(self.init).name}" if self.init else
                f"ViT shaped as {Path(self.like).name}, random init" if self.like else
                "ViT, random init" if self.arch == MAE_ARCH else
                f"timm {self.arch}, " + (f"weights {Path(self.weights).name}" if self.weights
                                         else "random init"))
        return what + (", linear probe (frozen encoder)" if self.linear_probe else
                       ", fine-tuned")


def model_spec(name: str, init: str | None = None, weights: dict | None = None) -> ModelSpec:
    """The :class:`ModelSpec` of a model name (see the module docstring); ``ValueError`` naming
    ``models`` / ``init`` / ``weights`` for one that cannot be built."""
    import timm

    from .. import models  # noqa: F401 - registers usfmae_vit_* with timm
    weights = weights or {}
    probe = name.endswith(PROBE_SUFFIX)
    base = name[:-len(PROBE_SUFFIX)] if probe else name
    if base == "usfmae":
        if not init:
            raise ValueError(f"init: model {name!r} starts from a pretrained MAE checkpoint; "
                             "give one with --init")
        if not Path(init).exists():
            raise FileNotFoundError(f"init: {str(init)!r} does not exist")
        return ModelSpec(name, MAE_ARCH, init=str(init), linear_probe=probe)
    if base == "vit_scratch":
        if init and not Path(init).exists():
            raise FileNotFoundError(f"init: {str(init)!r} does not exist")
        return ModelSpec(name, MAE_ARCH, like=str(init) if init else None, linear_probe=probe)
    if not timm.is_model(base):
        raise ValueError(f"models: {name!r} is neither usfmae, vit_scratch (+ {PROBE_SUFFIX}) "
                         f"nor a timm model name (e.g. {', '.join(BASELINES)})")
    file = weights.get(base, weights.get(name))
    if file is not None and not Path(file).is_file():
        raise FileNotFoundError(f"weights: {str(file)!r} (for {base}) does not exist")
    return ModelSpec(name, base, weights=file, linear_probe=probe)


# ----------------------------------------------------------------------------- building
@dataclass
class Classifier:
    """A built classifier and what a checkpoint must record to rebuild and feed it."""
    model: nn.Module
    arch: str                     # timm model name
    model_kwargs: dict            # JSON-able timm.create_model kwargs that rebuild it
    mean: list[float]
    std: list[float]
    notes: list[str] = field(default_factory=list)

    @property
    def is_vit(self) -> bool:
        return hasattr(self.model, "blocks") and hasattr(self.model, "patch_embed")


def pretraining_stats(path) -> tuple[list[float], list[float]] | None:
    """``(mean, std)`` the pretraining run normalised its images with, when recorded: the run's
    ``summary.json`` (beside the weights, or above ``checkpoints/``), else the safetensors
    metadata (``mean`` / ``std`` of our classifiers, ``train_config`` of our MAE weights; not
    for the ``demo`` source, whose stats are measured and only in the summary)."""
    path = Path(path)
    if path.is_dir():  # a Hugging Face folder records no pretraining statistics
        return None
    folders = [path.parent] + ([path.parent.parent] if path.parent.name == "checkpoints" else [])
    for folder in folders:
        summary = folder / "summary.json"
        if summary.is_file():
            data = json.loads(summary.read_text())
            if data.get("data_mean") is not None and data.get("data_std") is not None:
                return _listed(data["data_mean"]), _listed(data["data_std"])
    if path.suffix != ".safetensors":
        return None
    with safetensors.safe_open(str(path), framework="pt") as f:
        meta = f.metadata() or {}
    if "mean" in meta and "std" in meta:
        return _listed(json.loads(meta["mean"])), _listed(json.loads(meta["std"]))
    data = json.loads(meta.get("train_config", "{}")).get("data", {})
    if data.get("source", "demo") != "demo" and "mean" in data and "std" in data:
        return _listed(data["mean"]), _listed(data["std"])
    return None


def _listed(value) -> list[float]:
    return [float(v) for v in value] if isinstance(value, (list, tuple)) else [float(value)]


def build_classifier(spec: ModelSpec, num_classes: int, *, img_size: int = 224,
                     in_chans: int = 1, global_pool: str = "avg", drop_path: float = 0.0,
                     vit_size: str = "base", mean=None, std=None) -> Classifier:
    """The classifier of ``spec`` for ``num_classes`` classes (``0``: no head, features only)
    and ``in_chans``-channel ``img_size`` images; ``mean`` / ``std`` override the
    normalisation (see the module docstring)."""
    import timm

    from .. import models  # noqa: F401 - registers usfmae_vit_* with timm
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"global_pool must be one of {GLOBAL_POOLS}, got {global_pool!r}")
    if (mean is None) != (std is None):
        raise ValueError("mean and std: give both or neither")
    state, config, notes = None, {}, []
    if spec.arch == MAE_ARCH:
        if spec.init or spec.like:  # a scratch ViT: same shape and input as the pretrained one
            state, config = read_vit_encoder(spec.init or spec.like)
            state = state if spec.init else None
            if mean is None and (stats := pretraining_stats(spec.init or spec.like)):
                mean, std = (_rgb_to(v, in_chans) for v in stats)
                notes.append(f"normalisation of the pretraining data: mean {mean}, std {std}")
            elif mean is None and in_chans == 3 and config.get("in_chans") == 3:
                # an RGB checkpoint that records nothing (fb/mae .pth, the USF-MAE release)
                # was pretrained on ImageNet-normalised input: feed RGB data the same way
                mean, std = list(mck.IMAGENET_MEAN), list(mck.IMAGENET_STD)
                notes.append("normalisation: ImageNet mean / std (the RGB checkpoint records "
                             "none; fb/mae and the USF-MAE release used ImageNet's)")
        elif vit_size in PRESETS:
            config = dict(PRESETS[vit_size])
        else:
            raise ValueError(f"vit_size must be one of {tuple(PRESETS)}, got {vit_size!r}")
        size = min(PRESETS, key=lambda s: abs(PRESETS[s]["embed_dim"] - config["embed_dim"]))
        arch = VIT_NAMES[size]
        kwargs = {k: v for k, v in timm_kwargs(config).items() if k not in ("qkv_bias", "img_size")}
        kwargs.update(global_pool=global_pool, fc_norm=global_pool == "avg"
                      and not spec.linear_probe and num_classes > 0)
    else:
        arch, kwargs = spec.arch, {}
        if mean is None and spec.weights:
            cfg = timm.models.get_pretrained_cfg(arch)
            mean, std = _rgb_to(cfg.mean, in_chans), _rgb_to(cfg.std, in_chans)
    if spec.arch == MAE_ARCH or timm.models.is_model_in_modules(arch, ["vision_transformer"]):
        kwargs["img_size"] = img_size
    kwargs.update(in_chans=in_chans, num_classes=num_classes)
    mean = channel_values(US_MEAN if mean is None else mean, in_chans)
    std = channel_values(US_STD if std is None else std, in_chans)
    inputs = {"mean": mean, "std": std, "input_size": [in_chans, img_size, img_size]}
    if spec.weights:  # read safely first: a refused or damaged file stops here, not in timm
        mck.read_file(spec.weights, "weights")
    # a weights file is read with the registry's input_size (its channels); ours come after
    overlay = {"file": spec.weights} if spec.weights else inputs
    create = dict(pretrained=bool(spec.weights), pretrained_cfg_overlay=overlay, **kwargs)
    try:
        model = timm.create_model(arch, drop_path_rate=drop_path, **create)
    except TypeError as exc:  # e.g. DenseNet: no stochastic depth in its blocks
        if "drop_path_rate" not in str(exc):
            raise
        model = timm.create_model(arch, **create)
        notes.append(f"{arch} has no drop path (stochastic depth): trained without it")
    model.pretrained_cfg.update(inputs)
    kwargs["pretrained_cfg_overlay"] = inputs  # saved: Score-CAM / evaluate prepare inputs alike
    if state is not None:
        notes += load_vit_encoder(model, state, config, mean, std, spec.init)
    if spec.linear_probe:
        make_linear_probe(model)
    return Classifier(model, arch, kwargs, mean, std, notes)


def _rgb_to(values, channels: int) -> list[float]:
    values = [float(v) for v in values]
    return [sum(values) / len(values)] if channels == 1 and len(values) == 3 else values


def read_vit_encoder(path) -> tuple[dict, dict]:
    """``(state_dict, config)`` of an MAE-family / timm ViT checkpoint file."""
    state, saved = mck.read_checkpoint(path)
    if not all(k in state for k in ("patch_embed.proj.weight", "pos_embed",
                                    "blocks.0.mlp.fc1.weight")):
        raise ValueError(f"init: {str(path)!r} is not a ViT / MAE encoder checkpoint (no "
                         f"patch_embed / pos_embed / blocks); its first keys: {list(state)[:6]}")
    return state, {**mck.infer_config(state), **(saved or {})}


def load_vit_encoder(model: nn.Module, state: dict, config: dict, mean, std,
                     source: str = "init") -> list[str]:
    """Load an MAE / timm ViT encoder ``state`` (its ``config`` from ``infer_config``) into the
    timm ``model``: channels converted, position embedding resampled, decoder / old head
    dropped, the model's own head and ``fc_norm`` kept. Returns notes on what was changed."""
    from timm.models import adapt_input_conv

    notes = []
    state = {k: v for k, v in state.items()
             if not k.startswith(mck.DECODER_PREFIXES + ("head.", "fc_norm."))}
    have, want = state["patch_embed.proj.weight"].shape[1], model.patch_embed.proj.in_channels
    if have == 3 and want == 1:
        source_mean, source_std = pretraining_stats(source) or (mck.IMAGENET_MEAN,
                                                                mck.IMAGENET_STD)
        state = mck.to_grayscale(state, channel_values(source_mean, 3),
                                 channel_values(source_std, 3), mean[0], std[0])
        notes.append("3-channel patch embedding folded to 1 channel (to_grayscale)")
    elif have != want:
        state["patch_embed.proj.weight"] = adapt_input_conv(want,
                                                            state["patch_embed.proj.weight"])
        notes.append(f"{have}-channel patch embedding adapted to {want} (adapt_input_conv)")
    old_side = pair(config["img_size"])
    old_grid = (old_side[0] // config["patch_size"], old_side[1] // config["patch_size"])
    if tuple(old_grid) != tuple(model.patch_embed.grid_size):
        notes.append(f"position embedding resampled from {old_grid} to "
                     f"{tuple(model.patch_embed.grid_size)}")
    state = mck.interpolate_pos_embed(state, model.patch_embed.grid_size, old_grid)
    own = model.state_dict()
    if "norm.weight" not in own:  # fc_norm replaces the final norm (fb/mae main_finetune)
        state = {k: v for k, v in state.items() if not k.startswith("norm.")}
    fresh = {k: v for k, v in own.items() if k.startswith(("head.", "fc_norm."))}
    mck.load_state_dict(model, {**fresh, **state})
    return notes


# ----------------------------------------------------------------------------- linear probe
class ProbeHead(nn.Sequential):
    """fb/mae ``main_linprobe`` head: ``BatchNorm1d(affine=False, eps=1e-6)`` + ``Linear``."""

    def __init__(self, linear: nn.Linear):
        super().__init__(nn.BatchNorm1d(linear.in_features, affine=False, eps=1e-6), linear)

    def folded(self) -> nn.Linear:
        """The eval-mode head as one ``Linear`` (exact)."""
        norm, linear = self[0], self[1]
        scale = (norm.running_var + norm.eps).rsqrt()
        out = nn.Linear(linear.in_features, linear.out_features)
        with torch.no_grad():
            out.weight.copy_(linear.weight * scale)
            out.bias.copy_(linear.bias - (linear.weight * scale) @ norm.running_mean)
        return out


def head_name(model: nn.Module) -> str:
    return getattr(model, "pretrained_cfg", {}).get("classifier") or "head"


def make_linear_probe(model: nn.Module) -> nn.Module:
    """Freeze everything but the head, which becomes a :class:`ProbeHead` (weights initialised
    as fb/mae: truncated normal, std 0.01)."""
    name = head_name(model)
    linear = model.get_submodule(name)
    if not isinstance(linear, nn.Linear):
        raise ValueError(f"models: a linear probe needs a Linear head, {name!r} is "
                         f"{type(linear).__name__}")
    nn.init.trunc_normal_(linear.weight, std=0.01)
    nn.init.zeros_(linear.bias)
    for param in model.parameters():
        param.requires_grad = False
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, ProbeHead(linear))
    for param in linear.parameters():
        param.requires_grad = True
    return model


def classifier_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights as a plain timm classifier: probe heads folded into one Linear."""
    state = dict(model.state_dict())
    for name, module in model.named_modules():
        if isinstance(module, ProbeHead):
            state = {k: v for k, v in state.items() if not k.startswith(name + ".")}
            folded = module.folded()
            state[f"{name}.weight"], state[f"{name}.bias"] = folded.weight, folded.bias
    return {k: v.detach().cpu().contiguous() for k, v in state.items()}


# ----------------------------------------------------------------------------- checkpoints
def save_classifier(built: Classifier, path, classes: list[str], info: dict | None = None):
    """``built`` as a classifier checkpoint (:func:`usfmae_fast.models.classifier.
    write_classifier`), which ``usfmae-fast scorecam`` / ``evaluate`` load; ``info``: fold,
    epoch, seed, model spec, ..."""
    return write_classifier(path, classifier_state_dict(built.model), arch=built.arch,
                            model_kwargs=built.model_kwargs, classes=classes, mean=built.mean,
                            std=built.std, info=info)
