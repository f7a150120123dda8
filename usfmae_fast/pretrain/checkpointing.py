"""Training checkpoints: the complete state of a run, written atomically, the last K kept.

A checkpoint ``<out_dir>/checkpoints/step_00001000.pt`` holds the model, optimizer, lr
schedule and GradScaler states, every rank's RNG states (python, numpy, torch CPU, CUDA), the
data position (epoch and the batch within it), the step counters and the config. It is
written to a temporary file in the same folder and renamed into place, so a crash leaves the
previous checkpoint intact and never a half-written one under a checkpoint's name.
``resume="auto"`` takes the newest checkpoint that loads; a damaged one is reported and skipped,
and when none loads the run stops (:class:`CheckpointError` naming each file) rather than start
over on top of them.

Files are read with ``torch.load(weights_only=True)`` (``models.checkpoint.read_file``): tensors
and plain containers only; a refused or damaged file is a :class:`CheckpointError`.
"""
from __future__ import annotations

import random
import re
import warnings
from pathlib import Path

import numpy as np
import torch

from ..runtime.files import atomic_write
from ..models.checkpoint import CheckpointError, read_file

CHECKPOINT_DIR = "checkpoints"
FORMAT = 1
_NAME = re.compile(r"^step_(\d+)\.pt$")
REQUIRED = ("format", "train_state", "model", "optimizer", "scheduler", "scaler", "rng", "config")


def checkpoint_dir(out_dir) -> Path:
    return Path(out_dir) / CHECKPOINT_DIR


def checkpoint_path(out_dir, step: int) -> Path:
    return checkpoint_dir(out_dir) / f"step_{step:08d}.pt"


def list_checkpoints(out_dir) -> list[tuple[int, Path]]:
    """``(step, path)`` of the training checkpoints in ``out_dir``, oldest first."""
    folder = checkpoint_dir(out_dir)
    if not folder.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in folder.iterdir() if (m := _NAME.match(p.name))]
    return sorted(found)


# ----------------------------------------------------------------------------- RNG states
def capture_rng(device: torch.device | None = None) -> dict:
    """This process's RNG states as plain data (numpy's array as a list); ``cuda`` is the
    state of this process's GPU ``device`` only (touching the others would create a CUDA
    context on every GPU from every rank)."""
    name, keys, pos, has_gauss, cached = np.random.get_state()
    cuda = None
    if device is not None and device.type == "cuda":
        cuda = torch.cuda.get_rng_state(device)
    return {"python": random.getstate(),
            "numpy": (name, keys.tolist(), int(pos), int(has_gauss), float(cached)),
            "torch": torch.get_rng_state(), "cuda": cuda}


def restore_rng(state: dict, device: torch.device | None = None) -> None:
    random.setstate(_as_python_state(state["python"]))
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and device is not None and device.type == "cuda":
        torch.cuda.set_rng_state(state["cuda"], device)


def _as_python_state(state):
    """``random.setstate`` needs tuples; a round trip through some loaders gives lists."""
    version, internal, gauss = state
    return version, tuple(internal), gauss


# ----------------------------------------------------------------------------- save / load
def save_checkpoint(out_dir, step: int, payload: dict, keep_last: int,
                    keep: Path | None = None) -> Path:
    """Write ``payload`` as the checkpoint of ``step`` (atomically), then delete all but the
    newest ``keep_last`` checkpoints and ``keep`` (the last known good one), and any temporary
    files a killed save left behind."""
    missing = [k for k in REQUIRED if k not in payload and k != "format"]
    if missing:
        raise ValueError(f"a training checkpoint needs {missing}")
    path = atomic_write(checkpoint_path(out_dir, step),
                        lambda tmp: torch.save({**payload, "format": FORMAT}, tmp))
    for _, old in list_checkpoints(out_dir)[:-keep_last]:
        if keep is None or old.resolve() != Path(keep).resolve():
            old.unlink(missing_ok=True)
    for stale in checkpoint_dir(out_dir).glob(".step_*.tmp"):
        stale.unlink(missing_ok=True)
    return path


def all_finite(*states) -> bool:
    """Whether every floating-point tensor in ``states`` (nested dicts / lists) is finite."""
    def tensors(obj):
        if isinstance(obj, torch.Tensor):
            yield obj
        elif isinstance(obj, dict):
            for value in obj.values():
                yield from tensors(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                yield from tensors(value)

    flags = [torch.isfinite(t).all() for t in tensors(states) if t.is_floating_point()]
    return bool(torch.stack(flags).all()) if flags else True


def load_training_state(path) -> dict:
    """A training checkpoint, checked to hold everything a resume needs."""
    payload, _ = read_file(path, "training checkpoint")
    if not isinstance(payload, dict) or any(k not in payload for k in REQUIRED):
        found = sorted(payload)[:12] if isinstance(payload, dict) else type(payload).__name__
        raise CheckpointError(f"{path} is not a usfmae-fast training checkpoint (it lacks some "
                              f"of {REQUIRED}; found {found}); to start from model weights use "
                              f"model.init_from")
    if payload["format"] != FORMAT:
        raise CheckpointError(f"{path} has checkpoint format {payload['format']}, this version "
                              f"reads {FORMAT}")
    return payload


def find_resume(out_dir) -> tuple[Path, dict] | None:
    """The newest checkpoint in ``out_dir`` that loads, with its contents; None if there is no
    checkpoint. :class:`CheckpointError` naming each file and why when there are checkpoints
    and none loads: starting over would overwrite them and the run's history."""
    problems = []
    for step, path in reversed(list_checkpoints(out_dir)):
        try:
            payload = load_training_state(path)
        except Exception as exc:  # damaged (e.g. the disk filled up): take the one before
            problems.append(str(exc) if isinstance(exc, CheckpointError)
                            else f"{path}: {type(exc).__name__}: {exc}")
            continue
        for problem in problems:
            warnings.warn(f"skipping unreadable checkpoint: {problem}", RuntimeWarning,
                          stacklevel=2)
        return path, payload
    if problems:
        raise CheckpointError(
            f"resume=auto: none of the {len(problems)} checkpoint(s) in "
            f"{checkpoint_dir(out_dir)} can be read, so nothing was resumed or changed: "
            f"{'; '.join(problems)}. Restore or move them away, resume from a good copy "
            f"(resume=PATH), or start over with output.overwrite=true and no resume")
    return None


def resolve_resume(spec: str | None, out_dir) -> tuple[Path, dict] | None:
    """``spec`` = None (start fresh), ``"auto"`` (newest valid in ``out_dir``, or fresh when
    there is none) or the path of a checkpoint (which must load)."""
    if spec is None:
        return None
    if spec == "auto":
        return find_resume(out_dir)
    return Path(spec), load_training_state(spec)
