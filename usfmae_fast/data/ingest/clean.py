"""Frame cleaning for ``ingest``: scan-area crop, burned-in text removal, resize, hashes.

- **Crop.** To the ultrasound regions the DICOM file declares when it has them, otherwise to
  the scan sector(s) found in the pixels (:func:`find_sector`); when none is found the frame
  is kept whole. Inside the crop, pixels outside the sectors' convex hulls (the corners of a
  fan, where scanners print their settings) are set to black.
- **Text and calipers.** Found on the crop at its own resolution (at most ``_MARK_SIDE``
  px), where scanners draw strokes 1-3 px wide: thin bright strokes (white top-hat over
  ``_STROKE_KERNEL`` px of at least ``_STROKE_CONTRAST``) that are near-white
  (``_STROKE_LEVEL``) or lie on black (text beside the image, any gray); for gray output of
  a colour source also thin coloured strokes (chroma of at least ``_MARK_CHROMA``, narrower
  than the same kernel: calipers, traces), while a Doppler flow area, wider, stays as its
  luma. When colour is kept only near-white strokes go, so that colour flow survives. The
  mask, shrunk to the output size and widened by one pixel, is filled by OpenCV's Telea
  inpainting.
- **Duplicates.** ``content_hash`` (BLAKE2b of shape and pixels) finds exact repeats;
  ``difference_hash`` (256-bit dHash) with a Hamming distance finds near-repeats such as
  neighbouring cine frames: on the pydicom-data echo loop neighbours sit 0-12 bits apart,
  while unrelated frames inside the same fan outline sit 40 or more apart.
"""
from __future__ import annotations

import hashlib

import cv2
import numpy as np

from .readers import Box

_WORK_SIDE = 256
_BACKGROUND_LEVEL = 4
_DENSITY = 0.6
_BLUR = 0.03
_OPEN = 0.035
_MIN_SECTOR_FRACTION = 0.05
_MAX_ASPECT = 6
_STROKE_KERNEL = 5
_STROKE_LEVEL = 200
_STROKE_CONTRAST = 60
_MARK_CHROMA = 50
_WHITE_MAX_CHROMA = 30
_MARK_SIDE = 1024
HASH_SIDE = 16


def to_gray(frame: np.ndarray) -> np.ndarray:
    return frame if frame.ndim == 2 else cv2.cvtColor(frame, cv2.COLOR_RGB2GRAY)


def _resize(img: np.ndarray, scale: float) -> np.ndarray:
    if scale >= 1.0:
        return img
    h, w = img.shape[:2]
    return cv2.resize(img, (max(1, round(w * scale)), max(1, round(h * scale))),
                      interpolation=cv2.INTER_AREA)


def _foreground(frame: np.ndarray) -> np.ndarray:
    """uint8 255 where a frame's gray level is above the background, else 0: one new array of
    the frame's size (a colour frame's gray copy is thresholded in place)."""
    if frame.ndim == 2:
        return cv2.threshold(frame, _BACKGROUND_LEVEL, 255, cv2.THRESH_BINARY)[1]
    gray = to_gray(frame)
    cv2.threshold(gray, _BACKGROUND_LEVEL, 255, cv2.THRESH_BINARY, dst=gray)
    return gray


def find_sector(frame: np.ndarray) -> tuple[Box, list[np.ndarray]] | None:
    """``(box, hulls)`` of the scan area of a frame (gray or RGB, by its gray level): the
    bounding box and the convex hulls (float ``[K, 2]`` x, y points) of its one or more sectors
    (dual views), in the frame's pixels; None when nothing is found.

    A sector is where nearly every pixel is above the background (``_DENSITY`` of them, over a
    window of ``_BLUR`` of the side): speckle is dense, text is sparse strokes on black. The
    density is measured on a copy of at most ``_WORK_SIDE`` px, opened with a disc of
    ``_OPEN`` of the side to cut thin links; areas under ``_MIN_SECTOR_FRACTION`` of the frame
    or half the largest, and bars longer than ``_MAX_ASPECT`` times their width (headers,
    scales), are not sectors.
    """
    h, w = frame.shape[:2]
    scale = min(1.0, _WORK_SIDE / max(h, w))
    density = _resize(_foreground(frame), scale)
    side = max(density.shape)
    blur = max(3, round(_BLUR * side)) | 1
    fg = (cv2.blur(density, (blur, blur)) > _DENSITY * 255).astype(np.uint8)
    k = max(3, round(_OPEN * side)) | 1
    fg = cv2.morphologyEx(fg, cv2.MORPH_OPEN, cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (k, k)))
    n, labels, stats, _ = cv2.connectedComponentsWithStats(fg, connectivity=8)
    x, y, bw, bh, area = (stats[1:, i] for i in range(5))
    blob = np.maximum(bw, bh) <= _MAX_ASPECT * np.minimum(bw, bh)
    if not blob.any():
        return None
    keep = blob & (area >= max(_MIN_SECTOR_FRACTION * density.size, 0.5 * area[blob].max()))
    if not keep.any():
        return None
    sx, sy = w / density.shape[1], h / density.shape[0]
    box = (int(x[keep].min() * sx), int(y[keep].min() * sy),
           min(w, int(np.ceil((x + bw)[keep].max() * sx))),
           min(h, int(np.ceil((y + bh)[keep].max() * sy))))
    hulls = []
    for label in 1 + np.flatnonzero(keep):
        hull = cv2.convexHull(cv2.findNonZero((labels == label).astype(np.uint8)))[:, 0, :]
        hulls.append((hull.astype(np.float32) + 0.5) * np.array([sx, sy], np.float32))
    return box, hulls


def annotation_mask(img: np.ndarray, gray_out: bool) -> np.ndarray:
    """uint8 0/255 mask of burned-in text, calipers and markers of a frame; ``gray_out``: the
    frame will be written gray, so coloured marks go too."""
    gray = to_gray(img)
    kernel = cv2.getStructuringElement(cv2.MORPH_RECT, (_STROKE_KERNEL, _STROKE_KERNEL))
    tophat = cv2.morphologyEx(gray, cv2.MORPH_TOPHAT, kernel)
    # on black (text beside the image) any clear stroke; over tissue only near-white ones
    on_black = cv2.erode(gray, np.ones((2 * _STROKE_KERNEL - 1,) * 2, np.uint8)) <= _BACKGROUND_LEVEL
    mask = (tophat >= _STROKE_CONTRAST) & ((gray >= _STROKE_LEVEL) | on_black)
    if img.ndim == 3:
        r, g, b = cv2.split(img)
        chroma = cv2.max(cv2.max(r, g), b) - cv2.min(cv2.min(r, g), b)  # OpenCV: no slow axis-2 reductions
        if gray_out:  # thin coloured strokes: what an opening removes from the coloured area
            coloured = (chroma >= _MARK_CHROMA).astype(np.uint8)
            mask |= (coloured - cv2.morphologyEx(coloured, cv2.MORPH_OPEN, kernel)) > 0
        else:
            mask &= chroma < _WHITE_MAX_CHROMA
    return mask.astype(np.uint8) * np.uint8(255)


def clean_frame(frame: np.ndarray, region: Box | None = None, *, max_side: int = 512,
                keep_color: bool = False, crop: bool = True,
                remove_text: bool = True) -> tuple[np.ndarray, Box, str]:
    """One uint8 frame (gray or RGB) -> ``(image, crop_box, crop_source)``.

    ``image`` is uint8 gray, or RGB when ``keep_color`` and the frame has colour, with its
    longer side at most ``max_side`` (never enlarged); ``crop_box`` is in the frame's pixels;
    ``crop_source`` says where it came from: "dicom_regions", "detected" or "none".
    """
    h, w = frame.shape[:2]
    box, source, hulls = (0, 0, w, h), "none", []
    if crop:
        if region is not None:
            box, source = region, "dicom_regions"
        x0, y0, x1, y1 = box
        found = find_sector(frame[y0:y1, x0:x1])
        if found is not None:
            (bx0, by0, bx1, by1), hulls = found
            hulls = [hull + np.array([x0, y0], np.float32) for hull in hulls]
            if region is None:
                box, source = (x0 + bx0, y0 + by0, x0 + bx1, y0 + by1), "detected"
    x0, y0, x1, y1 = box
    cropped = frame[y0:y1, x0:x1]
    img = _resize(cropped, min(1.0, max_side / max(x1 - x0, y1 - y0)))
    marks = None
    if remove_text:  # found near the scanner's own resolution, where strokes are 1-3 px wide
        found = annotation_mask(_resize(cropped, min(1.0, _MARK_SIDE / max(x1 - x0, y1 - y0))),
                                gray_out=not keep_color)
        found = cv2.resize(found, (img.shape[1], img.shape[0]), interpolation=cv2.INTER_AREA)
        marks = cv2.dilate((found > 0).astype(np.uint8) * np.uint8(255), np.ones((3, 3), np.uint8))
    if img.ndim == 3 and (not keep_color or (np.array_equal(img[..., 0], img[..., 1])
                                             and np.array_equal(img[..., 0], img[..., 2]))):
        img = to_gray(img)
    img = np.ascontiguousarray(img)
    if hulls:
        sy, sx = img.shape[0] / (y1 - y0), img.shape[1] / (x1 - x0)
        inside = np.zeros(img.shape[:2], np.uint8)
        for hull in hulls:
            points = (hull - np.array([x0, y0], np.float32)) * np.array([sx, sy], np.float32)
            cv2.fillPoly(inside, [np.rint(points).astype(np.int32)], 255)
        # the hulls join the centres of work-size pixels: widen by one of those pixels
        rim = 2 * int(np.ceil(max(img.shape[:2]) / _WORK_SIDE)) + 1
        inside = cv2.dilate(inside, np.ones((rim, rim), np.uint8))
        img[inside == 0] = 0
        if marks is not None:
            marks &= inside
    if marks is not None and marks.any():
        img = cv2.inpaint(img, marks, 3, cv2.INPAINT_TELEA)
    return img, box, source


def content_hash(img: np.ndarray) -> str:
    digest = hashlib.blake2b(digest_size=16)
    digest.update(repr(img.shape).encode())
    digest.update(np.ascontiguousarray(img).tobytes())
    return digest.hexdigest()


def difference_hash(img: np.ndarray) -> np.ndarray:
    """256-bit difference hash (dHash): the gray frame shrunk to 17x16, a bit per horizontal
    neighbour pair, set where brightness rises. It follows the content, not the sector's
    outline, which every frame of a probe shares, nor the overall gain."""
    small = cv2.resize(to_gray(img), (HASH_SIDE + 1, HASH_SIDE), interpolation=cv2.INTER_AREA)
    return np.packbits(small[:, 1:] > small[:, :-1])


def hamming(a: np.ndarray, b: np.ndarray) -> int:
    return int(np.unpackbits(a ^ b).sum())


def encode(img: np.ndarray, image_format: str = "png", jpeg_quality: int = 95) -> bytes:
    """PNG or JPEG bytes of a uint8 gray or RGB image."""
    bgr = img if img.ndim == 2 else cv2.cvtColor(img, cv2.COLOR_RGB2BGR)
    if image_format == "png":
        ok, buf = cv2.imencode(".png", bgr)
    else:
        ok, buf = cv2.imencode(".jpg", bgr, [cv2.IMWRITE_JPEG_QUALITY, int(jpeg_quality)])
    if not ok:
        raise RuntimeError(f"OpenCV could not encode a {img.shape} image as {image_format}")
    return buf.tobytes()
