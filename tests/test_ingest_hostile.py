"""``ingest`` against hostile inputs (issue 15, items 6-8): files that declare far more than they
hold, entries of a folder that are not files, DICOMs cut short or in the wrong byte order, and
a run killed with SIGKILL. Memory is measured on a fresh process doing one worker's job."""
import io
import json
import os
import shutil
import signal
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

pydicom = pytest.importorskip("pydicom")

import cv2  # noqa: E402
from PIL import Image  # noqa: E402

from usfmae_fast.data.ingest import ingest  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
LIMIT_MB = 1024


def _errors(out: Path) -> dict[str, str]:
    import csv
    with open(out / "errors.csv", newline="") as f:
        return {Path(r["source"]).name: r["reason"] for r in csv.DictReader(f)}


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png(ihdr: tuple, idat: bytes, chunks: bytes = b"") -> bytes:
    return (b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", struct.pack(">IIBBBBB", *ihdr)) + chunks
            + _chunk(b"IDAT", idat) + _chunk(b"IEND", b""))


def _bomb_png(path: Path, side: int = 12000) -> None:
    """A valid ~600 KB RGBA PNG of ``side`` x ``side`` (144 megapixels, 576 MB decoded): every
    row repeats the first (filter Up, all zeros), compressed once and the deflate blocks
    repeated (each block ends with a full flush, so it stands alone)."""
    first = np.zeros((side, 4), np.uint8)
    first[: side // 2, :3], first[:, 3], first[side // 3:, 3] = 180, 255, 0
    head, up, per = b"\x00" + first.tobytes(), b"\x02" + bytes(4 * side), 200

    def deflate(data: bytes, mode: int) -> bytes:
        z = zlib.compressobj(9, zlib.DEFLATED, -15)
        return z.compress(data) + z.flush(mode)

    blocks, rest = divmod(side - 1, per)
    adler = zlib.adler32(head)
    for _ in range(side - 1):
        adler = zlib.adler32(up, adler)
    data = (b"\x78\xda" + deflate(head, zlib.Z_FULL_FLUSH) + deflate(up * per, zlib.Z_FULL_FLUSH)
            * blocks + deflate(up * rest, zlib.Z_FINISH) + struct.pack(">I", adler))
    path.write_bytes(_png((side, side, 8, 6, 0, 0, 0), data))


def _dicom(path: Path, frames: np.ndarray, declared: int | None = None) -> None:
    """An 8-bit MONOCHROME2 ultrasound DICOM of ``frames`` [N, H, W]; ``declared`` overrides
    (0028,0008) Number of Frames (a header that lies)."""
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, generate_uid

    meta = FileMetaDataset()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.MediaStorageSOPClassUID = "1.2.840.10008.5.1.4.1.1.3.1"
    meta.MediaStorageSOPInstanceUID = generate_uid()
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = meta.MediaStorageSOPClassUID
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "US"
    n, rows, cols = frames.shape
    ds.Rows, ds.Columns, ds.SamplesPerPixel = rows, cols, 1
    ds.NumberOfFrames = declared if declared is not None else n
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PixelData = frames.tobytes()
    ds.save_as(path, enforce_file_format=True)


def _speckle(n: int, h: int, w: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(20, 220, (n, h, w), dtype=np.uint8)


# ---------------------------------------------------------------- item 6: memory and bombs

_WORKER = ("import json, sys\n"
           "from usfmae_fast.data.ingest import IngestOptions, ingest_file\n"
           "r = ingest_file(sys.argv[1], IngestOptions())\n"
           "print(json.dumps({'error': r['error'], 'frames_read': r['frames_read']}))\n")
# Runs the worker's job in a child and reports the child's peak RSS. A watchdog kills it past
# 1.5 GB, so that the code before the fix (3.2 GB, or every byte it can get for 2**31-1
# frames) fails this test instead of the machine.
_MEASURE = """import json, resource, subprocess, sys, time
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
killed = False
while child.poll() is None:
    try:
        status = open(f"/proc/{child.pid}/status").read()
        rss_kb = int(status.split("VmRSS:")[1].split()[0]) if "VmRSS:" in status else 0
    except OSError:
        rss_kb = 0
    if rss_kb > 1536 * 1024:
        child.kill()
        killed = True
    time.sleep(0.02)
out, err = child.communicate()
print(json.dumps({"peak_mb": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024,
                  "killed": killed, "out": out, "err": err[-2000:]}))
"""


def _worker_peak(path: Path) -> tuple[float, dict | None]:
    """(peak RSS in MB, ingest_file's error and frame count, None when it was killed) of a
    fresh process ingesting ``path`` with the default options, as one worker does."""
    run = subprocess.run([sys.executable, "-c", _MEASURE, sys.executable, "-c", _WORKER, str(path)],
                         env=ENV, capture_output=True, text=True, timeout=120)
    report = json.loads(run.stdout)
    if report["killed"]:
        return float("inf"), None
    assert report["out"], report["err"]
    return report["peak_mb"], json.loads(report["out"])


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/PID/status")
def test_crafted_files_stay_under_1gb_per_worker(tmp_path):
    """Issue 15 item 6: a 600 KB PNG declaring 144 megapixels of RGBA took 3.2 GB; a 900 KB
    DICOM declaring 20 million frames 1.5 GB, one declaring 2**31-1 frames all memory. Each
    must stay under 1 GB: decoded in strips, or refused (with the reason) before decoding."""
    _bomb_png(tmp_path / "bomb.png")
    assert (tmp_path / "bomb.png").stat().st_size < 700_000
    frames = _speckle(1, 900, 1000)  # 900 KB of pixel data
    declared = {"frames20m.dcm": 20_000_000, "frames2g.dcm": 2 ** 31 - 1}
    for name, count in declared.items():
        _dicom(tmp_path / name, frames, declared=count)
    peaks, results = {}, {}
    for name in [*declared, "bomb.png"]:
        peaks[name], results[name] = _worker_peak(tmp_path / name)
    print("peak RSS of one worker (MB):", {k: f"{v:.0f}" for k, v in peaks.items()})
    assert all(peak < LIMIT_MB for peak in peaks.values()), peaks
    # 144 MP is under the default limit: decoded, not refused
    assert results["bomb.png"]["error"] is None and results["bomb.png"]["frames_read"] == 1
    for name, count in declared.items():
        error = results[name]["error"]
        assert error.startswith(str(tmp_path / name)) and "pixel data truncated" in error
        assert f"{count} frames of 1000x900 declared; the file holds 1" in error, error


def _filtered_png(raw: np.ndarray, width: int, depth: int, colour: int, chunks: bytes,
                  seed: int) -> bytes:
    """A PNG of the raw rows ``raw`` [H, row bytes], each row under a random filter type."""
    h, n = raw.shape
    bpp = max(1, {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour] * depth // 8)
    r = raw.astype(np.int16)
    up = np.vstack([np.zeros((1, n), np.int16), r[:-1]])
    left = np.hstack([np.zeros((h, bpp), np.int16), r[:, :-bpp]])
    corner = np.hstack([np.zeros((h, bpp), np.int16), up[:, :-bpp]])
    p = left + up - corner
    pa, pb, pc = abs(p - left), abs(p - up), abs(p - corner)
    paeth = np.where((pa <= pb) & (pa <= pc), left, np.where(pb <= pc, up, corner))
    types = np.random.default_rng(seed).integers(0, 5, h)
    lines = np.empty((h, n + 1), np.uint8)
    lines[:, 0] = types
    for t, pred in enumerate([0 * r, left, up, (left + up) // 2, paeth]):
        lines[types == t, 1:] = ((r - pred) % 256)[types == t]
    return _png((width, h, depth, colour, 0, 0, 0), zlib.compress(lines.tobytes()), chunks)


def test_png_strips_decode_exactly_like_pillow(monkeypatch):
    """Every PNG colour type and bit depth, every filter type, read in strips of a few rows,
    gives the pixels Pillow gives for the whole file."""
    from usfmae_fast.data.ingest import png_stream
    from usfmae_fast.data.ingest.readers import _assemble, _crops

    monkeypatch.setattr(png_stream, "_STRIP_BYTES", 700)
    palette = _chunk(b"PLTE", bytes(range(256)) * 3)
    cases = [(8, 0, b""), (8, 2, b""), (8, 4, b""), (8, 6, b""), (16, 0, b""), (16, 2, b""),
             (16, 4, b""), (16, 6, b""), (1, 0, b""), (2, 0, b""), (4, 0, b""), (8, 3, palette),
             (2, 3, palette), (4, 3, palette + _chunk(b"tRNS", bytes([0, 128, 255]))),
             (8, 2, _chunk(b"tRNS", bytes(6))), (16, 0, _chunk(b"tRNS", b"\x00\x07"))]
    rng = np.random.default_rng(0)
    for seed, (depth, colour, chunks) in enumerate(cases):
        width, height = 37, 53
        row_bytes = -(-width * {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}[colour] * depth // 8)
        data = _filtered_png(rng.integers(0, 256, (height, row_bytes), dtype=np.uint8), width,
                             depth, colour, chunks, seed)
        whole = Image.open(io.BytesIO(data))
        layout = png_stream.plain_png(io.BytesIO(data))
        assert layout is not None
        want = _assemble(whole.mode, whole.size, lambda: _crops(whole))
        got = _assemble(whole.mode, whole.size, lambda: png_stream.strips(io.BytesIO(data), layout))
        assert got.dtype == np.uint8 and got.shape == want.shape, (depth, colour)
        assert np.array_equal(got, want), (depth, colour)
    cut = _filtered_png(rng.integers(0, 256, (60, 37), dtype=np.uint8), 37, 8, 0, b"", 0)
    with pytest.raises(ValueError, match="truncated PNG"):
        layout = png_stream.plain_png(io.BytesIO(cut[:200]))
        list(png_stream.strips(io.BytesIO(cut[:200]), layout))


def test_frames_times_pixels_count_against_max_pixels(tmp_path):
    """``max_pixels`` bounds what one file decodes to: frames to read x width x height."""
    _dicom(tmp_path / "cine.dcm", _speckle(5, 60, 80))
    limit = 3 * 60 * 80
    summary = ingest([tmp_path / "cine.dcm"], tmp_path / "all", workers=1, max_pixels=limit,
                     max_side=64)
    assert summary["errors"] == 1
    reason = _errors(tmp_path / "all")["cine.dcm"]
    assert "5 frames of 80x60" in reason and "max_pixels" in reason and str(limit) in reason
    summary = ingest([tmp_path / "cine.dcm"], tmp_path / "strided", workers=1, max_pixels=limit,
                     max_side=64, frame_stride=2, near_dup_bits=-1)
    assert summary["errors"] == 0 and summary["frames_read"] == 3


# ---------------------------------------------------------------- item 7: unreadable inputs


def test_entries_that_are_not_files_are_reported_and_never_opened(tmp_path):
    """Issue 15 item 7: a symlink loop, a dangling link, a FIFO, a device, a link back to a
    parent folder were skipped without a word; each gets its row in errors.csv and nothing
    blocks on the FIFO."""
    src = tmp_path / "src"
    (src / "series").mkdir(parents=True)
    cv2.imwrite(str(src / "scan.png"), _speckle(1, 64, 80)[0])
    (src / "dangling.png").symlink_to(src / "gone.png")
    (src / "loop.dcm").symlink_to(src / "loop.dcm")
    (src / "null.dcm").symlink_to(os.devnull)
    os.mkfifo(src / "pipe.png")
    (src / "series" / "back").symlink_to(src)
    os.mkfifo(tmp_path / "given.png")  # a FIFO named as a source itself
    start = time.monotonic()
    summary = ingest([src, tmp_path / "given.png"], tmp_path / "out", workers=1, max_side=64)
    assert time.monotonic() - start < 20  # nothing waited on a FIFO
    errors = _errors(tmp_path / "out")
    assert summary["files_ok"] == 1 and summary["errors"] == 6
    expected = {"dangling.png": "dangling symlink", "loop.dcm": "symlink loop",
                "null.dcm": "a device", "pipe.png": "FIFO", "back": "symlink loop",
                "given.png": "FIFO"}
    assert set(errors) == set(expected)
    for name, words in expected.items():
        assert words in errors[name], errors[name]
        assert errors[name].startswith(str(tmp_path)), errors[name]


def test_broken_dicoms_are_reported_as_what_they_are(tmp_path):
    """Issue 15 item 7: a DICOM cut inside its pixel data, and one whose transfer syntax says
    big endian over little-endian data, were both "has no pixel data" or a decoder's
    traceback text; now each reason says what is wrong."""
    _dicom(tmp_path / "whole.dcm", _speckle(2, 64, 80))
    data = (tmp_path / "whole.dcm").read_bytes()
    (tmp_path / "cut.dcm").write_bytes(data[:-3000])
    (tmp_path / "big_endian.dcm").write_bytes(
        data.replace(b"1.2.840.10008.1.2.1\x00", b"1.2.840.10008.1.2.2\x00"))
    files = [tmp_path / n for n in ("whole.dcm", "cut.dcm", "big_endian.dcm")]
    summary = ingest(files, tmp_path / "out", workers=1, max_side=64)
    errors = _errors(tmp_path / "out")
    assert summary["files_ok"] == 1 and set(errors) == {"cut.dcm", "big_endian.dcm"}
    assert f"pixel data truncated: {2 * 64 * 80 - 3000} of {2 * 64 * 80} bytes" in errors["cut.dcm"]
    assert "transfer syntax says big endian, data is little endian" in errors["big_endian.dcm"]


# ---------------------------------------------------------------- item 8: kill -9


def _children(pid: int) -> set[int]:
    found = set()
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
            except (OSError, IndexError):
                continue
            if int(fields[1]) == pid:
                found.add(int(entry))
    return found


def _alive(pid: int) -> bool:
    try:  # a zombie has exited: only its exit status waits for a parent's reaper
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")
def test_workers_die_with_a_killed_ingest(tmp_path):
    """Issue 15 item 8: after ``kill -9`` of ingest its workers stayed alive (blocked on the
    task queue, whose writing end they hold themselves). Now none is left a few seconds on."""
    src = tmp_path / "src"
    src.mkdir()
    cv2.imwrite(str(src / "scan00.png"), _speckle(1, 900, 1200)[0])
    for k in range(1, 12):
        shutil.copy(src / "scan00.png", src / f"scan{k:02d}.png")
    code = ("import sys\nfrom usfmae_fast.data.ingest import ingest\n"
            "ingest(sys.argv[1], sys.argv[2], workers=2)\n")
    run = subprocess.Popen([sys.executable, "-c", code, str(src), str(tmp_path / "out")],
                           env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    children: set[int] = set()
    try:
        done = tmp_path / "out" / "done.csv"
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and run.poll() is None:
            children |= _children(run.pid)
            if done.exists() and len(done.read_text().splitlines()) > 1:
                break  # a file is done: the workers are at work on the next ones
            time.sleep(0.05)
        children |= _children(run.pid)
        assert run.poll() is None and len(children) >= 2, "ingest ended before it was killed"
        os.kill(run.pid, signal.SIGKILL)
        run.wait()
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline and any(_alive(p) for p in children):
            time.sleep(0.05)
        assert not [p for p in children if _alive(p)], "workers outlived the killed ingest"
    finally:
        if run.poll() is None:
            run.kill()
        for pid in children:  # never leave an orphan behind, whatever the outcome
            if _alive(pid):
                os.kill(pid, signal.SIGKILL)
