"""The image files a loader reads, shared by the DALI and the torch loader.

Sources: an ingest ``manifest.csv`` (or any CSV with a ``path`` column, paths relative to the
CSV), a directory (its ``manifest.csv`` when it has one, else every PNG / JPEG below it, else
its ``.tar`` shards), or webdataset-style uncompressed tar shards (a ``.tar`` path, a glob, or a
list of them; members ``<key>.png|jpg|jpeg``, optional ``<key>.cls`` label text; other members
such as ingest's ``<key>.json`` are ignored). Labels: none (pretraining), a CSV
with ``path,label`` columns (paths relative to that CSV; for shards, the member name), the
first folder of each image's path (``"folder"``, folder-per-class), or the shards' ``.cls``
members (``"cls"``).

Every file is checked when the list is built: ``check="header"`` (default) reads 16 bytes at
the start and 1 KiB at the end (PNG signature + IEND chunk, JPEG SOI + EOI marker), which finds
empty, truncated and non-image files at the cost of two small reads; ``"full"`` decodes each
image with PIL. Failures are left out with a :class:`BadImageWarning`. Both loaders also skip
a file whose decoding fails later, so this check is what keeps batches full, not what keeps a
run alive.

:func:`epoch_batches` is the one sampling plan both loaders follow: a seeded permutation per
epoch, cut into equal shards per rank (``DistributedSampler`` with ``drop_last``), then batches.
"""
from __future__ import annotations

import csv
import glob
import io
import os
import tarfile
import warnings
from collections import Counter
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

PathLike = str | os.PathLike
PNG_JPEG_SUFFIXES = (".png", ".jpg", ".jpeg")
CHECKS = ("header", "full", "none")
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"
_TAIL = 1024  # JPEGs may carry a few padding bytes after EOI


class BadImageWarning(UserWarning):
    """An image file was left out because it cannot be read or decoded."""


@dataclass(frozen=True)
class ImageRecord:
    """One image: a file, or a member of a tar shard (``offset`` / ``size`` inside ``path``)."""
    path: str
    name: str            # path relative to the dataset root, or the member name in its shard
    offset: int = 0
    size: int = -1       # -1: the whole file
    label: int = -1      # index into ImageList.classes; -1 when unlabelled

    @property
    def in_shard(self) -> bool:
        return self.size >= 0


@dataclass
class ImageList:
    records: list[ImageRecord]
    classes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.records)

    @property
    def labelled(self) -> bool:
        return bool(self.classes)

    def subset(self, indices: Sequence[int]) -> ImageList:
        """The images at ``indices`` (e.g. one fold), same class list."""
        return ImageList([self.records[int(i)] for i in indices], list(self.classes))


def read_bytes(record: ImageRecord) -> bytes:
    with open(record.path, "rb") as f:
        if not record.in_shard:
            return f.read()
        f.seek(record.offset)
        data = f.read(record.size)
    if len(data) != record.size:
        raise OSError(f"{record.path} ends inside member {record.name}")
    return data


def warn_bad(bad: Sequence[tuple[str, str]], where: str = "") -> None:
    """One :class:`BadImageWarning` naming (up to 10 of) the ``(name, reason)`` pairs."""
    if not bad:
        return
    shown = "; ".join(f"{name}: {reason}" for name, reason in bad[:10])
    more = f" (and {len(bad) - 10} more)" if len(bad) > 10 else ""
    warnings.warn(f"skipped {len(bad)} unreadable image(s){where}: {shown}{more}",
                  BadImageWarning, stacklevel=3)


def image_problem(record: ImageRecord, check: str = "header") -> str | None:
    """Why ``record`` cannot be used (``None`` when it passes ``check``)."""
    try:
        if check == "full":
            from PIL import Image
            Image.open(io.BytesIO(read_bytes(record))).load()
            return None
        size = record.size if record.in_shard else os.path.getsize(record.path)
        if size == 0:
            return "empty file"
        with open(record.path, "rb") as f:
            f.seek(record.offset)
            head = f.read(16)
            f.seek(record.offset + max(0, size - _TAIL))
            tail = f.read(min(size, _TAIL))
    except Exception as exc:  # any failure to open or decode means: leave it out
        return f"{type(exc).__name__}: {exc}"
    if head.startswith(_PNG_SIGNATURE):
        return None if tail.endswith(_PNG_IEND) else "truncated PNG (no IEND chunk at the end)"
    if head.startswith(b"\xff\xd8\xff"):
        return None if b"\xff\xd9" in tail else "truncated JPEG (no EOI marker at the end)"
    return "not a PNG or JPEG file"


def check_images(records: list[ImageRecord], check: str = "header",
                 threads: int | None = None) -> list[ImageRecord]:
    """``records`` without those failing ``check`` (one warning lists them)."""
    if check not in CHECKS:
        raise ValueError(f"check must be one of {CHECKS}, got {check!r}")
    if check == "none" or not records:
        return list(records)
    threads = threads or min(16, 2 * (os.cpu_count() or 1))
    if len(records) < 256 or threads == 1:
        problems = [image_problem(r, check) for r in records]
    else:  # small reads: I/O latency, not the GIL, bounds this
        with ThreadPoolExecutor(threads) as pool:
            problems = list(pool.map(lambda r: image_problem(r, check), records))
    warn_bad([(r.name, p) for r, p in zip(records, problems) if p is not None])
    return [r for r, p in zip(records, problems) if p is None]


def _is_image(name: str) -> bool:
    return name.lower().endswith(PNG_JPEG_SUFFIXES)


def _from_csv(csv_path: Path) -> list[ImageRecord]:
    root = csv_path.parent
    with csv_path.open(newline="") as f:
        reader = csv.DictReader(f)
        if "path" not in (reader.fieldnames or []):
            raise ValueError(f"{csv_path} has no 'path' column (columns: {reader.fieldnames})")
        names = [row["path"].strip() for row in reader if (row["path"] or "").strip()]
    return [ImageRecord(str((root / n).resolve()), Path(n).as_posix()) for n in names]


def image_records_in(root: Path) -> list[ImageRecord]:
    """Every image file below ``root``, in sorted order, named relative to it."""
    files = sorted(p for p in root.rglob("*") if p.is_file() and _is_image(p.name))
    return [ImageRecord(str(p.resolve()), p.relative_to(root).as_posix()) for p in files]


def _shard_key(member: str) -> str:
    head, _, base = member.rpartition("/")
    return f"{head}/{base.split('.', 1)[0]}" if head else base.split(".", 1)[0]


def _from_shards(shards: Sequence[Path]) -> tuple[list[ImageRecord], dict[tuple[str, str], str]]:
    """Image members of uncompressed tars; also ``{(shard, key): text of key.cls}``."""
    records, cls = [], {}
    for shard in shards:
        try:
            tar = tarfile.open(shard, mode="r:")  # random access needs an uncompressed tar
        except tarfile.ReadError as exc:
            raise ValueError(f"{shard}: not an uncompressed tar shard ({exc})") from exc
        with tar:
            for m in tar:
                if not m.isfile():
                    continue
                if _is_image(m.name):
                    records.append(ImageRecord(str(shard.resolve()), m.name, m.offset_data, m.size))
                elif m.name.endswith(".cls"):
                    cls[(str(shard.resolve()), _shard_key(m.name))] = \
                        tar.extractfile(m).read().decode().strip()
    return records, cls


def _expand(source) -> list[Path]:
    if isinstance(source, (str, os.PathLike)):
        text = os.fspath(source)
        if any(c in text for c in "*?["):
            paths = sorted(Path(p) for p in glob.glob(text))
            if not paths:
                raise FileNotFoundError(f"no file matches {text!r}")
            return paths
        return [Path(text)]
    return [Path(p) for p in source]


def sort_class_names(values: set[str]) -> list[str]:
    """Class names in order: numerically when every name is an integer."""
    try:
        return sorted(values, key=int)
    except ValueError:
        return sorted(values)


def _csv_labels(path: Path, records: list[ImageRecord]) -> list[str | None]:
    """Labels of a ``path,label`` CSV: files match by resolved path (CSV paths relative to
    the CSV), shard members by name, or by file name alone where that is unique in the CSV
    (ingest's shards hold ``<key>.png`` for the manifest's ``images/<hh>/<key>.png``)."""
    with path.open(newline="") as f:
        reader = csv.DictReader(f)
        if not {"path", "label"} <= set(reader.fieldnames or []):
            raise ValueError(f"{path} needs 'path' and 'label' columns (has {reader.fieldnames})")
        rows = [(row["path"].strip(), row["label"].strip()) for row in reader]
    rows = [(p, label) for p, label in rows if p and label]
    by_path = {str((path.parent / p).resolve()): label for p, label in rows}
    by_member = {Path(p).as_posix(): label for p, label in rows}
    base_count = Counter(Path(p).name for p, _ in rows)
    by_base = {Path(p).name: label for p, label in rows if base_count[Path(p).name] == 1}
    return [by_member.get(r.name, by_base.get(Path(r.name).name)) if r.in_shard
            else by_path.get(r.path) for r in records]


def _label_names(records: list[ImageRecord], labels, cls: dict) -> list[str | None]:
    if labels == "folder":
        names = [r.name.split("/", 1)[0] if "/" in r.name else None for r in records]
        if missing := [r.name for r, n in zip(records, names) if n is None][:3]:
            raise ValueError(f"labels='folder' needs every image inside a class folder; "
                             f"not: {missing}")
        return names
    if labels == "cls":
        return [cls.get((r.path, _shard_key(r.name))) for r in records]
    return _csv_labels(Path(labels), records)


def load_image_list(source, labels: str | PathLike | None = None,
                    check: str = "header") -> ImageList:
    """The checked images of ``source`` with their labels (see the module docstring)."""
    if isinstance(source, ImageList):
        return source
    paths = _expand(source)
    cls: dict = {}
    if all(p.suffix == ".tar" for p in paths):
        records, cls = _from_shards(paths)
    elif len(paths) == 1 and paths[0].is_dir():
        manifest = paths[0] / "manifest.csv"
        records = _from_csv(manifest) if manifest.is_file() else image_records_in(paths[0])
        if not records and (shards := sorted(paths[0].glob("*.tar"))):
            records, cls = _from_shards(shards)
    elif len(paths) == 1 and paths[0].suffix == ".csv":
        records = _from_csv(paths[0])
    elif len(paths) == 1 and not paths[0].exists():
        raise FileNotFoundError(f"{paths[0]} does not exist")
    else:
        raise ValueError(f"source must be a manifest CSV, a directory or .tar shards: {source!r}")
    if labels == "cls" and not any(r.in_shard for r in records):
        raise ValueError("labels='cls' reads the .cls members of tar shards")
    classes: list[str] = []
    if labels is not None:
        names = _label_names(records, labels, cls)
        unlabelled = [r.name for r, n in zip(records, names) if n is None]
        if unlabelled:
            warnings.warn(f"{len(unlabelled)} image(s) have no label in {labels} and are left "
                          f"out, e.g. {unlabelled[:3]}", stacklevel=2)
        classes = sort_class_names({n for n in names if n is not None})
        index = {c: i for i, c in enumerate(classes)}
        records = [replace(r, label=index[n]) for r, n in zip(records, names) if n is not None]
    records = check_images(records, check)
    if not records:
        raise ValueError(f"no usable image in {source!r}")
    return ImageList(records, classes)


def epoch_batches(num_images: int, batch_size: int, *, epoch: int = 0, seed: int = 0,
                  shuffle: bool = True, drop_last: bool = True, rank: int = 0,
                  world_size: int = 1) -> list[np.ndarray]:
    """Indices of this rank's batches in ``epoch``.

    ``shuffle``: one permutation per (seed, epoch), the same on every rank. ``drop_last``
    (training): every rank gets ``num_images // world_size`` images and only full batches, so
    all ranks run the same number of steps; otherwise (evaluation) rank ``r`` takes every
    ``world_size``-th image from ``r`` and the last batch may be short.
    """
    if batch_size <= 0 or world_size <= 0 or not 0 <= rank < world_size:
        raise ValueError(f"bad batch_size / rank / world_size: {batch_size}, {rank}, {world_size}")
    order = (np.random.default_rng([seed, epoch]).permutation(num_images) if shuffle
             else np.arange(num_images))
    if drop_last:
        order = order[:num_images // world_size * world_size]
    mine = order[rank::world_size]
    stop = len(mine) // batch_size * batch_size if drop_last else len(mine)
    return [mine[i:i + batch_size] for i in range(0, stop, batch_size)]
