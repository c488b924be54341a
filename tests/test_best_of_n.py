"""Best-of-n picks and its KL, worked by hand."""

import math

import pytest

from tinygpt.eval.best_of_n import best_of_n, best_of_n_kl


def test_best_of_n_picks_the_highest_of_the_first_n():
    scores = [[0.1, 0.9, 0.5, 2.0], [3.0, 1.0, 3.0, 0.0], [0.0, 0.0, 0.0, 0.0]]
    assert best_of_n(scores, 1) == [0, 0, 0]        # best-of-1 is the first sample
    assert best_of_n(scores, 2) == [1, 0, 0]
    assert best_of_n(scores, 4) == [3, 0, 0]        # ties go to the earliest sample
    with pytest.raises(ValueError, match="fewer than n=5"):
        best_of_n(scores, 5)
    with pytest.raises(ValueError):
        best_of_n(scores, 0)


def test_best_of_n_kl_closed_form():
    assert best_of_n_kl(1) == 0.0
    assert best_of_n_kl(4) == pytest.approx(math.log(4) - 0.75)   # 0.636
    assert best_of_n_kl(16) == pytest.approx(2.772589 - 0.9375)  # 1.835
