"""Slim ViT-MAE (fb/mae parameter names), checkpoints, and timm entry points.

Hugging Face ViT / ViTMAE folders: :mod:`.hf` (transformers imported only when used).
Importing this package registers ``usfmae_vit_{tiny,small,base,large}_patch16_224`` and
``usfmae_vit_huge_patch14_224`` with ``timm.create_model``.
"""
from . import timm_models
from .checkpoint import (export_timm, gray_patch_embed, infer_config, interpolate_pos_embed,
                         load_checkpoint, load_model, load_state_dict, read_checkpoint,
                         save_safetensors, to_grayscale, to_timm_state_dict)
from .hf import export_hf, read_hf_folder
from .mae import (PRESETS, MaskedAutoencoderViT, mae_vit, mae_vit_base_patch16,
                  mae_vit_huge_patch14, mae_vit_large_patch16, mae_vit_small_patch16,
                  mae_vit_tiny_patch16)
from .timm_models import timm_kwargs
from .vit import Attention, Block, Mlp, PatchEmbed, sincos_2d

__all__ = ["Attention", "Block", "MaskedAutoencoderViT", "Mlp", "PRESETS", "PatchEmbed",
           "export_hf", "export_timm", "gray_patch_embed", "infer_config",
           "interpolate_pos_embed", "load_checkpoint", "load_model", "load_state_dict",
           "mae_vit", "mae_vit_base_patch16", "mae_vit_huge_patch14", "mae_vit_large_patch16",
           "mae_vit_small_patch16", "mae_vit_tiny_patch16", "read_checkpoint", "read_hf_folder",
           "save_safetensors", "sincos_2d", "timm_kwargs", "timm_models", "to_grayscale",
           "to_timm_state_dict"]
