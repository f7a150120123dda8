"""Argument checks shared by the public ops: every error names the argument it is about."""
from __future__ import annotations

from typing import Sequence

import torch


def tensor(name: str, value, ndim: int, layout: str, *, floating: bool = True,
           contiguous: bool = True) -> torch.Tensor:
    if not isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(value).__name__}")
    if value.dim() != ndim:
        raise ValueError(f"{name} must have shape {layout} ({ndim} dims), "
                         f"got {tuple(value.shape)}")
    if floating and not value.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {value.dtype}")
    if contiguous and not value.is_contiguous():
        raise ValueError(f"{name} must be contiguous (call .contiguous() first), "
                         f"got strides {value.stride()}")
    return value


def same_device(**tensors: torch.Tensor) -> torch.device:
    devices = {name: t.device for name, t in tensors.items()}
    first_name, first = next(iter(devices.items()))
    for name, device in devices.items():
        if device != first:
            raise ValueError(f"{name} is on {device} but {first_name} is on {first}; "
                             "put them on the same device")
    return first


def shape(name: str, value: torch.Tensor, expected: Sequence[int], layout: str) -> None:
    if tuple(value.shape) != tuple(expected):
        raise ValueError(f"{name} must have shape {layout} = {tuple(expected)}, "
                         f"got {tuple(value.shape)}")


def positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
    return value


def mask_ratio(value) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < 1:
        raise ValueError(f"mask_ratio must be a number in (0, 1), got {value!r}")
    return float(value)


def divisible(name: str, size: int, patch_size: int) -> None:
    if size % patch_size:
        raise ValueError(f"{name} = {size} is not divisible by patch_size = {patch_size}")
