"""Trust on first use: no compiled or Triton kernel touches a caller's tensors before it agreed
with ``reference.py`` on this device, in this process.

The first call of a backend for a new key (op, backend, device name and capability, and the
op's spec: dtypes and the shape class that picks a code path) runs the op's check
(``_kernel_checks``) on a small input, forward and backward, once; it costs milliseconds on a
GPU. A backend that fails is not used again for that key: the op falls back to the next backend
with one ``KernelCheckWarning`` naming the op, backend, device, dtype and the error.
``USFMAE_TRUST_CHECK=0`` turns the checks off (for benchmarks whose kernels were checked
already). ``selftest()`` runs every check this machine offers (``usfmae-fast selftest``).
"""
from __future__ import annotations

import functools
import os
import time
import warnings
from dataclasses import dataclass

import torch
from torch._subclasses.fake_tensor import unset_fake_temporarily

from . import _backend

ENV = "USFMAE_TRUST_CHECK"


class KernelCheckWarning(UserWarning):
    """A kernel disagreed with ops/reference.py (or failed to run) on its first use."""


@dataclass(frozen=True)
class Verdict:
    passed: bool
    error: str | None
    seconds: float


_VERDICTS: dict[tuple, Verdict] = {}


def _env_enabled() -> bool:
    return os.environ.get(ENV, "1").lower() not in ("0", "false", "no", "off")


_ENABLED = _env_enabled()  # read once, like USFMAE_BACKEND: every op call asks


def enabled() -> bool:
    return _ENABLED


def device_name(device: torch.device) -> str:
    if device.type != "cuda":
        return device.type
    return _cuda_name(torch.cuda.current_device() if device.index is None else device.index)


@functools.lru_cache(maxsize=None)
def _cuda_name(index: int) -> str:
    major, minor = torch.cuda.get_device_capability(index)
    return f"{torch.cuda.get_device_name(index)} (sm_{major}{minor})"


def _key(op: str, backend: str, spec: tuple, device: torch.device) -> tuple:
    return (op, backend, device_name(device), spec)


def _check(op: str, backend: str, spec: tuple, device: torch.device) -> Verdict:
    """Runs the check outside any fake-tensor tracing, autocast or inference mode."""
    fn = _backend._REGISTRY[op][backend].fn
    start = time.perf_counter()
    try:
        with unset_fake_temporarily(), torch.inference_mode(False), torch.enable_grad(), \
                torch.autocast(device.type, enabled=False):
            _backend._OPS[op].check(fn, spec, device)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
        return Verdict(True, None, time.perf_counter() - start)
    except Exception as exc:  # noqa: BLE001 - any failure (wrong numbers, launch error) distrusts it
        return Verdict(False, f"{type(exc).__name__}: {exc}".strip(), time.perf_counter() - start)


def verdict(op: str, backend: str, spec: tuple, device: torch.device, *,
            fresh: bool = False) -> Verdict:
    """The (cached) outcome of ``backend``'s check of ``op`` on ``spec``; warns when it fails."""
    key = _key(op, backend, spec, device)
    if fresh or key not in _VERDICTS:
        _VERDICTS[key] = result = _check(op, backend, spec, device)
        _backend._CHOICES.clear()
        if not result.passed:
            warnings.warn(
                f"usfmae_fast: the {backend!r} kernel of {op} failed its check against "
                f"ops/reference.py on {key[2]}, {_dtype_of(spec)} ({_shape_of(spec)}): "
                f"{result.error}; it is not used again in this process, {op} falls back to "
                "the next backend", KernelCheckWarning, stacklevel=2)
    return _VERDICTS[key]


@torch._dynamo.assume_constant_result
def _passed(op: str, backend: str, values: tuple, device_type: str, index) -> bool:
    # Under torch.compile this runs once, while tracing, and the graph keeps its answer (a
    # plain tuple crosses into it: dynamo does not rebuild NamedTuple constants).
    spec = _backend._OPS[op].spec(*values)
    return verdict(op, backend, spec, torch.device(device_type, index)).passed


def trusted(op: str, backend: str, spec: tuple, device: torch.device) -> bool | None:
    """Whether ``backend`` may run ``op`` on ``spec``: None for PyTorch itself and when checks
    are off, otherwise whether its check passed (running it the first time)."""
    if backend == "torch" or not enabled():
        return None
    return _passed(op, backend, tuple(spec), device.type, device.index)


_backend._trusted, _backend._trust_enabled = trusted, enabled


def _dtype_of(spec: tuple) -> str:
    return str(spec[1]).replace("torch.", "")


def _shape_of(spec: tuple) -> str:
    return spec.label


def verdicts() -> dict[tuple, Verdict]:
    """Every check run in this process: (op, backend, device, spec) -> Verdict."""
    return dict(_VERDICTS)


def reset() -> None:
    """Forget every verdict (tests; a process that changed its kernels)."""
    _VERDICTS.clear()
    _backend._CHOICES.clear()


def state(op: str, backend: str, spec: tuple, device: torch.device) -> str:
    """"passed", "failed" or "not checked" for this key in this process."""
    result = _VERDICTS.get(_key(op, backend, spec, device))
    return "not checked" if result is None else ("passed" if result.passed else "failed")


def auto_choices() -> list[dict]:
    """What "auto" (or the set backend) picks on each device here for the ops' example cases,
    and whether that backend was checked in this process; runs no check."""
    def known(op, backend, spec, device):
        passed = {"passed": True, "failed": False}
        return passed.get(state(op, backend, spec, device)) if enabled() else None

    rows = []
    for device in devices():
        for op in sorted(_backend._OPS):
            for dtype_name, dtype in DTYPES.items():
                for spec in _backend._OPS[op].examples(device.type, dtype):
                    name = _backend.plan(op, spec, lambda o, n, s: known(o, n, s, device))
                    checked = ("reference" if name == "torch" else
                               "checks off" if not enabled() else state(op, name, spec, device))
                    rows.append({"device": device_name(device), "op": op, "dtype": dtype_name,
                                 "case": spec.label, "backend": name, "checked": checked})
    return rows


def devices() -> list[torch.device]:
    found = [torch.device("cpu")]
    if torch.cuda.is_available():
        found.append(torch.device("cuda", torch.cuda.current_device()))
    return found


DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def selftest(ops=None, backends=None, dtypes=None) -> list[dict]:
    """Every check this machine offers (or those of the given op / backend / dtype names),
    freshly run: one row per (device, op, backend, dtype) with status "pass", "fail" or "n/a"
    (and why), the number of cases checked and the seconds taken."""
    rows = []
    for device in devices():
        for op in sorted(ops or _backend._OPS):
            for backend, impl in sorted(_backend._REGISTRY[op].items()):
                if backend == "torch" or (backends and backend not in backends):
                    continue
                for dtype in (DTYPES[d] for d in (dtypes or DTYPES)):
                    rows.append(_selftest_row(op, backend, impl, device, dtype))
    return rows


def _selftest_row(op, backend, impl, device, dtype) -> dict:
    row = {"device": device_name(device), "op": op, "backend": backend,
           "dtype": str(dtype).replace("torch.", ""), "status": "n/a", "detail": "", "checked": 0,
           "seconds": 0.0}
    if device.type not in impl.devices:
        row["detail"] = f"runs on {'/'.join(impl.devices)} tensors"
        return row
    reason = impl.unavailable()
    if reason is not None:
        row["detail"] = reason
        return row
    skipped, failures = [], []
    for spec in _backend._OPS[op].examples(device.type, dtype):
        why = impl.takes(spec)
        if why is not None:
            skipped.append(f"{_shape_of(spec)}: {why}")
            continue
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", KernelCheckWarning)
            result = verdict(op, backend, spec, device, fresh=True)
        row["checked"] += 1
        row["seconds"] += result.seconds
        if not result.passed:
            failures.append(f"{_shape_of(spec)}: {result.error}")
    if failures:
        row["status"], row["detail"] = "fail", "; ".join(failures)
    elif row["checked"]:
        row["status"] = "pass"
        row["detail"] = f"{row['checked']} cases" + (f"; not taken: {len(skipped)}" if skipped else "")
    else:
        row["detail"] = skipped[0].split(": ", 1)[1] if skipped else "no example cases"
    row["seconds"] = round(row["seconds"], 3)
    return row


def render(rows: list[dict]) -> str:
    """The selftest table: op x backend x dtype, one line each."""
    lines = [f"{'device':26s} {'op':17s} {'backend':7s} {'dtype':9s} {'status':6s} detail"]
    for r in rows:
        lines.append(f"{r['device'][:26]:26s} {r['op']:17s} {r['backend']:7s} {r['dtype']:9s} "
                     f"{r['status']:6s} {r['detail']}")
    failed = sum(r["status"] == "fail" for r in rows)
    passed = sum(r["status"] == "pass" for r in rows)
    lines.append(f"{passed} passed, {failed} failed, {len(rows) - passed - failed} not available")
    return "\n".join(lines)
