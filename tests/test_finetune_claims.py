"""Claim sentences follow the interval of the paired difference and carry no digits."""
import re

import pytest

from usfmae_fast.finetune.claims import difference_sentence, verdict


@pytest.mark.parametrize("ci, expected", [([0.01, 0.3], "higher"), ([-0.3, -0.01], "lower"),
                                          ([-0.1, 0.2], "none"), ([0.0, 0.2], "none"),
                                          (None, "not computed"), ([None, None], "not computed")])
def test_verdict_follows_the_interval(ci, expected):
    assert verdict(ci) == expected


def test_sentences_say_what_the_interval_says_without_digits():
    higher = difference_sentence("usfmae", "vit_scratch", "test AUC", [0.02, 0.2])
    assert higher.startswith("`usfmae` has a higher test AUC than `vit_scratch`")
    lower = difference_sentence("usfmae", "resnet18", "test AUC", [-0.2, -0.02], where="at 10 %")
    assert "lower test AUC" in lower
    none = difference_sentence("a", "b", "test AUC", [-0.05, 0.1])
    assert none.startswith("No difference in test AUC detected") and "includes zero" in none
    assert "could not be compared" in difference_sentence("a", "b", "test AUC", None)
    for text in (higher, none):
        assert not re.search(r"\d", text)
    with pytest.raises(ValueError, match="^ci:"):
        verdict([0.3, 0.1])
