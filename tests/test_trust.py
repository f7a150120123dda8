"""Trust on first use (ops/_trust.py) and per-call routing (ops/_backend.py): a wrong kernel is
caught on its first call and replaced by the next backend with one warning, selftest reports it
and exits non-zero; checks run once per key, leave the caller's random state alone and work
under torch.compile; "auto" routes each input to a backend that takes it well."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch

from usfmae_fast import ops
from usfmae_fast.cli import main
from usfmae_fast.ops import _backend, _trust, reference
from usfmae_fast.ops._kernel_checks import AttentionSpec


@pytest.fixture(autouse=True)
def fresh_trust():
    _trust.reset()
    yield
    _trust.reset()


class _IgnoresUpstreamGrad(torch.autograd.Function):
    """The loss right, its backward as if the upstream gradient were always 1."""

    @staticmethod
    def forward(ctx, imgs, pred, mask, patch_size, norm):
        with torch.enable_grad():
            p = pred.detach().requires_grad_(True)
            loss = reference.mae_loss(imgs, p, mask, patch_size, norm)
            (ctx.grad_pred,) = torch.autograd.grad(loss, p)
        return loss.detach()

    @staticmethod
    def backward(ctx, grad):
        return None, ctx.grad_pred, None, None, None


def _same_noise_every_row(x, noise, num_keep):
    row = torch.rand(1, x.shape[1], device=x.device) if noise is None else noise[:1]
    return reference.mask_by_noise(x, row.expand(x.shape[0], -1), num_keep)


BROKEN = {
    "attention_packed": lambda qkv, scale: reference.attention_packed(qkv, scale) * 1.01,
    "attention": lambda q, k, v, scale: reference.attention(q, k, v, scale).flip(2),
    "mae_loss": _IgnoresUpstreamGrad.apply,
    "random_masking": _same_noise_every_row,
}


def _inject(monkeypatch, op, fn):
    """Make ``fn`` the "cpu" backend of ``op``, usable here whatever was built."""
    impls = dict(_backend._REGISTRY[op])
    impls["cpu"] = _backend.Impl(fn, ("cpu",), lambda: None, lambda spec: None, lambda spec: True)
    monkeypatch.setitem(_backend._REGISTRY, op, impls)


def _call(op):
    """One call of ``op`` with fresh inputs needing gradients, and the reference's answer."""
    gen = torch.Generator().manual_seed(3)
    if op == "attention_packed":
        qkv = torch.randn(2, 50, 3, 2, 16, generator=gen, requires_grad=True)
        return lambda: ops.attention_packed(qkv), lambda: reference.attention_packed(qkv)
    if op == "attention":
        q, k, v = (torch.randn(2, 2, 50, 16, generator=gen) for _ in range(3))
        return lambda: ops.attention(q, k, v), lambda: reference.attention(q, k, v)
    if op == "mae_loss":
        imgs, pred = torch.randn(2, 1, 8, 8, generator=gen), torch.randn(2, 4, 16, generator=gen)
        pred.requires_grad_(True)
        mask = torch.tensor([[1.0, 0, 1, 1], [0, 1, 1, 0]])
        return (lambda: ops.mae_loss(imgs, pred, mask, 4),
                lambda: reference.mae_loss(imgs, pred, mask, 4, False))
    x, noise = torch.randn(4, 49, 8, generator=gen), torch.rand(4, 49, generator=gen)
    return (lambda: ops.random_masking(x, 0.75, noise)[0],
            lambda: reference.random_masking(x, 0.75, noise)[0])


def _no_check_warning(fn):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = fn()
    assert not [w for w in caught if issubclass(w.category, ops.KernelCheckWarning)]
    return out


@pytest.mark.parametrize("op", sorted(BROKEN))
def test_a_wrong_kernel_is_caught_on_first_use_and_replaced(monkeypatch, backend, op):
    _inject(monkeypatch, op, BROKEN[op])
    run, expected = _call(op)
    for name in ("auto", "cpu"):  # "auto" and the broken backend named explicitly
        _trust.reset()
        backend(name)
        with pytest.warns(ops.KernelCheckWarning, match=rf"'cpu' kernel of {op} failed its check"
                          r" against ops/reference.py on cpu, float32"):
            out = run()
        torch.testing.assert_close(out, expected())
        torch.testing.assert_close(_no_check_warning(run), expected())  # one warning per key
        [(key, verdict)] = _trust.verdicts().items()
        assert key[:3] == (op, "cpu", "cpu") and not verdict.passed and verdict.error


@pytest.mark.parametrize("op", sorted(BROKEN))
def test_selftest_fails_on_a_wrong_kernel(monkeypatch, capsys, op):
    _inject(monkeypatch, op, BROKEN[op])
    assert main(["selftest", "--op", op, "--backend", "cpu", "--dtype", "float32", "--json"]) == 1
    report = json.loads(capsys.readouterr().out)
    [row] = [r for r in report["rows"] if r["device"] == "cpu"]
    assert not report["passed"] and row["status"] == "fail" and row["detail"]


def test_checks_can_be_turned_off(monkeypatch):
    _inject(monkeypatch, "attention_packed", BROKEN["attention_packed"])
    monkeypatch.setenv(_trust.ENV, "0")
    assert not _trust._env_enabled()
    monkeypatch.setattr(_trust, "_ENABLED", False)  # what the variable set at import gives
    run, expected = _call("attention_packed")
    out = _no_check_warning(run)
    assert not torch.allclose(out, expected()) and not _trust.verdicts()


def test_a_kernel_that_raises_is_distrusted(monkeypatch, backend):
    def crashes(qkv, scale):
        raise RuntimeError("CUDA error: an illegal memory access was encountered")

    _inject(monkeypatch, "attention_packed", crashes)
    backend("auto")
    run, expected = _call("attention_packed")
    with pytest.warns(ops.KernelCheckWarning, match="RuntimeError: CUDA error: an illegal"):
        torch.testing.assert_close(run(), expected())


def test_torch_compile_checks_while_tracing_and_keeps_the_answer(monkeypatch, backend):
    _inject(monkeypatch, "attention_packed", BROKEN["attention_packed"])
    backend("auto")
    qkv = torch.randn(2, 50, 3, 2, 16)
    compiled = torch.compile(ops.attention_packed, fullgraph=True, backend="aot_eager")
    with pytest.warns(ops.KernelCheckWarning):
        out = compiled(qkv)
    torch.testing.assert_close(out, reference.attention_packed(qkv))
    torch.testing.assert_close(_no_check_warning(lambda: compiled(qkv)),
                               reference.attention_packed(qkv))


def test_dynamic_shapes_compile_specializes_what_picks_the_kernel(backend):
    backend("auto")
    proj = torch.nn.Linear(32, 96)
    fn = torch.compile(lambda x: ops.attention_packed(proj(x).unflatten(-1, (3, 2, 16))),
                       dynamic=True, fullgraph=True, backend="aot_eager")
    for n in (50, 197):
        x = torch.randn(3, n, 32)
        torch.testing.assert_close(fn(x), reference.attention_packed(proj(x).unflatten(-1, (3, 2, 16))))
    checked = {spec.n_q for (_, name, _, spec) in _trust.verdicts()}
    assert checked in (set(), {64, 256})  # one check per sequence bucket (none under "torch")


@pytest.mark.parametrize("op", sorted(BROKEN))
def test_every_usable_kernel_passes_once_per_key_without_touching_the_rng(backend, op):
    run, expected = _call(op)
    for name in ops.BACKENDS:
        if not ops.backend_status()[op][name].startswith("ok (") or "cpu" not in \
                ops.backend_status()[op][name]:
            continue
        backend(name)
        torch.manual_seed(0)
        first = _no_check_warning(run)
        checked = len(_trust.verdicts())
        torch.manual_seed(0)
        again = _no_check_warning(run)  # same draws: the check consumed no random numbers
        assert torch.equal(first, again) and len(_trust.verdicts()) == checked, name
        torch.testing.assert_close(first, expected(), rtol=1e-4, atol=1e-5)
        if name != "torch":
            assert all(v.passed for v in _trust.verdicts().values()), _trust.verdicts()


def test_own_noise_check_leaves_the_rng_alone(backend):
    x = torch.randn(4, 49, 8)
    torch.manual_seed(0)
    first = ops.random_masking(x, 0.75)  # runs the check of the self-drawn-noise path
    assert _trust.verdicts() or ops.get_backend() == "torch"
    torch.manual_seed(0)
    torch.testing.assert_close(ops.random_masking(x, 0.75), first, rtol=0, atol=0)


def test_info_reports_auto_choice_and_check_state(capsys):
    ops.attention_packed(torch.randn(2, 50, 3, 2, 64))
    assert main(["info", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    [row] = [r for r in report["auto"] if r["op"] == "attention_packed" and r["device"] == "cpu"
             and r["dtype"] == "float32" and r["case"] == "d=64 N<=64"]
    if row["backend"] == "torch":
        assert row["checked"] == "reference"
    else:
        assert row["checked"] == "passed"
    assert main(["info"]) == 0
    assert "what runs per call" in capsys.readouterr().out


def test_selftest_command_passes_on_this_machine():
    # The CPU user's setting: no Triton interpreter, so Triton is "n/a" with its reason.
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run([sys.executable, "-m", "usfmae_fast.cli", "selftest"], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    assert " 0 failed" in result.stdout and "attention_packed" in result.stdout
    bad = subprocess.run([sys.executable, "-m", "usfmae_fast.cli", "selftest", "--op", "nope"],
                         env=env, capture_output=True, text=True, timeout=600)
    assert bad.returncode == 2 and "--op nope" in bad.stderr


def _spec(dtype, d, device="cuda"):
    return AttentionSpec(device, dtype, 256, 256, d, d, True)


@pytest.mark.skipif(not {"cuda", "triton"} <= set(_backend._REGISTRY["attention_packed"]),
                    reason="needs the CUDA kernels compiled in and triton importable")
@pytest.mark.parametrize("dtype, d, picked", [
    (torch.bfloat16, 64, "cuda"), (torch.float16, 128, "cuda"), (torch.bfloat16, 32, "cuda"),
    (torch.bfloat16, 80, "triton"), (torch.float16, 256, "triton"), (torch.bfloat16, 288, "torch"),
    (torch.float32, 64, "torch"), (torch.float32, 80, "torch"), (torch.float64, 64, "torch"),
])
def test_auto_routes_each_cuda_input_to_a_backend_that_takes_it_well(monkeypatch, backend,
                                                                     dtype, d, picked):
    # as on a GPU machine: every backend usable on CUDA tensors, Triton not interpreted
    impls = {name: _backend.Impl(i.fn, ("cpu", "cuda"), lambda: None, i.takes, i.prefer)
             for name, i in _backend._REGISTRY["attention_packed"].items()}
    monkeypatch.setitem(_backend._REGISTRY, "attention_packed", impls)
    backend("auto")
    monkeypatch.setattr("usfmae_fast.ops.triton._utils.INTERPRET", False)
    assert _backend.plan("attention_packed", _spec(dtype, d), lambda *a: True) == picked
    if picked == "cuda":  # a CUDA kernel that failed its check hands over to Triton
        failed_cuda = lambda op, name, spec: name != "cuda"  # noqa: E731
        assert _backend.plan("attention_packed", _spec(dtype, d), failed_cuda) == "triton"
    # named: gets what it does not take (its error names the argument); when its check and every
    # later one failed, PyTorch runs it
    backend("cuda")
    named = "cuda" if impls["cuda"].takes(_spec(dtype, d)) else "torch"
    assert _backend.plan("attention_packed", _spec(dtype, d), lambda *a: False) == named
