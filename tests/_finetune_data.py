"""Seeded synthetic B-mode-like images for the fine-tuning tests: Rayleigh speckle ("normal"),
speckle with an anechoic disc ("cyst") or with a brighter, equally speckled disc ("solid"),
each at a random place and size; a few images per patient. Small and fast to make (~1 ms per
image), unlike the pymust simulations the demo uses."""
import csv
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from usfmae_fast.models import MaskedAutoencoderViT, save_safetensors

CLASSES = ("normal", "cyst", "solid")


def bmode_like(kind: str, rng: np.random.Generator, size: int = 32,
               contrast: float = 1.0) -> np.ndarray:
    img = rng.rayleigh(0.5, (size, size))
    if kind != "normal":
        radius = rng.uniform(0.12, 0.22) * size
        cy, cx = rng.uniform(radius + 1, size - radius - 1, 2)
        yy, xx = np.mgrid[:size, :size]
        disc = (yy - cy) ** 2 + (xx - cx) ** 2 < radius ** 2
        img = np.where(disc, img * (1 - 0.85 * contrast) if kind == "cyst"
                       else img + contrast, img)
    return np.clip(img * 80, 0, 255).astype(np.uint8)


def make_labelled_set(root, per_class: int = 8, size: int = 32, seed: int = 0,
                      per_patient: int = 2, classes=CLASSES, patients: str = "p",
                      contrast: float = 1.0) -> Path:
    """``root/images/<class>/*.png`` + ``root/labels.csv`` (path,label,patient_id); patient
    ids ``<class>-<patients><n>``."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    rows = []
    for kind in classes:
        (root / "images" / kind).mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            name = f"images/{kind}/{kind}_{i:03d}.png"
            Image.fromarray(bmode_like(kind, rng, size, contrast)).save(root / name)
            rows.append((name, kind, f"{kind}-{patients}{i // per_patient}"))
    with (root / "labels.csv").open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["path", "label", "patient_id"])
        writer.writerows(rows)
    return root / "labels.csv"


def make_unlabelled_set(root, count: int = 200, size: int = 32, seed: int = 1,
                        contrast: float = 1.0) -> Path:
    """``count`` images of all kinds in one folder (pretraining data)."""
    rng = np.random.default_rng(seed)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(count):
        Image.fromarray(bmode_like(CLASSES[i % len(CLASSES)], rng, size, contrast)).save(
            root / f"u{i:04d}.png")
    return root


TINY_MAE = dict(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                decoder_embed_dim=16, decoder_depth=1, decoder_num_heads=2)


def tiny_mae_checkpoint(folder: Path) -> Path:
    """A seeded, untrained 1-channel tiny MAE saved as our pretraining checkpoint."""
    torch.manual_seed(0)
    path = Path(folder) / "checkpoint.safetensors"
    save_safetensors(MaskedAutoencoderViT(in_chans=1, **TINY_MAE), path)
    return path
