"""The clinical papers' classification metrics, their bootstrap confidence intervals and their
mean ± sd over folds.

Binary tasks report the positive class (index 1): F1, precision and recall of that class,
specificity = recall of the negative class. Multi-class tasks report macro averages (AUC
one-vs-rest) and the weighted AUC and F1 beside them. AUC is ``None`` when it is undefined
(a class without any image in ``y_true``), and every other ratio with an empty denominator is 0
(scikit-learn's ``zero_division=0``), so a degenerate fold yields numbers, never a crash.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             multilabel_confusion_matrix, precision_recall_fscore_support,
                             roc_auc_score)

SCALAR_METRICS = ("auc", "auc_weighted", "f1", "f1_weighted", "accuracy", "balanced_accuracy",
                  "precision", "recall", "specificity")
_RESAMPLED_VALUES_PER_CHUNK = 2_000_000  # bounds the bootstrap's memory on large test sets


def checked_scores(y_true, probs, classes) -> tuple[np.ndarray, np.ndarray]:
    """``(y_true, probs)`` as arrays, checked against each other and ``classes``."""
    y_true, probs = np.asarray(y_true), np.asarray(probs, dtype=np.float64)
    n_classes = len(classes)
    if n_classes < 2 or probs.ndim != 2 or probs.shape[1] != n_classes:
        raise ValueError(f"probs: expected [N, {n_classes}] for classes {list(classes)} "
                         f"(at least 2), got shape {probs.shape}")
    if y_true.shape != (len(probs),) or len(probs) == 0:
        raise ValueError(f"y_true: expected [{len(probs)}] labels matching probs, got shape "
                         f"{y_true.shape}")
    if not np.issubdtype(y_true.dtype, np.integer) or y_true.min() < 0 \
            or y_true.max() >= n_classes:
        raise ValueError(f"y_true: expected class indices in [0, {n_classes}), got "
                         f"{y_true.dtype} values {np.unique(y_true)[:10].tolist()}")
    return y_true.astype(np.int64), probs


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros(numerator.shape),
                     where=denominator > 0)


def _headline(per_class: np.ndarray) -> np.ndarray:
    """Binary: the positive class's value; multi-class: the macro mean (last axis = classes)."""
    return per_class[..., 1] if per_class.shape[-1] == 2 else per_class.mean(axis=-1)


def roc_auc(y_true: np.ndarray, probs: np.ndarray, average: str) -> float | None:
    """ROC AUC (one-vs-rest ``average`` for more than two classes); None when a class is
    missing from ``y_true``."""
    n_classes = probs.shape[1]
    if np.bincount(y_true, minlength=n_classes).min() == 0:
        return None
    if n_classes == 2:
        return float(roc_auc_score(y_true, probs[:, 1]))
    return float(roc_auc_score(y_true, probs, multi_class="ovr", average=average,
                               labels=list(range(n_classes))))


def _class_auc(is_class: np.ndarray, score: np.ndarray) -> float | None:
    return float(roc_auc_score(is_class, score)) if 0 < is_class.sum() < len(is_class) else None


def classification_metrics(y_true: np.ndarray, probs: np.ndarray, classes: Sequence[str]) -> dict:
    """Every scalar of :data:`SCALAR_METRICS`, the ``confusion_matrix`` (rows: true class,
    columns: predicted = argmax of ``probs`` [N, C]), ``per_class`` values and ``n``; plain
    Python numbers, ready for JSON."""
    y_true, probs = checked_scores(y_true, probs, classes)
    labels = list(range(len(classes)))
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, labels=labels, zero_division=0)
    tn, fp = multilabel_confusion_matrix(y_true, predicted, labels=labels)[:, 0].T
    specificity = _ratio(tn, tn + fp)
    return {
        "auc": roc_auc(y_true, probs, "macro"),
        "auc_weighted": roc_auc(y_true, probs, "weighted"),
        "f1": float(_headline(f1)),
        "f1_weighted": float(f1_score(y_true, predicted, labels=labels, average="weighted",
                                      zero_division=0)),
        "accuracy": float(accuracy_score(y_true, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, predicted)),
        "precision": float(_headline(precision)),
        "recall": float(_headline(recall)),
        "specificity": float(_headline(specificity)),
        "confusion_matrix": confusion_matrix(y_true, predicted, labels=labels).tolist(),
        "per_class": {
            name: {"precision": float(precision[c]), "recall": float(recall[c]),
                   "f1": float(f1[c]), "specificity": float(specificity[c]),
                   "support": int(support[c]),
                   "auc": _class_auc(y_true == c, probs[:, c])}
            for c, name in enumerate(classes)},
        "n": int(len(y_true)),
    }


def _resampled_auc(is_class: np.ndarray, score: np.ndarray, idx: np.ndarray) -> np.ndarray:
    """ROC AUC of each resample ``idx[b]`` (NaN where one side is empty) as the Mann-Whitney
    statistic with ties counted half, which is the area under the trapezoidal ROC curve."""
    levels, level_of = np.unique(score, return_inverse=True)
    n_boot, n_levels = len(idx), len(levels)
    flat = (np.arange(n_boot)[:, None] * n_levels + level_of[idx]).ravel()
    total = np.bincount(flat, minlength=n_boot * n_levels).reshape(n_boot, n_levels)
    pos = np.bincount(flat, weights=is_class[idx].ravel(),
                      minlength=n_boot * n_levels).reshape(n_boot, n_levels)
    neg = total - pos
    below = np.cumsum(neg, axis=1) - neg
    with np.errstate(invalid="ignore"):
        return (pos * (below + 0.5 * neg)).sum(axis=1) / (pos.sum(axis=1) * neg.sum(axis=1))


def _resampled_scalars(y_true: np.ndarray, probs: np.ndarray, idx: np.ndarray) -> dict:
    """:data:`SCALAR_METRICS` of every resample ``idx[b]`` [B, n] at once, from the resamples'
    confusion matrices: the values :func:`classification_metrics` gives for ``y_true[idx[b]],
    probs[idx[b]]`` (a test holds them equal), NaN where AUC is undefined. Calling
    scikit-learn once per resample would take seconds per thousand resamples."""
    n_boot, n = idx.shape
    n_classes = probs.shape[1]
    predicted = probs.argmax(axis=1)
    cells = (np.arange(n_boot)[:, None] * n_classes + y_true[idx]) * n_classes + predicted[idx]
    confusion = np.bincount(cells.ravel(), minlength=n_boot * n_classes ** 2).reshape(
        n_boot, n_classes, n_classes)
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    support, predicted_count = confusion.sum(axis=2), confusion.sum(axis=1)
    recall, f1 = _ratio(tp, support), _ratio(2 * tp, support + predicted_count)
    class_auc = np.stack([_resampled_auc(y_true == c, probs[:, c], idx)
                          for c in range(n_classes)], axis=1)
    auc = class_auc[:, 1] if n_classes == 2 else class_auc.mean(axis=1)
    return {
        "auc": auc,
        "auc_weighted": auc if n_classes == 2 else (class_auc * support).sum(axis=1) / n,
        "f1": _headline(f1),
        "f1_weighted": (f1 * support).sum(axis=1) / n,
        "accuracy": tp.sum(axis=1) / n,
        # classes absent from a resample's truth do not count, as in scikit-learn
        "balanced_accuracy": np.nanmean(np.where(support > 0, recall, np.nan), axis=1),
        "precision": _headline(_ratio(tp, predicted_count)),
        "recall": _headline(recall),
        "specificity": _headline(_ratio(n - support - predicted_count + tp, n - support)),
    }


def bootstrap_ci(y_true, probs, classes, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95) -> dict[str, list[float]]:
    """Percentile bootstrap interval ``[low, high]`` of every scalar metric: ``n_boot``
    resamples of the images with replacement (seeded). Resamples where AUC is undefined are
    left out of the AUC intervals only; ``[None, None]`` when no resample defines it."""
    y_true, probs = checked_scores(y_true, probs, classes)
    if n_boot < 1 or not 0.0 < level < 1.0:
        raise ValueError(f"n_boot must be >= 1 and level in (0, 1), got {n_boot}, {level}")
    rng = np.random.default_rng(seed)
    n = len(y_true)
    chunk = max(1, _RESAMPLED_VALUES_PER_CHUNK // n)
    parts = [_resampled_scalars(y_true, probs, rng.integers(0, n, size=(min(chunk, left), n)))
             for left in range(n_boot, 0, -chunk)]
    tail = 50.0 * (1.0 - level)
    intervals = {}
    for name in SCALAR_METRICS:
        values = np.concatenate([part[name] for part in parts])
        values = values[~np.isnan(values)]
        intervals[name] = ([float(np.percentile(values, tail)),
                            float(np.percentile(values, 100.0 - tail))]
                           if values.size else [None, None])
    return intervals


def summarize(values: Sequence[dict]) -> dict[str, dict]:
    """``{metric: {"mean", "sd", "n"}}`` over folds (sd with ddof=1, 0.0 for a single fold);
    folds where a metric is ``None`` do not count, and a metric no fold defines has
    ``mean`` and ``sd`` ``None``."""
    summary = {}
    for name in SCALAR_METRICS:
        defined = np.array([v[name] for v in values if v.get(name) is not None], dtype=np.float64)
        summary[name] = {
            "mean": float(defined.mean()) if defined.size else None,
            "sd": float(defined.std(ddof=1)) if defined.size > 1 else (0.0 if defined.size
                                                                         else None),
            "n": int(defined.size)}
    return summary
