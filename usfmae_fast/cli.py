"""``usfmae-fast`` command line: ``info`` (what is available here and why not), ``demo``,
``ingest`` (raw ultrasound files -> clean images + manifest.csv), ``scorecam`` (heatmaps of a
classifier's decisions)."""
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


def _add_scorecam(sub) -> None:
    def run(args: argparse.Namespace) -> int:
        from .explain.run import explain_images
        try:
            summary = explain_images(
                args.ckpt, args.images, args.out, model_name=args.model, class_idx=args.class_idx,
                target_layer=args.layer, masks=args.masks, device=args.device, dtype=args.dtype,
                score=args.score, weights=args.weights, batch_size=args.batch_size,
                tolerance=args.tolerance, colormap=args.colormap, alpha=args.alpha)
        except (ValueError, FileNotFoundError) as exc:
            print(f"usfmae-fast scorecam: {exc}", file=sys.stderr)
            return 2
        print(json.dumps({k: v for k, v in summary.items() if k != "images"}, indent=2))
        return 0

    p = sub.add_parser("scorecam", help="Score-CAM heatmaps, overlays and a grid for images "
                       "(+ pointing game / energy in lesion masks)",
                       description="Score-CAM of a timm classifier checkpoint (safetensors or "
                       ".pth/.pt state dict with its head; the architecture from --model or the "
                       "checkpoint's 'arch' entry; see usfmae_fast.explain.run) on PNG / JPEG "
                       "images resized to the model's input. Writes OUT/heatmaps/*.npy, "
                       "OUT/overlays/*.png, OUT/grid.png and OUT/summary.json.")
    p.add_argument("--ckpt", required=True, help="classifier checkpoint (.safetensors/.pth/.pt)")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                   help="image files or folders (searched recursively)")
    p.add_argument("--model", default=None, help="timm model name, e.g. "
                   "usfmae_vit_base_patch16_224 or densenet169 (default: the checkpoint's 'arch')")
    p.add_argument("--class", dest="class_idx", type=int, default=None,
                   help="class to explain (default: each image's predicted class)")
    p.add_argument("--out", default="outputs/scorecam", help="output folder (default: %(default)s)")
    p.add_argument("--masks", default=None, help="folder of lesion masks named like the images "
                   "(stem or stem_mask, nonzero = lesion): adds pointing game and energy in mask")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="pointing-game tolerance in pixels (default: %(default)s)")
    p.add_argument("--layer", default=None, help="target layer name (default: the last block's "
                   "norm1 of a ViT, features.norm5 of a DenseNet)")
    p.add_argument("--score", choices=["logit", "softmax"], default="logit",
                   help="class score of a masked input (default: %(default)s)")
    p.add_argument("--weights", choices=["softmax", "raw"], default="softmax", help="channel "
                   "weights: softmax of the scores (grad-cam) or the scores (paper) "
                   "(default: %(default)s)")
    p.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="autocast precision of the forward passes (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="masked inputs per forward pass (default: from the memory budget)")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if any)")
    p.add_argument("--colormap", default="jet", help="matplotlib colormap (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="heatmap opacity in the overlays (default: %(default)s)")
    p.set_defaults(func=run)


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
    _add_scorecam(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
