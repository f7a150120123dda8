"""Training: the MAE pretraining engine (config, loop, checkpoints, logs) and its figures."""
from .config import PRESETS, ConfigError, PretrainConfig, build_config
from .engine import PretrainEngine, TrainingDiverged, pretrain
from .optim import param_groups, warmup_cosine

__all__ = ["ConfigError", "PRESETS", "PretrainConfig", "PretrainEngine", "TrainingDiverged",
           "build_config", "param_groups", "pretrain", "warmup_cosine"]
