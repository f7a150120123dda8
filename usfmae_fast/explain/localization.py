"""Localisation scores of heatmaps against lesion masks.

- :func:`pointing_game` (Zhang et al. 2016): a hit when the heatmap's maximum lies in the mask,
  or within ``tolerance`` pixels of it (the original protocol used 15 px at 224 x 224).
- :func:`energy_in_mask` (the energy-based pointing game of the Score-CAM paper): the fraction of
  the heatmap's total energy that falls inside the mask.

Both take ``[H, W]`` or ``[B, H, W]`` numpy arrays or tensors (heatmap non-negative, mask
nonzero = lesion) and return a float / bool, or an array for a batch.
"""
from __future__ import annotations

import numpy as np


def _pair(heatmap, mask) -> tuple[np.ndarray, np.ndarray, bool]:
    def array(x):
        return x.detach().float().cpu().numpy() if hasattr(x, "detach") else np.asarray(x)
    heat, lesion = array(heatmap).astype(np.float64), array(mask) != 0
    single = heat.ndim == 2
    if heat.ndim not in (2, 3):
        raise ValueError(f"heatmap: expected [H, W] or [B, H, W], got shape {heat.shape}")
    if lesion.shape != heat.shape:
        raise ValueError(f"mask: shape {lesion.shape} differs from the heatmap's {heat.shape}")
    if np.isnan(heat).any() or (heat < 0).any():
        raise ValueError("heatmap: values must be finite and non-negative")
    empty = [i for i, m in enumerate(lesion.reshape(-1, *lesion.shape[-2:])) if not m.any()]
    if empty:
        raise ValueError(f"mask: image {empty[0]} has an empty mask (no lesion pixel), so its "
                         "localisation score is undefined")
    return heat.reshape(-1, *heat.shape[-2:]), lesion.reshape(-1, *lesion.shape[-2:]), single


def pointing_game(heatmap, mask, tolerance: float = 0.0):
    """True where the heatmap's maximum (the first one in row-major order) lies within
    ``tolerance`` pixels (Euclidean) of a mask pixel."""
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")
    heat, lesion, single = _pair(heatmap, mask)
    hits = []
    for h, m in zip(heat, lesion):
        row, col = np.unravel_index(np.argmax(h), h.shape)
        rows, cols = np.nonzero(m)
        hits.append(bool(((rows - row) ** 2 + (cols - col) ** 2).min() <= tolerance ** 2))
    return hits[0] if single else np.array(hits)


def energy_in_mask(heatmap, mask):
    """``sum(heatmap * mask) / sum(heatmap)`` per image; NaN where the heatmap is all zero."""
    heat, lesion, single = _pair(heatmap, mask)
    total = heat.sum(axis=(1, 2))
    inside = (heat * lesion).sum(axis=(1, 2))
    with np.errstate(invalid="ignore", divide="ignore"):
        fraction = np.where(total > 0, inside / np.where(total > 0, total, 1), np.nan)
    return float(fraction[0]) if single else fraction
