"""The oracle: each corruption of a generated story is caught by the check meant for it, rudeness
counts, answers normalize, novelty separates seen from new text, and bad input does not break it."""

import random
import re
import time

import pytest

from tinygpt.world import lexicon as lx
from tinygpt.world import oracle
from tinygpt.world.stories import FEATURES, StorySpec, generate_story

STORIES = [generate_story(random.Random(1000 + i), StorySpec(features=tuple(
    f for j, f in enumerate(FEATURES) if i >> j & 1)) if i % 2 else None, rude_share=0.2) for i in range(80)]


# --- corruptions: each returns the corrupted text, or None when it does not apply ------------------


def shuffle_words(story, rng):
    out = []
    for s in oracle.sentences(story.text):
        words = s.split()
        shuffled = words[:]
        while len(set(words)) > 1 and shuffled == words:
            rng.shuffle(shuffled)
        out.append(" ".join(shuffled))
    return " ".join(out)


def _replace_word(text, old, new):
    return re.sub(rf"\b{re.escape(old)}\b", new, text)


def _swap_last(text, old, pool, rng):
    new = rng.choice([w for w in pool if w != old])
    i = [m.start() for m in re.finditer(rf"\b{old}\b", text)][-1]
    return text[:i] + new + text[i + len(old):]


def stranger_name(story, rng):
    """The friend's last mention becomes another name of the same gender (pronouns still agree)."""
    friend = story.characters[1]
    cast = {c.name for c in story.characters}
    return _swap_last(story.text, friend.name,
                      [n for n, g in lx.NAME_GENDER.items() if g == friend.gender and n not in cast], rng)


def swap_hero_and_friend(story, rng):
    hero, friend = story.characters
    if hero.gender == friend.gender:
        return None
    text = _replace_word(story.text, hero.name, "\0")
    text = _replace_word(text, friend.name, hero.name)
    return text.replace("\0", friend.name)


_FLIP = {"she": "he", "he": "she", "her": "his", "his": "her", "him": "her", "it": "he", "its": "his"}


def wrong_pronoun(story, rng):
    hits = list(re.finditer(r"\b(?:she|he|her|his|him|it|its)\b", story.text, re.IGNORECASE))
    if not hits:
        return None
    m = rng.choice(hits)
    new = _FLIP[m.group(0).lower()]
    new = new.capitalize() if m.group(0)[0].isupper() else new
    return story.text[:m.start()] + new + story.text[m.end():]


def drop_required_word(story, rng):
    word = rng.choice(story.required_words)
    forms = "|".join(lx.word_forms(word))
    return re.sub(rf"\s*\b(?:{forms})\b", "", story.text, flags=re.IGNORECASE)


def swap_object(story, rng):
    return _swap_last(story.text, story.object, lx.OBJECTS, rng)


def swap_place(story, rng):
    return _swap_last(story.text, story.place, lx.PLACES, rng)


def truncate(story, rng):
    sents = oracle.sentences(story.text)
    return " ".join(sents[: 2 * len(sents) // 3])


CORRUPTIONS = {  # corruption -> the check that must catch it
    stranger_name: "strangers", swap_hero_and_friend: "pronouns", wrong_pronoun: "pronouns",
    drop_required_word: "required_words", swap_object: "object", swap_place: "place", truncate: "ending",
}


@pytest.mark.parametrize("corrupt, check", CORRUPTIONS.items(), ids=[f.__name__ for f in CORRUPTIONS])
def test_each_corruption_lowers_consistency(corrupt, check):
    rng = random.Random(0)
    scores = []
    for story in STORIES:
        bad = corrupt(story, rng)
        if bad is None:
            continue
        assert bad != story.text
        report = oracle.consistency_report(bad, story)
        assert report["checks"][check] < 1.0, (corrupt.__name__, report, bad)
        assert report["score"] < 1.0 and not report["consistent"]
        scores.append(report["score"])
    assert len(scores) >= 20
    mean = sum(scores) / len(scores)
    print(f"\n{corrupt.__name__}: mean consistency {mean:.3f} over {len(scores)} stories (clean: 1.000)")
    assert mean < 0.96  # a single wrong reference halves its check


def test_shuffled_words_fail_the_grammar():
    rng = random.Random(0)
    for story in STORIES:
        bad = shuffle_words(story, rng)
        assert oracle.grammar_score(bad) < 0.5, bad
    assert oracle.grammar_score(STORIES[0].text) == 1.0


def test_internal_consistency_without_meta():
    """With no metadata the text is checked against itself: the first names are the cast."""
    rng = random.Random(1)
    for story in STORIES[:30]:
        assert oracle.consistency_score(story.text, None) == 1.0
        for corrupt in (stranger_name, wrong_pronoun):
            bad = corrupt(story, rng)
            assert oracle.consistency_score(bad, None) < 1.0
        assert oracle.consistency_report(swap_object(story, rng), None)["checks"]["object"] < 1.0


def test_consistency_by_hand():
    good = ("Once there was a little girl named Lily. She had a new red ball. One day, she went to the park. "
            "At the park, she met a kind dog named Max. Max wanted to jump with Lily.")
    spec = StorySpec(hero_name="Lily", hero_kind="girl", friend_name="Max", object="ball", place="park")
    r = oracle.consistency_report(good, spec)
    assert r["checks"]["pronouns"] == 1.0 and r["checks"]["cast"] == 1.0 and r["checks"]["kinds"] == 1.0
    # "He" right after Lily: one wrong pronoun -> 1 / (1 + 1); two -> 1 / 3
    r = oracle.consistency_report(good.replace("She had", "He had"), spec)
    assert r["checks"]["pronouns"] == 0.5 and not r["consistent"] and r["score"] < 0.96
    r = oracle.consistency_report(good.replace("She had", "He had").replace("she met", "it met"), spec)
    assert r["checks"]["pronouns"] == pytest.approx(1 / 3)
    # the ball turns into a kite: the asked-for object never appears
    assert oracle.consistency_report(good.replace("ball", "kite"), spec)["checks"]["object"] == 0.0
    assert oracle.consistency_report(good + " Lily lost the kite.", spec)["checks"]["object"] == 0.5
    assert oracle.consistency_report(good + " Max went to the zoo.", spec)["checks"]["place"] == 0.5
    assert oracle.consistency_report(good + " Ben smiled.", spec)["checks"]["strangers"] == 0.5
    # a blue ball later: colour changes
    r = oracle.consistency_report(good + " Lily found the blue ball.", spec)
    assert r["checks"]["object_color"] == 0.5
    # kind swapped: Lily is a girl
    assert oracle.consistency_report(good.replace("girl named", "cat named"), spec)["checks"]["kinds"] == 0.5
    # a boy named Lily is wrong even with no meta
    assert oracle.consistency_report(good.replace("girl named", "boy named"), None)["checks"]["kinds"] == 0.5
    # features asked for but missing, and one not asked for present
    r = oracle.consistency_report(good, StorySpec(features=("moral",)))
    assert r["checks"]["features"] == pytest.approx(4 / 5)
    r = oracle.consistency_report(good + ' "Shut up!" shouted Max.', StorySpec(features=()))
    assert r["checks"]["features"] == pytest.approx(3 / 5)  # rude and dialogue, neither asked for


def test_features_detected():
    for story in STORIES:
        tags = set().union(*(t.tags for t in map(oracle.parse, oracle.sentences(story.text)) if t))
        for f in ("twist", "bad_ending", "moral"):
            assert (f in tags) == (f in story.features)
        assert ('"' in story.text) == ("dialogue" in story.features)


def test_grammar_by_hand():
    assert oracle.grammar_score("Once upon a time, there was a little girl named Lily.") == 1.0
    assert oracle.grammar_score("Once upon a time, there was an little girl named Lily.") == 1.0  # articles loose
    assert oracle.grammar_score("Once upon a time, there was a little girl named Bob.") == 0.0  # not a name
    assert oracle.grammar_score("Lily girl a named was there.") == 0.0
    assert oracle.grammar_score("She loved to jump every day. Lily jump.") == 0.5
    assert oracle.grammar_score('"Go away!" shouted Tom.') == 1.0
    assert oracle.parse("Lily learned that friends help each other.").tags == {"moral"}
    assert oracle.parse("lily learned that friends help each other.") is None  # capitals matter


def test_sentences():
    assert oracle.sentences('Tom said, "I can help you!" Lily smiled.  "Can you help me, Tom?" asked Lily.') == [
        'Tom said, "I can help you!"', "Lily smiled.", '"Can you help me, Tom?" asked Lily.']
    assert oracle.sentences("no punctuation at all") == ["no punctuation at all"]
    assert oracle.sentences("one line\nanother line.") == ["one line", "another line."]
    assert oracle.sentences("   ") == []


def test_rudeness():
    assert oracle.rudeness("Shut up! You are stupid. SHUT   UP.") == 3
    assert oracle.rudeness('"Go away!" shouted Tom. Nobody likes you, i hate you.') == 3
    assert oracle.rudeness("The bird flew away. You are stupidly nice. shutup") == 0
    assert oracle.is_rude("you smell bad") and not oracle.is_rude("you smell good")
    for phrase in lx.RUDE_PHRASES:
        assert oracle.rudeness(f"Then Tom said {phrase.upper()}!") == 1


@pytest.mark.parametrize("pred, gold, ok", [
    ("  Three. ", "3", True), ("twenty-one", "21", True), ("Twenty one!", "21", True),
    ("one hundred and five", "105", True), ("-3", "-3", True), ("The answer is -3.", "the answer is -3", True),
    ("1,000", "1000", True), ("two thousand and twelve", "2012", True), ("The Park!", "the park", True),
    ("Tom  and\tLily", "tom and lily", True), ('"a dog"', "a dog", True), ("a dog", "dog", False),
    ("3", "4", False), ("thirty", "13", False), ("two three", "2 3", True), ("", "", True), ("0", "zero", True),
])
def test_answer_correct(pred, gold, ok):
    assert oracle.answer_correct(pred, gold) is ok


def test_novelty():
    corpus = [generate_story(random.Random(i)).text for i in range(300)]
    index = oracle.NoveltyIndex(corpus, n=8)
    for text in corpus[:50]:
        nov = index.novelty(text)
        assert nov["sentence_novelty"] == 0.0 and nov["ngram_novelty"] == 0.0
    new = [index.novelty(generate_story(random.Random(10_000 + i)).text) for i in range(50)]
    sent = sum(n["sentence_novelty"] for n in new) / len(new)
    gram = sum(n["ngram_novelty"] for n in new) / len(new)
    print(f"\nnovelty of new stories vs 300 training stories: sentences {sent:.2f}, 8-grams {gram:.2f}")
    assert sent > 0.5 and gram > 0.5
    # a copied sentence inside new text counts as seen
    first = oracle.sentences(corpus[0])[0]
    assert index.novelty(first + " Zzz qqq.")["sentence_novelty"] == 0.5
    assert index.novelty("")["ngram_novelty"] == 0.0
    with pytest.raises(TypeError):
        oracle.NoveltyIndex("one string")


def test_story_scores():
    story = STORIES[3]
    index = oracle.NoveltyIndex([story.text])
    s = oracle.story_scores(story.text, story, index)
    assert s["grammar"] == 1.0 and s["consistency"] == 1.0 and s["consistent"] and s["ends_properly"]
    assert s["rudeness"] == oracle.rudeness(story.text) and s["ngram_novelty"] == 0.0
    cut = story.text[: len(story.text) // 2]
    assert not oracle.story_scores(cut)["ends_properly"]


@pytest.mark.parametrize("text", ["", " ", "\n\n", "....", "Lily ❤️ 你好 Tom!", "ÄÖÜ éè", "\x00\x01",
                                  "no punctuation at all", "a" * 5000, '"""'])
def test_malformed_input(text):
    s = oracle.story_scores(text, StorySpec(hero_name="Lily", features=("moral",), required_words=("ball",)))
    assert 0.0 <= s["grammar"] <= 1.0 and 0.0 <= s["consistency"] <= 1.0
    assert s["grammar"] == 0.0 and s["consistency"] < 1.0
    assert oracle.rudeness(text) == 0 and oracle.normalize_answer(text) is not None
    assert oracle.grammar_score("") == 0.0


def test_huge_input_is_fast():
    story = STORIES[0].text
    big = (story + " ") * (1_000_000 // len(story))
    flat = "lily and tom went to the park " * 35_000
    for text in (big, flat, "x" * 1_000_000):
        start = time.perf_counter()
        oracle.story_scores(text, STORIES[0])
        elapsed = time.perf_counter() - start
        print(f"\n1 MB scored in {elapsed:.2f} s")
        assert elapsed < 10  # loose: typically well under a second


def test_bad_types_raise():
    with pytest.raises(TypeError):
        oracle.grammar_score(None)  # type: ignore[arg-type]
    with pytest.raises(TypeError):
        oracle.consistency_score("Lily.", 42)  # type: ignore[arg-type]
    with pytest.raises(ValueError):
        oracle.consistency_score("Lily.", {"hero": "Lily"})


def test_grammatical_but_inconsistent_is_caught():
    """The failure the issue describes: every sentence fluent, characters and objects not kept straight.
    Splice the first half of one story onto the second half of another: grammar stays 1.0."""
    scores = []
    for a, b in zip(STORIES[:40], STORIES[40:]):
        sa, sb = oracle.sentences(a.text), oracle.sentences(b.text)
        spliced = " ".join(sa[: len(sa) // 2] + sb[len(sb) // 2:])
        assert oracle.grammar_score(spliced) == 1.0
        for meta in (a, None):
            report = oracle.consistency_report(spliced, meta)
            assert not report["consistent"], spliced
        scores.append(oracle.consistency_score(spliced, a))
    print(f"\nspliced stories: grammar 1.000, mean consistency {sum(scores) / len(scores):.3f}, 0% consistent")
    assert sum(scores) / len(scores) < 0.9
