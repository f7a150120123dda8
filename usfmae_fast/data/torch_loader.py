"""PyTorch datasets and loader with fb/mae's pretraining augmentation.

Train: RandomResizedCrop (scale ``crop_scale``, default 0.2-1, ratio 3/4-4/3, bicubic) + horizontal flip, as fb/mae
``main_pretrain.py`` (+ an optional random rotation); eval: resize the short side + center crop.
Both give float32 ``[C, H, W]`` tensors, scaled to [0, 1] and then normalised with
``(x - mean) / std``. Augmentation is seeded per (seed, epoch, index), so a run is reproducible
whatever the order or the worker that loads an item.

:class:`GrayFrameDataset` serves in-memory DICOM frames; :class:`TorchImageLoader` reads image
files (PIL decode in DataLoader workers) and is both the reference for the DALI loader
(``dali.py``, same sampling plan, same augmentation) and its fallback where DALI is missing.
"""
from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode, v2

from .image_files import ImageList, ImageRecord, epoch_batches, read_bytes, warn_bad

# Mean / std of gray ultrasound frames in [0, 1] are dominated by the black background; these
# defaults are those of the pydicom-data ultrasound frames (see ``frame_stats``).
US_MEAN = 0.15
US_STD = 0.20


KINDS = ("pretrain", "train", "eval")
SCALE = (0.2, 1.0)
RATIO = (3 / 4, 4 / 3)
Stat = float | Sequence[float]


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


def train_transform(img_size: int, mean: Stat = US_MEAN, std: Stat = US_STD,
                    scale: tuple[float, float] = SCALE, ratio: tuple[float, float] = RATIO,
                    hflip: float = 0.5, rotate: float = 0.0) -> v2.Compose:
    """fb/mae pretraining augmentation for ``uint8 [C, H, W]`` tensors; ``rotate`` > 0 adds a
    rotation by a uniform angle in [-rotate, rotate] degrees (black fill, same canvas)."""
    steps = [v2.RandomResizedCrop(img_size, scale=scale, ratio=ratio,
                                  interpolation=InterpolationMode.BICUBIC, antialias=True),
             v2.RandomHorizontalFlip(hflip)]
    if rotate > 0:
        steps.append(v2.RandomRotation(rotate, interpolation=InterpolationMode.BILINEAR, fill=0))
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

    ``train=True`` applies the seeded MAE augmentation (call :meth:`set_epoch` each epoch),
    ``train=False`` the deterministic eval transform. ``base_size`` first shrinks every frame
    once so its short side is at most that many pixels (e.g. 2 x ``img_size``): the output is
    hardly different and the per-item crop + resize becomes much cheaper than on 800 x 600
    scanner frames.
    """

    labelled = False  # frames carry no labels

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
        return _seeded(self.transform, frame, self.seed, self.epoch, index)

    def denormalise(self, x: torch.Tensor) -> torch.Tensor:
        """Normalised tensor -> [0, 1] for display."""
        return (x * self.std + self.mean).clamp(0, 1)


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
    rotate: float = 0.0           # max random rotation in degrees (training kinds)
    crop_scale: tuple[float, float] = SCALE  # random crop area range (training kinds)
    workers: int = 0              # DataLoader workers / DALI CPU threads

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, got {self.kind!r}")
        if self.channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {self.channels}")
        if self.img_size <= 0 or self.batch_size <= 0 or self.rotate < 0:
            raise ValueError("img_size and batch_size must be positive and rotate >= 0")
        lo, hi = self.crop_scale
        if not 0 < lo <= hi <= 1:
            raise ValueError(f"crop_scale must satisfy 0 < low <= high <= 1, got "
                             f"{self.crop_scale}")
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
    :meth:`set_epoch`) along :func:`~usfmae_fast.data.image_files.epoch_batches` and yields
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
        transform = (train_transform(cfg.img_size, cfg.mean, cfg.std, scale=cfg.crop_scale,
                                     rotate=cfg.rotate)
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
