#!/usr/bin/env python3
"""The GPU check: one command that proves or disproves every kernel in one short GPU window.

    python3 benchmarks/gpu_check.py [--out DIR] [--dry-run] [--only STAGES] [--skip STAGES]
    python3 benchmarks/gpu_check.py --list        # the stages and their budgets

On an H100 / H200 it runs, in at most 9 minutes (``--budget``): env -> build -> ``usfmae-fast
selftest`` -> the CUDA and Triton kernel tests (bf16 / fp16 / fp32, Triton autotuning limited to
the first valid config, a short fuzz) -> compute-sanitizer memcheck on one small test per kernel
family -> the op benchmarks -> the MAE ViT-B/16 pretraining step (ours vs fb/mae eager vs
``torch.compile`` + SDPA), few rounds. Each stage runs in its own process group under its own
deadline: the deadlines are cumulative (stage i must end by the sum of the budgets up to i), so
time a stage leaves unused goes to the next one and a stage that runs long is cut (SIGINT first,
so pytest and pytest-benchmark write what they have, SIGKILL after) while every later stage keeps
its whole budget. What comes back is three files under ``--out`` (default ``$OUT``, else
``benchmarks/results/gpu-check-<cuda|cpu>-<date>/``), rewritten after every stage:
``summary.json``, ``summary.md`` (stage | status | seconds | key numbers, the goals of issue 14,
the benchmark tables) and ``logs.tar.gz`` (every log and raw JSON).

Without a CUDA device (or with ``--dry-run``) the same stages run on the CPU: the GPU-only ones
are reported "skipped: no CUDA device" (the test selections they would run are still collected,
so a renamed test cannot rot them), env, selftest and a tiny test selection really run.
``tests/test_gpu_check.py`` runs that dry run.

Only the standard library at the top level: this runs before anything is built. Nothing here
calls pip over the network. Python packages the GPU machine lacks travel as wheels in
``wheels/`` (``--wheels``), installed with ``pip install --no-index --no-deps --target`` into a
folder put on PYTHONPATH for every later stage.
"""
from __future__ import annotations

import argparse
import io
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 540  # one device command may run 10 minutes; 9 leave room for start-up and transfer
FINISH_S = 15  # the summary, tables and archive after the last stage
GRACE_S = 10  # between SIGINT and SIGKILL when a stage is cut
FUZZ_CASES = 20  # per fuzz test on the GPU (200 in make test)
LOG_CAP = 4 << 20  # bytes of one log kept in the archive (head and tail)
FILES = ("summary.json", "summary.md", "logs.tar.gz")
# Packages the GPU image is known to lack; a test module that needs one is reported, not fatal.
OPTIONAL = ("pydicom", "nvidia.dali", "av", "nibabel", "pytorch_grad_cam", "pymust")
PACKAGES = ("torch", "triton", "timm", "numpy", "safetensors", "yaml", "PIL", "matplotlib",
            "tqdm", "sklearn", "cv2", "pytest", "pytest_benchmark", *OPTIONAL)


@dataclass(frozen=True)
class Stage:
    name: str
    gpu_s: int  # budget on a GPU machine
    dry_s: int  # budget in the dry run (the kernel-test stages share one process there)
    gpu_only: bool  # in the dry run: skipped (a pytest stage still collects its selection)
    what: str


STAGES = (
    Stage("env", 20, 20, False, "versions, device, driver, nvcc, compute-sanitizer, missing "
          "packages; carried wheels installed"),
    Stage("build", 120, 0, True, "pip install --no-index --no-build-isolation --no-deps -e . "
          "with MAX_JOBS = cores and TORCH_CUDA_ARCH_LIST = the device's (9.0); _C loads with "
          "its CUDA kernels"),
    Stage("selftest", 45, 30, False, "usfmae-fast selftest --json: every kernel usable here "
          "against ops/reference.py (dry run: float32 only)"),
    Stage("tests-cuda-kernels", 40, 15, True, "tests/test_cuda_kernels.py: the CUDA kernels "
          "called directly, every dtype, short fuzz"),
    Stage("tests-masking", 20, 40, False, "tests/test_random_masking.py, its CUDA and Triton "
          "tests"),
    Stage("tests-loss", 15, 0, False, "tests/test_mae_loss.py, its CUDA and Triton tests"),
    Stage("tests-attention", 45, 0, False, "tests/test_attention.py, its CUDA and Triton tests "
          "(Triton: first config only, short fuzz)"),
    Stage("tests-upstream-grads", 15, 0, True, "tests/test_upstream_grads.py when present, its "
          "CUDA cases: every backward with random upstream gradients"),
    Stage("tests-triton-configs", 15, 0, True, "tests/test_triton_configs.py (or "
          "test_triton_aot.py) when present: every Triton config compiles for sm_90 and fits, "
          "with this machine's Triton"),
    Stage("memcheck", 45, 5, True, "compute-sanitizer memcheck over one small bf16 test per "
          "kernel family (masking, loss, attention), each through every CUDA backend"),
    Stage("bench-ops", 50, 0, True, "benchmarks/bench_{random_masking,mae_loss,attention}.py, "
          "CUDA cases, bf16, few rounds"),
    Stage("bench-pretrain", 50, 0, True, "benchmarks/bench_pretrain.py: ViT-B/16 MAE step, "
          "fb/mae eager vs ours (cuda, triton), bf16, batch 256, few rounds"),
    Stage("bench-pretrain-compile", 45, 0, True, "benchmarks/bench_pretrain.py: fb/mae with "
          "SDPA under torch.compile"),
)
NAMES = tuple(s.name for s in STAGES)
ALWAYS = ("env", "build")  # run under --only too: nothing else works without them

# The pytest stages on a GPU: (file, -k expression or None). The op files' other tests run the
# CPU backends, which make test covers; on the GPU only their CUDA and Triton tests run.
GPU_TESTS = {
    "tests-cuda-kernels": ("tests/test_cuda_kernels.py", None),
    "tests-masking": ("tests/test_random_masking.py", "cuda or triton"),
    "tests-loss": ("tests/test_mae_loss.py", "cuda or triton"),
    "tests-attention": ("tests/test_attention.py", "cuda or triton"),
    "tests-upstream-grads": ("tests/test_upstream_grads.py", "cuda"),
    # the ahead-of-time compile of every Triton config for sm_90, here against this Triton
    "tests-triton-configs": ("tests/test_triton_configs.py|tests/test_triton_aot.py", None),
}
DRY_TESTS = {  # one process for all three, seconds on a CPU; the fuzz tests with 2 cases show
    # that USFMAE_FUZZ_CASES is honoured
    "tests-masking": "test_fuzz_200_cases or test_ties_go_to_lower_index",
    "tests-loss": "test_fuzz_200_cases or test_float64",
    "tests-attention": "test_packed_matches_reference and 32-50",
}
MEMCHECK_TESTS = (  # small, and each runs every backend usable on CUDA (cuda, triton, torch)
    "tests/test_random_masking.py::test_cuda_backends_match_reference[dtype2-50]",  # bf16
    "tests/test_mae_loss.py::test_cuda_matches_reference[dtype1]",  # bf16
    "tests/test_attention.py::test_cuda_low_precision[50-dtype1]",  # bf16, fwd + bwd
)
BENCH = {  # stage: (files, -k expression, pytest-benchmark arguments)
    # torch.compile of the op references is left out here (a compile per case would take the
    # stage); the pretraining step keeps its compiled baseline.
    "bench-ops": (("benchmarks/bench_attention.py", "benchmarks/bench_random_masking.py",
                   "benchmarks/bench_mae_loss.py"), "cuda- and not compile",
                  ("--benchmark-min-rounds=3", "--benchmark-max-time=0.1")),
    "bench-pretrain": (("benchmarks/bench_pretrain.py",),
                       "(cuda-fbmae-eager or cuda-ours-cuda or cuda-ours-triton) and not compile",
                       ("--benchmark-min-rounds=2", "--benchmark-max-time=0.1")),
    "bench-pretrain-compile": (("benchmarks/bench_pretrain.py",), "cuda-fbmae-sdpa-compile",
                               ("--benchmark-min-rounds=2", "--benchmark-max-time=0.1")),
}

PROBE = r"""
import importlib.util, json, platform, sys
out = {"python": platform.python_version(), "executable": sys.executable, "cuda_available": False}
try:
    import torch
    out.update(torch=torch.__version__, torch_cuda=torch.version.cuda,
               cuda_available=torch.cuda.is_available(), cpu_threads=torch.get_num_threads())
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        out.update(device=p.name, capability=f"{p.major}.{p.minor}", device_count=torch.cuda.device_count(),
                   sm_count=p.multi_processor_count, memory_gib=round(p.total_memory / 2**30, 1))
except Exception as exc:
    out["torch_error"] = repr(exc)
try:
    import triton
    out["triton"] = triton.__version__
except Exception as exc:
    out["triton"] = None
def found(name):
    try:
        return importlib.util.find_spec(name) is not None
    except (ImportError, ValueError):
        return False
out["packages"] = {name: found(name) for name in sys.argv[1:]}
print(json.dumps(out))
"""

EXT_PROBE = r"""
import json
from usfmae_fast.ops import _ext
ops = ("random_masking", "mae_loss_fused", "attention_packed_fwd", "attention_packed_bwd")
print(json.dumps({"loaded": _ext.LOADED, "message": _ext.LOAD_MESSAGE,
                  "cuda_kernels": {op: _ext.has_kernel(op, "CUDA") for op in ops}}))
"""


@dataclass
class Outcome:
    status: str  # passed | failed | timeout | skipped
    summary: str = ""  # the key numbers, one line
    numbers: dict | None = None
    reason: str = ""  # why it was skipped
    log: str | None = None  # logs/<log>.log when not the stage's own


def skipped(reason: str, summary: str = "") -> Outcome:
    return Outcome("skipped", summary, reason=reason)


class Check:
    def __init__(self, args):
        self.args = args
        self.only, self.skip = _names(args.only), _names(args.skip)
        self.t0 = time.monotonic()
        self.started = time.strftime("%Y-%m-%d %H:%M:%S")
        self.work = Path(tempfile.mkdtemp(prefix="gpu_check-"))
        self.logs = self.work / "logs"
        self.logs.mkdir()
        self.out: Path | None = None  # named once env knows the device
        self.info: dict = {}
        self.dry = args.dry_run
        self.results: list[dict] = []
        self.env = dict(os.environ, PYTHONUNBUFFERED="1", PIP_NO_INPUT="1",
                        PIP_DISABLE_PIP_VERSION_CHECK="1")
        self.env.pop("TRITON_INTERPRET", None)  # tests/conftest.py sets it where it belongs
        self.deadline = self.t0
        self.current: subprocess.Popen | None = None
        self._collected: dict | None = None
        self._dry_tests: tuple | None = None

    # --- running things -------------------------------------------------------------------------

    def run(self, name: str, cmd: list[str], *, env: dict | None = None,
            stdout_to: Path | None = None) -> tuple[int | None, bool, str]:
        """Run ``cmd`` in the repository root in a process group of its own, its output appended
        to logs/<name>.log (stdout to ``stdout_to`` when given), cut at the stage deadline:
        SIGINT (pytest and pytest-benchmark then write what they have), SIGKILL to the group
        ``GRACE_S`` later. Returns (exit code, whether it was cut, the output)."""
        log = self.logs / f"{name}.log"
        with open(log, "a") as f:
            f.write(f"$ {shlex.join(cmd)}\n")
        with open(log, "ab") as err, open(stdout_to or log, "ab") as out:
            try:
                proc = self.current = subprocess.Popen(
                    cmd, cwd=ROOT, env=env or self.env, stdin=subprocess.DEVNULL, stdout=out,
                    stderr=err, start_new_session=True,
                    preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
            except OSError as exc:
                err.write(f"cannot start: {exc}\n".encode())
                return 127, False, log.read_text(errors="replace")
            cut, code = False, None
            grace = min(GRACE_S, max(1.0, (self.deadline - time.monotonic()) / 4))
            try:
                code = proc.wait(timeout=max(0.0, self.deadline - grace - time.monotonic()))
            except subprocess.TimeoutExpired:
                cut = True
                proc.send_signal(signal.SIGINT)
                try:
                    code = proc.wait(timeout=max(1.0, self.deadline - time.monotonic()))
                except subprocess.TimeoutExpired:
                    _kill_group(proc)
                    code = proc.wait()
            _kill_group(proc)  # whatever it left behind (compile workers)
            self.current = None
        if cut:
            with open(log, "a") as f:
                f.write("\n[gpu_check] cut at the stage deadline\n")
        text = log.read_text(errors="replace")
        if stdout_to:
            text += "\n" + stdout_to.read_text(errors="replace")
        return code, cut, text

    def python(self, *args) -> list[str]:
        return [sys.executable, *args]

    # --- the stages -----------------------------------------------------------------------------

    def stage_env(self, stage) -> Outcome:
        notes = []
        wheels = Path(self.args.wheels)
        wheels = wheels if wheels.is_absolute() else ROOT / wheels
        found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        if found:
            site = self.work / "site"
            code, _, _ = self.run(stage.name, self.python(
                "-m", "pip", "install", "-q", "--no-index", "--no-deps", "--no-compile",
                "--no-cache-dir", "--upgrade", "--target", str(site), *map(str, found)))
            if code == 0:
                self.env["PYTHONPATH"] = os.pathsep.join(
                    p for p in (str(site), self.env.get("PYTHONPATH")) if p)
                notes.append(f"{len(found)} wheels from {self.args.wheels} installed")
            else:
                notes.append(f"wheels from {self.args.wheels} failed to install")
        probe = self.work / "probe.json"
        code, cut, text = self.run(stage.name, self.python("-c", PROBE, *PACKAGES),
                                   stdout_to=probe)
        try:
            self.info = json.loads(probe.read_text().strip().splitlines()[-1])
        except (ValueError, IndexError):
            self.info = {"cuda_available": False, "probe_error": text[-500:]}
        self.info["missing"] = [n for n, ok in self.info.get("packages", {}).items() if not ok]
        self.info.update(self._tools(stage.name))
        self.info["commit"], self.info["dirty"] = _git(self.args.commit)
        self.info.update(cpu_count=os.cpu_count(), platform=platform.platform())
        if not self.info.get("cuda_available"):
            self.dry = True
        (self.logs / "env.json").write_text(json.dumps(self.info, indent=2))
        device = self.info.get("device") or f"CPU ({os.cpu_count()} cores), no CUDA device"
        summary = "; ".join([device, f"torch {self.info.get('torch')} (CUDA "
                             f"{self.info.get('torch_cuda')})", f"triton {self.info.get('triton')}",
                             f"nvcc {self.info.get('nvcc')}",
                             "missing: " + (", ".join(self.info["missing"]) or "nothing"), *notes])
        ok = code == 0 and "torch" in self.info and not any("failed" in n for n in notes)
        return Outcome("passed" if ok else "timeout" if cut else "failed", summary,
                       {k: self.info.get(k) for k in ("device", "capability", "torch", "triton",
                                                      "nvcc", "driver")})

    def _tools(self, log_name: str) -> dict:
        """nvcc's CUDA home and version, compute-sanitizer, the driver (nvidia-smi)."""
        home = _cuda_home(self.env)
        tools = {"cuda_home": home, "nvcc": None, "driver": None}
        if home and Path(home, "bin", "nvcc").exists():
            version = _output([str(Path(home, "bin", "nvcc")), "--version"])
            tools["nvcc"] = (re.findall(r"release ([\d.]+)", version) or [None])[0]
        sanitizer = Path(home, "bin", "compute-sanitizer") if home else None
        tools["compute_sanitizer"] = (str(sanitizer) if sanitizer and sanitizer.exists()
                                      else shutil.which("compute-sanitizer"))
        if shutil.which("nvidia-smi"):
            query = _output(["nvidia-smi", "--query-gpu=name,driver_version,memory.total,"
                             "clocks.sm,clocks.max.sm,temperature.gpu", "--format=csv,noheader"])
            tools["nvidia_smi"] = query.strip()
            tools["driver"] = query.split(",")[1].strip() if query.count(",") > 1 else None
            with open(self.logs / f"{log_name}.log", "a") as f:
                f.write(_output(["nvidia-smi"]))
        return tools

    def stage_build(self, stage) -> Outcome:
        if self.dry:
            built = sorted(p.name for p in (ROOT / "usfmae_fast").glob("_C*.so"))
            return skipped("dry run", f"not rebuilt; found usfmae_fast/{built[0]}" if built
                           else "not built; make install builds usfmae_fast/_C")
        env = dict(self.env, MAX_JOBS=str(os.cpu_count() or 16), USFMAE_FORCE_CUDA="1",
                   TORCH_CUDA_ARCH_LIST=self.args.arch or self.info.get("capability") or "9.0")
        if self.info.get("cuda_home"):
            env.setdefault("CUDA_HOME", self.info["cuda_home"])
        started = time.monotonic()
        code, cut, text = self.run(stage.name, self.python(
            "-m", "pip", "install", "--no-index", "--no-build-isolation", "--no-deps", "-e", "."),
            env=env)
        if code and not cut and re.search(r"Permission denied|Read-only file system", text):
            # an image whose site-packages cannot be written: build in place instead (the
            # stages run from the repository root, where usfmae_fast imports from the checkout)
            code, cut, _ = self.run(stage.name, self.python("setup.py", "build_ext", "--inplace"),
                                    env=env)
        seconds = round(time.monotonic() - started)
        if cut:
            return Outcome("timeout", f"pip install -e . cut after {seconds} s")
        library = sorted((ROOT / "usfmae_fast").glob("_C*.so"))
        cuobjdump = Path(env.get("CUDA_HOME", "/nonexistent"), "bin", "cuobjdump")
        if library and cuobjdump.exists():  # registers, shared memory, stack per kernel
            (self.logs / "cuda_resource_usage.txt").write_text(
                _output([str(cuobjdump), "--dump-resource-usage", str(library[0])]))
        probe = self.work / "ext.json"
        self.run(stage.name, self.python("-c", EXT_PROBE), stdout_to=probe)
        try:
            ext = json.loads(probe.read_text().strip().splitlines()[-1])
        except (ValueError, IndexError):
            ext = {"loaded": False, "message": "the extension probe failed (see build.log)"}
        kernels = ext.get("cuda_kernels") or {}
        ok = code == 0 and ext.get("loaded") and kernels and all(kernels.values())
        summary = (f"pip exit {code} in {seconds} s (MAX_JOBS={env['MAX_JOBS']}, "
                   f"TORCH_CUDA_ARCH_LIST={env['TORCH_CUDA_ARCH_LIST']}); _C " +
                   ("loaded" if ext.get("loaded") else f"not loaded: {ext.get('message')}"))
        if kernels:
            summary += f"; CUDA kernels: {sum(kernels.values())}/{len(kernels)}"
        return Outcome("passed" if ok else "failed", summary,
                       {"seconds": seconds, "pip_exit": code, "extension": ext})

    def stage_selftest(self, stage) -> Outcome:
        cmd = self.python("-m", "usfmae_fast.cli", "selftest", "--json")
        if self.dry:
            cmd += ["--dtype", "float32"]  # the CPU's share: a few seconds
        raw = self.logs / "selftest.json"
        env = dict(self.env, USFMAE_TRITON_AUTOTUNE="first")
        code, cut, text = self.run(stage.name, cmd, env=env, stdout_to=raw)
        try:
            report = json.loads(raw.read_text())
        except ValueError:
            report = None
        if not isinstance(report, dict):
            last = [line for line in text.splitlines() if line.strip()][-3:]
            return Outcome("timeout" if cut else "failed",
                           f"exit {code}, no JSON: " + " / ".join(last)[-300:])
        rows = report.get("rows", [])
        counts = Counter(r.get("status") for r in rows)
        failures = [f"{r.get('op')}/{r.get('backend')}/{r.get('dtype')}: {r.get('detail')}"
                    for r in rows if r.get("status") == "fail"]
        summary = f"exit {code}: " + ", ".join(f"{counts[k]} {k}" for k in sorted(counts))
        if failures:
            summary += "; failed: " + "; ".join(failures[:4])
        status = "timeout" if cut else "passed" if code == 0 and not failures else "failed"
        return Outcome(status, summary, dict(counts))

    def stage_tests(self, stage) -> Outcome:
        paths, select = GPU_TESTS[stage.name]
        path = _present(paths)
        if path is None:
            return skipped("not present", paths.replace("|", " or "))
        if self.dry:
            return self._dry_collect([path]) if stage.gpu_only else self._dry_tests_of(path)
        env = dict(self.env, USFMAE_TRITON_AUTOTUNE="first",
                   USFMAE_FUZZ_CASES=str(self.args.fuzz_cases))
        return self._pytest(stage, [path, *(("-k", select) if select else ())], env,
                            empty_ok=stage.name == "tests-triton-configs")

    def stage_memcheck(self, stage) -> Outcome:
        if self.dry:
            return self._dry_collect(MEMCHECK_TESTS)
        sanitizer = self.info.get("compute_sanitizer")
        if not sanitizer:
            return skipped("compute-sanitizer not found")
        env = dict(self.env, USFMAE_TRITON_AUTOTUNE="first", PYTORCH_NO_CUDA_MEMORY_CACHING="1")
        outcome = self._pytest(stage, list(MEMCHECK_TESTS), env, prefix=[
            sanitizer, "--tool", "memcheck", "--error-exitcode", "3", "--print-limit", "20"])
        log = (self.logs / f"{stage.name}.log").read_text(errors="replace")
        errors = re.findall(r"ERROR SUMMARY: (\d+) error", log)
        if errors:
            outcome.summary = f"memcheck errors: {errors[-1]}; {outcome.summary}"
            if int(errors[-1]) and outcome.status == "passed":
                outcome.status = "failed"
        return outcome

    def stage_bench(self, stage) -> Outcome:
        if self.dry:
            return skipped("no CUDA device")
        files, select, rounds = BENCH[stage.name]
        result = self.logs / f"{stage.name.replace('-', '_')}.json"
        env = dict(self.env, TRITON_PRINT_AUTOTUNING="1")
        if self.args.bench_autotune == "first":
            env["USFMAE_TRITON_AUTOTUNE"] = "first"
        outcome = self._pytest(stage, [*files, "-k", select, f"--benchmark-json={result}",
                                       "--benchmark-warmup=off", *rounds], env)
        numbers = bench_numbers(self.bench_results())
        key = [v for k, v in numbers.items()
               if k.startswith("pretrain" if "pretrain" in stage.name else "op:")]
        if key:
            outcome.numbers = numbers
            outcome.summary = "; ".join(key) + "; " + outcome.summary
        return outcome

    def bench_results(self) -> list[Path]:
        return sorted(self.logs.glob("bench_*.json"))

    # --- pytest ---------------------------------------------------------------------------------

    def _pytest(self, stage, targets, env, *, prefix=(), empty_ok=False) -> Outcome:
        cmd = [*prefix, *self.python("-m", "pytest", *targets, "-v", "-rfEs", "-p",
                                     "no:cacheprovider", "--durations=8", "--color=no")]
        code, cut, text = self.run(stage.name, cmd, env=env)
        return self._judge(code, cut, text, empty_ok)

    def _judge(self, code, cut, text, empty_ok=False) -> Outcome:
        """A pytest stage's status and key numbers from its exit code and -v output."""
        result = parse_pytest(text)
        counts = result["counts"]
        summary = ", ".join(f"{counts[k]} {k.lower()}" for k in sorted(counts)) or "no test ran"
        if result["failed"]:
            summary += "; failed: " + ", ".join(result["failed"][:5])
        if cut:
            running = result["running"] and result["running"].split("/")[-1]
            return Outcome("timeout", summary + (f"; cut during {running}" if running else ""),
                           dict(counts))
        optional = {name.split(".")[0] for name in OPTIONAL}
        missing = sorted({m for m in result["missing_modules"] if m.split(".")[0] in optional})
        if code not in (0, 1, 5) and missing:
            return skipped(f"needs {', '.join(missing)}", summary)
        ran = sum(counts[k] for k in ("PASSED", "FAILED", "ERROR", "XPASS"))
        if code in (0, 5) and not ran:
            reason = (result["skip_reasons"] or ["nothing selected"])[0]
            if empty_ok:
                return skipped(f"nothing runs here: {reason}"[:120], summary)
            return Outcome("failed", f"nothing ran: {summary} ({reason})", dict(counts))
        if code not in (0, 1):
            summary = f"pytest exit {code}; {summary}"
        return Outcome("passed" if code == 0 else "failed", summary, dict(counts))

    def _dry_tests_of(self, path: str) -> Outcome:
        """The dry run's tiny CPU selection of the op test files, one process for all of them
        (each pytest start costs seconds on a small CPU); each stage judges its file's share."""
        if self._dry_tests is None:
            files = [GPU_TESTS[name][0] for name in DRY_TESTS]
            select = " or ".join(f"({expr})" for expr in DRY_TESTS.values())
            env = dict(self.env, USFMAE_TRITON_AUTOTUNE="first", USFMAE_FUZZ_CASES="2")
            self._dry_tests = self.run("tests-cpu", self.python(
                "-m", "pytest", *files, "-k", select, "-v", "-rfEs", "-p", "no:cacheprovider",
                "--color=no"), env=env)
        code, cut, text = self._dry_tests
        own = "\n".join(line for line in text.splitlines()
                        if line.startswith(path + "::") or not line.startswith("tests/"))
        if code in (0, 1):  # the run's verdict, restricted to this file
            counts = parse_pytest(own)["counts"]
            code = 1 if counts["FAILED"] or counts["ERROR"] else 0 if counts else 5
        outcome = self._judge(code, cut, own)
        outcome.log = "tests-cpu"
        return outcome

    def _dry_collect(self, targets) -> Outcome:
        """A GPU-only pytest stage in the dry run: skipped, but its selection must still collect
        (one collection for all of them)."""
        if self._collected is None:
            every = [_present(GPU_TESTS[s.name][0]) for s in STAGES
                     if s.gpu_only and s.name in GPU_TESTS and _present(GPU_TESTS[s.name][0])]
            code, cut, text = self.run("collect", self.python(
                "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "--color=no",
                *every, *MEMCHECK_TESTS))
            ids = {line.strip() for line in text.splitlines()
                   if re.match(r"^tests/\S+::\S+$", line.strip())}
            self._collected = {"cut": cut, "ids": ids}
        if self._collected["cut"]:
            return Outcome("timeout", "no CUDA device; collecting its tests ran out of time")
        ids = self._collected["ids"]
        mine = {i for i in ids for t in targets if i == t or i.startswith(t + "::")}
        lost = [t for t in targets if not any(i == t or i.startswith(t + "::") for i in mine)]
        if lost:
            return Outcome("failed", "no CUDA device, and its tests do not collect: "
                           + ", ".join(lost))
        return skipped("no CUDA device", f"its {len(mine)} tests collect")

    # --- the whole run --------------------------------------------------------------------------

    def budget(self, stage) -> float:
        if self.dry:
            return stage.dry_s
        return stage.gpu_s * (self.args.budget - FINISH_S) / sum(s.gpu_s for s in STAGES)

    def main(self) -> int:
        signal.signal(signal.SIGTERM, self._terminate)
        runners = {"env": self.stage_env, "build": self.stage_build,
                   "selftest": self.stage_selftest, "memcheck": self.stage_memcheck}
        for stage in STAGES:
            started = time.monotonic()
            # Cumulative: stage i ends by t0 + the budgets up to i, whatever came before it.
            self.deadline += self.budget(stage)
            if stage.name != "env" and (stage.name in self.skip or (
                    self.only and stage.name not in self.only and stage.name not in ALWAYS)):
                outcome = skipped("not selected", "--only / --skip")
            else:
                runner = runners.get(stage.name) or (
                    self.stage_tests if stage.name in GPU_TESTS else self.stage_bench)
                try:
                    outcome = runner(stage)
                except Exception as exc:  # noqa: BLE001 - report it, go on with the rest
                    outcome = Outcome("failed", f"gpu_check error: {exc!r}")
            self.record(stage, outcome, round(time.monotonic() - started, 1))
        self.write(final=True)
        shutil.rmtree(self.work, ignore_errors=True)  # everything is in logs.tar.gz
        print(self.markdown(final=True, tables=False), flush=True)  # the tail a caller sees
        print(f"[gpu_check] results: {', '.join(str(self.out / f) for f in FILES)}", flush=True)
        return 1 if any(r["status"] in ("failed", "timeout") for r in self.results) else 0

    def _terminate(self, signum, frame):
        if self.current is not None:
            _kill_group(self.current)
        self.write(final=False)
        sys.exit(128 + signum)

    def record(self, stage, outcome: Outcome, seconds: float) -> None:
        self.results.append({
            "stage": stage.name, "status": outcome.status, "reason": outcome.reason,
            "seconds": seconds, "budget_s": round(self.budget(stage), 1),
            "summary": outcome.summary, "numbers": outcome.numbers or {}, "what": stage.what,
            "log": (f"gpu_check/logs/{outcome.log or stage.name}.log"
                    if (self.logs / f"{outcome.log or stage.name}.log").exists() else None)})
        print(f"[gpu_check] {stage.name:<23} {_status(self.results[-1]):<30} {seconds:>6.1f} s"
              f"  {outcome.summary}"[:500], flush=True)
        if self.out is None:
            self.out = Path(self.args.out or os.environ.get("OUT") or
                            ROOT / "benchmarks" / "results" / "gpu-check-{}-{}".format(
                                "cpu" if self.dry else "cuda", time.strftime("%Y%m%d-%H%M%S")))
            self.out.mkdir(parents=True, exist_ok=True)
        self.write(final=False)

    # --- what comes back ------------------------------------------------------------------------

    def summary(self, final: bool) -> dict:
        info, bench = self.info, self.bench_results()
        bad = any(r["status"] in ("failed", "timeout") for r in self.results)
        pending = [{"stage": s.name, "status": "not run", "reason": "", "seconds": 0,
                    "budget_s": round(self.budget(s), 1), "summary": "", "numbers": {},
                    "what": s.what, "log": None} for s in STAGES[len(self.results):]]
        return {
            "schema": 1, "mode": "dry-run" if self.dry else "gpu",
            "status": "failed" if bad else "passed" if final else "incomplete",
            "started": self.started, "seconds": round(time.monotonic() - self.t0, 1),
            "budget_s": (sum(s.dry_s for s in STAGES) if self.dry else self.args.budget),
            "command": shlex.join(["python3", *sys.argv]),
            "commit": info.get("commit"), "dirty": info.get("dirty"),
            "device": info.get("device") or "no CUDA device",
            "versions": {k: info.get(k) for k in ("python", "torch", "torch_cuda", "triton",
                                                   "nvcc", "driver")},
            "env": {k: v for k, v in info.items() if k != "packages"},
            "settings": {"fuzz_cases": 2 if self.dry else self.args.fuzz_cases,
                         "tests_triton_autotune": "first",
                         "bench_triton_autotune": self.args.bench_autotune},
            "stages": self.results + pending,
            "goals": goals(bench),
            "files": list(FILES),
        }

    def markdown(self, final: bool, tables: bool = True) -> str:
        s = self.summary(final)
        v = s["versions"]
        lines = [f"# GPU check: {s['status']} ({s['mode']})", "",
                 f"- device: {s['device']}" + (f"; driver {v['driver']}" if v["driver"] else ""),
                 f"- torch {v['torch']} (CUDA {v['torch_cuda']}), triton {v['triton']}, "
                 f"nvcc {v['nvcc']}, Python {v['python']}",
                 f"- commit {s['commit']}{' + uncommitted changes' if s['dirty'] else ''}",
                 f"- {s['started']}: {s['seconds']} s of a {s['budget_s']:.0f} s budget, "
                 f"`{s['command']}`",
                 f"- settings: {json.dumps(s['settings'])}", "",
                 "| stage | status | seconds (budget) | key numbers |", "|---|---|---|---|"]
        for r in s["stages"]:
            text = r["summary"].replace("|", "/").replace("\n", " ")
            lines.append(f"| {r['stage']} | {_status(r)} | {r['seconds']} ({r['budget_s']:.0f}) "
                         f"| {text} |")
        if s["goals"]:
            lines += ["", "## Goals of issue 14 (measured side by side in this run)", "",
                      "| goal | measured | met |", "|---|---|---|"]
            lines += [f"| {g['goal']} | {g['measured']} | {'yes' if g['met'] else 'no'} |"
                      for g in s["goals"].values()]
        bench = _summarize_tables(self.bench_results()) if tables else ""
        if bench:
            lines += ["", "## Benchmarks (benchmarks/summarize.py)", "", bench]
        return "\n".join(lines) + "\n"

    def write(self, final: bool) -> None:
        """summary.json, summary.md and logs.tar.gz, each replaced whole (rename)."""
        if self.out is None:
            return
        _atomic(self.out / "summary.json", json.dumps(self.summary(final), indent=2).encode())
        _atomic(self.out / "summary.md", self.markdown(final).encode())
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w:gz") as tar:
            for path in sorted(self.work.rglob("*")):
                relative = path.relative_to(self.work)
                if path.is_file() and relative.parts[0] != "site":
                    data = path.read_bytes()
                    if len(data) > LOG_CAP:
                        data = data[:LOG_CAP // 2] + b"\n[... cut ...]\n" + data[-LOG_CAP // 2:]
                    entry = tarfile.TarInfo(f"gpu_check/{relative}")
                    entry.size, entry.mtime = len(data), int(path.stat().st_mtime)
                    tar.addfile(entry, io.BytesIO(data))
        _atomic(self.out / "logs.tar.gz", buffer.getvalue())


# --- reading results ----------------------------------------------------------------------------

_OUTCOME = re.compile(r"^(\S+::\S+)\s+(PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b")
_STARTED = re.compile(r"^(\S+::\S+)\s*$")


def parse_pytest(text: str) -> dict:
    """Counts, failed tests, the test running when the log ends, skip reasons and modules that
    failed to import, from ``pytest -v -rfEs`` output (complete or cut)."""
    counts: Counter = Counter()
    failed, running = [], None
    for line in text.splitlines():
        if match := _OUTCOME.match(line):
            counts[match[2]] += 1
            running = None
            if match[2] in ("FAILED", "ERROR"):
                failed.append(match[1].split("/")[-1])
        elif match := _STARTED.match(line):
            running = match[1]
    skips = re.findall(r"^SKIPPED \[\d+\] [^:]+:\d+: (.*)$", text, flags=re.M)
    missing = re.findall(r"No module named '([\w.]+)'", text)
    return {"counts": counts, "failed": failed, "running": running, "skip_reasons": skips,
            "missing_modules": missing}


def _load_benchmarks(paths) -> list[dict]:
    out = []
    for path in paths:
        try:
            out += json.loads(Path(path).read_text()).get("benchmarks", [])
        except (OSError, ValueError):
            continue
    return out


def bench_numbers(paths) -> dict:
    """Key numbers of the benchmark JSONs: per op, our best fwd+bwd against its references; per
    training variant, images/s."""
    numbers, benches = {}, _load_benchmarks(paths)
    for op, label in (("random_masking", "masking"), ("mae_loss", "loss")):
        ours = _ours(benches, op, "fwd+bwd")
        if ours:
            numbers[f"op:{op}"] = (f"{label} fwd+bwd {ours['variant']} "
                                   f"{ours['frac_of_copy']:.0%} of copy")
    for workload in ("encoder", "decoder", "finetune"):
        ratio = _attention_vs_sdpa(benches, workload)
        if ratio:
            numbers[f"op:attention-{workload}"] = (f"attention {workload} fwd+bwd "
                                                   f"{ratio[0]} {ratio[1]:.2f}x best SDPA")
    train = _training(benches)
    if train:
        numbers["pretrain"] = "img/s " + ", ".join(f"{k} {v:.0f}" for k, v in train.items())
    return numbers


def _ours(benches, op, passes):
    rows = [dict(b["extra_info"], variant=b["params"].get("variant")) for b in benches
            if b["name"].startswith(f"test_{op}[") and b["extra_info"].get("passes") == passes
            and b["params"].get("variant") in ("cuda", "triton")
            and b["extra_info"].get("device") == "cuda" and "frac_of_copy" in b["extra_info"]]
    return max(rows, key=lambda r: r["frac_of_copy"], default=None)


def _attention_vs_sdpa(benches, workload):
    rows = [b for b in benches if b["name"].startswith("test_attention_packed[")
            and b["extra_info"].get("workload") == workload
            and b["extra_info"].get("passes") == "fwd+bwd"
            and b["extra_info"].get("device") == "cuda"]
    sdpa = [b["extra_info"]["median_s_per_call"] for b in rows
            if b["params"].get("variant", "").startswith("sdpa-")]
    ours = [(b["extra_info"]["median_s_per_call"], b["params"]["variant"]) for b in rows
            if b["params"].get("variant") in ("cuda", "triton")]
    if not sdpa or not ours:
        return None
    best, variant = min(ours)
    return variant, min(sdpa) / best


def _training(benches) -> dict:
    return {b["params"]["variant"]: b["extra_info"]["images_per_s"] for b in benches
            if "images_per_s" in b.get("extra_info", {}) and b["extra_info"].get("device") == "cuda"}


def goals(paths) -> dict:
    """Issue 14's GPU goals against what this run measured (absent ones are left out)."""
    benches, out = _load_benchmarks(paths), {}
    for op in ("random_masking", "mae_loss"):
        ours = _ours(benches, op, "fwd+bwd")
        if ours:
            out[op] = {"goal": f"{op} fwd+bwd >= 80 % of the measured copy bandwidth",
                       "measured": f"{ours['variant']}: {ours['frac_of_copy']:.0%}",
                       "met": ours["frac_of_copy"] >= 0.8}
    for workload, n in (("encoder", 50), ("finetune", 197)):
        ratio = _attention_vs_sdpa(benches, workload)
        if ratio:
            out[f"attention_n{n}"] = {"goal": f"attention fwd+bwd N={n} d=64 >= 1.0x best SDPA",
                                      "measured": f"{ratio[0]}: {ratio[1]:.2f}x",
                                      "met": ratio[1] >= 1.0}
    train = _training(benches)
    ours = max(((v, k) for k, v in train.items() if k.startswith("ours-")), default=None)
    for reference, target in (("fbmae-eager", 2.0), ("fbmae-sdpa-compile", 1.25)):
        if ours and reference in train:
            ratio = ours[0] / train[reference]
            out[f"pretrain_vs_{reference}"] = {
                "goal": f"MAE ViT-B/16 step >= {target}x {reference}",
                "measured": f"{ours[1]}: {ratio:.2f}x", "met": ratio >= target}
    return out


def _summarize_tables(paths) -> str:
    if not paths:
        return ""
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import summarize
        parts = [summarize.markdown(summarize.rows(paths))] if summarize.rows(paths) else []
        training = summarize.training_rows(paths)
        if training:
            parts.append(summarize.training_markdown(training))
        return "\n\n".join(parts)
    except Exception as exc:  # noqa: BLE001 - a half-written result must not lose the summary
        return f"(summarize.py failed: {exc!r})"
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


# --- small helpers ------------------------------------------------------------------------------

def _status(result: dict) -> str:
    return f"skipped: {result['reason']}" if result["status"] == "skipped" else result["status"]


def _present(paths: str) -> str | None:
    """The first of ``a|b|...`` that exists in the checkout."""
    return next((p for p in paths.split("|") if (ROOT / p).exists()), None)


def _kill_group(proc) -> None:
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _names(text: str | None) -> set[str]:
    names = {n.strip() for n in (text or "").split(",") if n.strip()}
    if unknown := names - set(NAMES):
        raise SystemExit(f"gpu_check: unknown stage(s) {', '.join(sorted(unknown))}; "
                         f"stages: {', '.join(NAMES)}")
    return names


def _output(cmd: list[str], timeout: float = 20) -> str:
    try:
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
        return done.stdout + done.stderr
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{cmd[0]}: {exc}\n"


def _cuda_home(env: dict) -> str | None:
    """CUDA_HOME if set, else the toolkit of the nvcc on PATH (asked through ``nvcc --dryrun``,
    which names its real folder even behind a wrapper script), else /usr/local/cuda."""
    if env.get("CUDA_HOME"):
        return env["CUDA_HOME"]
    nvcc = shutil.which("nvcc", path=env.get("PATH"))
    if nvcc:
        with tempfile.TemporaryDirectory() as tmp:
            source = Path(tmp, "probe.cu")
            source.write_text("\n")
            here = re.findall(r"_HERE_=(\S+)", _output([nvcc, "--dryrun", "-c", str(source)]))
        if here:
            return str(Path(here[0]).parent)
        return str(Path(nvcc).resolve().parent.parent)
    return "/usr/local/cuda" if Path("/usr/local/cuda/bin/nvcc").exists() else None


def _git(given: str | None) -> tuple[str | None, bool | None]:
    """The checkout's commit and whether tracked files differ from it; ``given`` (--commit)
    where the copy has no .git, as on a lent machine."""
    commit = _output(["git", "-C", str(ROOT), "rev-parse", "HEAD"]).strip()
    if not re.fullmatch(r"[0-9a-f]{40}", commit):
        return given, None
    status = _output(["git", "-C", str(ROOT), "status", "--porcelain", "--untracked-files=no"])
    return commit, bool(status.strip())


def _atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="stages: " + ", ".join(NAMES))
    p.add_argument("--out", help="folder for summary.json, summary.md and logs.tar.gz (default: "
                   "$OUT, else benchmarks/results/gpu-check-<cuda|cpu>-<date>)")
    p.add_argument("--dry-run", action="store_true",
                   help="the CPU staging even when a CUDA device is present")
    p.add_argument("--only", help="comma-separated stages to run (env and build always run)")
    p.add_argument("--skip", help="comma-separated stages to leave out (build too, when the "
                   "extension is built already)")
    p.add_argument("--budget", type=float, default=BUDGET_S,
                   help="seconds for the whole GPU run; the stage budgets scale with it "
                   "(default: %(default)s)")
    p.add_argument("--fuzz-cases", type=int, default=FUZZ_CASES,
                   help="USFMAE_FUZZ_CASES for the kernel tests on the GPU (default: %(default)s)")
    p.add_argument("--bench-autotune", choices=("full", "first"), default="full",
                   help="Triton autotuning in the benchmarks (tests always use the first valid "
                   "config; default: %(default)s)")
    p.add_argument("--arch", help="TORCH_CUDA_ARCH_LIST for the build (default: the device's "
                   "compute capability, e.g. 9.0)")
    p.add_argument("--wheels", default="wheels",
                   help="folder of carried wheels to install first (default: %(default)s)")
    p.add_argument("--commit", help="the commit to record where the checkout has no .git (a "
                   "copied working tree)")
    p.add_argument("--list", action="store_true", help="print the stages and budgets and exit")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.list:
        scale = (args.budget - FINISH_S) / sum(s.gpu_s for s in STAGES)
        for s in STAGES:
            dry = ("collect" if s.name in GPU_TESTS or s.name == "memcheck" else "skip") \
                if s.gpu_only else f"{s.dry_s} s" if s.dry_s else "shared"
            print(f"{s.name:<23} GPU {s.gpu_s * scale:>4.0f} s   dry run {dry:<8} {s.what}")
        print(f"{'(summary, archive)':<23} GPU {FINISH_S:>4} s\n{'total':<23} GPU "
              f"{args.budget:>4.0f} s   dry run <= {sum(s.dry_s for s in STAGES)} s")
        return 0
    return Check(args).main()


if __name__ == "__main__":
    sys.exit(main())
