"""The op contract of usfmae_fast (see ``reference.py`` for the exact semantics).

``set_backend("auto" | "torch" | "cpu" | "cuda" | "triton")`` or ``USFMAE_BACKEND`` chooses
the implementation; ``backend_status()`` tells what is usable here and why not. Every compiled
or Triton kernel is checked against ``reference.py`` on its first use in a process (``_trust``;
``USFMAE_TRUST_CHECK=0`` turns that off); one that fails is replaced by the next backend with a
``KernelCheckWarning``. ``selftest()`` runs every such check this machine offers.
"""
from ._backend import BACKENDS, get_backend, set_backend
from ._backend import status as backend_status
from ._backend import why_not as backend_refusal
from ._trust import KernelCheckWarning, selftest
from .attention import attention, attention_packed
from .mae_loss import mae_loss
from .patches import patchify, unpatchify
from .random_masking import random_masking

__all__ = ["BACKENDS", "KernelCheckWarning", "attention", "attention_packed", "backend_refusal",
           "backend_status", "get_backend", "mae_loss", "patchify", "random_masking",
           "selftest", "set_backend", "unpatchify"]
