"""``usfmae-fast`` command line: ``info`` (what is available here and why not), ``demo``,
``ingest`` (raw ultrasound files -> clean images + manifest.csv)."""
from __future__ import annotations

import argparse
import json
import sys


def _info(args: argparse.Namespace) -> int:
    from .info import collect, render
    report = collect()
    print(json.dumps(report, indent=2) if args.json else render(report))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from .demo import run_demo
    run_demo(args.out, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    return 0


def _ingest(args: argparse.Namespace) -> int:
    from .data.ingest import IngestError, ingest
    try:
        summary = ingest(args.sources, args.out, workers=args.workers, shard_size=args.shard_size,
                         strict=args.strict, progress=not args.quiet, max_side=args.max_side,
                         keep_color=args.color, image_format=args.format,
                         jpeg_quality=args.quality, frame_stride=args.frame_stride,
                         nifti_axis=args.nifti_axis, crop=not args.no_crop,
                         remove_text=not args.no_inpaint, near_dup_bits=args.near_dup_bits,
                         max_pixels=args.max_pixels)
    except IngestError as exc:
        print(f"usfmae-fast ingest: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(summary, indent=2))
    return 0


def _add_ingest(sub) -> None:
    from .data.ingest import IngestOptions
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
                   help="frames with more pixels are reported as errors (default: %(default)s)")
    p.add_argument("--workers", type=int, default=None, help="processes (default: one per core)")
    p.add_argument("--shard-size", type=int, default=0,
                   help="also write webdataset tar shards of this many images (default: none)")
    p.add_argument("--strict", action="store_true", help="exit 1 when any file could not be read")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_ingest)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="usfmae-fast", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, device, usable backends and why others are not")
    info.add_argument("--json", action="store_true", help="print JSON instead of text")
    info.set_defaults(func=_info)
    demo = sub.add_parser("demo", help="pretrain a tiny MAE on real ultrasound DICOMs (CPU, minutes)")
    demo.add_argument("--out", default="outputs/demo", help="output folder (default: %(default)s)")
    demo.add_argument("--steps", type=int, default=300, help="training steps (default: %(default)s)")
    demo.add_argument("--seed", type=int, default=0, help="random seed (default: %(default)s)")
    demo.add_argument("--batch-size", type=int, default=32, help="batch size (default: %(default)s)")
    demo.set_defaults(func=_demo)
    _add_ingest(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
