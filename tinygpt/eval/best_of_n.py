"""Best-of-n (rejection sampling): of n sampled answers, keep the one a judge scores highest.

It separates what a reward model can tell apart from what RL optimisation adds (InstructGPT's and
Gao et al. 2022's baseline): if the SFT model's best-of-16 by the reward model does not beat SFT,
no PPO run against that reward model will; best-of-n by the world's noiseless labeler is the
ceiling any judge could reach with the same samples. KL(best-of-n || SFT) has a closed form,
``log n - (n - 1) / n`` (Stiennon et al. 2020, appendix), the x-axis of an over-optimisation curve.

Pure functions on scores; `tinygpt evaluate --best-of` samples, scores and reports.
"""

from __future__ import annotations

import math
from collections.abc import Sequence


def best_of_n(scores: Sequence[Sequence[float]], n: int) -> list[int]:
    """For each item, the index of its highest-scored answer among the first ``n`` (ties: the earliest).

    ``scores[i][j]`` is the judge's score of item i's j-th sample; every item needs at least n samples.
    """
    if n < 1:
        raise ValueError(f"best_of_n: n must be >= 1, got {n}")
    picks = []
    for i, row in enumerate(scores):
        if len(row) < n:
            raise ValueError(f"best_of_n: item {i} has {len(row)} samples, fewer than n={n}")
        first = list(row[:n])
        picks.append(max(range(n), key=lambda j: (first[j], -j)))
    return picks


def best_of_n_kl(n: int) -> float:
    """KL(best-of-n || base policy) in nats, for distinct samples: ``log n - (n - 1) / n``."""
    if n < 1:
        raise ValueError(f"best_of_n_kl: n must be >= 1, got {n}")
    return math.log(n) - (n - 1) / n
