"""random_masking forward and forward + backward: eager reference, torch.compile of it, and every
compiled / Triton backend, side by side in one run (bf16 on CUDA, fp32 on CPU).

    .venv/bin/python -m pytest benchmarks/bench_random_masking.py --benchmark-json=out.json
"""
import pytest
import torch

from conftest import DEVICES, DTYPES, usable_backends
from usfmae_fast import ops
from usfmae_fast.ops import reference

# ViT-B/16 MAE encoder input (196 patches of width 768), batch 256 on a GPU, 16 on CPU.
SHAPES = {"cpu": (16, 196, 768), "cuda": (256, 196, 768)}
RATIO = 0.75
_compiled = torch.compile(reference.random_masking)


def _cases():
    for device in DEVICES:
        # the "torch" backend *is* the eager reference
        names = ["eager", "compile"] + [b for b in usable_backends("random_masking", device)
                                        if b != "torch"]
        for name in names:
            for passes in ("fwd", "fwd+bwd"):
                yield pytest.param(device, name, passes, id=f"{device}-{name}-{passes}")


def _bytes(n, length, dim, itemsize, passes):
    kept = reference.num_kept(length, RATIO)
    fwd = 2 * n * kept * dim * itemsize + n * length * (itemsize + 8)  # gather, mask, ids
    bwd = n * (kept + length) * dim * itemsize + 8 * n * length      # grad in, grad_x out, ids
    return fwd + (bwd if passes == "fwd+bwd" else 0)


@pytest.mark.parametrize("device, variant, passes", list(_cases()))
def test_random_masking(timed, backend, device, variant, passes):
    n, length, dim = SHAPES[device]
    dtype = DTYPES[device]
    x = torch.randn(n, length, dim, device=device, dtype=dtype, requires_grad=passes != "fwd")
    grad = torch.randn(n, reference.num_kept(length, RATIO), dim, device=device, dtype=dtype)
    if variant in ("eager", "compile"):
        fn = reference.random_masking if variant == "eager" else _compiled
    else:
        backend(variant)
        fn = ops.random_masking

    def step():
        x_masked = fn(x, RATIO)[0]
        if passes == "fwd+bwd":
            x_masked.backward(grad)
            x.grad = None
        return x_masked

    with torch.set_grad_enabled(passes != "fwd"):
        timed(step, device, bytes_moved=_bytes(n, length, dim, x.element_size(), passes),
              shape=[n, length, dim], dtype=str(dtype), mask_ratio=RATIO, passes=passes)
