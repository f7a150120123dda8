"""The device a run uses: ``"auto"`` (or None) is CUDA when available, else the CPU.
(torch is imported on use: configs validate device names without it.)"""
from __future__ import annotations

import re

DEVICE_PATTERN = re.compile(r"auto|cpu|cuda(:\d+)?")  # the device names a config accepts


def resolve_device(name: str | None = "auto") -> "torch.device":  # noqa: F821
    import torch
    if name is None or name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)
