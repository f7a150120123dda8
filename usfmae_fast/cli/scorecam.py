"""``usfmae-fast scorecam``: Score-CAM heatmaps of a classifier's decisions."""
from __future__ import annotations

import argparse
import json

from . import add_config_args, exit_on


CONFIG_ORDER = ("Config: the ScorecamConfig defaults (usfmae_fast/explain/config.py) <- "
                "--config FILE.yaml <- the flags given <- --set key=value (repeatable).")


def config_from_args(args: argparse.Namespace):
    """The validated ``ScorecamConfig`` of ``scorecam``'s arguments: defaults <- ``--config``
    <- the flags given <- ``--set``."""
    from ..explain.config import ScorecamConfig
    from ..runtime.config import build
    fields = {"ckpt": args.ckpt, "images": args.images, "out_dir": args.out,
              "model_name": args.model, "labels": args.labels, "class_source": args.class_source,
              "class_idx": args.class_idx, "target_layer": args.layer,
              "masks": args.masks, "device": args.device, "dtype": args.dtype,
              "score": args.score, "weights": args.weights, "batch_size": args.batch_size,
              "tolerance": args.tolerance, "faithfulness": args.faithfulness,
              "deletion_steps": args.deletion_steps, "deletion_baseline": args.deletion_baseline,
              "seed": args.seed, "colormap": args.colormap, "alpha": args.alpha}
    return build(ScorecamConfig(), args.config,
                 {k: v for k, v in fields.items() if v is not None}, args.set or [])


def add_commands(sub) -> None:
    """Register ``scorecam``."""
    from ..explain.config import (CHANNEL_WEIGHTS, CLASS_SOURCES, DELETION_BASELINES,
                                  LAYER_CHOICES, SCORES, ScorecamConfig)
    from ..runtime.config import help_for
    from ..runtime.precision import PRECISIONS

    def default(name: str, text: str) -> str:
        return help_for(ScorecamConfig, name, text)

    def run(args: argparse.Namespace) -> int:
        from ..explain.run import explain_images
        with exit_on():
            cfg = config_from_args(args)
            summary = explain_images(cfg.ckpt, cfg.images, cfg.out_dir, **cfg.run_kwargs())
        print(json.dumps({k: v for k, v in summary.items() if k != "images"}, indent=2))
        return 0

    p = sub.add_parser("scorecam", help="Score-CAM heatmaps, overlays and a grid for images "
                       "(+ pointing game / energy in lesion masks, deletion / insertion)",
                       description="Score-CAM of a timm classifier checkpoint (safetensors or "
                       ".pth/.pt state dict with its head; the architecture from --model or the "
                       "checkpoint's 'arch' entry; see usfmae_fast.models.classifier) on PNG / "
                       "JPEG images resized to the model's input. Writes OUT/heatmaps/*.npy, "
                       "OUT/overlays/*.png, OUT/grid.png and OUT/summary.json (class explained, "
                       "target layer, all-zero maps, pointing game and energy in mask beside a "
                       "centre pointer's and a uniform map's, the tolerance, deletion / "
                       "insertion areas of Score-CAM, Grad-CAM, Eigen-CAM and a random map). "
                       + CONFIG_ORDER)
    add_config_args(p, "ScorecamConfig", "alpha=0.3")
    p.add_argument("--ckpt", required=True, help="classifier checkpoint (.safetensors/.pth/.pt)")
    p.add_argument("--images", required=True, nargs="+", metavar="PATH",
                   help="image files or folders (searched recursively)")
    p.add_argument("--model", default=None, help="timm model name, e.g. "
                   "usfmae_vit_base_patch16_224 or densenet169 (default: the checkpoint's 'arch')")
    p.add_argument("--labels", default=None, help="ground truth: a CSV with path,label columns "
                   "(paths relative to it, labels the checkpoint's class names) or 'folder' (each "
                   "image's folder name); with labels each map explains the image's label")
    p.add_argument("--class-source", choices=CLASS_SOURCES, help=default(
        "class_source", "class explained: the label (auto: when --labels is given) or the "
        "model's prediction"))
    p.add_argument("--class", dest="class_idx", type=int, default=None,
                   help="one class to explain for every image (default: --class-source)")
    p.add_argument("--out", help=default("out_dir", "output folder"))
    p.add_argument("--masks", default=None, help="folder of lesion masks named like the images "
                   "(stem or stem_mask, nonzero = lesion; searched recursively): adds pointing "
                   "game and energy in mask")
    p.add_argument("--tolerance", type=float, help=default(
        "tolerance", "pointing-game tolerance in pixels; none: 15 px at 224 x 224 (Zhang et al.) "
        "scaled to the model's input"))
    p.add_argument("--layer", default=None, help="target layer name, or one of "
                   f"{', '.join(LAYER_CHOICES)} (a ViT's last block: {LAYER_CHOICES['last_norm1']} "
                   "is signed LayerNorm output and can give all-zero maps; "
                   f"{LAYER_CHOICES['last_mlp_act']} is the MLP's almost non-negative GELU "
                   "output, 4x the channels) (default: the last block's norm1 of a ViT, "
                   "features.norm5 of a DenseNet)")
    p.add_argument("--no-faithfulness", dest="faithfulness", action="store_const", const=False,
                   default=None, help="skip the deletion / insertion curves of Score-CAM, "
                   "Grad-CAM, Eigen-CAM and a random map")
    p.add_argument("--deletion-steps", type=int, help=default(
        "deletion_steps", "deletion / insertion steps, each a 1/steps share of the pixels"))
    p.add_argument("--deletion-baseline", choices=DELETION_BASELINES, help=default(
        "deletion_baseline", "what removed pixels become: the blurred image (sigma 5 px at "
        "224, scaled) or each channel's mean"))
    p.add_argument("--seed", type=int, help=default(
        "seed", "seed of the random map and of the order of equally salient pixels"))
    p.add_argument("--score", choices=SCORES,
                   help=default("score", "class score of a masked input"))
    p.add_argument("--weights", choices=CHANNEL_WEIGHTS, help=default(
        "weights", "channel weights: softmax of the scores (grad-cam) or the scores (paper)"))
    p.add_argument("--dtype", choices=PRECISIONS,
                   help=default("dtype", "autocast precision of the forward passes"))
    p.add_argument("--batch-size", type=int, default=None,
                   help="masked inputs per forward pass (default: from the memory budget)")
    p.add_argument("--device", default=None, help="e.g. cuda, cuda:1, cpu (default: cuda if any)")
    p.add_argument("--colormap", help=default("colormap", "matplotlib colormap"))
    p.add_argument("--alpha", type=float,
                   help=default("alpha", "heatmap opacity in the overlays"))
    p.set_defaults(func=run)
