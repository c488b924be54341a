"""The story generator: a plot grammar over the lexicon, producing short TinyStories-like stories.

How the grammar is built
------------------------
A story is a *plan* of plot slots, fixed by its features:

    opening -> likes -> object -> setting -> meet -> want | (rude -> hurt) -> problem -> feel
      -> ask (spoken if "dialogue") -> [answer | sorry] -> help | fail | twist -> end -> [close | moral]

Each slot holds several one-sentence templates (``TEMPLATES``). A template is literal text with
slots in braces: lexical slots (``{object}``, ``{place}``, ``{color}``, ``{action}``, ...) take the
story's one value for that class, drawn once per story from :mod:`tinygpt.world.lexicon`, so the
object, place, colour and activity introduced early come back later; character slots
(``{H.name}``, ``{F.kind}``, ``{H.Subj}``, ``{H.poss}``, ...) name the hero (H) or the friend (F).
Generating a story picks the features, the cast, one value per lexical class, and one template per
slot. :func:`grammar_size` multiplies those choices out (a lower bound on the number of distinct
stories: it ignores the name-or-pronoun choice and any class that some template of a plan skips).

Why consistency is measurable
-----------------------------
The world has one coreference rule, and the generator obeys it by construction: **a third-person
pronoun (he/him/his, she/her, it/its) refers to the most recently named character**. A pronoun
slot renders as a pronoun only when its character was the last one named (otherwise it renders
the name). Characters are introduced as "<kind> named <Name>"; the story object and place are the
only words of their lexicon classes in a story, and the object keeps one colour. No template's own
words contain a name, pronoun, object or place. So the oracle can check, on any text and without
parsing it, that every pronoun agrees in gender with the last-named character, that no name outside
the cast appears, that each name keeps its kind, and that the object and place are never swapped:
exactly the errors a small model makes after it has learnt the sentences themselves.
Each template is also one sentence that the oracle compiles into a regular expression, so grammar
is "the share of sentences some template accepts" and the features are detectable by which
templates (tagged "twist", "bad_ending", "moral", "ending") the sentences parse as.

This module knows nothing about scoring (see :mod:`tinygpt.world.oracle`), tasks, or tokenizers.
"""

from __future__ import annotations

import dataclasses
import math
import random
import re
from dataclasses import dataclass
from itertools import combinations

from tinygpt.world import lexicon as lx

FEATURES = ("dialogue", "twist", "bad_ending", "moral", "rude")
PRONOUN_PROB = 0.6  # chance a pronoun slot renders as a pronoun when the rule allows one


# --- data --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Character:
    name: str  # "Lily"
    kind: str  # "girl", "boy", "dog", ...
    gender: str  # "female" | "male" | "neuter"
    subj: str  # she / he / it
    obj: str  # her / him / it
    poss: str  # her / his / its

    @classmethod
    def make(cls, name: str, kind: str) -> "Character":
        """A lexicon character: its gender (and pronouns) follow from the name."""
        if name not in lx.NAME_GENDER:
            raise ValueError(f"unknown name {name!r}: names must come from the lexicon (e.g. {lx.NAMES[:5]})")
        if kind not in lx.KINDS:
            raise ValueError(f"unknown kind {kind!r}; expected one of {lx.KINDS}")
        gender = lx.NAME_GENDER[name]
        if not lx.kind_allows_gender(kind, gender):
            raise ValueError(f"a {kind} cannot be named {name} ({gender} name)")
        return cls(name, kind, gender, *lx.PRONOUNS[gender])


@dataclass(frozen=True)
class StorySpec:
    """Constraints a caller may fix; None means: choose at random."""

    hero_name: str | None = None
    hero_kind: str | None = None
    friend_name: str | None = None
    object: str | None = None
    place: str | None = None
    features: tuple[str, ...] | None = None  # subset of FEATURES
    required_words: tuple[str, ...] | None = None


@dataclass
class Story:
    text: str
    characters: list[Character]  # hero first
    object: str
    place: str
    features: tuple[str, ...]
    required_words: tuple[str, ...]  # words the story contains (as TinyStories-Instruct "Words:")
    summary: str  # one sentence, from templates: a summary task's gold answer
    spec: StorySpec

    def to_dict(self) -> dict:
        return {"text": self.text, "characters": [dataclasses.asdict(c) for c in self.characters],
                "object": self.object, "place": self.place, "features": list(self.features),
                "required_words": list(self.required_words), "summary": self.summary,
                "spec": {k: (list(v) if isinstance(v, tuple) else v) for k, v in dataclasses.asdict(self.spec).items()}}


def normalize_features(features) -> tuple[str, ...]:
    """Validate and order features as in FEATURES; a rude remark is spoken, so "rude" implies "dialogue"."""
    if isinstance(features, str):
        raise TypeError("features must be a sequence of feature names, not a string")
    chosen = set(features)
    unknown = sorted(chosen - set(FEATURES))
    if unknown:
        raise ValueError(f"unknown feature(s) {unknown}; expected a subset of {FEATURES}")
    if "rude" in chosen:
        chosen.add("dialogue")
    return tuple(f for f in FEATURES if f in chosen)


# --- templates ---------------------------------------------------------------------------------

# Lexical slot -> the values it may take (the oracle compiles these into the grammar).
SLOT_VALUES: dict[str, tuple[str, ...]] = {
    "object": lx.OBJECTS, "color": lx.COLORS, "adj": lx.ADJECTIVES, "place": lx.PLACES,
    "action": lx.ACTION_BASES, "action_past": tuple(dict.fromkeys(a[1] for a in lx.ACTIONS)),
    "action_ing": tuple(a[2] for a in lx.ACTIONS),
    "feeling_bad": lx.BAD_FEELINGS, "feeling_good": lx.GOOD_FEELINGS, "hazard": lx.HAZARDS,
    "animal": lx.TWIST_ANIMALS, "moral": lx.MORALS_GOOD + lx.MORALS_RUDE + lx.MORALS_BAD,
    "rude": lx.RUDE_PHRASES, "size": lx.SIZES, "friend_adj": lx.FRIEND_ADJECTIVES, "weather": lx.WEATHER,
}
CHARACTER_FORMS = ("name", "kind", "subj", "obj", "poss")
_SLOT = re.compile(r"\{([A-Za-z_]+(?:\.[A-Za-z]+)?)\}")


@dataclass(frozen=True)
class Template:
    slot: str  # plot slot ("opening", "problem", ...) or "summary"
    step: int  # position of the slot in the plot (alternative slots share a step)
    text: str
    tags: frozenset  # features and roles this sentence shows: "twist", "bad_ending", "moral", "rude", "ending"
    parts: tuple  # re.split of text on slots: literal, key, literal, key, ..., literal

    @property
    def keys(self) -> tuple[str, ...]:
        return self.parts[1::2]

    def lexical_classes(self) -> set[str]:
        return {k.lower() for k in self.keys if "." not in k and k.lower() != "a"}


def _check_key(key: str, text: str) -> None:
    if "." in key:
        role, form = key.split(".")
        if role not in ("H", "F") or form.lower() not in CHARACTER_FORMS:
            raise ValueError(f"template {text!r}: bad character slot {{{key}}}")
    elif key.lower() != "a" and key.lower() not in SLOT_VALUES:
        raise ValueError(f"template {text!r}: unknown slot {{{key}}}")


def _template(slot: str, step: int, text: str, tags: tuple[str, ...] = ()) -> Template:
    parts = tuple(_SLOT.split(text))
    for i in range(1, len(parts), 2):
        _check_key(parts[i], text)
        if parts[i].lower() == "a" and (parts[i + 1] != " " or i + 2 >= len(parts)):
            raise ValueError(f"template {text!r}: an article slot must be followed by a space and a slot")
    return Template(slot, step, text, frozenset(tags), parts)


# (slot, step, condition on the feature set, tags, templates). Pronoun slots ({H.subj}, {H.poss}...)
# may render as the name; "Subj"/"Poss" capitalize. Speech tags after a quote always use a name.
_PLOT_SPEC = (
    ("opening", 0, "", (), (
        "Once upon a time, there was {a} {size} {H.kind} named {H.name}.",
        "Once there was {a} {size} {H.kind} named {H.name}.",
        "There once was {a} {size} {H.kind} named {H.name}.",
        "Once upon a time, in a little house, there lived {a} {size} {H.kind} named {H.name}.",
        "Long ago, there was {a} {size} {H.kind} named {H.name}.",
        "One day, {a} {size} {H.kind} named {H.name} woke up early.")),
    ("likes", 1, "", (), (
        "{H.Subj} loved to {action} every day.",
        "{H.Subj} liked to {action} with {H.poss} family.",
        "Every morning, {H.subj} liked to {action} in the sun.",
        "More than anything, {H.subj} loved to {action}.",
        "{H.Poss} favorite thing to do was to {action}.")),
    ("object", 2, "", (), (
        "{H.Subj} had {a} {adj} {color} {object}.",
        "{H.Poss} favorite toy was {a} {adj} {color} {object}.",
        "{H.Subj} always carried {a} {adj} {color} {object}.",
        "{H.Poss} grandma gave {H.obj} {a} {adj} {color} {object}.",
        "{H.Subj} had {a} {adj} {color} {object} that {H.subj} loved very much.")),
    ("setting", 3, "", (), (
        "One {weather} day, {H.subj} went to the {place}.",
        "One day, {H.subj} took {H.poss} {object} to the {place}.",
        "One {weather} morning, {H.subj} went to play at the {place}.",
        "{H.Subj} went to the {place} with {H.poss} {object}.",
        "One day, {H.subj} and {H.poss} mom went to the {place}.",
        "The next day, {H.subj} went to the {place} to {action}.")),
    ("meet", 4, "", (), (
        "At the {place}, {H.subj} met {a} {friend_adj} {F.kind} named {F.name}.",
        "There, {H.subj} saw {a} {friend_adj} {F.kind} named {F.name}.",
        "Soon, {H.subj} met {a} {friend_adj} {F.kind} named {F.name}.",
        "{H.Subj} made a new friend, {a} {friend_adj} {F.kind} named {F.name}.",
        "At the {place}, there was {a} {friend_adj} {F.kind} named {F.name}.")),
    ("want", 5, "-rude", (), (
        "{F.Subj} wanted to {action} with {H.name}.",
        "{H.name} and {F.name} wanted to {action} together.",
        "{F.Subj} asked {H.name} to {action} with {H.obj}.",
        "{F.Subj} wanted to play with {H.name} and {H.poss} {object}.",
        "{H.name} showed {F.name} the {object}, and they played all morning.")),
    ("rude", 6, "rude", ("rude",), (
        '{H.name} asked to play with {F.name}, but {F.subj} said, "{Rude}!"',
        '"{Rude}!" shouted {F.name}.',
        '{F.name} looked at {H.name} and said, "{Rude}!"',
        '{F.Subj} laughed at the {object} and said, "{Rude}!"')),
    ("hurt", 7, "rude", (), (
        "Those mean words made {H.name} feel {feeling_bad}.",
        "{H.name} was hurt and walked away.",
        "{H.Subj} did not like those mean words.")),
    ("problem", 8, "", (), (
        "But then, a big wind blew the {object} away, and the {object} got stuck {hazard}.",
        "Suddenly, the {object} fell and got stuck {hazard}.",
        "Then {H.subj} dropped {H.poss} {object}, and the {object} rolled away and got stuck {hazard}.",
        "Oh no, the {object} flew away and landed {hazard}.",
        "But then, {H.poss} {object} slipped away and ended up {hazard}.")),
    ("feel", 9, "", (), (
        "{H.name} felt very {feeling_bad}.",
        "{H.Subj} was {feeling_bad} and began to cry.",
        "This made {H.name} feel {feeling_bad}.",
        "{H.Subj} felt {feeling_bad} because {H.subj} missed {H.poss} {object}.")),
    ("ask", 10, "-dialogue", (), (
        "{H.Subj} asked {F.name} for help.",
        "{H.Subj} looked at {F.name} and asked for help.",
        "{H.Subj} needed help, so {H.subj} went to {F.name}.")),
    ("ask_spoken", 10, "dialogue", (), (
        '{H.Subj} asked {F.name}, "Can you help me get my {object}?"',
        '"Can you help me, {F.name}?" asked {H.name}.',
        '{H.Subj} cried, "Please help me get my {object}, {F.name}!"',
        '"{F.name}, my {object} is stuck!" said {H.name}.')),
    ("answer", 11, "dialogue -rude", (), (
        '"Do not worry, I will help you," said {F.name}.',
        '{F.name} said, "I can help you!"',
        '"Yes, I will help," said {F.name}.',
        '{F.name} smiled and said, "We can get the {object} back together."')),
    ("sorry", 11, "rude -bad_ending", (), (
        '"I am sorry I was mean," said {F.name}.',
        '{F.name} said, "I am sorry for my mean words."',
        '{F.name} felt bad and said, "I am sorry."')),
    ("help", 13, "-twist -bad_ending", (), (
        "{F.name} worked hard and got the {object} back.",
        "{F.Subj} used a long stick to get the {object} back for {H.name}.",
        "Together, {H.name} and {F.name} got the {object} out.",
        "{F.name} thought hard, and then {F.subj} found a way to get the {object} back.",
        "{F.name} reached far and got the {object} for {H.name}.",
        "With a big jump, {F.name} got the {object} and gave the {object} back to {H.name}.")),
    ("fail", 13, "-twist bad_ending", ("bad_ending",), (
        "{F.name} tried to help, but the {object} was too far away.",
        "They tried and tried, but they could not get the {object} back.",
        "{F.name} tried to reach the {object}, but {F.subj} was too small.")),
    ("twist_good", 13, "twist -bad_ending", ("twist",), (
        "To everyone's surprise, {a} {animal} came and brought the {object} back.",
        "Then something surprising happened: {a} {animal} carried the {object} back to {H.name}.",
        "But to their surprise, {a} {animal} had found the {object} and gave the {object} back to {H.name}.",
        "Suddenly, to their surprise, {a} {animal} picked up the {object} and dropped the {object} at {H.poss} feet.")),
    ("twist_bad", 13, "twist bad_ending", ("twist", "bad_ending"), (
        "To everyone's surprise, {a} {animal} came and took the {object} away.",
        "Then something surprising happened: {a} {animal} grabbed the {object} and ran off.",
        "But to their surprise, {a} {animal} took the {object} and hid the {object} far away.")),
    ("end_good", 14, "-bad_ending", ("ending",), (
        "{H.name} was so {feeling_good} to have {H.poss} {object} back.",
        "{H.name} felt {feeling_good} and hugged {F.name}.",
        "{H.name} said thank you to {F.name} and felt very {feeling_good}.",
        "Now {H.name} was {feeling_good} again, and {H.poss} {object} was safe.")),
    ("end_bad", 14, "bad_ending", ("ending", "bad_ending"), (
        "{H.name} never saw {H.poss} {color} {object} again.",
        "{H.name} went home without {H.poss} {object} and cried.",
        "The {object} was gone forever, and {H.name} was very {feeling_bad}.")),
    ("close_good", 15, "-bad_ending -moral", ("ending",), (
        "From that day on, {H.name} and {F.name} were best friends.",
        "They played with the {color} {object} together until the sun went down.",
        "{H.name} and {F.name} went home {feeling_good} and tired.",
        "After that, {H.name} and {F.name} always played at the {place} together.",
        "{H.name} and {F.name} played together every day after that.")),
    ("close_bad", 15, "bad_ending -moral", ("ending", "bad_ending"), (
        "{H.Subj} did not want to go to the {place} ever again.",
        "That was a very sad day for {H.name}.",
        "{H.name} stayed home and missed {H.poss} {object} for a long time.")),
    ("moral", 16, "moral", ("moral",), (
        "{H.name} learned that {moral}.",
        "The moral of the story is that {moral}.",
        "From that day, {H.name} knew that {moral}.")),
)

# One summary template per outcome, so a summary is a function of the story (exactly learnable).
_SUMMARY_LOST = "{H.name} the {H.kind} lost {a} {color} {object} at the {place}"
_SUMMARY_SPEC = {
    # (rude, outcome) -> template
    (False, "help"): _SUMMARY_LOST + ", and {F.name} the {F.kind} helped get the {object} back.",
    (False, "fail"): _SUMMARY_LOST + ", and {F.name} the {F.kind} could not get the {object} back.",
    (False, "twist_good"): _SUMMARY_LOST + ", and {a} {animal} brought the {object} back.",
    (False, "twist_bad"): _SUMMARY_LOST + ", and {a} {animal} took the {object} away.",
    (True, "help"): _SUMMARY_LOST + ", and {F.name} the {F.kind}, who had been mean, helped get the {object} back.",
    (True, "fail"): _SUMMARY_LOST + ", and {F.name} the {F.kind}, who had been mean, could not get the {object} back.",
    (True, "twist_good"): _SUMMARY_LOST + " after {F.name} the {F.kind} was mean, and {a} {animal} brought the {object} back.",
    (True, "twist_bad"): _SUMMARY_LOST + " after {F.name} the {F.kind} was mean, and {a} {animal} took the {object} away.",
}


def _condition(spec: str):
    """"rude -bad_ending" -> a predicate on a feature set: rude present and bad_ending absent."""
    need = [w for w in spec.split() if not w.startswith("-")]
    avoid = [w[1:] for w in spec.split() if w.startswith("-")]
    for f in need + avoid:
        if f not in FEATURES:
            raise ValueError(f"plot condition names unknown feature {f!r}")
    return lambda feats: all(f in feats for f in need) and not any(f in feats for f in avoid)


PLOT = tuple((slot, step, _condition(cond), tuple(_template(slot, step, t, tags) for t in texts))
             for slot, step, cond, tags, texts in _PLOT_SPEC)
SUMMARY_TEMPLATES = {key: _template("summary", -1, text, ("summary",)) for key, text in _SUMMARY_SPEC.items()}
TEMPLATES: tuple[Template, ...] = tuple(t for *_, ts in PLOT for t in ts) + tuple(SUMMARY_TEMPLATES.values())


def plan(features: tuple[str, ...]) -> list[tuple[str, tuple[Template, ...]]]:
    """The plot slots a story with these (normalized) features is made of, in order."""
    return [(slot, templates) for slot, _, cond, templates in PLOT if cond(features)]


def _morals(features: tuple[str, ...]) -> tuple[str, ...]:
    if "rude" in features:
        return lx.MORALS_RUDE
    return lx.MORALS_BAD if "bad_ending" in features else lx.MORALS_GOOD


def _outcome(features: tuple[str, ...]) -> str:
    if "twist" in features:
        return "twist_bad" if "bad_ending" in features else "twist_good"
    return "fail" if "bad_ending" in features else "help"


# --- rendering ---------------------------------------------------------------------------------


class _Renderer:
    """Fills templates for one story, tracking which character was named last (the pronoun rule)."""

    def __init__(self, rng: random.Random | None, cast: dict[str, Character], values: dict[str, str]):
        self.rng, self.cast, self.values = rng, cast, values
        self.last: str | None = None
        self.in_sentence: set[str] = set()

    def character(self, role: str, form: str) -> str:
        c = self.cast[role]
        low = form.lower()
        if low == "kind":
            return c.kind
        if low == "name":
            self.last = role
            self.in_sentence.add(role)
            return c.name
        # The rule allows a pronoun only for the last-named character; within one sentence a second
        # mention always is one ("Lily lost her ball"), across sentences it is a coin flip.
        pronoun_ok = self.last == role and self.rng is not None and (
            role in self.in_sentence or self.rng.random() < PRONOUN_PROB)
        self.last = role
        self.in_sentence.add(role)
        if pronoun_ok:
            s = {"subj": c.subj, "obj": c.obj, "poss": c.poss}[low]
        else:
            s = c.name + "'s" if low == "poss" else c.name
        return s[0].upper() + s[1:] if form[0].isupper() else s

    def render(self, template: Template) -> str:
        parts = template.parts
        self.in_sentence = set()
        out: list[str] = []
        articles: list[int] = []
        for i, piece in enumerate(parts):
            if not i % 2:
                out.append(piece)
            elif piece in ("a", "A"):
                articles.append(len(out))
                out.append(piece)
            elif "." in piece:
                role, form = piece.split(".")
                out.append(self.character(role, form))
            else:
                value = self.values[piece.lower()]
                out.append(value[0].upper() + value[1:] if piece[0].isupper() else value)
        for i in articles:  # out[i + 1] is the space, out[i + 2] the word the article goes with
            article = "an" if out[i + 2][:1].lower() in "aeiou" else "a"
            out[i] = article.capitalize() if out[i] == "A" else article
        return "".join(out)


# --- generation --------------------------------------------------------------------------------

_SPEC_CLASS_FIELD = {"object": "object", "place": "place"}
_CLASS_SLOT = {"action": "action", "object": "object", "place": "place", "color": "color", "adjective": "adj",
               "feeling": "feeling_bad"}


def _required_values(spec: StorySpec) -> dict[str, str]:
    """Required words -> the lexical slot values they fix (at most one word per class)."""
    fixed: dict[str, str] = {}
    for word in spec.required_words or ():
        if not isinstance(word, str):
            raise TypeError(f"required words must be strings, got {word!r}")
        cls = lx.word_class(word)
        if cls is None:
            raise ValueError(f"required word {word!r} is not in the world's lexicon; it must be one of the "
                             f"{'/'.join(lx.REQUIRED_WORD_CLASSES)} words of tinygpt.world.lexicon")
        slot = _CLASS_SLOT[cls]
        if slot in fixed and fixed[slot] != word.lower():
            raise ValueError(f"required words {fixed[slot]!r} and {word!r} are both {cls} words; a story has one")
        given = getattr(spec, _SPEC_CLASS_FIELD[cls]) if cls in _SPEC_CLASS_FIELD else None
        if given is not None and given != word.lower():
            raise ValueError(f"required word {word!r} conflicts with the spec's {cls} {given!r}")
        fixed[slot] = word.lower()
    return fixed


def _pick_character(rng: random.Random, name: str | None, kind: str | None, exclude: str | None) -> Character:
    if kind is not None and kind not in lx.KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {lx.KINDS}")
    if name is None:
        pool = [n for n in lx.NAMES if n != exclude and (kind is None or lx.kind_allows_gender(kind, lx.NAME_GENDER[n]))]
        name = rng.choice(pool)
    if kind is None:
        if name not in lx.NAME_GENDER:
            raise ValueError(f"unknown name {name!r}: names must come from the lexicon (e.g. {lx.NAMES[:5]})")
        kind = rng.choice(lx.kinds_for_gender(lx.NAME_GENDER[name]))
    return Character.make(name, kind)


def _choose(rng: random.Random, given: str | None, pool: tuple[str, ...], what: str) -> str:
    if given is None:
        return rng.choice(pool)
    if given not in pool:
        raise ValueError(f"unknown {what} {given!r}; expected one of {pool}")
    return given


def generate_story(rng: random.Random, spec: StorySpec | None = None, *, rude_share: float = 0.05) -> Story:
    """One story; deterministic given the rng state. ``rude_share`` is the chance of a rude story
    when ``spec.features`` is None (with fixed features, "rude" is there only if asked for)."""
    if not isinstance(rng, random.Random):
        raise TypeError(f"rng must be a random.Random, got {type(rng).__name__}")
    if not (isinstance(rude_share, (int, float)) and 0.0 <= rude_share <= 1.0):
        raise ValueError(f"rude_share must be in [0, 1], got {rude_share!r}")
    spec = spec if spec is not None else StorySpec()
    if not isinstance(spec, StorySpec):
        raise TypeError(f"spec must be a StorySpec, got {type(spec).__name__}")
    fixed = _required_values(spec)

    if spec.features is None:
        drawn = [f for f, p in (("dialogue", 0.5), ("twist", 0.3), ("bad_ending", 0.25), ("moral", 0.4),
                                ("rude", rude_share)) if rng.random() < p]
        features = normalize_features(drawn)
    else:
        features = normalize_features(spec.features)

    if spec.friend_name is not None and spec.friend_name == spec.hero_name:
        raise ValueError(f"hero and friend cannot share the name {spec.hero_name!r}")
    hero = _pick_character(rng, spec.hero_name, spec.hero_kind, exclude=spec.friend_name)
    friend = _pick_character(rng, spec.friend_name, None, exclude=hero.name)

    action = lx.ACTIONS[lx.ACTION_BASES.index(_choose(rng, fixed.get("action"), lx.ACTION_BASES, "action"))]
    values = {
        "object": _choose(rng, spec.object or fixed.get("object"), lx.OBJECTS, "object"),
        "place": _choose(rng, spec.place or fixed.get("place"), lx.PLACES, "place"),
        "color": _choose(rng, fixed.get("color"), lx.COLORS, "color"),
        "adj": _choose(rng, fixed.get("adj"), lx.ADJECTIVES, "adjective"),
        "action": action[0], "action_past": action[1], "action_ing": action[2],
        "feeling_bad": _choose(rng, fixed.get("feeling_bad"), lx.BAD_FEELINGS, "feeling"),
        "feeling_good": rng.choice(lx.GOOD_FEELINGS),
        "hazard": rng.choice(lx.HAZARDS),
        "animal": rng.choice(lx.TWIST_ANIMALS),
        "moral": rng.choice(_morals(features)),
        "rude": rng.choice(lx.RUDE_PHRASES),
        "size": rng.choice(lx.SIZES),
        "friend_adj": rng.choice(lx.FRIEND_ADJECTIVES),
        "weather": rng.choice(lx.WEATHER),
    }
    cast = {"H": hero, "F": friend}
    renderer = _Renderer(rng, cast, values)
    text = " ".join(renderer.render(rng.choice(templates)) for _, templates in plan(features))

    if spec.required_words is not None:
        required = tuple(w.lower() for w in spec.required_words)
    else:  # as TinyStories-Instruct: a verb, a noun and an adjective the story contains
        noun = rng.choice(("object", "place"))
        adjective = rng.choice(("adj", "color", "feeling_bad"))
        required = (values["action"], values[noun], values[adjective])
    summary = _Renderer(None, cast, values).render(SUMMARY_TEMPLATES[("rude" in features, _outcome(features))])
    return Story(text=text, characters=[hero, friend], object=values["object"], place=values["place"],
                 features=features, required_words=required, summary=summary, spec=spec)


# --- size of the grammar -----------------------------------------------------------------------


def _cast_count() -> int:
    """Ordered (hero, friend) pairs of (name, kind) with distinct names."""
    per_name = [len(lx.kinds_for_gender(g)) for g in lx.NAME_GENDER.values()]
    total = sum(per_name)
    return sum(k * (total - k) for k in per_name)


def grammar_size() -> int:
    """A lower bound on the number of distinct stories, computed from the templates and lexicon.

    For each of the 24 distinct feature sets: cast pairs x template choices per slot x the values of
    every lexical class that *every* template of some slot of the plan uses (so it shows in the text).
    """
    feature_sets = {normalize_features(c) for r in range(len(FEATURES) + 1) for c in combinations(FEATURES, r)}
    total = 0
    for features in sorted(feature_sets):
        slots = plan(features)
        templates = math.prod(len(ts) for _, ts in slots)
        shown: set[str] = set()
        for _, ts in slots:
            shown |= set.intersection(*(t.lexical_classes() for t in ts))
        choices = {**{c: len(v) for c, v in SLOT_VALUES.items()}, "moral": len(_morals(features))}
        total += _cast_count() * templates * math.prod(choices[c] for c in shown)
    return total
