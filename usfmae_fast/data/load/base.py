"""What the torch and the DALI loader share: the normalisation defaults, the batch loader's
configuration (:class:`LoaderConfig`, whose ``plan`` is the sampling plan both follow), the epoch
bookkeeping (:class:`EpochLoader`) and the reference image decode (:func:`decode_image`)."""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
import torch

from .. import INTERPOLATIONS
from .image_files import ImageList, epoch_batches

if TYPE_CHECKING:
    from .torch_loader import GrayFrameDataset

# Mean / std of gray ultrasound frames in [0, 1] are dominated by the black background; these
# defaults are those of the pydicom-data ultrasound frames (see ``frame_stats``).
US_MEAN = 0.15
US_STD = 0.20


KINDS = ("pretrain", "train", "eval")
SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)
Stat = float | Sequence[float]


def angle_range(rotate: float | Sequence[float]) -> tuple[float, float]:
    """A rotation setting as ``(low, high)`` degrees: ``r`` means ``(-r, r)``."""
    if isinstance(rotate, (int, float)):
        return -float(rotate), float(rotate)
    low, high = (float(v) for v in rotate)
    return low, high


def _as_list(value: Stat) -> list[float]:
    return [float(value)] if isinstance(value, (int, float)) else [float(v) for v in value]


def channel_values(value: Stat, channels: int) -> list[float]:
    """A mean or std given once or per channel -> one value per channel."""
    values = _as_list(value)
    if len(values) == 1:
        values = values * channels
    if len(values) != channels:
        raise ValueError(f"expected 1 or {channels} values, got {len(values)}: {value}")
    return values


def decode_image(data: bytes, channels: int = 1) -> torch.Tensor:
    """PNG / JPEG bytes -> ``uint8 [channels, H, W]`` (gray, or RGB), EXIF orientation applied.

    PIL, not ``torchvision.io``: torchvision's libpng decoder crashes the process (SIGSEGV) on a
    PNG whose IDAT data is corrupt, where PIL raises an exception.
    """
    from PIL import Image, ImageOps

    with Image.open(io.BytesIO(data)) as img:
        arr = np.asarray(ImageOps.exif_transpose(img).convert("L" if channels == 1 else "RGB"))
    tensor = torch.from_numpy(arr.copy())
    return tensor.unsqueeze(0) if channels == 1 else tensor.permute(2, 0, 1).contiguous()


@dataclass
class LoaderConfig:
    """What a batch loader produces; shared by the torch and the DALI loader."""
    kind: str = "pretrain"        # "pretrain" | "train" (augmented) or "eval" (resize + crop)
    batch_size: int = 64
    img_size: int = 224
    channels: int = 1
    dtype: torch.dtype = torch.float32
    device: torch.device = torch.device("cpu")
    seed: int = 0
    rank: int = 0
    world_size: int = 1
    mean: Stat = US_MEAN
    std: Stat = US_STD
    # training kinds, in this order: [resize] -> [rotate] -> random resized crop -> flips
    resize: str | None = None     # squash to img_size x img_size first, with this interpolation
    rotate: float | tuple[float, float] = 0.0  # degrees: r -> uniform in [-r, r]; (lo, hi)
    rotate_interpolation: str = "bilinear"
    crop_scale: tuple[float, float] = SCALE  # crop area / image area; high may exceed 1 (below)
    crop_interpolation: str = "bicubic"
    hflip: float = 0.5            # probability of a horizontal flip
    vflip: float = 0.0            # probability of a vertical flip
    workers: int = 0              # DataLoader workers / DALI CPU threads

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.img_size <= 0 or self.batch_size <= 0:
            raise ValueError("img_size and batch_size must be positive")
        low, high = self.rotate = angle_range(self.rotate)
        if not -180 <= low <= high <= 180:
            raise ValueError(f"rotate must be r in [0, 180] or (low, high) with -180 <= low <= "
                             f"high <= 180 degrees, got {self.rotate}")
        lo, hi = self.crop_scale = tuple(float(v) for v in self.crop_scale)
        if not (0 < lo <= 1 and lo <= hi):  # high > 1: torchvision's semantics (torch_loader)
            raise ValueError(f"crop_scale must satisfy 0 < low <= 1 and low <= high, got "
                             f"{self.crop_scale}")
        for name in ("resize", "rotate_interpolation", "crop_interpolation"):
            value = getattr(self, name)
            if value not in INTERPOLATIONS and not (name == "resize" and value is None):
                raise ValueError(f"{name} must be one of {INTERPOLATIONS}"
                                 f"{' or None' if name == 'resize' else ''}, got {value!r}")
        for name in ("hflip", "vflip"):
            if not 0 <= getattr(self, name) <= 1:
                raise ValueError(f"{name} must be a probability in [0, 1], got "
                                 f"{getattr(self, name)}")
        self.device = torch.device(self.device)
        self.mean = channel_values(self.mean, self.channels)
        self.std = channel_values(self.std, self.channels)

    @property
    def train(self) -> bool:
        return self.kind != "eval"

    def plan(self, num_images: int, epoch: int) -> list[np.ndarray]:
        """This rank's batches of ``epoch``: shuffled, equal shards, full batches when training;
        in order, every image once when evaluating."""
        return epoch_batches(num_images, self.batch_size, epoch=epoch, seed=self.seed,
                             shuffle=self.train, drop_last=self.train, rank=self.rank,
                             world_size=self.world_size)


class EpochLoader:
    """Epoch bookkeeping of a loader: iterating it runs the next epoch (or the one given to
    :meth:`set_epoch`) along :func:`~usfmae_fast.data.load.image_files.epoch_batches` and yields
    ``(images [B, C, S, S] on cfg.device in cfg.dtype, labels [B] int64 or None)``."""

    def __init__(self, images: ImageList | GrayFrameDataset, cfg: LoaderConfig):
        if cfg.kind == "train" and not images.labelled:
            raise ValueError("kind='train' needs labels (a path,label CSV, 'folder' or 'cls')")
        self.images, self.cfg = images, cfg
        self.with_labels = cfg.kind != "pretrain" and images.labelled
        self._next_epoch, self._start_batch = 0, 0
        if len(self) == 0:
            raise ValueError(f"{len(images)} images give rank {cfg.rank} of {cfg.world_size} "
                             f"no batch of {cfg.batch_size}; lower batch_size")

    def set_epoch(self, epoch: int, start_batch: int = 0) -> None:
        """The next pass runs ``epoch`` from its planned batch ``start_batch`` on (resuming a
        run mid-epoch skips the batches already trained on without reading them)."""
        if start_batch < 0:
            raise ValueError(f"start_batch must be >= 0, got {start_batch}")
        self._next_epoch, self._start_batch = int(epoch), int(start_batch)

    def plan(self, epoch: int) -> list[np.ndarray]:
        return self.cfg.plan(len(self.images), epoch)

    def __len__(self) -> int:
        return len(self.plan(0))

    def _take_epoch(self) -> tuple[int, int]:
        """``(epoch, first planned batch)`` of this pass; the pass after it starts the next
        epoch at its beginning."""
        taken = self._next_epoch, self._start_batch
        self._next_epoch, self._start_batch = self._next_epoch + 1, 0
        return taken

    def _output(self, images: torch.Tensor, labels: torch.Tensor | None):
        device = self.cfg.device
        images = images.to(device, non_blocking=True).to(self.cfg.dtype)
        if not self.with_labels:
            return images, None
        return images, labels.to(device, torch.int64, non_blocking=True)
