"""benchmarks/gpu_check.py, the one-command GPU check, without a GPU: its dry run keeps the
output contract of the GPU run (three files, at most two folders deep, every stage reported with
a status, GPU-only stages skipped with the reason), a stage past its deadline is cut with what
it had finished reported, and the benchmark numbers become the issue's goals."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STATUSES = {"passed", "failed", "timeout", "skipped"}


def _module():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


gpu_check = _module()


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_check") / "out"
    env = {k: v for k, v in os.environ.items() if k != "OUT"}
    started = time.monotonic()
    done = subprocess.run([sys.executable, str(SCRIPT), "--dry-run", "--out", str(out)],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    return done, out, time.monotonic() - started


@pytest.mark.slow
def test_dry_run_output_contract(dry_run):
    done, out, seconds = dry_run
    files = [p for p in out.rglob("*") if p.is_file()]
    assert sorted(p.name for p in files) == sorted(gpu_check.FILES), done.stdout + done.stderr
    assert len(files) <= 6 and all(len(p.relative_to(out).parts) <= 3 for p in files)
    summary = json.loads((out / "summary.json").read_text())
    for key in ("schema", "mode", "status", "started", "seconds", "budget_s", "command",
                "commit", "device", "versions", "settings", "stages", "goals", "files"):
        assert key in summary, key
    assert set(summary["versions"]) == {"python", "torch", "torch_cuda", "triton", "nvcc",
                                        "driver"}
    assert summary["mode"] == "dry-run" and summary["settings"]["fuzz_cases"] == 2
    stages = {s["stage"]: s for s in summary["stages"]}
    assert list(stages) == list(gpu_check.NAMES)  # every stage, in order
    for name, stage in stages.items():
        assert stage["status"] in STATUSES, (name, stage)
        assert stage["status"] != "skipped" or stage["reason"], name
    bad = [s for s in summary["stages"] if s["status"] in ("failed", "timeout")]
    assert done.returncode == (1 if bad else 0), done.stderr
    assert summary["status"] == ("failed" if bad else "passed")
    # what the CPU can run, runs (the selftest and a tiny selection of the kernel tests) ...
    for name in ("env", "selftest", "tests-masking", "tests-loss", "tests-attention"):
        assert stages[name]["status"] == "passed", (name, stages[name]["summary"])
    # ... and the rest is skipped, its test selection still collecting
    assert (stages["build"]["status"], stages["build"]["reason"]) == ("skipped", "dry run")
    for name in ("tests-cuda-kernels", "memcheck", "bench-ops", "bench-pretrain",
                 "bench-pretrain-compile"):
        assert (stages[name]["status"], stages[name]["reason"]) == ("skipped", "no CUDA device")
    assert "tests collect" in stages["memcheck"]["summary"]
    markdown = (out / "summary.md").read_text()
    assert "| stage | status | seconds (budget) | key numbers |" in markdown
    assert all(f"| {name} |" in markdown for name in gpu_check.NAMES)
    assert "| bench-ops | skipped: no CUDA device |" in markdown
    with tarfile.open(out / "logs.tar.gz") as tar:
        names = set(tar.getnames())
    assert {"gpu_check/logs/env.log", "gpu_check/logs/selftest.json",
            "gpu_check/logs/tests-cpu.log"} <= names
    assert all(s["log"] in names for s in summary["stages"] if s["log"])
    assert seconds < 150, f"the dry run took {seconds:.0f} s"


def test_budgets_fit_one_device_command():
    assert gpu_check.BUDGET_S <= 540
    assert sum(s.gpu_s for s in gpu_check.STAGES) + gpu_check.FINISH_S <= gpu_check.BUDGET_S
    assert len(set(gpu_check.NAMES)) == len(gpu_check.NAMES)
    assert sum(s.dry_s for s in gpu_check.STAGES) <= 120
    for test in gpu_check.MEMCHECK_TESTS:
        assert (ROOT / test.split("::")[0]).is_file(), test


def test_a_stage_past_its_deadline_is_cut_and_reports_what_finished(tmp_path):
    (tmp_path / "test_cut.py").write_text(
        "import time\n\ndef test_quick():\n    pass\n\n"
        "def test_slow():\n    time.sleep(120)\n")
    check = gpu_check.Check(gpu_check.build_parser().parse_args(
        ["--dry-run", "--out", str(tmp_path / "out")]))
    stage = gpu_check.Stage("tests-masking", 8, 8, False, "")
    check.deadline = time.monotonic() + 8
    started = time.monotonic()
    outcome = check._pytest(stage, [str(tmp_path / "test_cut.py")], check.env)
    assert time.monotonic() - started < 20
    assert outcome.status == "timeout", outcome
    assert "1 passed" in outcome.summary and "cut during test_cut.py::test_slow" in \
        outcome.summary, outcome.summary
    assert "KeyboardInterrupt" in (check.logs / "tests-masking.log").read_text()
    shutil.rmtree(check.work)


def _bench(name, variant, **info):
    return {"name": f"{name}[cuda-{variant}]", "params": {"variant": variant},
            "extra_info": dict({"device": "cuda", "dtype": "torch.bfloat16"}, **info)}


def test_benchmark_results_become_the_goals(tmp_path):
    ops = [
        _bench("test_random_masking", "triton", passes="fwd+bwd", shape=[256, 196, 768],
               median_s_per_call=1e-4, tb_s=3.6, frac_of_copy=0.85),
        _bench("test_random_masking", "eager", passes="fwd+bwd", shape=[256, 196, 768],
               median_s_per_call=5e-4, tb_s=0.7, frac_of_copy=0.17),
        _bench("test_mae_loss", "cuda", passes="fwd+bwd", shape=None,
               median_s_per_call=2e-4, tb_s=3.0, frac_of_copy=0.7),
    ] + [_bench("test_attention_packed", variant, passes="fwd+bwd", workload=workload,
                shape=[256, 12, n, 64], median_s_per_call=t, tflop_s=100.0, frac_of_gemm=0.1)
         for workload, n, timings in (("encoder", 50, {"sdpa-flash": 1e-3, "triton": 8e-4}),
                                      ("finetune", 197, {"sdpa-cudnn": 1e-3, "cuda": 2e-3}))
         for variant, t in timings.items()]
    train = [_bench("test_pretrain_step", variant, images_per_s=ips, flops_per_image=1e11,
                    batch=256, model={"depth": 12}, tflop_s=ips * 1e-1, frac_of_gemm=0.3,
                    mfu=0.3, dtype="bfloat16", median_s_per_call=256 / ips)
             for variant, ips in (("fbmae-eager", 1000.0), ("fbmae-sdpa-compile", 1800.0),
                                  ("ours-triton", 2100.0))]
    for name, benches in (("bench_ops.json", ops), ("bench_pretrain.json", train)):
        (tmp_path / name).write_text(json.dumps({"machine_info": {"device": "H200"},
                                                 "benchmarks": benches}))
    paths = sorted(tmp_path.glob("bench_*.json"))
    goals = gpu_check.goals(paths)
    assert goals["random_masking"]["met"] and not goals["mae_loss"]["met"]
    assert goals["attention_n50"]["measured"] == "triton: 1.25x" and goals["attention_n50"]["met"]
    assert goals["attention_n197"]["measured"] == "cuda: 0.50x"
    assert goals["pretrain_vs_fbmae-eager"]["met"]
    assert goals["pretrain_vs_fbmae-sdpa-compile"]["measured"] == "ours-triton: 1.17x"
    assert not goals["pretrain_vs_fbmae-sdpa-compile"]["met"]
    numbers = gpu_check.bench_numbers(paths)
    assert numbers["op:random_masking"] == "masking fwd+bwd triton 85% of copy"
    assert "ours-triton 2100" in numbers["pretrain"]
    tables = gpu_check._summarize_tables(paths)  # benchmarks/summarize.py on the same files
    assert "| x fbmae-eager |" in tables and "x best SDPA" in tables, tables
