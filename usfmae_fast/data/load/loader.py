"""``make_loader``: batches of images on the device from an ingest manifest, a directory or
tar shards, through the fastest loader available here.

``backend="auto"`` picks DALI (``"dali"``: GPU decode + augmentation on a CUDA device, DALI's
CPU-only mode otherwise) when ``nvidia-dali`` imports and its pipeline builds, else the torch
DataLoader (``"torch"``: PIL + torchvision transforms in worker processes). Both follow the same sampling
plan and augmentation; see ``dali.py`` and ``torch_loader.py``.
"""
from __future__ import annotations

import os
import warnings

import torch

from ...runtime.device import resolve_device
from .. import LOADER_BACKENDS
from .dali import DaliImageLoader, dali_available
from .image_files import load_image_list
from .base import SCALE, US_MEAN, US_STD, EpochLoader, LoaderConfig, Stat
from .torch_loader import TorchImageLoader



def resolve_backend(backend: str, device: torch.device) -> str:
    if backend not in LOADER_BACKENDS:
        raise ValueError(f"backend must be one of {LOADER_BACKENDS}, got {backend!r}")
    ok, why = dali_available()
    if backend == "dali" and not ok:
        raise ImportError(f"backend='dali' needs nvidia-dali-cuda130: {why}")
    if backend == "auto":
        return "dali" if ok and device.type in ("cpu", "cuda") else "torch"
    return backend


def _distributed() -> tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def make_loader(source, kind: str = "pretrain", *, batch_size: int = 64, img_size: int = 224,
                channels: int = 1, dtype: torch.dtype = torch.float32,
                device: str | torch.device | None = None, seed: int = 0,
                rank: int | None = None, world_size: int | None = None, labels=None,
                backend: str = "auto", workers: int | None = None, mean: Stat = US_MEAN,
                std: Stat = US_STD, rotate: float | tuple[float, float] = 0.0, crop_scale=SCALE,
                check: str = "header", **augment) -> EpochLoader:
    """An iterable of ``(images [B, channels, img_size, img_size] on device in dtype,
    labels [B] int64 | None)``; each pass over it is the next epoch (``set_epoch`` to choose).

    ``source``: ingest ``manifest.csv``, a directory, tar shard(s), or an ``ImageList``.
    ``kind``: ``"pretrain"`` (augmented, no labels), ``"train"`` (augmented, labels) or
    ``"eval"`` (resize + centre crop, every image once, labels when there are any).
    ``labels``: a ``path,label`` CSV, ``"folder"`` or ``"cls"`` (see ``image_files``).
    ``rank`` / ``world_size`` default to torch.distributed's; each rank gets its own shard.
    ``workers``: DALI threads or DataLoader processes (default: up to 8, one per core).
    ``check``: ``"header"``, ``"full"`` or ``"none"``, how files are checked up front.
    ``rotate``, ``crop_scale`` and ``augment`` (``resize``, ``rotate_interpolation``,
    ``crop_interpolation``, ``hflip``, ``vflip``): the training augmentation, see
    :class:`~.base.LoaderConfig`.
    """
    images = load_image_list(source, labels=labels, check=check)
    device = resolve_device(device)
    default_rank, default_world = _distributed()
    cfg = LoaderConfig(kind=kind, batch_size=batch_size, img_size=img_size, channels=channels,
                       dtype=dtype, device=device, seed=seed,
                       rank=default_rank if rank is None else rank,
                       world_size=default_world if world_size is None else world_size,
                       mean=mean, std=std, rotate=rotate, crop_scale=tuple(crop_scale),
                       **augment,
                       workers=max(1, min(8, os.cpu_count() or 1)) if workers is None else workers)
    if resolve_backend(backend, device) == "dali":
        try:
            return DaliImageLoader(images, cfg)
        except RuntimeError as exc:  # DALI imports but cannot run here (driver, device)
            if backend == "dali":
                raise
            warnings.warn(f"DALI could not start ({exc}); using the torch DataLoader",
                          RuntimeWarning, stacklevel=2)
    return TorchImageLoader(images, cfg)
