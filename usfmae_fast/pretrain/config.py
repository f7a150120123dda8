"""Configuration of a pretraining run: dataclasses, recipes (presets), YAML and overrides.

A config is built in this order, each layer overriding the one before:

1. the dataclass defaults (= the ``mae`` recipe);
2. a preset (``--preset`` or ``preset:`` in the YAML file);
3. the YAML file (``--config``), a mapping of sections ``model``, ``data``, ``optim``,
   ``system``, ``output``;
4. dotted overrides ``section.field=value`` (``--set optim.lr=1e-3``; the CLI's own flags are
   turned into the same overrides).

Unknown sections or fields and values of the wrong type fail with an error naming the field.

Batch sizes are global: ``optim.batch_size`` images per optimizer step over all ranks and
accumulation steps together, so a run gives the same schedule and the same data on any number
of GPUs; each rank loads ``batch_size / (world_size * accum_steps)`` images per micro-step.
"""
from __future__ import annotations

import math
import typing
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..data import INTERPOLATIONS, LOADER_BACKENDS
from ..runtime.config import (ConfigError, coerce, parse_override,  # noqa: F401 (re-exported)
                              set_value)
from ..runtime.device import DEVICE_PATTERN
from ..runtime.precision import PRECISIONS

DISTRIBUTED = ("ddp", "fsdp")


@dataclass
class ModelConfig:
    size: str = "base"                     # encoder preset of models.mae.PRESETS
    img_size: int = 224
    in_chans: int = 1                      # 1: gray ultrasound; 3 for RGB data
    patch_size: int | None = None          # None: the size preset's
    embed_dim: int | None = None
    depth: int | None = None
    num_heads: int | None = None
    decoder_embed_dim: int | None = None   # None: fb/mae's decoder, 512 wide, 8 deep, 16 heads
    decoder_depth: int | None = None
    decoder_num_heads: int | None = None
    mlp_ratio: float | None = None
    norm_pix_loss: bool = True
    drop_path_rate: float = 0.0
    init_from: str | None = None           # MAE weights: .pth, .pt, .safetensors, HF folder


@dataclass
class DataConfig:
    source: str = ""                       # ingest folder, manifest, shards; "demo": pydicom-data
    backend: str = "auto"                  # make_loader backend: auto | dali | torch
    workers: int | None = None             # DALI threads / DataLoader processes
    # pixel normalisation of files, one value or one per channel ("demo" measures its own)
    mean: list[float] = field(default_factory=lambda: [0.15])
    std: list[float] = field(default_factory=lambda: [0.20])
    # training augmentation, in this order (data/load/torch_loader.py; DALI does the same):
    resize: str | None = None              # squash to img_size x img_size first: nearest | ...
    rotate: list[float] = field(default_factory=lambda: [0.0])  # degrees: [r] -> [-r, r]; [lo, hi]
    rotate_interpolation: str = "bilinear"
    crop_scale: list[float] = field(default_factory=lambda: [0.2, 1.0])  # area; high may be > 1
    crop_interpolation: str = "bicubic"
    hflip: float = 0.5                     # flip probabilities
    vflip: float = 0.0
    heldout: int = 4                       # images kept out of training for the figure
    max_frames_per_file: int | None = 32   # "demo": frames taken from each cine loop


@dataclass
class OptimConfig:
    batch_size: int = 4096                 # global images per optimizer step
    accum_steps: int = 1                   # gradient accumulation micro-steps per optimizer step
    steps: int | None = None               # optimizer steps (wins over epochs); None: epochs
    epochs: float | None = 800
    blr: float = 1.5e-4                    # lr = blr * batch_size / 256, unless lr is given
    lr: float | None = None
    min_lr: float = 0.0
    warmup_steps: int | None = None        # None: warmup_fraction of all steps
    warmup_fraction: float = 0.05          # fb/mae: 40 of 800 epochs
    weight_decay: float = 0.05
    beta1: float = 0.9
    beta2: float = 0.95
    clip_grad: float | None = None
    mask_ratio: float = 0.75
    max_bad_steps: int = 20                # non-finite steps in a row before the run stops


@dataclass
class SystemConfig:
    device: str = "auto"                   # auto | cpu | cuda | cuda:N (torchrun: the local GPU)
    precision: str = "bf16"                # autocast dtype: bf16 | fp16 (+ GradScaler) | fp32
    ops_backend: str = "auto"              # ops backend: auto | torch | cpu | cuda | triton
    distributed: str = "ddp"               # with several processes: ddp | fsdp (FSDP2 fully_shard)
    compile: bool = False                  # torch.compile the model
    compile_mode: str | None = None        # e.g. "reduce-overhead" (CUDA graphs), "max-autotune"
    activation_checkpointing: bool = False  # recompute each block in backward (ViT-L / H)
    seed: int = 0
    num_threads: int | None = None         # torch.set_num_threads per process


@dataclass
class OutputConfig:
    out_dir: str = "outputs/pretrain"
    save_every: int = 1000                 # checkpoint every N optimizer steps (and at the end)
    keep_last: int = 3                     # training checkpoints kept
    tensorboard: bool = True               # when the tensorboard package is installed
    progress: bool = True                  # tqdm bar (rank 0)
    figures: bool = True                   # loss curve + reconstructions at the end
    heldout_draws: int = 8                 # fixed mask draws the held-out losses average over
    resume: str | None = None              # "auto" (newest valid checkpoint in out_dir) or a path
    overwrite: bool = False                # a fresh run may delete an earlier run's checkpoints


@dataclass
class PretrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    system: SystemConfig = field(default_factory=SystemConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    preset: str | None = None

    def to_dict(self) -> dict:
        return asdict(self)

    def peak_lr(self) -> float:
        return self.optim.lr if self.optim.lr is not None else \
            self.optim.blr * self.optim.batch_size / 256


SECTIONS = {name: hint for name, hint in typing.get_type_hints(PretrainConfig).items()
            if name != "preset"}

IMAGENET_MEAN = [0.485, 0.456, 0.406]
IMAGENET_STD = [0.229, 0.224, 0.225]

CONFIG_PRESETS: dict[str, dict] = {
    # fb/mae main_pretrain.py, ViT-B: effective batch 4096, 800 epochs, 40 of warmup, AdamW
    # betas (0.9, 0.95), wd 0.05; augmentation RandomResizedCrop(scale (0.2, 1.0), bicubic) +
    # horizontal flip, nothing else
    "mae": {"model": {"size": "base", "norm_pix_loss": True},
            "data": {"resize": None, "rotate": [0.0], "crop_scale": [0.2, 1.0],
                     "crop_interpolation": "bicubic", "hflip": 0.5, "vflip": 0.0},
            "optim": {"batch_size": 4096, "epochs": 800, "warmup_fraction": 0.05, "blr": 1.5e-4,
                      "min_lr": 0.0, "clip_grad": None, "mask_ratio": 0.75, "beta1": 0.9,
                      "beta2": 0.95, "weight_decay": 0.05},
            "system": {"precision": "bf16"}},
    # USF-MAE as its authors' code trains it (github.com/Yusufii9/USF-MAE: US_data_loading.py
    # get_transforms, USF-MAE_pretraining.ipynb), continuing fb/mae's full ViT-B checkpoint
    # (their notebook: mae_pretrain_vit_base_full.pth["model"] into
    # models_mae.mae_vit_base_patch16_dec512d8b; set model.init_from, nothing downloads):
    # - model: ViT-B/16, decoder 512 wide x 8 deep (dec512d8b, our default decoder), 224 px,
    #   RGB input (PIL .convert("RGB"): gray replicated to 3 channels), plain-pixel loss
    #   (norm_pix_loss=False, mae_vit_base_patch16_dec512d8b's default), mask ratio 0.75 (its
    #   forward's default);
    # - data: ImageNet mean / std (Normalize); Resize((224, 224), NEAREST) first;
    #   RandomRotation((0, 90)) (torchvision's default NEAREST, fill 0, same canvas);
    #   RandomHorizontalFlip(0.5), RandomVerticalFlip(0.5); RandomResizedCrop(224,
    #   scale=(0.5, 2.0)) (default ratio 3/4-4/3, BILINEAR; an area above 1 never fits, see
    #   data/load/torch_loader.py). Their order is resize, rotate, flips, crop; ours puts the
    #   flips after the crop, the same distribution (the crop is mirror-symmetric);
    # - optim: AdamW with torch's default betas (0.9, 0.999); DataLoader batch 64 for 100
    #   epochs; lr = blr * 128 / 256 with blr 3e-4 (the first of their grid {3e-4, 1e-3} x
    #   weight decay {0.01, 0.05}; the notebook keeps whichever validates best and does not say
    #   which the released weights used), i.e. peak lr 1.5e-4 at batch 64, which is blr 6e-4 in
    #   our blr * batch / 256 rule; weight decay 0.05; per-step linear warmup over
    #   int(0.1 * total steps), then half-cosine to min_lr 1e-5; clip_grad_norm 1.0; bf16
    #   autocast without a GradScaler; seed 42.
    # Left different (stated in the README): our AdamW does not decay biases, norms, tokens
    # (runtime/optim.param_groups; theirs decays all parameters); our warmup reaches
    # peak * (s + 1) / w at step s, theirs peak * s / w; they train 5 KFold folds on 4/5 of the
    # images each, we train on all but data.heldout.
    "usfmae": {"model": {"size": "base", "img_size": 224, "in_chans": 3, "norm_pix_loss": False},
               "data": {"mean": IMAGENET_MEAN, "std": IMAGENET_STD, "resize": "nearest",
                        "rotate": [0.0, 90.0], "rotate_interpolation": "nearest",
                        "crop_scale": [0.5, 2.0], "crop_interpolation": "bilinear",
                        "hflip": 0.5, "vflip": 0.5},
               "optim": {"batch_size": 64, "epochs": 100, "warmup_fraction": 0.1, "blr": 6e-4,
                         "min_lr": 1e-5, "clip_grad": 1.0, "mask_ratio": 0.75, "beta1": 0.9,
                         "beta2": 0.999, "weight_decay": 0.05},
               "system": {"precision": "bf16", "seed": 42}},
    # a tiny model that learns on the demo frames in minutes on a CPU
    "demo": {"model": {"size": "tiny", "img_size": 64, "patch_size": 8, "embed_dim": 192,
                       "depth": 4, "num_heads": 3, "decoder_embed_dim": 128, "decoder_depth": 2,
                       "decoder_num_heads": 4, "norm_pix_loss": True},
             "data": {"source": "demo"},
             "optim": {"batch_size": 32, "steps": 300, "epochs": None, "blr": 1e-2,
                       "warmup_fraction": 0.1, "clip_grad": 1.0},
             "system": {"precision": "fp32", "device": "cpu"},
             "output": {"save_every": 100}},
}


def _apply(cfg: PretrainConfig, section: str, values, origin: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{origin}: unknown section {section!r}; sections are "
                          f"{', '.join(SECTIONS)}")
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: section {section!r} must be a mapping, got {values!r}")
    for key, value in values.items():  # the shared mechanism: runtime.config.set_value
        set_value(cfg, f"{section}.{key}", value, origin)


def apply_preset(cfg: PretrainConfig, name: str) -> PretrainConfig:
    if name not in CONFIG_PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(CONFIG_PRESETS)}, got {name!r}")
    for section, values in CONFIG_PRESETS[name].items():
        _apply(cfg, section, values, f"preset {name}")
    cfg.preset = name
    return cfg


def build_config(preset: str | None = None, config_file=None,
                 overrides: list[str] | dict | None = None) -> PretrainConfig:
    """Defaults <- preset <- YAML file <- overrides (``["optim.lr=1e-3", ...]`` or
    ``{"optim.lr": 1e-3}``); validated."""
    import yaml

    cfg = PretrainConfig()
    file_values = {}
    if config_file is not None:
        path = Path(config_file)
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        file_values = yaml.safe_load(path.read_text()) or {}
        if not isinstance(file_values, dict):
            raise ConfigError(f"{path}: the config must be a mapping of sections")
        file_values = dict(file_values)
    name = preset or file_values.pop("preset", None)
    file_values.pop("preset", None)
    if name is not None:
        apply_preset(cfg, name)
    for section, values in file_values.items():
        _apply(cfg, section, values, str(config_file))
    items = overrides.items() if isinstance(overrides, dict) else \
        [(f"{s}.{n}", v) for s, n, v in map(parse_override, overrides or [])]
    for key, value in items:
        section, _, name_ = key.partition(".")
        _apply(cfg, section, {name_: value}, "override")
    if cfg.preset == "usfmae" and cfg.model.init_from is None:
        warnings.warn("the usfmae recipe continues an MAE checkpoint; model.init_from is not "
                      "set, so this run starts from random weights", stacklevel=2)
    return validate(cfg)


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise ConfigError(message)


def _range(name: str, value, ok: bool, accepted: str) -> None:
    _check(ok, f"{name} must be {accepted}, got {value!r}")


def _positive(name: str, value, optional: bool = False) -> None:
    _range(name, value, (optional and value is None) or (value is not None and value > 0),
           "a positive integer" + (" or null" if optional else ""))


def _finite(value) -> bool:
    return value is not None and math.isfinite(value)


COMPILE_MODES = (None, "default", "reduce-overhead", "max-autotune",
                 "max-autotune-no-cudagraphs")
SHAPE_FIELDS = ("patch_size", "embed_dim", "depth", "num_heads", "decoder_embed_dim",
                "decoder_depth", "decoder_num_heads", "mlp_ratio")


def _model_shape(m: ModelConfig) -> dict:
    """The shape ``m`` builds: MaskedAutoencoderViT's defaults (fb/mae's decoder) <- the size
    preset's encoder <- the fields that are set."""
    import inspect

    from ..models.mae import PRESETS as SIZES, MaskedAutoencoderViT

    defaults = {k: p.default for k, p in inspect.signature(MaskedAutoencoderViT).parameters.items()}
    given = {k: getattr(m, k) for k in SHAPE_FIELDS if getattr(m, k) is not None}
    return {k: v for k, v in {**defaults, **SIZES[m.size], **given}.items() if k in SHAPE_FIELDS}


def validate(cfg: PretrainConfig, world_size: int | None = None) -> PretrainConfig:
    """Every field against its accepted range, named in the message (the model's shape and
    the mask ratio against each other); with ``world_size`` also that the global batch
    splits into equal per-rank micro-batches."""
    from ..models.mae import PRESETS as SIZES  # the vocabularies of the model and the ops,
    from ..ops import BACKENDS                  # imported here: the CLI parser loads no torch

    m, d, o, s, out = cfg.model, cfg.data, cfg.optim, cfg.system, cfg.output
    _range("model.size", m.size, m.size in SIZES, f"one of {tuple(SIZES)}")
    _positive("model.img_size", m.img_size)
    _range("model.in_chans", m.in_chans, m.in_chans in (1, 3), "1 or 3")
    for name in SHAPE_FIELDS[:-1]:
        _positive(f"model.{name}", getattr(m, name), optional=True)
    _range("model.mlp_ratio", m.mlp_ratio,
           m.mlp_ratio is None or (_finite(m.mlp_ratio) and m.mlp_ratio > 0), "> 0 or null")
    _range("model.drop_path_rate", m.drop_path_rate, 0 <= m.drop_path_rate < 1, "in [0, 1)")
    _range("model.init_from", m.init_from, m.init_from is None or m.init_from.strip() != "",
           "a checkpoint path or null")
    sizes = _model_shape(m)
    patch = sizes["patch_size"]
    _check(m.img_size % patch == 0, f"model.img_size = {m.img_size} must be a multiple of "
           f"model.patch_size = {patch}")
    for dim, heads in (("embed_dim", "num_heads"), ("decoder_embed_dim", "decoder_num_heads")):
        _check(sizes[dim] % sizes[heads] == 0, f"model.{dim} = {sizes[dim]} must be a multiple "
               f"of model.{heads} = {sizes[heads]}")
    patches = (m.img_size // patch) ** 2
    _check(patches >= 2, f"model.img_size = {m.img_size} / model.patch_size = {patch} gives "
           f"{patches} patch; masking needs at least 2 (one kept, one masked)")

    # data.source may be unset here (a preset, a file still to be merged); build_data refuses it
    _range("data.backend", d.backend, d.backend in LOADER_BACKENDS, f"one of {LOADER_BACKENDS}")
    _range("data.workers", d.workers, d.workers is None or d.workers >= 0, ">= 0 or null")
    counts = (1,) if m.in_chans == 1 else (1, m.in_chans)
    _range("data.mean", d.mean, len(d.mean) in counts and all(map(_finite, d.mean)),
           f"{' or '.join(map(str, counts))} finite number(s) (model.in_chans = {m.in_chans})")
    _range("data.std", d.std, len(d.std) in counts and all(_finite(v) and v > 0 for v in d.std),
           f"{' or '.join(map(str, counts))} number(s) > 0 (model.in_chans = {m.in_chans})")
    _range("data.rotate", d.rotate, (len(d.rotate) == 1 and 0 <= d.rotate[0] <= 180) or (
        len(d.rotate) == 2 and -180 <= d.rotate[0] <= d.rotate[1] <= 180),
        "[r] with r in [0, 180] or [low, high] with -180 <= low <= high <= 180 degrees")
    _range("data.resize", d.resize, d.resize is None or d.resize in INTERPOLATIONS,
           f"one of {INTERPOLATIONS} or null")
    for name in ("rotate_interpolation", "crop_interpolation"):
        _range(f"data.{name}", getattr(d, name), getattr(d, name) in INTERPOLATIONS,
               f"one of {INTERPOLATIONS}")
    _range("data.crop_scale", d.crop_scale,
           len(d.crop_scale) == 2 and 0 < d.crop_scale[0] <= 1
           and d.crop_scale[0] <= d.crop_scale[1] < math.inf,
           "[low, high] with 0 < low <= 1, low <= high (high > 1: torchvision's semantics, "
           "see data/load/torch_loader.py)")
    for name in ("hflip", "vflip"):
        _range(f"data.{name}", getattr(d, name), 0 <= getattr(d, name) <= 1,
               "a probability in [0, 1]")
    _range("data.heldout", d.heldout, d.heldout >= 0, ">= 0")
    _positive("data.max_frames_per_file", d.max_frames_per_file, optional=True)

    _positive("optim.batch_size", o.batch_size)
    _positive("optim.accum_steps", o.accum_steps)
    _check(o.steps is not None or o.epochs is not None,
           "set optim.steps or optim.epochs (the run length)")
    _positive("optim.steps", o.steps, optional=True)
    _range("optim.epochs", o.epochs, o.epochs is None or (_finite(o.epochs) and o.epochs > 0),
           "> 0 (finite) or null")
    _range("optim.blr", o.blr, _finite(o.blr) and o.blr > 0, "> 0 (finite)")
    _range("optim.lr", o.lr, o.lr is None or (_finite(o.lr) and o.lr > 0), "> 0 (finite) or null")
    _range("optim.min_lr", o.min_lr, 0 <= o.min_lr <= cfg.peak_lr(),
           f"in [0, peak lr = {cfg.peak_lr():.3g}]")
    _range("optim.warmup_steps", o.warmup_steps, o.warmup_steps is None or o.warmup_steps >= 0,
           ">= 0 or null")
    _range("optim.warmup_fraction", o.warmup_fraction, 0 <= o.warmup_fraction < 1, "in [0, 1)")
    for name in ("beta1", "beta2"):
        _range(f"optim.{name}", getattr(o, name), 0 <= getattr(o, name) < 1, "in [0, 1)")
    _range("optim.weight_decay", o.weight_decay, _finite(o.weight_decay) and o.weight_decay >= 0,
           ">= 0 (finite)")
    _range("optim.clip_grad", o.clip_grad,
           o.clip_grad is None or (_finite(o.clip_grad) and o.clip_grad > 0),
           "> 0 (finite) or null")
    kept = int(patches * (1 - o.mask_ratio)) if _finite(o.mask_ratio) else -1
    _range("optim.mask_ratio", o.mask_ratio, 0 < o.mask_ratio < 1 and 1 <= kept < patches,
           f"in (0, {1 - 1 / patches:.6g}]: at least one of the {patches} patches "
           f"({m.img_size} px / patch {patch}) masked and one kept")
    _positive("optim.max_bad_steps", o.max_bad_steps)

    _range("system.device", s.device, DEVICE_PATTERN.fullmatch(s.device) is not None,
           "auto, cpu, cuda or cuda:N")
    _range("system.precision", s.precision, s.precision in PRECISIONS, f"one of {PRECISIONS}")
    ops_backends = ("auto", *BACKENDS)
    _range("system.ops_backend", s.ops_backend, s.ops_backend in ops_backends,
           f"one of {ops_backends}")
    _range("system.distributed", s.distributed, s.distributed in DISTRIBUTED,
           f"one of {DISTRIBUTED}")
    _range("system.compile_mode", s.compile_mode, s.compile_mode in COMPILE_MODES,
           f"one of {COMPILE_MODES}")
    _range("system.seed", s.seed, 0 <= s.seed < 2 ** 63, "in [0, 2**63)")
    _positive("system.num_threads", s.num_threads, optional=True)

    _range("output.out_dir", out.out_dir, out.out_dir.strip() != "", "a folder path")
    _positive("output.save_every", out.save_every)
    _positive("output.keep_last", out.keep_last)
    _positive("output.heldout_draws", out.heldout_draws)
    _range("output.resume", out.resume, out.resume is None or out.resume.strip() != "",
           "'auto', a checkpoint path or null")
    if world_size is not None:
        ranks = world_size * o.accum_steps
        _check(o.batch_size % ranks == 0,
               f"optim.batch_size = {o.batch_size} must be divisible by world size "
               f"{world_size} x optim.accum_steps {o.accum_steps} = {ranks} (it is the global "
               f"batch; each rank takes an equal share per micro-step)")
    return cfg


def micro_batch_size(cfg: PretrainConfig, world_size: int) -> int:
    validate(cfg, world_size)
    return cfg.optim.batch_size // (world_size * cfg.optim.accum_steps)


def run_length(cfg: PretrainConfig, steps_per_epoch: int) -> tuple[int, int]:
    """``(total optimizer steps, warmup steps)``."""
    o = cfg.optim
    total = o.steps if o.steps is not None else max(1, math.ceil(o.epochs * steps_per_epoch))
    warmup = o.warmup_steps if o.warmup_steps is not None else int(o.warmup_fraction * total)
    return total, min(warmup, total)


def dump_yaml(cfg: PretrainConfig, path) -> Path:
    import yaml

    path = Path(path)
    path.write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    return path
