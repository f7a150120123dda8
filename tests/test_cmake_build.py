"""CMakeLists.txt builds the same operator library as setup.py, and it gives the same results."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent

CHECK = """
import torch
from usfmae_fast import ops
from usfmae_fast.ops import _ext, reference
assert _ext.LOADED and _ext.LOAD_MESSAGE.endswith("libusfmae_ops.so"), _ext.LOAD_MESSAGE
ops.set_backend("cpu")
x, noise = torch.randn(3, 197, 40, requires_grad=True), torch.rand(3, 197)
got, expected = ops.random_masking(x, 0.75, noise), reference.random_masking(x, 0.75, noise)
assert all(torch.equal(g, e) for g, e in zip(got, expected))
got[0].sum().backward()
assert torch.equal(x.grad, (got[1] == 0).float().unsqueeze(-1).expand_as(x))
print("cmake library ok")
"""


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("cmake") is None, reason="cmake is not installed")
def test_cmake_library_loads_and_matches_reference(tmp_path):
    env = dict(os.environ)
    cuda_home = env.setdefault("CUDA_HOME", "/usr/local/cuda")
    configure = ["cmake", "-S", str(ROOT), "-B", str(tmp_path),
                 f"-DCMAKE_PREFIX_PATH={torch.utils.cmake_prefix_path}"]
    if torch.version.cuda is not None:  # torch's CMake config insists on finding the toolkit
        configure.append(f"-DCUDA_TOOLKIT_ROOT_DIR={cuda_home}")
    subprocess.run(configure, env=env, check=True, capture_output=True)
    subprocess.run(["cmake", "--build", str(tmp_path), "-j", str(os.cpu_count() or 2)], env=env,
                   check=True, capture_output=True)
    library = tmp_path / "libusfmae_ops.so"
    assert library.exists()
    result = subprocess.run([sys.executable, "-c", CHECK], capture_output=True, text=True,
                            env=dict(env, USFMAE_EXT_PATH=str(library)))
    assert result.returncode == 0, result.stderr
    assert "cmake library ok" in result.stdout
