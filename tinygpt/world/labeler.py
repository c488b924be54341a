"""Simulated labelers: rank K completions of one prompt the way an InstructGPT labeler would.

A labeler scores each completion with the oracle on three axes and combines them into a utility:

    helpful  = tasks.grade(prompt_meta, completion)     in [0, 1] (exact answer, or story consistency)
    harmless = 0 if the oracle finds it rude, else 1
    fluent   = oracle.grammar_score(completion)         in [0, 1]
    utility  = w_helpful * helpful + w_harmless * harmless + w_fluent * fluent

It then ranks by a Plackett-Luce sample: ``utility + noise * Gumbel``, sorted best first (the
Gumbel-max trick), so a pair is ordered a > b with probability ``sigmoid((u_a - u_b) / noise)``;
identical utilities are broken by that noise. The default noise is set so that two independently
seeded labelers agree on ~73% of pairwise preferences over realistic completion sets (InstructGPT
reports 72.6 +- 1.5% between training labelers): see :func:`agreement_rate`.

This module knows nothing about models or tokenizers: completions are strings, prompts are the
grading metadata of a task item (:mod:`tinygpt.world.tasks`).
"""

from __future__ import annotations

import itertools
import math
import random
from dataclasses import dataclass
from typing import Sequence

from tinygpt.world import lexicon, oracle
from tinygpt.world.stories import generate_story
from tinygpt.world.tasks import FAMILIES, TaskItem, grade, misspell

# Calibrated with ``python -m tinygpt.world.labeler``: on 2,000 prompts x K=4 (12,000 pairs), noise 0.35 /
# 0.40 / 0.45 gives agreement 0.751 / 0.730 / 0.712; noise 0 gives 0.83 (pairs of equal utility, e.g. two
# identical correct answers, are coin flips), and large noise 0.5.
DEFAULT_NOISE = 0.4


@dataclass(frozen=True)
class UtilityWeights:
    helpful: float = 1.0
    harmless: float = 1.0
    fluent: float = 0.5


class Labeler:
    """A seeded, noisy ranker of completions. ``noise=0`` ranks by utility alone (ties at random)."""

    def __init__(self, noise: float = DEFAULT_NOISE, seed: int = 0, weights: UtilityWeights = UtilityWeights()):
        if noise < 0 or not math.isfinite(noise):
            raise ValueError(f"Labeler noise must be a finite number >= 0, got {noise}")
        self.noise = noise
        self.weights = weights
        self.rng = random.Random(f"labeler|{seed}")

    def scores(self, prompt_meta: dict | TaskItem, completion: str) -> dict[str, float]:
        """The noiseless judgement of one completion: helpful, harmless, fluent and their utility."""
        if not isinstance(completion, str):
            raise TypeError(f"completion must be a str, got {type(completion).__name__}")
        helpful = grade(prompt_meta, completion) if completion.strip() else 0.0
        harmless = 0.0 if oracle.is_rude(completion) else 1.0
        fluent = float(oracle.grammar_score(completion)) if completion.strip() else 0.0
        w = self.weights
        utility = w.helpful * helpful + w.harmless * harmless + w.fluent * fluent
        return {"helpful": helpful, "harmless": harmless, "fluent": fluent, "utility": utility}

    def utility(self, prompt_meta: dict | TaskItem, completion: str) -> float:
        return self.scores(prompt_meta, completion)["utility"]

    def rank_utilities(self, utilities: Sequence[float]) -> list[int]:
        """Indices best first, from a Plackett-Luce sample with logits ``utility / noise``."""
        keyed = []
        for i, u in enumerate(utilities):
            gumbel = -math.log(-math.log(self.rng.random() or 1e-300) or 1e-300)
            tie_break = self.rng.random()  # only decides between exactly equal keys (noise = 0)
            keyed.append((u + self.noise * gumbel, tie_break, i))
        keyed.sort(key=lambda t: (-t[0], t[1]))
        return [i for _, _, i in keyed]

    def rank(self, prompt_meta: dict | TaskItem, completions: Sequence[str]) -> list[int]:
        """Rank the completions of one prompt: a permutation of their indices, best first."""
        if len(completions) == 0:
            raise ValueError("rank: no completions")
        return self.rank_utilities([self.utility(prompt_meta, c) for c in completions])

    def prefer(self, prompt_meta: dict | TaskItem, a: str, b: str) -> int:
        """0 if this labeler prefers ``a``, 1 if it prefers ``b``."""
        return self.rank(prompt_meta, [a, b])[0]


# ------------------------------------------------------------------------------------------------
# realistic completion sets and labeler agreement
# ------------------------------------------------------------------------------------------------



def _wrong_answer(item: TaskItem, rng: random.Random) -> str:
    gold = item.answer
    if gold.lstrip("-").isdigit():
        return str(int(gold) + rng.choice((-3, -2, -1, 1, 2, 3)))
    if item.family == "reverse_words":
        words = item.meta["words"]
        sep = item.meta["separator"]
        return sep.join(words) if rng.random() < 0.5 else sep.join(rng.sample(words, len(words)))
    if item.family == "write_story":
        return generate_story(rng, None, rude_share=0.0).text  # a story, but not the one asked for
    if item.family == "summary":
        return generate_story(rng, None, rude_share=0.0).summary
    # story_qa: another character, place or object of the world.
    other = generate_story(rng, None, rude_share=0.0)
    return rng.choice([other.characters[0].name, other.place, other.object])


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
            out.append(_wrong_answer(item, rng))
        elif kind == "rude":
            base = item.answer if rng.random() < 0.6 else _wrong_answer(item, rng)
            out.append(f"{base} {rng.choice(lexicon.RUDE_PHRASES)}!")
        else:
            out.append(_garble(item.answer if rng.random() < 0.5 else _wrong_answer(item, rng), rng))
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
                   sample: list[tuple[dict, list[str]]] | None = None) -> float:
    """Share of completion pairs that two independently seeded labelers order the same way.

    Each labeler ranks every K-set once; all K choose 2 pairs of each ranking are compared.
    """
    sample = sample if sample is not None else agreement_sample(n_prompts, k, seed)
    first, second = Labeler(noise, labeler_seeds[0]), Labeler(noise, labeler_seeds[1])
    agree = total = 0
    for meta, completions in sample:
        utilities = [first.utility(meta, c) for c in completions]  # the oracle is deterministic: score once
        pos_a = {idx: r for r, idx in enumerate(first.rank_utilities(utilities))}
        pos_b = {idx: r for r, idx in enumerate(second.rank_utilities(utilities))}
        for i, j in itertools.combinations(range(len(completions)), 2):
            agree += (pos_a[i] < pos_a[j]) == (pos_b[i] < pos_b[j])
            total += 1
    if total == 0:
        raise ValueError("agreement_rate: the sample has no pairs (k must be >= 2)")
    return agree / total


if __name__ == "__main__":
    sample = agreement_sample()
    for noise in (0.0, 0.2, 0.4, 0.6, 0.8, 1.0, 1.5):
        print(f"noise {noise:4.2f}  agreement {agreement_rate(noise, sample=sample):.3f}")
