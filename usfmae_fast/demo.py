"""End-to-end demo on real data, CPU-friendly: pretrain a tiny ViT-MAE on every ultrasound frame
shipped by pydicom-data and show that it learns (loss curve, held-out reconstructions).

    usfmae-fast demo --out outputs/demo          # or: from usfmae_fast.demo import run_demo

Writes ``loss_curve.png``, ``reconstruction.png``, ``metrics.json``, ``history.csv`` and
``checkpoint.safetensors`` under ``out_dir``.
"""
from __future__ import annotations

import json
import os
import platform
import time
from collections import Counter
from dataclasses import asdict
from pathlib import Path

import torch

from .data.dicom_frames import load_frames, ultrasound_test_files
from .data.torch_loader import GrayFrameDataset, frame_stats
from .train.figures import plot_loss_curve, plot_reconstructions, reconstruct
from .train.pretrain import PretrainConfig, pretrain, seed_everything


def _holdout_indices(sources: list[str], count: int) -> list[int]:
    """The middle frame of each of the ``count`` files holding the most frames (distinct files,
    so the figure shows different scanners and anatomy)."""
    per_file = Counter(sources)
    chosen = []
    for name, _ in sorted(per_file.items(), key=lambda kv: (-kv[1], kv[0]))[:count]:
        positions = [i for i, s in enumerate(sources) if s == name]
        chosen.append(positions[len(positions) // 2])
    return chosen


def free_cores() -> int:
    """CPU cores not already busy (by the 1-minute load average), at least 1. On a shared
    machine OpenMP threads that wait for a descheduled sibling make 2 threads several times
    slower than 1, so the demo uses only the idle cores unless told otherwise."""
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    try:
        busy = int(os.getloadavg()[0] + 0.5)
    except OSError:
        busy = 0
    return max(1, min(cores or 1, (cores or 1) - busy))


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)


def run_demo(out_dir="outputs/demo", steps: int = 300, batch_size: int = 32, img_size: int = 64,
             patch_size: int = 8, seed: int = 0, *, embed_dim: int = 192, depth: int = 4,
             num_heads: int = 3, decoder_embed_dim: int = 128, decoder_depth: int = 2,
             decoder_num_heads: int = 4, norm_pix_loss: bool = True, mask_ratio: float = 0.75,
             blr: float = 1e-2, warmup_steps: int | None = None, clip_grad: float | None = 1.0,
             holdout: int = 4, max_frames_per_file: int | None = 32,
             num_threads: int | None = None, progress: bool = True) -> dict:
    """Pretrain a tiny MAE on the pydicom-data ultrasound frames; returns the metrics dict.

    ``num_threads=None`` uses :func:`free_cores`.
    """
    from .models.mae import mae_vit

    started = time.perf_counter()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    seed_everything(seed)

    frames, report = load_frames(ultrasound_test_files(), max_frames_per_file=max_frames_per_file)
    if len(frames) < holdout + batch_size:
        raise RuntimeError(f"only {len(frames)} usable ultrasound frames (skipped: "
                           f"{report['skipped']}); need {holdout} held out + a batch of "
                           f"{batch_size}. Is pydicom-data installed?")
    held = _holdout_indices(report["sources"], holdout)
    train_frames = [f for i, f in enumerate(frames) if i not in held]
    mean, std = frame_stats(train_frames)
    base = 2 * img_size  # pre-shrink once: crops are then cheap and still sharp at img_size
    train_set = GrayFrameDataset(train_frames, img_size, train=True, mean=mean, std=std,
                                 seed=seed, base_size=base)
    eval_set = GrayFrameDataset([frames[i] for i in held], img_size, train=False, mean=mean,
                                std=std, base_size=base)
    held_imgs = torch.stack([eval_set[i] for i in range(len(eval_set))])
    held_names = [Path(report["sources"][i]).name for i in held]

    model = mae_vit("tiny", img_size=img_size, patch_size=patch_size, in_chans=1,
                    embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                    decoder_embed_dim=decoder_embed_dim, decoder_depth=decoder_depth,
                    decoder_num_heads=decoder_num_heads, norm_pix_loss=norm_pix_loss)
    cfg = PretrainConfig(steps=steps, batch_size=batch_size, blr=blr, mask_ratio=mask_ratio,
                         warmup_steps=max(1, steps // 10) if warmup_steps is None else warmup_steps,
                         clip_grad=clip_grad, seed=seed,
                         num_threads=free_cores() if num_threads is None else num_threads,
                         progress=progress)
    # the same fixed masking as the figure, so before / after compare like for like
    heldout_before = reconstruct(model, held_imgs, mask_ratio, seed)["loss"]
    result = pretrain(model, train_set, cfg, out_dir=out_dir)

    losses = [h["loss"] for h in result["history"]]
    window = max(1, min(20, steps // 5))
    loss_png = plot_loss_curve(result["history"], out_dir / "loss_curve.png",
                               title=f"MAE pretraining on {len(train_frames)} real ultrasound frames")
    recon = plot_reconstructions(model, held_imgs, out_dir / "reconstruction.png", mean, std,
                                 mask_ratio=mask_ratio, seed=seed, titles=held_names)
    metrics = {
        "steps": steps,
        "batch_size": batch_size,
        "loss_window": window,
        "first_loss_mean": _mean(losses[:window]),
        "last_loss_mean": _mean(losses[-window:]),
        "final_loss": losses[-1],
        "heldout_loss_before": heldout_before,
        "heldout_loss_after": recon["loss"],
        "heldout_masked_mse": recon["masked_mse"],
        "images_per_s": result["images_per_s"],
        "train_seconds": result["seconds"],
        "total_seconds": time.perf_counter() - started,
        "frames": {"files": report["files"], "files_used": report["files_used"],
                   "decoded": report["frames_decoded"],
                   "duplicates_dropped": report["duplicates_dropped"],
                   "used": len(frames), "train": len(train_frames), "heldout": len(held),
                   "heldout_files": held_names, "skipped": report["skipped"]},
        "data": {"img_size": img_size, "mean": mean, "std": std, "base_size": base,
                 "max_frames_per_file": max_frames_per_file},
        "model_config": model.config,
        "train_config": asdict(cfg),
        "peak_lr": cfg.peak_lr,
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "device": str(next(model.parameters()).device),
                        "machine": platform.processor() or platform.machine()},
        "artefacts": {"loss_curve": str(loss_png), "reconstruction": recon["path"],
                      "history": str(out_dir / "history.csv"),
                      "checkpoint": result["checkpoint"],
                      "metrics": str(out_dir / "metrics.json")},
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if progress:
        print(f"demo: {len(train_frames)} train / {len(held)} held-out frames from "
              f"{report['files_used']} of {report['files']} ultrasound files; loss "
              f"{metrics['first_loss_mean']:.4f} -> {metrics['last_loss_mean']:.4f} "
              f"({steps} steps, {metrics['images_per_s']:.1f} img/s); held-out loss "
              f"{heldout_before:.4f} -> {recon['loss']:.4f}")
        for name, path in metrics["artefacts"].items():
            print(f"  {name:15s} {path}")
    return metrics
