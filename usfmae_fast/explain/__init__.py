"""Explanations for ViT (and CNN baseline) classifiers: Score-CAM batched on the device,
Grad-CAM and Eigen-CAM with the same conventions, overlays, grid figures, and localisation
scores against lesion masks beside those of trivial maps, deletion / insertion faithfulness.

    from usfmae_fast.explain import ScoreCAM
    maps = ScoreCAM(model, "blocks.11.norm1", dtype="bf16")(images).maps  # [B, H, W] in [0, 1]
"""
from ..runtime.lazy import lazy_exports

_EXPORTS = {  # torch loads with the first of these used, not with the package
    "cam": ("BaseCAM", "CAMOutput", "EigenCAM", "GradCAM", "default_layer", "find_layer",
            "vit_reshape"),
    "faithfulness": ("DeletionInsertion", "deletion_insertion", "random_maps"),
    "figures": ("overlay", "save_grid", "save_overlay"),
    "localization": ("centre_pointer", "energy_in_mask", "localise", "pointing_game",
                     "scaled_tolerance", "uniform_pointing_game", "zero_maps"),
    "scorecam": ("ScoreCAM",),
    "config": ("ScorecamConfig",),
}
_MODULE_OF = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_MODULE_OF)
__getattr__ = lazy_exports(__name__, {name: f".{module}" for name, module in _MODULE_OF.items()})
