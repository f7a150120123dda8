"""DALI loader: decode and augment image files on the GPU, or in DALI's CPU-only mode.

On a GPU the decoders run with ``device="mixed"`` (nvJPEG, with the hardware JPEG decoder of
A100 / H100; PNG is decoded on the host threads) and everything after them on the device;
without one the pipeline is built with ``device_id=None`` and runs on the CPU. The sampling
plan, sharding, labels, augmentation and normalisation are those of
:class:`~usfmae_fast.data.load.torch_loader.TorchImageLoader`:

- pretrain / train: ``decoders.image_random_crop`` (area ``crop_scale``, default 0.2-1,
  aspect 3/4-4/3; torchvision's rejection sampling and whole-image fallback, also for an area
  above 1) -> resize to S x S (``crop_interpolation``, antialiased) -> ``crop_mirror_normalize``
  with a random horizontal flip. With ``resize`` or a rotation the crop cannot be fused into the
  decoder: ``decoders.image`` -> resize to S x S (``resize``) -> rotation (``fn.rotate``,
  counter-clockwise for a positive angle, as torchvision) -> ``random_resized_crop`` (same sampling)
  -> optional vertical flip (``fn.flip``) -> ``crop_mirror_normalize``;
- eval: ``decoders.image`` -> short side to S -> centre crop S x S -> normalise.

Output: CHW, float16 from DALI for half dtypes (float32 otherwise), cast to ``cfg.dtype`` on
the device. Augmentation draws from the pipeline's seeded generators: a run is reproducible for
the same seed and the same sequence of epochs, but unlike the torch loader a sample's
augmentation is not a function of (epoch, index) alone.

Encoded bytes enter through ``fn.external_source``, read ahead by a thread pool, instead of
``fn.readers.file`` / ``fn.readers.webdataset``, so that the loader knows which files every
batch in flight holds. A DALI decoder fails the whole pipeline on a corrupt file and the
pipeline cannot run again; the loader then finds the bad files of the failed batch with PIL,
leaves them out for the rest of the run (:class:`BadImageWarning`), builds a new pipeline and
resumes at that batch. Every recovery removes at least one file, so this always ends.
"""
from __future__ import annotations

import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch

from .image_files import ImageList, read_bytes, warn_bad
from .base import RATIO, EpochLoader, LoaderConfig, decode_image

_INTERP = {"nearest": "INTERP_NN", "bilinear": "INTERP_LINEAR", "bicubic": "INTERP_CUBIC"}

_DECODER_OPERATOR = "fn.decoders."  # how DALI names the operator in a decoding error


def dali_available() -> tuple[bool, str]:
    """Whether ``nvidia.dali`` imports here, and its version or the reason it does not."""
    try:
        import nvidia.dali
    except Exception as exc:  # ImportError, or a broken install failing on load
        return False, f"nvidia-dali does not import: {type(exc).__name__}: {exc}"
    return True, f"nvidia-dali {nvidia.dali.__version__}"


@dataclass
class _Batch:
    epoch: int
    number: int          # position in the epoch's plan
    last: bool           # the epoch's final planned batch
    indices: list[int]   # the records fed to the pipeline, in order


class DaliImageLoader(EpochLoader):
    """Image files -> ``(images [B, C, S, S] on cfg.device in cfg.dtype, labels | None)``.

    ``cfg.workers`` is the number of DALI CPU threads; ``prefetch`` the pipeline's queue depth;
    ``read_ahead`` how many batches of file bytes are read before DALI asks for them.
    """

    def __init__(self, images: ImageList, cfg: LoaderConfig, prefetch: int = 2,
                 read_ahead: int = 2):
        super().__init__(images, cfg)
        if cfg.device.type not in ("cpu", "cuda"):
            raise ValueError(f"DALI runs on cpu or cuda devices, not {cfg.device}")
        self.device_id = None
        if cfg.device.type == "cuda":
            self.device_id = (cfg.device.index if cfg.device.index is not None
                              else torch.cuda.current_device())
        self.backend = "dali-cpu" if self.device_id is None else "dali-gpu"
        self._prefetch, self._read_ahead = prefetch, read_ahead
        self._pool = ThreadPoolExecutor(read_ahead + 1, thread_name_prefix="dali-read")
        self._bad: set[int] = set()
        self._ahead: deque = deque()      # (_Batch, future of its bytes), read but not fed
        self._in_flight: deque = deque()  # _Batch fed to the pipeline, output not taken yet
        self._pending = None              # an output taken past the end of an epoch
        self._resume_at = None            # plan position of the pipeline's next output
        self._cursor = (0, 0)             # plan position of the next batch to read
        self._plan_of = (-1, [])          # (epoch, plan) last used by the cursor
        self._iterator = self._pipe = None
        self._builds = 0
        self._restart(0, 0)  # build now: a DALI / CUDA that cannot start fails here, not later

    # -- iteration ---------------------------------------------------------------------------
    def __iter__(self):
        epoch, start = self._take_epoch()
        if start >= len(self.plan(epoch)):
            return
        if self._iterator is None or self._resume_at != (epoch, start):
            self._restart(epoch, start)
        while True:
            batch, images = self._pending or self._next_output()
            self._pending = None
            if batch.epoch != epoch:  # this epoch's last planned batches held only bad files
                self._pending, self._resume_at = (batch, images), (batch.epoch, 0)
                return
            self._resume_at = (epoch + 1, 0) if batch.last else (epoch, batch.number + 1)
            labels = (torch.tensor([self.images.records[i].label for i in batch.indices])
                      if self.with_labels else None)
            yield self._output(images, labels)
            if batch.last:
                return

    def _next_output(self) -> tuple[_Batch, torch.Tensor]:
        while True:
            try:
                images = next(self._iterator)[0]["images"]
            except RuntimeError as exc:
                if _DECODER_OPERATOR not in str(exc):
                    raise
                self._recover(exc)
                continue
            batch = self._in_flight.popleft()
            if images.shape[0] != len(batch.indices):
                raise RuntimeError(f"DALI returned {images.shape[0]} images for a batch of "
                                   f"{len(batch.indices)}: the feed is out of step")
            return batch, images

    # -- feeding -----------------------------------------------------------------------------
    def _next_planned(self) -> _Batch:
        """The planned batch at the cursor; the cursor moves on, into the next epoch."""
        epoch, number = self._cursor
        if self._plan_of[0] != epoch:
            self._plan_of = (epoch, self.plan(epoch))
        plan = self._plan_of[1]
        last = number == len(plan) - 1
        self._cursor = (epoch + 1, 0) if last else (epoch, number + 1)
        return _Batch(epoch, number, last, [int(i) for i in plan[number] if i not in self._bad])

    def _feed(self) -> list[np.ndarray]:
        """The external source: encoded images of the next batch that has any left."""
        while True:
            while len(self._ahead) <= self._read_ahead:
                batch = self._next_planned()
                future = self._pool.submit(_read, self.images.records, batch.indices)
                self._ahead.append((batch, future))
            batch, future = self._ahead.popleft()
            batch.indices, data, failed = future.result()
            self._leave_out(failed)
            if data:
                self._in_flight.append(batch)
                return data

    # -- bad files ---------------------------------------------------------------------------
    def _leave_out(self, bad: list[tuple[int, str]]) -> None:
        if not bad:
            return
        self._bad.update(i for i, _ in bad)
        warn_bad([(self.images.records[i].name, reason) for i, reason in bad])
        if len(self._bad) == len(self.images):
            raise RuntimeError("no image of this loader can be read or decoded")

    def _undecodable(self, batch: _Batch) -> list[tuple[int, str]]:
        found = []
        for i in batch.indices:
            try:
                decode_image(read_bytes(self.images.records[i]), self.cfg.channels)
            except Exception as exc:
                found.append((i, f"{type(exc).__name__}: {exc}"))
        return found

    def _recover(self, error: Exception) -> None:
        """A decoder failed a batch in flight: leave out its bad files, resume at that batch."""
        suspects = list(self._in_flight)
        if not suspects:
            raise error
        # DALI raises with the output of the failed batch, the oldest one in flight; look
        # further only if PIL decodes all of that batch.
        for batch in suspects:
            if found := self._undecodable(batch):
                break
        if not found:  # PIL decodes them all, DALI does not: give up the whole failed batch
            reason = "DALI: " + str(error).strip().splitlines()[-1][:200]
            found = [(i, reason) for i in suspects[0].indices]
        self._leave_out(found)
        self._restart(suspects[0].epoch, suspects[0].number)

    # -- pipeline ----------------------------------------------------------------------------
    def _restart(self, epoch: int, number: int) -> None:
        from nvidia.dali.plugin.pytorch import DALIGenericIterator

        self._drop_pipeline()
        self._cursor = self._resume_at = (epoch, number)
        seed = np.random.SeedSequence([self.cfg.seed, self.cfg.rank, self._builds])
        self._builds += 1
        self._pipe = self._build(int(seed.generate_state(1)[0]))
        self._iterator = DALIGenericIterator([self._pipe], ["images"], prepare_first_batch=False)

    def _drop_pipeline(self) -> None:
        for _, future in self._ahead:
            future.cancel()
        self._ahead.clear()
        self._in_flight.clear()
        self._pending = self._iterator = self._pipe = None

    def _build(self, seed: int):
        from nvidia.dali import fn, pipeline_def, types

        cfg, size = self.cfg, self.cfg.img_size
        decoder = "cpu" if self.device_id is None else "mixed"
        color = types.GRAY if cfg.channels == 1 else types.RGB
        half = cfg.dtype in (torch.float16, torch.bfloat16)  # DALI has no bfloat16 output

        @pipeline_def(batch_size=cfg.batch_size, num_threads=max(1, cfg.workers),
                      device_id=self.device_id, seed=seed, prefetch_queue_depth=self._prefetch)
        def pipeline():
            encoded = fn.external_source(source=_WeakFeed(self), batch=True,
                                         dtype=types.UINT8, ndim=1)
            if cfg.train:
                images = _augment(fn, types, cfg, encoded, decoder, color)
                mirror = fn.random.coin_flip(probability=cfg.hflip)
            else:
                images = fn.decoders.image(encoded, device=decoder, output_type=color)
                images = fn.resize(images, resize_shorter=size, interp_type=types.INTERP_CUBIC,
                                   antialias=True)
                mirror = 0
            return fn.crop_mirror_normalize(
                images, crop=(size, size), mirror=mirror, output_layout="CHW",
                mean=[255 * m for m in cfg.mean], std=[255 * s for s in cfg.std],
                dtype=types.FLOAT16 if half else types.FLOAT)

        pipe = pipeline()
        pipe.build()
        return pipe

    def close(self) -> None:
        """Release the pipeline and the read threads (also done when garbage-collected)."""
        self._drop_pipeline()
        self._pool.shutdown(wait=False, cancel_futures=True)

    def __del__(self):
        if getattr(self, "_pool", None) is not None:
            self.close()


def _augment(fn, types, cfg: LoaderConfig, encoded, decoder: str, color):
    """Decoded, geometrically augmented ``HWC`` images of S x S (all but the horizontal flip,
    which ``crop_mirror_normalize`` does), in the torch loader's order."""
    size, low_high = cfg.img_size, cfg.rotate
    crop = dict(random_area=list(cfg.crop_scale), random_aspect_ratio=list(RATIO),
                num_attempts=10)
    crop_interp = getattr(types, _INTERP[cfg.crop_interpolation])
    if cfg.resize is None and low_high == (0, 0):  # the fast path: crop while decoding
        images = fn.decoders.image_random_crop(encoded, device=decoder, output_type=color,
                                               **crop)
        images = fn.resize(images, resize_x=size, resize_y=size, interp_type=crop_interp,
                           antialias=True)
    else:
        images = fn.decoders.image(encoded, device=decoder, output_type=color)
        if cfg.resize is not None:
            images = fn.resize(images, resize_x=size, resize_y=size,
                               interp_type=getattr(types, _INTERP[cfg.resize]),
                               antialias=cfg.resize != "nearest")
        if low_high != (0, 0):  # a positive angle turns counter-clockwise, as torchvision's
            low, high = low_high
            angle = low if low == high else fn.random.uniform(range=(low, high))
            images = fn.rotate(images, angle=angle, keep_size=True, fill_value=0,
                               interp_type=getattr(types, _INTERP[cfg.rotate_interpolation]))
        images = fn.random_resized_crop(images, size=(size, size), interp_type=crop_interp,
                                        antialias=True, **crop)
    if cfg.vflip > 0:
        images = fn.flip(images, horizontal=0, vertical=fn.random.coin_flip(
            probability=cfg.vflip))
    return images


def _read(records, indices: list[int]):
    """-> (indices read, their bytes, [(index, reason) of those that could not be read])."""
    kept, data, failed = [], [], []
    for i in indices:
        try:
            data.append(np.frombuffer(read_bytes(records[i]), np.uint8))
            kept.append(i)
        except OSError as exc:
            failed.append((i, f"{type(exc).__name__}: {exc}"))
    return kept, data, failed


class _WeakFeed:
    """The pipeline's source: DALI holds it from C++, out of the garbage collector's sight, so
    a strong reference back to the loader would keep loader and pipeline alive for ever."""

    def __init__(self, loader: DaliImageLoader):
        self._loader = weakref.ref(loader)

    def __call__(self) -> list[np.ndarray]:
        return self._loader()._feed()
