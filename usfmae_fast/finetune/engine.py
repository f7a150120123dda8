"""One fold of fine-tuning (or linear probing): train on one split and keep the epoch with the
best AUC on a selection split (early stopping), or, without one, train a fixed number of epochs
and keep the last; save it as ``best.safetensors``. The protocol passes an inner split of the
fold's training patients as the selection split, so the fold's validation set selects nothing.

The recipe is fb/mae ``main_finetune`` / ``main_linprobe``: AdamW with layer-wise lr decay
(timm ``param_groups_layer_decay``, 0.65 by default; only for ViTs that start from pretrained
weights: a random-init model or a CNN trains every layer at the same rate), lr = ``blr`` x
batch / 256, per-step linear warmup then half-cosine (``runtime.optim.WarmupCosineLR``), drop
path, label smoothing, timm ``Mixup`` / CutMix (soft-target cross-entropy), bf16 autocast on
CUDA. A linear probe trains only its head (no weight decay, smoothing, mixup or drop path, as
fb/mae), with AdamW instead of LARS and lr = ``probe_blr`` x batch / 256.

Class imbalance: ``imbalance="weights"`` weights the loss by scikit-learn's balanced class
weights; ``"sampler"`` repeats the images of the smaller classes (all of them, then a seeded
draw without replacement) until every class has as many as the largest, and the loaders'
seeded per-epoch permutation (``make_loader``, DALI or torch) mixes them: balanced batches in
expectation, each copy differently augmented, no image ever left out of an epoch. (A
``WeightedRandomSampler`` cannot be plugged into ``make_loader``, whose DALI and torch loaders
share one sampling plan.)

Images come through ``make_loader(backend="auto")``: DALI's GPU (or CPU) pipelines where DALI
runs, the torch DataLoader elsewhere; train = fb/mae's RandomResizedCrop + flip, eval = resize
+ centre crop.
"""
from __future__ import annotations

import copy
import csv
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..data.load.image_files import ImageList
from ..models.mae import PRESETS
from ..data import LOADER_BACKENDS
from ..runtime.device import DEVICE_PATTERN, resolve_device
from ..runtime.precision import FINETUNE_PRECISIONS
from ..runtime.seed import seed_everything
from ..runtime.optim import WarmupCosineLR, param_groups
from .config import IMBALANCE, TrainConfig  # noqa: F401 (TrainConfig lives in config.py)
from .labels import LabelledSet
from .metrics import roc_auc
from .report import fmt
from .models import (GLOBAL_POOLS, Classifier, ModelSpec, build_classifier, head_name,
                     save_classifier)

HISTORY_COLUMNS = ("epoch", "train_loss", "select_loss", "select_auc", "select_accuracy", "lr",
                   "seconds")  # select_*: on the selection set (empty with fixed epochs)




@dataclass
class Preprocess:
    """How images are fed to a model."""
    img_size: int
    in_chans: int
    mean: list[float]
    std: list[float]


@dataclass
class FoldResult:
    classifier: Classifier            # the best epoch's weights, eval mode
    prep: Preprocess
    best_epoch: int                   # the kept epoch (the last one without a selection set)
    select_probs: np.ndarray | None   # [N, C] of the kept epoch on the selection set
    history: list[dict]
    checkpoint: Path
    seconds: float
    peak_lr: float


def autocast(device: torch.device, precision: str):
    bf16 = precision == "bf16" or (precision == "auto" and device.type == "cuda")
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


def accelerate_vit(model: nn.Module) -> nn.Module:
    """The single call site of ``usfmae_fast.accelerate``: the timm ViT's attention runs our
    fused op (its original code wherever ours cannot, see ``_accelerate``)."""
    from .. import accelerate
    return accelerate(model)


def make_eval_loader(images: ImageList, prep: Preprocess, cfg: TrainConfig, device,
                     batch_size: int | None = None):
    from ..data.load.loader import make_loader

    return make_loader(images, "eval", batch_size=batch_size or 2 * cfg.batch_size,
                       img_size=prep.img_size, channels=prep.in_chans, device=device,
                       rank=0, world_size=1, mean=prep.mean, std=prep.std,
                       backend=cfg.backend, workers=cfg.workers)


@torch.no_grad()
def predict_loader(model: nn.Module, loader, expected: int, device,
                   precision: str = "auto") -> np.ndarray:
    """Softmax probabilities ``[N, C]`` of every image of an eval loader, in order."""
    was_training = model.training
    model.eval()
    out = []
    for images, _ in loader:
        with autocast(device, precision):
            out.append(model(images).float().softmax(dim=1).cpu())
    model.train(was_training)
    result = torch.cat(out).numpy().astype(np.float64) if out else np.zeros((0, 0))
    if len(result) != expected:
        raise RuntimeError(f"{expected - len(result)} of {expected} images could not be decoded "
                           "(see the BadImageWarning); predictions would be misaligned. Remove "
                           "them or read the labels with check='full'")
    return result


def predict_probs(model: nn.Module, images: ImageList, prep: Preprocess, cfg: TrainConfig,
                  device=None) -> np.ndarray:
    device = device or next(model.parameters()).device
    return predict_loader(model, make_eval_loader(images, prep, cfg, device), len(images),
                          device, cfg.precision)


def balanced_indices(labels: np.ndarray, seed: int) -> np.ndarray:
    """Every index, plus repeats of the smaller classes' images until each class has as many
    as the largest (whole repeats, then a seeded draw without replacement)."""
    labels = np.asarray(labels)
    target = np.bincount(labels).max()
    rng = np.random.default_rng([seed, 0xBA1])
    out = []
    for c in np.unique(labels):
        members = np.flatnonzero(labels == c)
        out += [np.tile(members, target // len(members)),
                rng.choice(members, target % len(members), replace=False)]
    return np.sort(np.concatenate(out))


def soft_target_loss(logits: torch.Tensor, target: torch.Tensor,
                     weight: torch.Tensor | None = None) -> torch.Tensor:
    """timm's ``SoftTargetCrossEntropy`` for mixed targets; with class ``weight`` a sample
    counts by its target's weight, as ``CrossEntropyLoss(weight=...)`` does for hard labels."""
    per_sample = -(target * logits.float().log_softmax(dim=-1)).sum(dim=-1)
    if weight is None:
        return per_sample.mean()
    w = target @ weight
    return (per_sample * w).sum() / w.sum()


def build_finetune_optimizer(built: Classifier, spec: ModelSpec, cfg: TrainConfig, lr: float):
    model = built.model
    if spec.linear_probe:
        return torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 weight_decay=0.0)
    if built.is_vit and spec.pretrained and cfg.layer_decay < 1:
        from timm.optim import param_groups_layer_decay
        groups = param_groups_layer_decay(model, cfg.weight_decay,
                                          no_weight_decay_list=model.no_weight_decay(),
                                          layer_decay=cfg.layer_decay)
    else:
        groups = param_groups(model, cfg.weight_decay)
    fused = all(p.device.type == "cuda" for g in groups for p in g["params"])
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.999), fused=fused or None)


def write_rows(path, rows: list[dict], columns) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(columns))
        writer.writeheader()
        writer.writerows(rows)
    return path


def write_predictions(path, names, probs: np.ndarray, classes, labels=None, extra=None) -> Path:
    """CSV: ``path`` (+ ``label``), one ``prob_<class>`` column per class, ``predicted``."""
    columns = ["path"] + (["label"] if labels is not None else []) + \
        [f"prob_{c}" for c in classes] + ["predicted"] + list(extra or {})
    rows = []
    for i, (name, p) in enumerate(zip(names, probs)):
        row = {"path": name, **{f"prob_{c}": f"{v:.6f}" for c, v in zip(classes, p)},
               "predicted": classes[int(np.argmax(p))]}
        if labels is not None:
            row["label"] = classes[int(labels[i])]
        row.update({k: v[i] for k, v in (extra or {}).items()})
        rows.append(row)
    return write_rows(path, rows, columns)


class _Training:
    """The state of one fold's run (model, loaders, optimizer, loss) while it trains."""

    def __init__(self, spec, train: LabelledSet, val: LabelledSet | None, cfg: TrainConfig,
                 seed):
        from ..data.load.loader import make_loader

        self.spec, self.cfg, self.seed = spec, cfg, seed
        self.device = resolve_device(cfg.device)
        self.classes = list(train.classes)
        seed_everything(seed)  # head init, drop path, mixup
        self.built = build_classifier(
            spec, len(self.classes), img_size=cfg.img_size, in_chans=cfg.in_chans,
            global_pool=cfg.global_pool, drop_path=0.0 if spec.linear_probe else cfg.drop_path,
            vit_size=cfg.vit_size, mean=cfg.mean, std=cfg.std)
        if self.built.is_vit:
            self.built.model = accelerate_vit(self.built.model)
        self.model = self.built.model.to(self.device)
        self.prep = Preprocess(cfg.img_size, cfg.in_chans, self.built.mean, self.built.std)
        order = (balanced_indices(train.labels, seed) if cfg.imbalance == "sampler"
                 else np.arange(len(train)))
        mixing = not spec.linear_probe and (cfg.mixup > 0 or cfg.cutmix > 0)
        batch = min(cfg.batch_size, len(order)) // (2 if mixing else 1) * (2 if mixing else 1)
        self.loader = make_loader(train.to_image_list().subset(order), "train", batch_size=batch,
                                  img_size=cfg.img_size, channels=cfg.in_chans,
                                  device=self.device, seed=seed, rank=0, world_size=1,
                                  mean=self.built.mean, std=self.built.std, rotate=cfg.rotate,
                                  crop_scale=(cfg.crop_min, 1.0),
                                  backend=cfg.backend, workers=cfg.workers)
        self.val_loader = (None if val is None else
                           make_eval_loader(val.to_image_list(), self.prep, cfg, self.device))
        self.val_labels = None if val is None else val.labels
        blr = cfg.probe_blr if spec.linear_probe else cfg.blr
        self.peak_lr = cfg.lr if cfg.lr is not None else blr * batch / 256
        self.optimizer = build_finetune_optimizer(self.built, spec, cfg, self.peak_lr)
        steps = len(self.loader)
        self.scheduler = WarmupCosineLR(self.optimizer, self.peak_lr, min(cfg.min_lr, self.peak_lr),
                                        int(cfg.warmup_epochs * steps), cfg.epochs * steps)
        weight = None
        if cfg.imbalance == "weights":
            from sklearn.utils.class_weight import compute_class_weight
            weight = torch.tensor(compute_class_weight("balanced",
                                                       classes=np.arange(len(self.classes)),
                                                       y=train.labels),
                                  dtype=torch.float32, device=self.device)
        self.weight = weight
        smoothing = 0.0 if spec.linear_probe else cfg.smoothing
        self.mixup = None
        if mixing:
            from timm.data import Mixup
            self.mixup = Mixup(mixup_alpha=cfg.mixup, cutmix_alpha=cfg.cutmix,
                               label_smoothing=smoothing, num_classes=len(self.classes))
        self.criterion = nn.CrossEntropyLoss(weight=weight, label_smoothing=smoothing)
        self.batch_size = batch

    def loss(self, images, labels):
        if self.mixup is not None:
            images, target = self.mixup(images, labels)
            return soft_target_loss(self.model(images), target, self.weight)
        return self.criterion(self.model(images).float(), labels)

    def train_epoch(self, epoch: int) -> float:
        model, cfg = self.model, self.cfg
        model.train()
        if self.spec.linear_probe:  # a frozen encoder keeps its eval behaviour (BN, dropout)
            model.eval()
            model.get_submodule(head_name(model)).train()
        self.loader.set_epoch(epoch)
        total, count = 0.0, 0
        for images, labels in self.loader:
            with autocast(self.device, cfg.precision):
                loss = self.loss(images, labels)
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.clip_grad:
                nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                         cfg.clip_grad)
            self.optimizer.step()
            self.scheduler.step()
            total, count = total + float(loss.detach()) * len(images), count + len(images)
        return total / max(count, 1)

    def validate(self) -> tuple[np.ndarray, dict]:
        """Validation probabilities and the numbers model selection needs (the full metrics
        of the chosen epoch come later: scikit-learn's checks cost more than a small epoch)."""
        y = self.val_labels
        probs = predict_loader(self.model, self.val_loader, len(y), self.device,
                               self.cfg.precision)
        picked = probs[np.arange(len(probs)), y]
        return probs, {"auc": roc_auc(y, probs, "macro"),
                       "accuracy": float((probs.argmax(axis=1) == y).mean()),
                       "loss": float(-np.log(np.clip(picked, 1e-12, None)).mean())}


def _better(metrics: dict, best: dict | None) -> bool:
    """Higher validation AUC; equal (or undefined) AUC: lower validation loss."""
    if best is None:
        return True
    auc, best_auc = metrics["auc"], best["auc"]
    if auc is not None and best_auc is not None and not math.isclose(auc, best_auc,
                                                                     abs_tol=1e-9):
        return auc > best_auc
    return metrics["loss"] < best["loss"]


def train_fold(spec: ModelSpec, train: LabelledSet, select: LabelledSet | None,
               cfg: TrainConfig, out_dir, *, seed: int = 0,
               info: dict | None = None) -> FoldResult:
    """Train ``spec`` on ``train``. With a selection set ``select``: keep the epoch with the
    best AUC on it (early stopping after ``cfg.patience`` epochs without a better one) and
    write its predictions to ``select_predictions.csv``; with ``select=None``: train all
    ``cfg.epochs`` epochs and keep the last (``cfg.patience`` is not used). Writes
    ``out_dir/best.safetensors`` (loadable by ``usfmae-fast scorecam``) and ``history.csv``."""
    started = time.perf_counter()
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    out_dir = Path(out_dir)
    run = _Training(spec, train, select, cfg, seed)
    history, best, best_state, best_probs, best_epoch, stale = [], None, None, None, 0, 0
    bar = None
    if cfg.progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=cfg.epochs, desc=f"{spec.name} {out_dir.name}", unit="epoch",
                   dynamic_ncols=True, leave=False)
    for epoch in range(cfg.epochs):
        lr = run.scheduler.lr
        train_loss = run.train_epoch(epoch)
        row = {"epoch": epoch, "train_loss": train_loss, "select_loss": None,
               "select_auc": None, "select_accuracy": None, "lr": lr}
        if select is not None:
            probs, metrics = run.validate()
            row.update(select_loss=metrics["loss"], select_auc=metrics["auc"],
                       select_accuracy=metrics["accuracy"])
            if _better(metrics, best):
                best, best_probs, best_epoch, stale = metrics, probs, epoch, 0
                best_state = copy.deepcopy(run.model.state_dict())
            else:
                stale += 1
        else:
            best_epoch = epoch
        history.append({**row, "seconds": round(time.perf_counter() - started, 3)})
        if bar is not None:
            bar.update()
            bar.set_postfix(loss=f"{train_loss:.3f}", select_auc=fmt(row["select_auc"]),
                            best=best_epoch)
        if select is not None and cfg.patience is not None and stale >= cfg.patience:
            break
    if bar is not None:
        bar.close()
    if best_state is not None:
        run.model.load_state_dict(best_state)
    run.model.eval()
    info = {**(info or {}), "model": asdict(spec), "seed": seed, "epoch": best_epoch,
            "selection": "fixed epochs" if select is None else "best selection-set AUC",
            "select_auc": None if best is None else best["auc"],
            "select_loss": None if best is None else best["loss"], "epochs_run": len(history),
            "batch_size": run.batch_size, "peak_lr": run.peak_lr}
    checkpoint = save_classifier(run.built, out_dir / "best.safetensors", run.classes, info)
    write_rows(out_dir / "history.csv", history, HISTORY_COLUMNS)
    if select is not None:
        write_predictions(out_dir / "select_predictions.csv", short_names(select), best_probs,
                          run.classes, select.labels)
    return FoldResult(run.built, run.prep, best_epoch, best_probs, history, checkpoint,
                      time.perf_counter() - started, run.peak_lr)


def short_names(images: LabelledSet) -> list[str]:
    """Image paths relative to the labels' root, for tables."""
    return [r.name for r in images.to_image_list().records]
