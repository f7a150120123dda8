"""``usfmae-fast scorecam``: Score-CAM heatmaps of a classifier's decisions."""
from __future__ import annotations

import argparse
import json

from . import exit_on


def add_commands(sub) -> None:
    """Register ``scorecam``."""
    from ..runtime.precision import PRECISIONS

    def run(args: argparse.Namespace) -> int:
        from ..explain.run import explain_images
        with exit_on():
            summary = explain_images(
                args.ckpt, args.images, args.out, model_name=args.model, class_idx=args.class_idx,
                target_layer=args.layer, masks=args.masks, device=args.device, dtype=args.dtype,
                score=args.score, weights=args.weights, batch_size=args.batch_size,
                tolerance=args.tolerance, colormap=args.colormap, alpha=args.alpha)
        print(json.dumps({k: v for k, v in summary.items() if k != "images"}, indent=2))
        return 0

    p = sub.add_parser("scorecam", help="Score-CAM heatmaps, overlays and a grid for images "
                       "(+ pointing game / energy in lesion masks)",
                       description="Score-CAM of a timm classifier checkpoint (safetensors or "
                       ".pth/.pt state dict with its head; the architecture from --model or the "
                       "checkpoint's 'arch' entry; see usfmae_fast.models.classifier) on PNG / "
                       "JPEG images resized to the model's input. Writes OUT/heatmaps/*.npy, "
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
                   "(stem or stem_mask, nonzero = lesion; searched recursively): adds pointing "
                   "game and energy in mask")
    p.add_argument("--tolerance", type=float, default=0.0,
                   help="pointing-game tolerance in pixels (default: %(default)s)")
    p.add_argument("--layer", default=None, help="target layer name (default: the last block's "
                   "norm1 of a ViT, features.norm5 of a DenseNet)")
    p.add_argument("--score", choices=["logit", "softmax"], default="logit",
                   help="class score of a masked input (default: %(default)s)")
    p.add_argument("--weights", choices=["softmax", "raw"], default="softmax", help="channel "
                   "weights: softmax of the scores (grad-cam) or the scores (paper) "
                   "(default: %(default)s)")
    p.add_argument("--dtype", choices=PRECISIONS, default="fp32",
                   help="autocast precision of the forward passes (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=None,
                   help="masked inputs per forward pass (default: from the memory budget)")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if any)")
    p.add_argument("--colormap", default="jet", help="matplotlib colormap (default: %(default)s)")
    p.add_argument("--alpha", type=float, default=0.5,
                   help="heatmap opacity in the overlays (default: %(default)s)")
    p.set_defaults(func=run)
