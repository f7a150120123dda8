"""Every autotune config of every Triton kernel, as its launcher calls it, compiles for sm_90
(H100/H200) without a GPU, fits the shared memory its prune estimated and the device has, and
(fp16/bf16) does not spill; and the prunes keep a config that fits for every supported input.

The kernels compile in subprocesses (this file run as a script) without ``TRITON_INTERPRET``: a
stand-in driver reports the sm_90 target, the launchers run on meta tensors, and every compile
request they make is compiled with ``triton.compile`` instead of launched. Registers and stack
(spill) bytes come from ``cuobjdump --dump-resource-usage`` on the cubin.
"""
from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import torch

from usfmae_fast.ops.triton import _utils

pytestmark = pytest.mark.skipif(not _utils.IMPORTED, reason="triton is not installed")

# Head dims pad to BLOCK_D = 16 ... 256; 72 pads to 128 and has strides that are multiples of
# 8, not 16 (Triton cannot see that alone). The ops pad rows that are not 16-byte aligned.
HEAD_DIMS = (32, 64, 72, 128, 256)
# Sequence lengths where each head dim runs its fused backward for each tile (50, 100: N <= 64,
# 128) and its split backward (197, 300); 197 also has every forward tile.
SEQ_LENS = {32: (50, 100, 197, 300), 64: (50, 100, 197)}
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
TUNERS = {  # name -> (module, attribute)
    "attention fwd": ("attention", "_fwd"),
    "attention bwd fused": ("attention", "_bwd_fused"),
    "attention bwd dkdv": ("attention", "_bwd_dkdv"),
    "attention bwd dq": ("attention", "_bwd_dq"),
    "masking fwd": ("random_masking", "_random_masking_kernel"),
    "masking bwd": ("random_masking", "_random_masking_backward_kernel"),
    "mae_loss": ("mae_loss", "_mae_loss_kernel"),
}


def _tuners() -> dict:
    import importlib
    return {name: getattr(importlib.import_module(f"usfmae_fast.ops.triton.{module}"), attr)
            for name, (module, attr) in TUNERS.items()}


def _config_name(config) -> str:
    tiles = ",".join(f"{k}={v}" for k, v in config.kwargs.items())
    return f"{tiles} w{config.num_warps} s{config.num_stages}"


# ----------------------------------------------------------------------------------------------
# The compiling side (a subprocess without TRITON_INTERPRET)

def _launches():
    """Every launcher on meta tensors, over the dtypes, head dims and lengths above."""
    from usfmae_fast.ops.triton import attention, mae_loss, random_masking

    def meta(*shape, dtype=torch.float32):
        return torch.empty(*shape, device="meta", dtype=dtype)

    def attend(q):
        lse = attention.attention_forward(q, q, q, 0.125, q)
        attention.attention_backward(q, q, q, q, q, lse, 0.125, q, q, q)

    def mask(x):
        random_masking.random_masking_forward(x, meta(2, 196), None, 49)
        random_masking.random_masking_forward(x, None, meta((), dtype=torch.int64), 49)
        random_masking.random_masking_backward(x[:, :49], meta(2, 196, dtype=torch.int64))

    def loss(dtype, compute_dtype=torch.float32):
        mae_loss.mae_loss_forward(meta(2, 3, 224, 224, dtype=dtype), meta(2, 196, 768, dtype=dtype),
                                  meta(2, 196, dtype=dtype), 16, True, True, compute_dtype)

    for dtype in DTYPES:
        for d in HEAD_DIMS:
            for n in SEQ_LENS.get(d, (50, 197)):
                yield lambda: attend(meta(2, 3, n, d, dtype=dtype))
        yield lambda: mask(meta(2, 196, 768, dtype=dtype))
        yield lambda: loss(dtype)
    yield lambda: mask(meta(2, 196, 768, dtype=torch.float64))
    yield lambda: loss(torch.float64, torch.float64)


def _compile_requests() -> list[dict]:
    """Runs the launchers with a stand-in sm_90 driver; returns one entry per distinct kernel
    compile they ask for: the tuner, config, its footprint, and what triton.compile needs."""
    import triton
    from triton import knobs
    from triton.backends.compiler import GPUTarget

    target = GPUTarget("cuda", 90, 32)

    class Sm90Driver:  # what JITFunction.run and Autotuner ask of the active driver
        def get_current_target(self):
            return target

        def get_current_device(self):
            return 0

        def get_current_stream(self, device=None):
            return 0

        def get_benchmarker(self):
            return lambda kernel_call, quantiles=None, **_: (kernel_call(), [1.0] * 3)[1]

    triton.runtime.driver.set_active(Sm90Driver())
    pruned: dict = {}  # the config list the tuner being run kept last, with footprints
    requests: dict = {}

    def record_prune(name, tuner, prune):
        def wrapper(configs, named_args, **kwargs):
            kept = prune(configs, named_args, **kwargs)
            args = {**named_args, **kwargs}
            pruned.update(name=name, limit=_utils.shared_memory_limit(args),
                          kept=[(c, tuner.footprint(c, args)) for c in kept],
                          fallback=not all(_utils.fits(c, args, tuner.footprint, tuner.max_words)
                                           for c in kept))
            return kept
        return wrapper

    for name, tuner in _tuners().items():
        tuner.early_config_prune = record_prune(name, tuner, tuner.early_config_prune)

    def hook(*, key, fn, compile, **_):
        key = str(key)
        if key not in requests:
            constants = {fn.jit_function.arg_names[path[0]]: value
                         for path, value in compile["constants"].items()}
            options = {k: compile[k] for k in ("num_warps", "num_stages", "num_ctas")}
            config, size = next((c, s) for c, s in pruned["kept"]
                                if c.num_warps == options["num_warps"]
                                and c.num_stages == options["num_stages"]
                                and all(constants.get(k) == v for k, v in c.kwargs.items()))
            dtype = next(t for t in compile["signature"].values() if t.startswith("*"))[1:]
            tiles = {k: v for k, v in constants.items()
                     if k.startswith("BLOCK") or k in ("D_QK", "HAS_NOISE", "NORM")}
            requests[key] = dict(
                tuner=pruned["name"], config=_config_name(config), dtype=dtype,
                tiles=",".join(f"{k}={v}" for k, v in tiles.items()), limit=pruned["limit"],
                estimate=size.shared, words=size.words, fallback=pruned["fallback"],
                compile=(fn.jit_function, compile["signature"], compile["constants"],
                         compile["configs"][0], options))
        return True  # compiled by _compile below, never launched
    knobs.runtime.jit_cache_hook = hook
    for launch in _launches():
        for tuner in _tuners().values():
            tuner.cache.clear()  # every launch prunes: each compile request follows its prune
        launch()
    return list(requests.values())


def _resource_usage(cubin: bytes) -> tuple[int, int]:
    """(registers, stack bytes) per thread of the one kernel in ``cubin``."""
    from triton import knobs
    with tempfile.NamedTemporaryFile(suffix=".cubin") as file:
        file.write(cubin)
        file.flush()
        out = subprocess.run([knobs.nvidia.cuobjdump.path, "--dump-resource-usage", file.name],
                             capture_output=True, text=True, check=True).stdout
    registers, stack = re.search(r"REG:(\d+) STACK:(\d+)", out).groups()
    return int(registers), int(stack)


def _compile(request: dict) -> dict:
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    fn, signature, constants, attrs, options = request.pop("compile")
    start = time.perf_counter()
    kernel = triton.compile(ASTSource(fn, signature, constants, attrs),
                            target=GPUTarget("cuda", 90, 32), options=options)
    registers, stack = _resource_usage(kernel.asm["cubin"])
    return dict(request, shared=kernel.metadata.shared, registers=registers, stack=stack,
                seconds=round(time.perf_counter() - start, 2))


def _worker(shard: int, shards: int) -> None:
    for i, request in enumerate(_compile_requests()):
        if i % shards == shard:
            print(json.dumps(_compile(request)), flush=True)


# ----------------------------------------------------------------------------------------------
# The testing side

def _missing_tools() -> str | None:
    """Why the NVIDIA tools the test needs (Triton's ptxas and cuobjdump) are missing, if they are."""
    from triton import knobs
    for tool in ("ptxas", "cuobjdump"):
        try:
            path = getattr(knobs.nvidia, tool).path
        except Exception as exc:  # noqa: BLE001 - a triton without the NVIDIA backend
            return f"triton has no {tool} ({exc})"
        if not path or not os.access(path, os.X_OK):
            return f"triton's {tool} is missing ({path})"
    return None


@pytest.fixture(scope="module")
def compiled(tmp_path_factory) -> list[dict]:
    """One row per distinct compile, from ``min(4, cores)`` worker processes."""
    if (missing := _missing_tools()) is not None:
        pytest.skip(missing)
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env[_utils.AUTOTUNE_ENV] = "all"
    shards = max(1, min(4, os.cpu_count() or 1))
    logs = tmp_path_factory.mktemp("aot")
    workers = []
    for i in range(shards):
        with open(logs / f"{i}.out", "w") as out, open(logs / f"{i}.err", "w") as err:
            workers.append(subprocess.Popen([sys.executable, __file__, str(i), str(shards)],
                                            env=env, stdout=out, stderr=err,
                                            cwd=Path(__file__).parent))
    rows = []
    for i, worker in enumerate(workers):
        assert worker.wait(timeout=1800) == 0, (logs / f"{i}.err").read_text()[-4000:]
        rows += [json.loads(line) for line in (logs / f"{i}.out").read_text().splitlines()]
    rows.sort(key=lambda r: (r["tuner"], r["dtype"], r["tiles"], r["config"]))
    print(f"\n{'kernel':20} {'dtype':5} {'tiles':48} {'config':28} {'smem':>7} {'est':>7} "
          f"{'words':>5} {'regs':>4} {'stack':>5} {'s':>5}")
    for r in rows:
        print(f"{r['tuner']:20} {r['dtype']:5} {r['tiles']:48} {r['config']:28} {r['shared']:7} "
              f"{r['estimate']:7} {r['words']:5.0f} {r['registers']:4} {r['stack']:5} "
              f"{r['seconds']:5.1f}")
    return rows


@pytest.mark.slow
def test_every_config_compiles_for_sm90_and_fits(compiled):
    for r in compiled:
        case = f"{r['tuner']} {r['dtype']} {r['tiles']} {r['config']}"
        assert not r["fallback"], f"{case}: no config fits, the prune fell back"
        assert r["shared"] <= r["limit"], f"{case}: {r['shared']} B of shared memory"
        assert r["shared"] <= r["estimate"], (
            f"{case}: Triton allocates {r['shared']} B of shared memory, the prune estimated "
            f"{r['estimate']} B")


@pytest.mark.slow
def test_fp16_bf16_configs_do_not_spill(compiled):
    spilling = [f"{r['tuner']} {r['dtype']} {r['tiles']} {r['config']}: {r['stack']} B stack, "
                f"{r['registers']} registers, {r['words']:.0f} words"
                for r in compiled if r["dtype"] in ("fp16", "bf16", "i16") and r["stack"]]
    assert not spilling, "\n".join(spilling)


@pytest.mark.slow
def test_every_config_is_compiled_somewhere(compiled):
    """No config is dead weight: each one is kept for some dtype and head dim."""
    used = {(r["tuner"], r["config"]) for r in compiled}
    for name, tuner in _tuners().items():
        for config in tuner.configs:
            assert (name, _config_name(config)) in used, f"{name}: {config} is never kept"


def _attention_args(dtype, d: int, n: int) -> list[tuple[str, dict]]:
    """(tuner, arguments its prune sees) of each kernel the attention op runs for a contiguous
    ``[1, 1, n, d]`` q, k and v (padded to 16-byte rows as the op pads them)."""
    from usfmae_fast.ops.triton import attention
    q, k, v = attention._aligned(*(torch.empty(1, 1, n, d, device="meta", dtype=dtype),) * 3)
    sizes = dict(attention._sizes(q, k, v), Q=q)
    backward = ([("attention bwd fused", dict(sizes, BLOCK_N=sizes["KV_BUCKET"]))]
                if attention._fuse_backward(sizes, q) else
                [("attention bwd dkdv", sizes), ("attention bwd dq", sizes)])
    return [("attention fwd", sizes)] + backward


@pytest.mark.parametrize("dtype", DTYPES)
def test_prune_keeps_a_fitting_config_for_every_input(monkeypatch, dtype):
    """Every head dim 1..256 and sequence bucket: at least one config is kept, every kept one
    fits shared memory and its register budget (the prune did not have to fall back)."""
    monkeypatch.setenv(_utils.AUTOTUNE_ENV, "all")
    tuners = _tuners()
    for d in range(1, 257):
        for n in (1, 64, 65, 128, 129, 256, 257, 512, 1024, 4096):
            for name, args in _attention_args(dtype, d, n):
                tuner = tuners[name]
                kept = tuner.early_config_prune(tuner.configs, args)
                assert kept, f"{name} d={d} n={n} {dtype}: nothing kept"
                assert all(_utils.fits(c, args, tuner.footprint, tuner.max_words) for c in kept), (
                    f"{name} d={d} n={n} {dtype}: fell back to {kept}")


def test_first_mode_keeps_one_config(monkeypatch):
    tuner = _tuners()["attention fwd"]
    args = _attention_args(torch.float16, 64, 197)[0][1]
    monkeypatch.setenv(_utils.AUTOTUNE_ENV, "all")
    every = tuner.early_config_prune(tuner.configs, args)
    monkeypatch.setenv(_utils.AUTOTUNE_ENV, "first")
    assert len(every) > 1 and tuner.early_config_prune(tuner.configs, args) == every[:1]
    monkeypatch.setenv(_utils.AUTOTUNE_ENV, "best")
    with pytest.raises(ValueError, match=_utils.AUTOTUNE_ENV):
        tuner.early_config_prune(tuner.configs, args)


def test_a_smaller_device_gets_smaller_tiles(monkeypatch):
    """The limit comes from the device: on a GPU with 99 KB (sm_86) fewer configs fit."""
    tuner = _tuners()["attention bwd dq"]
    args = _attention_args(torch.float16, 128, 1024)[2][1]
    monkeypatch.setenv(_utils.AUTOTUNE_ENV, "all")
    on_sm90 = tuner.early_config_prune(tuner.configs, args)
    monkeypatch.setattr(_utils, "shared_memory_limit", lambda args: 101376)
    on_sm86 = tuner.early_config_prune(tuner.configs, args)
    assert on_sm86 and set(on_sm86) < set(on_sm90)
    assert all(tuner.footprint(c, args).shared * _utils.SHARED_MEMORY_MARGIN <= 101376
               for c in on_sm86)


if __name__ == "__main__":
    _worker(int(sys.argv[1]), int(sys.argv[2]))
