"""``usfmae-fast ingest``: raw ultrasound files -> clean images + manifest.csv."""
from __future__ import annotations

import argparse
import json

from . import exit_on


def _ingest(args: argparse.Namespace) -> int:
    from ..data.ingest import IngestError, ingest
    with exit_on(bad_input=(), failure=(IngestError,)):
        summary = ingest(args.sources, args.out, workers=args.workers,
                         shard_size=args.shard_size, strict=args.strict,
                         progress=not args.quiet, max_side=args.max_side,
                         keep_color=args.color, image_format=args.format,
                         jpeg_quality=args.quality, frame_stride=args.frame_stride,
                         nifti_axis=args.nifti_axis, crop=not args.no_crop,
                         remove_text=not args.no_inpaint, near_dup_bits=args.near_dup_bits,
                         max_pixels=args.max_pixels)
    print(json.dumps(summary, indent=2))
    return 0


def add_commands(sub) -> None:
    """Register ``ingest``."""
    from ..data.ingest import IngestOptions
    default = IngestOptions()
    p = sub.add_parser("ingest", help="DICOM / NIfTI / image / video files -> clean 8-bit images "
                       "+ manifest.csv (resumable)")
    p.add_argument("sources", nargs="+", metavar="SRC", help="files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-side", type=int, default=default.max_side,
                   help="longer side of the images written (default: %(default)s)")
    p.add_argument("--color", action="store_true", help="keep colour (e.g. Doppler) instead of gray")
    p.add_argument("--format", choices=["png", "jpeg"], default=default.image_format,
                   help="image format (default: %(default)s)")
    p.add_argument("--quality", type=int, default=default.jpeg_quality,
                   help="JPEG quality (default: %(default)s)")
    p.add_argument("--frame-stride", type=int, default=default.frame_stride,
                   help="keep every n-th frame of cine loops and videos (default: %(default)s)")
    p.add_argument("--nifti-axis", type=int, default=default.nifti_axis,
                   help="axis 3-D NIfTI volumes are sliced along (default: %(default)s)")
    p.add_argument("--no-crop", action="store_true", help="keep whole frames")
    p.add_argument("--no-inpaint", action="store_true", help="keep burned-in text and calipers")
    p.add_argument("--near-dup-bits", type=int, default=default.near_dup_bits,
                   help="frames of one file within this many bits of the last kept one's 256-bit "
                   "difference hash are dropped; -1 keeps them (default: %(default)s)")
    p.add_argument("--max-pixels", type=int, default=default.max_pixels,
                   help="most pixels read from one file, frames x width x height (after "
                   "--frame-stride); larger files are reported as errors before decoding "
                   "(default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--shard-size", type=int, default=0,
                   help="also write webdataset tar shards of this many images (default: none)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any file could not be read")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_ingest)
