"""Benchmark helpers: device-synchronised timing, the machine's ceilings measured in the same run,
derived TB/s / TFLOP/s beside them, and provenance recorded in every JSON result.

Each timed round runs the workload ``calls`` times and then waits for the device, so short GPU
kernels are not dominated by the synchronisation; ``extra_info`` holds per-call figures.
"""
from __future__ import annotations

import platform
import statistics
import time
from pathlib import Path

import pytest
import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CALLS = {"cpu": 1, "cuda": 20}
DTYPES = {"cpu": torch.float32, "cuda": torch.bfloat16}


def usable_backends(op: str, device: str) -> list[str]:
    """Registered backends of ``op`` that run on ``device`` here ("triton" only on a GPU: the
    interpreter's timings say nothing)."""
    from usfmae_fast import ops
    return [name for name in sorted(ops.usable_backends(op, device), key=ops.BACKENDS.index)
            if not (name == "triton" and device == "cpu")]


def synchronised(fn, device: str, calls: int = 1):
    """``fn`` run ``calls`` times, then a wait for the device to finish the work."""
    def call():
        for _ in range(calls):
            out = fn()
        if device == "cuda":
            torch.cuda.synchronize()
        return out
    return call


def _median_seconds(fn, device: str, reps: int = 10) -> float:
    fn()
    times = []
    for _ in range(reps):
        if device == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def measure_ceilings(device: str) -> dict:
    """Bandwidth of a large device copy and throughput of a large GEMM (bf16 on CUDA, fp32 on
    CPU), measured now, on this machine, in this run."""
    numel = (1 << 28) if device == "cuda" else (1 << 25)  # 1 GiB / 128 MiB of fp32
    src = torch.empty(numel, device=device)
    dst = torch.empty_like(src)
    copy_s = _median_seconds(lambda: dst.copy_(src), device)
    size, dtype = (8192, torch.bfloat16) if device == "cuda" else (2048, torch.float32)
    a = torch.randn(size, size, device=device, dtype=dtype)
    b = torch.randn(size, size, device=device, dtype=dtype)
    gemm_s = _median_seconds(lambda: a @ b, device)
    return {"copy_bytes_per_s": 2 * src.numel() * src.element_size() / copy_s,
            "gemm_flops_per_s": 2 * size ** 3 / gemm_s,
            "gemm_dtype": str(dtype).removeprefix("torch."), "gemm_size": size}


@pytest.fixture(scope="session")
def ceilings():
    cache: dict[str, dict] = {}

    def get(device: str) -> dict:
        if device not in cache:
            cache[device] = measure_ceilings(device)
        return cache[device]
    return get


@pytest.fixture
def timed(benchmark, ceilings):
    """``timed(fn, device, bytes_moved=..., flops=..., **info)``: warm up, benchmark ``fn``
    device-synchronised, and record per-call time, TB/s or TFLOP/s and the share of the
    ceiling measured in this run; returns ``fn``'s result. Workloads that take minutes fix
    ``rounds`` (and ``calls``, default ``CALLS[device]``) and may skip the warm-up."""
    def run(fn, device: str, *, bytes_moved: float | None = None, flops: float | None = None,
            rounds: int | None = None, calls: int | None = None, warmup: bool = True, **info):
        if warmup:
            fn()  # compile / autotune / allocate outside the timing
        calls = calls or CALLS[device]
        timer = synchronised(fn, device, calls)
        result = (benchmark(timer) if rounds is None
                  else benchmark.pedantic(timer, rounds=rounds, iterations=1))
        per_call = benchmark.stats.stats.median / calls
        limits = ceilings(device)
        extra = dict(info, device=device, calls_per_round=calls, median_s_per_call=per_call,
                     ceiling_copy_tb_s=limits["copy_bytes_per_s"] / 1e12,
                     ceiling_gemm_tflop_s=limits["gemm_flops_per_s"] / 1e12,
                     ceiling_gemm_dtype=limits["gemm_dtype"])
        if bytes_moved is not None:
            extra.update(tb_s=bytes_moved / per_call / 1e12,
                         frac_of_copy=bytes_moved / per_call / limits["copy_bytes_per_s"])
        if flops is not None:
            extra.update(tflop_s=flops / per_call / 1e12,
                         frac_of_gemm=flops / per_call / limits["gemm_flops_per_s"])
        benchmark.extra_info.update(extra)
        return result
    return run


def pytest_benchmark_update_machine_info(config, machine_info):
    from usfmae_fast.bench import git_commit
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    machine_info.update(
        torch=torch.__version__, torch_cuda=torch.version.cuda, triton=triton_version,
        git_commit=git_commit(Path(__file__).resolve().parent.parent) or "",
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
        or "cpu", cpu_threads=torch.get_num_threads())


@pytest.fixture
def backend():
    from usfmae_fast import ops
    with ops.use_backend(ops.get_backend()):  # restores the setting afterwards
        yield ops.set_backend
