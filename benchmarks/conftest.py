"""Benchmark helpers: device-synchronised calls and provenance recorded in every JSON result."""
import platform
import subprocess

import pytest
import torch


def synchronised(fn, device: str):
    """Wrap ``fn`` so each timed call waits for the device to finish its work."""
    if device != "cuda":
        return fn

    def call():
        out = fn()
        torch.cuda.synchronize()
        return out
    return call


def pytest_benchmark_update_machine_info(config, machine_info):
    commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True).stdout
    machine_info.update(
        torch=torch.__version__, torch_cuda=torch.version.cuda, git_commit=commit.strip(),
        device=torch.cuda.get_device_name() if torch.cuda.is_available() else platform.processor()
        or "cpu", cpu_threads=torch.get_num_threads())


@pytest.fixture
def backend():
    from usfmae_fast import ops
    previous = ops.get_backend()
    yield ops.set_backend
    ops.set_backend(previous)
