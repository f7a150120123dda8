"""The clinical papers' classification metrics, their bootstrap confidence intervals (images or,
given patient ids, patients resampled) and their mean ± sd and t-interval over folds.

Binary tasks report the positive class (index 1): F1, precision and recall of that class,
specificity = recall of the negative class. Multi-class tasks report macro averages (AUC
one-vs-rest) and the weighted AUC and F1 beside them. Both also report the macro and weighted
(by each class's number of true images) precision, recall, specificity and F1 of
:data:`AVERAGED_METRICS`, as papers tabulate them. AUC is ``None`` when it is undefined
(a class without any image in ``y_true``), and every other ratio with an empty denominator is 0
(scikit-learn's ``zero_division=0``), so a degenerate fold yields numbers, never a crash.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence

import numpy as np
from scipy import stats as _sps
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix,
                             multilabel_confusion_matrix, precision_recall_fscore_support,
                             roc_auc_score)

SCALAR_METRICS = ("auc", "auc_weighted", "f1", "f1_weighted", "accuracy", "balanced_accuracy",
                  "precision", "recall", "specificity")
AVERAGED_METRICS = ("precision_macro", "precision_weighted", "recall_macro", "recall_weighted",
                    "specificity_macro", "specificity_weighted", "f1_macro")
ALL_METRICS = SCALAR_METRICS + AVERAGED_METRICS  # what bootstrap_ci and summarize cover
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
    """Every scalar of :data:`ALL_METRICS`, the ``confusion_matrix`` (rows: true class,
    columns: predicted = argmax of ``probs`` [N, C]), ``per_class`` values and ``n``; plain
    Python numbers, ready for JSON. Macro averages weigh every class of ``classes`` equally
    (absent ones included, as 0); weighted ones weigh each class by its true images, so
    ``recall_weighted`` always equals ``accuracy``."""
    y_true, probs = checked_scores(y_true, probs, classes)
    labels = list(range(len(classes)))
    predicted = probs.argmax(axis=1)
    precision, recall, f1, support = precision_recall_fscore_support(
        y_true, predicted, labels=labels, zero_division=0)
    tn, fp = multilabel_confusion_matrix(y_true, predicted, labels=labels)[:, 0].T
    specificity = _ratio(tn, tn + fp)
    averaged = {}
    for average in ("macro", "weighted"):
        values = precision_recall_fscore_support(y_true, predicted, labels=labels,
                                                 average=average, zero_division=0)[:3]
        averaged.update({f"{name}_{average}": float(value)
                         for name, value in zip(("precision", "recall", "f1"), values)})
    averaged["specificity_macro"] = float(specificity.mean())
    averaged["specificity_weighted"] = float(np.average(specificity, weights=support))
    return {
        "auc": roc_auc(y_true, probs, "macro"),
        "auc_weighted": roc_auc(y_true, probs, "weighted"),
        "f1": float(_headline(f1)),
        "f1_weighted": averaged["f1_weighted"],
        "accuracy": float(accuracy_score(y_true, predicted)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, predicted)),
        "precision": float(_headline(precision)),
        "recall": float(_headline(recall)),
        "specificity": float(_headline(specificity)),
        **{name: averaged[name] for name in AVERAGED_METRICS},
        "confusion_matrix": confusion_matrix(y_true, predicted, labels=labels).tolist(),
        "per_class": {
            name: {"precision": float(precision[c]), "recall": float(recall[c]),
                   "f1": float(f1[c]), "specificity": float(specificity[c]),
                   "support": int(support[c]),
                   "auc": _class_auc(y_true == c, probs[:, c])}
            for c, name in enumerate(classes)},
        "n": int(len(y_true)),
    }


# ---------------------------------------------------------------------------------------------
# resampling: one scheme for every bootstrap of the package (here, stats, calibration)

def resampling_units(groups, n_images: int) -> np.ndarray:
    """The resampling unit of every image [N]: its patient's index in ``np.unique(groups)``
    order when ``groups`` (one patient id per image, any sortable ids) is given, otherwise the
    image's own index."""
    if groups is None:
        return np.arange(n_images)
    g = np.asarray(groups)
    if g.ndim != 1 or len(g) != n_images:
        raise ValueError(f"groups: expected one patient id per image ({n_images}), "
                         f"got shape {g.shape}")
    if g.dtype.kind == "f" and np.any(np.isnan(g)):
        raise ValueError("groups: contains NaN patient ids")
    try:
        return np.unique(g, return_inverse=True)[1].reshape(-1)
    except TypeError as exc:
        raise ValueError(f"groups: patient ids must be of one sortable type ({exc})") from None


def bootstrap_weights(unit_of: np.ndarray, n_boot: int, seed: int,
                      max_values: int = _RESAMPLED_VALUES_PER_CHUNK) -> Iterator[np.ndarray]:
    """``n_boot`` bootstrap resamples as image weights, in chunks ``[b, N]`` of at most about
    ``max_values`` values: each resample draws as many units as there are (``unit_of``: see
    :func:`resampling_units`) with replacement, and every image weighs the number of times its
    unit was drawn -- a patient drawn twice brings all of its images twice (clustered bootstrap).

    The draws are the rows of ``np.random.default_rng(seed).integers(0, n_units,
    size=(n_boot, n_units))`` (drawn chunk by chunk, which gives the same stream), so with one
    image per unit in unit order the resamples are those of the image bootstrap."""
    n_units = int(unit_of.max()) + 1
    rng = np.random.default_rng(seed)
    rows = max(1, max_values // max(len(unit_of), n_units))
    for start in range(0, n_boot, rows):
        b = min(rows, n_boot - start)
        draws = rng.integers(0, n_units, size=(b, n_units))
        counts = np.bincount((draws + n_units * np.arange(b)[:, None]).ravel(),
                             minlength=b * n_units).reshape(b, n_units)
        yield counts[:, unit_of].astype(np.float64)


def weighted_auc(score: np.ndarray, positive: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """ROC AUC of ``score`` [N] (positives ``positive``) under each row of image weights [B, N]
    (resampling counts): the Mann-Whitney statistic of the resampled multiset, ties one half,
    which is the area under the trapezoidal ROC curve. Sorting is done once; each resample
    costs a cumulative sum. NaN where a resample lacks positives or negatives."""
    order = np.argsort(score, kind="stable")
    s, p, w = score[order], positive[order], weights[:, order]
    new_bin = np.r_[True, s[1:] != s[:-1]]
    starts = np.flatnonzero(new_bin)                            # first image of each tie bin
    bin_of = np.cumsum(new_bin) - 1                             # tie bin of each sorted image
    wneg = np.where(p, 0.0, w)
    cum = np.concatenate([np.zeros((len(w), 1)), np.cumsum(wneg, axis=1)], axis=1)
    ends = np.r_[starts[1:], len(s)]
    below = cum[:, starts]                                      # negative weight below each bin
    inbin = cum[:, ends] - below                                # negative weight tied in the bin
    wpos = w[:, p]
    bins = bin_of[p]
    num = (wpos * (below[:, bins] + 0.5 * inbin[:, bins])).sum(axis=1)
    den = wpos.sum(axis=1) * cum[:, -1]
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(den > 0, num / np.where(den > 0, den, 1.0), np.nan)


def percentile_interval(values: np.ndarray, level: float) -> list:
    """The percentile interval ``[low, high]`` (linear interpolation) of the finite ``values``;
    ``[None, None]`` when none is finite."""
    values = np.asarray(values, dtype=np.float64)
    values = values[np.isfinite(values)]
    if not values.size:
        return [None, None]
    tail = 50.0 * (1.0 - level)
    return [float(np.percentile(values, tail)), float(np.percentile(values, 100.0 - tail))]


def checked_bootstrap_args(n_boot: int, level: float) -> None:
    """ValueError naming ``n_boot`` or ``level`` unless ``n_boot >= 1`` and ``0 < level < 1``."""
    if int(n_boot) != n_boot or n_boot < 1:
        raise ValueError(f"n_boot: expected a positive number of resamples, got {n_boot}")
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a value in (0, 1), got {level}")


def _resampled_scalars(y_true: np.ndarray, probs: np.ndarray, weights: np.ndarray) -> dict:
    """:data:`ALL_METRICS` of every resample at once, given as image weights [B, N] (how many
    times each image is in resample b), from the resamples' confusion matrices: the values
    :func:`classification_metrics` gives for the resampled images (a test holds them equal), NaN
    where AUC is undefined. Calling scikit-learn once per resample would take seconds per
    thousand resamples."""
    n_boot = len(weights)
    n_classes = probs.shape[1]
    cell_of = np.eye(n_classes ** 2)[y_true * n_classes + probs.argmax(axis=1)]     # [N, C*C]
    confusion = (weights @ cell_of).reshape(n_boot, n_classes, n_classes)
    n = confusion.sum(axis=(1, 2))[:, None]                     # images per resample [B, 1]
    tp = np.diagonal(confusion, axis1=1, axis2=2)
    support, predicted_count = confusion.sum(axis=2), confusion.sum(axis=1)
    precision, recall = _ratio(tp, predicted_count), _ratio(tp, support)
    f1 = _ratio(2 * tp, support + predicted_count)
    specificity = _ratio(n - support - predicted_count + tp, n - support)
    class_auc = np.stack([weighted_auc(probs[:, c], y_true == c, weights)
                          for c in range(n_classes)], axis=1)
    auc = class_auc[:, 1] if n_classes == 2 else class_auc.mean(axis=1)

    def weighted(per_class):
        return (per_class * support).sum(axis=1) / n[:, 0]

    return {
        "auc": auc,
        "auc_weighted": auc if n_classes == 2 else weighted(class_auc),
        "f1": _headline(f1),
        "f1_weighted": weighted(f1),
        "accuracy": tp.sum(axis=1) / n[:, 0],
        # classes absent from a resample's truth do not count, as in scikit-learn
        "balanced_accuracy": np.nanmean(np.where(support > 0, recall, np.nan), axis=1),
        "precision": _headline(precision),
        "recall": _headline(recall),
        "specificity": _headline(specificity),
        "precision_macro": precision.mean(axis=1),
        "precision_weighted": weighted(precision),
        "recall_macro": recall.mean(axis=1),
        "recall_weighted": weighted(recall),
        "specificity_macro": specificity.mean(axis=1),
        "specificity_weighted": weighted(specificity),
        "f1_macro": f1.mean(axis=1),
    }


def bootstrap_ci(y_true, probs, classes, n_boot: int = 1000, seed: int = 0,
                 level: float = 0.95, *, groups=None) -> dict[str, list[float]]:
    """Percentile bootstrap interval ``[low, high]`` of every metric of :data:`ALL_METRICS`
    over ``n_boot`` seeded resamples (:func:`bootstrap_weights`). With ``groups`` (a patient id
    per image) the resamples draw patients with replacement, each bringing all of its images --
    a clustered bootstrap, needed when a patient contributes several correlated images;
    otherwise images. Resamples where AUC is undefined are left out of the AUC intervals only;
    ``[None, None]`` when no resample defines it."""
    y_true, probs = checked_scores(y_true, probs, classes)
    checked_bootstrap_args(n_boot, level)
    unit_of = resampling_units(groups, len(y_true))
    parts = [_resampled_scalars(y_true, probs, weights)
             for weights in bootstrap_weights(unit_of, int(n_boot), seed)]
    return {name: percentile_interval(np.concatenate([part[name] for part in parts]), level)
            for name in ALL_METRICS}


# ---------------------------------------------------------------------------------------------
# over folds

def fold_mean_ci(values: Sequence[float | None], level: float = 0.95,
                 bounds: tuple[float, float] | None = None) -> list:
    """Student-t interval ``[low, high]`` of the mean of the defined (not ``None``) ``values``,
    one per cross-validation fold: ``mean ± t(n - 1) * sd / sqrt(n)``, clipped to ``bounds``
    (the range the metric can take; with few folds the t quantile is large, 12.7 for two);
    ``[None, None]`` for fewer than two defined values.

    Approximate: fold results are not independent -- their training sets overlap, and no
    unbiased estimator of the variance of k-fold cross-validation exists (Bengio & Grandvalet
    2004) -- so the interval tends to be too narrow; read it as a description of the spread over
    folds, not as an exact coverage guarantee."""
    if not 0.0 < level < 1.0:
        raise ValueError(f"level: expected a value in (0, 1), got {level}")
    defined = np.array([v for v in values if v is not None], dtype=np.float64)
    if defined.size < 2:
        return [None, None]
    mean = defined.mean()
    half = _sps.t.ppf(0.5 + level / 2, defined.size - 1) * defined.std(ddof=1) \
        / np.sqrt(defined.size)
    low, high = mean - half, mean + half
    if bounds is not None:
        low, high = max(low, bounds[0]), min(high, bounds[1])
    return [float(low), float(high)]


def summarize(values: Sequence[dict], level: float = 0.95) -> dict[str, dict]:
    """``{metric: {"mean", "sd", "n", "ci"}}`` over folds for every metric of
    :data:`ALL_METRICS` (sd with ddof=1, 0.0 for a single fold; ``ci`` by :func:`fold_mean_ci`,
    an approximate t-interval of the mean clipped to [0, 1], every metric's range); folds where
    a metric is ``None`` or missing do not count, and a metric no fold defines has ``mean`` and
    ``sd`` ``None``."""
    summary = {}
    for name in ALL_METRICS:
        defined = np.array([v[name] for v in values if v.get(name) is not None], dtype=np.float64)
        summary[name] = {
            "mean": float(defined.mean()) if defined.size else None,
            "sd": float(defined.std(ddof=1)) if defined.size > 1 else (0.0 if defined.size
                                                                         else None),
            "n": int(defined.size),
            "ci": fold_mean_ci(defined.tolist(), level, bounds=(0.0, 1.0))}
    return summary
