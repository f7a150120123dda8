"""What a clinician reads off a model beyond AUC: the operating point and the calibration.

Both are *fitted* on validation predictions (:func:`fit_rules`; the protocol passes the pooled
out-of-fold predictions, which no epoch selection has seen) and *applied unchanged* to the test
set (:func:`assess`), so the test labels never choose anything:

* binary tasks: the decision threshold on the positive class's probability, by Youden's J or
  the highest threshold reaching a target sensitivity; sensitivity, specificity, PPV and NPV at
  that threshold with bootstrap intervals (clustered by patient when ids exist);
* every task: Brier score and expected calibration error (top-label, 15 equal-width bins), a
  reliability diagram, and optionally temperature scaling (Guo et al. 2017) fitted on the
  validation predictions; the headline metrics (AUC, F1, ...) stay those of the raw
  probabilities, the calibration numbers are given before and after.

Multi-class tasks predict the most probable class (no threshold).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from .calibration import (apply_temperature, brier_score, choose_threshold,
                          expected_calibration_error, fit_temperature, operating_point,
                          reliability_diagram)
from .metrics import checked_scores


@dataclass(frozen=True)
class Rules:
    """What was learnt from validation predictions; applied as is to other sets."""
    threshold: float | None          # binary: predict positive when p(positive) >= threshold
    rule: str | None                 # youden | sensitivity (binary), None (argmax)
    target_sensitivity: float | None
    temperature: float | None        # None: no temperature scaling
    fitted_on: str                   # which predictions, for the report
    n_fitted: int                    # how many images

    def to_dict(self) -> dict:
        return asdict(self)

    def calibrated(self, probs: np.ndarray) -> np.ndarray:
        return probs if self.temperature is None else apply_temperature(probs, self.temperature)

    def predict(self, probs: np.ndarray) -> np.ndarray:
        """Class indices: the threshold on the (calibrated) positive probability for binary
        tasks, the most probable class otherwise."""
        probs = self.calibrated(np.asarray(probs, dtype=np.float64))
        if self.threshold is None:
            return probs.argmax(axis=1)
        return (probs[:, 1] >= self.threshold).astype(np.int64)


def fit_rules(y_true, probs, classes, *, rule: str = "youden",
              target_sensitivity: float | None = None, temperature: bool = False,
              fitted_on: str = "validation predictions") -> Rules:
    """Temperature (when asked) and then, for binary tasks, the threshold on the calibrated
    positive probability, both from these (validation) predictions only."""
    y_true, probs = checked_scores(y_true, probs, classes)
    t = fit_temperature(probs, y_true) if temperature else None
    calibrated = probs if t is None else apply_temperature(probs, t)
    threshold = None
    if len(classes) == 2:
        threshold = choose_threshold(y_true, calibrated[:, 1], rule=rule,
                                     target_sensitivity=target_sensitivity)
    return Rules(None if threshold is None else float(threshold),
                 rule if threshold is not None else None,
                 target_sensitivity if threshold is not None else None,
                 None if t is None else float(t), fitted_on, int(len(y_true)))


def calibration_numbers(y_true, probs) -> dict:
    return {"brier": float(brier_score(y_true, probs)),
            "ece": float(expected_calibration_error(y_true, probs))}


def assess(y_true, probs, classes, rules: Rules, *, groups=None, n_boot: int = 1000,
           seed: int = 0, figure: str | Path | None = None, title: str = "") -> dict:
    """The operating point (binary) and calibration of ``probs`` on a labelled set under
    ``rules`` fitted elsewhere; ``figure``: where to draw the reliability diagram."""
    y_true, probs = checked_scores(y_true, probs, classes)
    calibrated = rules.calibrated(probs)
    out = {"rules": rules.to_dict(), "calibration": calibration_numbers(y_true, calibrated)}
    if rules.temperature is not None:
        out["calibration_uncalibrated"] = calibration_numbers(y_true, probs)
    if rules.threshold is not None:
        out["operating_point"] = operating_point(y_true, calibrated[:, 1], rules.threshold,
                                                 groups=groups, n_boot=n_boot, seed=seed)
    if figure is not None:
        out["reliability_figure"] = reliability_diagram(y_true, calibrated, figure, title=title)
    return out
