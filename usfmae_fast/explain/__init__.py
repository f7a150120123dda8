"""Explanations for ViT (and CNN baseline) classifiers: Score-CAM batched on the device,
Grad-CAM and Eigen-CAM with the same conventions, overlays, grid figures, and localisation
scores against lesion masks.

    from usfmae_fast.explain import ScoreCAM
    maps = ScoreCAM(model, "blocks.11.norm1", dtype="bf16")(images).maps  # [B, H, W] in [0, 1]
"""
from .cam import BaseCAM, CAMOutput, EigenCAM, GradCAM, default_layer, find_layer, vit_reshape
from .figures import overlay, save_grid, save_overlay
from .localization import energy_in_mask, pointing_game
from .scorecam import ScoreCAM

__all__ = ["BaseCAM", "CAMOutput", "EigenCAM", "GradCAM", "ScoreCAM", "default_layer",
           "energy_in_mask", "find_layer", "overlay", "pointing_game", "save_grid",
           "save_overlay", "vit_reshape"]
