"""Pretraining data for the engine: this rank's batch loader plus a few held-out images for the
reconstruction figure.

``data.source``:

- ``"demo"``: every frame of the ultrasound DICOMs shipped by pydicom-data, in memory
  (:class:`~usfmae_fast.data.load.torch_loader.FrameLoader`); normalised with their own mean / std;
  the middle frame of each of the ``heldout`` longest files is kept out of training.
- anything :func:`~usfmae_fast.data.load.loader.make_loader` reads (ingest output folder,
  ``manifest.csv``, tar shards): ``heldout`` images drawn with the run's seed are kept out,
  the rest is sharded over the ranks by ``make_loader``.

Both loaders shard the same way: each epoch one permutation, rank ``r`` of ``W`` takes
positions ``r, r + W, ...``, so the global batch (all ranks together) is the same set of images
for any ``W``; ``set_epoch(epoch, start_batch)`` resumes mid-epoch.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .config import ConfigError, DataConfig

DEMO = "demo"


@dataclass
class PretrainData:
    loader: object                       # set_epoch(epoch, start_batch), len(), (images, None)
    mean: float | list[float]            # one value (gray, or every channel alike) or per channel
    std: float | list[float]
    heldout: torch.Tensor | None = None  # [n, C, S, S] normalised, on the CPU
    heldout_names: list[str] = field(default_factory=list)
    report: dict = field(default_factory=dict)


def holdout_indices(sources: list[str], count: int) -> list[int]:
    """The middle frame of each of the ``count`` files holding the most frames (distinct files,
    so the figure shows different scanners and anatomy)."""
    per_file = Counter(sources)
    chosen = []
    for name, _ in sorted(per_file.items(), key=lambda kv: (-kv[1], kv[0]))[:count]:
        positions = [i for i, s in enumerate(sources) if s == name]
        chosen.append(positions[len(positions) // 2])
    return chosen


def _demo_data(cfg: DataConfig, loader_cfg) -> PretrainData:
    from ..data.ingest.dicom_frames import load_frames, ultrasound_test_files
    from ..data.load.torch_loader import FrameLoader, GrayFrameDataset, frame_stats

    frames, report = load_frames(ultrasound_test_files(),
                                 max_frames_per_file=cfg.max_frames_per_file)
    held = holdout_indices(report["sources"], cfg.heldout)
    train_frames = [f for i, f in enumerate(frames) if i not in held]
    if len(train_frames) < loader_cfg.batch_size * loader_cfg.world_size:
        raise RuntimeError(f"only {len(train_frames)} usable ultrasound training frames "
                           f"(skipped files: {report['skipped']}); need a global micro-batch "
                           f"of {loader_cfg.batch_size * loader_cfg.world_size}. Is "
                           f"pydicom-data installed?")
    mean, std = frame_stats(train_frames)
    size = loader_cfg.img_size
    base = 2 * size  # pre-shrink once: crops are then cheap and still sharp at img_size
    train_set = GrayFrameDataset(train_frames, size, train=True, mean=mean, std=std,
                                 seed=loader_cfg.seed, base_size=base, augment=augmentation(cfg))
    heldout, names = None, []
    if held:
        eval_set = GrayFrameDataset([frames[i] for i in held], size, train=False, mean=mean,
                                    std=std, base_size=base)
        heldout = torch.stack([eval_set[i] for i in range(len(eval_set))])
        names = [Path(report["sources"][i]).name for i in held]
    summary = {"source": DEMO, "files": report["files"], "files_used": report["files_used"],
               "decoded": report["frames_decoded"],
               "duplicates_dropped": report["duplicates_dropped"], "used": len(frames),
               "train": len(train_frames), "heldout": len(held), "heldout_files": names,
               "skipped": report["skipped"], "base_size": base}
    return PretrainData(FrameLoader(train_set, loader_cfg), mean, std, heldout, names, summary)


def _stat(values: list[float]) -> float | list[float]:
    return float(values[0]) if len(values) == 1 else [float(v) for v in values]


def augmentation(cfg: DataConfig) -> dict:
    """The training augmentation in ``cfg`` as ``make_loader`` / ``train_transform``
    keywords."""
    rotate = cfg.rotate[0] if len(cfg.rotate) == 1 else tuple(cfg.rotate)
    return dict(rotate=rotate, crop_scale=tuple(cfg.crop_scale), resize=cfg.resize,
                rotate_interpolation=cfg.rotate_interpolation,
                crop_interpolation=cfg.crop_interpolation, hflip=cfg.hflip, vflip=cfg.vflip)


def _file_data(cfg: DataConfig, loader_cfg) -> PretrainData:
    from ..data.load.image_files import load_image_list
    from ..data.load.loader import make_loader

    images = load_image_list(cfg.source)
    count = min(cfg.heldout, max(0, len(images) - 1))
    order = np.random.default_rng([loader_cfg.seed, 0x5EED]).permutation(len(images))
    held, rest = sorted(order[:count].tolist()), sorted(order[count:].tolist())
    c = loader_cfg
    loader = make_loader(images.subset(rest), "pretrain", batch_size=c.batch_size,
                         img_size=c.img_size, channels=c.channels, dtype=c.dtype,
                         device=c.device, seed=c.seed, rank=c.rank, world_size=c.world_size,
                         backend=cfg.backend, workers=cfg.workers, mean=cfg.mean, std=cfg.std,
                         **augmentation(cfg))
    heldout, names = None, []
    if held:
        eval_loader = make_loader(images.subset(held), "eval", batch_size=len(held),
                                  img_size=c.img_size, channels=c.channels, device="cpu",
                                  rank=0, world_size=1, backend="torch", workers=0,
                                  mean=cfg.mean, std=cfg.std)
        heldout = torch.cat([x for x, _ in eval_loader])
        names = [Path(images.records[i].name).name for i in held]
    summary = {"source": str(cfg.source), "images": len(images), "train": len(rest),
               "heldout": len(held), "heldout_files": names,
               "loader": getattr(loader, "backend", type(loader).__name__)}
    return PretrainData(loader, _stat(cfg.mean), _stat(cfg.std), heldout, names, summary)


def build_data(cfg: DataConfig, *, img_size: int, channels: int, micro_batch: int, seed: int,
               rank: int, world_size: int, device: torch.device) -> PretrainData:
    """This rank's loader of ``micro_batch`` images per step, and the held-out images."""
    from ..data.load.base import LoaderConfig

    loader_cfg = LoaderConfig(kind="pretrain", batch_size=micro_batch, img_size=img_size,
                              channels=channels, device=device, seed=seed, rank=rank,
                              world_size=world_size, mean=cfg.mean, std=cfg.std)
    if not cfg.source.strip():
        raise ConfigError("data.source is not set: give an ingest folder, a manifest.csv or .tar "
                          "shards (--data), or 'demo' for the pydicom-data frames")
    if cfg.source == DEMO:
        if channels != 1:
            raise ValueError("data.source = demo gives gray frames: set model.in_chans = 1")
        return _demo_data(cfg, loader_cfg)
    return _file_data(cfg, loader_cfg)
