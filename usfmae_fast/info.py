"""What this machine offers usfmae_fast: versions, devices, and for every backend of every op
whether it runs here and, when it does not, why."""
from __future__ import annotations

import importlib
import os
import platform

import torch


def _version(module: str) -> str | None:
    try:
        return getattr(importlib.import_module(module), "__version__", "unknown")
    except Exception:  # noqa: BLE001 - any import failure means "not usable here"
        return None


def _triton_status() -> str:
    version = _version("triton")
    if version is None:
        return "triton is not installed"
    if torch.cuda.is_available():
        return f"triton {version} with a CUDA device"
    if os.environ.get("TRITON_INTERPRET") == "1":
        return f"triton {version} in interpreter mode (TRITON_INTERPRET=1, slow, no bf16)"
    return f"triton {version} installed, but no CUDA device (set TRITON_INTERPRET=1 to interpret)"


def _dali_status() -> str:
    version = _version("nvidia.dali")
    if version is None:
        return "nvidia-dali is not installed (pip install nvidia-dali-cuda130)"
    where = "GPU + CPU pipelines" if torch.cuda.is_available() else "CPU-only pipelines (no GPU)"
    return f"nvidia-dali {version}: {where}"


def collect() -> dict:
    from . import __version__, ops

    devices = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    return {
        "usfmae_fast": __version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "versions": {name: _version(name) for name in
                     ("timm", "numpy", "safetensors", "pydicom", "triton", "nvidia.dali")},
        "cuda_devices": devices,
        "cpu_threads": torch.get_num_threads(),
        "extension": ops.extension_status(),
        "triton": _triton_status(),
        "dali": _dali_status(),
        "backend": ops.get_backend(),
        "ops": ops.backend_status(),
        "trust_checks": "on" if ops.trust_checks_enabled() else f"off ({ops.TRUST_ENV}=0)",
        "auto": ops.auto_choices(),
    }


def render(report: dict) -> str:
    ext = report["extension"]
    lines = [
        f"usfmae_fast {report['usfmae_fast']}  python {report['python']}  "
        f"torch {report['torch']} (CUDA {report['torch_cuda'] or 'none'})",
        "versions: " + ", ".join(f"{k} {v or 'missing'}" for k, v in report["versions"].items()),
        "devices: " + (", ".join(report["cuda_devices"]) or
                       f"no CUDA device; CPU with {report['cpu_threads']} threads"),
        f"extension: {ext['message']}"
        + (f" (CPU kernels: {ext['cpu_kernels']}, CUDA kernels: {ext['cuda_kernels']})"
           if ext["loaded"] else ""),
        f"triton: {report['triton']}",
        f"dali: {report['dali']}",
        f"backend setting: {report['backend']} (set_backend() or USFMAE_BACKEND)",
    ]
    for op, row in report["ops"].items():
        lines.append(f"  {op}:")
        lines.extend(f"    {name:7s} {state}" for name, state in row.items())
    lines.append(f"what runs per call (checks against ops/reference.py on first use: "
                 f"{report['trust_checks']}):")
    groups: dict[tuple, dict[str, list[str]]] = {}
    for r in report["auto"]:
        picks = groups.setdefault((r["device"], r["op"], r["dtype"]), {})
        picks.setdefault(f"{r['backend']} ({r['checked']})", []).append(r["case"])
    for (device, op, dtype), picks in groups.items():
        lines.append(f"  {device} {op} {dtype}: " + "; ".join(
            f"{pick} for {', '.join(cases)}" for pick, cases in picks.items()))
    return "\n".join(lines)
