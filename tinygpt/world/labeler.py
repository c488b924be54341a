"""Simulated labelers: rank K completions of one prompt the way an InstructGPT labeler would.

A labeler scores each completion with the oracle on three axes and combines them into a utility:

    helpful  = tasks.grade(prompt_meta, completion, partial=True)   in [0, 1]: 1 for the exact answer,
               up to 0.5 for a near miss (a close number, half the words reversed), story consistency
    harmless = 0 if the oracle finds it rude, else 1
    fluent   = oracle.grammar_score(completion)         in [0, 1], where the answer should be prose
               (write_story, summary); elsewhere 1 if the answer is to the point (at most
               CONCISE_SLACK words longer than the gold answer), else 0
    utility  = w_helpful * helpful + w_harmless * harmless + w_fluent * fluent

Fluency is judged the way the answer is asked for. A bare "29" is a fluent answer to "What is 13
plus 16?", and a grammatical story that ignores the question is not: judged by grammar alone, a
base model's story continuations beat an SFT model's wrong numbers, and a reward model learns to
pay for prose instead of answers.

Completions whose utilities lie within ``tie_margin`` of the best one of their group are *tied*: the
labeler puts them in one tier, as the ranking interfaces of human labelers allow, and a tie makes
no preference pair (two equally wrong answers teach a reward model nothing but noise). The tiers are
then ordered by a Plackett-Luce sample: ``utility + noise * Gumbel``, sorted best first (the
Gumbel-max trick), so tier a is put above tier b with probability ``sigmoid((u_a - u_b) / noise)``.
A ranking is best first, an int per completion or a list of tied ones: ``[2, [0, 3], 1]``.
The default noise is set so that two independently seeded labelers agree on ~73% of the pairs they
order, over realistic completion sets (InstructGPT reports 72.6 +- 1.5% between training
labelers): see :func:`agreement_rate`.

This module knows nothing about models or tokenizers: completions are strings, prompts are the
grading metadata of a task item (:mod:`tinygpt.world.tasks`).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Sequence, Union

from tinygpt.world import lexicon, oracle
from tinygpt.world.tasks import FAMILIES, TaskItem, grade, meta_of, misspell, wrong_answer

# Calibrated with ``python -m tinygpt.world.labeler`` on 2,000 prompts x K=4 of synthetic completions
# (correct, wrong, rude and garbled answers), over the pairs that are not tied: noise 0.4 / 0.5 / 0.6 gives
# agreement 0.783 / 0.732 / 0.693 (0.706 / 0.671 / 0.641 with ties off); noise 0 gives 1.0. See the table
# printed there and docs/design.md.
DEFAULT_NOISE = 0.5
# Utilities closer than this to the best of a tier are tied: a labeler cannot tell them apart.
DEFAULT_TIE_MARGIN = 0.05
# An answer to a question that wants a number, a list or a name is to the point (fluent) when it is at
# most this many words longer than the gold answer: room for "The answer is" or "It is".
CONCISE_SLACK = 3

Ranking = list[Union[int, list[int]]]


def tiers(utilities: Sequence[float], margin: float | None) -> list[list[int]]:
    """Group indices into tiers, best first: each tier holds the completions within ``margin`` of its
    best one (``margin=None``: no ties, a tier per completion)."""
    order = sorted(range(len(utilities)), key=lambda i: -utilities[i])
    groups: list[list[int]] = []
    for i in order:
        if groups and margin is not None and utilities[groups[-1][0]] - utilities[i] <= margin:
            groups[-1].append(i)
        else:
            groups.append([i])
    return groups


def tier_positions(ranking: Ranking) -> dict[int, int]:
    """Completion index -> its tier's position in a ranking (tied completions share one)."""
    return {i: pos for pos, entry in enumerate(ranking) for i in ([entry] if isinstance(entry, int) else entry)}


def fluency(prompt_meta: dict | TaskItem, completion: str) -> float:
    """How well formed an answer is, the way the question asks for it (see the module docstring): the
    grammar score of prose answers; for a number, a list or a name, 1.0 if it is to the point, else 0.0."""
    if not completion.strip():
        return 0.0
    meta = meta_of(prompt_meta)
    if FAMILIES[meta["family"]].prose:
        return float(oracle.grammar_score(completion))
    return 1.0 if len(completion.split()) <= len(str(meta["gold"]).split()) + CONCISE_SLACK else 0.0


@dataclass(frozen=True)
class UtilityWeights:
    helpful: float = 1.0
    harmless: float = 1.0
    fluent: float = 0.5


class Labeler:
    """A seeded, noisy ranker of completions.

    ``noise=0`` orders the tiers by utility alone. ``tie_margin=None`` turns ties off: every pair
    is ordered, exactly equal utilities at random. ``partial_credit=False`` grades exact families
    by exact match only.
    """

    def __init__(self, noise: float = DEFAULT_NOISE, seed: int = 0, weights: UtilityWeights = UtilityWeights(),
                 tie_margin: float | None = DEFAULT_TIE_MARGIN, partial_credit: bool = True):
        if noise < 0 or not math.isfinite(noise):
            raise ValueError(f"Labeler noise must be a finite number >= 0, got {noise}")
        if tie_margin is not None and (tie_margin < 0 or not math.isfinite(tie_margin)):
            raise ValueError(f"Labeler tie_margin must be a finite number >= 0 or None, got {tie_margin}")
        self.noise = noise
        self.weights = weights
        self.tie_margin = tie_margin
        self.partial_credit = partial_credit
        self.rng = random.Random(f"labeler|{seed}")

    def scores(self, prompt_meta: dict | TaskItem, completion: str) -> dict[str, float]:
        """The noiseless judgement of one completion: helpful, harmless, fluent and their utility."""
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        helpful = grade(prompt_meta, completion, partial=self.partial_credit) if completion.strip() else 0.0
        harmless = 0.0 if oracle.is_rude(completion) else 1.0
        fluent = fluency(prompt_meta, completion)
        w = self.weights
        utility = w.helpful * helpful + w.harmless * harmless + w.fluent * fluent
        return {"helpful": helpful, "harmless": harmless, "fluent": fluent, "utility": utility}

    def utility(self, prompt_meta: dict | TaskItem, completion: str) -> float:
        return self.scores(prompt_meta, completion)["utility"]

    def rank_utilities(self, utilities: Sequence[float]) -> Ranking:
        """A best-first ranking (tied completions in a list) from a Plackett-Luce sample over the tiers."""
        groups = tiers(utilities, self.tie_margin)
        keyed = []
        for group in groups:
            gumbel = -math.log(-math.log(self.rng.random() or 1e-300) or 1e-300)
            tie_break = self.rng.random()  # only decides between exactly equal keys (noise = 0)
            u = sum(utilities[i] for i in group) / len(group)
            keyed.append((u + self.noise * gumbel, tie_break, group))
        keyed.sort(key=lambda t: (-t[0], t[1]))
        return [group[0] if len(group) == 1 else sorted(group) for _, _, group in keyed]

    def rank(self, prompt_meta: dict | TaskItem, completions: Sequence[str]) -> Ranking:
        """Rank the completions of one prompt: every index once, best first, tied ones in a list."""
        if len(completions) == 0:
            raise ValueError("rank: no completions")
        return self.rank_utilities([self.utility(prompt_meta, c) for c in completions])

    def prefer(self, prompt_meta: dict | TaskItem, a: str, b: str) -> int | None:
        """0 if this labeler prefers ``a``, 1 if it prefers ``b``, None if it calls them a tie."""
        first = self.rank(prompt_meta, [a, b])[0]
        return None if isinstance(first, list) else first


# ------------------------------------------------------------------------------------------------
# the noise, set from the comparisons themselves
# ------------------------------------------------------------------------------------------------


def compared_gaps(utilities: Sequence[float], completions: Sequence[str] | None = None,
                  tie_margin: float | None = DEFAULT_TIE_MARGIN) -> list[float]:
    """Utility gaps |u_a - u_b| of the pairs a labeler orders: not tied, and (given the texts) not identical."""
    tier = {i: t for t, group in enumerate(tiers(utilities, tie_margin)) for i in group}
    return [abs(utilities[a] - utilities[b]) for a, b in itertools.combinations(range(len(utilities)), 2)
            if tier[a] != tier[b] and (completions is None or completions[a] != completions[b])]


def _p_right(gap: float, noise: float) -> float:
    """P(a labeler orders a pair by its utility): the difference of two Gumbels is logistic."""
    return 1.0 if noise == 0 else 1.0 / (1.0 + math.exp(-min(gap / noise, 700.0)))


def expected_label_accuracy(gaps: Sequence[float], noise: float) -> float:
    """Expected share of these pairs a labeler orders by utility: the best any reward model can score on its labels."""
    return sum(_p_right(g, noise) for g in gaps) / len(gaps)


def expected_agreement(gaps: Sequence[float], noise: float) -> float:
    """Expected share of these pairs two independent labelers order alike: mean of p^2 + (1 - p)^2."""
    return sum(p * p + (1 - p) * (1 - p) for p in (_p_right(g, noise) for g in gaps)) / len(gaps)


def calibrate_noise(gaps: Sequence[float], agreement: float) -> float:
    """The noise at which two labelers would agree on ``agreement`` of the pairs with these utility gaps.

    InstructGPT measured its labelers' agreement (72.6%) on the model outputs they actually
    compared; this sets the simulated labeler's noise the same way, so the labels are as noisy as
    that agreement says, whatever the policy's answers look like. Without gaps, DEFAULT_NOISE.
    """
    if not 0.5 < agreement < 1.0:
        raise ValueError(f"labeler agreement must be in (0.5, 1), got {agreement}")
    gaps = [g for g in gaps if g > 0]
    if not gaps:
        return DEFAULT_NOISE
    lo, hi = 1e-6, 1e3  # agreement falls from ~1 to ~0.5 as the noise grows: bisect in log space
    for _ in range(100):
        mid = math.sqrt(lo * hi)
        lo, hi = (mid, hi) if expected_agreement(gaps, mid) > agreement else (lo, mid)
    return math.sqrt(lo * hi)


# ------------------------------------------------------------------------------------------------
# realistic completion sets and labeler agreement
# ------------------------------------------------------------------------------------------------



def _garble(text: str, rng: random.Random) -> str:
    """An ungrammatical version: shuffled words and a few misspellings."""
    words = text.split()
    if len(words) < 3:
        words = words + rng.sample(["the", "is", "answer", "it", "so", "and"], 3)
    rng.shuffle(words)
    return " ".join(misspell(w, rng) if rng.random() < 0.3 else w for w in words)


def synthetic_completions(item: TaskItem, rng: random.Random, k: int = 4) -> list[str]:
    """K completions for ``item`` mixing correct, wrong, rude and ungrammatical answers."""
    kinds = ("correct", "correct", "wrong", "wrong", "rude", "garbled")
    out = []
    for _ in range(k):
        kind = rng.choice(kinds)
        if kind == "correct":
            out.append(item.answer)
        elif kind == "wrong":
            out.append(wrong_answer(item, rng))
        elif kind == "rude":
            base = item.answer if rng.random() < 0.6 else wrong_answer(item, rng)
            out.append(f"{base} {rng.choice(lexicon.RUDE_PHRASES)}!")
        else:
            out.append(_garble(item.answer if rng.random() < 0.5 else wrong_answer(item, rng), rng))
    return out


def agreement_sample(n_prompts: int = 120, k: int = 4, seed: int = 0,
                     families: Sequence[str] | None = None) -> list[tuple[dict, list[str]]]:
    """A fixed, seeded sample of (prompt meta, K completions), cycling through the task families."""
    families = list(families) if families is not None else list(FAMILIES)
    rng = random.Random(f"agreement|{seed}")
    sample = []
    for p in range(n_prompts):
        item = FAMILIES[families[p % len(families)]].item(1000 + p, seed=seed)
        sample.append((item.meta, synthetic_completions(item, rng, k)))
    return sample


def agreement_rate(noise: float = DEFAULT_NOISE, n_prompts: int = 120, k: int = 4, seed: int = 0,
                   labeler_seeds: tuple[int, int] = (1, 2),
                   sample: list[tuple[dict, list[str]]] | None = None,
                   tie_margin: float | None = DEFAULT_TIE_MARGIN) -> float:
    """Share of completion pairs that two independently seeded labelers order the same way.

    Each labeler ranks every K-set once; all K choose 2 pairs of each ranking are compared, except
    the pairs both call a tie (no comparison was made). A pair one orders and the other ties counts
    as a disagreement.
    """
    sample = sample if sample is not None else agreement_sample(n_prompts, k, seed)
    first = Labeler(noise, labeler_seeds[0], tie_margin=tie_margin)
    second = Labeler(noise, labeler_seeds[1], tie_margin=tie_margin)
    agree = total = 0
    for meta, completions in sample:
        utilities = [first.utility(meta, c) for c in completions]  # the oracle is deterministic: score once
        pos_a = tier_positions(first.rank_utilities(utilities))
        pos_b = tier_positions(second.rank_utilities(utilities))
        for i, j in itertools.combinations(range(len(completions)), 2):
            order_a, order_b = _sign(pos_a[j] - pos_a[i]), _sign(pos_b[j] - pos_b[i])
            if order_a == order_b == 0:
                continue
            agree += order_a == order_b
            total += 1
    if total == 0:
        raise ValueError("agreement_rate: the sample has no ordered pairs (k must be >= 2)")
    return agree / total


def _sign(x: int) -> int:
    return (x > 0) - (x < 0)


if __name__ == "__main__":
    sample = agreement_sample(n_prompts=2000)
    for noise in (0.0, 0.2, 0.3, 0.35, 0.4, 0.45, 0.5, 0.6, 0.8):
        print(f"noise {noise:4.2f}  agreement {agreement_rate(noise, sample=sample):.3f}"
              f"  (without ties {agreement_rate(noise, sample=sample, tie_margin=None):.3f})")
