"""What ``usfmae-fast scorecam`` does: load a timm classifier checkpoint (any format
:mod:`usfmae_fast.models.classifier` reads) and image files, write heatmaps, overlays, a grid
figure, (with lesion masks) localisation scores beside a centre pointer's and a uniform map's,
and deletion / insertion areas of Score-CAM, Grad-CAM, Eigen-CAM and a random map.
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
from ..models.classifier import load_classifier  # noqa: F401 - what scorecam loads (tests)
from ..models.classifier import load_finetuned, model_input
from ..runtime.device import resolve_device
from .cam import EigenCAM, GradCAM
from .faithfulness import deletion_insertion, random_maps
from .figures import save_grid, save_overlay
from .labels import explained_by, label_indices, read_labels
from .localization import localise, scaled_tolerance, summarise, zero_maps
from .scorecam import ScoreCAM

GROUP = 16        # images explained per ScoreCAM call
GRID_IMAGES = 32  # images shown in grid.png
ZERO_MAP_RULE = "an all-zero map is a pointing-game miss and has energy 0 in the mask"
FAITHFULNESS_SCORE = "softmax probability of the explained class"


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


def figure_title(record: dict) -> str:
    """``"<name>: <class explained> (<label | predicted | fixed>[, pred <class>])"``."""
    wrong = record["class"] != record["predicted"]
    return (f"{record['name']}: {record['class']} ({record['explained']}"
            + (f", pred {record['predicted']})" if wrong else ")"))


def faithfulness_curves(model, cams: dict, images: torch.Tensor, result, seed: int,
                        **kwargs) -> dict:
    """Deletion / insertion areas per method (Score-CAM's maps in ``result``, each CAM of
    ``cams`` on the same classes, a random map) for the images of one group."""
    maps = {"scorecam": result.maps,
            **{name: cam(images, result.targets).maps for name, cam in cams.items()},
            "random": random_maps(len(images), images.shape[-2:], seed, images.device)}
    return {name: deletion_insertion(model, images, m, result.targets, seed=seed, **kwargs)
            for name, m in maps.items()}


def explain_images(ckpt, images: Sequence, out, *, model_name: str | None = None,
                   labels=None, class_source: str = "auto", class_idx: int | None = None,
                   target_layer: str | None = None, masks=None, device: str | None = None,
                   dtype: str = "fp32", score: str = "logit", weights: str = "softmax",
                   batch_size: int | None = None, tolerance: float | None = None,
                   faithfulness: bool = True, deletion_steps: int = 20,
                   deletion_baseline: str = "blur", seed: int = 0, colormap: str = "jet",
                   alpha: float = 0.5) -> dict:
    """Score-CAM of every image; writes ``heatmaps/<name>.npy`` (float32 [H, W] in [0, 1]),
    ``overlays/<name>.png``, ``grid.png`` (the first 32, titled with the class explained) and
    ``summary.json``; returns the summary.

    The class explained is the image's label when ``labels`` are given (a ``path,label`` CSV,
    ``"folder"`` or a mapping of image path to class name) unless ``class_source="predicted"``;
    ``class_idx`` explains one class for all. With ``masks``: pointing game (``tolerance``
    pixels; default 15 px at 224, scaled) and energy in mask, each beside the centre pointer's
    and the uniform map's on the same images, all-zero maps counted as failures in both. With
    ``faithfulness``: deletion / insertion areas (:mod:`.faithfulness`) of Score-CAM, Grad-CAM
    and Eigen-CAM (same layer and class) and a random map."""
    device = resolve_device(device)
    loaded = load_finetuned(ckpt, model_name)
    model, classes = loaded.model.to(device), loaded.classes
    channels, size, mean, std = model_input(model)
    if class_idx is not None and not 0 <= class_idx < len(classes):
        raise ValueError(f"class_idx (--class): {class_idx} is out of range for a model with "
                         f"{len(classes)} classes (0..{len(classes) - 1})")
    explained = explained_by(class_source, class_idx, labels)
    cam = ScoreCAM(model, target_layer, score=score, weights=weights, dtype=dtype,
                   batch_size=batch_size)
    cams = {"gradcam": GradCAM(model, cam.layer_name, score=score, dtype=dtype),
            "eigencam": EigenCAM(model, cam.layer_name, dtype=dtype)} if faithfulness else {}
    paths = find_images(images)
    label_names = read_labels(labels, paths) if labels is not None else [None] * len(paths)
    targets = (label_indices(label_names, paths, classes) if explained == "label"
               else [class_idx] * len(paths))
    tolerance_rule = "given" if tolerance is not None else \
        f"15 px at 224 x 224 (Zhang et al. 2016) scaled to {size[0]} x {size[1]}"
    tolerance = scaled_tolerance(size) if tolerance is None else float(tolerance)
    masks = mask_index(Path(masks) if masks is not None else None)
    out = Path(out)
    names, shown, shown_maps, shown_masks, records, localised = [], [], [], [], [], []
    curves: dict[str, list] = {}
    for start in range(0, len(paths), GROUP):
        group = paths[start:start + GROUP]
        pixels = np.stack([load_image(p, channels, size) for p in group])
        x = model_batch(group, channels, size, mean, std).to(device)
        chosen = targets[start:start + GROUP]
        result = cam(x, None if chosen[0] is None else chosen)
        if faithfulness:
            for method, c in faithfulness_curves(
                    model, cams, x, result, seed + start, steps=deletion_steps,
                    baseline=deletion_baseline, dtype=dtype,
                    batch_size=max(2, cam.last_batch_size)).items():
                curves.setdefault(method, []).append(c)
        maps = result.maps.cpu().numpy()
        probs = result.logits.softmax(dim=1).gather(1, result.targets[:, None])[:, 0].tolist()
        predicted = result.logits.argmax(dim=1).tolist()
        for j, (path, image, heat) in enumerate(zip(group, pixels, maps)):
            name = path.stem if path.stem not in names else f"{path.stem}_{len(names)}"
            names.append(name)
            out.joinpath("heatmaps").mkdir(parents=True, exist_ok=True)
            np.save(out / "heatmaps" / f"{name}.npy", heat.astype(np.float32))
            save_overlay(out / "overlays" / f"{name}.png", image, heat, colormap, alpha)
            target = result.targets[j].item()
            record = dict(image=str(path), name=name, target=target, **{"class": classes[target]},
                          explained=explained, label=label_names[start + j],
                          predicted=classes[predicted[j]], probability=probs[j],
                          zero_map=bool(zero_maps(heat)))
            if faithfulness:
                for kind in ("deletion_auc", "insertion_auc"):
                    record[kind] = {m: float(getattr(c[-1], kind)[j]) for m, c in curves.items()}
            mask = find_mask(path, masks, size)
            if mask is not None and mask.any():
                localised.append(localise(heat, mask, tolerance))
                record.update(localised[-1])
            records.append(record)
            if len(shown) < GRID_IMAGES:
                shown.append(image)
                shown_maps.append(heat)
                shown_masks.append(mask)
    save_grid(shown, np.stack(shown_maps), out / "grid.png",
              titles=[figure_title(r) for r in records[:GRID_IMAGES]],
              masks=shown_masks, colormap=colormap, alpha=alpha)
    localisation = summarise(localised)
    summary = dict(
        ckpt=str(ckpt), model=model.pretrained_cfg.get("architecture", model_name),
        classes=classes, class_explained=explained,
        labels=None if labels is None else str(labels) if isinstance(labels, (str, Path))
        else "mapping",
        correct_predictions=(sum(r["label"] == r["predicted"] for r in records)
                             if labels is not None else None),
        target_layer=cam.layer_name, target_layer_choice=target_layer or "default",
        score=score, weights=weights, dtype=dtype, device=str(device),
        chunk_size=cam.last_batch_size, zero_maps=sum(r["zero_map"] for r in records),
        zero_map_rule=ZERO_MAP_RULE, images_with_masks=len(localised),
        zero_maps_with_masks=localisation.pop("zero_maps"), tolerance=tolerance,
        tolerance_rule=tolerance_rule, **localisation,
        faithfulness=faithfulness_summary(curves, deletion_steps, deletion_baseline, seed)
        if faithfulness else None,
        images=records)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    return summary


def faithfulness_summary(curves: dict, steps: int, baseline: str, seed: int) -> dict:
    """Mean deletion / insertion areas per method and how they were measured."""
    methods = {}
    for method, parts in curves.items():
        methods[method] = {kind: float(torch.cat([getattr(c, kind) for c in parts]).mean())
                           for kind in ("deletion_auc", "insertion_auc")}
    count = sum(len(c.deletion_auc) for c in next(iter(curves.values()), []))
    return dict(images=count, score=FAITHFULNESS_SCORE, baseline=baseline, steps=steps,
                step_fraction=1 / steps, seed=seed,
                area="trapezoid over the fraction of pixels removed (deletion: most salient "
                     "first; lower is better) or inserted (insertion: most salient first; "
                     "higher is better)", methods=methods)
