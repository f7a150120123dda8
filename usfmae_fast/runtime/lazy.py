"""Package exports imported on first use: ``usfmae-fast --help``, ``ingest`` and its worker
processes must not pay for torch, sklearn or DALI (hundreds of MB, seconds) that only some
commands need."""
from __future__ import annotations

import sys
from importlib import import_module


def lazy_exports(package: str, where: dict[str, str]):
    """A module ``__getattr__`` for ``package`` that imports ``name`` from the submodule
    ``where[name]`` (relative, e.g. ".engine") when it is first asked for."""
    def __getattr__(name: str):
        if name not in where:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(import_module(where[name], package), name)
        setattr(sys.modules[package], name, value)
        return value
    return __getattr__
