"""The settings of fine-tuning: :class:`TrainConfig` (one fold's model and training) and
:class:`ProtocolConfig` (the k-fold + test-set protocol). Imports no torch, so the command
line reads its defaults from here (``runtime.config.help_for``)."""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field

from ..data import LOADER_BACKENDS
from ..runtime.device import DEVICE_PATTERN
from ..runtime.precision import FINETUNE_PRECISIONS

IMBALANCE = ("none", "weights", "sampler")
SELECTIONS = ("inner", "fixed")     # how a fold's epoch is chosen, see ProtocolConfig.selection
THRESHOLD_RULES = ("youden", "sensitivity")


@dataclass
class TrainConfig:
    """How each fold's model is built and trained (fb/mae fine-tuning defaults, except
    mixup / cutmix off and 50 epochs: small clinical sets)."""
    epochs: int = 50
    batch_size: int = 32
    blr: float = 5e-4                 # fine-tuning: lr = blr * batch_size / 256
    probe_blr: float = 0.1            # linear probe: lr = probe_blr * batch_size / 256
    lr: float | None = None           # absolute peak lr (wins over blr / probe_blr)
    min_lr: float = 1e-6
    warmup_epochs: float = 5.0
    weight_decay: float = 0.05
    layer_decay: float = 0.65         # 1.0: off
    drop_path: float = 0.1
    smoothing: float = 0.1
    mixup: float = 0.0                # timm Mixup alpha (0: off)
    cutmix: float = 0.0               # timm CutMix alpha (0: off)
    imbalance: str = "none"           # none | weights (loss) | sampler (oversampling)
    patience: int | None = 10         # epochs without a better validation AUC; None: no stop
    clip_grad: float | None = None
    img_size: int = 224
    in_chans: int = 1                 # 1: gray ultrasound; 3: RGB (e.g. Doppler)
    global_pool: str = "avg"          # avg (fc_norm, fb/mae) | token (cls)
    vit_size: str = "base"            # vit_scratch's size when no init checkpoint gives one
    mean: float | None = None         # normalisation override (default: see models.py)
    std: float | None = None
    rotate: float = 0.0               # max random rotation (degrees) in training
    crop_min: float = 0.2             # RandomResizedCrop area (crop_min, 1); raise it when a
                                      # small crop can miss the lesion that sets the label
    precision: str = "auto"           # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
    device: str = "auto"              # auto | cpu | cuda | cuda:N
    backend: str = "auto"             # make_loader backend: auto | dali | torch
    workers: int | None = None        # loader threads / processes
    threads: int | None = None        # torch.set_num_threads (process-wide, stays set)
    progress: bool = True

    def validate(self) -> TrainConfig:
        """``ValueError`` naming the first field out of range and the range accepted."""
        from ..models.mae import PRESETS   # (imports torch: only when a run is checked)
        from .models import GLOBAL_POOLS

        def finite(value) -> bool:
            return value is not None and math.isfinite(value)

        checks = {  # field: (accepted?, what is)
            "epochs": (self.epochs >= 1, ">= 1"),
            "batch_size": (self.batch_size >= 1, ">= 1"),
            "blr": (finite(self.blr) and self.blr > 0, "> 0"),
            "probe_blr": (finite(self.probe_blr) and self.probe_blr > 0, "> 0"),
            "lr": (self.lr is None or (finite(self.lr) and self.lr > 0), "> 0, or unset"),
            "min_lr": (finite(self.min_lr) and self.min_lr >= 0, ">= 0"),
            "warmup_epochs": (finite(self.warmup_epochs) and self.warmup_epochs >= 0, ">= 0"),
            "weight_decay": (finite(self.weight_decay) and self.weight_decay >= 0, ">= 0"),
            "layer_decay": (0 < self.layer_decay <= 1, "in (0, 1], 1 = off"),
            "drop_path": (0 <= self.drop_path < 1, "in [0, 1)"),
            "smoothing": (0 <= self.smoothing < 1, "in [0, 1)"),
            "mixup": (finite(self.mixup) and self.mixup >= 0, ">= 0, 0 = off"),
            "cutmix": (finite(self.cutmix) and self.cutmix >= 0, ">= 0, 0 = off"),
            "imbalance": (self.imbalance in IMBALANCE, f"one of {IMBALANCE}"),
            "patience": (self.patience is None or self.patience >= 1,
                         ">= 1, or unset (0 at the command line) for no early stopping"),
            "clip_grad": (self.clip_grad is None or (finite(self.clip_grad)
                                                     and self.clip_grad > 0), "> 0, or unset"),
            "img_size": (self.img_size >= 8, ">= 8"),
            "in_chans": (self.in_chans in (1, 3), "1 or 3"),
            "vit_size": (self.vit_size in PRESETS, f"one of {tuple(PRESETS)}"),
            "mean": (self.mean is None or finite(self.mean), "a finite number, with std"),
            "std": ((self.mean is None) == (self.std is None)
                    and (self.std is None or (finite(self.std) and self.std > 0)),
                    "> 0, given together with mean"),
            "rotate": (0 <= self.rotate <= 180, "in [0, 180] degrees"),
            "crop_min": (0 < self.crop_min <= 1, "in (0, 1]"),
            "precision": (self.precision in FINETUNE_PRECISIONS, f"one of {FINETUNE_PRECISIONS}"),
            "global_pool": (self.global_pool in GLOBAL_POOLS, f"one of {GLOBAL_POOLS}"),
            "backend": (self.backend in LOADER_BACKENDS, f"one of {LOADER_BACKENDS}"),
            "device": (DEVICE_PATTERN.fullmatch(self.device) is not None,
                       "auto, cpu, cuda or cuda:N"),
            "workers": (self.workers is None or self.workers >= 0, ">= 0, or unset"),
            "threads": (self.threads is None or self.threads >= 1, ">= 1, or unset")}
        for name, (ok, accepted) in checks.items():
            if not ok:
                raise ValueError(f"{name}: {getattr(self, name)!r} is out of range; accepted: "
                                 f"{accepted} (see usfmae_fast.finetune.engine.TrainConfig)")
        return self


@dataclass
class ProtocolConfig:
    labels: str                             # labels CSV (path,label[,patient_id]) or class folders
    out_dir: str = "outputs/finetune"
    models: list[str] = field(default_factory=lambda: ["usfmae"])
    init: str | None = None                 # MAE / USF-MAE / fb-mae checkpoint for usfmae*
    weights: dict[str, str] = field(default_factory=dict)  # timm name -> local weights file
    classes: list[str] | None = None        # class order (default: sorted label names)
    positive: str | None = None             # binary: the positive class (see labels.py)
    test_labels: str | None = None          # independent test set instead of a held-out part
    folds: int = 5
    test_size: float = 0.2                  # held-out fraction; 0: cross-validation only
    seed: int = 0
    n_boot: int = 1000                      # bootstrap resamples of the test set
    # How each fold's epoch is chosen, so the fold's validation metrics select nothing:
    # inner: early stopping on an inner split (inner_size of the fold's training patients);
    # fixed: train.epochs epochs, keep the last (train.patience is not used).
    selection: str = "inner"
    inner_size: float = 0.2
    # Peak learning rates tried in every fold (each fold keeps the one whose model scores the
    # best AUC on its inner split; needs selection=inner); empty: train.lr / blr only.
    lr_grid: list[float] = field(default_factory=list)
    # Binary operating point, chosen on the pooled out-of-fold predictions (never the test
    # set) and applied unchanged to the test set: youden (max sensitivity + specificity - 1)
    # or sensitivity (the highest threshold reaching target_sensitivity).
    threshold: str = "youden"
    target_sensitivity: float | None = None
    temperature: bool = False               # temperature scaling fitted out of fold
    check: str = "header"                   # image check: header | full | none
    allow_outside_root: bool = False        # label CSVs may list images outside their folder
    title: str = "USF-MAE fine-tuning report"
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return asdict(self)

    def validate(self) -> ProtocolConfig:
        """``ValueError`` naming the first field out of range (the train fields first)."""
        self.train.validate()
        if not self.models or len(set(self.models)) != len(self.models):
            raise ValueError(f"models: give one or more distinct names, got {self.models}")
        if not 0 <= self.test_size < 0.5:
            raise ValueError(f"test_size: must lie in [0, 0.5), got {self.test_size}")
        if self.n_boot < 1:
            raise ValueError(f"n_boot: must be >= 1, got {self.n_boot}")
        if self.folds < 2:
            raise ValueError(f"folds: must be >= 2, got {self.folds}")
        if self.seed < 0:
            raise ValueError(f"seed: must be >= 0, got {self.seed}")
        if self.selection not in SELECTIONS:
            raise ValueError(f"selection: must be one of {SELECTIONS}, got {self.selection!r}")
        if not 0 < self.inner_size < 0.5:
            raise ValueError(f"inner_size: must lie in (0, 0.5), got {self.inner_size}")
        if self.lr_grid and (self.selection != "inner" or
                             not all(math.isfinite(v) and v > 0 for v in self.lr_grid)
                             or len(set(self.lr_grid)) != len(self.lr_grid)):
            raise ValueError(f"lr_grid: distinct learning rates > 0, chosen per fold on the inner "
                             f"split (selection=inner); got {self.lr_grid} with selection="
                             f"{self.selection!r}")
        if self.threshold not in THRESHOLD_RULES:
            raise ValueError(f"threshold: must be one of {THRESHOLD_RULES}, got "
                             f"{self.threshold!r}")
        if (self.threshold == "sensitivity") != (self.target_sensitivity is not None):
            raise ValueError("target_sensitivity: give it (in (0, 1]) exactly when threshold "
                             f"is 'sensitivity'; got threshold={self.threshold!r}, "
                             f"target_sensitivity={self.target_sensitivity!r}")
        if self.target_sensitivity is not None and not 0 < self.target_sensitivity <= 1:
            raise ValueError(f"target_sensitivity: must lie in (0, 1], got "
                             f"{self.target_sensitivity}")
        return self


@dataclass
class EvaluateConfig:
    """``usfmae-fast evaluate``: classifier checkpoint(s) scored on a labelled set."""
    ckpt: list[str] = field(default_factory=list)   # classifier checkpoint(s)
    labels: str = ""                        # labels CSV or a folder per class
    out_dir: str = "outputs/evaluate"
    name: str = "model"                     # model name in the report
    title: str = "Evaluation report"
    n_boot: int = 1000                      # bootstrap resamples
    seed: int = 0                           # bootstrap seed
    rules: str | None = None                # operating_rules.json of a fine-tuning run
    check: str = "header"                   # image check: header | full | none
    allow_outside_root: bool = False
    batch_size: int = 32
    device: str = "auto"
    backend: str = "auto"
    workers: int | None = None

    def train_config(self) -> TrainConfig:
        return TrainConfig(batch_size=self.batch_size, device=self.device,
                           backend=self.backend, workers=self.workers, progress=False)

    def validate(self) -> EvaluateConfig:
        if self.n_boot < 1:
            raise ValueError(f"n_boot: must be >= 1, got {self.n_boot}")
        self.train_config().validate()
        return self
