"""Shared fixtures: which backends can run here, fresh random generators, CUDA skip marker."""
import pytest
import torch

from usfmae_fast import ops
from usfmae_fast.ops import _ext

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_ext = pytest.mark.skipif(not _ext.LOADED, reason=f"extension missing: {_ext.LOAD_MESSAGE}")


def usable_backends(op: str, device: str = "cpu") -> list[str]:
    """Backends of ``op`` that run on ``device`` here (never an empty list: "torch" always runs)."""
    return [name for name, state in ops.backend_status()[op].items()
            if state.startswith("ok") and device in state]


@pytest.fixture
def backend():
    """Yields a setter for the global backend and restores the previous choice afterwards."""
    previous = ops.get_backend()
    yield ops.set_backend
    ops.set_backend(previous)
