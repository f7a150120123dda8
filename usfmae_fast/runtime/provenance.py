"""Provenance of a run: what produced an output (code commit, library versions, the command,
the config, the input files' hashes, seed, device), as one JSON-ready dict, and the same as
markdown lines for a report.

Nothing here may fail a run over bookkeeping except a file the caller names that is missing or
a folder (a hash of the wrong thing is worse than none): git and optional libraries that are
absent give None.
"""
from __future__ import annotations

import hashlib
import os
import platform
import shlex
import subprocess
import sys
from datetime import datetime, timezone
from importlib import metadata
from pathlib import Path

SOURCE_DIR = Path(__file__).resolve().parents[1]  # the usfmae_fast package folder
CHUNK = 1 << 20
GIT_TIMEOUT_S = 5.0
# versions[key] <- (distribution, module): the imported module's __version__ when it is loaded
# (torch's names its build, e.g. "2.14.1+cu130"), else the installed distribution's
DISTRIBUTIONS = {"python": (None, None), "torch": ("torch", "torch"),
                 "torchvision": ("torchvision", "torchvision"), "timm": ("timm", "timm"),
                 "numpy": ("numpy", "numpy"), "scikit-learn": ("scikit-learn", "sklearn"),
                 "usfmae_fast": ("usfmae_fast", "usfmae_fast"), "triton": ("triton", "triton")}


def sha256_file(path) -> str:
    """Hex sha256 of a file, read in 1 MiB chunks (checkpoints do not fit in memory twice)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def file_record(name: str, path) -> dict | None:
    """``{"path", "sha256", "bytes"}`` of the file at ``path`` (None for None); ValueError
    naming ``name`` when it is missing or not a regular file."""
    if path is None:
        return None
    path = Path(path)
    if not path.is_file():
        what = "a folder" if path.is_dir() else "missing"
        raise ValueError(f"provenance file {name!r}: {str(path)!r} is {what}; a file is needed")
    return {"path": str(path), "sha256": sha256_file(path), "bytes": path.stat().st_size}


def _git(*args: str) -> str | None:
    try:
        done = subprocess.run(["git", *args], cwd=SOURCE_DIR, capture_output=True, text=True,
                              timeout=GIT_TIMEOUT_S, check=False)
    except (OSError, subprocess.SubprocessError):  # git absent, hung
        return None
    return done.stdout if done.returncode == 0 else None


def git_state() -> tuple[str | None, bool | None]:
    """``(commit sha, uncommitted changes?)`` of the checkout holding this package's source;
    ``(None, None)`` when it is not a git checkout (an installed wheel) or git is absent."""
    commit = _git("rev-parse", "HEAD")
    if commit is None:
        return None, None
    status = _git("status", "--porcelain")
    return commit.strip(), (None if status is None else status.strip() != "")


def _version(distribution: str | None, module: str | None) -> str | None:
    if distribution is None:
        return platform.python_version()
    loaded = getattr(sys.modules.get(module), "__version__", None)
    if loaded is not None:
        return str(loaded)
    try:
        return metadata.version(distribution)
    except metadata.PackageNotFoundError:
        if distribution == "usfmae_fast":  # run from a source checkout, not installed
            from .. import __version__
            return __version__
        return None


def versions() -> dict:
    """Python, the libraries a result depends on (None when absent) and torch's CUDA."""
    found = {key: _version(*names) for key, names in DISTRIBUTIONS.items()}
    try:
        import torch
        found["cuda"] = torch.version.cuda
    except ImportError:
        found["cuda"] = None
    return found


def command_line(command: list[str] | None = None) -> str:
    """``command`` (default ``sys.argv``) as one shell-quoted string, its program shortened to
    the file name."""
    argv = list(sys.argv if command is None else command)
    if argv:
        argv[0] = os.path.basename(argv[0]) or argv[0]
    return shlex.join(argv)


def device_name(device: str | None) -> str | None:
    """The accelerator's name for a CUDA ``device`` (``"cuda"``, ``"cuda:1"``), else None."""
    if device is None or not str(device).startswith("cuda"):
        return None
    try:
        import torch
        return torch.cuda.get_device_name(torch.device(str(device)))
    except (ImportError, RuntimeError, AssertionError, ValueError):
        return None


def provenance(*, config: dict | None = None,
               files: dict[str, "str | os.PathLike | None"] | None = None,
               seed: int | None = None, device: str | None = None,
               command: list[str] | None = None) -> dict:
    """The JSON-ready provenance record of a run (see the module docstring); ``files`` maps a
    name (``"init_checkpoint"``, ``"manifest"``) to a path whose sha256 and size are recorded."""
    from .. import __version__

    commit, dirty = git_state()
    return {
        "created": datetime.now(timezone.utc).isoformat(timespec="seconds"),
        "commit": commit, "dirty": dirty, "package_version": __version__,
        "versions": versions(), "command": command_line(command), "config": config,
        "files": {name: file_record(name, path) for name, path in (files or {}).items()},
        "seed": seed, "device": None if device is None else str(device),
        "device_name": device_name(device), "host": platform.node(),
    }


def _code(value) -> str:
    return "`" + str(value).replace("`", "'") + "`"


def provenance_markdown(p: dict) -> list[str]:
    """A ``## Provenance`` section: a bullet list with every value in a code span (no bare
    number outside a table, the reports' rule)."""
    lines = ["## Provenance", ""]
    dirty = {True: " (uncommitted changes)", False: "", None: ""}[p.get("dirty")]
    lines.append(f"- commit: {_code(p.get('commit') or 'unknown')}{dirty}")
    lines.append(f"- created: {_code(p.get('created'))} on host {_code(p.get('host'))}")
    lines.append(f"- command: {_code(p.get('command'))}")
    device = p.get("device")
    if device is not None:
        name = f" ({_code(p['device_name'])})" if p.get("device_name") else ""
        lines.append(f"- device: {_code(device)}{name}")
    if p.get("seed") is not None:
        lines.append(f"- seed: {_code(p['seed'])}")
    versions_ = p.get("versions") or {}
    lines.append("- versions: " + ", ".join(f"{name} {_code(v)}" for name, v in versions_.items()
                                            if v is not None))
    for name, record in (p.get("files") or {}).items():
        if record is None:
            lines.append(f"- file {_code(name)}: none")
        else:
            lines.append(f"- file {_code(name)}: {_code(record['path'])}, sha256 "
                         f"{_code(record['sha256'])}, {_code(record['bytes'])} bytes")
    return lines + [""]
