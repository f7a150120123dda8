"""Real ultrasound frames from DICOM files, as 8-bit grayscale (or RGB) numpy arrays.

Handles single-frame and multi-frame (cine) files; RGB, YBR_* (converted to RGB by the
decoder), PALETTE COLOR (expanded through its colour LUT), MONOCHROME1/2; 8 and 16 bit;
uncompressed and compressed transfer syntaxes (JPEG, JPEG 2000 and RLE through pylibjpeg).
A file that cannot be read or decoded is reported with a warning and skipped.

The ultrasound DICOMs shipped by ``pydicom-data`` (several vendors, 21 files, 172 frames)
are the real data for smoke pretraining, the demo and the tests; nothing is downloaded.
"""
from __future__ import annotations

import hashlib
import logging
import os
import sys
import warnings
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import numpy as np

log = logging.getLogger(__name__)

PathLike = str | os.PathLike

# ITU-R BT.601 luma weights: what the Y of YBR_FULL is and what scanners use for gray.
_LUMA = np.array([0.299, 0.587, 0.114], dtype=np.float32)


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


def to_uint8(arr: np.ndarray, bits: int) -> np.ndarray:
    """Gray values holding ``bits`` significant bits -> 0..255 (min-max when deeper than 8)."""
    if arr.dtype == np.uint8:
        return arr
    if bits <= 8 and not np.issubdtype(arr.dtype, np.signedinteger):
        return np.clip(arr, 0, 255).astype(np.uint8)
    arr = arr.astype(np.float32)
    lo, hi = float(arr.min()), float(arr.max())
    if hi <= lo:
        return np.zeros(arr.shape, np.uint8)
    return np.rint((arr - lo) * (255.0 / (hi - lo))).astype(np.uint8)


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
    gray, or ``[H, W, 3]`` RGB when ``color`` and the frame is colour (RGB, YBR, palette)."""
    from pydicom.pixels import apply_color_lut, convert_color_space

    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(frame, ds)
        if rgb.dtype.itemsize > 1 and _lut_needs_byteswap(ds):
            rgb = rgb.byteswap()
        bits = 16 if rgb.dtype.itemsize > 1 else 8  # LUT entries: 8 or 16 bit whatever the index
    elif frame.ndim == 3:  # 3 samples per pixel
        rgb = frame
        if photometric in ("YBR_FULL", "YBR_FULL_422"):  # only if a decoder left it as YBR
            rgb = convert_color_space(frame, photometric, "RGB")
    elif frame.ndim == 2:
        gray = to_uint8(frame, bits)
        return 255 - gray if photometric == "MONOCHROME1" else gray  # MONOCHROME1: 0 = white
    else:
        raise DicomFrameError(f"unexpected decoded frame shape {frame.shape}")
    if color and bits == 8 and rgb.dtype == np.uint8:
        return rgb
    out = rgb.astype(np.float32)
    if not color:
        out = out @ _LUMA
    if bits > 8:
        out = out / (2 ** (bits - 8))
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


def open_dicom(path: PathLike):
    """The dataset of a DICOM file that has pixel data; :class:`DicomFrameError` otherwise."""
    import pydicom

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # e.g. "expected explicit VR, found implicit"
            ds = pydicom.dcmread(path)
    except Exception as exc:
        raise DicomFrameError(f"{path}: not a readable DICOM file ({type(exc).__name__}: {exc})") from exc
    if "PixelData" not in ds:
        raise DicomFrameError(f"{path}: has no pixel data")
    return ds


def number_of_frames(ds) -> int:
    return int(ds.get("NumberOfFrames", 1) or 1)


def iter_frames(ds, path: PathLike, indices: Sequence[int] | None = None,
                color: bool = False) -> Iterator[tuple[int, np.ndarray]]:
    """``(index, uint8 frame)`` for the frames ``indices`` (default: all) of the dataset ``ds``
    read from ``path``; see :func:`_frame_to_uint8` for ``color``. Frames are decoded one at a
    time. Raises :class:`DicomFrameError` naming ``path`` and the reason on failure."""
    from pydicom.pixels import get_decoder

    indices = list(range(number_of_frames(ds)) if indices is None else indices)
    syntax = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    try:
        if syntax is None:
            raise DicomFrameError("no (0002,0010) Transfer Syntax UID in the file meta")
        # The decoder reports the post-decode pixel module (YBR_* arrive as RGB, for instance).
        decoded_frames = get_decoder(syntax).iter_array(ds, indices=indices)
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


def load_demo_frames(max_frames_per_file: int | None = 16, dedupe: bool = True,
                     paths: Sequence[PathLike] | None = None) -> list[np.ndarray]:
    """Grayscale frames of every pydicom-data ultrasound file (see :func:`load_frames`)."""
    frames, _ = load_frames(ultrasound_test_files() if paths is None else paths,
                            max_frames_per_file=max_frames_per_file, dedupe=dedupe)
    return frames
