"""Paired comparisons of two classifiers scored on the same images.

* :func:`delong` -- DeLong, DeLong & Clarke-Pearson (1988) test for two correlated ROC curves,
  with the fast midrank algorithm of Sun & Xu (2014); ties count one half (midranks).
* :func:`compare_auc` -- the AUC difference with a paired bootstrap percentile interval that
  resamples patients (``groups``) with replacement when given -- a clustered bootstrap -- and
  images otherwise, plus DeLong's p-value.
* :func:`mcnemar` -- McNemar's test for the two classifiers' accuracies on the same images.

Conventions follow :mod:`usfmae_fast.finetune.metrics`: ``y_true`` holds class indices
``0 .. K-1``; scores are either one score per image (binary, positive class 1) or
probabilities ``[N, K]`` (binary: column 1 is the positive class's score; ``K >= 3``:
one-vs-rest macro AUC).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
from scipy import stats as _sps

from .metrics import (bootstrap_weights, checked_bootstrap_args, percentile_interval,
                      resampling_units, weighted_auc)

__all__ = ["AUCComparison", "DeLongResult", "McNemarResult", "compare_auc", "delong", "mcnemar"]


class DeLongResult(NamedTuple):
    auc_a: float
    auc_b: float
    var_a: float         # DeLong variance of auc_a
    var_b: float
    cov_ab: float        # DeLong covariance of auc_a and auc_b
    z: float             # (auc_a - auc_b) / sd(difference); nan when the sd is 0
    p_value: float       # two-sided; 1.0 when the difference and its sd are both 0


class AUCComparison(NamedTuple):
    auc_a: float
    auc_b: float
    difference: float            # auc_a - auc_b
    ci: tuple[float, float]      # paired bootstrap percentile interval of the difference
    level: float
    p_value: float               # DeLong
    n: int                       # images
    n_groups: int                # resampling units: patients when groups given, else images
    n_boot: int                  # resamples drawn
    n_boot_valid: int            # resamples with every class present (the others are dropped)


class McNemarResult(NamedTuple):
    b: int               # a right, b wrong
    c: int               # a wrong, b right
    statistic: float     # exact: b; chi-square: (|b - c| - 1)^2 / (b + c)
    p_value: float
    exact: bool


# ---------------------------------------------------------------------------------------------
# input checks

def _check_inputs(y_true, score_a, score_b, names=("y_true", "score_a", "score_b")):
    """``(y, Sa, Sb, K)``: labels [N] int64 and per-class one-vs-rest scores [K', N] where K' is
    1 for binary tasks (the positive class's score) and K otherwise."""
    y = np.asarray(y_true)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"{names[0]}: expected a non-empty 1-D array of class indices, "
                         f"got shape {y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or np.issubdtype(y.dtype, np.bool_)):
        if not (np.issubdtype(y.dtype, np.floating) and np.all(np.isfinite(y))
                and np.all(y == np.round(y))):
            raise ValueError(f"{names[0]}: expected integer class indices, got dtype {y.dtype}")
    y = y.astype(np.int64)
    if y.min() < 0:
        raise ValueError(f"{names[0]}: class indices must be >= 0, got {y.min()}")
    out = []
    for name, s in zip(names[1:], (score_a, score_b)):
        s = np.asarray(s, dtype=np.float64)
        if s.ndim not in (1, 2) or s.shape[0] != len(y):
            raise ValueError(f"{name}: expected [{len(y)}] or [{len(y)}, K] scores matching "
                             f"{names[0]} ({len(y)} labels), got shape {s.shape}")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"{name}: contains NaN or infinite values "
                             f"({int(np.sum(~np.isfinite(s)))} of {s.size})")
        out.append(s)
    sa, sb = out
    if sa.shape != sb.shape:
        raise ValueError(f"{names[2]}: shape {sb.shape} differs from {names[1]}'s {sa.shape}")
    k = 2 if sa.ndim == 1 else sa.shape[1]
    if k < 2:
        raise ValueError(f"{names[1]}: expected at least 2 classes (columns), got {k}")
    if y.max() >= k:
        raise ValueError(f"{names[0]}: class index {y.max()} out of range for {k} classes "
                         f"(scores of shape {sa.shape})")
    present = np.bincount(y, minlength=k)
    if np.any(present == 0):
        raise ValueError(f"{names[0]}: every class needs at least one image for an AUC; "
                         f"missing class(es) {np.flatnonzero(present == 0).tolist()} "
                         f"(counts {present.tolist()})")
    if sa.ndim == 1:
        return y, sa[None], sb[None], 2
    if k == 2:
        return y, sa[None, :, 1], sb[None, :, 1], 2
    return y, sa.T.copy(), sb.T.copy(), k


def _positives(y, k, n_cols):
    """[n_cols, N] boolean: images of the positive class of each one-vs-rest column."""
    if n_cols == 1:
        return (y == 1)[None]
    return y[None] == np.arange(k)[:, None]


# ---------------------------------------------------------------------------------------------
# DeLong

def _structural_components(scores: np.ndarray, positive: np.ndarray):
    """Sun & Xu's fast DeLong for the rows of ``scores`` [R, N] against one split ``positive``:
    ``(auc [R], v10 [R, m], v01 [R, n])``."""
    x, yneg = scores[:, positive], scores[:, ~positive]
    m, n = x.shape[1], yneg.shape[1]
    tx = _sps.rankdata(x, axis=1)
    ty = _sps.rankdata(yneg, axis=1)
    tz = _sps.rankdata(np.concatenate([x, yneg], axis=1), axis=1)
    auc = (tz[:, :m].sum(axis=1) - m * (m + 1) / 2) / (m * n)
    v10 = (tz[:, :m] - tx) / n
    v01 = 1.0 - (tz[:, m:] - ty) / m
    return auc, v10, v01


def _delong_cov(y, sa, sb, k):
    """AUCs [2, C] (rows: model a, b; columns: one-vs-rest classes) and the DeLong covariance
    of their flattening [2C, 2C]."""
    pos = _positives(y, k, sa.shape[0])
    n_img = len(y)
    c = pos.shape[0]
    aucs = np.empty((2, c))
    # per-image centred structural components, scaled so that psi @ psi.T is DeLong's covariance
    psi = np.zeros((2, c, n_img))
    for j in range(c):
        p = pos[j]
        m, n = int(p.sum()), int((~p).sum())
        if m < 2 or n < 2:
            raise ValueError(f"y_true: DeLong needs at least 2 positive and 2 negative images "
                             f"per class, class {j if c > 1 else 1} has {m} and {n}")
        auc, v10, v01 = _structural_components(np.stack([sa[j], sb[j]]), p)
        aucs[:, j] = auc
        psi[:, j, p] = (v10 - auc[:, None]) / math.sqrt(m * (m - 1))
        psi[:, j, ~p] = (v01 - auc[:, None]) / math.sqrt(n * (n - 1))
    flat = psi.reshape(2 * c, n_img)
    return aucs, flat @ flat.T


def delong(y_true, score_a, score_b) -> DeLongResult:
    """DeLong's test for the difference of two correlated AUCs on the same images.

    Binary (``score_*`` of shape [N], or [N, 2] whose column 1 is the positive class):
    the classical test -- AUCs equal :func:`sklearn.metrics.roc_auc_score`, the covariance is
    ``S10 / m + S01 / n`` from the structural components (midranks, Sun & Xu 2014).

    Multi-class (``[N, K]``, ``K >= 3``): the AUCs are one-vs-rest macro averages (as
    ``roc_auc_score(..., multi_class="ovr", average="macro")``) and the tested difference is the
    mean of the per-class differences. Its variance is that of the mean under the joint
    covariance of all 2K per-class AUCs: each image's centred structural component in class k
    (``V10`` where it is of class k, ``V01`` otherwise), scaled by ``1/sqrt(m_k (m_k - 1))``
    resp. ``1/sqrt(n_k (n_k - 1))``, so that the cross products over images give DeLong's
    per-class variances exactly on the diagonal and the between-class covariances off it.
    ``var_a``, ``var_b`` and ``cov_ab`` are those of the two macro AUCs.
    """
    y, sa, sb, k = _check_inputs(y_true, score_a, score_b)
    aucs, cov = _delong_cov(y, sa, sb, k)
    c = aucs.shape[1]
    wa = np.concatenate([np.full(c, 1 / c), np.zeros(c)])
    wb = np.concatenate([np.zeros(c), np.full(c, 1 / c)])
    var_a, var_b, cov_ab = float(wa @ cov @ wa), float(wb @ cov @ wb), float(wa @ cov @ wb)
    auc_a, auc_b = float(aucs[0].mean()), float(aucs[1].mean())
    diff = auc_a - auc_b
    var_d = max(var_a + var_b - 2 * cov_ab, 0.0)
    if var_d > 0:
        z = diff / math.sqrt(var_d)
        p = float(2 * _sps.norm.sf(abs(z)))
    else:
        z = math.nan if diff == 0 else math.copysign(math.inf, diff)
        p = 1.0 if diff == 0 else 0.0
    return DeLongResult(auc_a, auc_b, var_a, var_b, cov_ab, float(z), p)


# ---------------------------------------------------------------------------------------------
# bootstrap

def _bootstrap_differences(y, sa, sb, k, unit_of, n_boot, seed):
    """Paired bootstrap AUC differences [n_boot] (NaN where a resample misses a class): the
    resamples of :func:`~usfmae_fast.finetune.metrics.bootstrap_weights` (patients, in
    ``np.unique`` order of ``groups``; or images); both models are scored on the same
    resample."""
    pos = _positives(y, k, sa.shape[0])
    parts = []
    for weights in bootstrap_weights(unit_of, n_boot, seed, max_values=1_000_000):
        auc_a = np.mean([weighted_auc(sa[j], pos[j], weights) for j in range(len(pos))], 0)
        auc_b = np.mean([weighted_auc(sb[j], pos[j], weights) for j in range(len(pos))], 0)
        parts.append(auc_a - auc_b)
    return np.concatenate(parts)


def compare_auc(y_true, prob_a, prob_b, groups=None, *, n_boot: int = 2000,
                level: float = 0.95, seed: int = 0) -> AUCComparison:
    """Compare two classifiers' AUCs on the same images.

    ``difference = auc_a - auc_b``; ``ci`` is the percentile interval of the paired bootstrap
    difference (both models scored on each resample). With ``groups`` (a patient id per image)
    the bootstrap resamples patients with replacement and keeps all their images -- a clustered
    bootstrap, needed when a patient contributes several correlated images; otherwise images.
    Resamples missing a class are dropped (``n_boot_valid`` counts the rest).
    ``p_value`` is DeLong's (:func:`delong`; it treats images as independent, so with
    several images per patient trust the clustered interval over it). DeLong needs at least
    two positive and two negative images per (one-vs-rest) class.

    Multi-class (``[N, K]``, ``K >= 3``): one-vs-rest macro AUC for both the bootstrap and
    DeLong, whose statistic is the mean of the per-class differences with the variance of that
    mean from the joint per-class covariance (see :func:`delong`).
    """
    y, sa, sb, k = _check_inputs(y_true, prob_a, prob_b, ("y_true", "prob_a", "prob_b"))
    checked_bootstrap_args(n_boot, level)
    unit_of = resampling_units(groups, len(y))
    dl = delong(y, prob_a, prob_b)
    diffs = _bootstrap_differences(y, sa, sb, k, unit_of, int(n_boot), seed)
    valid = diffs[np.isfinite(diffs)]
    if len(valid) == 0:
        raise ValueError("groups: no bootstrap resample contained every class; too few patients")
    lo, hi = percentile_interval(valid, level)
    return AUCComparison(dl.auc_a, dl.auc_b, dl.auc_a - dl.auc_b, (lo, hi),
                         float(level), dl.p_value, len(y), int(unit_of.max()) + 1, int(n_boot),
                         len(valid))


# ---------------------------------------------------------------------------------------------
# McNemar

def mcnemar(y_true, pred_a, pred_b, *, exact: bool | None = None) -> McNemarResult:
    """McNemar's test of equal accuracy of two classifiers' predictions on the same images.

    ``b`` = images a gets right and b wrong, ``c`` = the reverse. Exact (two-sided binomial
    test of b ~ Bin(b + c, 1/2)) when ``exact`` is True, or None and ``b + c < 25``; otherwise
    the chi-square statistic with continuity correction ``(|b - c| - 1)^2 / (b + c)`` on 1
    degree of freedom. ``b + c == 0`` gives statistic 0 and p = 1.
    """
    y = np.asarray(y_true)
    pa, pb = np.asarray(pred_a), np.asarray(pred_b)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"y_true: expected a non-empty 1-D array of labels, got shape {y.shape}")
    for name, p in (("pred_a", pa), ("pred_b", pb)):
        if p.shape != y.shape:
            raise ValueError(f"{name}: expected {len(y)} predictions matching y_true, "
                             f"got shape {p.shape}")
        if p.dtype.kind == "f" and np.any(np.isnan(p)):
            raise ValueError(f"{name}: contains NaN predictions")
    ra, rb = pa == y, pb == y
    b, c = int(np.sum(ra & ~rb)), int(np.sum(~ra & rb))
    use_exact = (b + c < 25) if exact is None else bool(exact)
    if b + c == 0:
        return McNemarResult(b, c, 0.0, 1.0, use_exact)
    if use_exact:
        return McNemarResult(b, c, float(b), float(_sps.binomtest(b, b + c, 0.5).pvalue), True)
    stat = (abs(b - c) - 1) ** 2 / (b + c)
    return McNemarResult(b, c, float(stat), float(_sps.chi2.sf(stat, 1)), False)
