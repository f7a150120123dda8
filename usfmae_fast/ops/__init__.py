"""The op contract of usfmae_fast (see ``reference.py`` for the exact semantics).

``set_backend("auto" | "torch" | "cpu" | "cuda" | "triton")`` or ``USFMAE_BACKEND`` chooses
the implementation; ``backend_status()`` tells what is usable here and why not.
"""
from ._backend import BACKENDS, get_backend, set_backend
from ._backend import status as backend_status
from .attention import attention, attention_packed
from .mae_loss import mae_loss
from .patches import patchify, unpatchify
from .random_masking import random_masking

__all__ = ["BACKENDS", "attention", "attention_packed", "backend_status", "get_backend",
           "mae_loss", "patchify", "random_masking", "set_backend", "unpatchify"]
