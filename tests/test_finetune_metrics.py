"""Classification metrics against scikit-learn computed directly on random predictions (binary,
3 and 4 classes), specificity from the confusion matrix, undefined AUC, the vectorised
bootstrap, and the mean ± sd over folds."""
import json
import statistics
import time

import numpy as np
import pytest
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_score, recall_score, roc_auc_score)

from usfmae_fast.finetune.metrics import (SCALAR_METRICS, _resampled_scalars, bootstrap_ci,
                                          classification_metrics, summarize)


def predictions(rng, n, n_classes, signal=1.0, tied=False):
    """Labels and softmax probabilities that carry some signal about them; ``tied``: scores
    drawn from a few distinct rows, so ROC curves have ties."""
    y = rng.integers(0, n_classes, size=n)
    logits = rng.normal(size=(n, n_classes)) + signal * np.eye(n_classes)[y]
    if tied:
        logits = logits[rng.integers(0, 6, size=n)]
    probs = np.exp(logits) / np.exp(logits).sum(axis=1, keepdims=True)
    return y, probs


def classes_of(n_classes):
    return [f"class_{c}" for c in range(n_classes)]


def specificity_from_confusion(cm):
    """TN / (TN + FP) of every class, one-vs-rest, straight from the confusion matrix."""
    out = []
    for c in range(len(cm)):
        fp = cm[:, c].sum() - cm[c, c]
        tn = cm.sum() - cm[c, :].sum() - cm[:, c].sum() + cm[c, c]
        out.append(tn / (tn + fp))
    return np.array(out)


def assert_plain(value):
    """Only Python numbers, strings, None, lists and dicts: JSON without a custom encoder."""
    json.dumps(value, allow_nan=False)
    if isinstance(value, dict):
        for v in value.values():
            assert_plain(v)
    elif isinstance(value, list):
        for v in value:
            assert_plain(v)
    else:
        assert value is None or type(value) in (int, float, str)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_binary_metrics_equal_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    y, probs = predictions(rng, int(rng.integers(40, 300)), 2)
    m = classification_metrics(y, probs, ["benign", "malignant"])
    pred = probs.argmax(axis=1)
    tn, fp, fn, tp = confusion_matrix(y, pred).ravel()
    assert m["auc"] == pytest.approx(roc_auc_score(y, probs[:, 1]), abs=1e-12)
    assert m["auc_weighted"] == m["auc"]
    assert m["f1"] == pytest.approx(f1_score(y, pred), abs=1e-12)
    assert m["precision"] == pytest.approx(tp / (tp + fp), abs=1e-12)
    assert m["recall"] == pytest.approx(recall_score(y, pred), abs=1e-12)
    assert m["specificity"] == pytest.approx(tn / (tn + fp), abs=1e-12)
    assert m["specificity"] == pytest.approx(recall_score(y, pred, pos_label=0), abs=1e-12)
    assert m["f1_weighted"] == pytest.approx(f1_score(y, pred, average="weighted"), abs=1e-12)
    assert m["accuracy"] == pytest.approx(accuracy_score(y, pred), abs=1e-12)
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(y, pred), abs=1e-12)
    assert m["confusion_matrix"] == [[tn, fp], [fn, tp]]
    assert m["n"] == len(y)
    negative = m["per_class"]["benign"]
    assert negative["recall"] == pytest.approx(m["specificity"], abs=1e-12)
    assert negative["auc"] == pytest.approx(roc_auc_score(y == 0, probs[:, 0]), abs=1e-12)
    assert m["per_class"]["malignant"]["support"] == int((y == 1).sum())
    assert_plain(m)


@pytest.mark.parametrize("n_classes", [3, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_multiclass_metrics_equal_scikit_learn(n_classes, seed):
    rng = np.random.default_rng(seed)
    y, probs = predictions(rng, int(rng.integers(60, 300)), n_classes, signal=0.7)
    classes = classes_of(n_classes)
    m = classification_metrics(y, probs, classes)
    pred = probs.argmax(axis=1)
    cm = confusion_matrix(y, pred)
    specificity = specificity_from_confusion(cm)
    expected = {
        "auc": roc_auc_score(y, probs, multi_class="ovr", average="macro"),
        "auc_weighted": roc_auc_score(y, probs, multi_class="ovr", average="weighted"),
        "f1": f1_score(y, pred, average="macro", zero_division=0),
        "f1_weighted": f1_score(y, pred, average="weighted", zero_division=0),
        "accuracy": accuracy_score(y, pred),
        "balanced_accuracy": balanced_accuracy_score(y, pred),
        "precision": precision_score(y, pred, average="macro", zero_division=0),
        "recall": recall_score(y, pred, average="macro", zero_division=0),
        "specificity": specificity.mean(),
    }
    assert set(expected) == set(SCALAR_METRICS)
    for name, value in expected.items():
        assert m[name] == pytest.approx(value, abs=1e-12), name
    assert m["confusion_matrix"] == cm.tolist()
    for c, name in enumerate(classes):
        assert m["per_class"][name]["specificity"] == pytest.approx(specificity[c], abs=1e-12)
        assert m["per_class"][name]["auc"] == pytest.approx(
            roc_auc_score(y == c, probs[:, c]), abs=1e-12)
        assert m["per_class"][name]["support"] == int((y == c).sum())
    assert_plain(m)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
def test_auc_is_none_when_a_class_is_absent_and_nothing_crashes():
    rng = np.random.default_rng(3)
    y, probs = predictions(rng, 50, 3)
    y[y == 2] = 0
    probs[:, 1] += probs[:, 2]  # class 2 never predicted either: precision 0 / 0
    probs[:, 2] = 0.0
    m = classification_metrics(y, probs, ["a", "b", "c"])
    assert m["auc"] is None and m["auc_weighted"] is None and m["per_class"]["c"]["auc"] is None
    assert m["per_class"]["c"]["precision"] == 0.0 and m["per_class"]["c"]["support"] == 0
    assert m["per_class"]["a"]["auc"] == pytest.approx(roc_auc_score(y == 0, probs[:, 0]))
    assert json.loads(json.dumps(m))["auc"] is None
    only_negatives = classification_metrics(np.zeros(20, int), probs[:20, :2] /
                                            probs[:20, :2].sum(1, keepdims=True), ["a", "b"])
    assert only_negatives["auc"] is None and only_negatives["recall"] == 0.0
    ci = bootstrap_ci(y, probs, ["a", "b", "c"], n_boot=50)
    assert ci["auc"] == [None, None] and ci["accuracy"][0] <= m["accuracy"] <= ci["accuracy"][1]
    with pytest.raises(ValueError, match="probs: expected"):
        classification_metrics(y, probs, ["a", "b"])
    with pytest.raises(ValueError, match="class indices"):
        classification_metrics(y + 3, probs, ["a", "b", "c"])


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("n_classes", [2, 3, 4])
def test_vectorised_resamples_equal_classification_metrics(n_classes):
    """The bootstrap's batched formulas give what scikit-learn gives on each resample, ties
    and resamples missing a class included."""
    rng = np.random.default_rng(10 + n_classes)
    y, probs = predictions(rng, 40, n_classes, tied=True)
    idx = rng.integers(0, len(y), size=(16, 12))
    idx[:2] = rng.choice(np.flatnonzero(y != 1), size=(2, 12))  # resamples without class 1
    batched = _resampled_scalars(y, probs, idx)
    for b, rows in enumerate(idx):
        direct = classification_metrics(y[rows], probs[rows], classes_of(n_classes))
        for name in SCALAR_METRICS:
            if direct[name] is None:
                assert np.isnan(batched[name][b]), name
            else:
                assert batched[name][b] == pytest.approx(direct[name], abs=1e-12), name
    assert np.isnan(batched["auc"][:2]).all() and not np.isnan(batched["accuracy"]).any()


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(4)
    widths = {}
    for n in (120, 2400):
        y, probs = predictions(rng, n, 3, signal=1.5)
        point = classification_metrics(y, probs, classes_of(3))
        ci = bootstrap_ci(y, probs, classes_of(3), n_boot=400, seed=1)
        assert set(ci) == set(SCALAR_METRICS)
        for name in SCALAR_METRICS:
            low, high = ci[name]
            assert type(low) is float and low < high
            if n > 1000:
                assert low <= point[name] <= high, name
        widths[n] = {name: high - low for name, (low, high) in ci.items()}
        assert ci == bootstrap_ci(y, probs, classes_of(3), n_boot=400, seed=1)
        assert ci != bootstrap_ci(y, probs, classes_of(3), n_boot=400, seed=2)
    for name in SCALAR_METRICS:
        assert widths[2400][name] < 0.5 * widths[120][name], name


def test_bootstrap_of_a_hundred_images_takes_well_under_three_seconds():
    y, probs = predictions(np.random.default_rng(5), 100, 4)
    start = time.perf_counter()
    bootstrap_ci(y, probs, classes_of(4), n_boot=1000)
    assert time.perf_counter() - start < 3.0


def test_summarize_gives_mean_sd_and_count_over_folds():
    rng = np.random.default_rng(6)
    folds = [dict(zip(SCALAR_METRICS, rng.random(len(SCALAR_METRICS)).tolist()))
             for _ in range(5)]
    folds[2]["auc"] = None  # undefined in one fold: left out, not counted as 0
    summary = summarize(folds)
    for name in SCALAR_METRICS:
        values = [f[name] for f in folds if f[name] is not None]
        assert summary[name]["n"] == len(values)
        assert summary[name]["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert summary[name]["sd"] == pytest.approx(statistics.stdev(values), abs=1e-12)
    assert summary["auc"]["n"] == 4
    single = summarize(folds[:1])
    assert single["f1"] == {"mean": folds[0]["f1"], "sd": 0.0, "n": 1}
    assert summarize([{"auc": None}])["auc"] == {"mean": None, "sd": None, "n": 0}
    assert_plain(summary)
