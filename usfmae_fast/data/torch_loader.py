"""PyTorch dataset over in-memory grayscale frames, with fb/mae's pretraining augmentation.

Train: RandomResizedCrop (scale 0.2-1, ratio 3/4-4/3, bicubic) + horizontal flip, as fb/mae
``main_pretrain.py``; eval: resize the short side + center crop. Both give float32
``[1, H, W]`` tensors, scaled to [0, 1] and then normalised with ``(x - mean) / std``.
Augmentation is seeded per (seed, epoch, index), so a run is reproducible whatever the order
or the worker that loads an item.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode, v2

# Mean / std of gray ultrasound frames in [0, 1] are dominated by the black background; these
# defaults are those of the pydicom-data ultrasound frames (see ``frame_stats``).
US_MEAN = 0.15
US_STD = 0.20


def train_transform(img_size: int, mean: float = US_MEAN, std: float = US_STD,
                    scale: tuple[float, float] = (0.2, 1.0),
                    ratio: tuple[float, float] = (3 / 4, 4 / 3), hflip: float = 0.5) -> v2.Compose:
    """fb/mae pretraining augmentation for ``uint8 [1, H, W]`` tensors."""
    return v2.Compose([
        v2.RandomResizedCrop(img_size, scale=scale, ratio=ratio,
                             interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.RandomHorizontalFlip(hflip),
        _to_normalised(mean, std),
    ])


def eval_transform(img_size: int, mean: float = US_MEAN, std: float = US_STD) -> v2.Compose:
    """Deterministic: short side to ``img_size`` (bicubic), then a centred square crop."""
    return v2.Compose([
        v2.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True),
        v2.CenterCrop(img_size),
        _to_normalised(mean, std),
    ])


def _to_normalised(mean: float, std: float) -> v2.Compose:
    if std <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize([mean], [std])])


def frame_stats(frames: Sequence[np.ndarray]) -> tuple[float, float]:
    """Pixel mean and std of uint8 frames, in [0, 1] units."""
    total = sum(f.size for f in frames)
    if total == 0:
        raise ValueError("no pixels: frames is empty")
    mean = sum(float(f.sum(dtype=np.float64)) for f in frames) / total / 255.0
    sq = sum(float(np.square(f, dtype=np.float64).sum()) for f in frames) / total / 255.0 ** 2
    return mean, max(sq - mean * mean, 0.0) ** 0.5


def _as_tensor(frame: np.ndarray) -> torch.Tensor:
    if frame.ndim != 2 or frame.dtype != np.uint8:
        raise ValueError(f"frames must be 2-D uint8 arrays, got {frame.dtype} {frame.shape}")
    return torch.from_numpy(np.ascontiguousarray(frame)).unsqueeze(0)


class GrayFrameDataset(Dataset):
    """Grayscale ``uint8 [H, W]`` frames -> normalised ``float32 [1, S, S]`` tensors.

    ``train=True`` applies the seeded MAE augmentation (call :meth:`set_epoch` each epoch),
    ``train=False`` the deterministic eval transform. ``base_size`` first shrinks every frame
    once so its short side is at most that many pixels (e.g. 2 x ``img_size``): the output is
    hardly different and the per-item crop + resize becomes much cheaper than on 800 x 600
    scanner frames.
    """

    def __init__(self, frames: Sequence[np.ndarray], img_size: int, train: bool = True,
                 mean: float = US_MEAN, std: float = US_STD, seed: int = 0,
                 base_size: int | None = None):
        if len(frames) == 0:
            raise ValueError("GrayFrameDataset needs at least one frame")
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        self.frames = [self._shrink(_as_tensor(f), base_size) for f in frames]
        self.img_size, self.train, self.mean, self.std = img_size, train, mean, std
        self.seed, self.epoch = int(seed), 0
        self.transform = (train_transform if train else eval_transform)(img_size, mean, std)

    @staticmethod
    def _shrink(frame: torch.Tensor, base_size: int | None) -> torch.Tensor:
        if base_size is None or min(frame.shape[-2:]) <= base_size:
            return frame
        return v2.functional.resize(frame, base_size, InterpolationMode.BICUBIC, antialias=True)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return len(self.frames)

    def __getitem__(self, index: int) -> torch.Tensor:
        frame = self.frames[index]
        if not self.train:
            return self.transform(frame)
        # v2 transforms draw from torch's global RNG: fork it so the draw depends on
        # (seed, epoch, index) only and the caller's RNG stream is left untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(hash((self.seed, self.epoch, int(index))) & 0x7FFF_FFFF_FFFF_FFFF)
            return self.transform(frame)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tensor -> [0, 1] for display."""
        return (x * self.std + self.mean).clamp(0, 1)
