"""Checkpoints: fb/mae ``.pth``, USF-MAE ``.pt`` state dicts, our safetensors, timm export.

Pickled files are only ever read with ``torch.load(weights_only=True)`` (plus
``argparse.Namespace``, which fb/mae training checkpoints keep under "args"); a pickle that
asks for anything else is refused, never executed. A refused, empty, truncated or otherwise
unreadable file is a :class:`CheckpointError` naming the file and why, never a bare
``EOFError`` / ``RuntimeError`` from deep inside torch.
"""
from __future__ import annotations

import argparse
import json
import math
import pickle
from pathlib import Path
from typing import Callable, Mapping, Sequence

import safetensors
import safetensors.torch
import torch
from timm.layers import resample_abs_pos_embed
from torch import nn

from ..runtime.files import atomic_write
from .mae import PRESETS, MaskedAutoencoderViT
from .vit import pair

CONFIG_KEY = "usfmae_config"  # safetensors metadata entry holding ``model.config`` as JSON
WRAPPER_PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers
DECODER_PREFIXES = ("decoder_", "mask_token")
POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

StateDict = dict[str, torch.Tensor]


class CheckpointError(ValueError):
    """A checkpoint file that cannot be used (refused, damaged, or not what was asked for);
    the message names the file."""


# ----------------------------------------------------------------------------- reading
def _unreadable(path: Path, exc: Exception) -> CheckpointError:
    size = path.stat().st_size
    what = "the file is empty (0 bytes)" if size == 0 else \
        f"the file ({size} bytes) is truncated, damaged or not a checkpoint"
    detail = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return CheckpointError(f"cannot read checkpoint {str(path)!r}: {what} "
                           f"({type(exc).__name__}: {detail[:200]})")


def _torch_load(path: Path):
    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        lines = [line.strip() for line in str(exc).splitlines() if "GLOBAL" in line]
        if not lines:  # no forbidden object named: the pickle itself is broken
            raise _unreadable(path, exc) from exc
        raise CheckpointError(
            f"refusing to load untrusted checkpoint {str(path)!r}: its pickle needs objects "
            f"other than tensors and plain containers, which could run code ({lines[0]}); "
            f"re-save only the state dict if you trust it") from exc
    except (EOFError, RuntimeError, OSError) as exc:  # empty, truncated zip, unreadable
        raise _unreadable(path, exc) from exc


def unwrap_state_dict(checkpoint, path: Path) -> StateDict:
    """The state dict in a loaded checkpoint: bare or under "model" / "state_dict", with DDP /
    compile wrapper prefixes stripped; ``CheckpointError`` naming ``path`` when there is none."""
    if isinstance(checkpoint, Mapping):
        for key in ("model", "state_dict"):
            if isinstance(checkpoint.get(key), Mapping):
                checkpoint = checkpoint[key]
                break
    if not isinstance(checkpoint, Mapping) or not all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        found = list(checkpoint)[:10] if isinstance(checkpoint, Mapping) else type(checkpoint)
        raise CheckpointError(f"{str(path)!r} holds no state dict (a dict of tensors, possibly "
                              f"under 'model' or 'state_dict'); found {found}")
    state_dict = {}
    for key, value in checkpoint.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        state_dict[key] = value
    return state_dict


def read_file(path, name: str = "checkpoint") -> tuple[object, dict]:
    """``(contents, metadata)`` of a checkpoint file: a ``.safetensors`` file's tensors and
    metadata, or any other file's safely unpickled object and ``{}``. ``name`` heads the error
    when the file is missing."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{name} {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        try:
            with safetensors.safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
            return safetensors.torch.load_file(str(path)), metadata
        except (safetensors.SafetensorError, OSError) as exc:
            raise _unreadable(path, exc) from exc
    return _torch_load(path), {}


def read_checkpoint(path) -> tuple[StateDict, dict | None]:
    """``(state_dict, config)`` from a ``.safetensors`` (ours), fb/mae ``.pth``, raw ``.pt`` or
    one of our training checkpoints (``pretrain/checkpointing.py``).

    ``config`` is our saved ``model.config`` (safetensors metadata or a JSON file beside it,
    a training checkpoint's ``model_config``),
    ``{"norm_pix_loss": ...}`` from fb/mae's saved args, or None.
    A folder is read as a Hugging Face ViTMAE / ViT folder (:func:`.hf.read_hf_folder`).
    """
    path = Path(path)
    if path.is_dir():
        from .hf import read_hf_folder
        return read_hf_folder(path)
    checkpoint, metadata = read_file(path)
    if path.suffix == ".safetensors":
        state_dict = unwrap_state_dict(checkpoint, path)
        sidecar = path.with_suffix(".json")
        if CONFIG_KEY in metadata:
            return state_dict, json.loads(metadata[CONFIG_KEY])
        return state_dict, json.loads(sidecar.read_text()) if sidecar.is_file() else None
    if isinstance(checkpoint, Mapping) and isinstance(checkpoint.get("model_config"), Mapping):
        return unwrap_state_dict(checkpoint, path), dict(checkpoint["model_config"])  # our training state
    args = checkpoint.get("args") if isinstance(checkpoint, Mapping) else None
    config = ({"norm_pix_loss": bool(args.norm_pix_loss)}
              if hasattr(args, "norm_pix_loss") else None)
    return unwrap_state_dict(checkpoint, path), config


def checkpoint_file(path) -> Path:
    """The file holding a checkpoint's weights: the path itself, or a Hugging Face folder's
    ``model.safetensors`` (what a provenance record hashes)."""
    path = Path(path)
    return path / "model.safetensors" if path.is_dir() else path


def _count_blocks(state_dict: Mapping, prefix: str) -> int:
    return len({k.split(".")[1] for k in state_dict if k.startswith(prefix)})


def infer_config(state_dict: Mapping[str, torch.Tensor]) -> dict:
    """MaskedAutoencoderViT kwargs read off tensor shapes. Not in the weights, so guessed:
    a square image, ``num_heads`` of the fb/mae preset with that width (else width / 64),
    16 decoder heads (all fb/mae models), ``norm_pix_loss`` False. Override what differs."""
    needed = ("patch_embed.proj.weight", "pos_embed", "blocks.0.mlp.fc1.weight")
    if not all(k in state_dict for k in needed):
        raise ValueError(f"state_dict is not a MaskedAutoencoderViT (it lacks one of {needed}); "
                         f"its first keys: {list(state_dict)[:8]}")
    embed_dim, in_chans, patch_size, _ = state_dict["patch_embed.proj.weight"].shape
    side = round((state_dict["pos_embed"].shape[1] - 1) ** 0.5)
    heads = {p["embed_dim"]: p["num_heads"] for p in PRESETS.values()}
    config = dict(img_size=side * patch_size, patch_size=patch_size, in_chans=in_chans,
                  embed_dim=embed_dim, depth=_count_blocks(state_dict, "blocks."),
                  num_heads=heads.get(embed_dim, max(embed_dim // 64, 1)),
                  mlp_ratio=state_dict["blocks.0.mlp.fc1.weight"].shape[0] / embed_dim)
    if "decoder_embed.weight" in state_dict:
        config.update(decoder_embed_dim=state_dict["decoder_embed.weight"].shape[0],
                      decoder_depth=_count_blocks(state_dict, "decoder_blocks."))
    return config


# ----------------------------------------------------------------------------- loading
def load_state_dict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], *,
                    encoder_only: bool = False) -> nn.Module:
    """Strict load that names every missing, unexpected and mis-shaped key in one error.

    ``encoder_only=True`` accepts a checkpoint without the decoder and mask token (fb/mae's
    released ``mae_pretrain_vit_*.pth``); the decoder then keeps its initialisation.
    """
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict
               and not (encoder_only and k.startswith(DECODER_PREFIXES))]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [f"{k}: checkpoint {tuple(v.shape)} vs model {tuple(expected[k].shape)}"
                 for k, v in state_dict.items() if k in expected and v.shape != expected[k].shape]
    if missing or unexpected or misshaped:
        parts = [f"{title} ({len(keys)}): {', '.join(keys)}" for title, keys in
                 (("missing keys", missing), ("unexpected keys", unexpected),
                  ("mis-shaped keys", misshaped)) if keys]
        hint = ("; pass encoder_only=True to load an encoder-only checkpoint"
                if missing and all(k.startswith(DECODER_PREFIXES) for k in missing) else "")
        raise ValueError("state_dict does not match the model: " + "; ".join(parts) + hint)
    model.load_state_dict(state_dict, strict=not encoder_only)
    return model


def _grid(config: Mapping | None) -> tuple[int, int] | None:
    if not config or "img_size" not in config or "patch_size" not in config:
        return None
    height, width = pair(config["img_size"])
    return height // config["patch_size"], width // config["patch_size"]


def load_checkpoint(model: MaskedAutoencoderViT, path, *, encoder_only: bool = False,
                    interpolate: bool = True) -> MaskedAutoencoderViT:
    """Load any supported checkpoint file into ``model``; position embeddings saved for another
    grid are resampled to the model's (``interpolate``, as fb/mae fine-tuning does)."""
    state_dict, config = read_checkpoint(path)
    if interpolate:
        state_dict = interpolate_pos_embed(state_dict, model.grid_size, _grid(config))
    return load_state_dict(model, state_dict, encoder_only=encoder_only)


def load_model(path, *, encoder_only: bool = False, interpolate: bool = True,
               **overrides) -> MaskedAutoencoderViT:
    """Build the MaskedAutoencoderViT a checkpoint describes and load it; kwargs override the
    saved (or inferred, see :func:`infer_config`) config."""
    state_dict, saved = read_checkpoint(path)
    saved = {**infer_config(state_dict), **(saved or {})}
    model = MaskedAutoencoderViT(**{**saved, **overrides})
    if interpolate:
        state_dict = interpolate_pos_embed(state_dict, model.grid_size, _grid(saved))
    return load_state_dict(model, state_dict, encoder_only=encoder_only)


# ----------------------------------------------------------------------------- writing
def _plain(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    return {k: v.detach().cpu().contiguous() for k, v in state_dict.items()}


def save_safetensors(model: MaskedAutoencoderViT, path,
                     metadata: Mapping[str, str] | None = None) -> Path:
    """Save the weights atomically, with ``model.config`` as JSON in the metadata."""
    meta = {**(metadata or {}), "format": "pt", CONFIG_KEY: json.dumps(model.config)}
    tensors = _plain(model.state_dict())
    return atomic_write(path, lambda tmp: safetensors.torch.save_file(tensors, tmp, meta))


# ----------------------------------------------------------------------------- conversions
def interpolate_pos_embed(state_dict: Mapping[str, torch.Tensor], new_grid,
                          old_grid=None) -> StateDict:
    """Resample ``pos_embed`` / ``decoder_pos_embed`` ``[1, 1+rows*cols, D]`` to ``new_grid``
    (rows, cols) with bicubic interpolation (align_corners False, no antialias: as fb/mae),
    keeping the cls position. ``old_grid`` defaults to a square."""
    out = dict(state_dict)
    new_grid = list(pair(new_grid))
    for key in POS_EMBED_KEYS:
        if key in out and out[key].shape[1] != new_grid[0] * new_grid[1] + 1:
            side = math.isqrt(out[key].shape[1] - 1)
            if old_grid is None and side * side != out[key].shape[1] - 1:
                raise ValueError(f"{key} has {out[key].shape[1] - 1} positions, not a square "
                                 "grid; pass old_grid=(rows, cols)")
            out[key] = resample_abs_pos_embed(
                out[key], new_grid, list(pair(old_grid)) if old_grid else None,
                num_prefix_tokens=1, interpolation="bicubic", antialias=False)
    return out


def gray_patch_embed(weight: torch.Tensor, bias: torch.Tensor, mean: Sequence[float],
                     std: Sequence[float], gray_mean: float = 0.0, gray_std: float = 1.0):
    """Fold 3-channel input normalisation into a 1-channel patch embedding, exactly.

    The result applied to ``(g - gray_mean) / gray_std`` equals the 3-channel conv applied to
    gray ``g`` replicated to 3 channels and normalised per channel by ``mean`` / ``std``.
    """
    mean_, std_ = (torch.tensor(v, dtype=torch.float64).view(1, -1, 1, 1) for v in (mean, std))
    if weight.dim() != 4 or mean_.shape[1] != weight.shape[1] or std_.shape[1] != weight.shape[1]:
        raise ValueError(f"weight [D, C, p, p] with C = len(mean) = len(std) expected, got "
                         f"{tuple(weight.shape)}, {len(mean_.flatten())} means, "
                         f"{len(std_.flatten())} stds")
    folded = (weight.double() / std_).sum(dim=1, keepdim=True)  # acts on raw gray pixels
    new_bias = (bias.double() - (weight.double() * mean_ / std_).sum(dim=(1, 2, 3))
                + gray_mean * folded.sum(dim=(1, 2, 3)))
    return (folded * gray_std).to(weight.dtype), new_bias.to(bias.dtype)


def to_grayscale(state_dict: Mapping[str, torch.Tensor], mean: Sequence[float] = IMAGENET_MEAN,
                 std: Sequence[float] = IMAGENET_STD, gray_mean: float = 0.0,
                 gray_std: float = 1.0) -> StateDict:
    """A 3-channel checkpoint for a model with ``in_chans=1`` (see :func:`gray_patch_embed`).

    The encoder is exact. ``decoder_pred`` (when present) is mapped so that a prediction of the
    normalised replicated gray image becomes the same prediction of the normalised gray image:
    exact for ``norm_pix_loss=False``, a starting point otherwise.
    """
    out = dict(state_dict)
    out["patch_embed.proj.weight"], out["patch_embed.proj.bias"] = gray_patch_embed(
        out["patch_embed.proj.weight"], out["patch_embed.proj.bias"], mean, std,
        gray_mean, gray_std)
    if "decoder_pred.weight" in out:
        weight, bias = out["decoder_pred.weight"], out["decoder_pred.bias"]
        chans = len(mean)
        mean_, std_ = (torch.tensor(v, dtype=torch.float64) for v in (mean, std))
        pixel_w = weight.double().reshape(-1, chans, weight.shape[1]) * std_.view(1, -1, 1)
        pixel_b = bias.double().reshape(-1, chans) * std_ + mean_  # raw pixel of each channel
        out["decoder_pred.weight"] = (pixel_w.mean(1) / gray_std).to(weight.dtype)
        out["decoder_pred.bias"] = ((pixel_b.mean(1) - gray_mean) / gray_std).to(bias.dtype)
    return out


def to_timm_state_dict(model_or_state_dict) -> StateDict:
    """The encoder under timm ``VisionTransformer`` names (decoder and mask token dropped)."""
    state_dict = (model_or_state_dict.state_dict() if isinstance(model_or_state_dict, nn.Module)
                  else model_or_state_dict)
    return {k: v.detach() for k, v in state_dict.items() if not k.startswith(DECODER_PREFIXES)}


def export_timm(model_or_state_dict, path) -> Path:
    """Write the encoder for ``timm.create_model(..., checkpoint_path=path)``: safetensors when
    ``path`` ends in ``.safetensors`` (how timm tells them apart), else a ``torch.save`` dict."""
    tensors = _plain(to_timm_state_dict(model_or_state_dict))
    if str(path).endswith(".safetensors"):
        return atomic_write(path, lambda tmp: safetensors.torch.save_file(
            tensors, tmp, {"format": "pt"}))
    return atomic_write(path, lambda tmp: torch.save(tensors, tmp))
