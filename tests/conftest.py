"""Shared fixtures: which backends can run here, fresh random generators, CUDA skip marker.

Without a CUDA device the Triton kernels are tested in Triton's interpreter on CPU tensors:
``TRITON_INTERPRET`` must be set before usfmae_fast (and its kernels) are imported.
"""
import os
from pathlib import Path

import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from usfmae_fast import ops  # noqa: E402
from usfmae_fast.ops import _ext  # noqa: E402
from usfmae_fast.ops.triton import _utils as _triton_utils  # noqa: E402


def pytest_configure(config):
    # A kernel that fails its first-use check against ops/reference.py fails the test that met
    # it. Here, not in pyproject.toml: resolving the class there imports usfmae_fast before
    # TRITON_INTERPRET is set above, and every Triton test would silently skip.
    config.addinivalue_line("filterwarnings", "error::usfmae_fast.ops.KernelCheckWarning")


def pytest_sessionstart(session):
    """Fail the whole run, rather than skip test after test, when what it relies on is missing:
    the compiled library when ``USFMAE_EXPECT_EXT=1`` (``make test`` sets it), and the Triton
    interpreter when TRITON_INTERPRET=1 came too late for the kernels' module to see it."""
    problems = []
    if os.environ.get("USFMAE_EXPECT_EXT") == "1" and not _ext.LOADED:
        problems.append("USFMAE_EXPECT_EXT=1 but the compiled library usfmae_fast._C did not "
                        f"load: {_ext.LOAD_MESSAGE}")
    if (os.environ.get("TRITON_INTERPRET") == "1" and _triton_utils.IMPORTED
            and not _triton_utils.INTERPRET):
        problems.append("usfmae_fast was imported before tests/conftest.py set TRITON_INTERPRET=1 "
                        "(by a plugin or a pytest option naming it?): every Triton test would "
                        "be dropped")
    if problems:
        pytest.exit("\n".join(problems), returncode=pytest.ExitCode.TESTS_FAILED)


ROOT = Path(__file__).resolve().parents[1]  # the checkout
requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
requires_ext = pytest.mark.skipif(not _ext.LOADED, reason=f"extension missing: {_ext.LOAD_MESSAGE}")


def usable_backends(op: str, device: str = "cpu") -> list[str]:
    """Backends of ``op`` that run on ``device`` here, in ``ops.BACKENDS`` order (never empty:
    "torch" always runs)."""
    return sorted(ops.usable_backends(op, device), key=ops.BACKENDS.index)


@pytest.fixture
def backend():
    """Yields a setter for the global backend and restores the previous choice afterwards."""
    with ops.use_backend(ops.get_backend()):
        yield ops.set_backend


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models on a busy 2-core machine: a second thread mostly adds synchronisation (up
    to 10x slower). Modules opt in with ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
