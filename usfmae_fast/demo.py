"""End-to-end demo on real data, CPU-friendly: pretrain a tiny ViT-MAE on every ultrasound frame
shipped by pydicom-data and show that it learns (loss curve, held-out reconstructions).

    usfmae-fast demo --out outputs/demo          # or: from usfmae_fast.demo import run_demo

Runs through the pretraining engine (``usfmae-fast pretrain --preset demo`` is the same run)
and writes its artefacts -- ``loss_curve.png``, ``reconstruction.png``, ``history.csv``,
``checkpoint.safetensors``, ``summary.json``, training checkpoints -- plus ``metrics.json``
under ``out_dir``.
"""
from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path

import torch

from .train.config import build_config
from .train.engine import pretrain


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


def run_demo(out_dir="outputs/demo", steps: int = 300, batch_size: int = 32, img_size: int = 64,
             patch_size: int = 8, seed: int = 0, *, embed_dim: int = 192, depth: int = 4,
             num_heads: int = 3, decoder_embed_dim: int = 128, decoder_depth: int = 2,
             decoder_num_heads: int = 4, norm_pix_loss: bool = True, mask_ratio: float = 0.75,
             blr: float = 1e-2, warmup_steps: int | None = None, clip_grad: float | None = 1.0,
             holdout: int = 4, max_frames_per_file: int | None = 32,
             num_threads: int | None = None, progress: bool = True) -> dict:
    """Pretrain a tiny MAE on the pydicom-data ultrasound frames through the pretraining engine
    (the ``demo`` preset, any argument overriding it); returns the metrics dict.

    ``num_threads=None`` uses :func:`free_cores`.
    """
    started = time.perf_counter()
    out_dir = Path(out_dir)
    cfg = build_config("demo", overrides={
        "model.img_size": img_size, "model.patch_size": patch_size, "model.embed_dim": embed_dim,
        "model.depth": depth, "model.num_heads": num_heads,
        "model.decoder_embed_dim": decoder_embed_dim, "model.decoder_depth": decoder_depth,
        "model.decoder_num_heads": decoder_num_heads, "model.norm_pix_loss": norm_pix_loss,
        "data.source": "demo", "data.heldout": holdout,
        "data.max_frames_per_file": max_frames_per_file,
        "optim.steps": steps, "optim.batch_size": batch_size, "optim.blr": blr,
        "optim.mask_ratio": mask_ratio, "optim.clip_grad": clip_grad,
        "optim.warmup_steps": max(1, steps // 10) if warmup_steps is None else warmup_steps,
        "system.seed": seed, "system.num_threads": free_cores() if num_threads is None
        else num_threads,
        "output.out_dir": str(out_dir), "output.progress": progress,
        "output.overwrite": True})  # the demo's folder is disposable: always a fresh run
    summary = pretrain(cfg)
    data = summary["data"]
    metrics = {
        "steps": steps,
        "batch_size": batch_size,
        "loss_window": summary["loss_window"],
        "first_loss_mean": summary["first_loss_mean"],
        "last_loss_mean": summary["last_loss_mean"],
        "final_loss": summary["final_loss"],
        "heldout_loss_before": summary["heldout_loss_init"],
        "heldout_loss_after": summary["heldout_loss_end"],
        "heldout_masked_mse": summary["heldout_masked_mse"],
        "images_per_s": summary["throughput"]["images_per_s"],
        "train_seconds": summary["train_seconds"],
        "total_seconds": time.perf_counter() - started,
        "frames": {k: data[k] for k in ("files", "files_used", "decoded", "duplicates_dropped",
                                        "used", "train", "heldout", "heldout_files", "skipped")},
        "data": {"img_size": img_size, "mean": summary["data_mean"], "std": summary["data_std"],
                 "base_size": data["base_size"], "max_frames_per_file": max_frames_per_file},
        "model_config": summary["model_config"],
        "train_config": summary["config"],
        "peak_lr": cfg.peak_lr(),
        "environment": {"torch": torch.__version__, "threads": torch.get_num_threads(),
                        "device": summary["throughput"]["device"],
                        "machine": platform.processor() or platform.machine()},
        "artefacts": {**{k: v for k, v in summary["artefacts"].items() if k != "weights"},
                      "checkpoint": summary["artefacts"]["weights"],
                      "metrics": str(out_dir / "metrics.json")},
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2))
    if progress:
        print(f"demo: {data['train']} train / {data['heldout']} held-out frames from "
              f"{data['files_used']} of {data['files']} ultrasound files; loss "
              f"{metrics['first_loss_mean']:.4f} -> {metrics['last_loss_mean']:.4f} "
              f"({steps} steps, {metrics['images_per_s']:.1f} img/s); held-out loss "
              f"{metrics['heldout_loss_before']:.4f} -> {metrics['heldout_loss_after']:.4f}")
        for name, path in metrics["artefacts"].items():
            print(f"  {name:15s} {path}")
    return metrics
