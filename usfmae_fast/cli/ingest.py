"""``usfmae-fast ingest``: raw ultrasound files -> clean images + manifest.csv."""
from __future__ import annotations

import argparse
import json

from . import add_config_args, exit_on


CONFIG_ORDER = ("Config: the IngestConfig defaults (IngestOptions + the run's fields) <- "
                "--config FILE.yaml <- the flags given <- --set key=value (repeatable).")


def config_from_args(args: argparse.Namespace):
    """The validated ``IngestConfig`` of ``ingest``'s arguments: defaults <- ``--config`` <-
    the flags given <- ``--set``."""
    from ..data.ingest import IngestConfig
    from ..runtime.config import build
    fields = {"sources": args.sources, "out": args.out, "max_side": args.max_side,
              "keep_color": True if args.color else None, "image_format": args.format,
              "jpeg_quality": args.quality, "frame_stride": args.frame_stride,
              "nifti_axis": args.nifti_axis, "crop": False if args.no_crop else None,
              "remove_text": False if args.no_inpaint else None,
              "near_dup_bits": args.near_dup_bits, "max_pixels": args.max_pixels,
              "workers": args.workers, "shard_size": args.shard_size,
              "strict": True if args.strict else None,
              "progress": False if args.quiet else None}
    return build(IngestConfig(), args.config, {k: v for k, v in fields.items() if v is not None},
                 args.set or [])


def _ingest(args: argparse.Namespace) -> int:
    from ..data.ingest import IngestError, ingest
    with exit_on():
        cfg = config_from_args(args)
    with exit_on(bad_input=(), failure=(IngestError,)):
        summary = ingest(cfg.sources, cfg.out, workers=cfg.workers,
                         shard_size=cfg.shard_size, strict=cfg.strict,
                         progress=cfg.progress, **cfg.options())
    print(json.dumps(summary, indent=2))
    return 0


def add_commands(sub) -> None:
    """Register ``ingest``."""
    from ..data.ingest import IngestConfig
    from ..runtime.config import help_for

    def default(name: str, text: str) -> str:
        return help_for(IngestConfig, name, text)

    p = sub.add_parser("ingest", help="DICOM / NIfTI / image / video files -> clean 8-bit images "
                       "+ manifest.csv (resumable)", description=CONFIG_ORDER)
    add_config_args(p, "IngestConfig", "max_side=256")
    p.add_argument("sources", nargs="+", metavar="SRC", help="files or folders (searched recursively)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--max-side", type=int,
                   help=default("max_side", "longer side of the images written"))
    p.add_argument("--color", action="store_true", help="keep colour (e.g. Doppler) instead of gray")
    p.add_argument("--format", choices=["png", "jpeg"],
                   help=default("image_format", "image format"))
    p.add_argument("--quality", type=int, help=default("jpeg_quality", "JPEG quality"))
    p.add_argument("--frame-stride", type=int, help=default(
        "frame_stride", "keep every n-th frame of cine loops and videos"))
    p.add_argument("--nifti-axis", type=int, help=default(
        "nifti_axis", "axis 3-D NIfTI volumes are sliced along"))
    p.add_argument("--no-crop", action="store_true", help="keep whole frames")
    p.add_argument("--no-inpaint", action="store_true", help="keep burned-in text and calipers")
    p.add_argument("--near-dup-bits", type=int, help=default(
        "near_dup_bits", "frames of one file within this many bits of the last kept one's "
        "256-bit difference hash are dropped; -1 keeps them"))
    p.add_argument("--max-pixels", type=int, help=default(
        "max_pixels", "most pixels read from one file, frames x width x height (after "
        "--frame-stride); larger files are reported as errors before decoding"))
    p.add_argument("--workers", type=int, help="processes (default: one per core)")
    p.add_argument("--shard-size", type=int, help=default(
        "shard_size", "also write webdataset tar shards of this many images, 0 = none"))
    p.add_argument("--strict", action="store_true", help="exit 1 when any file could not be read")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_ingest)
