"""Stratified, patient-grouped splits: the k folds of cross-validation and the held-out test set.

With patient (or study) ids every image of a patient lands on the same side of a split,
otherwise images of one patient in both training and validation inflate every metric. Folds are
scikit-learn's ``StratifiedGroupKFold`` (``StratifiedKFold`` without ids), shuffled with the
seed; the held-out test set is the first fold of the same splitter with ``k = round(1 /
test_size)``. A class too small to appear in every fold stops the run before any training.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from sklearn.model_selection import StratifiedGroupKFold, StratifiedKFold

Fold = tuple[np.ndarray, np.ndarray]  # (train indices, validation indices)


class SplitError(ValueError):
    """The data cannot be split as asked (a class too small) or a split leaks patients."""


def _class_name(label, classes: Sequence[str] | None) -> str:
    return repr(classes[int(label)] if classes is not None else np.asarray(label).item())


def _validate(labels, groups, k: int, classes: Sequence[str] | None, why: str) -> tuple:
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) == 0:
        raise SplitError(f"labels: expected a non-empty 1-d array, got shape {labels.shape}")
    if groups is not None:
        groups = np.asarray(groups)
        if groups.shape != labels.shape:
            raise SplitError(f"groups: shape {groups.shape} differs from labels' {labels.shape}")
    if not isinstance(k, (int, np.integer)) or k < 2:
        raise SplitError(f"k: need at least 2 folds, got {k!r}")
    unit = "images" if groups is None else "patients"
    for label in np.unique(labels) if classes is None else range(len(classes)):
        in_class = labels == label
        count = int(in_class.sum()) if groups is None else len(np.unique(groups[in_class]))
        if count < k:
            raise SplitError(f"class {_class_name(label, classes)} has {count} {unit}, "
                             f"fewer than the {k} folds{why}")
    return labels, groups


def _folds(labels, groups, k: int, seed: int) -> list[Fold]:
    if groups is None:
        splitter = StratifiedKFold(n_splits=k, shuffle=True, random_state=seed)
    else:
        splitter = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    x = np.zeros((len(labels), 1))  # the splitters only look at its length
    return [(np.sort(train).astype(np.int64), np.sort(val).astype(np.int64))
            for train, val in splitter.split(x, labels, groups)]


def kfold_splits(labels: np.ndarray, groups: np.ndarray | None, k: int = 5, seed: int = 0,
                 classes: Sequence[str] | None = None) -> list[Fold]:
    """``k`` (train, validation) folds: stratified by class, grouped by patient when ``groups``
    are given; sorted int64 indices into ``labels``. ``classes`` (the names of the label
    indices) names them in errors, and then a class without any image is an error too."""
    labels, groups = _validate(labels, groups, k, classes, "")
    folds = _folds(labels, groups, k, seed)
    check_splits(labels, groups, folds, classes)
    return folds


def holdout_split(labels: np.ndarray, groups: np.ndarray | None, test_size: float = 0.2,
                  seed: int = 0, classes: Sequence[str] | None = None) -> Fold:
    """(train, test) indices: the first of the ``k = round(1 / test_size)`` folds that
    :func:`kfold_splits` makes, so the test set is stratified and shares no patient with the
    training set."""
    if not 0.0 < test_size < 0.5:
        raise SplitError(f"test_size: must lie in (0, 0.5), got {test_size!r}")
    k = round(1.0 / test_size)
    labels, groups = _validate(labels, groups, k, classes, f" that test_size={test_size} makes")
    holdout = _folds(labels, groups, k, seed)[0]
    check_splits(labels, groups, [holdout], classes)
    return holdout


def check_splits(labels, groups, folds: Sequence[Fold],
                 classes: Sequence[str] | None = None) -> None:
    """Raises :class:`SplitError` when a fold's training and validation sets share an image or
    a patient, when two validation sets share one, or when a validation set lacks a class."""
    labels = np.asarray(labels)
    present = np.unique(labels)
    seen_val: dict = {}  # image index or patient id -> the first fold validating it
    for number, (train, val) in enumerate(folds):
        if (shared := np.intersect1d(train, val)).size:
            raise SplitError(f"fold {number}: images {shared[:5].tolist()} are in both the "
                             f"training and the validation set")
        val_units = np.unique(val) if groups is None else np.unique(np.asarray(groups)[val])
        if groups is not None and (shared := np.intersect1d(np.asarray(groups)[train],
                                                            val_units)).size:
            raise SplitError(f"fold {number}: patients {shared[:5].tolist()} are in both the "
                             f"training and the validation set")
        for unit in val_units.tolist():
            if seen_val.setdefault(unit, number) != number:
                what = "image" if groups is None else "patient"
                raise SplitError(f"{what} {unit!r} is in the validation sets of folds "
                                 f"{seen_val[unit]} and {number}")
        if absent := sorted(set(present.tolist()) - set(labels[val].tolist())):
            names = ", ".join(_class_name(c, classes) for c in absent)
            raise SplitError(f"fold {number}: the validation set has no image of class {names}; "
                             f"try another seed or fewer folds")
