"""Score-CAM of one image through a ViT-B/16 classifier, all 768 channels of the last block's
norm1: ours (batched on the device, chunked to the memory budget; bf16 autocast on CUDA, fp32 on
the CPU) against the grad-cam package's ScoreCAM at its default batch size (16) and at its best
one (the candidate with the highest fp32 forward throughput, probed first), side by side in one
run. ``extra_info`` holds the Pearson correlation of each map with ours (goal >= 0.99).

GPU cases use ViT-B/16 at 224 x 224 (196 patches), 3 rounds after a warm-up; they skip without
CUDA. 768 ViT-B forward passes at 224 take 10+ minutes per variant on a 2-core CPU, so the CPU
cases use ViT-B/16 at 64 x 64 (4 x 4 patches: still 768 channels and 768 + 1 forward passes of
the full 12-block ViT-B), 3 rounds each; ``BENCH_SCORECAM_FULL=1`` runs them at 224, one round.

    .venv/bin/python -m pytest benchmarks/bench_scorecam.py --benchmark-json=out.json

Weights are random (nothing is downloaded) but spread like a trained model's: LayerNorm affines
and the 2-class head are redrawn, since with timm's initialisation the channels of a norm output
sum to zero per token and the class scores barely move, which makes any CAM numerical noise.
"""
import os
import shlex
import sys
import time

os.environ.setdefault("TQDM_DISABLE", "1")  # grad-cam shows a progress bar per image

import pytest  # noqa: E402
import torch  # noqa: E402
from torch.utils.flop_counter import FlopCounterMode  # noqa: E402

from conftest import DEVICES  # noqa: E402
from usfmae_fast.explain import ScoreCAM  # noqa: E402

try:  # the reference; without it (e.g. a GPU machine with no network) only ours is timed
    import pytorch_grad_cam as gradcam
    from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
except ImportError:
    gradcam = None

FULL = os.environ.get("BENCH_SCORECAM_FULL") == "1"
IMG_SIZE = {"cuda": 224, "cpu": 224 if FULL else 64}
OUR_DTYPE = {"cuda": "bf16", "cpu": "fp32"}
ROUNDS = {"cuda": 3, "cpu": 1 if FULL else 3}
CANDIDATES = (16, 32, 64, 128, 256)  # grad-cam batch sizes probed for its best
TARGET = 1
VARIANTS = {"cuda": ["ours", "ours-fp32", "gradcam-bs16", "gradcam-best"],
            "cpu": ["ours", "gradcam-bs16", "gradcam-best"]}
_cache: dict = {}


def _model(device: str) -> torch.nn.Module:
    if device not in _cache:
        import timm

        import usfmae_fast.models  # noqa: F401 - registers usfmae_vit_base_patch16_224
        torch.manual_seed(0)
        model = timm.create_model("usfmae_vit_base_patch16_224", num_classes=2,
                                  img_size=IMG_SIZE[device])
        gen = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for m in model.modules():
                if isinstance(m, torch.nn.LayerNorm):
                    m.weight.copy_(1 + 0.5 * torch.randn(m.weight.shape, generator=gen))
                    m.bias.copy_(0.5 * torch.randn(m.bias.shape, generator=gen))
            model.head.weight.copy_(torch.randn(model.head.weight.shape, generator=gen) / 5)
        _cache[device] = model.eval().to(device)
    return _cache[device]


def _image(device: str) -> torch.Tensor:
    """A B-mode-like frame: a dark round lesion and a bright rim in speckle, normalised."""
    size = IMG_SIZE[device]
    gen = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.linspace(-1, 1, size), torch.linspace(-1, 1, size),
                            indexing="ij")
    radius = ((yy - 0.2) ** 2 + (xx + 0.25) ** 2).sqrt()
    tissue = 0.5 - 0.35 * (radius < 0.3).float() + 0.3 * ((radius - 0.32).abs() < 0.04).float()
    speckle = -torch.log(torch.rand(size, size, generator=gen).clamp_min(1e-6))  # Exp(1)
    gray = (tissue * speckle).clamp(0, 1)
    return ((gray - 0.45) / 0.25).expand(1, 3, size, size).contiguous().to(device)


def _best_gradcam_batch(device: str) -> tuple[int, dict]:
    """The candidate batch size with the most fp32 forward passes per second."""
    key = ("best", device)
    if key not in _cache:
        model, image = _model(device), _image(device)
        per_image = {}
        for batch in CANDIDATES:
            x = image.expand(batch, -1, -1, -1).contiguous()
            with torch.no_grad():
                model(x)
                if device == "cuda":
                    torch.cuda.synchronize()
                start = time.perf_counter()
                model(x)
                if device == "cuda":
                    torch.cuda.synchronize()
            per_image[batch] = (time.perf_counter() - start) / batch
        _cache[key] = min(per_image, key=per_image.get), per_image
    return _cache[key]


def _run(variant: str, device: str):
    model, image = _model(device), _image(device)
    layer = model.blocks[-1].norm1
    if variant.startswith("ours"):
        dtype = "fp32" if variant == "ours-fp32" else OUR_DTYPE[device]
        cam = ScoreCAM(model, "blocks.-1.norm1", dtype=dtype)
        return lambda: cam(image, TARGET).maps[0], dict(dtype=dtype, cam=cam)
    batch = 16 if variant == "gradcam-bs16" else _best_gradcam_batch(device)[0]
    grid = IMG_SIZE[device] // 16

    def reshape(t):
        return t[:, 1:, :].reshape(t.size(0), grid, grid, t.size(2)).permute(0, 3, 1, 2)
    cam = gradcam.ScoreCAM(model, [layer], reshape_transform=reshape)
    cam.batch_size = batch
    return (lambda: torch.from_numpy(cam(image, [ClassifierOutputTarget(TARGET)])[0]),
            dict(dtype="fp32", gradcam_batch_size=batch))


def _ours_map(device: str) -> torch.Tensor:
    if ("ours", device) not in _cache:
        _cache[("ours", device)] = _run("ours", device)[0]().float().cpu()
    return _cache[("ours", device)]


@pytest.mark.parametrize("device, variant", [
    pytest.param(d, v, id=f"{d}-vitb{IMG_SIZE[d]}-{v}") for d in DEVICES for v in VARIANTS[d]])
def test_scorecam_vit_b(timed, benchmark, device, variant):
    if variant.startswith("gradcam") and gradcam is None:
        pytest.skip("grad-cam (pip install grad-cam) is not installed")
    fn, info = _run(variant, device)
    model, image = _model(device), _image(device)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(image)
    channels = model.embed_dim
    flops = counter.get_total_flops() * (channels + 1)  # the masked inputs + the first pass
    heat = timed(fn, device, rounds=ROUNDS[device], calls=1, warmup=device == "cuda",
                 flops=flops, img_size=IMG_SIZE[device], channels=channels, target=TARGET,
                 variant=variant, model="usfmae_vit_base_patch16_224 (random, spread)",
                 dtype=info["dtype"], gradcam_batch_size=info.get("gradcam_batch_size"),
                 command=shlex.join(["BENCH_SCORECAM_FULL=1"] * FULL
                                    + ["python", "-m", "pytest", *sys.argv[1:]]))
    heat = heat.float().cpu()
    if variant.startswith("ours"):
        benchmark.extra_info["chunk_size"] = info["cam"].last_batch_size
    if variant == "ours":
        _cache[("ours", device)] = heat
        _cache[("ours_s", device)] = benchmark.stats.stats.median
        return
    if ("ours_s", device) in _cache:
        benchmark.extra_info["ours_speedup"] = benchmark.stats.stats.median / _cache[("ours_s",
                                                                                       device)]
    ours = _ours_map(device)
    corr = torch.corrcoef(torch.stack([heat.flatten(), ours.flatten()]))[0, 1].item()
    benchmark.extra_info.update(corr_with_ours=corr,
                                max_abs_diff_vs_ours=(heat - ours).abs().max().item())
    if variant == "gradcam-best":
        benchmark.extra_info["gradcam_probe_s_per_image"] = _best_gradcam_batch(device)[1]
    assert corr >= 0.99, f"{variant} map correlates {corr:.4f} with ours"
