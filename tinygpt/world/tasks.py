"""Instruction task families with exact answers, chat demonstrations built from them, and grading.

A task family maps an item index ``i`` (and a seed) deterministically to a :class:`TaskItem`: an
instruction ``x_i``, its answer ``y_i``, and JSON-able metadata that is enough to grade a prediction
(``meta["family"]`` and ``meta["gold"]``, or ``meta["spec"]`` for story writing). Every family has
several phrasings and lengths, and a ``noise`` knob that puts spelling mistakes and swapped words
into the *template* words of an instruction, never into its payload (numbers, the words to count or
reverse, the story), so a noisy item keeps its answer.

Families: ``arithmetic``, ``count_words``, ``count_letters``, ``reverse_words``, ``story_qa``,
``summary`` (exact answers, graded with :func:`oracle.answer_correct`) and ``write_story`` (graded
by the oracle's consistency with the requested :class:`StorySpec`, times its grammar score).
Answers are correct and kind: no answer is ever rude.

This module knows nothing about the train/test split, files or tokenizers: callers choose which
indices to ask for (see :mod:`tinygpt.world.split`).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

from tinygpt.world import lexicon, oracle
from tinygpt.world.stories import Story, StorySpec, generate_story

# ------------------------------------------------------------------------------------------------
# items and noise
# ------------------------------------------------------------------------------------------------


@dataclass
class TaskItem:
    """One instruction-answer pair. ``meta`` is JSON-able and holds what :func:`grade` needs."""

    family: str
    index: int
    instruction: str
    answer: str
    meta: dict = field(default_factory=dict)

    def messages(self, system: str | None = None) -> list[dict]:
        """The item as a single-turn chat: optional system, user instruction, assistant answer."""
        msgs = [{"role": "system", "content": system}] if system else []
        return msgs + [{"role": "user", "content": self.instruction},
                       {"role": "assistant", "content": self.answer}]

    def to_dict(self) -> dict:
        return {"family": self.family, "index": self.index, "instruction": self.instruction,
                "answer": self.answer, "meta": self.meta}


_FIELD = re.compile(r"\{(\w+)\}")
_KEYBOARD_NEIGHBOURS = {
    "a": "sqz", "b": "vn", "c": "xv", "d": "sf", "e": "wr", "f": "dg", "g": "fh", "h": "gj", "i": "uo",
    "j": "hk", "k": "jl", "l": "k", "m": "n", "n": "bm", "o": "ip", "p": "o", "q": "w", "r": "et",
    "s": "ad", "t": "ry", "u": "yi", "v": "cb", "w": "qe", "x": "zc", "y": "tu", "z": "x",
}


def misspell(word: str, rng: random.Random) -> str:
    """One spelling mistake: swap two neighbouring letters, drop one, double one, or hit a near key."""
    letters = [i for i, c in enumerate(word) if c.isalpha()]
    if len(letters) < 3:
        return word
    i = rng.choice(letters[1:-1])  # keep the first and last letters, as real typos mostly do
    kind = rng.randrange(4)
    if kind == 0 and i + 1 < len(word) and word[i + 1].isalpha():
        return word[:i] + word[i + 1] + word[i] + word[i + 2:]
    if kind == 1:
        return word[:i] + word[i + 1:]
    if kind == 2:
        return word[:i] + word[i] + word[i:]
    near = _KEYBOARD_NEIGHBOURS.get(word[i].lower(), word[i])
    return word[:i] + rng.choice(near) + word[i + 1:]


def _perturb_words(text: str, rng: random.Random, noise: float) -> str:
    """Misspell each word with probability ``noise``; swap neighbouring words with probability ``noise / 2``."""
    tokens = re.split(r"(\s+)", text)  # words at even positions, whitespace at odd ones
    words = tokens[0::2]
    for k in range(len(words) - 1):
        if words[k].isalpha() and words[k + 1].isalpha() and rng.random() < noise / 2:
            words[k], words[k + 1] = words[k + 1], words[k]
    words = [misspell(w, rng) if rng.random() < noise else w for w in words]
    tokens[0::2] = words
    return "".join(tokens)


def render(template: str, values: dict[str, Any], noise: float = 0.0, rng: random.Random | None = None) -> str:
    """Fill ``{name}`` fields with ``values``; noise touches only the template's own words."""
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    if noise > 0 and rng is None:
        raise ValueError("render: noise > 0 needs an rng")
    parts: list[str] = []
    pos = 0
    for m in _FIELD.finditer(template):
        literal = template[pos:m.start()]
        parts.append(_perturb_words(literal, rng, noise) if noise > 0 else literal)  # type: ignore[arg-type]
        if m.group(1) not in values:
            raise KeyError(f"template {template!r} needs a value for {{{m.group(1)}}}")
        parts.append(str(values[m.group(1)]))
        pos = m.end()
    tail = template[pos:]
    parts.append(_perturb_words(tail, rng, noise) if noise > 0 else tail)  # type: ignore[arg-type]
    return "".join(parts)


def _item_rng(family: str, seed: int, index: int, stream: str = "item") -> random.Random:
    # Seeding with a string is stable across runs and Python processes (it is hashed with SHA-512).
    return random.Random(f"{stream}|{family}|{seed}|{index}")


# Payload words for the string tasks: the world's own words, so pretraining has seen them.
WORDS = tuple(dict.fromkeys(lexicon.OBJECTS + lexicon.COLORS + lexicon.PLACES + lexicon.ACTION_BASES
                            + lexicon.KINDS + lexicon.GOOD_FEELINGS))

# ------------------------------------------------------------------------------------------------
# families
# ------------------------------------------------------------------------------------------------


class TaskFamily:
    """Base class: ``item(index, seed, noise)`` -> :class:`TaskItem`; subclasses implement ``_make``."""

    name: str = ""
    exact: bool = True  # graded by exact match of the normalized answer
    prose: bool = False  # the answer is sentences (a labeler judges their grammar), not a number, list or name
    long_answer: bool = False  # the answer is a whole story: samplers give it a longer budget (see answer_budget)
    GENERIC_INSTRUCTIONS: tuple[str, ...] = ()  # requests shared by many items, train and test alike

    def item(self, index: int, seed: int = 0, noise: float = 0.0) -> TaskItem:
        if not isinstance(index, int) or index < 0:
            raise ValueError(f"{self.name}: item index must be a non-negative int, got {index!r}")
        if not 0.0 <= noise <= 1.0:
            raise ValueError(f"{self.name}: noise must be in [0, 1], got {noise}")
        rng = _item_rng(self.name, seed, index)
        noise_rng = _item_rng(self.name, seed, index, stream="noise")
        template, values, answer, meta = self._make(rng)
        instruction = render(template, values, noise, noise_rng)
        # Exact families carry their gold answer; write_story is graded against meta["spec"] instead.
        meta = {"family": self.name, **({"gold": answer} if self.exact else {}), **meta, "noise": noise}
        return TaskItem(self.name, index, instruction, answer, meta)

    def _make(self, rng: random.Random) -> tuple[str, dict, str, dict]:
        """-> (template, values for its fields, answer, extra meta)."""
        raise NotImplementedError


class Arithmetic(TaskFamily):
    """Small-number addition and subtraction, as bare sums and as tiny word problems."""

    name = "arithmetic"
    ADD = ("What is {a} plus {b}?", "What is {a} + {b}?", "Add {a} and {b}.", "Please tell me the sum of {a} and {b}.",
           "{a} + {b} = ?", "Can you add {a} and {b} for me?",
           "{name} has {a} {things} and gets {b} more. How many {things} does {name} have now?")
    SUB = ("What is {a} minus {b}?", "What is {a} - {b}?", "Subtract {b} from {a}.", "{a} - {b} = ?",
           "Can you take {b} away from {a}?",
           "{name} has {a} {things} and gives {b} away. How many {things} does {name} have left?")
    THINGS = ("apples", "balls", "cookies", "flowers", "stars", "toys", "candies", "books", "shells", "stickers")
    NAMES = lexicon.FEMALE_NAMES[:12] + lexicon.MALE_NAMES[:12]

    def _make(self, rng):
        top = rng.choice((10, 20, 50))  # three sizes of numbers
        a, b = rng.randint(0, top), rng.randint(0, top)
        op = rng.choice(("+", "-"))
        if op == "-" and b > a:
            a, b = b, a  # answers stay non-negative
        template = rng.choice(self.ADD if op == "+" else self.SUB)
        answer = a + b if op == "+" else a - b
        values = {"a": a, "b": b, "things": rng.choice(self.THINGS), "name": rng.choice(self.NAMES)}
        return template, values, str(answer), {"a": a, "b": b, "op": op}


class CountWords(TaskFamily):
    name = "count_words"
    TEMPLATES = ("How many words are in this sentence: \"{text}\"?", "Count the words: {text}",
                 "How many words does this have? {text}", "Tell me the number of words in \"{text}\".")

    def _make(self, rng):
        words = [rng.choice(WORDS) for _ in range(rng.randint(1, 12))]
        text = " ".join(words)
        return rng.choice(self.TEMPLATES), {"text": text}, str(len(words)), {"text": text}


class CountLetters(TaskFamily):
    name = "count_letters"
    LENGTH = ("How many letters are in the word \"{word}\"?", "Count the letters in \"{word}\".",
              "How long is the word \"{word}\" in letters?")
    OCCURS = ("How many times does the letter \"{letter}\" appear in \"{word}\"?",
              "Count the letter \"{letter}\" in the word \"{word}\".",
              "In \"{word}\", how many \"{letter}\" letters are there?")

    def _make(self, rng):
        word = rng.choice(WORDS)
        if rng.random() < 0.4:
            return rng.choice(self.LENGTH), {"word": word}, str(len(word)), {"word": word, "question": "length"}
        # Mostly letters the word has; sometimes one it lacks (answer 0).
        letter = rng.choice(word) if rng.random() < 0.8 else rng.choice("abcdefghijklmnopqrstuvwxyz")
        count = word.count(letter)
        return (rng.choice(self.OCCURS), {"word": word, "letter": letter}, str(count),
                {"word": word, "letter": letter, "question": "occurrences"})


class ReverseWords(TaskFamily):
    name = "reverse_words"
    TEMPLATES = ("Reverse the order of these words: {items}", "Say these words backwards: {items}",
                 "Write this list in reverse order: {items}", "Please reverse: {items}")

    def _make(self, rng):
        words = rng.sample(WORDS, rng.randint(2, 7))
        sep = rng.choice((", ", " "))
        return (rng.choice(self.TEMPLATES), {"items": sep.join(words)}, sep.join(reversed(words)),
                {"words": words, "separator": sep})


def _task_story(rng: random.Random, spec: StorySpec | None = None) -> Story:
    """A kind story for a task (instructions and answers are never rude)."""
    for _ in range(20):
        story = generate_story(rng, spec, rude_share=0.0)
        if not oracle.is_rude(story.text):
            return story
    raise RuntimeError("generate_story kept returning rude stories with rude_share=0")


def story_questions(story: Story) -> list[tuple[str, str, str]]:
    """(question kind, question, answer) pairs answered by the story's own metadata."""
    hero = story.characters[0]
    qs = [("who", "Who is the story about?", hero.name),
          ("who", "What is the name of the main character?", hero.name),
          ("kind", f"What kind of character is {hero.name}?", f"a {hero.kind}"),
          ("where", "Where does the story happen?", f"the {story.place}"),
          ("what", "What object is important in the story?", f"the {story.object}")]
    if len(story.characters) > 1:
        qs.append(("friend", f"Who is {hero.name}'s friend in the story?", story.characters[1].name))
    return qs


class StoryQA(TaskFamily):
    name = "story_qa"
    TEMPLATES = ("{story}\n\nQuestion: {question}", "Read the story and answer.\n\n{story}\n\n{question}",
                 "{story}\n\n{question} Answer in a few words.")

    def _make(self, rng):
        story = _task_story(rng)
        kind, question, answer = rng.choice(story_questions(story))
        return (rng.choice(self.TEMPLATES), {"story": story.text, "question": question}, answer,
                {"question": kind, "story": story.to_dict()})


class Summary(TaskFamily):
    name = "summary"
    prose = True
    TEMPLATES = ("{story}\n\nSummarize this story in one sentence.", "Summarize the story below in one sentence.\n\n{story}",
                 "{story}\n\nWhat is this story about? Answer in one sentence.")

    def _make(self, rng):
        story = _task_story(rng)
        return rng.choice(self.TEMPLATES), {"story": story.text}, story.summary, {"story": story.to_dict()}


def spec_to_dict(spec: StorySpec) -> dict:
    return {"hero_name": spec.hero_name, "hero_kind": spec.hero_kind, "friend_name": spec.friend_name,
            "object": spec.object, "place": spec.place,
            "features": list(spec.features) if spec.features is not None else None,
            "required_words": list(spec.required_words) if spec.required_words is not None else None}


_FEATURE_PHRASES = {
    "dialogue": ("with dialogue", "where the characters talk to each other"),
    "twist": ("with a twist", "with a surprise in the middle"),
    "bad_ending": ("with a sad ending", "that does not end well"),
    "moral": ("with a moral", "that teaches a lesson"),
}


class WriteStory(TaskFamily):
    """Constrained story writing: the answer is a generated story that satisfies the requested spec."""

    name = "write_story"
    exact = False
    prose = True
    long_answer = True  # ~135 tokens of the demo's tokenizer (90% under 155): a 48-token budget cuts every story
    # Users also ask for any story at all; without such requests in the demonstrations a model answers
    # "Write a short story." as it would a question (with a number, in the demo's SFT and PPO models).
    OPEN_SHARE = 0.15
    OPEN_TEMPLATES = ("Write a short story.", "Tell me a story.", "Write a story.", "Can you tell me a short story?")
    GENERIC_INSTRUCTIONS = OPEN_TEMPLATES

    def _make(self, rng):
        # Draw a reference story first, then ask for a story with a subset of its properties.
        reference = _task_story(rng)
        hero = reference.characters[0]
        kind_features = [f for f in reference.features if f in _FEATURE_PHRASES]
        chosen = [f for f in kind_features if rng.random() < 0.7]
        ask_place, ask_object, ask_name = rng.random() < 0.7, rng.random() < 0.7, rng.random() < 0.8
        ask_friend = rng.random() < 0.3
        n_required = min(len(reference.required_words), rng.randint(0, 2))
        required = tuple(sorted(rng.sample(reference.required_words, n_required)))
        friend = reference.characters[1].name if ask_friend and len(reference.characters) > 1 else None
        spec = StorySpec(hero_name=hero.name if ask_name else None, hero_kind=hero.kind, friend_name=friend,
                         object=reference.object if ask_object else None, place=reference.place if ask_place else None,
                         features=tuple(chosen), required_words=required or None)
        story = _task_story(rng, spec)
        # Names and words the story must contain are fields (never misspelled by noise); the rest is template.
        values = {"name": hero.name, "kind": hero.kind, "object": reference.object, "place": reference.place,
                  "friend": friend}
        about = "a {kind} named {name}" if ask_name else "a {kind}"
        template = f"Write a {rng.choice(('short ', 'simple ', ''))}story about {about}"
        if friend:
            template += " and a friend named {friend}"
        if ask_object:
            values["a_object"] = ("an " if reference.object[0] in "aeiou" else "a ") + reference.object
            template += rng.choice((" and {a_object}", ", with {a_object}")) if not friend else ", with {a_object}"
        if ask_place:
            template += rng.choice((", set at the {place}", ", at the {place}"))
        for f in chosen:
            template += ", " + rng.choice(_FEATURE_PHRASES[f])
        template += "."
        if required:
            words = " and ".join(f"\"{{w{k}}}\"" for k in range(len(required)))
            template += (" Use the word " if len(required) == 1 else " Use the words ") + words + "."
            values.update({f"w{k}": w for k, w in enumerate(required)})
        if rng.random() < self.OPEN_SHARE:  # drawn last: the constrained requests stay as they were
            # an open request: any story will do, so the one written for the constraints is an answer too
            template, values, spec = rng.choice(self.OPEN_TEMPLATES), {}, StorySpec()
        return template, values, story.text, {"spec": spec_to_dict(spec), "story": story.to_dict()}


FAMILIES: dict[str, TaskFamily] = {f.name: f for f in (
    Arithmetic(), CountWords(), CountLetters(), ReverseWords(), StoryQA(), Summary(), WriteStory())}


def get_family(name: str) -> TaskFamily:
    try:
        return FAMILIES[name]
    except KeyError:
        raise ValueError(f"unknown task family {name!r}; known: {sorted(FAMILIES)}") from None

# ------------------------------------------------------------------------------------------------
# grading
# ------------------------------------------------------------------------------------------------


# The samplers' default budget for whole stories: the demo's demonstrations run 135 tokens (median), 153
# (90%), 165 (99%). A prompt must leave the whole budget of the context; in the demo's 256 tokens, a story
# request of up to 79 tokens does (about 97% of them).
DEFAULT_LONG_ANSWER_TOKENS = 176


def answer_budget(family: str | None, short: int, long: int) -> int:
    """Most tokens a sampler gives an answer: ``long`` for families whose answers are whole stories,
    ``short`` for the rest (and for prompts of no known family).

    Every stage that samples answers to be judged (rank, PPO, evaluate) uses it, so the reward model
    learns on, PPO optimises and the evaluation grades answers cut at the same places.
    """
    return long if family in FAMILIES and FAMILIES[family].long_answer else short


def meta_of(item_or_meta: TaskItem | dict) -> dict:
    if isinstance(item_or_meta, TaskItem):
        return item_or_meta.meta
    if not isinstance(item_or_meta, dict):
        raise TypeError(f"grade: expected a TaskItem or a dict, got {type(item_or_meta).__name__}")
    # A task record {"family", "index", "instruction", "answer", "meta"} or a bare meta dict.
    return item_or_meta["meta"] if isinstance(item_or_meta.get("meta"), dict) else item_or_meta


def grade(item_or_meta: TaskItem | dict, prediction: str, partial: bool = False) -> float:
    """Score a prediction in [0, 1]: exact match (1.0/0.0) for exact families; for ``write_story`` the
    oracle's consistency with the requested spec times its grammar score.

    ``partial=True`` gives a wrong answer to an exact family :func:`partial_credit` (at most
    ``PARTIAL_MAX`` < 1, so a correct answer always scores more): how a labeler tells a near miss
    from nonsense. Task accuracy uses exact match; the labeler's helpfulness uses partial credit."""
    meta = meta_of(item_or_meta)
    family = meta.get("family")
    if family not in FAMILIES:
        raise ValueError(f"grade: meta has no known 'family' (got {family!r}); known: {sorted(FAMILIES)}")
    if FAMILIES[family].exact:
        if "gold" not in meta:
            raise ValueError(f"grade: meta for family {family!r} has no 'gold' answer")
        if oracle.answer_correct(prediction, meta["gold"]):
            return 1.0
        return partial_credit(family, prediction, meta["gold"]) if partial else 0.0
    if "spec" not in meta:
        raise ValueError("grade: write_story meta has no 'spec'")
    consistency = oracle.consistency_score(prediction, meta["spec"])
    return float(consistency) * float(oracle.grammar_score(prediction))

PARTIAL_MAX = 0.5
_INT = re.compile(r"-?\d+")
_ARTICLES = {"a", "an", "the"}  # dropped before F1, as SQuAD does


def _token_f1(pred: list[str], gold: list[str]) -> float:
    """SQuAD-style bag-of-words F1."""
    common = sum(min(pred.count(w), gold.count(w)) for w in set(pred))
    if common == 0:
        return 0.0
    precision, recall = common / len(pred), common / len(gold)
    return 2 * precision * recall / (precision + recall)


def partial_credit(family: str, prediction: str, gold: str) -> float:
    """Credit in [0, PARTIAL_MAX] for a wrong answer to an exact family, by how near it is.

    Numbers (arithmetic, count_words, count_letters): the first integer of the answer, scored
    ``1 - |pred - gold| / (|gold| + 2)`` (no number: 0). reverse_words: the share of the gold
    positions holding the right word. story_qa, summary: bag-of-words F1 against the gold answer.
    The result is scaled by PARTIAL_MAX.
    """
    pred, gold_n = oracle.normalize_answer(prediction), oracle.normalize_answer(gold)
    if not pred:
        return 0.0
    if family in ("arithmetic", "count_words", "count_letters"):
        match = _INT.search(pred)
        if match is None:
            return 0.0
        target = int(gold_n)
        closeness = max(0.0, 1.0 - abs(int(match.group(0)) - target) / (abs(target) + 2))
    elif family == "reverse_words":
        p, g = re.findall(r"[a-z']+", pred), re.findall(r"[a-z']+", gold_n)
        closeness = sum(a == b for a, b in zip(p, g)) / max(len(g), len(p), 1)
    else:
        words = lambda t: [w for w in re.findall(r"[a-z0-9']+", t) if w not in _ARTICLES]  # noqa: E731
        closeness = _token_f1(words(pred), words(gold_n))
    return PARTIAL_MAX * closeness


def wrong_answer(item: TaskItem, rng: random.Random) -> str:
    """A plausible wrong answer to ``item``: a nearby number, the words unreversed or shuffled, another story, name or summary."""
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


# ------------------------------------------------------------------------------------------------
# question-and-answer pages (pretraining) and few-shot prompts share one plain-text format
# ------------------------------------------------------------------------------------------------

QUESTION, ANSWER = "Q: ", "A:"


def qa_block(instruction: str, answer: str) -> str:
    """One question and its answer in plain text; the answer is kept on one line (it ends at a newline)::

        Q: What is 3 plus 4?
        A: 7
    """
    one_line = " ".join(answer.split("\n"))
    return f"{QUESTION}{instruction}\n{ANSWER} {one_line}"


# ------------------------------------------------------------------------------------------------
# chat demonstrations
# ------------------------------------------------------------------------------------------------

SYSTEM_PROMPTS = (
    "You are a helpful and kind assistant.",
    "You are a friendly assistant. Answer simply and correctly.",
    "You are tinygpt, a small assistant that tells stories and answers questions kindly.",
)

CHAT_KINDS = ("single", "story_followup", "arithmetic_followup", "two_tasks")


def _single(index: int, rng: random.Random, seed: int, noise: float, families: Sequence[str]):
    item = get_family(rng.choice(families)).item(index, seed, noise)
    return item.family, [item], [(item.instruction, item.answer, item.meta)]


def _story_followup(index: int, rng: random.Random, seed: int, noise: float, families: Sequence[str]):
    """A requested story, then two questions about it in successive turns."""
    item = FAMILIES["write_story"].item(index, seed, noise)
    story_meta = item.meta["story"]
    hero = story_meta["characters"][0]
    qs = [("who", "Who is the story about?", hero["name"]),
          ("where", "Where does the story happen?", f"the {story_meta['place']}"),
          ("what", "What object is important in the story?", f"the {story_meta['object']}"),
          ("kind", f"What kind of character is {hero['name']}?", f"a {hero['kind']}")]
    picked = rng.sample(qs, 2)
    turns = [(item.instruction, item.answer, item.meta)]
    for kind, q, a in picked:
        turns.append((q, a, {"family": "story_qa", "gold": a, "question": kind}))
    return "chat:story_followup", [item], turns


def _arithmetic_followup(index: int, rng: random.Random, seed: int, noise: float, families: Sequence[str]):
    item = FAMILIES["arithmetic"].item(index, seed, noise)
    first = int(item.answer)
    c = rng.randint(1, 10)
    if rng.random() < 0.5 or first < c:
        q, total = rng.choice((f"Now add {c} to that.", f"And if you add {c} more?", f"What is that plus {c}?")), first + c
    else:
        q, total = rng.choice((f"Now take away {c}.", f"And if you subtract {c}?", f"What is that minus {c}?")), first - c
    turns = [(item.instruction, item.answer, item.meta),
             (q, str(total), {"family": "arithmetic", "gold": str(total), "follow_up": True})]
    return "chat:arithmetic_followup", [item], turns


def _two_tasks(index: int, rng: random.Random, seed: int, noise: float, families: Sequence[str]):
    a, b = rng.sample(list(families), 2) if len(families) >= 2 else (families[0], families[0])
    items = [get_family(a).item(index, seed, noise), get_family(b).item(index, seed, noise)]
    return "chat:two_tasks", items, [(it.instruction, it.answer, it.meta) for it in items]


_CHAT_BUILDERS: dict[str, Callable] = {"single": _single, "story_followup": _story_followup,
                                      "arithmetic_followup": _arithmetic_followup, "two_tasks": _two_tasks}


def make_chat(rng: random.Random, indices: Sequence[int], *, seed: int = 0, noise: float = 0.0,
              kind: str | None = None, families: Sequence[str] | None = None, index: int | None = None,
              multi_turn_share: float = 0.25, system_share: float = 0.3) -> dict:
    """One chat demonstration built from task items whose index is drawn from ``indices``.

    ``kind`` is one of :data:`CHAT_KINDS` (drawn when None: single-turn with probability
    ``1 - multi_turn_share``). Returns ``{"messages", "family", "index", "meta"}`` where
    ``meta["turns"]`` holds one grading meta per assistant turn and ``meta["items"]`` the
    (family, index) of every task item used, so a split check can see them. ``index`` fixes the
    item index instead of drawing it.
    """
    if not indices:
        raise ValueError("make_chat: no item indices to draw from")
    families = list(families) if families is not None else list(FAMILIES)
    unknown = [f for f in families if f not in FAMILIES]
    if unknown:
        raise ValueError(f"make_chat: unknown families {unknown}; known: {sorted(FAMILIES)}")
    if kind is None:
        kind = "single" if rng.random() >= multi_turn_share else rng.choice(CHAT_KINDS[1:])
    if kind not in _CHAT_BUILDERS:
        raise ValueError(f"make_chat: unknown kind {kind!r}; known: {CHAT_KINDS}")
    if index is None:
        index = rng.choice(list(indices))
    elif index not in indices:
        raise ValueError(f"make_chat: index {index} is not among the allowed indices")
    system = rng.choice(SYSTEM_PROMPTS) if rng.random() < system_share else None
    family, items, turns = _CHAT_BUILDERS[kind](index, rng, seed, noise, families)
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant, _ in turns:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": assistant}]
    meta = {"kind": kind, "turns": [m for _, _, m in turns],
            "items": [{"family": it.family, "index": it.index} for it in items]}
    return {"messages": messages, "family": family, "index": index, "meta": meta}
