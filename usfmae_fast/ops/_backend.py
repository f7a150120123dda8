"""Backend registry: which implementation of each op runs, chosen per call from its inputs.

``set_backend("auto" | "torch" | "cpu" | "cuda" | "triton")`` or ``USFMAE_BACKEND`` picks one for
every op. Each backend says which inputs it takes (``takes``: why not, else None) and which it
is fast on (``prefer``); each op describes a call by a *spec* (device type, dtypes and the shape
class that picks a code path; see ``_specs.py``). "auto" takes, per call, the first backend in
``AUTO_ORDER`` that runs here, takes the spec, prefers it and passed its check (``_trust``);
"torch" (PyTorch itself) ends every chain. A named backend that cannot take an input, or whose
check failed, falls back the same way with one warning (never silently).
"""
from __future__ import annotations

import contextlib
import functools
import os
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

BACKENDS = ("torch", "cpu", "cuda", "triton")
# The interpreter makes Triton on the CPU a test tool, never a choice of "auto".
AUTO_ORDER = {"cuda": ("cuda", "triton", "torch"), "cpu": ("cpu", "torch")}


def _anything(spec) -> None:
    return None


def _always(spec) -> bool:
    return True


def _here() -> None:
    return None


@dataclass(frozen=True)
class Impl:
    fn: Callable
    devices: tuple[str, ...]
    unavailable: Callable[[], str | None]  # None when usable on this machine, else the reason
    takes: Callable[[tuple], str | None]   # None when it runs this spec correctly, else why not
    prefer: Callable[[tuple], bool]        # whether "auto" should pick it for this spec


@dataclass(frozen=True)
class Op:
    spec: type                      # a NamedTuple: device type, dtypes, shape class
    describe: Callable[..., tuple]  # the op's (checked) arguments -> its spec
    check: Callable                 # check(fn, spec, device): raises when fn disagrees with reference
    examples: Callable              # examples(device_type, dtype) -> the specs a selftest checks


_REGISTRY: dict[str, dict[str, Impl]] = {}
_OPS: dict[str, Op] = {}
_warned: set[tuple] = set()


def define(op: str, spec: type, describe: Callable[..., tuple], check: Callable,
           examples: Callable) -> None:
    """Declare ``op``: how a call is described, how a backend of it is checked, on what."""
    _OPS[op] = Op(spec, describe, check, examples)


def register(op: str, backend: str, fn: Callable, devices: tuple[str, ...],
             unavailable: Callable[[], str | None] = _here,
             takes: Callable[[tuple], str | None] = _anything,
             prefer: Callable[[tuple], bool] = _always) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    _REGISTRY.setdefault(op, {})[backend] = Impl(fn, devices, unavailable, takes, prefer)
    _CHOICES.clear()


def _validate(name: str, source: str) -> str:
    if name not in BACKENDS + ("auto",):
        raise ValueError(f"{source} must be one of {('auto',) + BACKENDS}, got {name!r}")
    return name


_current = _validate(os.environ.get("USFMAE_BACKEND", "auto"), "USFMAE_BACKEND")


def set_backend(name: str) -> None:
    """Choose the backend for every op ("auto" = fastest usable and checked per call)."""
    global _current
    _current = _validate(name, "backend")
    _CHOICES.clear()


def get_backend() -> str:
    return _current


@contextlib.contextmanager
def use_backend(name: str):
    """Run the block with backend ``name``, then restore the previous setting (so that a
    library call, e.g. a training run, does not change the process-wide choice)."""
    previous = _current
    set_backend(name)
    try:
        yield
    finally:
        set_backend(previous)


def _warn_once(key: tuple, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warnings.warn(message, stacklevel=4)


def _order(device_type: str) -> tuple[str, ...]:
    order = AUTO_ORDER.get(device_type, ("torch",))
    if _current == "auto":
        return order
    return (_current,) + (order[order.index(_current) + 1:] if _current in order else ("torch",))


def plan(op: str, spec, checked: Callable[[str, str, tuple], bool | None]) -> str:
    """The backend that runs ``spec``. "auto": the first in ``AUTO_ORDER`` that runs here, takes
    and prefers the spec and passed its check. A named backend runs whatever it is given (its
    own errors name what it cannot take) unless its check failed; then the ones after it in
    ``AUTO_ORDER`` are tried the same way. ``checked(op, backend, spec)`` says whether a
    backend passed (True), failed (False) or is not checked (None); it may run the check."""
    impls = _REGISTRY[op]
    for name in _order(spec[0]):
        impl = impls.get(name)
        if name == "torch":
            return name
        if impl is None or spec[0] not in impl.devices or impl.unavailable() is not None:
            continue
        if name == _current and impl.takes(spec) is not None:
            return name
        if name != _current and (impl.takes(spec) is not None or not impl.prefer(spec)):
            continue
        if checked(op, name, spec) is not False:
            return name
    return "torch"


def resolve(op: str, *args) -> tuple[str, Callable]:
    """The (backend name, function) that runs ``op`` on these (already checked) arguments."""
    spec = _OPS[op].describe(*args)
    if torch.compiler.is_compiling():  # traced once; the verdicts become constants of the graph
        return _choose(op, spec, args[0].device)
    key = (op, _current, spec, args[0].get_device(), _trust_enabled())
    choice = _CHOICES.get(key)
    if choice is None:
        choice = _CHOICES[key] = _choose(op, spec, args[0].device)
    return choice


def _choose(op: str, spec, device) -> tuple[str, Callable]:
    if _current != "auto":  # a named backend's errors; a cached choice passed them already
        _check_named(op, spec)
    name = plan(op, spec, functools.partial(_trusted, device=device))
    return name, _REGISTRY[op][name].fn


# Set by _trust (which imports this module): _trusted(op, backend, spec, device) -> bool | None.
_trusted: Callable
_trust_enabled: Callable[[], bool]
# The choice per (op, backend setting, spec, device index, checks on): plan() costs tens of
# microseconds a call, a dict lookup one. Cleared whenever a setting or a verdict changes.
_CHOICES: dict[tuple, tuple[str, Callable]] = {}


def why_not(op: str, *args) -> str | None:
    """Why the backend set for ``op`` would not take these arguments (None: it would, or it is
    "auto", which only picks backends that take them)."""
    impl = _REGISTRY[op].get(_current)
    if _current == "auto" or impl is None:
        return None
    return impl.takes(_OPS[op].describe(*args))


def _check_named(op: str, spec) -> None:
    impl = _REGISTRY[op].get(_current)
    if impl is None:
        _warn_once((op, _current), f"backend {_current!r} has no {op} yet; using 'torch' for it")
        return
    if spec[0] not in impl.devices:
        raise ValueError(f"backend {_current!r} runs {op} on {'/'.join(impl.devices)} tensors, "
                         f"got tensors on {spec[0]}")
    reason = impl.unavailable()
    if reason is not None:
        raise RuntimeError(f"backend {_current!r} cannot run {op}: {reason}")


def usable(op: str, device_type: str) -> list[str]:
    """The backends of ``op`` that run on ``device_type`` tensors on this machine."""
    return [name for name, impl in _REGISTRY[op].items()
            if device_type in impl.devices and impl.unavailable() is None]


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
