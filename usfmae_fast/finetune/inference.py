"""Using trained models on images and DICOMs: class probabilities to a CSV (``predict``) and
pooled encoder features to ``.npy`` (``embed``).

Inputs: image files (PNG / JPEG / BMP / TIFF, read with Pillow), DICOM files (every frame of
a cine loop, one row each, through ``data.ingest.dicom_frames``; files without an extension are
recognised by content), folders searched recursively for both, or a CSV with a ``path`` column
(paths relative to it; its other columns, e.g. labels and patient ids, are copied into the
output table). Each frame is prepared as the loaders' eval transform does (short side to the
model's size, bicubic, centre crop, normalised), so raw scanner frames are scored without
ingest's cropping and text removal: ingest them first where that matters.
"""
from __future__ import annotations

import csv
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..data.ingest.readers import DICOM_SUFFIXES, IMAGE_SUFFIXES, UnreadableFileError, kind_of
from ..data.load.torch_loader import eval_transform
from .engine import autocast, resolve_device, write_predictions, write_rows
from ..models.classifier import load_finetuned
from .models import MAE_ARCH, ModelSpec, build_classifier


@dataclass
class Input:
    path: Path
    kind: str                               # "image" | "dicom"
    extra: dict = field(default_factory=dict)  # other columns of a CSV source


def find_inputs(sources) -> list[Input]:
    """Image and DICOM files named or found in ``sources`` (see the module docstring)."""
    found: list[Input] = []
    for source in map(Path, sources):
        if source.suffix.lower() == ".csv" and source.is_file():
            with source.open(newline="") as f:
                reader = csv.DictReader(f)
                if "path" not in (reader.fieldnames or []):
                    raise ValueError(f"images: {source} has no 'path' column")
                for row in reader:
                    path = (source.parent / row.pop("path").strip()).resolve()
                    found.append(Input(path, _kind(path, strict=True), row))
        elif source.is_dir():
            for path in sorted(p for p in source.rglob("*") if p.is_file()):
                if kind := _kind(path, strict=False):
                    found.append(Input(path, kind))
        elif source.is_file():
            found.append(Input(source, _kind(source, strict=True)))
        else:
            raise FileNotFoundError(f"images: {str(source)!r} does not exist")
    if not found:
        raise ValueError(f"images: no image or DICOM file in {[str(s) for s in sources]}")
    return found


def _kind(path: Path, strict: bool) -> str | None:
    name = path.name.lower()
    if not strict and path.suffix and not name.endswith(DICOM_SUFFIXES + IMAGE_SUFFIXES):
        return None  # a folder's CSVs, JSONs, ...: not inputs
    try:
        kind = kind_of(path)
    except (UnreadableFileError, OSError) as exc:
        if strict:
            raise ValueError(f"images: {exc}") from exc
        return None
    if kind not in ("image", "dicom"):
        if strict:
            raise ValueError(f"images: {path} is a {kind} file; give images or DICOMs")
        return None
    return kind


def iter_input_frames(inputs: list[Input],
                      channels: int) -> Iterator[tuple[Input, int, torch.Tensor]]:
    """``(input, frame number, uint8 [channels, H, W])`` of every frame of every input."""
    from ..data.ingest.dicom_frames import iter_frames as dicom_frames
    from ..data.ingest.dicom_frames import open_dicom
    from ..data.load.base import decode_image

    for item in inputs:
        if item.kind == "image":
            yield item, 0, decode_image(item.path.read_bytes(), channels)
            continue
        ds = open_dicom(item.path)
        for index, frame in dicom_frames(ds, item.path, color=channels == 3):
            tensor = torch.from_numpy(np.ascontiguousarray(frame))
            if tensor.ndim == 2:
                tensor = tensor.unsqueeze(0).expand(channels, -1, -1)
            else:
                tensor = tensor.permute(2, 0, 1)
            yield item, index, tensor.contiguous()


@torch.no_grad()
def run_on_frames(model, inputs: list[Input], *, img_size: int, channels: int, mean, std,
                  batch_size: int, device, precision: str, features: bool = False):
    """``(rows [{path, frame, **extra}], outputs [N, C or D])``: softmax probabilities, or the
    pooled pre-logits features with ``features=True``."""
    transform = eval_transform(img_size, mean, std)
    model = model.to(device).eval()
    rows, outputs, batch = [], [], []

    def flush():
        x = torch.stack(batch).to(device)
        with autocast(device, precision):
            y = model.forward_head(model.forward_features(x), pre_logits=True) if features \
                else model(x).float().softmax(dim=1)
        outputs.append(y.float().cpu())
        batch.clear()

    for item, frame, pixels in iter_input_frames(inputs, channels):
        rows.append({"path": str(item.path), "frame": frame, **item.extra})
        batch.append(transform(pixels))
        if len(batch) == batch_size:
            flush()
    if batch:
        flush()
    return rows, torch.cat(outputs).numpy()


def predict_images(ckpts, sources, out_csv, *, batch_size: int = 32, device: str = "auto",
                   precision: str = "auto") -> dict:
    """Class probabilities of every frame (the mean over ``ckpts`` when several) -> ``out_csv``
    with ``path``, one ``prob_<class>`` column per class, ``predicted``, ``frame`` and a CSV
    source's other columns. Returns a summary."""
    if not ckpts:
        raise ValueError("ckpt: give at least one classifier checkpoint")
    loaded = [load_finetuned(c) for c in ckpts]
    classes = loaded[0].classes
    if mismatch := [str(c) for c, m in zip(ckpts, loaded) if m.classes != classes]:
        raise ValueError(f"ckpt: {mismatch} have classes other than {classes}")
    inputs = find_inputs(sources)
    device = resolve_device(device)
    probs, rows = [], []
    for m in loaded:
        rows, p = run_on_frames(m.model, inputs, img_size=m.img_size, channels=m.in_chans,
                            mean=m.mean, std=m.std, batch_size=batch_size, device=device,
                            precision=precision)
        probs.append(p)
    mean = np.mean(probs, axis=0)
    extra = {k: [r.get(k, "") for r in rows] for k in rows[0] if k != "path"}
    path = write_predictions(out_csv, [r["path"] for r in rows], mean, classes, extra=extra)
    counts = np.bincount(mean.argmax(axis=1), minlength=len(classes))
    return {"csv": str(path), "frames": len(rows), "files": len(inputs), "classes": classes,
            "predicted": {c: int(n) for c, n in zip(classes, counts)},
            "checkpoints": [str(c) for c in ckpts]}


def load_encoder(path, *, img_size: int | None = None, in_chans: int = 1,
                 global_pool: str = "avg"):
    """``(model, img_size, channels, mean, std)`` for features: a classifier checkpoint's
    pre-logits, or an MAE-family encoder (final norm, then ``global_pool``) built as for
    fine-tuning, at ``img_size`` (default: the checkpoint's)."""
    from ..models.checkpoint import infer_config
    from ..models.classifier import read_classifier

    state, meta = read_classifier(path)
    if "arch" in meta:
        m = load_finetuned(path)
        return m.model, m.img_size, m.in_chans, m.mean, m.std
    spec = ModelSpec("encoder", MAE_ARCH, init=str(path))
    if img_size is None:
        try:
            img_size = int(np.atleast_1d(infer_config(state)["img_size"])[0])
        except ValueError as exc:
            raise ValueError(f"ckpt: {str(path)!r} is neither a classifier (no 'arch') nor a "
                             f"ViT / MAE encoder: {exc}") from exc
    built = build_classifier(spec, 0, img_size=img_size, in_chans=in_chans,
                             global_pool=global_pool)
    return built.model, img_size, in_chans, built.mean, built.std


def embed_images(ckpt, sources, out_dir, *, img_size: int | None = None, in_chans: int = 1,
                 global_pool: str = "avg", batch_size: int = 32, device: str = "auto",
                 precision: str = "auto") -> dict:
    """Pooled features of every frame -> ``out_dir/features.npy`` (float32 [N, D]) and
    ``out_dir/index.csv`` (row, path, frame, a CSV source's other columns)."""
    if not Path(ckpt).is_file():
        raise FileNotFoundError(f"ckpt: {str(ckpt)!r} does not exist")
    model, size, channels, mean, std = load_encoder(ckpt, img_size=img_size, in_chans=in_chans,
                                                    global_pool=global_pool)
    inputs = find_inputs(sources)
    rows, feats = run_on_frames(model, inputs, img_size=size, channels=channels, mean=mean, std=std,
                            batch_size=batch_size, device=resolve_device(device),
                            precision=precision, features=True)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np.save(out / "features.npy", feats.astype(np.float32))
    columns = ["row", "path", "frame"] + [k for k in rows[0] if k not in ("path", "frame")]
    write_rows(out / "index.csv", [{"row": i, **r} for i, r in enumerate(rows)], columns)
    return {"features": str(out / "features.npy"), "index": str(out / "index.csv"),
            "shape": list(feats.shape), "img_size": size, "mean": mean, "std": std}
