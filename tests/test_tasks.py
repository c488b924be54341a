"""Task families: deterministic items, correct and kind answers, gradeable noisy variants, chats."""

import random

import pytest

from tinygpt.world import oracle
from tinygpt.world.tasks import FAMILIES, TaskItem, grade, make_chat, misspell, render

INDICES = range(1, 13)


def test_items_are_deterministic_and_depend_on_index_and_seed():
    for family in FAMILIES.values():
        a, b = family.item(5, seed=3), family.item(5, seed=3)
        assert a == b
        assert a.family == family.name and a.index == 5
        others = {family.item(i, seed=3).instruction for i in INDICES}
        assert len(others) >= 8, f"{family.name}: too few distinct instructions"
        assert family.item(5, seed=4) != a or family.name == "arithmetic"


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gold_answers_grade_correct_and_are_kind(name):
    for i in INDICES:
        item = FAMILIES[name].item(i)
        score = grade(item, item.answer)
        if FAMILIES[name].exact:
            assert score == 1.0, (item.instruction, item.answer)
        else:
            assert score >= 0.9, (item.instruction, score)
        assert grade(item.to_dict(), item.answer) == score  # a written record grades the same
        assert grade(item.meta, item.answer) == score       # and so does its bare meta
        assert not oracle.is_rude(item.answer) and not oracle.is_rude(item.instruction)


@pytest.mark.parametrize("name", sorted(n for n, f in FAMILIES.items() if f.exact))
def test_wrong_answers_grade_zero(name):
    for i in INDICES:
        item = FAMILIES[name].item(i)
        wrong = str(int(item.answer) + 1) if item.answer.isdigit() else "I do not know"
        assert grade(item, wrong) == 0.0, (item.instruction, wrong)


def test_hand_worked_answers():
    for i in INDICES:
        item = FAMILIES["arithmetic"].item(i)
        a, b, op = item.meta["a"], item.meta["b"], item.meta["op"]
        assert int(item.answer) == (a + b if op == "+" else a - b) >= 0
        assert str(a) in item.instruction and str(b) in item.instruction
        letters = FAMILIES["count_letters"].item(i)
        word = letters.meta["word"]
        expected = len(word) if letters.meta["question"] == "length" else word.count(letters.meta["letter"])
        assert letters.answer == str(expected)
        rev = FAMILIES["reverse_words"].item(i)
        assert rev.answer.split(rev.meta["separator"]) == rev.meta["words"][::-1]
        words = FAMILIES["count_words"].item(i)
        assert words.answer == str(len(words.meta["text"].split()))
    qa = FAMILIES["story_qa"].item(1)
    assert qa.meta["story"]["text"] in qa.instruction


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_noisy_variants_keep_payload_and_answer(name):
    changed = 0
    for i in INDICES:
        clean, noisy = FAMILIES[name].item(i), FAMILIES[name].item(i, noise=0.5)
        assert noisy.answer == clean.answer
        assert grade(noisy, noisy.answer) == grade(clean, clean.answer)
        changed += noisy.instruction != clean.instruction
        for key in ("word", "text"):
            if key in clean.meta:
                assert clean.meta[key] in noisy.instruction  # the payload is never misspelled
    assert changed >= len(INDICES) // 2


def test_render_and_misspell():
    assert render("What is {a} plus {b}?", {"a": 3, "b": 4}) == "What is 3 plus 4?"
    rng = random.Random(0)
    assert render("{x} and {y}", {"x": "cat", "y": "dog"}, noise=1.0, rng=rng).startswith("cat")
    typo = misspell("garden", random.Random(1))
    assert typo != "garden" and typo[0] == "g" and typo[-1] == "n"
    with pytest.raises(KeyError):
        render("{missing}", {})
    with pytest.raises(ValueError):
        FAMILIES["arithmetic"].item(1, noise=2.0)


def test_messages_and_grade_errors():
    item = FAMILIES["arithmetic"].item(2)
    msgs = item.messages(system="Be kind.")
    assert [m["role"] for m in msgs] == ["system", "user", "assistant"]
    assert msgs[1]["content"] == item.instruction and msgs[2]["content"] == item.answer
    with pytest.raises(ValueError, match="family"):
        grade({"family": "nope"}, "1")
    with pytest.raises(TypeError):
        grade(["not", "a", "meta"], "1")  # type: ignore[arg-type]


@pytest.mark.parametrize("kind", ["single", "story_followup", "arithmetic_followup", "two_tasks"])
def test_chats_have_alternating_turns_each_graded_correct(kind):
    rng = random.Random(7)
    for _ in range(3):
        chat = make_chat(rng, [2, 4, 5], kind=kind, system_share=0.5)
        roles = [m["role"] for m in chat["messages"] if m["role"] != "system"]
        assert roles == ["user", "assistant"] * (len(roles) // 2)
        answers = [m["content"] for m in chat["messages"] if m["role"] == "assistant"]
        assert len(answers) == len(chat["meta"]["turns"]) >= (1 if kind == "single" else 2)
        for answer, meta in zip(answers, chat["meta"]["turns"]):
            assert grade(meta, answer) >= 0.9
        assert chat["index"] in (2, 4, 5) and all(x["index"] == chat["index"] for x in chat["meta"]["items"])


def test_arithmetic_followup_is_hand_checkable():
    chat = make_chat(random.Random(0), [6], kind="arithmetic_followup", system_share=0.0)
    item = FAMILIES["arithmetic"].item(6)
    first, follow = chat["messages"][1]["content"], chat["messages"][3]["content"]
    assert first == item.answer
    c = int("".join(ch for ch in chat["messages"][2]["content"] if ch.isdigit()))
    assert int(follow) in (int(first) + c, int(first) - c)
    assert isinstance(item, TaskItem)


def test_partial_credit_hand_worked():
    """Near misses earn up to PARTIAL_MAX; the exact answer always earns 1 and exact grading 0 for the rest."""
    from tinygpt.world.tasks import PARTIAL_MAX, partial_credit
    assert PARTIAL_MAX == 0.5
    assert partial_credit("arithmetic", "4", "5") == pytest.approx(0.5 * (1 - 1 / 7))
    assert partial_credit("count_words", "It has 1 word.", "5") == pytest.approx(0.5 * (1 - 4 / 7))
    assert partial_credit("arithmetic", "90", "5") == 0.0  # too far: no credit, never negative
    assert partial_credit("arithmetic", "he", "5") == 0.0 and partial_credit("arithmetic", "", "5") == 0.0
    assert partial_credit("reverse_words", "hat, white, truck, cup", "hat, white, cup, truck") == 0.25
    # bag-of-words F1 without articles: "Bella the cat" vs "Bella": P 1/2, R 1 -> F1 2/3
    assert partial_credit("story_qa", "Bella the cat", "Bella") == pytest.approx(0.5 * 2 / 3)
    assert partial_credit("story_qa", "the library", "the market") == 0.0
    item = FAMILIES["arithmetic"].item(5)
    near = str(int(item.answer) + 1)
    assert grade(item.meta, item.answer, partial=True) == 1.0
    assert grade(item.meta, near) == 0.0 and 0 < grade(item.meta, near, partial=True) < PARTIAL_MAX


def test_some_story_requests_are_open_and_any_good_story_answers_them():
    """About 15% of write_story items ask for any story ("Tell me a story."): nothing to satisfy but a story."""
    from tinygpt.world.stories import generate_story

    family = FAMILIES["write_story"]
    items = [family.item(i) for i in range(400)]
    open_items = [it for it in items if it.instruction in family.OPEN_TEMPLATES]
    assert 0.08 < len(open_items) / len(items) < 0.22
    item = open_items[0]
    assert set(item.meta["spec"].values()) == {None}
    other = generate_story(random.Random(5), None, rude_share=0.0).text  # a story about anyone
    assert grade(item, other) > 0.9 and grade(item, item.answer) > 0.9
    assert grade(item, "15") == 0.0
    constrained = next(it for it in items if it not in open_items)
    assert grade(constrained, other) < grade(constrained, constrained.answer)


def test_answer_budget_gives_stories_the_long_budget():
    from tinygpt.world.tasks import answer_budget

    assert answer_budget("write_story", 48, 192) == 192
    assert [answer_budget(f, 48, 192) for f in FAMILIES if f != "write_story"] == [48] * (len(FAMILIES) - 1)
    assert answer_budget(None, 48, 192) == answer_budget("no_such_family", 48, 192) == 48
