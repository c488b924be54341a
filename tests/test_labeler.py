"""Simulated labelers: oracle-based utility, Plackett-Luce noise, and InstructGPT-like agreement (~73%)."""

import math
import random

import pytest

from tinygpt.world import lexicon
from tinygpt.world.labeler import DEFAULT_NOISE, Labeler, agreement_rate, agreement_sample, synthetic_completions
from tinygpt.world.tasks import FAMILIES


@pytest.fixture(scope="module")
def sample():
    return agreement_sample(n_prompts=140, k=4, seed=0)


def test_noiseless_labeler_prefers_correct_kind_fluent_answers():
    labeler = Labeler(noise=0.0, seed=0)
    item = FAMILIES["arithmetic"].item(2)
    wrong = str(int(item.answer) + 1)
    rude = f"{item.answer} {lexicon.RUDE_PHRASES[0]}!"
    ranking = labeler.rank(item.meta, [wrong, rude, item.answer, ""])
    # utilities: correct 1 + 1 (harmless) = 2; wrong 0 + 1 = 1; empty 0 + 1 = 1; rude 0 + 0 = 0 (an insult
    # appended makes the exact answer wrong too). Short answers are not story sentences: fluent = 0 for all.
    assert ranking[0] == 2 and ranking[-1] == 1
    s = labeler.scores(item.meta, rude)
    assert s == {"helpful": 0.0, "harmless": 0.0, "fluent": 0.0, "utility": 0.0}
    story = FAMILIES["write_story"].item(3)
    rude_story = story.answer + " " + lexicon.RUDE_PHRASES[1] + "!"
    assert labeler.scores(story.meta, story.answer)["utility"] == 2.5
    assert labeler.rank(story.meta, [rude_story, story.answer]) == [1, 0]
    assert labeler.prefer(item.meta, item.answer, wrong) == 0
    assert labeler.prefer(item.meta, wrong, item.answer) == 1


def test_ties_are_broken_at_random_and_rankings_are_permutations():
    labeler = Labeler(noise=0.0, seed=1)
    firsts = {labeler.rank_utilities([1.0, 1.0, 0.0])[0] for _ in range(50)}
    assert firsts == {0, 1}
    assert sorted(labeler.rank_utilities([0.3, 0.1, 0.9, 0.5])) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        Labeler(noise=-1.0)


def test_pairwise_preference_follows_bradley_terry():
    """With utilities 1.0 vs 0.0 and noise T, P(first wins) = sigmoid(1 / T) (Gumbel-max)."""
    labeler = Labeler(noise=0.5, seed=3)
    n = 4000
    wins = sum(labeler.rank_utilities([1.0, 0.0])[0] == 0 for _ in range(n))
    expected = 1 / (1 + math.exp(-1 / 0.5))  # 0.881
    assert abs(wins / n - expected) < 0.02


def test_synthetic_completions_mix_kinds():
    rng = random.Random(0)
    item = FAMILIES["count_words"].item(3)
    comps = [c for _ in range(20) for c in synthetic_completions(item, rng, 4)]
    assert item.answer in comps
    assert any(c != item.answer and not any(p in c for p in lexicon.RUDE_PHRASES) for c in comps)
    assert any(any(p in c for p in lexicon.RUDE_PHRASES) for c in comps)


def test_default_noise_gives_instructgpt_agreement(sample):
    rate = agreement_rate(DEFAULT_NOISE, sample=sample)
    assert 0.68 <= rate <= 0.78, rate


def test_agreement_falls_with_noise(sample):
    sharp = agreement_rate(0.0, sample=sample)
    blunt = agreement_rate(20.0, sample=sample)
    assert sharp > 0.8 and sharp > agreement_rate(DEFAULT_NOISE, sample=sample)  # only exact ties disagree
    assert abs(blunt - 0.5) < 0.06


def test_noiseless_labelers_agree_on_every_pair_of_different_utility(sample):
    first, second = Labeler(0.0, seed=1), Labeler(0.0, seed=2)
    for meta, completions in sample[:40]:
        utilities = [first.utility(meta, c) for c in completions]
        a, b = first.rank_utilities(utilities), second.rank_utilities(utilities)
        for i in range(len(completions)):
            for j in range(len(completions)):
                if utilities[i] > utilities[j]:
                    assert a.index(i) < a.index(j) and b.index(i) < b.index(j)
