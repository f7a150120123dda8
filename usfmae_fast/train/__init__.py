"""Training: the MAE pretraining engine (config, loop, checkpoints, logs) and its figures.

The names below are imported on first use: the command line reads ``train.config`` (no torch)
to build its parser, and ``usfmae-fast ingest`` must not pay for torch (about 600 MB)."""
from importlib import import_module

_WHERE = {"CONFIG_PRESETS": ".config", "ConfigError": ".config", "PretrainConfig": ".config",
          "build_config": ".config", "PretrainEngine": ".engine", "TrainingDiverged": ".engine",
          "pretrain": ".engine", "param_groups": "..runtime.optim",
          "warmup_cosine": "..runtime.optim"}

__all__ = sorted(_WHERE)


def __getattr__(name: str):
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_WHERE[name], __name__), name)
    globals()[name] = value
    return value
