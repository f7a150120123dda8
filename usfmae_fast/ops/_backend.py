"""Backend registry: which implementation of each op runs, chosen per call by device.

``set_backend("auto" | "torch" | "cpu" | "cuda" | "triton")`` or ``USFMAE_BACKEND`` picks one for
every op. "auto" takes, per device type, the first usable backend in ``AUTO_ORDER``. A named
backend that an op does not implement falls back to "torch" with a warning (never silently).
"""
from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable

BACKENDS = ("torch", "cpu", "cuda", "triton")
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


@dataclass(frozen=True)
class Impl:
    fn: Callable
    devices: tuple[str, ...]
    unavailable: Callable[[], str | None]  # None when usable, otherwise the reason


_REGISTRY: dict[str, dict[str, Impl]] = {}
_warned: set[tuple[str, str]] = set()


def _always() -> None:
    return None


def register(op: str, backend: str, fn: Callable, devices: tuple[str, ...],
             unavailable: Callable[[], str | None] = _always) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = Impl(fn, devices, unavailable)


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS}, got {name!r}")
    return name


_current = _validate(os.environ.get("USFMAE_BACKEND", "auto"), "USFMAE_BACKEND")


def set_backend(name: str) -> None:
    """Choose the backend for every op ("auto" = fastest usable per device)."""
    global _current
    _current = _validate(name, "backend")


def get_backend() -> str:
    return _current


def _usable(impl: Impl | None, device_type: str) -> bool:
    return impl is not None and device_type in impl.devices and impl.unavailable() is None


def resolve(op: str, device_type: str) -> tuple[str, Callable]:
    """The (backend name, function) that runs ``op`` on tensors of ``device_type``."""
    impls = _REGISTRY[op]
    if _current == "auto":
        for name in AUTO_ORDER.get(device_type, ("torch",)):
            if _usable(impls.get(name), device_type):
                return name, impls[name].fn
        return "torch", impls["torch"].fn
    impl = impls.get(_current)
    if impl is None:
        if (op, _current) not in _warned:
            _warned.add((op, _current))
            warnings.warn(f"backend {_current!r} has no {op} yet; using 'torch' for it",
                          stacklevel=3)
        return "torch", impls["torch"].fn
    if device_type not in impl.devices:
        raise ValueError(f"backend {_current!r} runs {op} on {'/'.join(impl.devices)} tensors, "
                         f"got tensors on {device_type}")
    reason = impl.unavailable()
    if reason is not None:
        raise RuntimeError(f"backend {_current!r} cannot run {op}: {reason}")
    return _current, impl.fn


def status() -> dict[str, dict[str, str]]:
    """For each op and backend: "ok (devices)" or why it cannot run here."""
    report: dict[str, dict[str, str]] = {}
    for op, impls in sorted(_REGISTRY.items()):
        row = {}
        for name in BACKENDS:
            impl = impls.get(name)
            if impl is None:
                row[name] = "not implemented"
            else:
                reason = impl.unavailable()
                row[name] = reason if reason else f"ok ({'/'.join(impl.devices)})"
        report[op] = row
    return report
