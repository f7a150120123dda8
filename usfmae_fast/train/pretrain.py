"""A compact MAE pretraining loop with fb/mae's optimisation recipe.

AdamW (betas 0.9 / 0.95), weight decay on matrices only (no decay on biases, norms, position
embeddings and the cls / mask tokens), ``lr = blr * batch_size / 256``, linear warmup then a
per-iteration half-cosine to ``min_lr``, optional gradient clipping, seeded. Records the loss
and lr of every step (``history.csv``) and saves the final weights as safetensors with
``model.config`` (and this run's settings) in the metadata.
"""
from __future__ import annotations

import csv
import json
import math
import random
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, RandomSampler


@dataclass
class PretrainConfig:
    steps: int = 300
    batch_size: int = 64
    blr: float = 1.5e-4          # base lr: lr = blr * batch_size / 256 (fb/mae)
    lr: float | None = None      # absolute lr; overrides blr when set
    min_lr: float = 0.0
    warmup_steps: int = 20
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    mask_ratio: float = 0.75
    clip_grad: float | None = None
    seed: int = 0
    num_threads: int | None = None  # torch.set_num_threads; None leaves torch's choice
    num_workers: int = 0
    progress: bool = True

    def __post_init__(self):
        if self.steps <= 0 or self.batch_size <= 0:
            raise ValueError(f"steps and batch_size must be positive, got {self.steps}, {self.batch_size}")
        if not 0.0 <= self.mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {self.mask_ratio}")
        if self.warmup_steps < 0:
            raise ValueError(f"warmup_steps must be >= 0, got {self.warmup_steps}")

    @property
    def peak_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """fb/mae ``param_groups_weight_decay``: no decay for 1-D tensors (biases, norms) and the
    tokens / position embeddings."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(("cls_token", "mask_token", "pos_embed")):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def lr_at(step: int, cfg: PretrainConfig) -> float:
    """Learning rate of (0-based) ``step``: linear warmup, then half-cosine to ``min_lr``."""
    peak = cfg.peak_lr
    if step < cfg.warmup_steps:
        return peak * (step + 1) / cfg.warmup_steps
    progress = (step - cfg.warmup_steps) / max(1, cfg.steps - cfg.warmup_steps)
    return cfg.min_lr + (peak - cfg.min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


def _batches(dataset: Dataset, cfg: PretrainConfig):
    """Endless shuffled batches, a new (seeded) order and augmentation every epoch."""
    if len(dataset) < cfg.batch_size:
        raise ValueError(f"the dataset holds {len(dataset)} images, fewer than one batch of "
                         f"{cfg.batch_size}; lower batch_size")
    generator = torch.Generator().manual_seed(cfg.seed)
    loader = DataLoader(dataset, batch_size=cfg.batch_size, drop_last=True,
                        sampler=RandomSampler(dataset, generator=generator),
                        num_workers=cfg.num_workers, persistent_workers=cfg.num_workers > 0)
    epoch = 0
    while True:
        if hasattr(dataset, "set_epoch"):
            dataset.set_epoch(epoch)
        yield from loader
        epoch += 1


def write_history(history: list[dict], path) -> Path:
    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(history[0]))
        writer.writeheader()
        writer.writerows(history)
    return path


def read_history(path) -> list[dict]:
    with Path(path).open(newline="") as f:
        return [{k: float(v) if k != "step" else int(v) for k, v in row.items()}
                for row in csv.DictReader(f)]


def pretrain(model: nn.Module, dataset: Dataset, cfg: PretrainConfig,
             out_dir=None) -> dict:
    """Train ``model`` (``loss, pred, mask = model(imgs, mask_ratio)``) for ``cfg.steps`` steps.

    Returns ``{"history": [{step, loss, lr, seconds}], "images_per_s", "seconds", "checkpoint"}``.
    With ``out_dir``: writes ``history.csv`` and ``checkpoint.safetensors`` there.
    """
    from tqdm.auto import tqdm

    if cfg.num_threads is not None:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed)
    device = next(model.parameters()).device
    optimizer = torch.optim.AdamW(param_groups(model, cfg.weight_decay), lr=cfg.peak_lr,
                                  betas=(cfg.beta1, cfg.beta2))
    model.train()
    history = []
    batches = _batches(dataset, cfg)
    bar = tqdm(range(cfg.steps), desc="pretrain", disable=not cfg.progress, dynamic_ncols=True)
    start = time.perf_counter()
    for step in bar:
        imgs = next(batches).to(device, non_blocking=True)
        lr = lr_at(step, cfg)
        for group in optimizer.param_groups:
            group["lr"] = lr
        loss, _, _ = model(imgs, mask_ratio=cfg.mask_ratio)
        value = loss.item()
        if not math.isfinite(value):
            raise FloatingPointError(f"loss is {value} at step {step} (lr {lr:.3g}); "
                                     "lower the learning rate or enable clip_grad")
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if cfg.clip_grad is not None:
            nn.utils.clip_grad_norm_(model.parameters(), cfg.clip_grad)
        optimizer.step()
        history.append({"step": step, "loss": value, "lr": lr,
                        "seconds": round(time.perf_counter() - start, 4)})
        bar.set_postfix(loss=f"{value:.4f}", lr=f"{lr:.2e}", refresh=False)
    seconds = time.perf_counter() - start
    result = {"history": history, "seconds": seconds,
              "images_per_s": cfg.steps * cfg.batch_size / seconds, "checkpoint": None}
    if out_dir is not None:
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        write_history(history, out_dir / "history.csv")
        result["checkpoint"] = str(save_checkpoint(model, out_dir / "checkpoint.safetensors",
                                                   train_config=asdict(cfg)))
    return result


def save_checkpoint(model: nn.Module, path, train_config: dict | None = None) -> Path:
    """safetensors weights + ``model.config`` (and ``train_config``) as JSON metadata."""
    from ..models.checkpoint import save_safetensors

    metadata = {"train_config": json.dumps(train_config)} if train_config else None
    return save_safetensors(model, path, metadata=metadata)
