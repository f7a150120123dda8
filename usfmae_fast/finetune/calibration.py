"""Operating points and calibration of a classifier's probabilities.

* :func:`choose_threshold` -- a binary decision threshold by Youden's J or a target sensitivity;
  choose it on validation predictions only, never on the test set it is reported on.
* :func:`operating_point` -- sensitivity, specificity, PPV, NPV and accuracy at a threshold,
  each with a bootstrap interval (patients resampled when ``groups`` is given).
* :func:`brier_score`, :func:`expected_calibration_error`, :func:`reliability_diagram` -- how
  far the probabilities are from the observed frequencies.
* :func:`fit_temperature`, :func:`apply_temperature` -- temperature scaling (Guo et al. 2017).

Decision rule everywhere: an image is called positive when its score is ``>= threshold``
(scikit-learn's ``roc_curve`` convention). Labels follow :mod:`usfmae_fast.finetune.metrics`:
class indices ``0 .. K-1``; binary ``score`` is the positive class's (index 1) probability.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
from scipy.optimize import minimize_scalar
from scipy.special import log_softmax, softmax
from sklearn.calibration import CalibrationDisplay
from sklearn.metrics import brier_score_loss, roc_curve

from ..runtime.figures import pyplot, save_figure
from .metrics import (bootstrap_weights, checked_bootstrap_args, checked_scores,
                      percentile_interval, resampling_units)

RULES = ("youden", "sensitivity")
OPERATING_METRICS = ("sensitivity", "specificity", "ppv", "npv", "accuracy")
_ROW_SUM_TOLERANCE = 1e-3   # softmax outputs stored in half precision sum to 1 within ~1e-3
_LOG_T_BOUNDS = (-3.0, 3.0)  # temperatures from 0.05 to 20


# ---------------------------------------------------------------------------------------------
# input checks

def _checked_binary(y_true, score) -> tuple[np.ndarray, np.ndarray]:
    """``(y_true, score)``: labels 0/1 [N] and finite scores [N]."""
    y, s = np.asarray(y_true), np.asarray(score, dtype=np.float64)
    if y.ndim != 1 or len(y) == 0:
        raise ValueError(f"y_true: expected a non-empty 1-D array of labels 0/1, got shape "
                         f"{y.shape}")
    if not (np.issubdtype(y.dtype, np.integer) or y.dtype == bool) or not np.isin(y, (0, 1)).all():
        raise ValueError(f"y_true: expected binary labels 0/1, got {y.dtype} values "
                         f"{np.unique(y)[:10].tolist()}")
    if s.shape != y.shape:
        raise ValueError(f"score: expected one positive-class score per label ({len(y)}), got "
                         f"shape {s.shape}")
    if not np.isfinite(s).all():
        raise ValueError(f"score: contains NaN or infinite values ({int((~np.isfinite(s)).sum())}"
                         f" of {s.size})")
    return y.astype(np.int64), s


def _checked_probability_rows(probs) -> np.ndarray:
    """``probs`` [N, C >= 2] as float64, each row probabilities in [0, 1] summing to 1."""
    probs = np.asarray(probs, dtype=np.float64)
    if probs.ndim != 2 or probs.shape[1] < 2 or len(probs) == 0:
        raise ValueError(f"probs: expected [N, C] class probabilities with C >= 2, got shape "
                         f"{probs.shape}")
    if not np.isfinite(probs).all() or probs.min() < 0 or probs.max() > 1:
        raise ValueError("probs: expected finite probabilities in [0, 1]")
    worst = np.abs(probs.sum(axis=1) - 1).max()
    if worst > _ROW_SUM_TOLERANCE:
        raise ValueError(f"probs: every row must sum to 1 (within {_ROW_SUM_TOLERANCE}); one is "
                         f"off by {worst:.3g}")
    return probs


def _checked_probs(y_true, probs) -> tuple[np.ndarray, np.ndarray]:
    probs = _checked_probability_rows(probs)
    return checked_scores(y_true, probs, range(probs.shape[1]))


# ---------------------------------------------------------------------------------------------
# operating points

def choose_threshold(y_true, score, *, rule: str = "youden",
                     target_sensitivity: float | None = None) -> float:
    """A decision threshold on ``score`` (call positive when ``score >= threshold``), chosen
    among the distinct scores (``roc_curve(..., drop_intermediate=False)``, without its
    ``inf``), from these inputs alone:

    * ``rule="youden"``: the threshold maximising Youden's J = sensitivity + specificity - 1;
      among tied maxima the highest threshold (fewest positive calls).
    * ``target_sensitivity=t`` in (0, 1] (``rule`` then reads ``"sensitivity"``; the default
      ``"youden"`` is overridden): the highest threshold whose sensitivity is ``>= t``, i.e. the
      best specificity that keeps that sensitivity.

    Needs both classes in ``y_true``. Choose it on validation predictions, never on test ones.
    """
    y, s = _checked_binary(y_true, score)
    if rule not in RULES:
        raise ValueError(f"rule: expected one of {RULES}, got {rule!r}")
    if target_sensitivity is None and rule == "sensitivity":
        raise ValueError("target_sensitivity: required by rule='sensitivity'")
    if target_sensitivity is not None and not 0.0 < target_sensitivity <= 1.0:
        raise ValueError(f"target_sensitivity: expected a value in (0, 1], got "
                         f"{target_sensitivity}")
    if np.unique(y).size < 2:
        raise ValueError(f"y_true: a threshold needs positive and negative images, got only "
                         f"class {int(y[0])}")
    fpr, tpr, thresholds = roc_curve(y, s, drop_intermediate=False)
    fpr, tpr, thresholds = fpr[1:], tpr[1:], thresholds[1:]     # drop the "call nothing" inf
    if target_sensitivity is not None:
        return float(thresholds[np.argmax(tpr >= target_sensitivity)])  # thresholds decrease
    youden = tpr - fpr
    # differences of count ratios: equal J values may differ in the last bit
    return float(thresholds[np.argmax(youden >= youden.max() - 1e-12)])


def _rates(counts: np.ndarray) -> dict[str, np.ndarray]:
    """:data:`OPERATING_METRICS` from confusion counts [..., 4] (tp, fp, tn, fn); NaN where a
    denominator is empty."""
    tp, fp, tn, fn = np.moveaxis(counts, -1, 0)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                "ppv": tp / (tp + fp), "npv": tn / (tn + fn),
                "accuracy": (tp + tn) / (tp + fp + tn + fn)}


def operating_point(y_true, score, threshold: float, groups=None, n_boot: int = 1000,
                    seed: int = 0, level: float = 0.95) -> dict:
    """The binary classifier at ``threshold`` (positive when ``score >= threshold``):

    ``{"threshold", "n", "n_groups", "tp", "fp", "tn", "fn", "sensitivity", "specificity",
    "ppv", "npv", "accuracy", "ci": {metric: [low, high]}, "level", "n_boot"}``.

    A ratio with an empty denominator (e.g. PPV when nothing is called positive) is ``None``,
    and resamples where it is undefined are left out of its interval. The intervals are
    percentile bootstrap intervals over the resamples of :func:`bootstrap_ci
    <usfmae_fast.finetune.metrics.bootstrap_ci>` -- patients (``groups``, one id per image)
    with all of their images when given, else images; ``n_groups`` counts the resampled units.
    Plain Python numbers, ready for JSON."""
    y, s = _checked_binary(y_true, score)
    if not np.isfinite(threshold):
        raise ValueError(f"threshold: expected a finite number, got {threshold}")
    checked_bootstrap_args(n_boot, level)
    unit_of = resampling_units(groups, len(y))
    called = s >= threshold
    cells = np.stack([called & (y == 1), called & (y == 0), ~called & (y == 0),
                      ~called & (y == 1)], axis=1).astype(np.float64)        # [N, 4]
    counts = cells.sum(axis=0)
    resampled = [_rates(weights @ cells) for weights in bootstrap_weights(unit_of, int(n_boot),
                                                                          seed)]
    point = _rates(counts)
    return {
        "threshold": float(threshold), "n": int(len(y)), "n_groups": int(unit_of.max()) + 1,
        **{name: int(count) for name, count in zip(("tp", "fp", "tn", "fn"), counts)},
        **{name: float(value) if np.isfinite(value) else None for name, value in point.items()},
        "ci": {name: percentile_interval(np.concatenate([r[name] for r in resampled]), level)
               for name in OPERATING_METRICS},
        "level": float(level), "n_boot": int(n_boot),
    }


# ---------------------------------------------------------------------------------------------
# calibration

def brier_score(y_true, probs) -> float:
    """Mean squared distance between the probabilities [N, C] and the true class.

    Binary: scikit-learn's ``brier_score_loss`` on the positive column, ``mean((p1 - y)^2)``
    (in [0, 1]). Multi-class: Brier's (1950) original ``mean over images of sum over classes of
    (p_c - onehot_c)^2`` (in [0, 2]) -- what scikit-learn >= 1.7 computes for [N, C]
    probabilities; for two classes this sum is twice the binary value, which is why scikit-learn
    halves it there and so do we."""
    y, probs = _checked_probs(y_true, probs)
    if probs.shape[1] == 2:
        return float(brier_score_loss(y, probs[:, 1], pos_label=1))
    return float(np.mean(np.sum((probs - np.eye(probs.shape[1])[y]) ** 2, axis=1)))


def expected_calibration_error(y_true, probs, n_bins: int = 15) -> float:
    """Top-label expected calibration error (Guo et al. 2017): images binned by confidence (the
    largest class probability; binary included) in ``n_bins`` equal-width bins ``(m/M,
    (m+1)/M]``, then ``sum over bins of |bin| / N * |accuracy(bin) - mean confidence(bin)|``,
    where accuracy is that of the argmax prediction."""
    y, probs = _checked_probs(y_true, probs)
    if int(n_bins) != n_bins or n_bins < 1:
        raise ValueError(f"n_bins: expected a positive integer, got {n_bins}")
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == y).astype(np.float64)
    edges = np.arange(int(n_bins) + 1) / n_bins
    bin_of = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, n_bins - 1)
    gap = (np.bincount(bin_of, weights=correct, minlength=n_bins)
           - np.bincount(bin_of, weights=confidence, minlength=n_bins))
    return float(np.abs(gap).sum() / len(y))


def reliability_diagram(y_true, probs, path, title: str = "", n_bins: int = 10) -> Path:
    """The reliability diagram (scikit-learn's ``CalibrationDisplay``, ``n_bins`` equal-width
    bins) written to ``path``: binary -- observed fraction of positives against the mean
    positive-class probability; multi-class -- accuracy against mean top-label confidence.
    The legend gives the top-label ECE (same bins) and the Brier score."""
    y, probs = _checked_probs(y_true, probs)
    ece = expected_calibration_error(y, probs, n_bins)
    scores = f"top-label ECE {ece:.3f}, Brier {brier_score(y, probs):.3f}"
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(5.5, 5), dpi=120)
    if probs.shape[1] == 2:
        CalibrationDisplay.from_predictions(y, probs[:, 1], n_bins=n_bins, pos_label=1, ax=ax,
                                            name=f"positive class ({scores})")
        ax.set(xlabel="mean predicted probability of the positive class",
               ylabel="fraction of positives")
    else:
        correct = (probs.argmax(axis=1) == y).astype(np.int64)
        CalibrationDisplay.from_predictions(correct, probs.max(axis=1), n_bins=n_bins,
                                            pos_label=1, ax=ax, name=f"top label ({scores})")
        ax.set(xlabel="mean confidence (top-label probability)", ylabel="accuracy")
    ax.set(title=title, xlim=(0, 1), ylim=(0, 1), aspect="equal")
    ax.legend(loc="upper left", fontsize="small")
    return save_figure(fig, path)


def _checked_temperature(T: float) -> float:
    if not (np.isfinite(T) and T > 0):
        raise ValueError(f"T: expected a finite temperature > 0, got {T}")
    return float(T)


def apply_temperature(probs, T: float) -> np.ndarray:
    """``softmax(log(probs) / T)`` [N, C]: temperature scaling applied to probabilities, which
    is the same as dividing the logits by ``T`` (log-probabilities are the logits up to a
    per-image constant). ``T > 1`` softens, ``T < 1`` sharpens; the argmax never changes.
    Zero probabilities are taken as the smallest positive float."""
    probs = _checked_probability_rows(probs)
    return softmax(np.log(np.maximum(probs, np.finfo(np.float64).tiny)) / _checked_temperature(T),
                   axis=1)


def fit_temperature(probs, y_true) -> float:
    """The temperature ``T`` (Guo et al. 2017) minimising the mean negative log-likelihood of
    ``apply_temperature(probs, T)`` for the labels ``y_true``, by bounded scalar minimisation
    (``scipy.optimize.minimize_scalar``) over ``log T`` in [-3, 3] (T from 0.05 to 20). Fit on
    validation predictions only."""
    y, probs = _checked_probs(y_true, probs)
    log_probs = np.log(np.maximum(probs, np.finfo(np.float64).tiny))
    rows = np.arange(len(y))

    def nll(log_t: float) -> float:
        return -float(log_softmax(log_probs / np.exp(log_t), axis=1)[rows, y].mean())

    best = minimize_scalar(nll, bounds=_LOG_T_BOUNDS, method="bounded",
                           options={"xatol": 1e-7})
    return float(np.exp(best.x))
