"""Every pair of models of one run, compared on the same images (:mod:`.stats`).

For each pair ``(a, b)``: the AUC difference ``a - b`` with a paired bootstrap percentile
interval (clustered by patient when ids exist), DeLong's p-value for correlated ROC curves
(one-vs-rest macro for multi-class; it treats images as independent), and McNemar's test of
the two models' accuracies at their operating points (the validation-chosen threshold for
binary tasks, the most probable class otherwise). The p-values are not adjusted for multiple
comparisons; ``n_pairs`` is given so a reader can apply Bonferroni (``level / n_pairs``).
A pair whose test cannot be computed (DeLong needs two images of each side per class) keeps
its other numbers and says why in ``not_computed``.
"""
from __future__ import annotations

from itertools import combinations

import numpy as np

from .stats import compare_auc, mcnemar


def compare_models(y_true, probs: dict[str, np.ndarray], predictions: dict[str, np.ndarray], *,
                   groups=None, n_boot: int = 2000, seed: int = 0, level: float = 0.95,
                   on: str = "test set") -> dict:
    """``{"on", "n_pairs", "level", "pairs": [...]}`` for every pair of ``probs``' models
    (in their order); ``predictions``: each model's predicted class indices."""
    y = np.asarray(y_true)
    pairs = []
    names = list(probs)
    for a, b in combinations(names, 2):
        pair = {"a": a, "b": b, "not_computed": {}}
        try:
            auc = compare_auc(y, probs[a], probs[b], groups, n_boot=n_boot, level=level,
                              seed=seed)
            pair.update(auc_a=auc.auc_a, auc_b=auc.auc_b, difference=auc.difference,
                        ci=list(auc.ci), p_delong=auc.p_value, n=auc.n,
                        resampled_units=auc.n_groups, n_boot_valid=auc.n_boot_valid)
        except ValueError as exc:
            pair["not_computed"]["auc"] = str(exc)
        test = mcnemar(y, predictions[a], predictions[b])
        pair.update(accuracy_a=float(np.mean(predictions[a] == y)),
                    accuracy_b=float(np.mean(predictions[b] == y)),
                    mcnemar={"a_right_b_wrong": test.b, "a_wrong_b_right": test.c,
                             "statistic": test.statistic, "p_value": test.p_value,
                             "exact": test.exact})
        pairs.append(pair)
    return {"on": on, "n_pairs": len(pairs), "level": level,
            "resampled": "patients" if groups is not None else "images", "pairs": pairs}
