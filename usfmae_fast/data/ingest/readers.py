"""Format readers for ``ingest``: one source file -> its metadata and its frames.

Every reader yields ``(index, frame)`` pairs, ``frame`` a uint8 array, ``[H, W]`` gray or
``[H, W, 3]`` RGB (colour is kept here; the cleaning step decides), one frame at a time:

- DICOM through pydicom (:mod:`.dicom_frames`): single- and multi-frame, every transfer syntax
  pylibjpeg decodes, YBR / palette / RGB / MONOCHROME1/2, 8 and 16 bit; ``index`` = frame number.
- NIfTI through nibabel: a 2-D image or a 3-D volume (loaded whole) cut into 2-D slices
  along ``axis``; intensities windowed to 8 bit by the volume's min and max so that slices
  stay comparable; ``index`` = slice number.
- PNG / JPEG / BMP / TIFF (and other Pillow formats) through Pillow: 1/8/16/32-bit gray,
  float, palette, RGB(A); transparent pixels composited over black; every page of a
  multi-page TIFF; ``index`` = page.
- Video (mp4, avi, mov, mkv, ...) through PyAV (FFmpeg); ``index`` = frame number.

Memory follows the frames, not what a file declares: frames are decoded one at a time, a PNG
a strip of rows at a time (:mod:`.png_stream`), uncompressed DICOM pixel data is read from
the file frame by frame, a NIfTI volume slab by slab, and conversions to 8 bit run on blocks of
rows, so a reader holds little more than the frame it yields (uint8, gray or RGB as the file
is) and the one being decoded; other Pillow formats add Pillow's buffer of one page. A file
whose frames to read (after ``frame_stride``) hold more than ``max_pixels`` pixels in all, or
that declares more DICOM frames than its data can hold, is refused before anything is decoded
(pixel bombs, scans of film, headers that lie): its whole file is reported as unreadable.
Every failure is an :class:`UnreadableFileError` (or
:class:`~.dicom_frames.DicomFrameError`) naming the file.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from .dicom_frames import PathLike, iter_frames, number_of_frames, open_dicom, to_uint8

Box = tuple[int, int, int, int]  # x0, y0, x1, y1 (x1, y1 exclusive), in source pixels

DICOM_SUFFIXES = (".dcm", ".dicom", ".dic", ".ima")
NIFTI_SUFFIXES = (".nii", ".nii.gz")
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".gif", ".webp", ".jp2")
VIDEO_SUFFIXES = (".mp4", ".avi", ".mov", ".mkv", ".wmv", ".mpg", ".mpeg", ".m4v", ".webm")

# DICOM (0018,6012) Region Spatial Format: 1 = 2-D, 2 = M-mode, 3 = spectral. The others
# (waveform traces, graphics) and the gray / colour bars ((0018,6014) data type 13, 14) hold
# no image data.
_IMAGE_REGION_FORMATS = {1, 2, 3}
_BAR_REGION_TYPES = {13, 14}
_SLAB_VOXELS = 8 << 20  # NIfTI voxels read at a time


class UnreadableFileError(RuntimeError):
    """A source file that cannot be read; the message names the file and the reason."""


def _failed(path: PathLike, what: str, exc: BaseException) -> UnreadableFileError:
    return UnreadableFileError(f"{path}: {what} ({type(exc).__name__}: {exc})")


@dataclass
class Source:
    kind: str                       # "dicom" | "nifti" | "image" | "video"
    frames: Iterator[tuple[int, np.ndarray]]
    meta: dict = field(default_factory=dict)  # patient / study / series ids, vendor, ...
    region: Box | None = None       # the scan area the file declares (DICOM ultrasound regions)


def kind_of(path: PathLike) -> str:
    """The reader for ``path``: by its extension, else by its content (DICOM files often have
    none); :class:`UnreadableFileError` when neither says."""
    name = Path(path).name.lower()
    for kind, suffixes in (("dicom", DICOM_SUFFIXES), ("nifti", NIFTI_SUFFIXES),
                           ("image", IMAGE_SUFFIXES), ("video", VIDEO_SUFFIXES)):
        if name.endswith(suffixes):
            return kind
    with open(path, "rb") as f:
        head = f.read(132)
    if head[128:132] == b"DICM":
        return "dicom"
    from PIL import Image, UnidentifiedImageError
    try:
        with _own_pixel_limit(), Image.open(path):
            return "image"
    except (UnidentifiedImageError, OSError):
        pass
    raise UnreadableFileError(f"{path}: not a DICOM, NIfTI, image or video file "
                              f"(extension {Path(path).suffix or 'none'!r}, content not recognised)")


def open_source(path: PathLike, *, frame_stride: int = 1, nifti_axis: int = 2,
                max_pixels: int = 150_000_000) -> Source:
    """The :class:`Source` of one file. ``frame_stride`` keeps every n-th frame of a DICOM cine
    loop or a video; ``nifti_axis`` is the axis 3-D volumes are sliced along."""
    kind = kind_of(path)
    if kind == "dicom":
        return _dicom(path, frame_stride, max_pixels)
    if kind == "nifti":
        return _nifti(path, nifti_axis, max_pixels)
    if kind == "image":
        return Source("image", _image_frames(path, max_pixels))
    return Source("video", _video_frames(path, frame_stride, max_pixels))


def _check_size(path: PathLike, width: int, height: int, max_pixels: int, frames: int = 1) -> None:
    """Refuse a file whose ``frames`` frames of ``width`` x ``height`` exceed ``max_pixels``."""
    if frames * width * height > max_pixels:
        what = (f"{width}x{height} frame has {width * height} pixels" if frames == 1 else
                f"{frames} frames of {width}x{height} to read have {frames * width * height} "
                "pixels (fewer with a larger frame stride)")
        raise UnreadableFileError(f"{path}: {what}, more than the limit of {max_pixels} "
                                  "(max_pixels)")


def _dicom(path: PathLike, stride: int, max_pixels: int) -> Source:
    ds = open_dicom(path)
    indices = range(0, number_of_frames(ds), stride)
    _check_size(path, int(ds.Columns), int(ds.Rows), max_pixels, len(indices))
    meta = {"patient_id": ds.get("PatientID", ""), "study_uid": ds.get("StudyInstanceUID", ""),
            "series_uid": ds.get("SeriesInstanceUID", ""), "sop_uid": ds.get("SOPInstanceUID", ""),
            "modality": ds.get("Modality", ""), "vendor": ds.get("Manufacturer", ""),
            "model": ds.get("ManufacturerModelName", "")}
    return Source("dicom", iter_frames(ds, path, indices, color=True),
                  {k: str(v) for k, v in meta.items()}, _dicom_region(ds))


def _dicom_region(ds) -> Box | None:
    """Bounding box of the image-bearing ultrasound regions, or None when there are none or one
    overshoots the pixel data by more than 2 % (the image was cropped or resized after
    acquisition: the coordinates no longer describe it)."""
    boxes = []
    for region in ds.get("SequenceOfUltrasoundRegions", []):
        try:
            fmt, dtype = int(region.RegionSpatialFormat), int(region.RegionDataType)
            box = (int(region.RegionLocationMinX0), int(region.RegionLocationMinY0),
                   int(region.RegionLocationMaxX1) + 1, int(region.RegionLocationMaxY1) + 1)
        except (AttributeError, TypeError, ValueError):
            return None
        if fmt in _IMAGE_REGION_FORMATS and dtype not in _BAR_REGION_TYPES:
            boxes.append(box)
    rows, cols = int(ds.get("Rows", 0) or 0), int(ds.get("Columns", 0) or 0)
    slack_x, slack_y = max(2, cols // 50), max(2, rows // 50)  # vendors' off-by-one edges
    if not boxes or any(x0 < 0 or y0 < 0 or x1 > cols + slack_x or y1 > rows + slack_y
                        or x1 <= x0 or y1 <= y0 for x0, y0, x1, y1 in boxes):
        return None
    return (min(b[0] for b in boxes), min(b[1] for b in boxes),
            min(cols, max(b[2] for b in boxes)), min(rows, max(b[3] for b in boxes)))


def _nifti(path: PathLike, axis: int, max_pixels: int) -> Source:
    import nibabel as nib

    try:
        img = nib.load(str(path), keep_file_open=True)  # slabs read in turn from one stream
    except Exception as exc:
        raise _failed(path, "not a readable NIfTI file", exc) from exc
    shape = tuple(img.shape)
    while len(shape) > 3 and shape[-1] == 1:
        shape = shape[:-1]
    if len(shape) not in (2, 3):
        raise UnreadableFileError(f"{path}: {len(shape)}-D NIfTI image of shape {img.shape}; "
                                  "only 2-D images and 3-D volumes are read")
    if len(shape) == 3 and not -3 <= axis < 3:
        raise UnreadableFileError(f"{path}: slice axis {axis} does not exist in a 3-D volume")
    axis %= 3
    plane = [s for i, s in enumerate(shape) if len(shape) == 2 or i != axis]
    _check_size(path, plane[0], plane[1], max_pixels, shape[axis] if len(shape) == 3 else 1)
    return Source("nifti", _nifti_slices(path, img, shape, axis))


def _nifti_slabs(img, shape: tuple[int, ...]) -> Iterator[np.ndarray]:
    """The volume in slabs of about 8 million voxels along its last axis (the slowest on disk:
    NIfTI stores voxels in Fortran order), each shaped ``shape[:2] + (k,)``."""
    if len(shape) == 2:
        yield np.asanyarray(img.dataobj).reshape(shape + (1,))
        return
    per = max(1, _SLAB_VOXELS // (shape[0] * shape[1]))
    rest = (0,) * (len(img.shape) - 3)
    for k in range(0, shape[2], per):
        slab = np.asanyarray(img.dataobj[(slice(None), slice(None), slice(k, k + per)) + rest])
        yield slab.reshape(shape[:2] + (-1,))


def _nifti_slices(path: PathLike, img, shape: tuple[int, ...], axis: int):
    """8-bit slices, one window (the volume's min and max) for all of them so that they stay
    comparable. Read twice, slab by slab: once for the window, once to convert. Slices along
    the last axis come straight from the slabs; along another axis, from the 8-bit volume."""
    try:
        window = None
        if not img.get_data_dtype().names and img.get_data_dtype() != np.uint8:
            lo, hi = np.inf, -np.inf
            for slab in _nifti_slabs(img, shape):
                values = slab if np.issubdtype(slab.dtype, np.integer) else slab[np.isfinite(slab)]
                if values.size:
                    lo, hi = min(lo, float(values.min())), max(hi, float(values.max()))
            window = (lo, hi) if lo <= hi else (0.0, 0.0)
        volume, k = None, 0
        for slab in _nifti_slabs(img, shape):
            if slab.dtype.names:  # RGB24 / RGBA32 voxels
                slab = np.stack([slab[c] for c in slab.dtype.names[:3]], axis=-1)
            elif window is not None:
                slab = _window(slab, *window)
            if axis == 2 or len(shape) == 2:
                for j in range(slab.shape[2]):
                    # voxel (i, j) -> display with j running up the screen, as viewers show slices
                    yield k + j, np.ascontiguousarray(np.rot90(slab[:, :, j]))
            else:
                if volume is None:
                    volume = np.empty(shape[:3] + slab.shape[3:], np.uint8)
                volume[:, :, k:k + slab.shape[2]] = slab
            k += slab.shape[2]
    except Exception as exc:
        raise _failed(path, "cannot read the NIfTI voxel data", exc) from exc
    if volume is not None:
        for k in range(shape[axis]):
            yield k, np.ascontiguousarray(np.rot90(np.take(volume, k, axis=axis)))


def _window(plane: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Values in ``[lo, hi]`` -> 0..255 (NaN -> 0)."""
    plane = np.nan_to_num(plane.astype(np.float32), nan=lo, posinf=hi, neginf=lo)
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.rint((np.clip(plane, lo, hi) - lo) * scale).astype(np.uint8)


@contextlib.contextmanager
def _own_pixel_limit():
    """Pillow's bomb check off (it warns at 89 MP and refuses 179 MP): ``max_pixels`` rules."""
    from PIL import Image

    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _image_frames(path: PathLike, max_pixels: int):
    from PIL import Image, ImageSequence

    from . import png_stream

    with _own_pixel_limit():
        try:
            im = Image.open(path)
        except Exception as exc:
            raise _failed(path, "not a readable image", exc) from exc
        with im:
            _check_size(path, im.width, im.height, max_pixels, getattr(im, "n_frames", 1))
            layout = None
            if im.format == "PNG":
                with open(path, "rb") as f:
                    layout = png_stream.plain_png(f)
            if layout is not None:  # in strips: Pillow never holds the whole image
                def png_strips():
                    with open(path, "rb") as f:
                        yield from png_stream.strips(f, layout)
                try:
                    yield 0, _assemble(im.mode, im.size, png_strips)
                except Exception as exc:
                    raise _failed(path, "cannot decode image page 0", exc) from exc
                return
            for page, frame in enumerate(ImageSequence.Iterator(im)):
                try:
                    yield page, _assemble(frame.mode, frame.size, lambda: _crops(frame))
                except Exception as exc:
                    raise _failed(path, f"cannot decode image page {page}", exc) from exc


def _crops(im) -> Iterator[tuple[int, object]]:
    """A Pillow image (decoded whole on first use) as strips of rows."""
    step = max(1, (4 << 20) // max(1, im.width))
    for y in range(0, im.height, step):
        yield y, im.crop((0, y, im.width, min(im.height, y + step)))


def _assemble(mode: str, size: tuple[int, int], strips) -> np.ndarray:
    """The uint8 frame of ``strips()`` (``(first row, Pillow image)`` pieces), converted by
    :func:`_pil_to_uint8` piece by piece. 16-bit, 32-bit and float images are stretched by
    the whole image's range: a first pass over the pieces finds it."""
    window = None
    if mode in ("I", "F") or mode.startswith("I;"):
        lo, hi = np.inf, -np.inf
        for _, piece in strips():
            arr = np.asarray(piece)
            lo, hi = min(lo, float(arr.min())), max(hi, float(arr.max()))
        window = (lo, hi)
    out = None
    for y, piece in strips():
        part = _pil_to_uint8(piece, window)
        if out is None:
            out = np.empty((size[1],) + part.shape[1:], np.uint8)
        out[y:y + len(part)] = part
    return out


def _pil_to_uint8(im, window: tuple[float, float] | None = None) -> np.ndarray:
    """uint8 gray (1-bit, 8-bit, 16/32-bit or float gray, gray + alpha) or RGB (everything
    else) of a Pillow image; transparent pixels composited over black."""
    from PIL import Image

    if im.mode in ("1", "L"):
        return np.array(im.convert("L"))  # writable: cleaning edits frames in place
    if im.mode in ("I", "F") or im.mode.startswith("I;"):
        arr = np.asarray(im)
        return to_uint8(arr, 8 * arr.dtype.itemsize, window)
    if im.mode in ("LA", "La", "PA", "RGBA", "RGBa") or "transparency" in im.info:
        gray = im.mode in ("LA", "La")
        im = im.convert("RGBA")
        if im.getchannel("A").getextrema()[0] < 255:
            im = Image.alpha_composite(Image.new("RGBA", im.size, (0, 0, 0, 255)), im)
        if gray:
            return np.array(im.getchannel("R"))
    return np.asarray(im.convert("RGB"))


def _video_frames(path: PathLike, stride: int, max_pixels: int):
    import av

    try:
        container = av.open(str(path))
    except Exception as exc:
        raise _failed(path, "not a readable video", exc) from exc
    with container:
        if not container.streams.video:
            raise UnreadableFileError(f"{path}: has no video stream")
        stream = container.streams.video[0]
        width, height = stream.codec_context.width, stream.codec_context.height
        _check_size(path, width, height, max_pixels, -(-(stream.frames or 1) // stride))
        stream.thread_type = "AUTO"
        try:
            for index, frame in enumerate(container.decode(stream)):
                if index % stride == 0:
                    # streams need not declare their length: count what is read
                    _check_size(path, frame.width, frame.height, max_pixels, index // stride + 1)
                    yield index, frame.to_ndarray(format="rgb24")
        except av.FFmpegError as exc:
            raise _failed(path, "cannot decode the video", exc) from exc
