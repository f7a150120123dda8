"""The op contract of usfmae_fast (see ``reference.py`` for the exact semantics).

``set_backend("auto" | "torch" | "cpu" | "cuda" | "triton")`` or ``USFMAE_BACKEND`` chooses
the implementation; ``backend_status()`` tells what is usable here and why not. Every compiled
or Triton kernel is checked against ``reference.py`` on its first use in a process (``_trust``;
``USFMAE_TRUST_CHECK=0`` turns that off); one that fails is replaced by the next backend with a
``KernelCheckWarning``. ``selftest()`` runs every such check this machine offers.
"""
from . import _backend, _ext
from ._backend import BACKENDS, get_backend, set_backend, use_backend
from ._backend import status as backend_status
from ._backend import usable as usable_backends
from ._backend import why_not as backend_refusal
from ._trust import ENV as TRUST_ENV
from ._trust import DTYPES as SELFTEST_DTYPES
from ._trust import KernelCheckWarning, auto_choices, selftest
from ._trust import enabled as trust_checks_enabled
from ._trust import render as render_selftest
from .attention import attention, attention_packed
from .mae_loss import mae_loss
from .patches import patchify, unpatchify
from .random_masking import random_masking

OPS = tuple(sorted(_backend._OPS))  # the ops with backends: attention, ..., random_masking


def extension_status() -> dict:
    """Whether the compiled library usfmae_fast._C loaded (and why not), and with which kernels."""
    return {"loaded": _ext.LOADED, "message": _ext.LOAD_MESSAGE,
            "cpu_kernels": _ext.has_kernel("random_masking", "CPU"),
            "cuda_kernels": _ext.has_kernel("random_masking", "CUDA")}


__all__ = ["BACKENDS", "KernelCheckWarning", "OPS", "SELFTEST_DTYPES", "TRUST_ENV", "attention",
           "attention_packed", "auto_choices", "backend_refusal", "backend_status",
           "extension_status", "get_backend", "mae_loss", "patchify", "random_masking",
           "render_selftest", "selftest", "set_backend", "trust_checks_enabled", "unpatchify",
           "usable_backends", "use_backend"]
