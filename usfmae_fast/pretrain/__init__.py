"""Pretraining: the MAE pretraining engine (config, loop, checkpoints, logs) and its figures.

The names below are imported on first use: the command line reads ``pretrain.config`` (no torch)
to build its parser, and ``usfmae-fast ingest`` must not pay for torch (about 600 MB)."""
from ..runtime.lazy import lazy_exports

_WHERE = {"CONFIG_PRESETS": ".config", "ConfigError": ".config", "PretrainConfig": ".config",
          "build_config": ".config", "PretrainEngine": ".engine", "TrainingDiverged": ".engine",
          "pretrain": ".engine", "param_groups": "..runtime.optim",
          "warmup_cosine": "..runtime.optim"}

__all__ = sorted(_WHERE)
__getattr__ = lazy_exports(__name__, _WHERE)
