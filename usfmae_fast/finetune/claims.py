"""The sentences a report writes about two arms, generated from their paired result and never
by hand: the interval of the difference decides.

* above zero: "``a`` is higher than ``b`` ..."; below zero: "... lower ...";
* containing zero: "no difference detected" (which is not evidence that there is none: the
  data cannot tell the two apart at this sample size).

Sentences carry no digits: report.md keeps every number in a table (where a test matches it to
report.json), so a claim points at its table row instead of repeating the numbers.
"""
from __future__ import annotations

from collections.abc import Sequence


def verdict(ci: Sequence[float | None] | None) -> str:
    """``"higher"`` / ``"lower"`` when the interval of ``a - b`` excludes zero, ``"none"`` when
    it contains zero, ``"not computed"`` without an interval."""
    if not ci or ci[0] is None or ci[1] is None:
        return "not computed"
    low, high = ci
    if low > high:
        raise ValueError(f"ci: expected [low, high] with low <= high, got {list(ci)}")
    return "higher" if low > 0 else "lower" if high < 0 else "none"


def difference_sentence(a: str, b: str, what: str, ci, *, where: str = "") -> str:
    """One sentence on ``what`` (e.g. "test AUC") of arm ``a`` minus arm ``b`` from the interval
    ``ci`` of that paired difference; ``where`` names the set or condition."""
    at = f" {where}" if where else ""
    names = f"`{a}` and `{b}`"
    outcome = verdict(ci)
    if outcome == "not computed":
        return f"The {what} of {names}{at} could not be compared (see the table)."
    if outcome == "none":
        return (f"No difference in {what} detected between {names}{at}: the interval of the "
                "paired difference includes zero, so these data cannot tell them apart.")
    return (f"`{a}` has a {outcome} {what} than `{b}`{at}: the interval of the paired "
            "difference excludes zero.")
