"""PyTorch datasets and loader with fb/mae's pretraining augmentation (or USF-MAE's).

Train, in this order (each optional step off by default, which is fb/mae ``main_pretrain.py``):
``resize`` (squash to S x S, as USF-MAE's ``Resize((224, 224), NEAREST)``) -> random rotation by
a uniform angle in ``rotate`` degrees (black fill, same canvas) -> RandomResizedCrop (area
``crop_scale``, default 0.2-1, ratio 3/4-4/3, ``crop_interpolation`` default bicubic) ->
horizontal flip (``hflip``, 0.5) -> vertical flip (``vflip``). Eval: resize the short side +
center crop. Both give float32 ``[C, H, W]`` tensors, scaled to [0, 1] and then normalised with
``(x - mean) / std``. Augmentation is seeded per (seed, epoch, index), so a run is reproducible
whatever the order or the worker that loads an item.

``crop_scale`` above 1 (USF-MAE's ``scale=(0.5, 2.0)``) keeps torchvision's semantics, which
the DALI loader shares (``decoders.image_random_crop`` / ``random_resized_crop`` run the same
rejection sampling): up to 10 draws of an area fraction in ``crop_scale`` and an aspect ratio;
the first crop that fits inside the image is taken; when none fits, the whole image (its aspect
ratio clamped to 3/4-4/3, centred). A draw above 1 never fits, so ``(0.5, 2.0)`` gives areas in
[0.5, 1] and, when all 10 draws fail, the whole image: 5.5 % of crops of a square image (as
after ``resize``), 14 % of a 4:3 one (torchvision's ``get_params``; DALI measured the same). A
low bound above 1 (always the whole image) is refused: DALI fails on a square image there.

:class:`GrayFrameDataset` serves in-memory DICOM frames; :class:`TorchImageLoader` reads image
files (PIL decode in DataLoader workers) and is both the reference for the DALI loader
(``dali.py``, same sampling plan, same augmentation; what they share is in ``base.py``) and
its fallback where DALI is missing.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from .base import (RATIO, SCALE, US_MEAN, US_STD, EpochLoader, LoaderConfig, Stat, _as_list,
                   angle_range, decode_image)
from .image_files import ImageList, ImageRecord, read_bytes, warn_bad



MODES = {"nearest": InterpolationMode.NEAREST, "bilinear": InterpolationMode.BILINEAR,
         "bicubic": InterpolationMode.BICUBIC}


def train_transform(img_size: int, mean: Stat = US_MEAN, std: Stat = US_STD,
                    crop_scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO,
                    hflip: float = 0.5, rotate: float | tuple[float, float] = 0.0,
                    vflip: float = 0.0, resize: str | None = None,
                    rotate_interpolation: str = "bilinear",
                    crop_interpolation: str = "bicubic") -> v2.Compose:
    """The training augmentation of the module docstring for ``uint8 [C, H, W]`` tensors."""
    steps = []
    if resize is not None:
        steps.append(v2.Resize((img_size, img_size), interpolation=MODES[resize],
                               antialias=resize != "nearest"))
    low, high = angle_range(rotate)
    if (low, high) != (0, 0):
        steps.append(v2.RandomRotation((low, high), interpolation=MODES[rotate_interpolation],
                                       fill=0))
    steps.append(v2.RandomResizedCrop(img_size, scale=crop_scale, ratio=ratio,
                                      interpolation=MODES[crop_interpolation], antialias=True))
    steps.append(v2.RandomHorizontalFlip(hflip))
    if vflip > 0:
        steps.append(v2.RandomVerticalFlip(vflip))
    return v2.Compose(steps + [_to_normalised(mean, std)])


def eval_geometry(size: int | tuple[int, int],
                  interpolation: InterpolationMode = InterpolationMode.BICUBIC) -> v2.Compose:
    """Deterministic: short side to ``size`` (its larger side when a (height, width) pair),
    then a centred crop of ``size``; evaluation, prediction and Score-CAM all use it."""
    height, width = (size, size) if isinstance(size, int) else size
    return v2.Compose([
        v2.Resize(max(height, width), interpolation=interpolation, antialias=True),
        v2.CenterCrop((height, width)),
    ])


def eval_transform(img_size: int | tuple[int, int], mean: Stat = US_MEAN,
                   std: Stat = US_STD) -> v2.Compose:
    """:func:`eval_geometry` (bicubic), then float in [0, 1] normalised with mean / std."""
    return v2.Compose([eval_geometry(img_size), _to_normalised(mean, std)])


def _to_normalised(mean: Stat, std: Stat) -> v2.Compose:
    means, stds = _as_list(mean), _as_list(std)
    if min(stds) <= 0:
        raise ValueError(f"std must be > 0, got {std}")
    return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(means, stds)])


def _seeded(transform, item: torch.Tensor, seed: int, epoch: int, index: int) -> torch.Tensor:
    # v2 transforms draw from torch's global RNG: fork it so the draw depends on
    # (seed, epoch, index) only and the caller's RNG stream is left untouched.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(hash((seed, epoch, int(index))) & 0x7FFF_FFFF_FFFF_FFFF)
        return transform(item)


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

    ``train=True`` applies the seeded MAE augmentation (call :meth:`set_epoch` each epoch;
    ``augment``: :func:`train_transform` keywords, fb/mae's when not given),
    ``train=False`` the deterministic eval transform. ``base_size`` first shrinks every frame
    once so its short side is at most that many pixels (e.g. 2 x ``img_size``): the output is
    hardly different and the per-item crop + resize becomes much cheaper than on 800 x 600
    scanner frames.
    """

    labelled = False  # frames carry no labels

    def __init__(self, frames: Sequence[np.ndarray], img_size: int, train: bool = True,
                 mean: float = US_MEAN, std: float = US_STD, seed: int = 0,
                 base_size: int | None = None, augment: dict | None = None):
        if len(frames) == 0:
            raise ValueError("GrayFrameDataset needs at least one frame")
        if img_size <= 0:
            raise ValueError(f"img_size must be positive, got {img_size}")
        self.frames = [self._shrink(_as_tensor(f), base_size) for f in frames]
        self.img_size, self.train, self.mean, self.std = img_size, train, mean, std
        self.seed, self.epoch = int(seed), 0
        self.transform = (train_transform(img_size, mean, std, **(augment or {})) if train
                          else eval_transform(img_size, mean, std))

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
        return _seeded(self.transform, frame, self.seed, self.epoch, index)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tensor -> [0, 1] for display."""
        return (x * self.std + self.mean).clamp(0, 1)


class ImageFileDataset(Dataset):
    """Image files -> ``(normalised float32 [C, S, S], label)``.

    Items are addressed as ``(epoch, index)``, so the seeded augmentation depends on (seed,
    epoch, index) only, also in persistent DataLoader workers. A file that cannot be decoded
    gives ``(None, (index, name, reason))``; :func:`collate_decoded` drops it from its batch.
    """

    def __init__(self, records: Sequence[ImageRecord], transform, channels: int = 1,
                 seed: int = 0):
        self.records, self.transform, self.channels, self.seed = records, transform, channels, seed

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, key: tuple[int, int]):
        epoch, index = key
        record = self.records[index]
        try:
            img = decode_image(read_bytes(record), self.channels)
        except Exception as exc:  # a bad file must cost one sample, never the run
            return None, (index, record.name, f"{type(exc).__name__}: {exc}")
        return _seeded(self.transform, img, self.seed, epoch, index), record.label


def collate_decoded(items):
    """-> ``(images [B, C, S, S] | None, labels [B] | None, [(index, name, reason)] of the
    files that could not be decoded)``."""
    good = [(x, y) for x, y in items if x is not None]
    bad = [y for x, y in items if x is None]
    if not good:
        return None, None, bad
    return torch.stack([x for x, _ in good]), torch.tensor([y for _, y in good]), bad


class _PlanSampler:
    """Batch sampler over ``(epoch, index)`` keys following ``cfg.plan``. It holds no
    reference to the loader: a cycle would keep the DataLoader's persistent workers alive
    after the loader is dropped, into processes forked later."""

    def __init__(self, cfg: LoaderConfig, num_images: int):
        self.cfg, self.num_images, self.epoch, self.start = cfg, num_images, 0, 0
        self.bad: set[int] = set()  # left out for the rest of the run

    def __iter__(self):
        for batch in self.cfg.plan(self.num_images, self.epoch)[self.start:]:
            if keys := [(self.epoch, int(i)) for i in batch if i not in self.bad]:
                yield keys

    def __len__(self) -> int:
        return max(0, len(self.cfg.plan(self.num_images, self.epoch)) - self.start)


class TorchImageLoader(EpochLoader):
    """Image files -> batches through a torch DataLoader (``cfg.workers`` processes)."""

    backend = "torch"

    def __init__(self, images: ImageList, cfg: LoaderConfig):
        super().__init__(images, cfg)
        transform = (train_transform(cfg.img_size, cfg.mean, cfg.std, crop_scale=cfg.crop_scale,
                                     hflip=cfg.hflip, rotate=cfg.rotate, vflip=cfg.vflip,
                                     resize=cfg.resize,
                                     rotate_interpolation=cfg.rotate_interpolation,
                                     crop_interpolation=cfg.crop_interpolation)
                     if cfg.train else eval_transform(cfg.img_size, cfg.mean, cfg.std))
        self._sampler = _PlanSampler(cfg, len(images))
        self._loader = DataLoader(
            ImageFileDataset(images.records, transform, cfg.channels, cfg.seed),
            batch_sampler=self._sampler, collate_fn=collate_decoded, num_workers=cfg.workers,
            persistent_workers=cfg.workers > 0, pin_memory=cfg.device.type == "cuda")

    def __iter__(self):
        self._sampler.epoch, self._sampler.start = self._take_epoch()
        for images, labels, bad in self._loader:
            self._sampler.bad.update(i for i, _, _ in bad)
            warn_bad([(name, reason) for _, name, reason in bad])
            if images is not None:
                yield self._output(images, labels)


class FrameLoader(EpochLoader):
    """Batches of a :class:`GrayFrameDataset` (frames held in memory, e.g. the demo's) along
    the same sampling plan and sharding as :class:`TorchImageLoader`; no worker processes."""

    backend = "frames"

    def __init__(self, dataset: GrayFrameDataset, cfg: LoaderConfig):
        super().__init__(dataset, cfg)
        if cfg.channels != 1:
            raise ValueError(f"GrayFrameDataset gives 1-channel images, not {cfg.channels}")
        if dataset.train != cfg.train:
            raise ValueError(f"a kind={cfg.kind!r} loader needs a dataset with train={cfg.train}")
        self.dataset = dataset

    def __iter__(self):
        epoch, start = self._take_epoch()
        self.dataset.set_epoch(epoch)
        for batch in self.plan(epoch)[start:]:
            yield self._output(torch.stack([self.dataset[int(i)] for i in batch]), None)
