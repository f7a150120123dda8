"""Held-out MAE loss of the model against trivial predictors, on the same masks and the same
loss.

Every number here is the run's own loss, ``ops.mae_loss(imgs, pred, mask, patch_size,
norm_pix_loss)`` (fb/mae ``forward_loss``: the squared error averaged over the pixels of each
removed patch, then over the removed patches; with ``norm_pix_loss`` the target is each patch
normalised by its own mean and unbiased std, eps 1e-6), on the held-out images (``data.heldout``,
normalised as the training images), averaged over ``draws`` fixed mask draws:
:func:`heldout_noise` draws them from one generator seeded with the run's seed, so draw 0 is the
mask of the reconstruction figure, and the model at the start, the model at the end and every
trivial predictor are scored on the same masks. The masks are ``random_masking``'s (the
``int(L * (1 - mask_ratio))`` patches of lowest noise are kept).

The trivial predictors (:func:`trivial_predictions`), all in the loss's target space (the
normalised image's pixels; with ``norm_pix_loss`` the per-patch normalised pixels):

- ``zero``: 0 for every pixel of every removed patch. Plain pixels: the dataset mean (0 of the
  normalised image). ``norm_pix_loss``: each patch's own mean (0 of the normalised target), so
  the loss is ``(D - 1) / D * var / (var + 1e-6)`` per patch, about 1 (D = p*p*C).
- ``patch_mean``: each removed patch predicted as its own mean (per channel), an oracle: it is
  told the patch's mean, which the model must infer from the visible patches. Any model that
  has learned the low frequencies of the image must beat it; with ``norm_pix_loss`` (and one
  channel) it is ``zero`` (a normalised patch has mean 0).
- ``visible_mean``: each removed patch predicted as the mean (per channel) of the pixels of the
  image's visible patches, in the target space: a non-oracle baseline that uses only what the
  model sees. With ``norm_pix_loss`` (one channel) it is ``zero`` up to rounding.
"""
from __future__ import annotations

import torch

from .. import ops
from ..ops import reference

BASELINES = ("zero", "patch_mean", "visible_mean")
DEFAULT_DRAWS = 8
METHOD = (
    "MAE loss (the run's loss: ops.mae_loss, norm_pix_loss as configured) on the held-out "
    "images, averaged over {draws} fixed mask draws at mask_ratio {mask_ratio} (seeded with "
    "system.seed; draw 0 is the reconstruction figure's), the same draws for the model "
    "(heldout_loss_init / heldout_loss_end) and for the trivial predictors, each in the loss's "
    "target space: zero = 0 for every removed pixel (plain pixels: the dataset mean; "
    "norm_pix_loss: each patch's own mean); patch_mean = each removed patch's own mean per "
    "channel (an oracle that is told the patch mean: a lower bar any model that learned the low "
    "frequencies must beat; equal to zero with norm_pix_loss); visible_mean = the per-channel "
    "mean of the image's visible pixels (non-oracle).")


def heldout_noise(n: int, num_patches: int, seed: int, draws: int) -> list[torch.Tensor]:
    """``draws`` masking noises ``[n, L]`` (CPU) from one generator seeded with ``seed``: draw 0
    is the noise of :func:`~usfmae_fast.pretrain.figures.reconstruct` with the same seed."""
    generator = torch.Generator().manual_seed(seed)
    return [torch.rand(n, num_patches, generator=generator) for _ in range(draws)]


def mask_from_noise(noise: torch.Tensor, mask_ratio: float, dtype=torch.float32) -> torch.Tensor:
    """The ``[N, L]`` mask (1 = removed) ``random_masking`` makes from ``noise``."""
    keep = reference.num_kept(noise.shape[1], mask_ratio)
    return reference.mask_by_noise(noise.unsqueeze(-1).to(dtype), noise, keep)[1]


def loss_target(imgs: torch.Tensor, patch_size: int, norm_pix_loss: bool) -> torch.Tensor:
    """``[N, L, D]``: what the MAE loss compares the prediction with (``mae_loss``'s target)."""
    target = reference.patchify(imgs, patch_size)
    if norm_pix_loss:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6) ** 0.5
    return target


def trivial_predictions(imgs: torch.Tensor, mask: torch.Tensor, patch_size: int,
                        norm_pix_loss: bool) -> dict[str, torch.Tensor]:
    """``{name: pred [N, L, D]}`` for :data:`BASELINES` (see the module docstring); ``mask``
    ``[N, L]``, 1 = removed. Pixels of a patch are in (p, p, C) order, so channel ``c`` is every
    ``C``-th value."""
    channels = imgs.shape[1]
    target = loss_target(imgs.float(), patch_size, norm_pix_loss)
    n, length, dim = target.shape
    per_channel = target.reshape(n, length, dim // channels, channels)
    patch_mean = per_channel.mean(dim=2, keepdim=True).expand_as(per_channel)
    visible = (1 - mask.float()).reshape(n, length, 1, 1)
    visible_sum = (per_channel * visible).sum(dim=(1, 2))                    # [N, C]
    visible_count = visible.sum(dim=(1, 2)).clamp_min(1) * (dim // channels)  # [N, 1]
    visible_mean = (visible_sum / visible_count).reshape(n, 1, 1, channels)
    return {"zero": torch.zeros_like(target),
            "patch_mean": patch_mean.reshape(n, length, dim).contiguous(),
            "visible_mean": visible_mean.expand_as(per_channel).reshape(n, length, dim)
            .contiguous()}


@torch.no_grad()
def baseline_losses(imgs: torch.Tensor, patch_size: int, norm_pix_loss: bool,
                    mask_ratio: float, seed: int, draws: int = DEFAULT_DRAWS
                    ) -> dict[str, list[float]]:
    """``{name: [loss of each draw]}`` of the trivial predictors on ``imgs`` (normalised
    ``[N, C, H, W]``) with the masks of :func:`heldout_noise`, scored by ``ops.mae_loss``."""
    imgs = imgs.float()
    p = patch_size
    length = (imgs.shape[2] // p) * (imgs.shape[3] // p)
    out: dict[str, list[float]] = {name: [] for name in BASELINES}
    for noise in heldout_noise(imgs.shape[0], length, seed, draws):
        mask = mask_from_noise(noise, mask_ratio).to(imgs.device)
        for name, pred in trivial_predictions(imgs, mask, p, norm_pix_loss).items():
            out[name].append(float(ops.mae_loss(imgs.contiguous(), pred, mask, p,
                                                 norm_pix_loss)))
    return out


@torch.no_grad()
def model_losses(model, imgs: torch.Tensor, mask_ratio: float, seed: int,
                 draws: int = DEFAULT_DRAWS) -> list[float]:
    """The model's own loss (its forward, eval mode, fp32) on ``imgs`` for each mask draw of
    :func:`heldout_noise`."""
    was_training = model.training
    model.eval()
    grid = tuple(model.grid_size)
    losses = []
    for noise in heldout_noise(imgs.shape[0], grid[0] * grid[1], seed, draws):
        loss, _, _ = model(imgs, mask_ratio=mask_ratio, noise=noise.to(imgs.device))
        losses.append(float(loss))
    model.train(was_training)
    return losses


def mean(values: list[float]) -> float:
    return sum(values) / len(values)
