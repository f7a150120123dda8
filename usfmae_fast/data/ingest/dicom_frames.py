"""Real ultrasound frames from DICOM files, as 8-bit grayscale (or RGB) numpy arrays.

Handles single-frame and multi-frame (cine) files; RGB, YBR_* (converted to RGB by the
decoder), PALETTE COLOR (expanded through its colour LUT), MONOCHROME1/2; 8 and 16 bit;
uncompressed and compressed transfer syntaxes (JPEG, JPEG 2000 and RLE through pylibjpeg).
A file that cannot be read or decoded is reported with a warning and skipped.

The ultrasound DICOMs shipped by ``pydicom-data`` (several vendors, 21 files, 172 frames)
are the real data for smoke pretraining, the demo and the tests; nothing is downloaded.
"""
from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import struct
import sys
import warnings
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# ITU-R BT.601 luma weights: what the Y of YBR_FULL is and what scanners use for gray.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)
_DEFER = 64 * 1024        # values larger than this are read from the file only when used
_BLOCK = 1 << 20          # values per block of a frame's conversion to uint8


class DicomFrameError(RuntimeError):
    """A DICOM file whose frames cannot be turned into grayscale images."""


def ultrasound_test_files() -> list[Path]:
    """Paths of the ultrasound (Modality "US") DICOM files shipped by pydicom / pydicom-data."""
    import pydicom
    from pydicom.data import get_testdata_files

    found = []
    with warnings.catch_warnings():  # some test files are deliberately malformed
        warnings.simplefilter("ignore")
        for name in sorted(get_testdata_files()):
            try:
                ds = pydicom.dcmread(name, stop_before_pixels=True,
                                     specific_tags=["Modality"])
            except Exception:  # not DICOM at all (e.g. the .gz / .json helpers): not ours
                continue
            if ds.get("Modality") == "US":
                found.append(Path(name))
    return found


def _row_blocks(rows: int, row_size: int) -> Iterator[slice]:
    """Row ranges of about ``_BLOCK`` values: conversions run block by block, so their float
    temporaries stay small however large the frame."""
    step = max(1, _BLOCK // max(1, row_size))
    return (slice(r, min(rows, r + step)) for r in range(0, rows, step))


def to_uint8(arr: np.ndarray, bits: int, window: tuple[float, float] | None = None) -> np.ndarray:
    """Gray values holding ``bits`` significant bits -> 0..255 (min-max when deeper than 8, or
    ``window`` = (min, max) when given: the range of a whole frame converted in pieces)."""
    if arr.dtype == np.uint8:
        return arr
    if bits <= 8 and window is None and not np.issubdtype(arr.dtype, np.signedinteger):
        return np.clip(arr, 0, 255).astype(np.uint8)
    lo, hi = window if window is not None else (float(arr.min()), float(arr.max()))
    out = np.zeros(arr.shape, np.uint8)
    if hi <= lo:
        return out
    scale = 255.0 / (hi - lo)
    for rows in _row_blocks(len(arr), arr[0].size if len(arr) else 1):
        out[rows] = np.clip(np.rint((arr[rows].astype(np.float32) - lo) * scale), 0, 255)
    return out


def _lut_needs_byteswap(ds) -> bool:
    """pydicom 3.0 reads plain (non-segmented) 16-bit palette LUT data in the machine's byte
    order, ignoring a big-endian transfer syntax; its entries then come back byte-swapped."""
    if "RedPaletteColorLookupTableData" not in ds:
        return False
    little = getattr(ds, "original_encoding", (None, None))[1]
    if little is None and hasattr(ds, "file_meta"):
        little = ds.file_meta._tsyntax_encoding[1]
    return little is not None and little != (sys.byteorder == "little")


def _frame_to_uint8(frame: np.ndarray, ds, photometric: str, bits: int,
                    color: bool = False) -> np.ndarray:
    """One decoded frame in its post-decode ``photometric`` interpretation -> uint8: ``[H, W]``
    gray, or ``[H, W, 3]`` RGB when ``color`` and the frame is colour (RGB, YBR, palette).
    Colour is converted a block of rows at a time (no float copy of the whole frame)."""
    if frame.ndim == 2 and photometric != "PALETTE COLOR":
        gray = to_uint8(frame, bits)
        return 255 - gray if photometric == "MONOCHROME1" else gray  # MONOCHROME1: 0 = white
    if frame.ndim not in (2, 3):
        raise DicomFrameError(f"unexpected decoded frame shape {frame.shape}")
    if color and frame.ndim == 3 and bits == 8 and frame.dtype == np.uint8 and \
            photometric not in ("YBR_FULL", "YBR_FULL_422"):
        return frame
    out = np.empty(frame.shape[:2] + ((3,) if color else ()), np.uint8)
    for rows in _row_blocks(len(frame), frame[0].size):
        out[rows] = _colour_rows(frame[rows], ds, photometric, bits, color)
    return out


def _colour_rows(frame: np.ndarray, ds, photometric: str, bits: int, color: bool) -> np.ndarray:
    from pydicom.pixels import apply_color_lut, convert_color_space

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds)
        if rgb.dtype.itemsize > 1 and _lut_needs_byteswap(ds):
            rgb = rgb.byteswap()
        bits = 16 if rgb.dtype.itemsize > 1 else 8  # LUT entries: 8 or 16 bit whatever the index
    else:  # 3 samples per pixel
        rgb = frame
        if photometric in ("YBR_FULL", "YBR_FULL_422"):  # only if a decoder left it as YBR
            rgb = convert_color_space(frame, photometric, "RGB")
    if color and bits == 8 and rgb.dtype == np.uint8:
        return rgb
    out = rgb.astype(np.float32)
    if not color:
        out = out @ _LUMA
    if bits > 8:
        out = out / (2 ** (bits - 8))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def open_dicom(path: PathLike):
    """The dataset of a DICOM file whose pixel data is all there; values larger than
    ``_DEFER`` bytes (the pixel data) stay on disk until a frame is read. Otherwise a
    :class:`DicomFrameError` that says what is wrong: not DICOM, no pixel data, pixel data
    cut short, a frame count the data cannot hold, or data in the other byte order than the
    transfer syntax says."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "expected explicit VR, found implicit"
            ds = pydicom.dcmread(path, defer_size=_DEFER)
    except Exception as exc:
        cut = (" (the file ends inside a data element)"
               if isinstance(exc, (EOFError, struct.error)) else "")
        raise DicomFrameError(f"{path}: not a readable DICOM file{cut} "
                              f"({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        raise DicomFrameError(f"{path}: {_why_no_pixel_data(path, ds)}")
    if problem := _pixel_data_problem(path, ds):
        raise DicomFrameError(f"{path}: {problem}")
    return ds


def number_of_frames(ds) -> int:
    """(0028,0008) Number of Frames, 1 when absent; :class:`DicomFrameError` when it is not a
    positive whole number."""
    value = ds.get("NumberOfFrames", 1)
    try:
        frames = int(value if value not in (None, "") else 1)
    except (TypeError, ValueError):
        frames = 0
    if frames < 1:
        raise DicomFrameError(f"NumberOfFrames {value!r} is not a positive whole number")
    return frames


def _syntax(ds):
    return ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None


def _stored_bytes(path: PathLike, element) -> int:
    """Bytes of a (possibly deferred) element's value that the file really holds."""
    if element.value is not None:
        return len(element.value)
    return max(0, min(element.length, os.path.getsize(path) - element.value_tell))


def _pixel_data_problem(path: PathLike, ds) -> str | None:
    """Why the pixel data cannot hold the frames the header declares (None when it can), found
    from the header and the file's size before anything is decoded."""
    try:
        frames = number_of_frames(ds)
    except DicomFrameError as exc:
        return str(exc)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    if rows < 1 or cols < 1:
        return f"declares a {cols}x{rows} image (Columns x Rows)"
    element = ds.get_item("PixelData", keep_deferred=True)
    stored = _stored_bytes(path, element)
    syntax = _syntax(ds)
    if syntax is not None and syntax.is_encapsulated:
        # every frame is at least one item of the encapsulated data, 8 bytes of header each
        if frames > stored // 8:
            return (f"declares {frames} frames, but its {stored} bytes of compressed pixel "
                    f"data can hold at most {stored // 8}")
        return None
    samples = int(ds.get("SamplesPerPixel", 1) or 1)
    bits = int(ds.get("BitsAllocated", 8) or 8)
    frame_bits = rows * cols * samples * bits
    if str(ds.get("PhotometricInterpretation", "")) == "YBR_FULL_422":
        frame_bits = frame_bits * 2 // 3  # two chroma samples per pair of pixels
    expected = -(-frames * frame_bits // 8)
    if stored >= expected:
        return None
    held = stored * 8 // frame_bits if frame_bits else 0
    declared = (f" ({frames} frames of {cols}x{rows} declared; the file holds {held})"
                if frames > 1 else "")
    return f"pixel data truncated: {stored} of {expected} bytes{declared}"


def _why_no_pixel_data(path: PathLike, ds) -> str:
    """What a dataset without (7FE0,0010) Pixel Data is: cut short inside an element, written
    in the other byte order than its transfer syntax says, or really without pixel data."""
    if (flipped := _other_byte_order(path, ds)) is not None:
        return flipped
    last = next(reversed(ds.keys()), None)
    if last is not None:
        element = ds.get_item(last, keep_deferred=True)
        length = getattr(element, "length", None)
        if length not in (None, 0xFFFFFFFF) and _stored_bytes(path, element) < length:
            return (f"truncated: the file ends inside element {last} "
                    f"({_stored_bytes(path, element)} of {length} bytes)")
    if "Rows" in ds and "Columns" in ds:
        return f"has no pixel data although it declares a {ds.Columns}x{ds.Rows} image"
    return "has no pixel data"


def _other_byte_order(path: PathLike, ds) -> str | None:
    """"transfer syntax says big endian, data is little endian" (or the reverse) when reading
    the dataset in the other byte order finds the pixel data; None otherwise."""
    from pydicom.filereader import read_dataset

    syntax = _syntax(ds)
    group_length = ds.file_meta.get("FileMetaInformationGroupLength") if syntax else None
    if syntax is None or syntax.is_implicit_VR or group_length is None:
        return None
    try:
        with open(path, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            f.seek(128 + 4 + 12 + int(group_length))  # preamble, "DICM", (0002,0000), group 2
            other = read_dataset(f, is_implicit_VR=False,
                                 is_little_endian=not syntax.is_little_endian, defer_size=_DEFER)
            found = "PixelData" in other
    except Exception:  # garbage in the other byte order too
        return None
    if not found:
        return None
    says, data = ("little", "big") if syntax.is_little_endian else ("big", "little")
    return f"transfer syntax says {says} endian, data is {data} endian ({syntax.name})"


def iter_frames(ds, path: PathLike, indices: Iterable[int] | None = None,
                color: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, uint8 frame)`` for the frames ``indices`` (default: all; a ``range`` is never
    expanded) of the dataset ``ds`` read from ``path`` by :func:`open_dicom`; see
    :func:`_frame_to_uint8` for ``color``. Frames are read and decoded one at a time:
    uncompressed pixel data left on disk is read frame by frame from the file. Raises
    :class:`DicomFrameError` naming ``path`` and the reason on failure."""
    from pydicom.pixels import get_decoder
    from pydicom.pixels.utils import as_pixel_options

    syntax = _syntax(ds)
    try:
        if syntax is None:
            raise DicomFrameError("no (0002,0010) Transfer Syntax UID in the file meta")
        indices = range(number_of_frames(ds)) if indices is None else indices
        element = ds.get_item("PixelData", keep_deferred=True)
        with contextlib.ExitStack() as stack:
            if element.value is None and not syntax.is_encapsulated:  # left on disk
                f = stack.enter_context(open(path, "rb"))
                f.seek(element.value_tell)
                source = f
                options = as_pixel_options(ds, transfer_syntax_uid=syntax,
                                           pixel_keyword="PixelData")
                if element.VR:
                    options["pixel_vr"] = str(element.VR)
            else:
                source, options = ds, {}
            # The decoder reports the post-decode pixel module (YBR_* arrive as RGB, for instance).
            decoded_frames = get_decoder(syntax).iter_array(source, indices=indices, **options)
            for index, (frame, decoded) in zip(indices, decoded_frames):
                photometric = str(decoded.get("photometric_interpretation",
                                              ds.get("PhotometricInterpretation", "MONOCHROME2")))
                bits = int(decoded.get("bits_stored", ds.get("BitsStored", 8)))
                yield index, _frame_to_uint8(frame, ds, photometric, bits, color)
    except DicomFrameError as exc:
        raise DicomFrameError(f"{path}: {exc}") from exc
    except Exception as exc:
        name = getattr(syntax, "name", syntax)
        raise DicomFrameError(
            f"{path}: cannot decode pixel data (transfer syntax {name}): {type(exc).__name__}: {exc}"
        ) from exc


def read_gray_frames(path: PathLike, max_frames: int | None = None) -> list[np.ndarray]:
    """All frames of one DICOM file as uint8 ``[H, W]`` arrays.

    ``max_frames`` keeps that many frames evenly spaced through a cine loop (neighbouring cine
    frames are nearly identical). Raises :class:`DicomFrameError` with the reason on failure.
    """
    ds = open_dicom(path)
    n_frames = number_of_frames(ds)
    indices = None
    if max_frames is not None and n_frames > max_frames:
        indices = sorted({int(i) for i in np.linspace(0, n_frames - 1, max_frames).round()})
    return [frame for _, frame in iter_frames(ds, path, indices)]


def _frame_key(frame: np.ndarray) -> bytes:
    return hashlib.blake2b(frame.tobytes(), digest_size=16, person=repr(frame.shape).encode()[:16]).digest()


def load_frames(paths: Iterable[PathLike], max_frames_per_file: int | None = None,
                dedupe: bool = True, min_size: int = 16) -> tuple[list[np.ndarray], dict]:
    """Frames of many files, skipping (with a warning) files that fail.

    Returns ``(frames, report)`` where ``report`` counts files, frames, exact duplicates
    dropped (``dedupe``: the same pixels seen before, e.g. one image stored in several
    transfer syntaxes), frames smaller than ``min_size``, gives the source file of every
    frame (``sources``) and lists ``skipped`` files with their reason.
    """
    frames: list[np.ndarray] = []
    seen: set[bytes] = set()
    report = {"files": 0, "files_used": 0, "frames_decoded": 0, "duplicates_dropped": 0,
              "too_small": 0, "frames": 0, "sources": [], "skipped": []}
    for path in paths:
        report["files"] += 1
        try:
            file_frames = read_gray_frames(path, max_frames=max_frames_per_file)
        except DicomFrameError as exc:
            warnings.warn(f"skipping {exc}", RuntimeWarning, stacklevel=2)
            report["skipped"].append({"path": str(path), "reason": str(exc)})
            continue
        kept = 0
        for frame in file_frames:
            report["frames_decoded"] += 1
            if min(frame.shape) < min_size:
                report["too_small"] += 1
                continue
            if dedupe:
                key = _frame_key(frame)
                if key in seen:
                    report["duplicates_dropped"] += 1
                    continue
                seen.add(key)
            frames.append(frame)
            report["sources"].append(str(path))
            kept += 1
        report["files_used"] += kept > 0
    report["frames"] = len(frames)
    log.info("loaded %d frames from %d/%d files (%d duplicates dropped, %d skipped)",
             report["frames"], report["files_used"], report["files"],
             report["duplicates_dropped"], len(report["skipped"]))
    return frames, report
