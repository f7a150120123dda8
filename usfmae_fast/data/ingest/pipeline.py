"""``usfmae-fast ingest``: raw ultrasound files -> clean 8-bit images + ``manifest.csv``.

Reads DICOM, NIfTI, PNG/JPEG/BMP/TIFF and video (:mod:`.readers`), crops each frame to its
scan area, removes burned-in text and calipers and resizes it (:mod:`.clean`), drops empty
frames (one value everywhere, e.g. the blank slices of a volume) and duplicates, and writes:

``out/images/<hh>/<name>-<hash>_<frame>.png`` (or ``.jpg``)
    one per kept frame; ``<hash>`` is derived from the source path, ``<hh>`` its first two
    characters (no folder grows past a few thousand files).
``out/manifest.csv``
    one row per image: the columns of :data:`MANIFEST_COLUMNS`, ``path`` the image relative
    to the manifest, ``source`` the file it came from. Patient / study / series
    ids come from DICOM headers (empty for other formats) and feed patient-grouped splits.
``out/errors.csv``
    every file of this run that could not be read, with the reason (which names the file).
``out/done.csv``
    the source files already ingested (path, size, mtime): a re-run skips them, so an
    interrupted run resumes; a file that changed, and every file that failed, is read again.
``out/summary.json``, ``out/options.json``
    this run's counts; the cleaning options, which a resumed run must share.
``out/shards/shard-NNNNNN.tar`` (``shard_size`` > 0)
    webdataset tars of ``<key>.png`` + ``<key>.json`` (its manifest row), the layout DALI's
    ``fn.readers.webdataset(paths=..., ext=["png", "json"])`` reads; rebuilt from the whole
    manifest at the end of each run.

Duplicates: a frame whose pixels equal an image already written (from any file, this run or
an earlier one) is an exact duplicate; a frame whose 256-bit difference hash
(:func:`.clean.difference_hash`) is within ``near_dup_bits`` bits of the last frame kept
*from the same file* is a near duplicate. The comparison is per file because near-repeats are
what cine loops, videos and neighbouring slices are made of, while distinct patients' scans
can look alike at 16x16 (and a cross-file search would need an index over all hashes); the
default of 10 bits (4 %) keeps about one frame in four of the 120-frame echo loop in
pydicom-data.

A source is read, cleaned and encoded in a worker process; the parent writes, so the
manifest and the cross-file duplicate check have one writer. A file that fails part-way (a
video cut short, a cine loop with a broken frame) is reported whole and writes nothing. A
worker that dies (a decoder crash) costs only the file it was reading: the files in flight
are retried one per process and the one that kills a worker again is reported as
unreadable. Workers are spawned, not forked, so a script that calls :func:`ingest` with
``workers`` > 1 needs the usual ``if __name__ == "__main__":`` guard; they die with the run
(:func:`_die_with_parent`), and import no torch.

Memory per worker follows the frames (see :mod:`.readers`): a file whose frames to read hold
more than ``max_pixels`` pixels in all is refused before decoding, and so is one whose header
declares more than its data can hold. Inputs that are not files (FIFOs, devices, sockets,
dangling links, symlink loops, folders that cannot be listed) are reported in ``errors.csv``
and never opened.
"""
from __future__ import annotations

import csv
import ctypes
import dataclasses
import errno
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import signal
import stat
import sys
import tarfile
import threading
import time
from collections import deque
from collections.abc import Iterable, Iterator
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

from ...runtime.files import atomic_write
from ...runtime.lock import output_lock
from .dicom_frames import PathLike
from .readers import open_source

log = logging.getLogger(__name__)

_HEADER_COLUMNS = ["patient_id", "study_uid", "series_uid", "sop_uid", "modality", "vendor",
                   "model"]  # from DICOM headers (see readers._dicom); empty for other formats
MANIFEST_COLUMNS = ["path", "source", "kind", "frame", *_HEADER_COLUMNS, "orig_width",
                    "orig_height", "crop_x0", "crop_y0", "crop_x1", "crop_y1", "crop_source",
                    "width", "height", "channels", "content_hash"]
_INT_COLUMNS = {"frame", "orig_width", "orig_height", "crop_x0", "crop_y0", "crop_x1", "crop_y1",
                "width", "height", "channels"}
_DONE_COLUMNS = ["source", "size", "mtime_ns", "frames_read", "frames_written"]
_PR_SET_PDEATHSIG = 1  # linux/prctl.h


class IngestError(RuntimeError):
    """A strict run met files it could not read (they are listed in errors.csv)."""


@dataclasses.dataclass(frozen=True)
class IngestOptions:
    """How frames are cleaned and written (see :mod:`.clean`); a resumed run must use the same."""
    max_side: int = 512              # longer side of the written images (never enlarged)
    keep_color: bool = False         # write colour sources (e.g. Doppler) as RGB
    image_format: str = "png"        # "png" or "jpeg"
    jpeg_quality: int = 95
    frame_stride: int = 1            # every n-th frame of a cine loop or video
    nifti_axis: int = 2              # the axis 3-D volumes are sliced along
    crop: bool = True                # crop to the scan area
    remove_text: bool = True         # inpaint burned-in text and calipers
    near_dup_bits: int = 10          # Hamming distance of a near duplicate; < 0: keep them
    max_pixels: int = 150_000_000    # most pixels read from one file (frames x width x height)

    def __post_init__(self):
        if self.image_format not in ("png", "jpeg"):
            raise ValueError(f"image_format must be 'png' or 'jpeg', not {self.image_format!r}")
        if self.max_side < 16 or self.frame_stride < 1 or not 1 <= self.jpeg_quality <= 100:
            raise ValueError(f"bad options: {self}")


def _validate_run(self):
    """``ValueError`` naming the field out of range."""
    IngestOptions(**self.options())  # its own checks
    for name, ok, accepted in (
            ("workers", self.workers is None or self.workers >= 1, ">= 1, or unset"),
            ("shard_size", self.shard_size >= 0, ">= 0, 0 = no shards"),
            ("max_pixels", self.max_pixels >= 1, ">= 1"),
            ("out", bool(self.out), "an output folder")):
        if not ok:
            raise ValueError(f"{name}: {getattr(self, name)!r} is out of range; accepted: "
                             f"{accepted}")
    return self


# An ``ingest`` run: the IngestOptions fields (their defaults read from IngestOptions, not
# written twice) + where from, where to and how; the fields of the command's --config / --set.
IngestConfig = dataclasses.make_dataclass(
    "IngestConfig",
    [(f.name, f.type, dataclasses.field(default=f.default))
     for f in dataclasses.fields(IngestOptions)]
    + [("sources", "list[str]", dataclasses.field(default_factory=list)),  # files or folders
       ("out", "str", dataclasses.field(default="")),                     # output folder
       ("workers", "int | None", dataclasses.field(default=None)),        # None: one per core
       ("shard_size", "int", dataclasses.field(default=0)),  # also tar shards of this many
       ("strict", "bool", dataclasses.field(default=False)),  # IngestError when a file fails
       ("progress", "bool", dataclasses.field(default=True))],
    namespace={"validate": _validate_run,
               "options": lambda self: {f.name: getattr(self, f.name)
                                        for f in dataclasses.fields(IngestOptions)}})
IngestConfig.__module__ = __name__


def find_sources(sources: Iterable[PathLike],
                 exclude: PathLike | None = None) -> tuple[list[Path], list[dict]]:
    """Files under ``sources`` (files or folders, searched recursively, links to folders
    followed; hidden names and the folder ``exclude`` skipped) as absolute paths, and
    ``{"source", "reason"}`` for each source or entry that is not a readable file or folder:
    missing, a dangling link, a symlink loop, a FIFO, a device, a socket, a folder that cannot
    be listed. None of those is ever opened (a FIFO would block the run)."""
    skip = Path(exclude).absolute() if exclude is not None else None
    skip_id = _entry_kind(skip)[2] if skip is not None else None
    files, problems, seen, walked = [], [], set(), set()
    for src in sources:
        src = Path(src).absolute()
        stack = [(src, ())]  # (path, identities of the folders above it)
        while stack:
            path, above = stack.pop()
            kind, why, identity = _entry_kind(path)
            if kind == "file" and path not in seen:
                seen.add(path)
                files.append(path)
            elif kind == "folder" and identity != skip_id:
                if identity in above:
                    problems.append({"source": str(path), "reason": f"{path}: symlink loop "
                                     "(it leads back to a folder that contains it); not followed"})
                    continue
                if identity in walked:  # a second link to one folder: its files are listed
                    continue
                walked.add(identity)
                try:
                    names = sorted(e.name for e in os.scandir(path) if not e.name.startswith("."))
                except OSError as exc:
                    problems.append({"source": str(path), "reason": f"{path}: cannot list the "
                                     f"folder ({exc.strerror or exc})"})
                    continue
                stack.extend((path / name, above + (identity,)) for name in reversed(names)
                             if skip is None or not (path / name).is_relative_to(skip))
            elif kind == "unreadable":
                problems.append({"source": str(path), "reason": f"{path}: {why}"})
    return files, problems


def _entry_kind(path: Path) -> tuple[str, str, tuple[int, int] | None]:
    """``("file" | "folder" | "unreadable", why, (device, inode))`` of a path, links followed."""
    link = f" (a link to {os.readlink(path)})" if os.path.islink(path) else ""
    try:
        info = os.stat(path)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            return "unreadable", f"symlink loop{link}: it never reaches a file", None
        if exc.errno == errno.ENOENT:
            return "unreadable", (f"dangling symlink{link}: its target does not exist" if link
                                  else "no such file or folder"), None
        return "unreadable", f"cannot be read{link} ({exc.strerror or exc})", None
    identity = (info.st_dev, info.st_ino)
    if stat.S_ISREG(info.st_mode):
        return "file", "", identity
    if stat.S_ISDIR(info.st_mode):
        return "folder", "", identity
    what = ("a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else
            "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else
            "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file")
    return "unreadable", f"{what}{link}, not a file: not read", identity


def _image_name(source: str, frame: int, image_format: str) -> str:
    """The image's path in the output folder; its name up to the suffix is its webdataset key,
    so it has no dots (webdataset readers split the key from the extension at the first)."""
    name = Path(source).name
    name = Path(name[:-3] if name.lower().endswith(".gz") else name).stem  # scan.nii.gz -> scan
    stem = re.sub(r"[^A-Za-z0-9_-]+", "_", name)[:60]
    digest = hashlib.blake2b(source.encode(), digest_size=5).hexdigest()  # stable per source path
    return f"images/{digest[:2]}/{stem}-{digest}_{frame:05d}.{'png' if image_format == 'png' else 'jpg'}"


def _reason(path: str, exc: BaseException) -> str:
    text = str(exc)
    return text if text.startswith(path) else f"{path}: {type(exc).__name__}: {text}"


def ingest_file(path: str, options: IngestOptions) -> dict:
    """Read, clean, de-duplicate (within the file) and encode one source: a result for the
    writer with ``rows`` (each holding its encoded ``data``), counts, or an ``error``."""
    from .clean import clean_frame, content_hash, difference_hash, encode, hamming  # OpenCV: on use

    result = {"source": path, "error": None, "rows": [], "frames_read": 0, "empty": 0,
              "exact_duplicates": 0, "near_duplicates": 0}
    try:
        info = os.stat(path)
        result.update(size=info.st_size, mtime_ns=info.st_mtime_ns)
        if not stat.S_ISREG(info.st_mode):  # replaced since it was found: never open a FIFO
            raise ValueError(f"{path}: {_entry_kind(Path(path))[1] or 'not a regular file'}")
        if info.st_size == 0:
            raise ValueError(f"{path}: empty file (0 bytes)")
        source = open_source(path, frame_stride=options.frame_stride, nifti_axis=options.nifti_axis,
                             max_pixels=options.max_pixels)
        seen, last = set(), None
        for index, frame in source.frames:
            result["frames_read"] += 1
            img, box, crop_source = clean_frame(frame, source.region, max_side=options.max_side,
                                                keep_color=options.keep_color, crop=options.crop,
                                                remove_text=options.remove_text)
            if img.min() == img.max():
                result["empty"] += 1
                continue
            digest = content_hash(img)
            if digest in seen:
                result["exact_duplicates"] += 1
                continue
            phash = difference_hash(img)
            if last is not None and hamming(phash, last) <= options.near_dup_bits:
                result["near_duplicates"] += 1
                continue
            seen.add(digest)
            last = phash
            result["rows"].append({
                "path": _image_name(path, index, options.image_format), "source": path,
                "kind": source.kind, "frame": index,
                **{k: source.meta.get(k, "") for k in _HEADER_COLUMNS},
                "orig_width": frame.shape[1], "orig_height": frame.shape[0],
                "crop_x0": box[0], "crop_y0": box[1], "crop_x1": box[2], "crop_y1": box[3],
                "crop_source": crop_source, "width": img.shape[1], "height": img.shape[0],
                "channels": 1 if img.ndim == 2 else img.shape[2], "content_hash": digest,
                "data": encode(img, options.image_format, options.jpeg_quality)})
    except Exception as exc:  # any failure is this file's: report it, keep going
        result.update(error=_reason(path, exc), rows=[])
    return result


def _init_worker(parent: int) -> None:
    """First thing in each worker: die with the parent ``parent``, one OpenCV thread."""
    _die_with_parent(parent)
    import cv2
    cv2.setNumThreads(1)  # one process per core already


def _die_with_parent(parent: int) -> None:
    """A worker whose ``ingest`` is killed (``kill -9``, OOM killer) must not run on, decoding
    for nobody. On Linux the kernel sends it SIGKILL when the parent dies (prctl
    PR_SET_PDEATHSIG: immediate, even inside a long C call that holds the GIL); everywhere, a
    thread checks every half second that the parent is still there. (The kernel's signal
    follows the parent *thread* that started the worker: :func:`run_parallel` starts and shuts
    down its pools in the one thread that iterates it.)"""
    if sys.platform.startswith("linux"):
        try:
            ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
        except (OSError, AttributeError):
            pass
    if os.getppid() != parent:  # it died before the signal was asked for
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(0.5)
        os._exit(1)

    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _crashed(path: str) -> dict:
    return {"source": path, "rows": [], "error": f"{path}: the reading process died "
            "(a decoder crashed on this file)"}


def run_parallel(fn, paths: list[str], options, workers: int) -> Iterator[dict]:
    """``fn(path, options)`` for each path, in order, in ``workers`` processes (in this one when
    ``workers`` <= 1). A dead worker breaks its pool: the files in flight are then run again
    one per fresh process; one that kills that too yields :func:`_crashed`."""
    if workers <= 1:
        yield from (fn(p, options) for p in paths)
        return
    context = multiprocessing.get_context("spawn")  # fork after torch / OpenMP threads can hang
    pending = deque(paths)
    while pending:
        suspects = []
        with ProcessPoolExecutor(workers, mp_context=context, initializer=_init_worker,
                                 initargs=(os.getpid(),)) as pool:
            window = deque()
            try:
                while pending or window:
                    while pending and len(window) < 2 * workers:
                        window.append((pending[0], pool.submit(fn, pending[0], options)))
                        pending.popleft()
                    result = window[0][1].result()
                    window.popleft()
                    yield result
            except BrokenProcessPool:
                suspects = [path for path, _ in window]
        for path in suspects:
            with ProcessPoolExecutor(1, mp_context=context, initializer=_init_worker,
                                     initargs=(os.getpid(),)) as alone:
                try:
                    yield alone.submit(fn, path, options).result()
                except BrokenProcessPool:
                    yield _crashed(path)


def _read_csv(path: Path) -> list[dict]:
    if not path.exists():
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def _write_csv(path: Path, columns: list[str], rows: Iterable[dict]) -> None:
    def write(tmp: str) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, columns, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
    atomic_write(path, write)


def _resume(out: Path, options: IngestOptions) -> tuple[dict[str, dict], list[dict]]:
    """The done files still valid and their manifest rows; rewrites both files to just those."""
    saved = out / "options.json"
    current = dataclasses.asdict(options)
    if saved.exists():
        before = json.loads(saved.read_text())
        if before != current:
            changed = {k: (before.get(k), v) for k, v in current.items() if before.get(k) != v}
            raise ValueError(f"{out} was ingested with other options {changed} (old, new): "
                             "use another output folder")
    saved.write_text(json.dumps(current, indent=2))
    done = {}
    for row in _read_csv(out / "done.csv"):
        try:
            info = os.stat(row["source"])
        except OSError:
            continue
        if str(info.st_size) == row["size"] and str(info.st_mtime_ns) == row["mtime_ns"]:
            done[row["source"]] = row
    rows = [r for r in _read_csv(out / "manifest.csv") if r["source"] in done]
    _write_csv(out / "done.csv", _DONE_COLUMNS, done.values())
    _write_csv(out / "manifest.csv", MANIFEST_COLUMNS, rows)
    return done, rows


def write_shards(out: Path, rows: list[dict], shard_size: int) -> int:
    """Webdataset tars of ``shard_size`` samples under ``out/shards``; returns their number."""
    folder = out / "shards"
    folder.mkdir(exist_ok=True)
    for old in folder.glob("shard-*.tar"):
        old.unlink()
    count = 0
    for start in range(0, len(rows), shard_size):
        with tarfile.open(folder / f"shard-{count:06d}.tar", "w") as tar:
            for row in rows[start:start + shard_size]:
                image = out / row["path"]
                meta = {k: int(row[k]) if k in _INT_COLUMNS else row[k] for k in MANIFEST_COLUMNS}
                for name, data in ((image.name, image.read_bytes()),
                                   (f"{image.stem}.json", json.dumps(meta).encode())):
                    info = tarfile.TarInfo(name)  # owner root, time 0: the same bytes every run
                    info.size = len(data)
                    tar.addfile(info, io.BytesIO(data))
        count += 1
    return count


def ingest(sources: Iterable[PathLike] | PathLike, out: PathLike, *, workers: int | None = None,
           shard_size: int = 0, strict: bool = False, progress: bool = False,
           **options) -> dict:
    """Ingest ``sources`` (files or folders) into ``out``; ``options``: :class:`IngestOptions`
    fields. Returns the run's summary (also written to ``out/summary.json``): ``files`` found,
    ``skipped_done`` (ingested by an earlier run), ``files_ok``, ``errors``, ``frames_read``,
    ``frames_written``, ``empty_frames``, ``exact_duplicates``, ``near_duplicates``,
    ``duplicates_removed``, ``manifest_rows``, ``shards``, ``seconds``. With ``strict``, raises
    :class:`IngestError` after the run when any file failed. ``out`` is held for the whole run
    (:class:`usfmae_fast.runtime.lock.FolderBusy` when another run holds it)."""
    with output_lock(out, "ingest"):
        return _ingest(sources, out, workers=workers, shard_size=shard_size, strict=strict,
                       progress=progress, **options)


def _ingest(sources, out, *, workers, shard_size, strict, progress, **options) -> dict:
    from tqdm.auto import tqdm

    start = time.perf_counter()
    opts = IngestOptions(**options)
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if isinstance(sources, (str, os.PathLike)):
        sources = [sources]
    files, errors = find_sources(sources, exclude=out)
    done, rows = _resume(out, opts)
    todo = [str(p) for p in files if str(p) not in done]
    known = {row["content_hash"] for row in rows}
    summary = dict.fromkeys(["files_ok", "frames_read", "frames_written", "empty_frames",
                             "exact_duplicates", "near_duplicates"], 0)
    if workers is None:
        workers = min(len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                      else os.cpu_count() or 1, len(todo))
    with open(out / "manifest.csv", "a", newline="") as manifest_file, \
            open(out / "done.csv", "a", newline="") as done_file, \
            tqdm(total=len(todo), unit="file", desc="ingest", disable=not progress) as bar:
        manifest = csv.DictWriter(manifest_file, MANIFEST_COLUMNS, extrasaction="ignore")
        done_writer = csv.DictWriter(done_file, _DONE_COLUMNS, extrasaction="ignore")
        for result in run_parallel(ingest_file, todo, opts, workers):
            bar.update()
            if result["error"]:
                errors.append({"source": result["source"], "reason": result["error"]})
                log.warning("skipping %s", result["error"])
                continue
            written = 0
            for row in result["rows"]:
                if row["content_hash"] in known:
                    summary["exact_duplicates"] += 1
                    continue
                known.add(row["content_hash"])
                image = out / row["path"]
                image.parent.mkdir(parents=True, exist_ok=True)
                image.write_bytes(row.pop("data"))
                manifest.writerow(row)
                rows.append(row)
                written += 1
            manifest_file.flush()  # rows before the done mark: a crash leaves no stray rows
            done_writer.writerow({**result, "frames_written": written})
            done_file.flush()
            summary["files_ok"] += 1
            summary["frames_written"] += written
            summary["frames_read"] += result["frames_read"]
            summary["empty_frames"] += result["empty"]
            summary["exact_duplicates"] += result["exact_duplicates"]
            summary["near_duplicates"] += result["near_duplicates"]
    _write_csv(out / "errors.csv", ["source", "reason"], errors)
    summary.update(files=len(files), skipped_done=len(files) - len(todo), errors=len(errors),
                   duplicates_removed=summary["exact_duplicates"] + summary["near_duplicates"],
                   manifest_rows=len(rows),
                   shards=write_shards(out, rows, shard_size) if shard_size > 0 else 0)
    summary["seconds"] = round(time.perf_counter() - start, 3)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    log.info("ingest: %s", summary)
    if strict and errors:
        raise IngestError(f"{len(errors)} sources could not be ingested; see {out / 'errors.csv'}")
    return summary
