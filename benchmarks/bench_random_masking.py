"""random_masking forward + backward, every usable backend on every device, side by side.

    .venv/bin/python -m pytest benchmarks/bench_random_masking.py --benchmark-json=out.json
"""
import pytest
import torch

from conftest import synchronised
from usfmae_fast import ops

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
# ViT-B MAE encoder input: 196 patches of width 768, batch 64 (CPU: 16 to keep runs short).
SHAPES = {"cpu": (16, 196, 768), "cuda": (256, 196, 768)}


def _cases():
    for device in DEVICES:
        for name, state in ops.backend_status()["random_masking"].items():
            if state.startswith("ok") and device in state:
                yield pytest.param(device, name, id=f"{device}-{name}")


@pytest.mark.parametrize("device, backend_name", list(_cases()))
def test_random_masking_fwd_bwd(benchmark, backend, device, backend_name):
    backend(backend_name)
    n, length, dim = SHAPES[device]
    x = torch.randn(n, length, dim, device=device, requires_grad=True)
    grad = torch.randn(n, length // 4, dim, device=device)

    def step():
        x_masked, _, _ = ops.random_masking(x, 0.75)
        x_masked.backward(grad)
        x.grad = None

    benchmark.extra_info.update(shape=[n, length, dim], dtype="float32", mask_ratio=0.75)
    benchmark(synchronised(step, device))
