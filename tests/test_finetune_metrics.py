"""Classification metrics against scikit-learn computed directly on random predictions (binary,
3 and 4 classes), specificity from the confusion matrix, undefined AUC, the vectorised
bootstrap (images and patients resampled, against a brute-force loop), and the mean ± sd and
t-interval over folds."""
import json
import statistics
import time

import numpy as np
import pytest
from scipy import stats as sps
from sklearn.metrics import (accuracy_score, balanced_accuracy_score, confusion_matrix, f1_score,
                             precision_score, recall_score, roc_auc_score)

from usfmae_fast.finetune.metrics import (ALL_METRICS, AVERAGED_METRICS, SCALAR_METRICS,
                                          _resampled_scalars, bootstrap_ci, bootstrap_weights,
                                          classification_metrics, fold_mean_ci,
                                          resampling_units, summarize)


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


def sklearn_averages(y, pred, specificity):
    """The macro and weighted averages of AVERAGED_METRICS straight from scikit-learn, and
    specificity averaged over classes (weighted by each class's true images)."""
    support = np.bincount(y, minlength=len(specificity))
    out = {"specificity_macro": specificity.mean(),
           "specificity_weighted": (specificity * support).sum() / support.sum(),
           "f1_macro": f1_score(y, pred, average="macro", zero_division=0)}
    for average in ("macro", "weighted"):
        out[f"precision_{average}"] = precision_score(y, pred, average=average, zero_division=0)
        out[f"recall_{average}"] = recall_score(y, pred, average=average, zero_division=0)
    assert set(out) == set(AVERAGED_METRICS)
    return out


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
    for name, value in sklearn_averages(y, pred, np.array([tp / (tp + fn),
                                                           tn / (tn + fp)])).items():
        assert m[name] == pytest.approx(value, abs=1e-12), name
    assert m["recall_weighted"] == pytest.approx(m["accuracy"], abs=1e-12)
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
        **sklearn_averages(y, pred, specificity),
    }
    assert set(expected) == set(ALL_METRICS)
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


def weights_of(rows, n):
    """Image weights [B, N] of resamples given as index rows (each row: the images drawn)."""
    return np.stack([np.bincount(r, minlength=n) for r in rows]).astype(np.float64)


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("n_classes", [2, 3, 4])
def test_vectorised_resamples_equal_classification_metrics(n_classes):
    """The bootstrap's batched formulas give what scikit-learn gives on each resample, ties,
    resamples missing a class and resamples of different sizes (patients drawn) included."""
    rng = np.random.default_rng(10 + n_classes)
    y, probs = predictions(rng, 40, n_classes, tied=True)
    rows = list(rng.integers(0, len(y), size=(16, 12)))
    rows[:2] = rng.choice(np.flatnonzero(y != 1), size=(2, 12))  # resamples without class 1
    rows += [rng.integers(0, len(y), size=int(rng.integers(1, 60))) for _ in range(8)]
    batched = _resampled_scalars(y, probs, weights_of(rows, len(y)))
    for b, rows_b in enumerate(rows):
        direct = classification_metrics(y[rows_b], probs[rows_b], classes_of(n_classes))
        for name in ALL_METRICS:
            if direct[name] is None:
                assert np.isnan(batched[name][b]), name
            else:
                assert batched[name][b] == pytest.approx(direct[name], abs=1e-12), name
    assert np.isnan(batched["auc"][:2]).all() and not np.isnan(batched["accuracy"]).any()


def brute_force_ci(y, probs, classes, groups, n_boot, seed, level=0.95):
    """Patients drawn with the documented stream, images concatenated, scored one resample at a
    time by classification_metrics (scikit-learn), percentiles taken."""
    ids, unit_of = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(unit_of == u) for u in range(len(ids))]
    draws = np.random.default_rng(seed).integers(0, len(ids), size=(n_boot, len(ids)))
    values = {name: [] for name in ALL_METRICS}
    for row in draws:
        images = np.concatenate([members[u] for u in row])
        m = classification_metrics(y[images], probs[images], classes)
        for name in ALL_METRICS:
            if m[name] is not None:
                values[name].append(m[name])
    tail = 50 * (1 - level)
    return {name: [np.percentile(v, tail), np.percentile(v, 100 - tail)] if v else [None, None]
            for name, v in values.items()}


@pytest.mark.filterwarnings("ignore:y_pred contains classes not in y_true")
@pytest.mark.parametrize("n_classes", [2, 3])
def test_clustered_bootstrap_equals_brute_force(n_classes):
    rng = np.random.default_rng(20 + n_classes)
    n_patients = 15
    per_patient = rng.integers(1, 5, size=n_patients)          # 1 to 4 images per patient
    groups = np.repeat([f"p{i:02d}" for i in rng.permutation(n_patients)], per_patient)
    y, probs = predictions(rng, len(groups), n_classes, tied=True)
    classes = classes_of(n_classes)
    ours = bootstrap_ci(y, probs, classes, n_boot=150, seed=7, level=0.9, groups=groups)
    ref = brute_force_ci(y, probs, classes, groups, 150, 7, level=0.9)
    assert set(ours) == set(ALL_METRICS)
    for name in ALL_METRICS:
        assert ours[name] == pytest.approx(ref[name], abs=1e-12), name
    assert_plain(ours)


def test_one_image_per_patient_is_the_image_bootstrap():
    rng = np.random.default_rng(30)
    y, probs = predictions(rng, 80, 3)
    images = bootstrap_ci(y, probs, classes_of(3), n_boot=200, seed=4)
    patients = bootstrap_ci(y, probs, classes_of(3), n_boot=200, seed=4,
                            groups=np.arange(80) * 7 + 3)        # sorted ids: unit i = image i
    for name in ALL_METRICS:
        assert patients[name] == pytest.approx(images[name], abs=1e-12), name
    # the chunked draws are the rows of one draw of all resamples
    unit_of = np.arange(80)
    chunks = np.concatenate(list(bootstrap_weights(unit_of, 50, seed=4, max_values=80 * 7)))
    whole = weights_of(np.random.default_rng(4).integers(0, 80, size=(50, 80)), 80)
    assert np.array_equal(chunks, whole)


def test_copies_of_each_patient_widen_the_patient_interval_only():
    """Five identical images per patient: resampling images pretends there are 5x as many
    independent cases; resampling patients gives the interval of the 60 patients."""
    rng = np.random.default_rng(31)
    y, probs = predictions(rng, 60, 2)
    y5, probs5, groups = np.repeat(y, 5), np.repeat(probs, 5, axis=0), np.repeat(np.arange(60), 5)
    per_patient = bootstrap_ci(y, probs, classes_of(2), n_boot=400, seed=1)
    clustered = bootstrap_ci(y5, probs5, classes_of(2), n_boot=400, seed=1, groups=groups)
    images = bootstrap_ci(y5, probs5, classes_of(2), n_boot=400, seed=1)
    for name in ("auc", "accuracy", "f1", "specificity_weighted"):
        assert clustered[name] == pytest.approx(per_patient[name], abs=1e-12), name
        width = lambda ci: ci[name][1] - ci[name][0]
        assert width(clustered) > 1.7 * width(images), name   # about sqrt(5) = 2.2


def test_groups_and_bootstrap_arguments_are_checked():
    y, probs = predictions(np.random.default_rng(32), 20, 2)
    with pytest.raises(ValueError, match="^groups: expected one patient id per image"):
        bootstrap_ci(y, probs, classes_of(2), n_boot=5, groups=np.arange(19))
    with pytest.raises(ValueError, match="^groups: contains NaN"):
        bootstrap_ci(y, probs, classes_of(2), n_boot=5, groups=np.r_[np.nan, np.arange(19.0)])
    with pytest.raises(ValueError, match="^groups: patient ids must be"):
        bootstrap_ci(y, probs, classes_of(2), n_boot=5,
                     groups=np.array([None, *range(19)], dtype=object))
    with pytest.raises(ValueError, match="^n_boot:"):
        bootstrap_ci(y, probs, classes_of(2), n_boot=0)
    with pytest.raises(ValueError, match="^level:"):
        bootstrap_ci(y, probs, classes_of(2), n_boot=5, level=95)
    assert list(resampling_units(["b", "a", "b", "c"], 4)) == [1, 0, 1, 2]


def test_bootstrap_interval_contains_the_estimate_and_narrows_with_more_images():
    rng = np.random.default_rng(4)
    widths = {}
    for n in (120, 2400):
        y, probs = predictions(rng, n, 3, signal=1.5)
        point = classification_metrics(y, probs, classes_of(3))
        ci = bootstrap_ci(y, probs, classes_of(3), n_boot=400, seed=1)
        assert set(ci) == set(ALL_METRICS)
        for name in ALL_METRICS:
            low, high = ci[name]
            assert type(low) is float and low < high
            if n > 1000:
                assert low <= point[name] <= high, name
        widths[n] = {name: high - low for name, (low, high) in ci.items()}
        assert ci == bootstrap_ci(y, probs, classes_of(3), n_boot=400, seed=1)
        assert ci != bootstrap_ci(y, probs, classes_of(3), n_boot=400, seed=2)
    for name in ALL_METRICS:
        assert widths[2400][name] < 0.5 * widths[120][name], name


def test_bootstrap_of_a_hundred_images_takes_well_under_three_seconds():
    y, probs = predictions(np.random.default_rng(5), 100, 4)
    start = time.perf_counter()
    bootstrap_ci(y, probs, classes_of(4), n_boot=1000)
    assert time.perf_counter() - start < 3.0


def test_summarize_gives_mean_sd_count_and_t_interval_over_folds():
    rng = np.random.default_rng(6)
    folds = [dict(zip(ALL_METRICS, rng.random(len(ALL_METRICS)).tolist())) for _ in range(5)]
    folds[2]["auc"] = None  # undefined in one fold: left out, not counted as 0
    summary = summarize(folds)
    assert set(summary) == set(ALL_METRICS)
    for name in ALL_METRICS:
        values = [f[name] for f in folds if f[name] is not None]
        assert summary[name]["n"] == len(values)
        assert summary[name]["mean"] == pytest.approx(statistics.fmean(values), abs=1e-12)
        assert summary[name]["sd"] == pytest.approx(statistics.stdev(values), abs=1e-12)
        expected = sps.t.interval(0.95, len(values) - 1, loc=statistics.fmean(values),
                                  scale=statistics.stdev(values) / len(values) ** 0.5)
        clipped = [max(expected[0], 0.0), min(expected[1], 1.0)]  # every metric lies in [0, 1]
        assert summary[name]["ci"] == pytest.approx(clipped, abs=1e-12)
    assert summary["auc"]["n"] == 4
    single = summarize(folds[:1])
    assert single["f1"] == {"mean": folds[0]["f1"], "sd": 0.0, "n": 1, "ci": [None, None]}
    assert summarize([{"auc": None}])["auc"] == {"mean": None, "sd": None, "n": 0,
                                                 "ci": [None, None]}
    assert summarize(folds, level=0.8)["f1"]["ci"][0] > summary["f1"]["ci"][0]
    assert_plain(summary)


def test_fold_mean_ci():
    assert fold_mean_ci([0.8, None]) == [None, None] and fold_mean_ci([]) == [None, None]
    assert fold_mean_ci([0.7, 0.7, 0.7]) == pytest.approx([0.7, 0.7], abs=1e-15)
    # two folds: mean ± t(1; 0.975) * sd / sqrt(2) = 0.75 ± 12.706 * 0.05
    low, high = fold_mean_ci([0.7, 0.8, None])
    assert (low + high) / 2 == pytest.approx(0.75) and high - low == pytest.approx(
        2 * 12.7062047361747 * 0.05, rel=1e-9)
    assert fold_mean_ci([0.2, 0.8], bounds=(0.0, 1.0)) == [0.0, 1.0]
    assert fold_mean_ci([0.9, 0.92, 0.91], bounds=(0.0, 1.0))[1] == pytest.approx(
        0.91 + sps.t.ppf(0.975, 2) * 0.01 / 3 ** 0.5)  # inside the bounds: untouched
    with pytest.raises(ValueError, match="^level:"):
        fold_mean_ci([0.1, 0.2], level=1.0)
