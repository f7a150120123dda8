"""``usfmae-fast bench``: run the benchmark suites that fit this machine, one pytest-benchmark
process per suite, then write the JSON results, a markdown summary, a speed-up plot and a
``provenance.json`` (device, versions, commit, command, each suite's exit status and time).

The suites live in the repository's ``benchmarks/`` folder (``--suites-dir`` when the package is
installed away from its checkout). On a GPU every suite runs at its GPU workload (Triton
included); on a CPU the suites pick their CPU workloads themselves (smaller batches, no Triton,
CUDA / DALI-GPU cases skipped). Score-CAM at ViT-B/16 takes ~15 minutes on 2 CPU cores.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import subprocess
import sys
import time
from pathlib import Path

SUITES = {
    "ops": ("bench_random_masking.py", "bench_mae_loss.py", "bench_attention.py"),
    "data": ("bench_data.py",),
    "pretrain": ("bench_pretrain.py",),
    "scorecam": ("bench_scorecam.py",),
}


def find_suites_dir(suites_dir=None) -> Path:
    candidates = [Path(suites_dir)] if suites_dir else [
        Path(__file__).resolve().parent.parent / "benchmarks", Path.cwd() / "benchmarks"]
    for path in candidates:
        if (path / "conftest.py").is_file() and (path / "summarize.py").is_file():
            return path
    raise FileNotFoundError(
        f"suites_dir: no benchmarks/ folder with conftest.py and summarize.py at "
        f"{', '.join(map(str, candidates))}. The suites are not installed with the package: "
        "run from a checkout of usfmae_fast (its benchmarks/ folder) or pass --suites-dir, "
        "with pytest and pytest-benchmark installed (pip install 'usfmae_fast[test]')")


def git_commit(repo) -> str | None:
    """HEAD of the git checkout at ``repo``; None outside one."""
    try:
        return subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def machine() -> dict:
    import torch

    from .info import collect
    cuda = torch.cuda.is_available()
    return {"device": torch.cuda.get_device_name(0) if cuda else
            f"CPU {platform.processor() or platform.machine()}, {os.cpu_count()} cores",
            "device_type": "cuda" if cuda else "cpu", "python": platform.python_version(),
            "info": collect()}


def run_bench(suites=None, out=None, *, suites_dir=None, select: str | None = None,
              pytest_args=(), progress: bool = True) -> dict:
    """Run ``suites`` (names of :data:`SUITES`, default all) and write results under ``out``;
    returns the provenance dict (also ``out/provenance.json``)."""
    suites = list(suites or SUITES)
    if unknown := [s for s in suites if s not in SUITES]:
        raise ValueError(f"suites: unknown {unknown}; choose from {sorted(SUITES)}")
    bench_dir = find_suites_dir(suites_dir)
    env = machine()
    kind = env["device_type"]
    out = Path(out or f"benchmarks/results/run-{kind}-{time.strftime('%Y%m%d-%H%M%S')}")
    out.mkdir(parents=True, exist_ok=True)
    runs, results = [], []
    for suite in suites:
        for file in SUITES[suite]:
            name = file.removeprefix("bench_").removesuffix(".py")
            result = out / f"{kind}_{name}.json"
            cmd = [sys.executable, "-m", "pytest", str(bench_dir / file), "-q", "-p",
                   "no:cacheprovider", f"--benchmark-json={result}", *pytest_args]
            if select:
                cmd += ["-k", select]
            if progress:
                print(f"bench: {suite}/{name} ...", flush=True)
            started = time.perf_counter()
            with open(out / f"{name}.log", "w") as log:
                code = subprocess.run(cmd, stdout=log, stderr=subprocess.STDOUT).returncode
            seconds = round(time.perf_counter() - started, 1)
            # pytest exit 5: nothing selected or everything skipped here (e.g. a GPU-only case)
            status = {0: "passed", 5: "nothing ran"}.get(code, f"failed (exit {code})")
            runs.append({"suite": suite, "file": file, "status": status, "seconds": seconds,
                         "json": result.name if result.is_file() else None,
                         "log": f"{name}.log", "command": shlex.join(cmd)})
            if result.is_file():
                results.append(result)
            if progress:
                print(f"bench: {suite}/{name} {status} in {seconds} s", flush=True)
    summary = _summarize(bench_dir, results, out)
    provenance = {"commit": git_commit(bench_dir.parent), "date": time.strftime("%Y-%m-%d %H:%M:%S"),
                  "command": shlex.join([Path(sys.argv[0]).name, *sys.argv[1:]]),
                  "machine": env, "suites": runs, "summary": summary}
    (out / "provenance.json").write_text(json.dumps(provenance, indent=2))
    if progress:
        print(f"bench: results in {out}")
    return provenance


def _summarize(bench_dir: Path, results: list[Path], out: Path) -> dict:
    """benchmarks/summarize.py over the results: summary.md and (kernel suites) speedups.png."""
    if not results:
        return {}
    plot = out / "speedups.png"
    cmd = [sys.executable, str(bench_dir / "summarize.py"), *map(str, results), "--plot", str(plot)]
    done = subprocess.run(cmd, capture_output=True, text=True)
    (out / "summary.md").write_text(done.stdout + (f"\n\nsummarize.py failed:\n{done.stderr}"
                                                   if done.returncode else ""))
    return {"markdown": "summary.md", "plot": plot.name if plot.is_file() else None,
            "status": "ok" if done.returncode == 0 else f"failed (exit {done.returncode})"}
