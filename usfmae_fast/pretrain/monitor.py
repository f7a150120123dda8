"""What a user watches during a run: a tqdm bar (loss, lr, images/s, ETA), one row per step in
``history.csv`` and ``history.jsonl``, TensorBoard scalars (when the ``tensorboard`` package is
installed), and the throughput / MFU summary at the end. Only rank 0 writes; other ranks get a
monitor that does nothing.

On resume the logs are cut back to the checkpoint's step and continued, so the files of a run
that was killed and resumed read as if it had run straight through.
"""
from __future__ import annotations

import csv
import json
import math
import statistics
from pathlib import Path

import torch

HISTORY_CSV = "history.csv"
HISTORY_JSONL = "history.jsonl"
TENSORBOARD_DIR = "tensorboard"
COLUMNS = ("step", "epoch", "loss", "lr", "grad_norm", "images_per_s", "seconds", "skipped")


def read_history(path) -> list[dict]:
    """The rows of a ``history.csv``, as numbers."""
    with Path(path).open(newline="") as f:
        return [{k: (int(v) if k in ("step", "epoch", "skipped") else float(v))
                 for k, v in row.items()} for row in csv.DictReader(f)]


def tensorboard_writer(log_dir, purge_step: int | None):
    """A ``SummaryWriter``, or ``(None, reason)`` when tensorboard is not installed."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as exc:
        return None, f"TensorBoard logging is off: {exc} (pip install tensorboard)"
    return SummaryWriter(str(log_dir), purge_step=purge_step), None


class RunMonitor:
    def __init__(self, out_dir, *, enabled: bool, total_steps: int, start_step: int,
                 tensorboard: bool, progress: bool):
        self.enabled, self.total_steps = enabled, total_steps
        self.history: list[dict] = []
        self.notes: list[str] = []
        self._bar = self._csv = self._jsonl = self._writer = None
        if not enabled:
            return
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        csv_path, jsonl_path = out_dir / HISTORY_CSV, out_dir / HISTORY_JSONL
        if start_step > 0 and csv_path.is_file():
            self.history = [r for r in read_history(csv_path) if r["step"] <= start_step]
        self._csv_file = csv_path.open("w", newline="")
        self._csv = csv.DictWriter(self._csv_file, fieldnames=COLUMNS)
        self._csv.writeheader()
        self._csv.writerows(self.history)
        self._jsonl = jsonl_path.open("w")
        for row in self.history:
            self._jsonl.write(json.dumps(row) + "\n")
        self._flush()
        if tensorboard:
            self._writer, why = tensorboard_writer(out_dir / TENSORBOARD_DIR,
                                                   start_step + 1 if start_step else None)
            if why:
                self.note(why)
        if progress:
            from tqdm.auto import tqdm

            self._bar = tqdm(total=total_steps, initial=start_step, desc="pretrain",
                             unit="step", dynamic_ncols=True)

    def note(self, message: str) -> None:
        """A line for the user (above the progress bar), kept for the summary."""
        if not self.enabled:
            return
        self.notes.append(message)
        if self._bar is not None:
            self._bar.write(message)
        else:
            print(message, flush=True)

    def _flush(self) -> None:
        self._csv_file.flush()
        self._jsonl.flush()

    def log(self, row: dict) -> None:
        if not self.enabled:
            return
        self.history.append(row)
        self._csv.writerow(row)
        self._jsonl.write(json.dumps(row) + "\n")
        self._flush()
        if self._writer is not None:
            for key in ("loss", "lr", "grad_norm", "images_per_s"):
                if math.isfinite(row[key]):
                    self._writer.add_scalar(f"train/{key}", row[key], row["step"])
        if self._bar is not None:
            self._bar.set_postfix(loss=f"{row['loss']:.4f}", lr=f"{row['lr']:.2e}",
                                  img_s=f"{row['images_per_s']:.1f}", refresh=False)
            self._bar.update(1)

    def close(self) -> None:
        if not self.enabled:
            return
        if self._bar is not None:
            self._bar.close()
        if self._writer is not None:
            self._writer.close()
        self._csv_file.close()
        self._jsonl.close()


def throughput_summary(step_seconds: list[float], images_per_step: int, world_size: int,
                       model, mask_ratio: float, device: torch.device,
                       dtype: torch.dtype) -> dict:
    """Images/s over this process's steps (the first ones, which include compilation and
    allocator warm-up, left out) and the model FLOPs utilisation per device."""
    from .flops import peak_flops, train_flops_per_image

    warmup = min(len(step_seconds) - 1, max(1, len(step_seconds) // 10)) if step_seconds else 0
    steady = step_seconds[warmup:]
    seconds = sum(steady)
    images_per_s = len(steady) * images_per_step / seconds if seconds > 0 else float("nan")
    per_device = images_per_s / world_size
    flops = train_flops_per_image(model, mask_ratio)
    peak = peak_flops(device, dtype)
    achieved = per_device * flops
    return {"steps_timed": len(steady), "warmup_steps_excluded": warmup,
            "images_per_s": images_per_s, "images_per_s_per_device": per_device,
            "step_ms_median": 1e3 * statistics.median(steady) if steady else float("nan"),
            "train_flops_per_image": flops, "achieved_tflops_per_device": achieved / 1e12,
            "peak_tflops_per_device": peak / 1e12 if peak else None,
            "mfu": achieved / peak if peak else None,
            "device": str(device), "dtype": str(dtype).replace("torch.", ""),
            "world_size": world_size}


def format_summary(t: dict) -> str:
    mfu = f"MFU {100 * t['mfu']:.1f} % of {t['peak_tflops_per_device']:.0f} TFLOP/s" \
        if t["mfu"] is not None else "MFU n/a (no known peak for this device / dtype)"
    return (f"throughput: {t['images_per_s']:.1f} images/s ({t['images_per_s_per_device']:.1f} "
            f"per device x {t['world_size']}), median step {t['step_ms_median']:.1f} ms, "
            f"{t['train_flops_per_image'] / 1e9:.3g} GFLOP/image -> "
            f"{t['achieved_tflops_per_device']:.3g} TFLOP/s per device; {mfu}")
