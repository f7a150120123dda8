"""Packed attention (qkv projection [B, N, 3, H, d] in, [B, N, H*d] out) forward and forward +
backward at the MAE shapes: eager reference, torch.compile of it, SDPA with each of its
backends, and every compiled / Triton backend, side by side in one run.

    .venv/bin/python -m pytest benchmarks/bench_attention.py --benchmark-json=out.json
"""
import pytest
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

from conftest import DEVICES, DTYPES, usable_backends
from usfmae_fast import ops
from usfmae_fast.ops import reference

# (name, B, H, N, d): ViT-B MAE encoder (49 + 1 tokens), its 512-wide decoder, fine-tuning.
SHAPES = {
    "cuda": [("encoder", 256, 12, 50, 64), ("decoder", 256, 16, 197, 32),
             ("finetune", 64, 12, 197, 64)],
    "cpu": [("encoder", 16, 12, 50, 64), ("finetune", 4, 12, 197, 64)],
}
SDPA = {"cuda": {"sdpa-flash": SDPBackend.FLASH_ATTENTION,
                 "sdpa-efficient": SDPBackend.EFFICIENT_ATTENTION,
                 "sdpa-cudnn": SDPBackend.CUDNN_ATTENTION, "sdpa-math": SDPBackend.MATH},
        "cpu": {"sdpa-flash": SDPBackend.FLASH_ATTENTION, "sdpa-math": SDPBackend.MATH}}
_compiled = torch.compile(reference.attention_packed)


def _sdpa_packed(kind):
    def fn(qkv):
        with sdpa_kernel(kind):
            return reference.merge_heads(F.scaled_dot_product_attention(
                *reference.split_qkv(qkv)))
    return fn


def _cases():
    for device in DEVICES:
        # the "torch" backend is SDPA with its default choice, covered by the sdpa-* variants
        names = (["eager", "compile"] + list(SDPA[device])
                 + [b for b in usable_backends("attention_packed", device) if b != "torch"])
        for shape in SHAPES[device]:
            for name in names:
                for passes in ("fwd", "fwd+bwd"):
                    yield pytest.param(device, shape, name, passes,
                                       id=f"{device}-{shape[0]}-{name}-{passes}")


@pytest.mark.parametrize("device, shape, variant, passes", list(_cases()))
def test_attention_packed(timed, backend, device, shape, variant, passes):
    label, b, h, n, d = shape
    dtype = DTYPES[device]
    qkv = torch.randn(b, n, 3, h, d, device=device, dtype=dtype, requires_grad=passes != "fwd")
    grad = torch.randn(b, n, h * d, device=device, dtype=dtype)
    if variant == "eager":
        fn = reference.attention_packed
    elif variant == "compile":
        fn = _compiled
    elif variant.startswith("sdpa-"):
        fn = _sdpa_packed(SDPA[device][variant])
    else:
        backend(variant)
        fn = ops.attention_packed

    def step():
        out = fn(qkv)
        if passes == "fwd+bwd":
            out.backward(grad)
            qkv.grad = None
        return out

    try:
        with torch.set_grad_enabled(passes != "fwd"):
            step()
    except RuntimeError as exc:  # an SDPA backend that does not take this shape / dtype
        pytest.skip(f"{variant}: {exc}".splitlines()[0][:200])
    flops = 4 * b * h * n * n * d * (3.5 if passes == "fwd+bwd" else 1.0)  # FlashAttention-2 count
    with torch.set_grad_enabled(passes != "fwd"):
        timed(step, device, flops=flops, shape=[b, h, n, d], workload=label, dtype=str(dtype),
              passes=passes)
