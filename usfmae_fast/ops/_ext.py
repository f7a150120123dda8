"""Loads the compiled extension ``usfmae_fast._C`` and says why when it cannot.

The library only registers operators with the PyTorch dispatcher (``torch.ops.usfmae.*``); it
has no Python module body, so it is loaded with ``torch.ops.load_library`` (torchvision's way).
"""
from __future__ import annotations

import importlib.machinery
import os
from pathlib import Path

import torch

_PACKAGE_DIR = Path(__file__).resolve().parent.parent


def _find_library() -> Path | None:
    override = os.environ.get("USFMAE_EXT_PATH")
    if override:
        return Path(override)
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        candidate = _PACKAGE_DIR / f"_C{suffix}"
        if candidate.exists():
            return candidate
    return None


def _load() -> tuple[bool, str]:
    path = _find_library()
    if path is None:
        return False, ("usfmae_fast._C is not built (run `make test` or "
                       "`pip install -e . --no-build-isolation`)")
    try:
        torch.ops.load_library(str(path))
    except (OSError, RuntimeError) as exc:
        return False, f"usfmae_fast._C at {path} failed to load: {exc}"
    return True, f"loaded from {path}"


LOADED, LOAD_MESSAGE = _load()


def has_kernel(op: str, dispatch_key: str) -> bool:
    """True when ``usfmae::<op>`` has a compiled kernel for ``dispatch_key`` ("CPU", "CUDA")."""
    if not LOADED or not torch._C._dispatch_has_kernel(f"usfmae::{op}"):
        return False  # an older build of the library may lack the op altogether
    return torch._C._dispatch_has_kernel_for_dispatch_key(f"usfmae::{op}", dispatch_key)


def compiled_unavailable(op: str, dispatch_key: str):
    """A reason function for the backend registry: None when ``usfmae::<op>`` runs here."""
    has_it = has_kernel(op, dispatch_key)  # fixed once the library is loaded

    def reason() -> str | None:
        if not LOADED:
            return LOAD_MESSAGE
        if not has_it:
            return f"usfmae_fast._C was built without the {dispatch_key} kernel of {op}"
        if dispatch_key == "CUDA" and not torch.cuda.is_available():
            return "no CUDA device"
        return None
    return reason
