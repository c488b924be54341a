"""13-gram contamination (GPT-3 appendix C): normalisation, dirty/clean/too-short examples, n-grams never
spanning two documents, agreement with a plain set of word tuples, and the report of a tiny world."""

import json
import random
import time

import pytest

from tinygpt.eval.contamination import NgramIndex, contamination, normalized_words, world_contamination
from tinygpt.world.export import export_world
from tinygpt.world.split import Split
from tinygpt.world.stories import generate_story

SENTENCE = "one two three four five six seven eight nine ten eleven twelve thirteen"  # 13 words


def test_normalized_words():
    assert normalized_words("Tom's DOG, ran!  \"Fast\"\n-- home.") == ["tom", "s", "dog", "ran", "fast", "home"]


def test_dirty_clean_and_too_short():
    index = NgramIndex(["Once upon a time: " + SENTENCE.upper() + "!", "something else entirely"])
    shouted = "Hey... " + ", ".join(SENTENCE.split()) + " and more"  # case and punctuation do not matter
    twelve = " ".join(SENTENCE.split()[:12]) + " fourteen"
    assert index.is_dirty(shouted)
    assert not index.is_dirty(twelve)
    assert index.overlap(twelve) == (0, 1)
    assert index.overlap("too short") == (0, 0)
    report = contamination({"set": [shouted, twelve, "too short", [twelve, shouted]]}, index)["set"]
    assert (report["n"], report["dirty"], report["too_short"]) == (4, 2, 1)
    assert report["dirty_share"] == 0.5


def test_ngrams_never_span_two_documents():
    words = SENTENCE.split()
    index = NgramIndex([" ".join(words[:6]), " ".join(words[6:])])
    assert len(index) == 0
    assert not index.is_dirty(SENTENCE)
    assert not NgramIndex([SENTENCE]).is_dirty([" ".join(words[:6]), " ".join(words[6:])])  # nor in a query


def test_matches_a_plain_set_of_word_tuples():
    rng = random.Random(0)
    vocab = [f"w{i}" for i in range(6)]  # few words: many shared 4-grams
    train = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 30))) for _ in range(60)]
    queries = [" ".join(rng.choice(vocab) for _ in range(rng.randint(0, 12))) for _ in range(300)]
    n = 4
    reference = {tuple(ws[i:i + n]) for t in train for ws in [t.split()] for i in range(len(ws) - n + 1)}
    index = NgramIndex(train, n=n)
    assert len(index) == len(reference)
    for q in queries:
        ws = q.split()
        grams = [tuple(ws[i:i + n]) for i in range(len(ws) - n + 1)]
        assert index.overlap(q) == (sum(g in reference for g in grams), len(grams))


def test_world_report(tmp_path):
    export_world(tmp_path, n_stories=150, n_sft_chats=20, n_rl_prompts=5, formats=("jsonl",),
                 split=Split(n=20), families=["arithmetic", "summary"], progress=False)
    report = world_contamination(tmp_path)
    sets = report["sets"]
    assert set(sets) == {"tasks/arithmetic_test", "tasks/summary_test", "sft_test"}
    assert sets["tasks/arithmetic_test"]["n"] == 6  # items 1, 3, 7, 11, 13, 17 of 20
    assert "pretrain.jsonl" in report["training_files"] and report["training_ngrams"] > 0
    # bare sums are too short to hold a 13-gram (word problems are not): counted apart
    tests = [json.loads(line) for line in (tmp_path / "tasks/arithmetic_test.jsonl").read_text().splitlines()]
    short = sum(len(normalized_words(r["instruction"])) < 13 for r in tests)
    assert 0 < short and sets["tasks/arithmetic_test"]["too_short"] == short
    # test stories are new stories, but they are built from the same sentence templates as the corpus
    assert sets["tasks/summary_test"]["dirty"] > 0
    for row in sets.values():
        assert row["dirty_share"] == pytest.approx(row["dirty"] / row["n"])


@pytest.mark.slow
def test_forty_thousand_stories_index_in_seconds():
    rng = random.Random(0)
    docs = [generate_story(rng).text for _ in range(40_000)]
    start = time.perf_counter()
    index = NgramIndex(docs)
    seconds = time.perf_counter() - start
    print(f"\n40,000 stories: {len(index):,} distinct 13-grams in {seconds:.1f} s")
    assert index.is_dirty(docs[123])
    assert seconds < 15  # about 2.5 s on one core of the dev machine; a generous bound
