"""Backend selection: set_backend / USFMAE_BACKEND, auto choice, clear errors, `usfmae-fast info`."""
import json
import os
import subprocess
import sys

import pytest
import torch

from conftest import requires_ext
from usfmae_fast import ops
from usfmae_fast.cli import main
from usfmae_fast.ops import _backend


def test_set_backend_rejects_unknown_names(backend):
    with pytest.raises(ValueError, match="backend"):
        backend("fast")
    assert ops.get_backend() in ops.BACKENDS + ("auto",)


def test_env_variable_is_validated():
    env = dict(os.environ, USFMAE_BACKEND="gpu-please")
    result = subprocess.run([sys.executable, "-c", "import usfmae_fast.ops"], env=env,
                            capture_output=True, text=True)
    assert result.returncode != 0 and "USFMAE_BACKEND" in result.stderr


def test_env_variable_selects_backend():
    env = dict(os.environ, USFMAE_BACKEND="torch")
    result = subprocess.run([sys.executable, "-c", "from usfmae_fast import ops; print(ops.get_backend())"],
                            env=env, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "torch"


def _calls(device):
    """Arguments of one call of each op (as the public ops pass them to the backends)."""
    x, qkv = torch.randn(2, 8, 4, device=device), torch.randn(2, 5, 3, 2, 8, device=device)
    q = torch.randn(2, 2, 5, 8, device=device)
    imgs, pred = torch.randn(2, 1, 4, 4, device=device), torch.randn(2, 4, 4, device=device)
    return {"random_masking": (x, None, 2), "attention": (q, q, q, None),
            "attention_packed": (qkv, None),
            "mae_loss": (imgs, pred, torch.ones(2, 4, device=device), 2, False)}


@requires_ext
def test_auto_prefers_the_compiled_cpu_kernel(backend):
    backend("auto")
    for op, args in _calls("cpu").items():
        assert _backend.resolve(op, *args)[0] == "cpu", op
    for op, args in _calls("meta").items():
        assert _backend.resolve(op, *args)[0] == "torch", op


def test_named_backend_on_the_wrong_device_is_an_error(backend):
    backend("cuda")
    with pytest.raises(ValueError, match="runs random_masking on cuda tensors, got tensors on cpu"):
        ops.random_masking(torch.randn(2, 8, 4), 0.5)


def test_backend_without_the_op_falls_back_with_a_warning(backend, monkeypatch):
    monkeypatch.setitem(_backend._REGISTRY, "only_torch", {})
    monkeypatch.setitem(_backend._OPS, "only_torch", _backend.Op(
        tuple, lambda x: ("cpu", x.dtype), lambda fn, spec, device: None, lambda device, dtype: []))
    _backend.register("only_torch", "torch", torch.neg, ("cpu",))
    backend("triton")
    _backend._warned.clear()
    with pytest.warns(UserWarning, match="backend 'triton' has no only_torch"):
        name, fn = _backend.resolve("only_torch", torch.ones(2))
    assert (name, fn) == ("torch", torch.neg)


def test_info_reports_every_backend_with_a_reason(capsys):
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["torch"] == torch.__version__
    for op in ("random_masking", "attention", "attention_packed", "mae_loss"):
        row = report["ops"][op]
        assert set(row) == set(ops.BACKENDS)
        assert row["torch"].startswith("ok")
        assert all(state for state in row.values())
    if not torch.cuda.is_available():
        assert report["ops"]["random_masking"]["cuda"] in (
            "no CUDA device", report["extension"]["message"],
            "usfmae_fast._C was built without the CUDA kernel of random_masking")
    assert main(["info"]) == 0
    assert "random_masking" in capsys.readouterr().out


def test_missing_extension_is_reported_and_falls_back(tmp_path):
    code = ("import torch; from usfmae_fast import ops; from usfmae_fast.ops import _ext;"
            "print(_ext.LOADED, ops.backend_status()['random_masking']['cpu']);"
            "x = torch.randn(2, 10, 3); print(ops.random_masking(x, 0.5)[0].shape)")
    env = dict(os.environ, USFMAE_EXT_PATH=str(tmp_path / "missing.so"))
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                            check=True)
    assert result.stdout.startswith("False")
    assert "failed to load" in result.stdout and "torch.Size([2, 5, 3])" in result.stdout


def _run_pytest(env, *, python_prefix=""):
    """One quick test of this file in a fresh pytest (conftest's session checks run first)."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    args = ["tests/test_backend.py::test_set_backend_rejects_unknown_names", "-q",
            "-p", "no:cacheprovider"]
    code = f"{python_prefix}import pytest, sys; sys.exit(pytest.main({args!r}))"
    return subprocess.run([sys.executable, "-c", code], cwd=root, env=env, capture_output=True,
                          text=True)


def test_expected_extension_that_does_not_load_fails_the_session(tmp_path):
    # `make test` expects the library and passes, which shows the check lets a loaded one
    # through; here it must stop a run where the library fails to load.
    missing = str(tmp_path / "missing.so")
    result = _run_pytest(dict(os.environ, USFMAE_EXPECT_EXT="1", USFMAE_EXT_PATH=missing))
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "USFMAE_EXPECT_EXT=1" in result.stdout and missing in result.stdout
    assert "passed" not in result.stdout


@pytest.mark.skipif(torch.cuda.is_available(), reason="the interpreter is used without a GPU")
def test_triton_interpreter_set_too_late_fails_the_session():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = _run_pytest(env, python_prefix="import usfmae_fast.ops; ")
    assert result.returncode == pytest.ExitCode.TESTS_FAILED, result.stdout + result.stderr
    assert "imported before tests/conftest.py set TRITON_INTERPRET=1" in result.stdout
