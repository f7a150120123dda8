"""What ``usfmae-fast scorecam`` does: load a timm classifier checkpoint (any format
:mod:`usfmae_fast.models.classifier` reads) and image files, write heatmaps, overlays, a grid
figure and (with lesion masks) localisation scores.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torchvision.transforms import InterpolationMode

from ..data.load.image_files import PNG_JPEG_SUFFIXES
from ..data.load.base import decode_image
from ..data.load.torch_loader import eval_geometry, eval_transform
from ..models.classifier import load_classifier, model_input
from ..runtime.device import resolve_device
from .figures import save_grid, save_overlay
from .localization import energy_in_mask, pointing_game
from .scorecam import ScoreCAM

GROUP = 16        # images explained per ScoreCAM call
GRID_IMAGES = 32  # images shown in grid.png


def find_images(sources: Sequence) -> list[Path]:
    """Image files given directly or found (recursively) in folders, in sorted order."""
    found = []
    for source in map(Path, sources):
        if source.is_dir():
            found += sorted(p for p in source.rglob("*") if p.suffix.lower() in PNG_JPEG_SUFFIXES)
        elif source.is_file():
            found.append(source)
        else:
            raise FileNotFoundError(f"images: {str(source)!r} does not exist")
    if not found:
        raise ValueError(f"images: no PNG / JPEG files in {[str(s) for s in sources]}")
    return found


def load_image(path, channels: int, size) -> np.ndarray:
    """``[H, W, channels]`` float in [0, 1]: the image as the model sees it, evaluation's
    resize + centre crop (:func:`~usfmae_fast.data.load.torch_loader.eval_geometry`) to ``size``
    (height, width)."""
    pixels = eval_geometry(tuple(size))(decode_image(Path(path).read_bytes(), channels))
    return pixels.permute(1, 2, 0).numpy().astype(np.float32) / 255.0


def model_batch(paths: Sequence, channels: int, size, mean, std) -> torch.Tensor:
    """The model's input ``[N, channels, H, W]``, prepared by evaluation's own
    :func:`~usfmae_fast.data.load.torch_loader.eval_transform` (resize + centre crop, normalise)."""
    transform = eval_transform(tuple(size), mean, std)
    return torch.stack([transform(decode_image(Path(p).read_bytes(), channels)) for p in paths])


def mask_index(masks: Path | None) -> dict[str, Path]:
    """Mask files below folder ``masks`` (recursively, so it may mirror the images' class
    folders) by stem; "<stem>_mask" files also under "<stem>"."""
    if masks is None:
        return {}
    if not masks.is_dir():
        raise FileNotFoundError(f"masks: {str(masks)!r} is not a folder")
    files = sorted(p for p in masks.rglob("*") if p.suffix.lower() in PNG_JPEG_SUFFIXES)
    index = {p.stem.removesuffix("_mask"): p for p in files if p.stem.endswith("_mask")}
    index.update({p.stem: p for p in files if not p.stem.endswith("_mask")})
    return index


def find_mask(image: Path, masks: dict[str, Path], size) -> np.ndarray | None:
    """The lesion mask of ``image`` (same stem, or stem + "_mask", in :func:`mask_index`),
    nonzero = lesion, resized (nearest) and cropped as its image; None when there is none."""
    candidate = masks.get(image.stem)
    if candidate is None:
        return None
    mask = decode_image(candidate.read_bytes(), 1)
    return eval_geometry(tuple(size), InterpolationMode.NEAREST)(mask)[0].numpy() > 0


def explain_images(ckpt, images: Sequence, out, *, model_name: str | None = None,
                   class_idx: int | None = None, target_layer: str | None = None,
                   masks=None, device: str | None = None, dtype: str = "fp32",
                   score: str = "logit", weights: str = "softmax", batch_size: int | None = None,
                   tolerance: float = 0.0, colormap: str = "jet", alpha: float = 0.5) -> dict:
    """Score-CAM of every image; writes ``heatmaps/<name>.npy`` (float32 [H, W] in [0, 1]),
    ``overlays/<name>.png``, ``grid.png`` (the first 32) and ``summary.json``; returns the
    summary (per image: class explained, its probability, localisation scores with a mask)."""
    device = resolve_device(device)
    model = load_classifier(ckpt, model_name).to(device)
    channels, size, mean, std = model_input(model)
    classes = model.num_classes
    if class_idx is not None and not 0 <= class_idx < classes:
        raise ValueError(f"class_idx (--class): {class_idx} is out of range for a model with "
                         f"{classes} classes (0..{classes - 1})")
    cam = ScoreCAM(model, target_layer, score=score, weights=weights, dtype=dtype,
                   batch_size=batch_size)
    paths = find_images(images)
    masks = mask_index(Path(masks) if masks is not None else None)
    out = Path(out)
    names, shown, shown_maps, shown_masks, records = [], [], [], [], []
    for start in range(0, len(paths), GROUP):
        group = paths[start:start + GROUP]
        pixels = np.stack([load_image(p, channels, size) for p in group])
        result = cam(model_batch(group, channels, size, mean, std).to(device), class_idx)
        maps = result.maps.cpu().numpy()
        probs = result.logits.softmax(dim=1).gather(1, result.targets[:, None])[:, 0].tolist()
        for path, image, heat, target, prob in zip(group, pixels, maps, result.targets.tolist(),
                                                   probs):
            name = path.stem if path.stem not in names else f"{path.stem}_{len(names)}"
            names.append(name)
            out.joinpath("heatmaps").mkdir(parents=True, exist_ok=True)
            np.save(out / "heatmaps" / f"{name}.npy", heat.astype(np.float32))
            save_overlay(out / "overlays" / f"{name}.png", image, heat, colormap, alpha)
            record = dict(image=str(path), name=name, target=target, probability=prob)
            mask = find_mask(path, masks, size)
            if mask is not None and mask.any():
                record.update(pointing_game=bool(pointing_game(heat, mask, tolerance)),
                              energy_in_mask=float(energy_in_mask(heat, mask)))
            records.append(record)
            if len(shown) < GRID_IMAGES:
                shown.append(image)
                shown_maps.append(heat)
                shown_masks.append(mask)
    save_grid(shown, np.stack(shown_maps), out / "grid.png",
              titles=[f"{r['name']}: class {r['target']}" for r in records[:GRID_IMAGES]],
              masks=shown_masks, colormap=colormap, alpha=alpha)
    scored = [r for r in records if "pointing_game" in r]
    summary = dict(
        ckpt=str(ckpt), model=model.pretrained_cfg.get("architecture", model_name),
        target_layer=cam.layer_name, score=score, weights=weights, dtype=dtype,
        device=str(device), chunk_size=cam.last_batch_size, images=records,
        pointing_game=(float(np.mean([r["pointing_game"] for r in scored])) if scored else None),
        energy_in_mask=(float(np.nanmean([r["energy_in_mask"] for r in scored]))
                        if scored else None),
        images_with_masks=len(scored), tolerance=tolerance)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary
