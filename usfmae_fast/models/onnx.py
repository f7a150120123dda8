"""A fine-tuned classifier (ViT or CNN, any checkpoint :func:`~.classifier.load_finetuned`
reads) as an ONNX file, checked against PyTorch with onnxruntime before it is kept.

The plain timm model is exported in fp32, exactly as ``load_finetuned`` builds it (never through
``usfmae_fast.accelerate``: the graph holds standard ONNX operators only, and a node of any
other domain fails the export). Exporter: ``torch.onnx.export(..., dynamo=True)``
(``torch.export`` + onnxscript), the exporter PyTorch maintains; the TorchScript one is
deprecated. Input ``image`` ``float32 [batch, C, S, S]``, already prepared (see
:func:`preprocessing`), output ``logits`` ``[batch, classes]``; the batch axis is dynamic.
The file's ``metadata_props`` say how to prepare images and what the logits mean.

Needs the ``[onnx]`` extra (``onnx``, ``onnxruntime``, ``onnxscript``); without it
:func:`require` raises a ``RuntimeError`` saying what to install.
"""
from __future__ import annotations

import hashlib
import importlib
import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..runtime.files import atomic_write
from .classifier import LoadedClassifier, load_finetuned

EXTRA_PACKAGES = ("onnx", "onnxruntime", "onnxscript")
STANDARD_DOMAINS = ("", "ai.onnx", "ai.onnx.ml")


def require(*modules: str, extra: str = "onnx"):
    """The imported ``modules``; ``RuntimeError`` naming the missing ones and the extra."""
    found, missing = [], []
    for name in modules:
        try:
            found.append(importlib.import_module(name))
        except ImportError:
            missing.append(name)
    if missing:
        raise RuntimeError(f"{', '.join(missing)} not installed: pip install "
                           f"'usfmae_fast[{extra}]'")
    return found


def sha256(path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def preprocessing(loaded: LoadedClassifier) -> str:
    """How images become the ``image`` input: the eval transform of the loaders
    (``data.load.torch_loader.eval_transform``; DALI's eval pipeline matches it)."""
    colour = "grayscale (PIL convert('L'))" if loaded.in_chans == 1 else "RGB"
    return (f"decode to {colour} uint8; resize the short side to {loaded.img_size} px (bicubic, "
            f"antialias); centre crop {loaded.img_size}x{loaded.img_size}; scale to [0, 1] "
            f"(divide by 255); normalise per channel (x - mean) / std with mean {loaded.mean}, "
            f"std {loaded.std}; layout NCHW float32. Output: logits in the order of 'classes' "
            "(softmax for probabilities)")


def metadata(loaded: LoadedClassifier, checkpoint, opset: int) -> dict[str, str]:
    from .. import __version__
    return {"classes": json.dumps(loaded.classes), "input_size": json.dumps(
                [loaded.in_chans, loaded.img_size, loaded.img_size]),
            "channels": str(loaded.in_chans), "mean": json.dumps(loaded.mean),
            "std": json.dumps(loaded.std), "preprocessing": preprocessing(loaded),
            "opset": str(opset), "source_checkpoint": Path(checkpoint).name,
            "source_sha256": sha256(checkpoint), "usfmae_fast_version": __version__}


def _check_operators(model, path) -> None:
    domains = STANDARD_DOMAINS + tuple(f.domain for f in model.functions)
    custom = sorted({f"{n.domain}::{n.op_type}" for n in model.graph.node
                     if n.domain not in domains})
    if custom:
        raise RuntimeError(f"onnx: the graph of {str(path)!r} holds non-standard operators "
                           f"{custom}; export the plain timm model (not accelerate()d)")


def _max_logit_diff(session, model: torch.nn.Module, shape, batches, seed: int) -> float:
    generator = torch.Generator().manual_seed(seed)
    worst = 0.0
    for batch in batches:
        images = torch.randn((batch, *shape), generator=generator)
        with torch.no_grad():
            expected = model(images).numpy()
        got = session.run(["logits"], {"image": images.numpy()})[0]
        if got.shape != expected.shape:
            raise RuntimeError(f"onnx: logits of shape {got.shape} at batch {batch}, PyTorch "
                               f"gives {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    return worst


def export_onnx(checkpoint, out_path, *, opset: int = 18, tolerance: float = 1e-4,
                batch: int = 2, seed: int = 0) -> dict:
    """Export the classifier of ``checkpoint`` to ``out_path`` (see the module docstring) and
    check onnxruntime's logits against PyTorch's on seeded random images at batch 1 and
    ``batch + 1`` (not the traced size: the dynamic axis is exercised). Above ``tolerance``
    (max |logit difference|) ``RuntimeError`` and no file. Returns a summary."""
    onnx, ort, _ = require(*EXTRA_PACKAGES)
    if not Path(checkpoint).is_file():
        raise FileNotFoundError(f"checkpoint: {str(checkpoint)!r} does not exist")
    loaded = load_finetuned(checkpoint)
    model = loaded.model.float().eval().cpu()
    shape = (loaded.in_chans, loaded.img_size, loaded.img_size)
    example = torch.randn((batch, *shape), generator=torch.Generator().manual_seed(seed))
    with tempfile.TemporaryDirectory() as tmp:
        traced = Path(tmp) / "model.onnx"
        torch.onnx.export(model, (example,), str(traced), input_names=["image"],
                          output_names=["logits"], opset_version=opset, dynamo=True,
                          external_data=False, verbose=False,
                          dynamic_shapes=({0: torch.export.Dim("batch", min=1)},))
        proto = onnx.load(str(traced))
    _check_operators(proto, checkpoint)
    for key, value in metadata(loaded, checkpoint, opset).items():
        entry = proto.metadata_props.add()
        entry.key, entry.value = key, value
    onnx.checker.check_model(proto)
    data = proto.SerializeToString()
    session = ort.InferenceSession(data, providers=["CPUExecutionProvider"])
    batches = [1, batch + 1]
    diff = _max_logit_diff(session, model, shape, batches, seed + 1)
    if not diff <= tolerance:
        Path(out_path).unlink(missing_ok=True)
        raise RuntimeError(f"onnx: max |logit difference| onnxruntime vs PyTorch {diff:.3g} "
                           f"exceeds the tolerance {tolerance:g}; nothing written")
    path = atomic_write(out_path, lambda t: Path(t).write_bytes(data))
    return {"path": str(path), "format": "onnx", "opset": opset,
            "exporter": f"torch.onnx.export(dynamo=True), torch {torch.__version__}",
            "max_abs_logit_diff": diff, "tolerance": tolerance, "batch_sizes_checked": batches,
            "input": {"name": "image", "shape": ["batch", *shape], "dtype": "float32"},
            "output": {"name": "logits", "shape": ["batch", len(loaded.classes)]},
            "classes": loaded.classes, "mean": loaded.mean, "std": loaded.std,
            "onnxruntime": ort.__version__}
