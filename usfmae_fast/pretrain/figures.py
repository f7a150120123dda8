"""Figures of a pretraining run: the loss curve and MAE reconstructions (as fb/mae's demo).

The reconstruction figure has one row per image and the columns original / masked /
reconstruction / reconstruction + visible patches. With ``norm_pix_loss`` the model predicts
each patch normalised by its own mean and std, so for display the prediction is mapped back
with the target patch's mean and (unbiased) variance, as fb/mae's loss defines it.
"""
from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch

from ..runtime.figures import pyplot, save_figure

MASK_COLOUR = (0.10, 0.22, 0.45)  # removed patches: dark blue, unlike any gray pixel


def moving_average(values: Sequence[float], window: int) -> np.ndarray:
    values = np.asarray(values, dtype=np.float64)
    window = max(1, min(window, len(values)))
    cumsum = np.cumsum(np.insert(values, 0, 0.0))
    out = (cumsum[window:] - cumsum[:-window]) / window
    return np.concatenate([np.cumsum(values[:window - 1]) / np.arange(1, window), out])


BASELINE_STYLE = {"zero": ("tab:red", ":"), "patch_mean": ("tab:purple", "--"),
                  "visible_mean": ("tab:brown", "-.")}
BASELINE_LABEL = {"zero": "predict 0", "patch_mean": "patch mean (oracle)",
                  "visible_mean": "mean of visible pixels"}


def plot_loss_curve(history: Sequence[dict], path, window: int | None = None,
                    title: str = "MAE pretraining loss", heldout: dict | None = None,
                    baselines: dict | None = None) -> Path:
    """Per-step loss (faint), its moving average, and the lr on a second axis; ``heldout``
    ``{step: loss}`` drawn as points (joined when more than two: the model's held-out loss), and
    ``baselines`` ``{name: loss}`` (the trivial predictors' held-out loss, see
    :mod:`~usfmae_fast.pretrain.baselines`) as labelled horizontal lines."""
    if not history:
        raise ValueError("history is empty: nothing to plot")
    plt = pyplot()
    steps = np.array([h["step"] for h in history])
    loss = np.array([h["loss"] for h in history])
    window = window or max(1, len(loss) // 20)
    fig, ax = plt.subplots(figsize=(7, 4), dpi=120)
    ax.plot(steps, loss, color="tab:blue", alpha=0.3, lw=0.8, label="loss per step")
    ax.plot(steps, moving_average(loss, window), color="tab:blue", lw=2,
            label=f"moving average ({window} steps)")
    if heldout:
        points = sorted((s, v) for s, v in heldout.items() if v is not None)
        # two points (start / end) are not a trajectory: no line between them
        ax.plot([s for s, _ in points], [v for _, v in points], color="black", marker="o",
                ms=5, lw=1, ls="-" if len(points) > 2 else "none",
                label="held-out loss (model)")
        for s, v in points:
            ax.annotate(f"{v:.3f}", (s, v), textcoords="offset points", xytext=(4, 4),
                        fontsize=7)
    for name, value in (baselines or {}).items():
        colour, style = BASELINE_STYLE.get(name, ("gray", ":"))
        ax.axhline(value, color=colour, ls=style, lw=1.2,
                   label=f"held-out: {BASELINE_LABEL.get(name, name)} {value:.3f}")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (masked patches)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    if "lr" in history[0]:
        ax_lr = ax.twinx()
        ax_lr.plot(steps, [h["lr"] for h in history], color="tab:orange", lw=1, ls="--")
        ax_lr.set_ylabel("learning rate", color="tab:orange")
        ax_lr.tick_params(axis="y", colors="tab:orange")
        ax_lr.ticklabel_format(axis="y", style="sci", scilimits=(0, 0))
    ax.legend(loc="upper right", fontsize=7 if heldout or baselines else None)
    path = save_figure(fig, path)
    return path


@torch.no_grad()
def reconstruct(model, imgs: torch.Tensor, mask_ratio: float = 0.75, seed: int = 0) -> dict:
    """Run the MAE on ``imgs`` with seeded masking; everything back in image space.

    Returns tensors ``[N, C, H, W]``: ``recon`` (the prediction of every patch, in the images'
    normalisation), ``mask`` (1 = removed), ``pasted`` (visible patches + prediction of the
    removed ones), and ``loss`` (the model's loss on this batch).
    """
    from ..ops import patchify, unpatchify

    was_training = model.training
    model.eval()
    p = model.config["patch_size"]
    grid = tuple(model.grid_size)
    noise = torch.rand(imgs.shape[0], grid[0] * grid[1],
                       generator=torch.Generator().manual_seed(seed)).to(imgs.device)
    loss, pred, mask = model(imgs, mask_ratio=mask_ratio, noise=noise)
    if model.config.get("norm_pix_loss"):
        target = patchify(imgs, p)
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the loss
        pred = pred * (var + 1e-6) ** 0.5 + mean
    channels = imgs.shape[1]
    recon = unpatchify(pred, p, grid, channels)
    mask_img = unpatchify(mask.unsqueeze(-1).expand(-1, -1, p * p * channels).to(imgs.dtype),
                          p, grid, channels)
    model.train(was_training)
    return {"recon": recon, "mask": mask_img, "pasted": imgs * (1 - mask_img) + recon * mask_img,
            "loss": float(loss)}


def _gray_rgb(img: torch.Tensor) -> np.ndarray:
    """``[C, H, W]`` in [0, 1] -> ``[H, W, 3]`` for imshow (gray repeated when C == 1)."""
    arr = img.detach().cpu().clamp(0, 1).permute(1, 2, 0).numpy()
    return np.repeat(arr, 3, axis=2) if arr.shape[2] == 1 else arr


def plot_reconstructions(model, imgs: torch.Tensor, path, mean, std,
                         mask_ratio: float = 0.75, seed: int = 0,
                         titles: Sequence[str] | None = None) -> dict:
    """The fb/mae demo figure for a few (held-out) normalised images ``[N, C, H, W]``.

    Returns ``{"path", "loss", "masked_mse"}``: the model's loss on these images and the mean
    squared error (in [0, 1] pixel units) of the removed patches' reconstruction.
    """
    plt = pyplot()
    out = reconstruct(model, imgs, mask_ratio, seed)
    mean, std = (torch.as_tensor(v, dtype=imgs.dtype, device=imgs.device).reshape(1, -1, 1, 1)
                 for v in (mean, std))  # one value or one per channel
    to_unit = lambda x: (x * std + mean).clamp(0, 1)  # noqa: E731 - one-line un-normalisation
    original, recon, pasted = to_unit(imgs), to_unit(out["recon"]), to_unit(out["pasted"])
    mask = out["mask"]
    sq_err = ((recon - original) ** 2 * mask).flatten(1).sum(1) / mask.flatten(1).sum(1).clamp_min(1)
    n = imgs.shape[0]
    columns = ["original", f"masked ({mask_ratio:.0%})", "reconstruction",
               "reconstruction + visible"]
    fig, axes = plt.subplots(n, 4, figsize=(4 * 2.6, n * 2.7), dpi=120, squeeze=False)
    colour = torch.tensor(MASK_COLOUR).view(1, 1, 3).numpy()
    for i in range(n):
        m = mask[i, :1].permute(1, 2, 0).cpu().numpy()
        masked = _gray_rgb(original[i]) * (1 - m) + colour * m
        panels = [_gray_rgb(original[i]), masked, _gray_rgb(recon[i]), _gray_rgb(pasted[i])]
        for j, (ax, panel) in enumerate(zip(axes[i], panels)):
            ax.imshow(panel, interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(columns[j], fontsize=10)
        label = titles[i] if titles is not None else f"image {i}"
        axes[i, 0].set_ylabel(label, fontsize=8)
        axes[i, 2].set_xlabel(f"masked-patch MSE {float(sq_err[i]):.4f}", fontsize=8)
    norm = " (norm_pix_loss: shown with the target patches' mean/std)" \
        if model.config.get("norm_pix_loss") else ""
    fig.suptitle(f"MAE reconstructions of held-out frames{norm}", fontsize=10)
    path = save_figure(fig, path)
    return {"path": str(path), "loss": out["loss"], "masked_mse": float(sq_err.mean())}
