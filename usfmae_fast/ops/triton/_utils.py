"""Where the Triton kernels can run, and helpers shared by their launchers.

On a CUDA machine the kernels run on CUDA tensors. With ``TRITON_INTERPRET=1`` in the
environment *before* usfmae_fast is imported, Triton's interpreter runs them on CPU tensors
instead (slow; for tests). The interpreter has no bfloat16 (``tl.dot`` returns garbage without
an error), so bf16 inputs are refused there with a clear error.
"""
from __future__ import annotations

import os

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES: tuple[str, ...] = ("cpu",) if INTERPRET else ("cuda",)

try:
    import triton  # noqa: F401
    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - triton ships with every CUDA torch wheel
    _IMPORT_ERROR = f"triton is not installed ({exc})"
IMPORTED = _IMPORT_ERROR is None  # the kernel modules import triton at module level


def unavailable() -> str | None:
    """None when the Triton kernels can run here, otherwise why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return None


def register(op: str, fn) -> None:
    """Register ``fn`` as the "triton" backend of ``op``."""
    from .. import _backend
    _backend.register(op, "triton", fn, DEVICES, unavailable)


def check_dtype(name: str, tensor: torch.Tensor,
                allowed=(torch.float32, torch.float16, torch.bfloat16)) -> None:
    """Raise a TypeError naming ``name`` when the Triton kernels cannot take its dtype."""
    if tensor.dtype not in allowed:
        raise TypeError(f"{name}: the triton backend takes {', '.join(map(str, allowed))}, "
                        f"got {tensor.dtype}")
    if INTERPRET and tensor.dtype == torch.bfloat16:
        raise TypeError(f"{name}: the Triton interpreter (TRITON_INTERPRET=1) has no bfloat16; "
                        "use float32/float16 on CPU or run on a CUDA device")


def autotune_configs(configs: list) -> list:
    """All ``configs`` on a GPU; only the first under the interpreter, where tuning is pointless."""
    return configs[:1] if INTERPRET else configs
