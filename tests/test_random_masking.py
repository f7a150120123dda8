"""random_masking: every usable backend against ops/reference.py, forward and backward."""
import os
import random

import pytest
import torch

from conftest import requires_cuda, requires_ext, usable_backends
from usfmae_fast import ops
from usfmae_fast.ops import reference
from usfmae_fast.ops.triton import _utils as triton_utils

FUZZ_CASES = int(os.environ.get("USFMAE_FUZZ_CASES", "200"))  # gpu_check.py shortens the fuzz
CPU_BACKENDS = usable_backends("random_masking", "cpu")
requires_triton = pytest.mark.skipif(triton_utils.unavailable() is not None,
                                     reason=f"triton cannot run: {triton_utils.unavailable()}")
TRITON_DEVICE = triton_utils.DEVICES[0]
LENGTHS = (1, 49, 50, 97, 197, 200)


def _check_against_reference(x, ratio, noise):
    x_ref = x.detach().clone().requires_grad_(True)
    x_op = x.detach().clone().requires_grad_(True)
    expected = reference.random_masking(x_ref, ratio, noise)
    got = ops.random_masking(x_op, ratio, noise)
    for name, e, g in zip(("x_masked", "mask", "ids_restore"), expected, got):
        assert g.dtype == e.dtype and g.shape == e.shape, name
        assert torch.equal(g, e), name
    grad = torch.randn_like(expected[0])
    expected[0].backward(grad)
    got[0].backward(grad)
    assert torch.equal(x_op.grad, x_ref.grad)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16, torch.float64])
def test_matches_reference(backend, backend_name, length, dtype):
    backend(backend_name)
    n, dim = random.choice((1, 3, 5)), random.choice((1, 7, 48, 130))
    x = torch.randn(n, length, dim).to(dtype)
    _check_against_reference(x, random.choice((0.5, 0.75, 0.9)), torch.rand(n, length))


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_fuzz_200_cases(backend, backend_name):
    backend(backend_name)
    rng = random.Random(0)
    for _ in range(FUZZ_CASES):
        n, length, dim = rng.randint(1, 5), rng.randint(1, 100), rng.randint(1, 70)
        dtype = rng.choice((torch.float32, torch.float16, torch.bfloat16))
        noise_dtype = rng.choice((torch.float32, torch.float64, torch.float16))
        x = torch.randn(n, length, dim).to(dtype)
        _check_against_reference(x, rng.uniform(0.05, 0.95), torch.rand(n, length).to(noise_dtype))


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_ties_go_to_lower_index_and_nan_sorts_last(backend, backend_name):
    backend(backend_name)
    noise = torch.randint(0, 4, (4, 97)).float()
    noise[1, ::7] = float("nan")
    _check_against_reference(torch.randn(4, 97, 12), 0.75, noise)
    _, _, ids_restore = ops.random_masking(torch.randn(1, 5, 2), 0.6, torch.zeros(1, 5))
    assert ids_restore.tolist() == [[0, 1, 2, 3, 4]]


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_long_rows(backend, backend_name):
    """Rows longer than 1024 entries, with ties and NaNs across the whole row."""
    backend(backend_name)
    noise = torch.randint(0, 300, (2, 1030)).float()
    noise[0, 5::11] = float("nan")
    _check_against_reference(torch.randn(2, 1030, 3), 0.75, noise)


def _assert_valid_masking(x, outputs, num_keep):
    """A masking of x by some noise: a permutation, num_keep kept, consistent outputs."""
    x_masked, mask, ids_restore = outputs
    n, length, dim = x.shape
    assert x_masked.shape == (n, num_keep, dim)
    assert torch.equal(mask.sum(1), torch.full((n,), float(length - num_keep)))
    assert torch.equal(ids_restore.sort(1).values, torch.arange(length).expand(n, -1))
    kept = ids_restore < num_keep
    assert torch.equal(kept, mask == 0)
    # Every kept row of x appears in x_masked at its rank.
    at_rank = ids_restore.clamp(max=num_keep - 1).unsqueeze(-1).expand(-1, -1, dim)
    assert torch.equal(torch.gather(x_masked, 1, at_rank)[kept], x[kept])


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_drawn_noise_gives_a_valid_reproducible_masking(backend, backend_name):
    backend(backend_name)
    x = torch.randn(3, 196, 16, requires_grad=True)
    torch.manual_seed(7)
    outputs = ops.random_masking(x, 0.75)
    _assert_valid_masking(x.detach(), outputs, 49)
    torch.manual_seed(7)
    assert all(torch.equal(a, b) for a, b in zip(ops.random_masking(x, 0.75), outputs))
    assert not torch.equal(ops.random_masking(x, 0.75)[2], outputs[2])
    # The gradient of the drawn masking matches the reference given the same permutation.
    grad = torch.randn_like(outputs[0])
    outputs[0].backward(grad)
    kept = outputs[2] < 49
    expected = torch.zeros_like(x)
    expected[kept] = torch.gather(grad, 1, outputs[2].clamp(max=48).unsqueeze(-1)
                                  .expand(-1, -1, 16))[kept]
    assert torch.equal(x.grad, expected)


@requires_ext
def test_opcheck_compiled_op():
    for length in (1, 50, 197):
        x = torch.randn(3, length, 8, requires_grad=True)
        torch.library.opcheck(torch.ops.usfmae.random_masking.default,
                              (x, torch.rand(3, length), max(length // 4, 1)))
    torch.library.opcheck(torch.ops.usfmae.random_masking_backward.default,
                          (torch.randn(2, 12, 5), torch.randperm(50).expand(2, -1).contiguous()))


@requires_triton
def test_opcheck_triton_ops():
    def randn(*shape):
        return torch.randn(*shape, device=TRITON_DEVICE)

    for length in (1, 50, 97):
        x = randn(3, length, 8).requires_grad_(True)
        noise = torch.rand(3, length, device=TRITON_DEVICE)
        torch.library.opcheck(torch.ops.usfmae.random_masking_triton.default,
                              (x, noise, None, max(length // 4, 1)))
    seed = torch.tensor(123, device=TRITON_DEVICE)
    torch.library.opcheck(torch.ops.usfmae.random_masking_triton.default, (x, None, seed, 40))
    ids_restore = torch.randperm(50, device=TRITON_DEVICE).expand(2, -1).contiguous()
    torch.library.opcheck(torch.ops.usfmae.random_masking_triton_backward.default,
                          (randn(2, 12, 5), ids_restore))


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_torch_compile_matches_eager(backend, backend_name):
    backend(backend_name)
    x, noise = torch.randn(2, 50, 24), torch.rand(2, 50)

    def f(inp):
        x_masked, mask, ids_restore = ops.random_masking(inp, 0.75, noise)
        return (x_masked * 2).sum(-1), mask, ids_restore

    compiled = torch.compile(f, fullgraph=True)
    (sums, mask, ids_restore), (sums_c, mask_c, ids_c) = f(x), compiled(x)
    torch.testing.assert_close(sums_c, sums)  # inductor may reorder the fp32 sum
    assert torch.equal(mask_c, mask) and torch.equal(ids_c, ids_restore)


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_torch_compile_draws_noise(backend, backend_name):
    backend(backend_name)
    x = torch.randn(2, 50, 8)
    compiled = torch.compile(lambda inp: ops.random_masking(inp, 0.75), fullgraph=True)
    _assert_valid_masking(x, compiled(x), 12)


@pytest.mark.parametrize("call, exc, name", [
    (lambda: ops.random_masking([[1.0]], 0.5), TypeError, "x"),
    (lambda: ops.random_masking(torch.randn(4, 5), 0.5), ValueError, "x"),
    (lambda: ops.random_masking(torch.ones(2, 4, 3, dtype=torch.int64), 0.5), TypeError, "x"),
    (lambda: ops.random_masking(torch.randn(2, 4, 3), 0.0), ValueError, "mask_ratio"),
    (lambda: ops.random_masking(torch.randn(2, 4, 3), 1.0), ValueError, "mask_ratio"),
    (lambda: ops.random_masking(torch.randn(2, 4, 3), -0.2), ValueError, "mask_ratio"),
    (lambda: ops.random_masking(torch.randn(2, 4, 3), "0.5"), ValueError, "mask_ratio"),
    (lambda: ops.random_masking(torch.randn(2, 4, 3), 0.5, torch.rand(2, 5)), ValueError, "noise"),
    (lambda: ops.random_masking(torch.randn(2, 4, 3), 0.5, torch.rand(2, 4, device="meta")),
     ValueError, "noise"),
    (lambda: ops.random_masking(torch.randn(2, 3, 4).transpose(1, 2), 0.5), ValueError, "x"),
    (lambda: ops.random_masking(torch.randn(2, 4, 3), 0.5, torch.ones(2, 4, dtype=torch.int32)),
     TypeError, "noise"),
])
def test_bad_input_names_the_argument(call, exc, name):
    with pytest.raises(exc, match=rf"\b{name}\b"):
        call()


@requires_ext
@pytest.mark.parametrize("args, name", [
    ((torch.randn(4, 5), torch.rand(4, 5), 2), "x"),
    ((torch.randn(2, 5, 3), torch.rand(2, 6), 2), "noise"),
    ((torch.randn(2, 5, 3), torch.rand(2, 5), 6), "num_keep"),
    ((torch.randn(2, 5, 3).transpose(0, 1).contiguous().transpose(0, 1), torch.rand(2, 5), 2), "x"),
])
def test_compiled_op_rejects_bad_input(args, name):
    with pytest.raises(RuntimeError, match=rf"\b{name}\b"):
        torch.ops.usfmae.random_masking(*args)


@requires_triton
@pytest.mark.parametrize("make_args, name", [
    (lambda d: (torch.randn(4, 5, device=d), torch.rand(4, 5, device=d), None, 2), "x"),
    (lambda d: (torch.randn(2, 5, 3, device=d), torch.rand(2, 6, device=d), None, 2), "noise"),
    (lambda d: (torch.randn(2, 5, 3, device=d), torch.rand(2, 5, device=d), None, 6), "num_keep"),
    (lambda d: (torch.randn(2, 5, 3, device=d), None, None, 2), "seed"),
    (lambda d: (torch.randn(5, 2, 3, device=d).transpose(0, 1), torch.rand(2, 5, device=d), None,
                2), "x"),
])
def test_triton_op_rejects_bad_input(make_args, name):
    with pytest.raises(ValueError, match=rf"\b{name}\b"):
        torch.ops.usfmae.random_masking_triton(*make_args(TRITON_DEVICE))


@requires_triton
@pytest.mark.parametrize("ids_restore", [torch.zeros(2, 5), torch.zeros(3, 5, dtype=torch.int64)])
def test_triton_backward_rejects_bad_ids(ids_restore):
    with pytest.raises((TypeError, ValueError), match="ids_restore"):
        torch.ops.usfmae.random_masking_triton_backward(torch.randn(2, 3, 4, device=TRITON_DEVICE),
                                                        ids_restore.to(TRITON_DEVICE))


@requires_ext
def test_compiled_backward_rejects_bad_ids():
    with pytest.raises(RuntimeError, match="ids_restore"):
        torch.ops.usfmae.random_masking_backward(torch.randn(2, 3, 4), torch.zeros(2, 5))


@requires_cuda
@pytest.mark.parametrize("length", LENGTHS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_cuda_backends_match_reference(backend, length, dtype):
    for name in usable_backends("random_masking", "cuda"):
        backend(name)
        x = torch.randn(3, length, 96, device="cuda").to(dtype)
        noise = torch.randint(0, 8, (3, length), device="cuda").float()  # ties on purpose
        _check_against_reference(x, 0.75, noise)
        _check_against_reference(x, 0.6, torch.rand(3, length, device="cuda"))


# Drawn noise: every row its own uniform masking. Kept-count statistic for N rows of L patches
# keeping K each (p = K / L): one row's keep indicators have variance p (1 - p) and covariance
# -p (1 - p) / (L - 1), so sum_l (c_l - N p)^2 / (N p (1 - p) L / (L - 1)) over the keep counts
# c_l is chi-square with L - 1 degrees of freedom when the positions are uniform.
DRAWN_ROWS, DRAWN_LENGTH, DRAWN_KEEP = 128, 49, 12  # mask ratio 0.75 on a 7 x 7 grid
CHI2_48_CRITICAL = 84.04  # scipy.stats.chi2.ppf(0.999, 48): a 1-in-1000 false alarm


def _drawn_keep_indicators(device):
    torch.manual_seed(0)
    x = torch.zeros(DRAWN_ROWS, DRAWN_LENGTH, 1, device=device)
    _, mask, ids_restore = ops.random_masking(x, 0.75)
    kept = (mask == 0).cpu()
    assert torch.equal(kept, (ids_restore < DRAWN_KEEP).cpu())
    assert torch.equal(kept.sum(1), torch.full((DRAWN_ROWS,), DRAWN_KEEP))
    return kept


def _assert_rows_independent_and_uniform(kept):
    n, length = kept.shape
    p = DRAWN_KEEP / length
    # Different rows, different masks: two equal 12-of-49 subsets have probability 1 / C(49, 12).
    assert len({tuple(row.tolist()) for row in kept}) == n, "rows share a mask"
    counts = kept.sum(0).double()
    statistic = ((counts - n * p) ** 2).sum() / (n * p * (1 - p) * length / (length - 1))
    assert statistic < CHI2_48_CRITICAL, f"kept positions not uniform: chi2 = {statistic:.1f}"
    # Rows drawn from overlapping random streams (row r + 1 = row r shifted) keep shifted copies
    # of each other. For independent rows the overlap of row r with row r + 1 rolled by s is
    # hypergeometric (L, K, K) for every s; the N - 1 adjacent pairs are independent.
    mean = DRAWN_KEEP * p
    var = DRAWN_KEEP * p * (1 - p) * (length - DRAWN_KEEP) / (length - 1)
    for shift in range(length):
        overlap = (kept[:-1] & kept[1:].roll(shift, dims=1)).sum().item()
        z = (overlap - (n - 1) * mean) / ((n - 1) * var) ** 0.5
        assert abs(z) < 5, f"adjacent rows correlated at shift {shift}: z = {z:.1f}"


@pytest.mark.parametrize("backend_name", CPU_BACKENDS)
def test_drawn_masks_differ_per_row_and_are_uniform(backend, backend_name):
    backend(backend_name)
    _assert_rows_independent_and_uniform(_drawn_keep_indicators("cpu"))


@requires_cuda
def test_drawn_masks_differ_per_row_and_are_uniform_on_cuda(backend):
    for name in usable_backends("random_masking", "cuda"):
        backend(name)
        _assert_rows_independent_and_uniform(_drawn_keep_indicators("cuda"))
