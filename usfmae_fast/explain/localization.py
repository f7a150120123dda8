"""Localisation scores of heatmaps against lesion masks, and what trivial maps score.

- :func:`pointing_game` (Zhang et al. 2016): a hit when the heatmap's maximum lies in the mask,
  or within ``tolerance`` pixels of it (the original protocol used 15 px at 224 x 224:
  :func:`scaled_tolerance`).
- :func:`energy_in_mask` (the energy-based pointing game of the Score-CAM paper): the fraction of
  the heatmap's total energy that falls inside the mask.

An all-zero heatmap points nowhere and holds no energy: both scores count it as a failure (a
miss, energy 0), so the two scores are averaged over the same images; :func:`zero_maps` finds
them. Both take ``[H, W]`` or ``[B, H, W]`` numpy arrays or tensors (heatmap non-negative, mask
nonzero = lesion) and return a float / bool, or an array for a batch.

:func:`localise` scores one map with its mask beside the two trivial maps (:data:`BASELINES`):
a centre pointer (all weight on pixel ``(H // 2, W // 2)``) and a uniform map (its maximum a
uniformly random pixel: the expected hit rate; energy = the mask's share of the image).
"""
from __future__ import annotations

import numpy as np

ZHANG_TOLERANCE = (15.0, 224)  # pixels at an input side of 224
BASELINES = ("centre_pointer", "uniform_map")
SCORES = ("pointing_game", "energy_in_mask")


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


def _check_tolerance(tolerance: float) -> None:
    if tolerance < 0:
        raise ValueError(f"tolerance must be >= 0 pixels, got {tolerance}")


def scaled_tolerance(size) -> float:
    """Zhang et al.'s 15 px at 224 x 224, scaled to an input of ``size`` (height, width) by its
    side (the geometric mean of height and width)."""
    pixels, side = ZHANG_TOLERANCE
    return pixels * float(np.sqrt(size[0] * size[1])) / side


def zero_maps(heatmap):
    """True where a heatmap is zero everywhere."""
    heat = heatmap.detach().float().cpu().numpy() if hasattr(heatmap, "detach") else heatmap
    heat = np.asarray(heat)
    flags = ~heat.reshape(-1, heat.shape[-2] * heat.shape[-1]).any(axis=1)
    return bool(flags[0]) if heat.ndim == 2 else flags


def pointing_game(heatmap, mask, tolerance: float = 0.0):
    """True where the heatmap's maximum (the first one in row-major order) lies within
    ``tolerance`` pixels (Euclidean) of a mask pixel; False for an all-zero heatmap."""
    _check_tolerance(tolerance)
    heat, lesion, single = _pair(heatmap, mask)
    hits = []
    for h, m in zip(heat, lesion):
        row, col = np.unravel_index(np.argmax(h), h.shape)
        rows, cols = np.nonzero(m)
        near = ((rows - row) ** 2 + (cols - col) ** 2).min() <= tolerance ** 2
        hits.append(bool(near and h.any()))
    return hits[0] if single else np.array(hits)


def energy_in_mask(heatmap, mask):
    """``sum(heatmap * mask) / sum(heatmap)`` per image; 0 where the heatmap is all zero."""
    heat, lesion, single = _pair(heatmap, mask)
    total = heat.sum(axis=(1, 2))
    inside = (heat * lesion).sum(axis=(1, 2))
    fraction = np.where(total > 0, inside / np.where(total > 0, total, 1), 0.0)
    return float(fraction[0]) if single else fraction


def centre_pointer(shape) -> np.ndarray:
    """The map that points at the centre: 1 at pixel ``(H // 2, W // 2)``, 0 elsewhere."""
    heat = np.zeros(tuple(shape))
    heat[shape[0] // 2, shape[1] // 2] = 1.0
    return heat


def uniform_pointing_game(mask, tolerance: float = 0.0) -> float:
    """The pointing game of a constant map, its maximum drawn uniformly among the tied pixels:
    the share of pixels within ``tolerance`` pixels of the mask (the expected hit rate)."""
    from scipy.ndimage import distance_transform_edt
    _check_tolerance(tolerance)
    _, lesion, _ = _pair(np.zeros(np.shape(mask)), mask)
    return float(np.mean([(distance_transform_edt(~m) <= tolerance).mean() for m in lesion]))


def localise(heatmap, mask, tolerance: float) -> dict:
    """One ``[H, W]`` map against its mask: pointing game, energy in mask, whether the map is all
    zero, and both scores of the centre pointer and the uniform map on the same mask."""
    shape = np.shape(mask)
    return {"pointing_game": bool(pointing_game(heatmap, mask, tolerance)),
            "energy_in_mask": float(energy_in_mask(heatmap, mask)),
            "zero_map": bool(zero_maps(heatmap)),
            "centre_pointer": {
                "pointing_game": bool(pointing_game(centre_pointer(shape), mask, tolerance)),
                "energy_in_mask": float(energy_in_mask(centre_pointer(shape), mask))},
            "uniform_map": {"pointing_game": uniform_pointing_game(mask, tolerance),
                            "energy_in_mask": float(energy_in_mask(np.ones(shape), mask))}}


def summarise(scores: list[dict]) -> dict:
    """Means of :func:`localise` results over images: each score with the trivial maps' beside
    it (``pointing_game``, ``pointing_game_centre_pointer``, ``pointing_game_uniform_map``, ...),
    and ``zero_maps`` (how many maps were all zero, scored as failures in both)."""
    if not scores:
        return {"zero_maps": 0, **{f"{score}{suffix}": None for score in SCORES
                                   for suffix in ("", *(f"_{b}" for b in BASELINES))}}
    summary = {"zero_maps": int(sum(s["zero_map"] for s in scores))}
    for score in SCORES:
        summary[score] = float(np.mean([s[score] for s in scores]))
        for baseline in BASELINES:
            summary[f"{score}_{baseline}"] = float(np.mean([s[baseline][score] for s in scores]))
    return summary
