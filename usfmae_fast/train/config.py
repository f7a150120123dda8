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
import types
import typing
import warnings
from dataclasses import asdict, dataclass, field
from pathlib import Path

PRECISIONS = ("fp32", "bf16", "fp16")
DISTRIBUTED = ("ddp", "fsdp")
LOADER_BACKENDS = ("auto", "dali", "torch")
OPS_BACKENDS = ("auto", "torch", "cpu", "cuda", "triton")
MODEL_SIZES = ("tiny", "small", "base", "large", "huge")


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the field."""


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
    init_from: str | None = None           # MAE weights to start from: .pth, .pt, .safetensors


@dataclass
class DataConfig:
    source: str = "demo"                   # "demo" (pydicom-data frames), manifest, folder, shards
    backend: str = "auto"                  # make_loader backend: auto | dali | torch
    workers: int | None = None             # DALI threads / DataLoader processes
    mean: float = 0.15                     # pixel normalisation of files ("demo" measures its own)
    std: float = 0.20
    rotate: float = 0.0                    # max random rotation, degrees
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

PRESETS: dict[str, dict] = {
    # fb/mae main_pretrain.py, ViT-B: effective batch 4096, 800 epochs, 40 of warmup
    "mae": {"model": {"size": "base", "norm_pix_loss": True},
            "optim": {"batch_size": 4096, "epochs": 800, "warmup_fraction": 0.05, "blr": 1.5e-4,
                      "min_lr": 0.0, "clip_grad": None, "mask_ratio": 0.75},
            "system": {"precision": "bf16"}},
    # USF-MAE: continue an MAE checkpoint on ultrasound with the plain-pixel loss
    "usfmae": {"model": {"size": "base", "norm_pix_loss": False},
               "optim": {"batch_size": 128, "epochs": 100, "warmup_fraction": 0.1, "blr": 1.5e-4,
                         "min_lr": 1e-5, "clip_grad": 1.0, "mask_ratio": 0.75},
               "system": {"precision": "bf16"}},
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


def _section_types(section: str) -> dict:
    return typing.get_type_hints(SECTIONS[section])


def _coerce(value, hint, name: str):
    """``value`` (from YAML or a ``key=value`` string) as the type ``hint`` of field ``name``."""
    args = typing.get_args(hint)
    optional = type(None) in args
    if optional and (value is None or (isinstance(value, str)
                                       and value.strip().lower() in ("none", "null", "~"))):
        return None
    base = next((a for a in args if a is not type(None)), hint) \
        if isinstance(hint, types.UnionType) or typing.get_origin(hint) is typing.Union else hint
    try:
        if base is bool:
            if isinstance(value, str) and value.strip().lower() in ("1", "true", "yes", "on"):
                return True
            if isinstance(value, str) and value.strip().lower() in ("0", "false", "no", "off"):
                return False
            if isinstance(value, bool):
                return value
            raise ValueError
        if base is int:
            if isinstance(value, bool) or (isinstance(value, float) and not value.is_integer()):
                raise ValueError
            return int(float(value)) if isinstance(value, str) and "e" in value.lower() \
                else int(value)
        if base is float:
            if isinstance(value, bool):
                raise ValueError
            return float(value)
        if base is str:
            if not isinstance(value, (str, int, float)) or isinstance(value, bool):
                raise ValueError
            return str(value)
    except (TypeError, ValueError):
        pass
    else:
        raise ConfigError(f"{name}: unsupported field type {hint}")
    expected = getattr(base, "__name__", str(base)) + (" or null" if optional else "")
    raise ConfigError(f"{name} must be {expected}, got {value!r}")


def _apply(cfg: PretrainConfig, section: str, values, origin: str) -> None:
    if section not in SECTIONS:
        raise ConfigError(f"{origin}: unknown section {section!r}; sections are "
                          f"{', '.join(SECTIONS)}")
    if not isinstance(values, dict):
        raise ConfigError(f"{origin}: section {section!r} must be a mapping, got {values!r}")
    hints = _section_types(section)
    target = getattr(cfg, section)
    for key, value in values.items():
        if key not in hints:
            raise ConfigError(f"{origin}: unknown field {section}.{key}; {section} has "
                              f"{', '.join(hints)}")
        setattr(target, key, _coerce(value, hints[key], f"{section}.{key}"))


def apply_preset(cfg: PretrainConfig, name: str) -> PretrainConfig:
    if name not in PRESETS:
        raise ConfigError(f"preset must be one of {', '.join(PRESETS)}, got {name!r}")
    for section, values in PRESETS[name].items():
        _apply(cfg, section, values, f"preset {name}")
    cfg.preset = name
    return cfg


def parse_override(text: str) -> tuple[str, str, str]:
    """``"optim.lr=1e-3"`` -> ``("optim", "lr", "1e-3")``."""
    key, sep, value = text.partition("=")
    section, dot, name = key.strip().partition(".")
    if not sep or not dot or not name:
        raise ConfigError(f"override {text!r} is not of the form section.field=value "
                          f"(e.g. optim.lr=1e-3)")
    return section, name, value.strip()


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


def validate(cfg: PretrainConfig, world_size: int | None = None) -> PretrainConfig:
    """Range checks; with ``world_size`` also that the global batch splits into equal
    per-rank micro-batches."""
    m, d, o, s, out = cfg.model, cfg.data, cfg.optim, cfg.system, cfg.output
    _check(m.size in MODEL_SIZES, f"model.size must be one of {MODEL_SIZES}, got {m.size!r}")
    _check(m.img_size > 0, f"model.img_size must be positive, got {m.img_size}")
    _check(m.in_chans in (1, 3), f"model.in_chans must be 1 or 3, got {m.in_chans}")
    _check(m.drop_path_rate >= 0, f"model.drop_path_rate must be >= 0, got {m.drop_path_rate}")
    _check(d.backend in LOADER_BACKENDS,
           f"data.backend must be one of {LOADER_BACKENDS}, got {d.backend!r}")
    _check(d.std > 0, f"data.std must be > 0, got {d.std}")
    _check(d.heldout >= 0, f"data.heldout must be >= 0, got {d.heldout}")
    _check(o.batch_size > 0, f"optim.batch_size must be positive, got {o.batch_size}")
    _check(o.accum_steps > 0, f"optim.accum_steps must be positive, got {o.accum_steps}")
    _check(o.steps is not None or o.epochs is not None,
           "set optim.steps or optim.epochs (the run length)")
    _check(o.steps is None or o.steps > 0, f"optim.steps must be positive, got {o.steps}")
    _check(o.epochs is None or o.epochs > 0, f"optim.epochs must be positive, got {o.epochs}")
    _check(o.blr > 0 and (o.lr is None or o.lr > 0), "optim.blr and optim.lr must be > 0")
    _check(0 <= o.min_lr <= cfg.peak_lr(),
           f"optim.min_lr = {o.min_lr} must be in [0, peak lr = {cfg.peak_lr():.3g}]")
    _check(o.warmup_steps is None or o.warmup_steps >= 0,
           f"optim.warmup_steps must be >= 0, got {o.warmup_steps}")
    _check(0 <= o.warmup_fraction < 1,
           f"optim.warmup_fraction must be in [0, 1), got {o.warmup_fraction}")
    _check(0 <= o.beta1 < 1 and 0 <= o.beta2 < 1, "optim.beta1 and optim.beta2 must be in [0, 1)")
    _check(o.weight_decay >= 0, f"optim.weight_decay must be >= 0, got {o.weight_decay}")
    _check(o.clip_grad is None or o.clip_grad > 0,
           f"optim.clip_grad must be > 0 or null, got {o.clip_grad}")
    _check(0 <= o.mask_ratio < 1, f"optim.mask_ratio must be in [0, 1), got {o.mask_ratio}")
    _check(o.max_bad_steps > 0, f"optim.max_bad_steps must be positive, got {o.max_bad_steps}")
    _check(s.precision in PRECISIONS,
           f"system.precision must be one of {PRECISIONS}, got {s.precision!r}")
    _check(s.distributed in DISTRIBUTED,
           f"system.distributed must be one of {DISTRIBUTED}, got {s.distributed!r}")
    _check(s.ops_backend in OPS_BACKENDS,
           f"system.ops_backend must be one of {OPS_BACKENDS}, got {s.ops_backend!r}")
    _check(s.device == "auto" or s.device == "cpu" or s.device.startswith("cuda"),
           f"system.device must be auto, cpu, cuda or cuda:N, got {s.device!r}")
    _check(s.num_threads is None or s.num_threads > 0,
           f"system.num_threads must be positive, got {s.num_threads}")
    _check(out.save_every > 0, f"output.save_every must be positive, got {out.save_every}")
    _check(out.keep_last > 0, f"output.keep_last must be positive, got {out.keep_last}")
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
