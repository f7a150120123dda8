"""Stratified, patient-grouped folds and the held-out test set: stratification, no patient in
two validation folds or on both sides of a split, and clear errors for classes too small."""
import numpy as np
import pytest

from usfmae_fast.finetune.splits import SplitError, check_splits, holdout_split, kfold_splits

CLASSES = ["normal", "benign", "malignant"]


def patients_dataset(seed, n_patients=90, bilateral=4):
    """Images of imbalanced classes, 1-6 per patient; a few patients have images of two
    classes (e.g. one lesion per breast)."""
    rng = np.random.default_rng(seed)
    patient_class = rng.choice(3, size=n_patients, p=[0.5, 0.3, 0.2])
    per_patient = rng.integers(1, 7, size=n_patients)
    groups = np.repeat([f"P{i:03d}" for i in range(n_patients)], per_patient)
    labels = np.repeat(patient_class, per_patient)
    for patient in rng.choice(n_patients, size=bilateral, replace=False):
        rows = np.flatnonzero(groups == f"P{patient:03d}")
        labels[rows[: len(rows) // 2]] = (patient_class[patient] + 1) % 3
    order = rng.permutation(len(labels))
    return labels[order], groups[order]


def assert_partition(folds, n):
    vals = np.concatenate([val for _, val in folds])
    assert sorted(vals.tolist()) == list(range(n))  # every image validated exactly once
    for train, val in folds:
        assert train.dtype == val.dtype == np.int64
        assert np.all(np.diff(train) > 0) and np.all(np.diff(val) > 0)
        assert sorted(np.concatenate([train, val]).tolist()) == list(range(n))


def assert_no_patient_leak(groups, folds):
    seen = {}
    for number, (train, val) in enumerate(folds):
        assert not set(groups[train]) & set(groups[val])
        for patient in set(groups[val]):
            assert seen.setdefault(patient, number) == number


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("k", [3, 5])
def test_grouped_folds_are_stratified_and_never_split_a_patient(seed, k):
    labels, groups = patients_dataset(seed)
    folds = kfold_splits(labels, groups, k=k, seed=seed)
    assert len(folds) == k
    assert_partition(folds, len(labels))
    assert_no_patient_leak(groups, folds)
    overall = np.bincount(labels, minlength=3) / len(labels)
    for _, val in folds:
        fraction = np.bincount(labels[val], minlength=3) / len(val)
        assert np.abs(fraction - overall).max() < 0.1
    again = kfold_splits(labels, groups, k=k, seed=seed)
    assert all(np.array_equal(a[1], b[1]) for a, b in zip(folds, again))
    other = kfold_splits(labels, groups, k=k, seed=seed + 10)
    assert any(not np.array_equal(a[1], b[1]) for a, b in zip(folds, other))


@pytest.mark.parametrize("seed", [0, 1])
def test_folds_without_patients_are_exactly_stratified(seed):
    labels = np.random.default_rng(seed).choice(4, size=203, p=[0.4, 0.3, 0.2, 0.1])
    folds = kfold_splits(labels, None, k=5, seed=seed)
    assert_partition(folds, len(labels))
    expected = np.bincount(labels) / 5
    for _, val in folds:  # StratifiedKFold: each class within one image of its share
        assert np.abs(np.bincount(labels[val], minlength=4) - expected).max() <= 1


@pytest.mark.parametrize("seed", [0, 3])
def test_holdout_then_folds_on_the_rest_never_leak(seed):
    labels, groups = patients_dataset(seed, n_patients=120)
    train, test = holdout_split(labels, groups, test_size=0.2, seed=seed)
    assert not set(train) & set(test) and len(train) + len(test) == len(labels)
    assert train.dtype == test.dtype == np.int64 and np.all(np.diff(test) > 0)
    assert not set(groups[train]) & set(groups[test])
    assert abs(len(set(groups[test])) / 120 - 0.2) < 0.05
    overall = np.bincount(labels, minlength=3) / len(labels)
    assert np.abs(np.bincount(labels[test], minlength=3) / len(test) - overall).max() < 0.1
    folds = kfold_splits(labels[train], groups[train], k=4, seed=seed)
    assert_no_patient_leak(groups[train], folds)
    test_patients = set(groups[test])
    for fold_train, fold_val in folds:
        assert not test_patients & set(groups[train][fold_train])
        assert not test_patients & set(groups[train][fold_val])


def test_a_class_with_fewer_patients_than_folds_is_named():
    labels, groups = patients_dataset(0)
    rare = np.isin(groups, np.unique(groups[labels == 2])[3:])
    labels, groups = labels[~rare], groups[~rare]
    rare_patients = len(np.unique(groups[labels == 2]))
    assert rare_patients < 5
    with pytest.raises(SplitError, match=f"class 'malignant' has {rare_patients} patients, "
                                         "fewer than the 5 folds"):
        kfold_splits(labels, groups, k=5, classes=CLASSES)
    with pytest.raises(SplitError, match=f"class 2 has {rare_patients} patients"):
        kfold_splits(labels, groups, k=5)
    with pytest.raises(SplitError, match="fewer than the 5 folds that test_size=0.2 makes"):
        holdout_split(labels, groups, test_size=0.2, classes=CLASSES)
    holdout_split(labels, groups, test_size=1 / rare_patients)  # as many folds as patients
    with pytest.raises(SplitError, match="class 'c' has 0 images, fewer than the 2 folds"):
        kfold_splits(np.repeat([0, 1], 5), None, k=2, classes=["a", "b", "c"])
    with pytest.raises(SplitError, match="class 1 has 3 images, fewer than the 4 folds"):
        kfold_splits(np.array([0] * 10 + [1] * 3), None, k=4)


def test_check_splits_finds_leaks_and_empty_classes():
    labels = np.array([0, 0, 1, 1, 0, 1])
    groups = np.array(["a", "a", "b", "c", "d", "e"])
    good = [(np.array([2, 4]), np.array([0, 1, 3, 5])), (np.array([0, 1, 3, 5]), np.array([2, 4]))]
    check_splits(labels, groups, good)
    with pytest.raises(SplitError, match=r"fold 0: patients \['a'\] are in both"):
        check_splits(labels, groups, [(np.array([0, 2]), np.array([1, 3, 4]))])
    with pytest.raises(SplitError, match="patient 'e' is in the validation sets of folds 0 and 1"):
        check_splits(labels, groups, [(np.array([2]), np.array([0, 1, 3, 5])),
                                      (np.array([0]), np.array([2, 4, 5]))])
    with pytest.raises(SplitError, match=r"fold 0: images \[2\] are in both"):
        check_splits(labels, None, [(np.array([0, 2]), np.array([1, 2, 3]))])
    with pytest.raises(SplitError, match="no image of class 'benign'"):
        check_splits(labels, None, [(np.array([2, 3]), np.array([0, 1]))], classes=CLASSES)


def test_bad_arguments_raise():
    labels = np.repeat([0, 1], 10)
    for test_size in (0.0, 0.5, 0.7, -0.1):
        with pytest.raises(SplitError, match="test_size"):
            holdout_split(labels, None, test_size=test_size)
    with pytest.raises(SplitError, match="k: need at least 2 folds"):
        kfold_splits(labels, None, k=1)
    with pytest.raises(SplitError, match="groups: shape"):
        kfold_splits(labels, np.arange(5).astype(str), k=2)
    with pytest.raises(SplitError, match="labels: expected a non-empty"):
        kfold_splits(np.array([]), None, k=2)
