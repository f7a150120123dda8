"""Training: the MAE pretraining loop and its figures."""
from .pretrain import PretrainConfig, lr_at, param_groups, pretrain, save_checkpoint

__all__ = ["PretrainConfig", "lr_at", "param_groups", "pretrain", "save_checkpoint"]
