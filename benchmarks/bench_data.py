"""Data loading: images/s from JPEG and PNG files to augmented 224 x 224 pretraining batches on
the device (RandomResizedCrop + flip + normalise; bf16 on CUDA, fp32 on CPU), for DALI on the
GPU, DALI in CPU-only mode and the torch DataLoader with N worker processes, side by side in
one run.

    .venv/bin/python -m pytest benchmarks/bench_data.py --benchmark-json=out.json

The images are synthetic B-mode-like grayscale frames (a fan of smoothed speckle on black,
as ingest writes them), BENCH_DATA_IMAGES of BENCH_DATA_SIZE pixels (default 1024 x 480x640
with CUDA, 64 x 240x320 without). One timed round is one epoch; ``extra_info`` holds
images/s. GPU cases skip without CUDA, DALI cases without nvidia-dali.
"""
import os

import numpy as np
import pytest
import torch

from conftest import DTYPES
from usfmae_fast.data.load.dali import dali_available
from usfmae_fast.data.load.loader import make_loader

CUDA = torch.cuda.is_available()
DALI, DALI_WHY = dali_available()
WORKERS = max(1, min(8, os.cpu_count() or 1))
IMAGES = int(os.environ.get("BENCH_DATA_IMAGES", 1024 if CUDA else 64))
HEIGHT, WIDTH = (int(v) for v in
                 os.environ.get("BENCH_DATA_SIZE", "480x640" if CUDA else "240x320").split("x"))
BATCH = min(IMAGES, 128 if CUDA else 16)
ROUNDS = 5 if CUDA else 3
IMG_SIZE, CHANNELS = 224, 1


def ultrasound_like(rng: np.random.Generator, h: int, w: int) -> np.ndarray:
    """Smoothed Rayleigh speckle inside a fan, fading with depth, black outside."""
    from PIL import Image, ImageFilter

    y, x = np.mgrid[0:h, 0:w].astype(np.float32)
    r, angle = np.hypot(x - w / 2, y + 0.1 * h), np.arctan2(x - w / 2, y + 0.1 * h)
    fan = (r < 1.05 * h) & (np.abs(angle) < 0.6)
    speckle = rng.rayleigh(0.3, (h, w)) * (1.2 - r / (1.2 * h))
    img = Image.fromarray((np.clip(speckle, 0, 1) * 255 * fan).astype(np.uint8))
    return np.asarray(img.filter(ImageFilter.GaussianBlur(1.0)))


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    from PIL import Image

    made = {}

    def get(fmt: str):
        if fmt not in made:
            root = tmp_path_factory.mktemp(f"bench_{fmt}")
            rng = np.random.default_rng(0)
            for i in range(IMAGES):
                img = Image.fromarray(ultrasound_like(rng, HEIGHT, WIDTH))
                img.save(root / f"{i:05d}.{'jpg' if fmt == 'jpeg' else 'png'}", quality=90)
            made[fmt] = root
        return made[fmt]
    return get


def _cases():
    no_dali = pytest.mark.skipif(not DALI, reason=DALI_WHY)
    no_cuda = pytest.mark.skipif(not CUDA, reason="needs a CUDA device")
    torch_device = "cuda" if CUDA else "cpu"
    for fmt in ("jpeg", "png"):
        yield pytest.param("dali", "cuda", fmt, marks=[no_dali, no_cuda], id=f"dali-gpu-{fmt}")
        yield pytest.param("dali", "cpu", fmt, marks=no_dali, id=f"dali-cpu-{fmt}")
        yield pytest.param("torch", torch_device, fmt,
                           id=f"torch-{WORKERS}workers-{torch_device}-{fmt}")


@pytest.mark.parametrize("backend, device, fmt", list(_cases()))
def test_data(benchmark, image_dir, backend, device, fmt):
    dtype = DTYPES[device]
    loader = make_loader(image_dir(fmt), "pretrain", batch_size=BATCH, img_size=IMG_SIZE,
                         channels=CHANNELS, dtype=dtype, device=device, backend=backend,
                         workers=WORKERS, seed=0)

    def epoch():
        for images, _ in loader:
            pass
        if device == "cuda":
            torch.cuda.synchronize()
        assert images.shape == (BATCH, CHANNELS, IMG_SIZE, IMG_SIZE) and images.dtype == dtype

    epoch()  # start workers / build the pipeline, files into the page cache
    benchmark.pedantic(epoch, rounds=ROUNDS, iterations=1)
    seconds = benchmark.stats.stats.median
    per_epoch = len(loader) * BATCH
    benchmark.extra_info.update(
        loader=loader.backend, device=device, format=fmt, images_per_s=per_epoch / seconds,
        median_s_per_epoch=seconds, images_per_epoch=per_epoch, source_hw=[HEIGHT, WIDTH],
        img_size=IMG_SIZE, channels=CHANNELS, batch_size=BATCH, dtype=str(dtype),
        workers=WORKERS, cpu_count=os.cpu_count())
