"""Faithfulness of a saliency map as a number: deletion and insertion curves (Petsiuk et al.
2018, RISE).

The pixels of each image are ranked by its map, most salient first (equal values in a seeded
random order, so flat regions are not removed top row first). In ``steps`` equal steps
(default 20: 5 % of the pixels per step, 21 points from 0 % to 100 %):

- **deletion**: the most salient pixels are replaced by the baseline image; a faithful map makes
  the score fall fast (low area);
- **insertion**: the most salient pixels are put back into the baseline image, i.e. the least
  salient are removed first, read backwards (the same area); a faithful map makes the score
  rise fast (high area).

The score is the explained class's softmax probability. The baseline is ``"blur"`` (a Gaussian
blur of the image, sigma 5 px and an 11 px kernel at 224 x 224 as in RISE, scaled to the input)
or ``"mean"`` (each channel's mean value of the image). The areas are trapezoids over the
fraction of pixels removed / inserted, in [0, 1]. All inputs go through the model in batches.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torchvision.transforms.functional as TF
from torch import nn

from .cam import resolve_dtype
from .config import DELETION_BASELINES as BASELINES

STEPS = 20
RISE_BLUR = (5.0, 11, 224)  # sigma, kernel size at an input side of 224


class DeletionInsertion(NamedTuple):
    fractions: torch.Tensor      # [steps + 1] fraction of pixels removed / inserted
    deletion: torch.Tensor       # [B, steps + 1] probability as the most salient are removed
    insertion: torch.Tensor      # [B, steps + 1] probability as the most salient are inserted
    deletion_auc: torch.Tensor   # [B]
    insertion_auc: torch.Tensor  # [B]


def baseline_images(images: torch.Tensor, kind: str = "blur") -> torch.Tensor:
    """What removed pixels become: the blurred image or each channel's mean (see the module
    docstring), ``[B, C, H, W]`` like ``images``."""
    if kind == "mean":
        return images.mean(dim=(2, 3), keepdim=True).expand_as(images)
    if kind != "blur":
        raise ValueError(f"baseline must be one of {BASELINES}, got {kind!r}")
    sigma, kernel, side = RISE_BLUR
    scale = math.sqrt(images.shape[-2] * images.shape[-1]) / side
    size = max(3, 2 * int(kernel * scale // 2) + 1)  # odd: 11 at 224
    size = min(size, 2 * (min(images.shape[-2:]) // 2) - 1)  # reflect padding fits the image
    return TF.gaussian_blur(images, [size, size], [sigma * scale] * 2)


def random_maps(count: int, size, seed: int = 0, device=None) -> torch.Tensor:
    """``[count, H, W]`` independent uniform values: the map that knows nothing."""
    gen = torch.Generator().manual_seed(seed)
    return torch.rand(count, *size, generator=gen).to(device)


def salience_ranks(maps: torch.Tensor, seed: int = 0) -> torch.Tensor:
    """``[B, H*W]`` rank of every pixel, 0 = most salient; ties in a seeded random order."""
    flat = maps.float().flatten(1)
    gen = torch.Generator().manual_seed(seed)
    shuffle = torch.randperm(flat.shape[1], generator=gen).to(flat.device)
    order = shuffle[torch.sort(-flat[:, shuffle], dim=1, stable=True).indices]
    ranks = torch.empty_like(order)
    ranks.scatter_(1, order, torch.arange(flat.shape[1], device=flat.device).expand_as(order))
    return ranks


@torch.no_grad()
def deletion_insertion(model: nn.Module, images: torch.Tensor, maps: torch.Tensor, targets, *,
                       steps: int = STEPS, baseline: str = "blur", batch_size: int = 64,
                       dtype="fp32", seed: int = 0) -> DeletionInsertion:
    """Deletion and insertion curves and areas of ``maps`` ``[B, H, W]`` for ``images``
    ``[B, C, H, W]`` (the model's input) and class ``targets`` ``[B]``; ``batch_size`` inputs
    per forward pass, ``dtype`` the autocast precision."""
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an int >= 1, got {steps!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 2:
        raise ValueError(f"batch_size must be an int >= 2, got {batch_size!r}")
    if maps.dim() != 3 or maps.shape[0] != images.shape[0] or maps.shape[1:] != images.shape[2:]:
        raise ValueError(f"maps: expected shape [{images.shape[0]}, {images.shape[2]}, "
                         f"{images.shape[3]}] (one per image), got {tuple(maps.shape)}")
    dtype = resolve_dtype(dtype)
    device = images.device
    targets = torch.as_tensor(targets, device=device).long().view(-1)
    base = baseline_images(images, baseline)
    ranks = salience_ranks(maps.to(device), seed)
    pixels = ranks.shape[1]
    fractions = torch.linspace(0, 1, steps + 1, device=device)
    counts = torch.round(fractions * pixels).long()
    pairs = torch.cartesian_prod(torch.arange(images.shape[0], device=device),
                                 torch.arange(steps + 1, device=device))  # (image, step)
    scores = torch.empty(2, len(pairs), device=device)
    for start in range(0, len(pairs), batch_size // 2):
        image, step = pairs[start:start + batch_size // 2].unbind(1)
        top = (ranks[image] < counts[step, None]).view(-1, 1, *images.shape[2:])
        inputs = torch.cat([torch.where(top, base[image], images[image]),    # deleted
                            torch.where(top, images[image], base[image])])   # inserted
        with torch.autocast(device.type, dtype=dtype, enabled=dtype != torch.float32):
            probs = model(inputs).float().softmax(dim=1)
        probs = probs.gather(1, targets[image].repeat(2)[:, None])[:, 0]
        scores[:, start:start + len(image)] = probs.view(2, -1)
    deletion, insertion = scores.view(2, images.shape[0], steps + 1)
    return DeletionInsertion(fractions, deletion, insertion,
                             torch.trapezoid(deletion, fractions, dim=1),
                             torch.trapezoid(insertion, fractions, dim=1))
