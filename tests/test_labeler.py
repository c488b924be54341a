"""Simulated labelers: oracle-based utility, ties, Plackett-Luce noise, and InstructGPT-like agreement (~73%)."""

import math
import random

import pytest

from tinygpt.world import lexicon
from tinygpt.world.labeler import (DEFAULT_NOISE, Labeler, agreement_rate, agreement_sample, calibrate_noise,
                                   compared_gaps, expected_agreement, expected_label_accuracy, synthetic_completions,
                                   tier_positions, tiers)
from tinygpt.world.tasks import FAMILIES


@pytest.fixture(scope="module")
def sample():
    return agreement_sample(n_prompts=140, k=4, seed=0)


def test_noiseless_labeler_prefers_correct_kind_fluent_answers():
    labeler = Labeler(noise=0.0, seed=0)
    item = FAMILIES["arithmetic"].item(2)
    gold = int(item.answer)
    near, far = str(gold + 1), str(gold + 40)
    rude = f"{item.answer} {lexicon.RUDE_PHRASES[0]}!"
    ranking = labeler.rank(item.meta, [near, rude, item.answer, "", far])
    # utilities: helpful + harmless + 0.5 * fluent, and a short answer is fluent when it is to the point.
    # correct: 1 + 1 + 0.5 = 2.5; a near miss: partial credit 0.5 * (1 - 1 / (gold + 2)) + 1 + 0.5; far
    # off: 0 + 1 + 0.5; rude: the appended insult makes the exact answer wrong (partial credit 0.5 for its
    # number), costs the harmless point, and is 3 words past the gold answer, still to the point: 1.0,
    # tied with the empty answer (0 + 1 + 0).
    assert ranking == [2, 0, 4, [1, 3]]
    assert labeler.scores(item.meta, near)["utility"] == pytest.approx(1.5 + 0.5 * (1 - 1 / (gold + 2)))
    assert labeler.scores(item.meta, rude) == {"helpful": 0.5, "harmless": 0.0, "fluent": 1.0, "utility": 1.0}
    story = FAMILIES["write_story"].item(3)
    rude_story = story.answer + " " + lexicon.RUDE_PHRASES[1] + "!"
    assert labeler.scores(story.meta, story.answer)["utility"] == 2.5
    assert labeler.rank(story.meta, [rude_story, story.answer]) == [1, 0]
    assert labeler.prefer(item.meta, item.answer, near) == 0
    assert labeler.prefer(item.meta, near, item.answer) == 1
    assert labeler.prefer(item.meta, far, str(gold + 41)) is None  # equally unhelpful: a tie, no preference
    exact = Labeler(noise=0.0, seed=0, partial_credit=False)
    assert exact.scores(item.meta, near)["utility"] == 1.5


def test_fluency_is_judged_the_way_the_question_asks_for_the_answer():
    """A grammatical story is not a fluent answer to a sum: it loses to a wrong number, while a story
    request is judged on its grammar."""
    labeler = Labeler(noise=0.0, seed=0)
    item = FAMILIES["arithmetic"].item(2)
    story = FAMILIES["write_story"].item(3)
    far = str(int(item.answer) + 40)
    assert labeler.scores(item.meta, story.answer)["fluent"] == 0.0
    assert labeler.prefer(item.meta, story.answer, far) == 1
    assert labeler.scores(item.meta, f"The answer is {item.answer}")["fluent"] == 1.0
    assert labeler.scores(story.meta, story.answer)["fluent"] == 1.0
    garbled = " ".join(reversed(story.answer.split()))
    assert labeler.scores(story.meta, garbled)["fluent"] < 0.5
    summary = FAMILIES["summary"].item(4)
    assert labeler.scores(summary.meta, summary.answer)["utility"] == 2.5


def test_tiers_group_utilities_within_the_margin_of_their_best():
    assert tiers([1.0, 2.0, 1.04, 0.9, 1.96], 0.05) == [[1, 4], [2, 0], [3]]
    assert tiers([1.0, 1.04, 1.08], 0.05) == [[2, 1], [0]]  # no chaining: 1.0 is 0.08 below the tier's best
    assert tiers([1.0, 1.0], 0.0) == [[0, 1]]
    labeler = Labeler(noise=0.0, seed=1)
    assert labeler.rank_utilities([1.0, 1.0, 0.0]) == [[0, 1], 2]
    assert tier_positions([2, [0, 3], 1]) == {2: 0, 0: 1, 3: 1, 1: 2}


def test_without_ties_equal_utilities_are_broken_at_random():
    labeler = Labeler(noise=0.0, seed=1, tie_margin=None)
    firsts = {labeler.rank_utilities([1.0, 1.0, 0.0])[0] for _ in range(50)}
    assert firsts == {0, 1}
    assert sorted(labeler.rank_utilities([0.3, 0.1, 0.9, 0.5])) == [0, 1, 2, 3]
    with pytest.raises(ValueError):
        Labeler(noise=-1.0)
    with pytest.raises(ValueError):
        Labeler(tie_margin=-0.1)


def test_calibrated_noise_gives_the_asked_agreement_and_predicts_it():
    """Two labelers at the calibrated noise agree on 73% of the ordered pairs, in simulation too."""
    # tiers [[0], [2, 1], [3]]: 1 and 2 are tied, so the pairs compared are (0,1) (0,2) (0,3) (1,3) (2,3)
    assert compared_gaps([2.0, 1.0, 1.02, 0.0], ["a", "b", "c", "d"]) == pytest.approx([1.0, 0.98, 2.0, 1.0, 1.02])
    assert compared_gaps([2.0, 1.0], ["same", "same"]) == []  # identical texts are not compared
    gaps = [1.0] * 10
    noise = calibrate_noise(gaps, 0.73)
    assert expected_agreement(gaps, noise) == pytest.approx(0.73)
    # p^2 + (1 - p)^2 = 0.73 -> p = (1 + sqrt(0.46)) / 2: a labeler is right on 83.9% of such pairs
    assert expected_label_accuracy(gaps, noise) == pytest.approx((1 + math.sqrt(0.46)) / 2)
    assert noise == pytest.approx(1.0 / math.log((1 + math.sqrt(0.46)) / (1 - math.sqrt(0.46))))
    first, second = Labeler(noise, seed=1), Labeler(noise, seed=2)
    agree = sum(first.rank_utilities([1.0, 0.0])[0] == second.rank_utilities([1.0, 0.0])[0] for _ in range(4000))
    assert abs(agree / 4000 - 0.73) < 0.025
    assert calibrate_noise([], 0.73) == DEFAULT_NOISE
    with pytest.raises(ValueError):
        calibrate_noise(gaps, 0.4)


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
    assert sharp == 1.0  # ties are left out; every other pair is ordered by utility
    assert abs(blunt - 0.5) < 0.06


def test_noiseless_labelers_agree_on_every_pair_of_different_utility(sample):
    first, second = Labeler(0.0, seed=1), Labeler(0.0, seed=2)
    for meta, completions in sample[:40]:
        utilities = [first.utility(meta, c) for c in completions]
        a, b = first.rank_utilities(utilities), second.rank_utilities(utilities)
        for i in range(len(completions)):
            for j in range(len(completions)):
                if utilities[i] > utilities[j] + 0.05:  # beyond the tie margin
                    pa, pb = tier_positions(a), tier_positions(b)
                    assert pa[i] < pa[j] and pb[i] < pb[j]
