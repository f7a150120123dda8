"""Heatmap overlays and grid figures (matplotlib colormaps; no OpenCV needed)."""
from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from ..runtime.figures import pyplot, save_figure


def _rgb(image) -> np.ndarray:
    """``[H, W]``, ``[H, W, 1|3]`` (numpy, float in [0, 1] or uint8) or a ``[C, H, W]`` tensor
    -> float ``[H, W, 3]`` in [0, 1]."""
    if hasattr(image, "detach"):
        image = image.detach().float().cpu().numpy()
        image = np.moveaxis(image, 0, -1) if image.ndim == 3 else image
    image = np.asarray(image)
    image = image.astype(np.float64) / (255.0 if image.dtype == np.uint8 else 1.0)
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3 or image.shape[2] not in (1, 3):
        raise ValueError(f"image: expected [H, W], [H, W, 1] or [H, W, 3], got {image.shape}")
    return np.clip(np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image, 0.0, 1.0)


def _heat(heatmap, shape) -> np.ndarray:
    heat = heatmap.detach().float().cpu().numpy() if hasattr(heatmap, "detach") else heatmap
    heat = np.asarray(heat, dtype=np.float64)
    if heat.shape != tuple(shape):
        raise ValueError(f"heatmap: shape {heat.shape} differs from the image's {tuple(shape)}")
    return np.clip(heat, 0.0, 1.0)


def overlay(image, heatmap, colormap: str = "jet", alpha: float = 0.5) -> np.ndarray:
    """``(1 - alpha) * image + alpha * colormap(heatmap)`` as uint8 RGB ``[H, W, 3]``;
    ``heatmap`` in [0, 1] with the image's height and width."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0, 1], got {alpha}")
    import matplotlib
    rgb = _rgb(image)
    colours = matplotlib.colormaps[colormap](_heat(heatmap, rgb.shape[:2]))[..., :3]
    return np.round(255 * ((1 - alpha) * rgb + alpha * colours)).astype(np.uint8)


def save_overlay(path, image, heatmap, colormap: str = "jet", alpha: float = 0.5) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(overlay(image, heatmap, colormap, alpha)).save(path)
    return path


def save_grid(images: Sequence, maps, path, titles: Sequence[str] | None = None,
              masks: Sequence | None = None, columns: int = 4, colormap: str = "jet",
              alpha: float = 0.5, dpi: int = 100) -> Path:
    """One figure for many images.

    ``maps`` an array ``[B, H, W]``: overlays tiled ``columns`` per row. ``maps`` a mapping
    ``{method: [B, H, W]}``: one row per image with the image and then each method's overlay
    (the side-by-side comparison, e.g. ViT Score-CAM vs DenseNet-169 Score-CAM). ``masks``
    (optional, ``None`` entries allowed) are outlined in white.
    """
    plt = pyplot()
    count = len(images)
    methods = dict(maps) if isinstance(maps, Mapping) else {"": maps}
    for name, stack in methods.items():
        if len(stack) != count:
            raise ValueError(f"maps{'[' + repr(name) + ']' if name else ''}: {len(stack)} maps "
                             f"for {count} images")
    if titles is not None and len(titles) != count:
        raise ValueError(f"titles: {len(titles)} titles for {count} images")
    if masks is not None and len(masks) != count:
        raise ValueError(f"masks: {len(masks)} masks for {count} images")
    comparison = isinstance(maps, Mapping)
    panels = []  # (image index, heatmap or None, label)
    for i in range(count):
        label = titles[i] if titles is not None else f"image {i}"
        if comparison:
            panels.append((i, None, label))
            panels += [(i, stack[i], name) for name, stack in methods.items()]
        else:
            panels.append((i, methods[""][i], label))
    cols = 1 + len(methods) if comparison else max(1, min(columns, count))
    rows = -(-len(panels) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(2.6 * cols, 2.7 * rows), dpi=dpi, squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (i, heat, label) in zip(axes.flat, panels):
        rgb = _rgb(images[i])
        ax.imshow(rgb if heat is None else overlay(rgb, heat, colormap, alpha))
        if masks is not None and masks[i] is not None:
            ax.contour(np.asarray(masks[i]) != 0, levels=[0.5], colors="white", linewidths=1)
        # comparison rows: the image carries its title, a method's name heads its column
        ax.set_title(label if heat is None or not comparison or i == 0 else "", fontsize=8)
    return save_figure(fig, path)
