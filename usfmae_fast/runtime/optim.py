"""fb/mae's optimisation recipe: AdamW, linear warmup then a per-iteration half-cosine to
``min_lr``; weight decay on matrices only, with one stated difference (see :func:`param_groups`)."""
from __future__ import annotations

import math

import torch
from torch import nn

NO_DECAY_NAMES = ("cls_token", "mask_token", "pos_embed")


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """No decay for 1-D tensors (biases, norms), as fb/mae, and none for the cls / mask tokens
    and a learnable position embedding, unlike fb/mae's pretraining: its ``main_pretrain.py``
    calls timm's ``param_groups_weight_decay`` without a no-decay list, so it decays both
    tokens (its position embeddings are frozen). We follow its fine-tuning instead (and timm's
    ViTs), which exempts them through ``model.no_weight_decay()``: a token is a learned input,
    not a weight, and decaying it pulls it toward zero for no regularising benefit."""
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        if param.ndim <= 1 or name.endswith(NO_DECAY_NAMES):
            no_decay.append(param)
        else:
            decay.append(param)
    return [{"params": no_decay, "weight_decay": 0.0},
            {"params": decay, "weight_decay": weight_decay}]


def build_optimizer(model: nn.Module, lr: float, weight_decay: float,
                    betas: tuple[float, float]) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`; the fused CUDA kernel when every parameter is on a GPU."""
    groups = param_groups(model, weight_decay)
    on_cuda = all(p.device.type == "cuda" for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=betas, fused=on_cuda or None)


def warmup_cosine(step: int, peak_lr: float, min_lr: float, warmup_steps: int,
                  total_steps: int) -> float:
    """lr of (0-based) optimizer ``step``: linear warmup to ``peak_lr`` over ``warmup_steps``,
    then a half-cosine to ``min_lr`` at ``total_steps``."""
    if step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return min_lr + (peak_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))


class WarmupCosineLR:
    """Sets the optimizer's lr before every step (``step()`` after each optimizer step), times
    a group's ``lr_scale`` where it has one (timm's ``param_groups_layer_decay``); its state is
    the number of steps taken, saved in training checkpoints."""

    def __init__(self, optimizer: torch.optim.Optimizer, peak_lr: float, min_lr: float,
                 warmup_steps: int, total_steps: int):
        self.optimizer = optimizer
        self.peak_lr, self.min_lr = peak_lr, min_lr
        self.warmup_steps, self.total_steps = warmup_steps, total_steps
        self.last_step = 0
        self._apply()

    def lr_at(self, step: int) -> float:
        return warmup_cosine(step, self.peak_lr, self.min_lr, self.warmup_steps, self.total_steps)

    @property
    def lr(self) -> float:
        return self.lr_at(self.last_step)

    def _apply(self) -> None:
        for group in self.optimizer.param_groups:  # "lr_scale": layer-wise lr decay (fb/mae)
            group["lr"] = self.lr * group.get("lr_scale", 1.0)

    def step(self) -> None:
        self.last_step += 1
        self._apply()

    def state_dict(self) -> dict:
        return {"last_step": self.last_step, "peak_lr": self.peak_lr, "min_lr": self.min_lr,
                "warmup_steps": self.warmup_steps, "total_steps": self.total_steps}

    def load_state_dict(self, state: dict) -> None:
        """Continue at the saved step; the schedule's shape is this run's (a resumed run with a
        longer ``total_steps`` stretches the cosine from there)."""
        self.last_step = int(state["last_step"])
        self._apply()
