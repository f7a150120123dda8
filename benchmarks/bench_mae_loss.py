"""mae_loss (norm_pix_loss=True) forward and forward + backward: eager reference, torch.compile
of it, the "torch" custom op and every compiled / Triton backend, side by side in one run.

    .venv/bin/python -m pytest benchmarks/bench_mae_loss.py --benchmark-json=out.json
"""
import pytest
import torch

from conftest import DEVICES, DTYPES, usable_backends
from usfmae_fast import ops
from usfmae_fast.ops import reference

# 3 x 224 x 224 images in 16 x 16 patches (196 x 768 predictions): 256 on a GPU, 16 on CPU.
SHAPES = {"cpu": (16, 3, 224, 224), "cuda": (256, 3, 224, 224)}
PATCH = 16
_compiled = torch.compile(reference.mae_loss)


def _cases():
    for device in DEVICES:
        for name in ["eager", "compile"] + usable_backends("mae_loss", device):
            for passes in ("fwd", "fwd+bwd"):
                yield pytest.param(device, name, passes, id=f"{device}-{name}-{passes}")


@pytest.mark.parametrize("device, variant, passes", list(_cases()))
def test_mae_loss(timed, backend, device, variant, passes):
    n, c, h, w = SHAPES[device]
    dtype = DTYPES[device]
    length = (h // PATCH) * (w // PATCH)
    imgs = torch.randn(n, c, h, w, device=device, dtype=dtype)
    pred = torch.randn(n, length, PATCH * PATCH * c, device=device, dtype=dtype,
                       requires_grad=passes != "fwd")
    mask = (torch.rand(n, length, device=device) < 0.75).to(dtype)
    if variant in ("eager", "compile"):
        fn = reference.mae_loss if variant == "eager" else _compiled
    else:
        backend(variant)
        fn = ops.mae_loss

    def step():
        loss = fn(imgs, pred, mask, PATCH, True)
        if passes == "fwd+bwd":
            loss.backward()
            pred.grad = None
        return loss

    # the least traffic any implementation needs: read imgs, pred and mask once (+ write grad)
    nbytes = (imgs.numel() + pred.numel() * (2 if passes == "fwd+bwd" else 1)
              + mask.numel()) * imgs.element_size()
    with torch.set_grad_enabled(passes != "fwd"):
        timed(step, device, bytes_moved=nbytes, shape=[n, c, h, w], patch_size=PATCH,
              dtype=str(dtype), passes=passes)
