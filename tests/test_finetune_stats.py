"""usfmae_fast.finetune.stats against independent references: DeLong against a slow textbook
implementation (structural components by explicit double loops), the clustered bootstrap against
a brute-force resampling of patients scored by sklearn, McNemar against scipy / statsmodels."""
import math
import time

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import roc_auc_score

from usfmae_fast.finetune import compare_auc, delong, mcnemar


# ---------------------------------------------------------------------------------------------
# the textbook reference: DeLong et al. 1988, structural components by double loops

def _psi(x, y):
    return 1.0 if x > y else 0.5 if x == y else 0.0


def _textbook_components(score, pos):
    xs, ys = [s for s, p in zip(score, pos) if p], [s for s, p in zip(score, pos) if not p]
    m, n = len(xs), len(ys)
    v10 = [sum(_psi(x, y) for y in ys) / n for x in xs]
    v01 = [sum(_psi(x, y) for x in xs) / m for y in ys]
    return sum(v10) / m, np.array(v10), np.array(v01)


def _textbook_delong(y, sa, sb):
    pos = np.asarray(y) == 1
    m, n = pos.sum(), (~pos).sum()
    auc_a, a10, a01 = _textbook_components(sa, pos)
    auc_b, b10, b01 = _textbook_components(sb, pos)
    s10 = np.zeros((2, 2))
    s01 = np.zeros((2, 2))
    for r, (v10r, ar) in enumerate(((a10, auc_a), (b10, auc_b))):
        for s, (v10s, as_) in enumerate(((a10, auc_a), (b10, auc_b))):
            s10[r, s] = sum((v10r[i] - ar) * (v10s[i] - as_) for i in range(m)) / (m - 1)
    for r, (v01r, ar) in enumerate(((a01, auc_a), (b01, auc_b))):
        for s, (v01s, as_) in enumerate(((a01, auc_a), (b01, auc_b))):
            s01[r, s] = sum((v01r[j] - ar) * (v01s[j] - as_) for j in range(n)) / (n - 1)
    cov = s10 / m + s01 / n
    var_d = cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]
    z = (auc_a - auc_b) / math.sqrt(var_d)
    p = 2 * (1 - 0.5 * (1 + math.erf(abs(z) / math.sqrt(2))))
    return auc_a, auc_b, cov, z, p


def _tied_scores(rng, n, k=None):
    """Scores rounded to one decimal (many ties), correlated with the label."""
    y = rng.integers(0, 2 if k is None else k, n)
    shape = (n,) if k is None else (n, k)
    base = rng.normal(size=shape)
    if k is None:
        a = np.round(base + 0.8 * y, 1)
        b = np.round(0.6 * base + rng.normal(size=n) + 0.5 * y, 1)
    else:
        a = np.round(base + np.eye(k)[y], 1)
        b = np.round(0.6 * base + rng.normal(size=shape) + 0.7 * np.eye(k)[y], 1)
    return y, a, b


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_delong_equals_textbook_and_sklearn(seed):
    rng = np.random.default_rng(seed)
    y, a, b = _tied_scores(rng, 120)
    assert len(np.unique(a)) < 80                                    # ties are present
    res = delong(y, a, b)
    auc_a, auc_b, cov, z, p = _textbook_delong(y, a, b)
    assert res.auc_a == pytest.approx(roc_auc_score(y, a), abs=1e-12)
    assert res.auc_b == pytest.approx(roc_auc_score(y, b), abs=1e-12)
    assert abs(res.auc_a - auc_a) < 1e-10 and abs(res.auc_b - auc_b) < 1e-10
    assert abs(res.var_a - cov[0, 0]) < 1e-10
    assert abs(res.var_b - cov[1, 1]) < 1e-10
    assert abs(res.cov_ab - cov[0, 1]) < 1e-10
    assert abs(res.z - z) < 1e-10
    assert abs(res.p_value - p) < 1e-10


def test_delong_binary_probabilities_use_column_one():
    rng = np.random.default_rng(3)
    y, a, b = _tied_scores(rng, 80)
    pa = np.stack([1 - a, a], axis=1)
    pb = np.stack([-b, b], axis=1)
    assert delong(y, pa, pb) == delong(y, a, b)


def test_delong_multiclass_diagonal_is_per_class_delong():
    rng = np.random.default_rng(4)
    k = 3
    y, a, b = _tied_scores(rng, 150, k)
    res = delong(y, a, b)
    assert res.auc_a == pytest.approx(np.mean([roc_auc_score(y == c, a[:, c]) for c in range(k)]),
                                      abs=1e-12)
    # the per-class AUCs / variances equal the binary test on each one-vs-rest split
    from usfmae_fast.finetune.stats import _check_inputs, _delong_cov
    yy, sa, sb, kk = _check_inputs(y, a, b)
    aucs, cov = _delong_cov(yy, sa, sb, kk)
    for c in range(k):
        ref = _textbook_delong((y == c).astype(int), a[:, c], b[:, c])
        assert abs(aucs[0, c] - ref[0]) < 1e-10 and abs(aucs[1, c] - ref[1]) < 1e-10
        assert abs(cov[c, c] - ref[2][0, 0]) < 1e-10
        assert abs(cov[k + c, k + c] - ref[2][1, 1]) < 1e-10
        assert abs(cov[c, k + c] - ref[2][0, 1]) < 1e-10
    # the macro difference's variance: the mean's variance under the joint covariance
    w = np.r_[np.full(k, 1 / k), np.full(k, -1 / k)]
    var_d = w @ cov @ w
    assert res.var_a + res.var_b - 2 * res.cov_ab == pytest.approx(var_d, rel=1e-12)
    assert res.z == pytest.approx((res.auc_a - res.auc_b) / math.sqrt(var_d), rel=1e-12)
    assert np.all(np.linalg.eigvalsh(cov) > -1e-12)                  # a covariance matrix


def test_delong_identical_models():
    rng = np.random.default_rng(5)
    y, a, _ = _tied_scores(rng, 50)
    res = delong(y, a, a)
    assert res.p_value == 1.0 and res.auc_a == res.auc_b


# ---------------------------------------------------------------------------------------------
# bootstrap

def _brute_force_diffs(y, a, b, groups, n_boot, seed):
    ids, unit_of = np.unique(groups, return_inverse=True)
    rng = np.random.default_rng(seed)
    draws = rng.integers(0, len(ids), size=(n_boot, len(ids)))
    out = []
    members = [np.flatnonzero(unit_of == u) for u in range(len(ids))]
    for row in draws:
        idx = np.concatenate([members[u] for u in row])
        if len(np.unique(y[idx])) < 2:
            out.append(np.nan)
            continue
        if a.ndim == 1:
            out.append(roc_auc_score(y[idx], a[idx]) - roc_auc_score(y[idx], b[idx]))
        else:
            out.append(roc_auc_score(y[idx], a[idx], multi_class="ovr")
                       - roc_auc_score(y[idx], b[idx], multi_class="ovr"))
    return np.array(out)


def _patients(rng, n_patients, per_patient, k=None):
    groups = np.repeat(np.arange(n_patients) * 7 + 3, per_patient)    # non-contiguous ids
    rng.shuffle(groups)
    y_pat = rng.integers(0, 2 if k is None else k, n_patients)
    _, unit = np.unique(groups, return_inverse=True)
    y = y_pat[unit]
    if k is None:
        a = np.round(rng.normal(size=len(y)) + y, 1)
        b = np.round(rng.normal(size=len(y)) + 0.5 * y, 1)
    else:
        a = rng.random((len(y), k)) + np.eye(k)[y]
        b = rng.random((len(y), k)) + 0.5 * np.eye(k)[y]
        a /= a.sum(1, keepdims=True)
        b /= b.sum(1, keepdims=True)
    return y, a, b, groups


@pytest.mark.parametrize("k", [None, 3])
def test_clustered_bootstrap_equals_brute_force(k):
    from usfmae_fast.finetune.stats import _bootstrap_differences, _check_inputs
    rng = np.random.default_rng(6)
    y, a, b, groups = _patients(rng, 25, 3, k)
    n_boot, seed = 200, 11
    yy, sa, sb, kk = _check_inputs(y, a, b)
    _, unit_of = np.unique(groups, return_inverse=True)
    ours = _bootstrap_differences(yy, sa, sb, kk, unit_of, n_boot, seed)
    ref = _brute_force_diffs(y, a, b, groups, n_boot, seed)
    assert np.array_equal(np.isnan(ours), np.isnan(ref))
    np.testing.assert_allclose(ours[~np.isnan(ours)], ref[~np.isnan(ref)], atol=1e-12)
    res = compare_auc(y, a, b, groups, n_boot=n_boot, seed=seed)
    valid = ref[~np.isnan(ref)]
    assert res.ci == pytest.approx(tuple(np.quantile(valid, [0.025, 0.975])), abs=1e-12)
    assert res.n == len(y) and res.n_groups == 25 and res.n_boot_valid == len(valid)
    assert res.difference == pytest.approx(res.auc_a - res.auc_b)


def test_image_bootstrap_equals_brute_force():
    rng = np.random.default_rng(7)
    y, a, b = _tied_scores(rng, 60)
    res = compare_auc(y, a, b, n_boot=300, seed=2)
    ref = _brute_force_diffs(y, a, b, np.arange(len(y)), 300, 2)
    valid = ref[~np.isnan(ref)]
    assert res.ci == pytest.approx(tuple(np.quantile(valid, [0.025, 0.975])), abs=1e-12)
    assert res.n_groups == len(y)
    assert res.p_value == delong(y, a, b).p_value


def test_clustered_interval_is_wider_for_correlated_images():
    rng = np.random.default_rng(8)
    n_pat, per = 40, 10
    y_pat = np.repeat([0, 1], n_pat // 2)
    groups = np.repeat(np.arange(n_pat), per)
    y = y_pat[groups]
    # a patient effect shared by all its images, different for the two models
    pa = rng.normal(size=n_pat) * 1.5
    pb = rng.normal(size=n_pat) * 1.5
    a = y + pa[groups] + 0.1 * rng.normal(size=len(y))
    b = y + pb[groups] + 0.1 * rng.normal(size=len(y))
    clustered = compare_auc(y, a, b, groups, n_boot=1000)
    images = compare_auc(y, a, b, n_boot=1000)
    w_c = clustered.ci[1] - clustered.ci[0]
    w_i = images.ci[1] - images.ci[0]
    assert w_c > 2 * w_i, (w_c, w_i)
    assert clustered.difference == images.difference


def test_bootstrap_speed():
    rng = np.random.default_rng(9)
    y, a, b = _tied_scores(rng, 500)
    a = a + 1e-3 * rng.normal(size=500)
    compare_auc(y, a, b, n_boot=50)
    t = time.perf_counter()
    compare_auc(y, a, b, n_boot=2000)
    assert time.perf_counter() - t < 2.0


# ---------------------------------------------------------------------------------------------
# McNemar

def _mcnemar_case(rng, n, flip_a, flip_b):
    y = rng.integers(0, 3, n)
    pa = np.where(rng.random(n) < flip_a, (y + 1) % 3, y)
    pb = np.where(rng.random(n) < flip_b, (y + 2) % 3, y)
    return y, pa, pb


def test_mcnemar_exact_and_chi2():
    rng = np.random.default_rng(10)
    y, pa, pb = _mcnemar_case(rng, 60, 0.1, 0.2)
    b = int(np.sum((pa == y) & (pb != y)))
    c = int(np.sum((pa != y) & (pb == y)))
    assert b + c < 25
    res = mcnemar(y, pa, pb)
    assert (res.b, res.c, res.exact) == (b, c, True)
    assert res.p_value == pytest.approx(sps.binomtest(b, b + c, 0.5).pvalue, abs=1e-12)
    # by hand: two-sided exact = min(1, 2 * P(X <= min(b, c)))
    tail = sum(math.comb(b + c, i) for i in range(min(b, c) + 1)) / 2 ** (b + c)
    assert res.p_value == pytest.approx(min(1.0, 2 * tail), abs=1e-12)

    y, pa, pb = _mcnemar_case(rng, 400, 0.1, 0.2)
    res = mcnemar(y, pa, pb)
    b, c = res.b, res.c
    assert b + c >= 25 and not res.exact
    stat = (abs(b - c) - 1) ** 2 / (b + c)
    assert res.statistic == pytest.approx(stat, abs=1e-12)
    assert res.p_value == pytest.approx(math.erfc(math.sqrt(stat / 2)), abs=1e-12)  # chi2 1 df
    assert mcnemar(y, pa, pb, exact=True).p_value == pytest.approx(
        sps.binomtest(b, b + c, 0.5).pvalue, abs=1e-12)
    assert mcnemar(y, pa, pa) == (0, 0, 0.0, 1.0, True)


def test_mcnemar_against_statsmodels():
    sm = pytest.importorskip("statsmodels.stats.contingency_tables")
    rng = np.random.default_rng(11)
    for n, exact in ((60, True), (400, False)):
        y, pa, pb = _mcnemar_case(rng, n, 0.1, 0.2)
        ra, rb = pa == y, pb == y
        table = [[np.sum(ra & rb), np.sum(ra & ~rb)], [np.sum(~ra & rb), np.sum(~ra & ~rb)]]
        ref = sm.mcnemar(table, exact=exact, correction=True)
        res = mcnemar(y, pa, pb, exact=exact)
        assert res.p_value == pytest.approx(ref.pvalue, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# bad input

@pytest.mark.parametrize("change, name", [
    (lambda y, a, b, g: (y[:-1], a, b, g), "prob_a: .* matching y_true"),
    (lambda y, a, b, g: (y, a[:-1], b, g), "prob_a:"),
    (lambda y, a, b, g: (y, a, b[:-1], g), "prob_b:"),
    (lambda y, a, b, g: (np.zeros_like(y), a, b, g), "y_true:"),
    (lambda y, a, b, g: (y, np.where(np.arange(len(a)) == 3, np.nan, a), b, g), "prob_a:"),
    (lambda y, a, b, g: (y, a, np.where(np.arange(len(b)) == 3, np.nan, b), g), "prob_b:"),
    (lambda y, a, b, g: (y, a, b, g[:-1]), "groups:"),
])
def test_compare_auc_bad_input_names_argument(change, name):
    rng = np.random.default_rng(12)
    y, a, b = _tied_scores(rng, 40)
    args = change(y, a, b, np.arange(40) // 2)
    with pytest.raises(ValueError, match=f"^{name}"):
        compare_auc(*args, n_boot=10)


def test_mcnemar_and_delong_bad_input():
    y = np.array([0, 1, 0, 1, 1, 0])
    with pytest.raises(ValueError, match="^pred_b:"):
        mcnemar(y, y, y[:-1])
    with pytest.raises(ValueError, match="^pred_a:"):
        mcnemar(y, np.where(y == 1, np.nan, 0.0), y)
    with pytest.raises(ValueError, match="^score_b:"):
        delong(y, np.ones(6), np.ones(5))
    with pytest.raises(ValueError, match="^y_true:"):
        delong(y, np.ones((6, 3)), np.ones((6, 3)))                  # class 2 has no image


@pytest.mark.parametrize("k", [None, 3])
def test_delong_null_rejection_rate(k):
    """Two equally good, correlated models: DeLong rejects about 5 % at the 5 % level -- a check
    of the multi-class variance (the mean of per-class differences with their covariance)."""
    rng = np.random.default_rng(13)
    n, sims, rejected = 120, 1500, 0
    for _ in range(sims):
        y = rng.integers(0, 2 if k is None else k, n)
        signal = y.astype(float) if k is None else np.eye(k)[y]
        shape = (n,) if k is None else (n, k)
        shared = rng.normal(size=shape)
        a = signal + shared + rng.normal(size=shape)
        b = signal + shared + rng.normal(size=shape)
        if k is not None:                                             # softmax probabilities
            a, b = (np.exp(s) / np.exp(s).sum(1, keepdims=True) for s in (a, b))
        rejected += delong(y, a, b).p_value < 0.05
    assert 0.033 < rejected / sims < 0.068, rejected / sims            # 5 % +- 3 sd
