"""Builds usfmae_fast._C from csrc/: C++ CPU sources always, CUDA sources when nvcc and a CUDA
build of torch are present. USFMAE_FORCE_CUDA=1 / USFMAE_SKIP_CUDA=1 override the detection.
Build without isolation so the installed torch is used: pip install -e . --no-build-isolation
"""
import glob
import os
import sys

import torch
from setuptools import setup
from torch.utils import cpp_extension

ROOT = os.path.dirname(os.path.abspath(__file__))


def _flag(name: str) -> bool:
    return os.environ.get(name, "0").lower() in ("1", "true", "yes", "on")


def _want_cuda() -> bool:
    if _flag("USFMAE_SKIP_CUDA"):
        return False
    if _flag("USFMAE_FORCE_CUDA"):
        return True
    home = cpp_extension.CUDA_HOME
    return (torch.version.cuda is not None and home is not None
            and os.path.exists(os.path.join(home, "bin", "nvcc")))


def _sources(pattern: str) -> list:
    return sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, pattern)))


def extension():
    sources = _sources("csrc/*.cpp") + _sources("csrc/cpu/*.cpp")
    cxx = ["-O3", "-fopenmp"]
    if not _want_cuda():
        print("usfmae_fast: building the C++ CPU ops only", file=sys.stderr)
        return cpp_extension.CppExtension("usfmae_fast._C", sources, extra_compile_args={"cxx": cxx},
                                          extra_link_args=["-fopenmp"])
    # Hopper (sm_90) SASS plus sm_80 SASS and PTX so the library also runs on Ampere and newer.
    os.environ.setdefault("TORCH_CUDA_ARCH_LIST", "8.0+PTX;9.0")
    print(f"usfmae_fast: building C++ CPU + CUDA ops with {cpp_extension.CUDA_HOME} for "
          f"{os.environ['TORCH_CUDA_ARCH_LIST']}", file=sys.stderr)
    nvcc = ["-O3", "-lineinfo"]
    return cpp_extension.CUDAExtension("usfmae_fast._C", sources + _sources("csrc/cuda/*.cu"),
                                       extra_compile_args={"cxx": cxx, "nvcc": nvcc},
                                       extra_link_args=["-fopenmp"])


setup(
    ext_modules=[extension()],
    cmdclass={"build_ext": cpp_extension.BuildExtension.with_options(use_ninja=True)},
)
