"""Hugging Face ``transformers`` interop: export to and import from HF ViT / ViTMAE folders.

What goes where:

- :func:`export_hf` of an MAE checkpoint (ours ``.safetensors`` / training checkpoint, fb/mae
  ``.pth``, USF-MAE ``.pt``) writes a ``ViTMAEForPreTraining`` folder (``encoder_only``: a
  ``ViTModel`` folder); of a fine-tuned ``usfmae_vit_*`` classifier (what
  :func:`~usfmae_fast.models.classifier.load_finetuned` reads) a ``ViTForImageClassification``
  folder with ``id2label`` / ``label2id`` and a ``preprocessor_config.json``
  (``ViTImageProcessor``: the classifier's size, mean, std). HF's classifier reads the cls
  token, so only classifiers fine-tuned with ``global_pool="token"`` export exactly; an
  avg-pooled one, like a CNN, is refused (use ONNX or timm).
- :func:`read_hf_folder` reads a ``ViTMAEForPreTraining`` / ``ViTMAEModel`` / ``ViTModel``
  folder back into our layout. :func:`~usfmae_fast.models.checkpoint.read_checkpoint` calls it
  for any folder, so ``pretrain model.init_from=<folder>`` and ``finetune --init <folder>``
  take HF folders (a ViT folder gives the encoder only).

Names (ours = fb/mae ``models_mae.py``; HF = the modules of transformers >= 5, which its
``save_pretrained`` / ``from_pretrained`` convert to and from the checkpoint names of 4.x):

=====================================  ==========================================================
ours                                   HF (``vit.`` prefix only in ``*ForPreTraining`` /
                                       ``*ForImageClassification``)
=====================================  ==========================================================
patch_embed.proj                       vit.embeddings.patch_embeddings.projection
cls_token, pos_embed                   vit.embeddings.cls_token, vit.embeddings.position_embeddings
blocks.N.norm1, norm2                  vit.layers.N.layernorm_before, layernorm_after
blocks.N.attn.qkv  (rows q | k | v)    vit.layers.N.attention.{q_proj, k_proj, v_proj}
blocks.N.attn.proj                     vit.layers.N.attention.o_proj
blocks.N.mlp.fc1, fc2                  vit.layers.N.mlp.fc1, fc2
norm                                   vit.layernorm
mask_token, decoder_embed              decoder.mask_token, decoder.decoder_embed
decoder_pos_embed                      decoder.decoder_pos_embed
decoder_blocks.N.*                     decoder.decoder_layers.N.* (as the encoder blocks)
decoder_norm, decoder_pred             decoder.decoder_norm, decoder.decoder_pred
head (timm classifier)                 classifier
=====================================  ==========================================================

The sin-cos position embeddings are saved tensors on both sides (HF recomputes them only for
weights a checkpoint lacks), so an export carries ours bit for bit. Configs: ``layer_norm_eps``
1e-6 and exact GELU as fb/mae, ``intermediate_size = int(embed_dim * mlp_ratio)``.
"""
from __future__ import annotations

import json
import re
import warnings
from pathlib import Path

import torch

from .vit import LN_EPS, pair

EXTRA = "pip install 'usfmae_fast[hf]'"
BLOCK_NAMES = {"norm1": "layernorm_before", "norm2": "layernorm_after",
               "attn.proj": "attention.o_proj", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
QKV = ("attention.q_proj", "attention.k_proj", "attention.v_proj")
FIXED_NAMES = {"patch_embed.proj": "{vit}embeddings.patch_embeddings.projection",
               "cls_token": "{vit}embeddings.cls_token",
               "pos_embed": "{vit}embeddings.position_embeddings",
               "norm": "{vit}layernorm", "mask_token": "decoder.mask_token",
               "decoder_embed": "decoder.decoder_embed",
               "decoder_pos_embed": "decoder.decoder_pos_embed",
               "decoder_norm": "decoder.decoder_norm", "decoder_pred": "decoder.decoder_pred",
               "head": "classifier"}
STACKS = {"blocks": "{vit}layers", "decoder_blocks": "decoder.decoder_layers"}
MODEL_CLASSES = {"ViTMAEForPreTraining": "vit.", "ViTMAEModel": "", "ViTModel": ""}


def require_transformers():
    """The ``transformers`` module; RuntimeError saying how to install it when it is absent."""
    try:
        import transformers
    except ImportError as exc:
        raise RuntimeError(f"Hugging Face export / import needs transformers: {EXTRA}") from exc
    return transformers


# ----------------------------------------------------------------------------- names
def _split(key: str) -> tuple[str, str]:
    """``"blocks.3.mlp.fc1.weight" -> ("blocks.3.mlp.fc1", "weight")``; parameters without a
    suffix (``cls_token``) give ``(key, "")``."""
    module, _, leaf = key.rpartition(".")
    return (module, leaf) if leaf in ("weight", "bias") else (key, "")


def _join(module: str, leaf: str) -> str:
    return f"{module}.{leaf}" if leaf else module


def to_hf_state_dict(state_dict: dict, vit_prefix: str = "vit.") -> dict:
    """Our names (MAE or timm classifier) -> HF module names (table in the module docstring);
    ``qkv`` is split into q / k / v. ValueError naming a key that has no HF counterpart."""
    out = {}
    for key, value in state_dict.items():
        module, leaf = _split(key)
        stack = re.match(r"(blocks|decoder_blocks)\.(\d+)\.(.+)$", module)
        if stack:
            base = f"{STACKS[stack[1]].format(vit=vit_prefix)}.{stack[2]}."
            if stack[3] == "attn.qkv":
                for name, part in zip(QKV, value.chunk(3, dim=0)):
                    out[_join(base + name, leaf)] = part.clone()
                continue
            if stack[3] in BLOCK_NAMES:
                out[_join(base + BLOCK_NAMES[stack[3]], leaf)] = value
                continue
        elif module in FIXED_NAMES:
            out[_join(FIXED_NAMES[module].format(vit=vit_prefix), leaf)] = value
            continue
        raise ValueError(f"{key!r} has no Hugging Face ViT / ViTMAE counterpart")
    return out


def from_hf_state_dict(state_dict: dict, vit_prefix: str = "vit.") -> tuple[dict, list[str]]:
    """HF module names -> ours: ``(state_dict, unmapped HF keys)``; q / k / v concatenated."""
    fixed = {v.format(vit=vit_prefix): k for k, v in FIXED_NAMES.items()}
    stacks = {v.format(vit=vit_prefix): k for k, v in STACKS.items()}
    blocks = {v: k for k, v in BLOCK_NAMES.items()}
    out, qkv, unmapped = {}, {}, []
    for key, value in state_dict.items():
        module, leaf = _split(key)
        if module in fixed:
            out[_join(fixed[module], leaf)] = value
            continue
        layer = re.match(r"(.+)\.(\d+)\.(.+)$", module)
        if layer and layer[1] in stacks and layer[3] in blocks:
            out[_join(f"{stacks[layer[1]]}.{layer[2]}.{blocks[layer[3]]}", leaf)] = value
        elif layer and layer[1] in stacks and layer[3] in QKV:
            qkv.setdefault(_join(f"{stacks[layer[1]]}.{layer[2]}.attn.qkv", leaf), {})[
                QKV.index(layer[3])] = value
        else:
            unmapped.append(key)
    for key, parts in qkv.items():
        if len(parts) == 3:
            out[key] = torch.cat([parts[i] for i in range(3)], dim=0)
        else:
            unmapped += [f"{key} (only {len(parts)} of q / k / v)"]
    return out, unmapped


# ----------------------------------------------------------------------------- configs
def _encoder_kwargs(config: dict) -> dict:
    height, width = pair(config["img_size"])
    return dict(hidden_size=config["embed_dim"], num_hidden_layers=config["depth"],
                num_attention_heads=config["num_heads"],
                intermediate_size=int(config["embed_dim"] * config["mlp_ratio"]),
                image_size=height if height == width else [height, width],
                patch_size=config["patch_size"], num_channels=config["in_chans"],
                qkv_bias=True, layer_norm_eps=LN_EPS, hidden_act="gelu",
                hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)


def hf_config(config: dict, *, encoder_only: bool = False, **extra):
    """The ``ViTMAEConfig`` (``encoder_only``: ``ViTConfig``) of our MAE ``config``."""
    transformers = require_transformers()
    kwargs = dict(_encoder_kwargs(config), **extra)
    if encoder_only:
        return transformers.ViTConfig(**kwargs)
    if isinstance(kwargs["image_size"], list):  # its sin-cos init assumes a square grid
        raise ValueError(f"img_size {config['img_size']}: Hugging Face ViTMAE builds square "
                         "images only; export the encoder (encoder_only=True, a ViTModel)")
    decoder = config["decoder_embed_dim"]
    return transformers.ViTMAEConfig(
        **kwargs, decoder_hidden_size=decoder, decoder_num_hidden_layers=config["decoder_depth"],
        decoder_num_attention_heads=config["decoder_num_heads"],
        decoder_intermediate_size=int(decoder * config["mlp_ratio"]),
        norm_pix_loss=bool(config.get("norm_pix_loss", False)), mask_ratio=0.75)


def our_config(hf: dict, where: str) -> dict:
    """Our MaskedAutoencoderViT kwargs from an HF ``config.json`` dict; ValueError naming
    ``where`` for a ViT our model cannot represent."""
    if hf.get("hidden_act", "gelu") != "gelu" or not hf.get("qkv_bias", True):
        raise ValueError(f"{where}: hidden_act {hf.get('hidden_act')!r} / qkv_bias "
                         f"{hf.get('qkv_bias')!r}: our ViT has exact GELU and qkv biases")
    if abs(hf.get("layer_norm_eps", 1e-12) - LN_EPS) > 1e-12:
        warnings.warn(f"{where}: layer_norm_eps {hf.get('layer_norm_eps')} loads into our "
                      f"model's {LN_EPS} (fb/mae's); outputs differ slightly", stacklevel=3)
    ratio = hf["intermediate_size"] / hf["hidden_size"]
    image = hf["image_size"]
    config = dict(img_size=image if isinstance(image, int) else list(image),
                  patch_size=hf["patch_size"], in_chans=hf["num_channels"],
                  embed_dim=hf["hidden_size"], depth=hf["num_hidden_layers"],
                  num_heads=hf["num_attention_heads"], mlp_ratio=ratio)
    if hf.get("model_type") == "vit_mae":
        if hf["decoder_intermediate_size"] != int(hf["decoder_hidden_size"] * ratio):
            raise ValueError(f"{where}: decoder_intermediate_size "
                             f"{hf['decoder_intermediate_size']} is not decoder_hidden_size x "
                             f"{ratio} (our MAE has one mlp_ratio)")
        config.update(decoder_embed_dim=hf["decoder_hidden_size"],
                      decoder_depth=hf["decoder_num_hidden_layers"],
                      decoder_num_heads=hf["decoder_num_attention_heads"],
                      norm_pix_loss=bool(hf.get("norm_pix_loss", False)))
    return config


# ----------------------------------------------------------------------------- export
def _save(model, state: dict, out_dir: Path, where) -> None:
    result = model.load_state_dict(state, strict=False)
    if result.missing_keys or result.unexpected_keys:
        raise ValueError(f"{where}: the HF model does not match the converted weights; "
                         f"missing {result.missing_keys}, unexpected {result.unexpected_keys}")
    model.save_pretrained(out_dir, safe_serialization=True)


def export_hf(checkpoint, out_dir, *, encoder_only: bool = False) -> Path:
    """Write ``checkpoint`` as a Hugging Face folder (config.json + model.safetensors) in
    ``out_dir`` and return it; what each checkpoint becomes: see the module docstring."""
    from .checkpoint import load_model, read_checkpoint
    from .classifier import read_classifier

    transformers = require_transformers()
    out_dir = Path(out_dir)
    state, _ = read_checkpoint(checkpoint)
    _, meta = read_classifier(checkpoint)
    if meta.get("arch") or "head.weight" in state:
        return _export_classifier(checkpoint, out_dir, transformers)
    if not all(k in state for k in ("patch_embed.proj.weight", "pos_embed",
                                    "blocks.0.mlp.fc1.weight")):
        raise ValueError(f"checkpoint {str(checkpoint)!r} is neither an MAE / ViT checkpoint nor "
                         "a ViT classifier: use --format onnx or timm")
    if not encoder_only and "decoder_embed.weight" not in state:
        raise ValueError(f"checkpoint {str(checkpoint)!r} holds no decoder: export it with "
                         "encoder_only=True (--encoder-only), a ViTModel folder")
    model = load_model(checkpoint, encoder_only=encoder_only)
    config = hf_config(model.config, encoder_only=encoder_only)
    ours = model.state_dict()
    if encoder_only:
        hf = transformers.ViTModel(config, add_pooling_layer=False)
        ours = {k: v for k, v in ours.items() if not k.startswith(("decoder_", "mask_token"))}
        _save(hf, to_hf_state_dict(ours, ""), out_dir, checkpoint)
    else:
        _save(transformers.ViTMAEForPreTraining(config), to_hf_state_dict(ours), out_dir,
              checkpoint)
    return out_dir


def _export_classifier(checkpoint, out_dir: Path, transformers) -> Path:
    from timm.models.vision_transformer import VisionTransformer

    from .classifier import load_finetuned

    loaded = load_finetuned(checkpoint)
    model = loaded.model
    if not isinstance(model, VisionTransformer):
        raise ValueError(f"checkpoint {str(checkpoint)!r} is a {type(model).__name__}, not a "
                         "ViT: Hugging Face ViTForImageClassification cannot hold it; use "
                         "--format onnx or timm")
    if (model.global_pool != "token" or not isinstance(model.fc_norm, torch.nn.Identity)
            or model.num_reg_tokens or model.no_embed_class or model.cls_token is None):
        raise ValueError(f"checkpoint {str(checkpoint)!r} pools with {model.global_pool!r} "
                         "(+ fc_norm); Hugging Face ViTForImageClassification classifies the cls "
                         "token only, so it would compute something else: use --format onnx or "
                         "timm (or fine-tune with global_pool='token')")
    embed = model.patch_embed
    config = dict(img_size=list(embed.img_size), patch_size=embed.patch_size[0],
                  in_chans=loaded.in_chans, embed_dim=model.embed_dim,
                  depth=len(model.blocks), num_heads=model.blocks[0].attn.num_heads,
                  mlp_ratio=model.blocks[0].mlp.fc1.out_features / model.embed_dim)
    if config["img_size"][0] == config["img_size"][1]:
        config["img_size"] = config["img_size"][0]
    labels = dict(enumerate(loaded.classes))
    hf_cfg = hf_config(config, encoder_only=True, num_labels=len(labels), id2label=labels,
                       label2id={c: i for i, c in labels.items()})
    hf_cfg.architectures = ["ViTForImageClassification"]
    hf = transformers.ViTForImageClassification(hf_cfg)
    _save(hf, to_hf_state_dict(model.state_dict()), out_dir, checkpoint)
    height, width = embed.img_size
    transformers.ViTImageProcessor(
        do_resize=True, size={"height": height, "width": width}, do_rescale=True,
        do_normalize=True, image_mean=list(loaded.mean), image_std=list(loaded.std),
    ).save_pretrained(out_dir)
    return out_dir


# ----------------------------------------------------------------------------- import
def _mismatch(entry) -> str:
    """transformers lists a mis-shaped weight as ``(key, checkpoint shape, model shape)``."""
    if isinstance(entry, (tuple, list)) and len(entry) == 3:
        key, have, want = entry
        return f"{key}: checkpoint {tuple(have)} vs config {tuple(want)}"
    return str(entry)


def read_hf_folder(path) -> tuple[dict, dict]:
    """``(state_dict in our layout, our config)`` of an HF ``ViTMAEForPreTraining`` /
    ``ViTMAEModel`` / ``ViTModel`` folder (a ``ViTForImageClassification`` folder gives its
    encoder). ValueError naming the file for a missing config.json, another model type, or
    missing / unexpected / mis-shaped weights."""
    path = Path(path)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise ValueError(f"{str(path)!r} is a folder without config.json: not a Hugging Face "
                         "model folder (nor a checkpoint file)")
    try:
        hf = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{str(config_file)!r} is not valid JSON: {exc}") from exc
    model_type = hf.get("model_type") if isinstance(hf, dict) else None
    if model_type not in ("vit_mae", "vit"):
        raise ValueError(f"{str(config_file)!r} describes model_type {model_type!r}; a "
                         "Hugging Face 'vit_mae' or 'vit' model is needed")
    transformers = require_transformers()
    architectures = hf.get("architectures") or []
    if model_type == "vit":
        cls, prefix, extra = transformers.ViTModel, "", {"add_pooling_layer": False}
    elif "ViTMAEForPreTraining" in architectures:
        cls, prefix, extra = transformers.ViTMAEForPreTraining, "vit.", {}
    else:
        cls, prefix, extra = transformers.ViTMAEModel, "", {}
    weights = next((path / n for n in ("model.safetensors", "model.safetensors.index.json",
                                       "pytorch_model.bin") if (path / n).exists()), path)
    verbosity = transformers.logging.get_verbosity()
    transformers.logging.set_verbosity_error()  # its load report: what the error below says
    try:
        model, info = cls.from_pretrained(str(path), output_loading_info=True,
                                          ignore_mismatched_sizes=True,  # listed below
                                          dtype=torch.float32, **extra)
    except (OSError, RuntimeError, ValueError) as exc:
        raise ValueError(f"cannot read Hugging Face weights {str(weights)!r}: "
                         f"{type(exc).__name__}: {str(exc)[:500]}") from exc
    finally:
        transformers.logging.set_verbosity(verbosity)
    tolerated = ("classifier.", "pooler.")
    problems = {"missing keys": list(info.get("missing_keys", [])),
                "unexpected keys": [k for k in info.get("unexpected_keys", [])
                                    if not k.startswith(tolerated)],
                "mis-shaped keys": [_mismatch(k) for k in info.get("mismatched_keys", [])]}
    if any(problems.values()):
        raise ValueError(f"{str(weights)!r} does not match its config.json: " + "; ".join(
            f"{title} ({len(keys)}): {', '.join(map(str, keys))}"
            for title, keys in problems.items() if keys))
    state, unmapped = from_hf_state_dict(
        {k: v.detach().clone() for k, v in model.state_dict().items()}, prefix)
    if unmapped:
        raise ValueError(f"{str(weights)!r}: weights with no counterpart in our ViT-MAE: "
                         f"{', '.join(unmapped)}")
    return state, our_config(hf, str(config_file))
