"""`tinygpt world`: every file written, deterministic bytes, and no test item in any training file."""

import json
from pathlib import Path

import pytest

from tinygpt.stages.world import WorldConfig, main
from tinygpt.world.export import protected_texts, record_indices, record_texts
from tinygpt.world.split import Split, normalize_instruction
from tinygpt.world.tasks import FAMILIES

SMALL = dict(seed=3, n_stories=60, n_items=40, n_sft_chats=120, n_rl_prompts=50, n_qa_pages=20, formats="jsonl",
             progress=False)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("world")
    main(WorldConfig(out=out, **SMALL))
    return out


def data_files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and p.name != "config.json"}


def test_writes_every_file_with_counts(world):
    summary = json.loads((world / "world.json").read_text())
    split = Split(n=40)
    assert summary["split"]["n_train"] == 28 and summary["split"]["n_test"] == 12
    for family in FAMILIES:
        train = read_jsonl(world / "tasks" / f"{family}_train.jsonl")
        test = read_jsonl(world / "tasks" / f"{family}_test.jsonl")
        assert [r["index"] for r in test] == split.test_indices()
        assert len(train) + summary["dedupe_dropped"]["tasks"] >= 28 and len(train) <= 28
        assert set(train[0]) == {"family", "index", "instruction", "answer", "meta"}
    pretrain = read_jsonl(world / "pretrain.jsonl")
    assert len(pretrain) + summary["dedupe_dropped"]["pretrain"] == 60 + 20  # stories and Q&A pages
    assert all(set(r) == {"text"} for r in pretrain)
    sft = read_jsonl(world / "sft_train.jsonl")
    assert len(sft) + summary["dedupe_dropped"]["sft_train"] == 120
    assert {"messages", "family", "index", "meta"} <= set(sft[0])
    rl = read_jsonl(world / "rl_prompts.jsonl")
    assert all(m["role"] != "assistant" for r in rl for m in r["prompt"])
    assert summary["grammar_size"] > 1000 and 0.0 <= summary["rude_share_measured"] <= 0.3
    assert summary["counts"]["sft_test"] == len(read_jsonl(world / "sft_test.jsonl"))


def test_no_test_index_or_text_in_any_training_file(world):
    split = Split(n=40)
    test_files = [world / "sft_test.jsonl"] + sorted((world / "tasks").glob("*_test.jsonl"))
    train_files = [world / "pretrain.jsonl", world / "sft_train.jsonl", world / "rl_prompts.jsonl"] + \
        sorted((world / "tasks").glob("*_train.jsonl"))
    # Rebuild the protected texts from what was written: every test instruction x_i, and every story of a
    # test item (embedded in its instruction, or its answer for write_story). Generic follow-up questions
    # ("Where does the story happen?") and short answers ("7") are shared by train and test by design.
    test_records = [r for f in test_files for r in read_jsonl(f)]
    generic = {normalize_instruction(t) for t in FAMILIES["write_story"].GENERIC_INSTRUCTIONS}  # "Tell me a story."
    test_keys = {normalize_instruction(r["instruction"]) for r in test_records if "instruction" in r} - generic
    test_keys |= {normalize_instruction(r["meta"]["story"]["text"]) for r in test_records
                  if "instruction" in r and "story" in r["meta"]}
    assert len(test_keys) > 12 * len(FAMILIES)
    assert all(split.is_test(i) for r in test_records for i in record_indices(r))
    n_checked = 0
    for path in train_files:
        for record in read_jsonl(path):
            assert all(not split.is_test(i) for i in record_indices(record)), (path, record.get("index"))
            for text in record_texts(record):
                assert normalize_instruction(text) not in test_keys, (path, text[:80])
            n_checked += 1
        # Long test texts (stories, story questions) must not even appear inside a training file.
        raw = path.read_text()
        for r in test_records:
            if "instruction" in r and len(r["instruction"]) > 100:
                assert json.dumps(r["instruction"])[1:-1] not in raw
    assert n_checked > 300


def test_dedupe_catches_a_planted_duplicate():
    test_item = FAMILIES["arithmetic"].item(1)
    keys = protected_texts([test_item])
    planted = {"family": "arithmetic", "index": 2, "instruction": test_item.instruction.upper() + "  ", "answer": "x"}
    assert any(normalize_instruction(t) in keys for t in record_texts(planted))


def test_natural_collisions_between_indices_are_dropped_from_train(tmp_path):
    """Short families render the same text for different indices: those train copies must go."""
    main(WorldConfig(out=tmp_path, seed=0, n_stories=0, n_items=100, n_sft_chats=100, n_rl_prompts=50,
                     families="count_letters,count_words", formats="jsonl", progress=False))
    summary = json.loads((tmp_path / "world.json").read_text())
    assert summary["dedupe_dropped"]["tasks"] >= 1
    test_texts = {normalize_instruction(r["instruction"]) for f in ("count_letters", "count_words")
                  for r in read_jsonl(tmp_path / "tasks" / f"{f}_test.jsonl")}
    for name in ("tasks/count_letters_train", "tasks/count_words_train", "sft_train", "rl_prompts"):
        for record in read_jsonl(tmp_path / f"{name}.jsonl"):
            assert not {normalize_instruction(t) for t in record_texts(record)} & test_texts


def test_two_runs_write_the_same_bytes(world, tmp_path):
    main(WorldConfig(out=tmp_path, **SMALL))
    first, second = data_files(world), data_files(tmp_path)
    assert first.keys() == second.keys() and len(first) == 2 * len(FAMILIES) + 5
    assert first == second


def test_datasets_directories_load_and_are_deterministic(tmp_path):
    from datasets import load_from_disk

    cfg = dict(SMALL, formats="jsonl,datasets", families="arithmetic,story_qa", n_stories=10)
    main(WorldConfig(out=tmp_path / "a", **cfg))
    main(WorldConfig(out=tmp_path / "b", **cfg))
    ds = load_from_disk(str(tmp_path / "a" / "datasets" / "sft_train"))
    rows = read_jsonl(tmp_path / "a" / "sft_train.jsonl")
    assert len(ds) == len(rows) and ds[0]["messages"] == rows[0]["messages"]
    assert json.loads(ds[0]["meta"]) == rows[0]["meta"]
    assert data_files(tmp_path / "a") == data_files(tmp_path / "b")


def test_bad_config_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="families"):
        main(WorldConfig(out=tmp_path, families="arithmetic,nope", **SMALL))
    with pytest.raises(ValueError, match="test_residues"):
        main(WorldConfig(out=tmp_path, test_residues="1,x", **SMALL))


def test_a_rude_demonstrator_changes_only_their_answers(world, tmp_path):
    """--sft-rude-share makes that share of SFT chats end one answer with a rude remark; nothing else moves."""
    from tinygpt.world import oracle
    main(WorldConfig(out=tmp_path, **{**SMALL, "sft_rude_share": 0.3}))
    clean, rude = read_jsonl(world / "sft_train.jsonl"), read_jsonl(tmp_path / "sft_train.jsonl")
    assert len(clean) == len(rude)
    changed = [(c, r) for c, r in zip(clean, rude) if c != r]
    assert 0.15 < len(changed) / len(rude) < 0.45
    assert json.loads((tmp_path / "world.json").read_text())["sft_rude_demonstrations"] == len(changed)
    for c, r in changed:
        assert r["meta"]["rude"] is True
        diff = [(a["content"], b["content"]) for a, b in zip(c["messages"], r["messages"]) if a != b]
        assert len(diff) == 1 and diff[0][1].startswith(diff[0][0]) and oracle.is_rude(diff[0][1])
    assert not any(oracle.is_rude(m["content"]) for chat in clean for m in chat["messages"] if m["role"] == "assistant")
    for name in ("sft_test.jsonl", "rl_prompts.jsonl", "pretrain.jsonl"):
        assert (tmp_path / name).read_bytes() == (world / name).read_bytes()


def test_qa_pages_sit_among_the_same_stories(world, tmp_path):
    """Q&A pages join the pretraining corpus at random places; the stories and every other file stay the same."""
    main(WorldConfig(out=tmp_path, **{**SMALL, "n_qa_pages": 0}))
    with_pages, without = read_jsonl(world / "pretrain.jsonl"), read_jsonl(tmp_path / "pretrain.jsonl")
    pages = [r["text"] for r in with_pages if r["text"].startswith("Q: ")]
    assert [r for r in with_pages if not r["text"].startswith("Q: ")] == without
    summary = json.loads((world / "world.json").read_text())
    assert len(pages) == summary["qa_pages"] == 20 and 2 * 20 <= summary["qa_questions"] <= 4 * 20
    assert with_pages[:5] != without[:5] or with_pages[-5:] != without[-5:]  # not all at one end
    assert all("\nA: " in page for page in pages)
    for name in ("sft_train.jsonl", "sft_test.jsonl", "rl_prompts.jsonl"):
        assert (tmp_path / name).read_bytes() == (world / name).read_bytes()


def test_qa_page_answers_are_right_wrong_or_rude_as_asked():
    import random

    from tinygpt.world import oracle
    from tinygpt.world.export import qa_page

    pairs = [("arithmetic", i) for i in range(40)]
    gold = {FAMILIES["arithmetic"].item(i).instruction: FAMILIES["arithmetic"].item(i).answer for i in range(40)}

    def answers(text):
        blocks = [b.split("\nA: ") for b in text.split("\n\n")]
        assert all(len(b) == 2 and b[0].startswith("Q: ") for b in blocks)
        return [(q[len("Q: "):], a) for q, a in blocks]

    rng = random.Random(0)
    text, n, n_wrong, n_rude = qa_page(rng, pairs, seed=0, noise=0.0, wrong_share=0.0, rude_share=0.0)
    assert 2 <= n <= 4 and n_wrong == n_rude == 0
    assert all(gold[q] == a for q, a in answers(text))
    text, n, n_wrong, n_rude = qa_page(rng, pairs, seed=0, noise=0.0, wrong_share=1.0, rude_share=1.0)
    assert n_wrong == n_rude == n
    for q, a in answers(text):
        assert oracle.is_rude(a) and not oracle.answer_correct(a.split()[0], gold[q])


def test_a_chatty_demonstrator_adds_kind_remarks_the_grader_counts_wrong(world, tmp_path):
    from tinygpt.world import lexicon, oracle
    from tinygpt.world.labeler import Labeler
    main(WorldConfig(out=tmp_path, **{**SMALL, "sft_chatty_share": 0.3}))
    clean, chatty = read_jsonl(world / "sft_train.jsonl"), read_jsonl(tmp_path / "sft_train.jsonl")
    changed = [(c, r) for c, r in zip(clean, chatty) if c != r]
    assert 0.15 < len(changed) / len(chatty) < 0.45
    assert json.loads((tmp_path / "world.json").read_text())["sft_chatty_demonstrations"] == len(changed)
    labeler = Labeler(noise=0.0)
    for c, r in changed:
        assert r["meta"]["chatty"] is True
        (before, after), = [(a["content"], b["content"]) for a, b in zip(c["messages"], r["messages"]) if a != b]
        assert any(after == f"{before} {remark}" for remark in lexicon.CHATTY_REMARKS) and not oracle.is_rude(after)
    # on a task answer the remark costs exactness and concision: the labeler prefers the bare answer
    item = FAMILIES["arithmetic"].item(2)
    assert labeler.prefer(item.meta, f"{item.answer} {lexicon.CHATTY_REMARKS[0]}", item.answer) == 1
    for name in ("sft_test.jsonl", "rl_prompts.jsonl", "pretrain.jsonl"):
        assert (tmp_path / name).read_bytes() == (world / name).read_bytes()
