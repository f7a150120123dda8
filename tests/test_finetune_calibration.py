"""Operating points and calibration against independent references: thresholds by brute force
over every candidate, operating-point intervals against a loop over patients, Brier against
scikit-learn, ECE on a hand-made example, temperature scaling on sharpened probabilities."""
import json

import numpy as np
import pytest
from scipy.special import softmax
from sklearn.metrics import brier_score_loss, log_loss

from usfmae_fast.finetune.calibration import (OPERATING_METRICS, apply_temperature, brier_score,
                                              choose_threshold, expected_calibration_error,
                                              fit_temperature, operating_point,
                                              reliability_diagram)


def binary_scores(rng, n, tied=False):
    y = rng.integers(0, 2, n)
    score = 1 / (1 + np.exp(-(rng.normal(size=n) + 1.2 * (2 * y - 1))))
    return y, np.round(score, 1) if tied else score


def brute_force_rates(y, score, threshold):
    called = score >= threshold
    tp, fp = np.sum(called & (y == 1)), np.sum(called & (y == 0))
    tn, fn = np.sum(~called & (y == 0)), np.sum(~called & (y == 1))
    return tp, fp, tn, fn


# ---------------------------------------------------------------------------------------------
# thresholds

@pytest.mark.parametrize("tied", [False, True])
def test_youden_threshold_is_the_best_candidate_and_the_highest_of_ties(tied):
    rng = np.random.default_rng(0)
    y, score = binary_scores(rng, 200, tied)
    candidates = np.unique(score)[::-1]                        # highest first
    youden = []
    for t in candidates:
        tp, fp, tn, fn = brute_force_rates(y, score, t)
        youden.append(tp / (tp + fn) + tn / (tn + fp) - 1)
    youden = np.array(youden)
    best = candidates[np.flatnonzero(np.isclose(youden, youden.max(), rtol=0, atol=1e-12))[0]]
    assert choose_threshold(y, score) == best
    assert choose_threshold(y, score, rule="youden") == best


def test_youden_ties_pick_the_highest_threshold():
    y = np.array([0, 0, 1, 1])
    score = np.array([0.1, 0.3, 0.6, 0.8])                      # J(0.8) = 0.5, J(0.6) = 1
    assert choose_threshold(y, score) == 0.6
    y = np.array([0, 1, 0, 1])
    score = np.array([0.2, 0.4, 0.6, 0.8])                      # J(0.8) = J(0.4) = 0.5
    assert choose_threshold(y, score) == 0.8


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_target_sensitivity_is_the_highest_threshold_reaching_it(target):
    rng = np.random.default_rng(1)
    y, score = binary_scores(rng, 150, tied=True)
    threshold = choose_threshold(y, score, target_sensitivity=target)
    assert threshold == choose_threshold(y, score, rule="sensitivity", target_sensitivity=target)
    sensitivity = lambda t: np.mean(score[y == 1] >= t)
    assert sensitivity(threshold) >= target
    higher = np.unique(score)[np.unique(score) > threshold]
    assert all(sensitivity(t) < target for t in higher)
    if target == 1.0:
        assert threshold == score[y == 1].min()


def test_threshold_depends_only_on_its_inputs():
    rng = np.random.default_rng(2)
    y, score = binary_scores(rng, 120)
    first = choose_threshold(y, score)
    np.random.seed(123)                                          # global RNG state is irrelevant
    order = rng.permutation(len(y))
    assert choose_threshold(y[order], score[order]) == first     # image order is irrelevant
    assert choose_threshold(y.tolist(), score.tolist()) == first
    y_other, score_other = binary_scores(np.random.default_rng(3), 120)
    assert choose_threshold(y_other, score_other) != first       # the inputs do matter


@pytest.mark.parametrize("kwargs, match", [
    ({"rule": "f1"}, "^rule:"),
    ({"rule": "sensitivity"}, "^target_sensitivity: required"),
    ({"target_sensitivity": 0.0}, "^target_sensitivity:"),
    ({"target_sensitivity": 1.2}, "^target_sensitivity:"),
])
def test_threshold_bad_arguments_name_themselves(kwargs, match):
    y, score = binary_scores(np.random.default_rng(4), 30)
    with pytest.raises(ValueError, match=match):
        choose_threshold(y, score, **kwargs)


def test_threshold_bad_inputs_name_themselves():
    y, score = binary_scores(np.random.default_rng(5), 30)
    with pytest.raises(ValueError, match="^y_true: a threshold needs positive and negative"):
        choose_threshold(np.ones(30, int), score)
    with pytest.raises(ValueError, match="^y_true: expected binary"):
        choose_threshold(y + 1, score)
    with pytest.raises(ValueError, match="^score: expected one"):
        choose_threshold(y, score[:-1])
    with pytest.raises(ValueError, match="^score: contains NaN"):
        choose_threshold(y, np.where(y == 1, np.nan, score))


# ---------------------------------------------------------------------------------------------
# operating point

def test_operating_point_counts_rates_and_clustered_interval_equal_brute_force():
    rng = np.random.default_rng(6)
    n_patients = 30
    groups = np.repeat(rng.permutation(n_patients) * 3 + 1, rng.integers(1, 4, n_patients))
    y, score = binary_scores(rng, len(groups))
    threshold = 0.55
    point = operating_point(y, score, threshold, groups=groups, n_boot=300, seed=9, level=0.9)
    json.dumps(point, allow_nan=False)
    tp, fp, tn, fn = brute_force_rates(y, score, threshold)
    assert (point["tp"], point["fp"], point["tn"], point["fn"]) == (tp, fp, tn, fn)
    expected = {"sensitivity": tp / (tp + fn), "specificity": tn / (tn + fp),
                "ppv": tp / (tp + fp), "npv": tn / (tn + fn), "accuracy": (tp + tn) / len(y)}
    for name, value in expected.items():
        assert point[name] == pytest.approx(value, abs=1e-12), name
    assert point["n"] == len(y) and point["n_groups"] == n_patients
    assert point["threshold"] == threshold and point["level"] == 0.9 and point["n_boot"] == 300
    # brute force: the same patient draws, the images concatenated, rates counted directly
    ids, unit_of = np.unique(groups, return_inverse=True)
    members = [np.flatnonzero(unit_of == u) for u in range(len(ids))]
    draws = np.random.default_rng(9).integers(0, len(ids), size=(300, len(ids)))
    values = {name: [] for name in OPERATING_METRICS}
    for row in draws:
        images = np.concatenate([members[u] for u in row])
        tp, fp, tn, fn = brute_force_rates(y[images], score[images], threshold)
        for name, (num, den) in {"sensitivity": (tp, tp + fn), "specificity": (tn, tn + fp),
                                 "ppv": (tp, tp + fp), "npv": (tn, tn + fn),
                                 "accuracy": (tp + tn, len(images))}.items():
            if den:
                values[name].append(num / den)
    for name in OPERATING_METRICS:
        assert point["ci"][name] == pytest.approx(
            [np.percentile(values[name], 5), np.percentile(values[name], 95)], abs=1e-12), name


def test_operating_point_undefined_ratios_are_none():
    y = np.array([0, 0, 1, 1])
    point = operating_point(y, np.array([0.1, 0.2, 0.3, 0.4]), threshold=0.9, n_boot=50)
    assert point["ppv"] is None and point["ci"]["ppv"] == [None, None]
    assert point["sensitivity"] == 0.0 and point["specificity"] == 1.0
    only_negatives = operating_point(np.zeros(5, int), np.linspace(0, 1, 5), 0.5, n_boot=20)
    assert only_negatives["sensitivity"] is None and only_negatives["tp"] == 0
    json.dumps(point, allow_nan=False)
    with pytest.raises(ValueError, match="^threshold:"):
        operating_point(y, np.ones(4) / 2, float("nan"))
    with pytest.raises(ValueError, match="^groups:"):
        operating_point(y, np.ones(4) / 2, 0.5, groups=[1, 2, 3])
    with pytest.raises(ValueError, match="^n_boot:"):
        operating_point(y, np.ones(4) / 2, 0.5, n_boot=0)


# ---------------------------------------------------------------------------------------------
# Brier, ECE, reliability diagram

def random_probs(rng, n, k, sharpness=1.0):
    y = rng.integers(0, k, n)
    logits = rng.normal(size=(n, k)) + 1.5 * np.eye(k)[y]
    return y, softmax(sharpness * logits, axis=1), logits


def test_brier_binary_is_scikit_learns_and_multiclass_is_the_sum_over_classes():
    rng = np.random.default_rng(7)
    y, probs, _ = random_probs(rng, 100, 2)
    assert brier_score(y, probs) == pytest.approx(brier_score_loss(y, probs[:, 1]), abs=1e-15)
    y3, probs3, _ = random_probs(rng, 100, 3)
    by_hand = np.mean([sum((probs3[i, c] - (y3[i] == c)) ** 2 for c in range(3))
                       for i in range(100)])
    assert brier_score(y3, probs3) == pytest.approx(by_hand, abs=1e-12)
    try:                                                   # scikit-learn >= 1.7: multi-class
        reference = brier_score_loss(y3, probs3, labels=[0, 1, 2])
    except ValueError:
        reference = by_hand
    assert brier_score(y3, probs3) == pytest.approx(reference, abs=1e-12)
    assert brier_score([0, 1], [[1.0, 0.0], [0.0, 1.0]]) == 0.0


def test_ece_on_a_hand_made_example():
    # 5 bins of width 0.2, each (low, high]; confidence = the larger probability
    probs = np.array([[0.3, 0.7], [0.7, 0.3], [0.2, 0.8], [0.6, 0.4],
                      [0.05, 0.95], [0.1, 0.9]])
    y = np.array([1, 1, 1, 0, 1, 0])
    # (0.4, 0.6]: image 3 (conf 0.6, correct)           -> |1 - 0.6| * 1 = 0.4
    # (0.6, 0.8]: images 0, 1, 2 (conf .7 .7 .8; right, wrong, right) -> |2 - 2.2| = 0.2
    # (0.8, 1.0]: images 4, 5 (conf .95 .9; right, wrong) -> |1 - 1.85| = 0.85
    assert expected_calibration_error(y, probs, n_bins=5) == pytest.approx((0.4 + 0.2 + 0.85) / 6,
                                                                           abs=1e-12)
    # a single bin: |accuracy - mean confidence|
    assert expected_calibration_error(y, probs, n_bins=1) == pytest.approx(
        abs(4 / 6 - probs.max(1).mean()), abs=1e-12)
    three = np.array([[0.5, 0.3, 0.2], [0.1, 0.1, 0.8]])
    assert expected_calibration_error([0, 0], three, n_bins=2) == pytest.approx(
        (abs(1 - 0.5) + abs(0 - 0.8)) / 2, abs=1e-12)
    with pytest.raises(ValueError, match="^n_bins:"):
        expected_calibration_error(y, probs, n_bins=0)
    with pytest.raises(ValueError, match="^probs: every row must sum to 1"):
        expected_calibration_error(y, probs * 0.9, n_bins=5)
    with pytest.raises(ValueError, match="^y_true:"):
        expected_calibration_error(y[:-1], probs)


@pytest.mark.parametrize("k", [2, 4])
def test_reliability_diagram_is_written(tmp_path, k):
    y, probs, _ = random_probs(np.random.default_rng(8), 200, k)
    path = reliability_diagram(y, probs, tmp_path / "sub" / f"reliability_{k}.png", title="t")
    assert path.is_file() and path.stat().st_size > 5000
    perfect = np.eye(k)[y]                                    # every top label right
    assert reliability_diagram(y, perfect, tmp_path / "perfect.png").is_file()


# ---------------------------------------------------------------------------------------------
# temperature scaling

def test_temperature_recovers_the_sharpening_and_lowers_the_nll():
    rng = np.random.default_rng(9)
    y, _, logits = random_probs(rng, 4000, 3)
    calibrated = softmax(logits, axis=1)                      # true model: these probabilities
    y = np.array([rng.choice(3, p=p) for p in calibrated])    # labels drawn from them
    over_confident = softmax(2.5 * logits, axis=1)
    T = fit_temperature(over_confident, y)
    assert T == pytest.approx(2.5, rel=0.1)
    scaled = apply_temperature(over_confident, T)
    assert log_loss(y, scaled) < log_loss(y, over_confident)
    assert expected_calibration_error(y, scaled) < expected_calibration_error(y, over_confident)
    assert np.array_equal(scaled.argmax(1), over_confident.argmax(1))
    assert fit_temperature(calibrated, y) == pytest.approx(1.0, abs=0.1)


def test_temperature_one_is_the_identity_and_argmax_never_changes():
    rng = np.random.default_rng(10)
    _, probs, _ = random_probs(rng, 300, 4)
    np.testing.assert_allclose(apply_temperature(probs, 1.0), probs, rtol=0, atol=1e-15)
    for T in (0.05, 0.3, 3.0, 20.0):
        assert np.array_equal(apply_temperature(probs, T).argmax(1), probs.argmax(1)), T
    assert np.isfinite(apply_temperature(np.array([[1.0, 0.0]]), 2.0)).all()
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(ValueError, match="^T:"):
            apply_temperature(probs, bad)
    with pytest.raises(ValueError, match="^probs:"):
        fit_temperature(probs[:, :1], np.zeros(300, int))
