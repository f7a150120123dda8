"""Where the Triton kernels can run, and helpers shared by their launchers.

On a CUDA machine the kernels run on CUDA tensors. With ``TRITON_INTERPRET=1`` in the
environment *before* usfmae_fast is imported, Triton's interpreter runs them on CPU tensors
instead (slow; for tests). The interpreter has no bfloat16 (``tl.dot`` returns garbage without
an error), so bf16 inputs are refused there with a clear error.

Autotuning: every kernel's configs are pruned per tuning key by what they need on the device
(see :func:`autotune`); ``USFMAE_TRITON_AUTOTUNE=first`` (the default under the interpreter)
then runs only the first config left, ``all`` (the default on a GPU) benchmarks all of them.
"""
from __future__ import annotations

import functools
import os
from typing import Callable, NamedTuple

import torch

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
DEVICES: tuple[str, ...] = ("cpu",) if INTERPRET else ("cuda",)

try:
    import triton
    _IMPORT_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - triton ships with every CUDA torch wheel
    _IMPORT_ERROR = f"triton is not installed ({exc})"
IMPORTED = _IMPORT_ERROR is None  # the kernel modules import triton at module level

AUTOTUNE_ENV = "USFMAE_TRITON_AUTOTUNE"
# Shared memory one block may use on sm_90 (H100/H200): the limit when no CUDA device is there
# to ask (ahead-of-time compiles, the interpreter).
SM90_SHARED_MEMORY = 232448
# Estimates may be short of what another Triton version allocates: a config's estimate must stay
# this far under the limit.
SHARED_MEMORY_MARGIN = 1.1
REGISTERS_PER_SM = 65536
MAX_REGISTERS_PER_THREAD = 255


def unavailable() -> str | None:
    """None when the Triton kernels can run here, otherwise why not."""
    if _IMPORT_ERROR is not None:
        return _IMPORT_ERROR
    if not INTERPRET and not torch.cuda.is_available():
        return "no CUDA device (set TRITON_INTERPRET=1 to run the kernels on CPU, slowly)"
    return None


def register(op: str, fn, takes=None, prefer=None) -> None:
    """Register ``fn`` as the "triton" backend of ``op`` (``takes`` / ``prefer``: see _backend)."""
    from .. import _backend
    extra = {k: v for k, v in (("takes", takes), ("prefer", prefer)) if v is not None}
    _backend.register(op, "triton", fn, DEVICES, unavailable, **extra)


DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def dtype_refusal(dtype: torch.dtype, allowed=DTYPES) -> str | None:
    """Why the Triton kernels cannot take ``dtype`` here (None when they can)."""
    if dtype not in allowed:
        return f"the triton backend takes {', '.join(map(str, allowed))}, got {dtype}"
    if INTERPRET and dtype == torch.bfloat16:
        return ("the Triton interpreter (TRITON_INTERPRET=1) has no bfloat16; use "
                "float32/float16 on CPU or run on a CUDA device")
    return None


def check_dtype(name: str, tensor: torch.Tensor, allowed=DTYPES) -> None:
    """Raise a TypeError naming ``name`` when the Triton kernels cannot take its dtype."""
    reason = dtype_refusal(tensor.dtype, allowed)
    if reason is not None:
        raise TypeError(f"{name}: {reason}")


def on_input_device(launcher: Callable) -> Callable:
    """Run ``launcher`` with the CUDA device of its first argument (a tensor) current, so that
    Triton launches on that device and its current stream (tensors on ``cuda:1`` while device 0
    is current would fault otherwise). Nothing changes for CPU (interpreter) or meta tensors."""
    @functools.wraps(launcher)
    def launch(tensor: torch.Tensor, *args, **kwargs):
        if tensor.device.type != "cuda":
            return launcher(tensor, *args, **kwargs)
        with torch.cuda.device(tensor.device):
            return launcher(tensor, *args, **kwargs)
    return launch


class Footprint(NamedTuple):
    """What one config of a kernel needs for given arguments, estimated from its tiles."""
    shared: int    # bytes of shared memory (an upper bound of what Triton allocates)
    words: float   # 32-bit words of live tiles per thread (0: not modelled)


def autotune_all() -> bool:
    """Whether autotuning benchmarks every config that fits (else only the first one runs)."""
    mode = os.environ.get(AUTOTUNE_ENV, "first" if INTERPRET else "all")
    if mode not in ("first", "all"):
        raise ValueError(f"{AUTOTUNE_ENV} must be 'first' or 'all', got {mode!r}")
    return mode == "all"


@functools.cache
def _device_shared_memory(index: int) -> int:
    return triton.runtime.driver.active.utils.get_device_properties(index)["max_shared_mem"]


def shared_memory_limit(args: dict) -> int:
    """Bytes of shared memory a block may use on the CUDA device of the tensors in ``args``;
    sm_90's when there is none (compiling ahead of time, or the interpreter)."""
    for value in args.values():
        device = getattr(value, "device", None)
        if isinstance(device, torch.device) and device.type == "cuda":
            return _device_shared_memory(device.index)
    return SM90_SHARED_MEMORY


def word_budget(max_words: float, num_warps: int) -> float:
    """``max_words`` is what a kernel holds without spilling at 255 registers a thread; a block
    of ``num_warps`` warps gets fewer registers per thread beyond 8 warps (65536 per SM)."""
    registers = min(MAX_REGISTERS_PER_THREAD, REGISTERS_PER_SM // (32 * num_warps))
    return max_words * registers / MAX_REGISTERS_PER_THREAD


def fits(config, args: dict, footprint: Callable, max_words: float) -> bool:
    """Whether ``config`` applies to ``args`` (``footprint(config, args)`` is its
    :class:`Footprint`, None when it does not apply) and fits the device: its estimated shared
    memory with the margin, its words within the budget for its warps."""
    size = footprint(config, args)
    return (size is not None and size.shared * SHARED_MEMORY_MARGIN <= shared_memory_limit(args)
            and size.words <= word_budget(max_words, config.num_warps))


def any_fits(tuner, args: dict) -> bool:
    """Whether a config of ``tuner`` (made by :func:`autotune`) fits ``args``."""
    return any(fits(config, args, tuner.footprint, tuner.max_words) for config in tuner.configs)


def fitting(configs: list, args: dict, footprint: Callable, max_words: float) -> list:
    """The ``configs`` (in order) that :func:`fits` keeps. When none fits, the applicable one of
    smallest shared memory, so that a launch always has a config (it may then spill, or fail to
    launch with Triton's own error)."""
    kept = [config for config in configs if fits(config, args, footprint, max_words)]
    if not kept:
        sized = [(size.shared, i) for i, config in enumerate(configs)
                 if (size := footprint(config, args)) is not None]
        kept = [configs[min(sized)[1]]] if sized else []
    return kept


def autotune(configs: list, key: list[str], footprint: Callable, max_words: float = float("inf")):
    """``triton.autotune`` over ``configs`` (best first) that, per tuning key, keeps the configs
    that :func:`fitting` keeps, then only the first of them unless :func:`autotune_all`.
    Triton's Autotuner does not prune a single config: there must be two at least."""
    if len(configs) < 2:
        raise ValueError("autotune needs at least two configs (Triton never prunes a single one)")

    def prune(configs, named_args, **kwargs):
        kept = fitting(configs, {**named_args, **kwargs}, footprint, max_words)
        return kept if autotune_all() else kept[:1]

    def decorate(fn):
        tuner = triton.autotune(configs, key=key,
                                prune_configs_by={"early_config_prune": prune})(fn)
        tuner.footprint, tuner.max_words = footprint, max_words  # for tests and reports
        return tuner
    return decorate
