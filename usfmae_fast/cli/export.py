"""``usfmae-fast export CHECKPOINT --format {hf, hf-encoder, onnx, timm} --out PATH``: a
checkpoint in a format other tools load, with a JSON summary on stdout.

- ``hf`` / ``hf-encoder``: a Hugging Face ``transformers`` folder (``models.hf.export_hf``): an
  MAE checkpoint as ViTMAE (``hf``) or its encoder as ViTModel (``hf-encoder``), a
  token-pooled ViT classifier as ViTForImageClassification; needs the ``[hf]`` extra.
- ``onnx``: a fine-tuned classifier (ViT or CNN) checked against PyTorch with onnxruntime
  (``models/onnx.py``); needs the ``[onnx]`` extra.
- ``timm``: an MAE checkpoint's encoder for ``timm.create_model(usfmae_vit_*,
  checkpoint_path=PATH)`` (``models.checkpoint.export_timm``).

A bad or unsuitable checkpoint and a missing extra exit 2 (``usfmae_fast.cli.exit_on``); an ONNX
model whose logits differ from PyTorch's beyond ``--tolerance`` exits 1 and writes nothing.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
from pathlib import Path

from . import exit_on

FORMATS = ("hf", "hf-encoder", "onnx", "timm")


class MissingExtra(RuntimeError):
    """An optional dependency of the chosen format is not installed."""


def _hf(checkpoint: str, out: str, encoder_only: bool) -> dict:
    if importlib.util.find_spec("transformers") is None:
        raise MissingExtra("transformers not installed: pip install 'usfmae_fast[hf]'")
    try:
        from ..models.hf import export_hf
    except ImportError as exc:
        raise MissingExtra(f"--format hf: usfmae_fast.models.hf does not import ({exc})") from exc
    path = export_hf(checkpoint, out, encoder_only=encoder_only)
    return {"path": str(path), "format": "hf-encoder" if encoder_only else "hf"}


def _onnx(checkpoint: str, out: str, args: argparse.Namespace) -> dict:
    from ..models import onnx
    try:
        onnx.require(*onnx.EXTRA_PACKAGES)
    except RuntimeError as exc:
        raise MissingExtra(str(exc)) from exc
    with exit_on(failure=(RuntimeError,)):  # a parity failure: the work failed, exit 1
        return onnx.export_onnx(checkpoint, out, opset=args.opset, tolerance=args.tolerance)


def _timm(checkpoint: str, out: str) -> dict:
    from ..models.checkpoint import export_timm, load_model
    from ..models.mae import PRESETS
    from ..models.timm_models import NAMES, timm_kwargs

    model = load_model(checkpoint, encoder_only=True)
    size = min(PRESETS, key=lambda s: abs(PRESETS[s]["embed_dim"] - model.config["embed_dim"]))
    kwargs = {k: v for k, v in timm_kwargs(model.config).items() if k != "fc_norm"}
    path = export_timm(model, out)
    return {"path": str(path), "format": "timm", "timm_name": NAMES[size],
            "create_model_kwargs": kwargs}


def _export(args: argparse.Namespace) -> int:
    checkpoint = args.checkpoint
    with exit_on(bad_input=(ValueError, FileNotFoundError, MissingExtra)):
        if not Path(checkpoint).is_file():
            raise FileNotFoundError(f"checkpoint: {checkpoint!r} does not exist")
        if args.format == "onnx":
            summary = _onnx(checkpoint, args.out, args)
        elif args.format == "timm":
            summary = _timm(checkpoint, args.out)
        else:
            summary = _hf(checkpoint, args.out, args.format == "hf-encoder")
    print(json.dumps({"checkpoint": checkpoint, **summary}, indent=2))
    return 0


def add_commands(sub) -> None:
    """Register ``export``."""
    p = sub.add_parser("export", help="a checkpoint as Hugging Face, ONNX or timm files",
                       description=__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("checkpoint", metavar="CHECKPOINT", help="onnx: a fine-tuned "
                   "classifier; timm, hf-encoder: an MAE checkpoint; hf: either")
    p.add_argument("--format", required=True, choices=FORMATS, help="what to write (above)")
    p.add_argument("--out", required=True, metavar="PATH", help="file (onnx, timm: .safetensors "
                   "or .pth) or folder (hf, hf-encoder) to write")
    p.add_argument("--opset", type=int, default=18, help="onnx: ONNX opset (default: "
                   "%(default)s)")
    p.add_argument("--tolerance", type=float, default=1e-4, help="onnx: largest max |logit "
                   "difference| onnxruntime vs PyTorch accepted on random images (default: "
                   "%(default)s); above it the export fails and writes nothing")
    p.set_defaults(func=_export)
