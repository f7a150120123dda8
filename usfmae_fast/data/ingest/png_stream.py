"""A PNG decoded a strip of rows at a time, so that memory follows the strip, not the size the
file declares (a 600 KB PNG can declare 144 megapixels of RGBA: 576 MB in one buffer).

Pillow decodes a whole image into one buffer, so each strip is handed to it as a small PNG of
its own: the strip's scanlines, still filtered, re-framed under an IHDR of the strip's height,
with the file's PLTE and tRNS chunks. PNG filters refer to the row above, so the small PNG
starts with that row, unfiltered (filter type 0), and the decoded strip drops it.

That row is the raw bytes of the previous strip. Where Pillow's mode holds a row's bytes
exactly (8-bit samples, 16-bit gray) they come from its decode of the strip. Otherwise the
strip is first decoded as 8-bit samples with the same bytes per pixel (filters work on bytes,
each byte predicted from the one ``bpp`` bytes to its left): 16-bit gray + alpha as RGBA,
16-bit colour (6 or 8 bytes a pixel) as two interleaved RGB / RGBA images, samples under 8
bits (whose filters look one byte back) as gray a byte per pixel; the strip's pixels then come
from those raw rows, unfiltered, under the file's own header. Either way the pixels are the
ones Pillow gives for the whole file.

Interlaced (Adam7) and animated PNGs are not streamed (:func:`plain_png` returns None).
"""
from __future__ import annotations

import io
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np

SIGNATURE = b"\x89PNG\r\n\x1a\n"
_SAMPLES = {0: 1, 2: 3, 3: 1, 4: 2, 6: 4}  # colour type -> samples per pixel
_BYTES_COLOUR = {1: 0, 2: 4, 3: 2, 4: 6}    # bytes per pixel -> 8-bit colour type of that size
_STRIP_BYTES = 8 << 20                      # decoded bytes per strip
_READ = 1 << 16


@dataclass(frozen=True)
class PngLayout:
    width: int
    height: int
    depth: int
    colour: int                 # IHDR colour type
    chunks: bytes               # PLTE and tRNS, as found in the file
    idat: tuple[tuple[int, int], ...]  # (offset, length) of each IDAT chunk's data

    @property
    def bpp(self) -> int:       # bytes a filter looks back (1 for samples under 8 bits)
        return max(1, _SAMPLES[self.colour] * self.depth // 8)

    @property
    def row_bytes(self) -> int:
        return -(-self.width * _SAMPLES[self.colour] * self.depth // 8)

    @property
    def exact(self) -> bool:    # Pillow's mode holds the raw bytes of a row
        return self.depth == 8 or (self.depth == 16 and self.colour == 0)


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def plain_png(f) -> PngLayout | None:
    """The layout of the PNG open as ``f`` (binary, at its start), or None when it is not a
    PNG that can be read in strips (interlaced, animated, no IHDR first). Chunk data other
    than PLTE and tRNS is skipped, not read."""
    if f.read(8) != SIGNATURE:
        return None
    header, chunks, idat = None, [], []
    while len(head := f.read(8)) == 8:
        length, kind = struct.unpack(">I4s", head)
        start = f.tell()
        if kind == b"IHDR":
            header = struct.unpack(">IIBBBBB", f.read(13))
        elif header is None or kind == b"acTL":
            return None
        elif kind in (b"PLTE", b"tRNS"):
            chunks.append(_chunk(kind, f.read(length)))
        elif kind == b"IDAT":
            idat.append((start, length))
        elif kind == b"IEND":
            break
        f.seek(start + length + 4)  # past the data and the CRC
    if header is None:
        return None
    width, height, depth, colour, _, _, interlace = header
    if interlace or colour not in _SAMPLES or not width or not height:
        return None
    return PngLayout(width, height, depth, colour, b"".join(chunks), tuple(idat))


def _decode(width: int, height: int, depth: int, colour: int, chunks: bytes, lines: np.ndarray):
    """Pillow's image of a PNG made of ``lines`` (filter byte + scanline each), loaded."""
    from PIL import Image

    header = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    data = (SIGNATURE + _chunk(b"IHDR", header) + chunks
            + _chunk(b"IDAT", zlib.compress(lines.tobytes(), 0)) + _chunk(b"IEND", b""))
    image = Image.open(io.BytesIO(data))
    image.load()
    return image


def _raw_rows(image, layout: PngLayout) -> np.ndarray:
    """The raw (unfiltered) bytes ``[rows, row_bytes]`` of a decoded strip whose mode holds
    them exactly (:attr:`PngLayout.exact`)."""
    pixels = np.asarray(image)
    if layout.depth == 16:
        pixels = pixels.astype(">u2").view(np.uint8)
    return pixels.reshape(len(pixels), -1)


def _unfilter(lines: np.ndarray, above: np.ndarray, bpp: int) -> np.ndarray:
    """Raw bytes of filtered ``lines`` ``[rows, 1 + row_bytes]`` below the raw row ``above``,
    decoded as 8-bit images of up to 4 bytes a pixel (two interleaved ones for 6 and 8)."""
    rows, stride = lines.shape
    group = bpp if bpp <= 4 else bpp // 2
    pixels = (stride - 1) // group
    body = lines[:, 1:].reshape(rows, pixels // (bpp // group), bpp // group, group)
    top = above.reshape(pixels // (bpp // group), bpp // group, group)
    raw = np.empty_like(body)
    for lane in range(bpp // group):
        part = np.empty((rows + 1, 1 + body.shape[1] * group), np.uint8)
        part[0, 0], part[0, 1:] = 0, top[:, lane].reshape(-1)
        part[1:, 0], part[1:, 1:] = lines[:, 0], body[:, :, lane].reshape(rows, -1)
        image = _decode(body.shape[1], rows + 1, 8, _BYTES_COLOUR[group], b"", part)
        raw[:, :, lane] = np.asarray(image)[1:].reshape(rows, -1, group)
    return raw.reshape(rows, -1)


def _scanlines(f, layout: PngLayout) -> Iterator[bytes]:
    """The image data, inflated, in pieces of at most ``_STRIP_BYTES``."""
    inflate = zlib.decompressobj()
    for offset, length in layout.idat:
        f.seek(offset)
        while length > 0:
            data = f.read(min(_READ, length))
            if not data:
                return
            length -= len(data)
            while data:
                out = inflate.decompress(data, _STRIP_BYTES)
                data = inflate.unconsumed_tail
                if out:
                    yield out
            if inflate.eof:
                return
    if rest := inflate.flush():
        yield rest


def strips(f, layout: PngLayout) -> Iterator[tuple[int, object]]:
    """``(first row, Pillow image of the rows from there)`` for the whole image, top to
    bottom; ``ValueError`` when the image data ends early or is corrupt."""
    stride = 1 + layout.row_bytes
    per_strip = max(1, _STRIP_BYTES // stride)
    above = np.zeros(layout.row_bytes, np.uint8)  # PNG's row above the first: zeros
    pending = bytearray()
    pieces = _scanlines(f, layout)
    try:
        for y in range(0, layout.height, per_strip):
            rows = min(per_strip, layout.height - y)
            while len(pending) < rows * stride:
                piece = next(pieces, None)
                if piece is None:
                    raise ValueError(f"truncated PNG: its image data ends in row "
                                     f"{y + len(pending) // stride} of {layout.height}")
                pending += piece
            lines = np.frombuffer(bytes(pending[:rows * stride]), np.uint8).reshape(rows, stride)
            del pending[:rows * stride]
            if (lines[:, 0] > 4).any():
                raise ValueError(f"corrupt PNG: unknown filter type in rows {y}..{y + rows - 1}")
            if layout.exact:
                block = np.empty((rows + 1, stride), np.uint8)
                block[0, 0], block[0, 1:], block[1:] = 0, above, lines
                image = _decode(layout.width, rows + 1, layout.depth, layout.colour,
                                layout.chunks, block)
                image = image.crop((0, 1, layout.width, rows + 1))
                above = _raw_rows(image.crop((0, rows - 1, layout.width, rows)), layout)[0]
            else:
                raw = _unfilter(lines, above, layout.bpp)
                above = raw[-1]
                plain = np.concatenate([np.zeros((rows, 1), np.uint8), raw], axis=1)
                image = _decode(layout.width, rows, layout.depth, layout.colour, layout.chunks,
                                plain)
            yield y, image
    except zlib.error as exc:
        raise ValueError(f"corrupt PNG image data: {exc}") from exc
