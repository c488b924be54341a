"""The oracle: exact judgements of text against the truth of the synthetic world.

* :func:`grammar_score`: the share of sentences that some template of the story grammar accepts.
  Every template of :mod:`tinygpt.world.stories` is compiled into a regular expression whose slots
  match their lexicon class (names, pronouns, objects, places, ...); a sentence is grammatical when
  it matches one in full.
* :func:`consistency_score` / :func:`consistency_report`: a mean of checks of the text against
  what a story (or a request, :class:`StorySpec`) says: cast, kinds, no strangers, pronouns that
  follow the world's rule (a pronoun refers to the last-named character), one object and one place
  throughout, the object's colour, the features, the required words, a proper ending, plot order.
* :func:`rudeness` / :func:`is_rude`: the fixed rude phrases of the lexicon, counted.
* :func:`answer_correct`: exact match after normalization (case, outer punctuation, spaces, numbers).
* :class:`NoveltyIndex`: the share of sentences and word 8-grams of a text absent from a corpus.

Everything is linear in the text and bounded per sentence, so a megabyte of input (or garbage,
or no punctuation at all) is judged in well under a second. This module knows nothing about models,
tokenizers, tasks or files: it reads strings.
"""

from __future__ import annotations

import dataclasses
import re
from array import array
from functools import lru_cache
from typing import Any, Iterable

import numpy as np

from tinygpt.world import lexicon as lx
from tinygpt.world.stories import FEATURES, SLOT_VALUES, TEMPLATES, Story, StorySpec, Template, normalize_features

MAX_SENTENCE_CHARS = 400  # no template renders longer; longer "sentences" are rejected unparsed
_TRANSLATE = str.maketrans({"\u201c": '"', "\u201d": '"', "\u2018": "'", "\u2019": "'", "\u00a0": " "})


def _clean(text: str) -> str:
    if not isinstance(text, str):
        raise TypeError(f"text must be a str, got {type(text).__name__}")
    return text.translate(_TRANSLATE)


# --- sentences and grammar ---------------------------------------------------------------------

# A sentence ends at . ! or ? (with a closing quote) before a capital or an opening quote, or at a line break.
_BOUNDARY = re.compile(r'([.!?]"?)\s+(?=["A-Z])|\s*\n\s*')
_FIRST_WORD = re.compile(r"\W*([A-Za-z]+)")


def sentences(text: str) -> list[str]:
    """Split text into sentences (whitespace inside each collapsed); quotes stay with their sentence."""
    text = _clean(text)
    out, start = [], 0
    for m in _BOUNDARY.finditer(text):
        end = m.end(1) if m.group(1) else m.start()
        piece = text[start:end].strip()
        if piece:
            out.append(" ".join(piece.split()))
        start = m.end()
    tail = text[start:].strip()
    if tail:
        out.append(" ".join(tail.split()))
    return out


def _alternation(values: Iterable[str]) -> str:
    return "(?:" + "|".join(re.escape(v) for v in sorted(set(values), key=len, reverse=True)) + ")"


def _cap(s: str) -> str:
    return s[0].upper() + s[1:]


def _slot_values(key: str) -> tuple[str, ...]:
    """Every string a template slot can render as."""
    if key in ("a", "A"):
        return ("a", "an") if key == "a" else ("A", "An")
    if "." in key:
        form = key.split(".")[1]
        low = form.lower()
        if low == "kind":
            return lx.KINDS
        if low == "name":
            return lx.NAMES
        idx = {"subj": 0, "obj": 1, "poss": 2}[low]
        pronouns = tuple(dict.fromkeys(p[idx] for p in lx.PRONOUNS.values()))
        names = tuple(n + "'s" for n in lx.NAMES) if low == "poss" else lx.NAMES
        if form[0].isupper():
            pronouns = tuple(_cap(p) for p in pronouns)
        return names + pronouns
    values = SLOT_VALUES[key.lower()]
    return tuple(_cap(v) for v in values) if key[0].isupper() else values


def _first_words(t: Template) -> set[str]:
    m = _FIRST_WORD.match(t.parts[0])
    if m:
        return {m.group(1)}
    return {_FIRST_WORD.match(v).group(1) for v in _slot_values(t.parts[1])}  # type: ignore[union-attr]


@lru_cache(maxsize=1)
def _grammar() -> tuple[list[re.Pattern], dict[str, list[int]]]:
    """One compiled regex per template, and the templates indexed by the first word they can start with."""
    patterns, by_first = [], {}
    for i, t in enumerate(TEMPLATES):
        regex = "".join(re.escape(p) if not j % 2 else _alternation(_slot_values(p)) for j, p in enumerate(t.parts))
        patterns.append(re.compile(regex))
        for w in _first_words(t):
            by_first.setdefault(w, []).append(i)
    return patterns, by_first


@lru_cache(maxsize=1 << 16)
def parse(sentence: str) -> Template | None:
    """The template a sentence (as returned by :func:`sentences`) is an instance of, or None."""
    if len(sentence) > MAX_SENTENCE_CHARS:
        return None
    m = _FIRST_WORD.match(sentence)
    if not m:
        return None
    patterns, by_first = _grammar()
    for i in by_first.get(m.group(1), ()):
        if patterns[i].fullmatch(sentence):
            return TEMPLATES[i]
    return None


def grammar_score(text: str) -> float:
    """Share of sentences the world's grammar accepts; 0.0 for empty text."""
    sents = sentences(text)
    if not sents:
        return 0.0
    return sum(parse(s) is not None for s in sents) / len(sents)


# --- rudeness ----------------------------------------------------------------------------------

_RUDE = re.compile(r"\b(?:" + "|".join(r"\s+".join(map(re.escape, p.lower().split())) for p in lx.RUDE_PHRASES)
                   + r")\b", re.IGNORECASE)


def rudeness(text: str) -> int:
    """How many rude phrases (from the lexicon's fixed list) the text contains."""
    return sum(1 for _ in _RUDE.finditer(_clean(text)))


def is_rude(text: str) -> bool:
    return _RUDE.search(_clean(text)) is not None


# --- consistency -------------------------------------------------------------------------------


@dataclasses.dataclass
class _Expected:
    """What the text should show; None where the meta leaves it open (then it is read off the text)."""

    names: list[str | None]  # hero, friend
    kinds: list[str | None]
    genders: list[str | None]
    object: str | None
    place: str | None
    features: tuple[str, ...] | None
    required_words: tuple[str, ...] | None


def _expected(meta: Any) -> _Expected:
    if meta is None:
        meta = StorySpec()
    if isinstance(meta, Story):
        meta = meta.to_dict()
    if isinstance(meta, StorySpec):
        meta = dataclasses.asdict(meta)
    if not isinstance(meta, dict):
        raise TypeError(f"meta must be a Story, StorySpec or dict, got {type(meta).__name__}")
    features = meta.get("features")
    required = meta.get("required_words")
    common = dict(object=meta.get("object"), place=meta.get("place"),
                  features=normalize_features(features) if features is not None else None,
                  required_words=tuple(required) if required is not None else None)
    if "characters" in meta:  # a story's metadata
        chars = list(meta["characters"])[:2]
        if not chars:
            raise ValueError("meta has an empty 'characters' list")
        chars += [{}] * (2 - len(chars))
        get = lambda c, k: c.get(k) if isinstance(c, dict) else getattr(c, k, None)  # noqa: E731
        return _Expected(names=[get(c, "name") for c in chars], kinds=[get(c, "kind") for c in chars],
                         genders=[get(c, "gender") for c in chars], **common)
    unknown = set(meta) - {f.name for f in dataclasses.fields(StorySpec)}
    if unknown:
        raise ValueError(f"meta has unknown keys {sorted(unknown)}; expected Story.to_dict() or StorySpec fields")
    return _Expected(names=[meta.get("hero_name"), meta.get("friend_name")], kinds=[meta.get("hero_kind"), None],
                     genders=[None, None], **common)


_WORD = re.compile(r"[A-Za-z]+")
_NAMED = re.compile(r"\b([A-Za-z]+) named ([A-Z][a-z]+)\b")
_OBJECTS, _PLACES, _COLORS = set(lx.OBJECTS), set(lx.PLACES), set(lx.COLORS)
_ENDS_SENTENCE = re.compile(r'[.!?]"?\s*$')


def _share(good: int, total: int, empty: float = 1.0) -> float:
    return good / total if total else empty


def _errors(n: int) -> float:
    """A reference check's score: 1 with no error, 1/2 with one, 1/3 with two, ... (independent of length,
    so a single swapped name or pronoun in a long story still costs a visible share of the mean)."""
    return 1.0 / (1 + n)


def consistency_report(text: str, meta: Story | StorySpec | dict | None) -> dict:
    """Each check in [0, 1], their mean ("score"), whether all pass ("consistent"), and what went wrong.

    Checks (those the meta leaves open are read off the text: the first name is the hero, the
    first object the object, ...). Presence checks score the share present: ``cast`` (both characters
    named), ``kinds`` (each introduced as "<kind> named <Name>" with its kind), ``features`` (each of
    the five present iff asked), ``required_words``, ``ending`` (ends on an ending, or ending + moral).
    Reference checks score 1 / (1 + errors): ``strangers`` (mentions of names outside the cast),
    ``pronouns`` (pronouns whose gender differs from the last-named character's), ``object`` and
    ``place`` (0 if never mentioned, else mentions of another object / place), ``object_color``
    (mentions of the object in another colour), ``plot_order`` (sentences out of plot order or repeated).
    """
    text = _clean(text)
    exp = _expected(meta)
    problems: list[str] = []

    # --- one pass over the words: names, pronouns, objects, places, colours before the object
    name_mentions: list[str] = []
    pronouns: list[tuple[str, str | None]] = []  # (pronoun, last-named character)
    objects, places, color_pairs = [], [], []
    last_name, prev = None, ""
    for m in _WORD.finditer(text):
        w = m.group(0)
        low = w.lower()
        if w in lx.NAME_GENDER:
            name_mentions.append(w)
            last_name = w
        elif low in lx.PRONOUN_GENDER:
            pronouns.append((low, last_name))
        elif low in _OBJECTS:
            objects.append(low)
            if prev in _COLORS:
                color_pairs.append((prev, low))
        elif low in _PLACES:
            places.append(low)
        prev = low

    # --- the cast: given by the meta, else the first names of the text
    names = list(exp.names)
    distinct = list(dict.fromkeys(name_mentions))
    for i in range(2):
        if names[i] is None:
            names[i] = next((n for n in distinct if n not in names), None)
    gender = {n: lx.NAME_GENDER[n] for n in distinct}
    for n, g in zip(names, exp.genders):
        if n is not None:
            gender[n] = g or lx.NAME_GENDER.get(n, g)
    cast = [n for n in names if n is not None]
    present = set(name_mentions)

    checks: dict[str, float] = {}
    checks["cast"] = sum(n in present for n in cast) / 2
    problems += [f"character {n!r} never named" for n in cast if n not in present]

    introduced: dict[str, list[str]] = {}
    for m in _NAMED.finditer(text):
        introduced.setdefault(m.group(2), []).append(m.group(1).lower())
    kind_scores = []
    for n, kind in zip(names, exp.kinds):
        intro = introduced.get(n, []) if n else []
        if not intro:
            kind_scores.append(0.0)
            problems.append(f"character {n!r} never introduced as '<kind> named {n}'")
            continue
        want = kind or intro[0]
        if not lx.kind_allows_gender(want, gender.get(n) or "neuter") and want in lx.HUMAN_KINDS:
            want = None  # a girl named Tom: no kind is right
        kind_scores.append(sum(k == want for k in intro) / len(intro))
        if kind_scores[-1] < 1:
            problems.append(f"{n} introduced as {intro}, expected {want!r}")
    checks["kinds"] = sum(kind_scores) / 2

    strangers = [n for n in name_mentions if n not in cast]
    checks["strangers"] = _errors(len(strangers))
    if strangers:
        problems.append(f"names outside the cast: {sorted(set(strangers))}")

    agree = 0
    for p, antecedent in pronouns:
        if antecedent is not None and gender.get(antecedent) == lx.PRONOUN_GENDER[p]:
            agree += 1
        elif len(problems) < 50:
            problems.append(f"pronoun {p!r} after {antecedent!r} ({gender.get(antecedent) if antecedent else 'nobody'})")
    checks["pronouns"] = _errors(len(pronouns) - agree)

    for what, mentions, given in (("object", objects, exp.object), ("place", places, exp.place)):
        want = given or (mentions[0] if mentions else None)
        if want is None or want not in mentions:
            checks[what] = 0.0
            problems.append(f"{what} {want!r} never mentioned")
        else:
            checks[what] = _errors(len(mentions) - mentions.count(want))
            others = sorted(set(mentions) - {want})
            if others:
                problems.append(f"{what} {want!r} swapped for {others}")
    the_object = exp.object or (objects[0] if objects else None)
    colors = [c for c, o in color_pairs if o == the_object]
    checks["object_color"] = _errors(len(colors) - colors.count(colors[0])) if colors else 1.0
    if len(set(colors)) > 1:
        problems.append(f"the {the_object} changes colour: {colors}")

    sents = sentences(text)
    parsed = [parse(s) for s in sents]
    tags = set().union(*(t.tags for t in parsed if t is not None))
    if exp.features is not None:
        shown = {"dialogue": '"' in text, "rude": is_rude(text), "twist": "twist" in tags,
                 "bad_ending": "bad_ending" in tags, "moral": "moral" in tags}
        wrong = [f for f in FEATURES if shown[f] != (f in exp.features)]
        checks["features"] = 1 - len(wrong) / len(FEATURES)
        problems += [f"feature {f!r} {'missing' if f in exp.features else 'not asked for'}" for f in wrong]

    if exp.required_words is not None:
        words = {m.group(0).lower() for m in _WORD.finditer(text)}
        missing = [w for w in exp.required_words if not any(f in words for f in lx.word_forms(w))]
        checks["required_words"] = _share(len(exp.required_words) - len(missing), len(exp.required_words))
        problems += [f"required word {w!r} missing" for w in missing]

    closing = [("moral" in t.tags or "ending" in t.tags) if t is not None else False for t in parsed]
    ends = bool(parsed) and parsed[-1] is not None and closing[-1] and bool(_ENDS_SENTENCE.search(text))
    if ends and "moral" in parsed[-1].tags:  # type: ignore[union-attr]
        ends = len(parsed) > 1 and parsed[-2] is not None and "ending" in parsed[-2].tags
    checks["ending"] = float(ends)
    if not ends:
        problems.append("the story does not end on an ending (or ending + moral) sentence")

    steps = [t.step for t in parsed if t is not None and t.slot != "summary"]
    checks["plot_order"] = _errors(sum(a >= b for a, b in zip(steps, steps[1:]))) if steps else 0.0
    if checks["plot_order"] < 1:
        problems.append("sentences out of plot order or repeated")

    score = sum(checks.values()) / len(checks)
    return {"score": score, "consistent": all(v == 1.0 for v in checks.values()), "checks": checks,
            "cast": cast, "problems": problems}


def consistency_score(text: str, meta: Story | StorySpec | dict | None) -> float:
    """Mean of the checks of :func:`consistency_report`, in [0, 1]."""
    return consistency_report(text, meta)["score"]


# --- answers -----------------------------------------------------------------------------------

_UNITS = {w: i for i, w in enumerate(
    "zero one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen sixteen "
    "seventeen eighteen nineteen".split())}
_TENS = {w: 10 * i for i, w in enumerate("twenty thirty forty fifty sixty seventy eighty ninety".split(), start=2)}
_NUMBER_WORD = "|".join(sorted(list(_UNITS) + list(_TENS) + ["hundred", "thousand"], key=len, reverse=True))
_NUMBER_RUN = re.compile(rf"\b(?:{_NUMBER_WORD})(?:(?:\s+|-)(?:and\s+)?(?:{_NUMBER_WORD}))*\b")


def _below_thousand(words: list[str]) -> int | None:
    """["one", "hundred", "five"] -> 105; None unless the words spell one number below 1000."""
    value = 0
    if len(words) >= 2 and words[1] == "hundred":
        if words[0] not in _UNITS or _UNITS[words[0]] == 0:
            return None
        value, words = 100 * _UNITS[words[0]], words[2:]
        if words and words[0] == "and":
            words = words[1:]
            if not words:
                return None
    if not words:
        return value if value else None
    if len(words) == 1 and words[0] in _UNITS:
        return value + _UNITS[words[0]] if not (value and words[0] == "zero") else None
    if words[0] in _TENS and len(words) <= 2:
        if len(words) == 2 and not (words[1] in _UNITS and 0 < _UNITS[words[1]] < 10):
            return None
        return value + _TENS[words[0]] + (_UNITS[words[1]] if len(words) == 2 else 0)
    return None


def _spell_number(run: str) -> str:
    words = [w for w in re.split(r"\s+|-", run.lower()) if w]
    if "thousand" in words:
        k = words.index("thousand")
        high, low = _below_thousand(words[:k]), words[k + 1:]
        rest = _below_thousand([w for w in low if w != "and"] if low[:1] == ["and"] else low) if low else 0
        if high is not None and rest is not None:
            return str(high * 1000 + rest)
    else:
        value = _below_thousand(words)
        if value is not None:
            return str(value)
    # not one number ("two three"): each word on its own
    return " ".join(str(_UNITS.get(w, _TENS.get(w, w))) for w in words)


def normalize_answer(s: str) -> str:
    """Lowercase, trim outer whitespace and punctuation, collapse spaces, write numbers as digits."""
    s = _clean(s).lower()
    s = _NUMBER_RUN.sub(lambda m: _spell_number(m.group(0)), s)
    s = re.sub(r"(?<=\d),(?=\d{3}\b)", "", s)  # 1,000 -> 1000
    s = " ".join(s.split())
    s = re.sub(r"[\s\W_]+$", "", s)
    s = re.sub(r"^(?:(?![-+]\d)[\s\W_])+", "", s)  # keep the sign of "-3"
    return s


def answer_correct(pred: str, gold: str) -> bool:
    """Exact match after :func:`normalize_answer`."""
    return normalize_answer(pred) == normalize_answer(gold)


# --- novelty -----------------------------------------------------------------------------------

_TOKEN = re.compile(r"[a-z0-9']+|[.!?,:;\"]")


def _sentence_key(s: str) -> str:
    return " ".join(s.lower().split())


class NoveltyIndex:
    """Hashes of every sentence and word n-gram of a training corpus, for novelty of new text.

    Built once (hashes kept in sorted int64 arrays, 8 bytes per distinct entry). Hashes are
    Python's own, so an index is only valid in the process that built it.
    """

    def __init__(self, corpus: Iterable[str], n: int = 8):
        if not isinstance(n, int) or n < 1:
            raise ValueError(f"n must be a positive int, got {n!r}")
        if isinstance(corpus, str):
            raise TypeError("corpus must be an iterable of texts, not one string")
        self.n = n
        sent_hashes, gram_hashes = array("q"), array("q")
        self.n_texts = 0
        for text in corpus:
            self.n_texts += 1
            sent_hashes.extend(hash(_sentence_key(s)) for s in sentences(text))
            gram_hashes.extend(self._grams(text))
        self._sentences = np.unique(np.frombuffer(sent_hashes, dtype=np.int64))
        self._ngrams = np.unique(np.frombuffer(gram_hashes, dtype=np.int64))

    def _grams(self, text: str) -> list[int]:
        toks = _TOKEN.findall(_clean(text).lower())
        n = self.n
        return [hash(tuple(toks[i:i + n])) for i in range(len(toks) - n + 1)]

    @staticmethod
    def _absent(table: np.ndarray, keys: list[int]) -> int:
        if not keys:
            return 0
        q = np.asarray(keys, dtype=np.int64)
        if table.size == 0:
            return len(keys)
        idx = np.minimum(np.searchsorted(table, q), table.size - 1)
        return int((table[idx] != q).sum())

    def novelty(self, text: str) -> dict:
        """Share of the text's sentences, and of its word n-grams, absent from the corpus (0.0 when it has none)."""
        sents = [hash(_sentence_key(s)) for s in sentences(text)]
        grams = self._grams(text)
        return {"sentence_novelty": _share(self._absent(self._sentences, sents), len(sents), empty=0.0),
                "ngram_novelty": _share(self._absent(self._ngrams, grams), len(grams), empty=0.0),
                "n_sentences": len(sents), "n_ngrams": len(grams)}


# --- everything at once ------------------------------------------------------------------------


def ends_properly(text: str) -> bool:
    """The text ends with a full sentence that closes a story (an ending or a moral)."""
    text = _clean(text)
    if not _ENDS_SENTENCE.search(text):
        return False
    sents = sentences(text)
    last = parse(sents[-1]) if sents else None
    return last is not None and bool({"ending", "moral"} & last.tags)


def story_scores(text: str, meta: Story | StorySpec | dict | None = None,
                 novelty_index: NoveltyIndex | None = None) -> dict:
    """Grammar, consistency (against ``meta``, or internal only when None), rudeness, ending, novelty."""
    report = consistency_report(text, meta)
    scores = {"grammar": grammar_score(text), "consistency": report["score"], "consistent": report["consistent"],
              "rudeness": rudeness(text), "ends_properly": ends_properly(text)}
    if novelty_index is not None:
        nov = novelty_index.novelty(text)
        scores.update(sentence_novelty=nov["sentence_novelty"], ngram_novelty=nov["ngram_novelty"])
    return scores
