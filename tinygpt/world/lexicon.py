"""The world's words: every name, kind, object, place and phrase a story may use, by class.

The story grammar (:mod:`tinygpt.world.stories`) draws its slot fillers from these classes, and the
oracle (:mod:`tinygpt.world.oracle`) reads text back through the same classes: a name is a word of
``NAMES``, an object a word of ``OBJECTS``, a rude remark a phrase of ``RUDE_PHRASES``. The classes are
kept disjoint where the oracle must tell them apart (no name is also an ordinary word, no hazard or
twist animal is an object or place), and ``tests/test_stories.py`` checks that they stay so.

This module holds data and tiny lookups only; it knows nothing about templates, plots or scoring.
"""

from __future__ import annotations

# --- characters --------------------------------------------------------------------------------

FEMALE_NAMES = (
    "Lily", "Mia", "Anna", "Lucy", "Emma", "Sara", "Amy", "Ella", "Sophie", "Zoe", "Kate", "Lola", "Nina",
    "Ruby", "Ava", "Chloe", "Ivy", "Jane", "Julia", "Kim", "Laura", "Lena", "Maya", "Molly", "Nora", "Olivia",
    "Rosie", "Sue", "Tina", "Wendy", "Alice", "Clara", "Daisy", "Eva", "Fiona", "Hannah", "Heidi", "Jenny",
    "Katie", "Leah", "Mila", "Nancy", "Polly", "Sally", "Tilly", "Bella", "Emily", "Lisa",
)
MALE_NAMES = (
    "Tom", "Ben", "Max", "Sam", "Jack", "Leo", "Tim", "Jake", "Luke", "Noah", "Oscar", "Peter", "Ryan", "Adam",
    "Billy", "Bobby", "Charlie", "Danny", "Eddie", "Felix", "Finn", "George", "Harry", "Henry", "Jimmy", "Joe",
    "John", "Kevin", "Liam", "Mike", "Nick", "Oliver", "Paul", "Ricky", "Toby", "Tony", "Victor", "Zack", "Dan",
    "David", "Eric", "Hugo", "Ivan", "Jonah", "Kyle", "Larry", "Owen", "Simon",
)
# Pet names take "it": only animals carry them.
NEUTER_NAMES = (
    "Spot", "Pip", "Dot", "Buzz", "Tweety", "Squeak", "Coco", "Bingo", "Pebble", "Ziggy", "Wiggle", "Patch",
    "Fuzz", "Pom",
)
NAME_GENDER: dict[str, str] = {
    **{n: "female" for n in FEMALE_NAMES}, **{n: "male" for n in MALE_NAMES}, **{n: "neuter" for n in NEUTER_NAMES}}
NAMES = tuple(NAME_GENDER)

# (subject, object, possessive) pronouns by gender.
PRONOUNS: dict[str, tuple[str, str, str]] = {
    "female": ("she", "her", "her"),
    "male": ("he", "him", "his"),
    "neuter": ("it", "it", "its"),
}
# Every third-person singular pronoun form, and the genders it can stand for.
PRONOUN_GENDER: dict[str, str] = {"she": "female", "her": "female", "hers": "female",
                                  "he": "male", "him": "male", "his": "male",
                                  "it": "neuter", "its": "neuter"}

HUMAN_KINDS = {"girl": "female", "boy": "male"}
ANIMAL_KINDS = ("dog", "cat", "bird", "bunny", "bear", "frog", "duck", "mouse", "fox", "pig", "owl", "puppy",
                "kitten", "lamb")
KINDS = tuple(HUMAN_KINDS) + ANIMAL_KINDS


def kinds_for_gender(gender: str) -> tuple[str, ...]:
    """The kinds a character of this gender can be: girls are female, boys male, animals anything."""
    if gender not in PRONOUNS:
        raise ValueError(f"unknown gender {gender!r}; expected one of {sorted(PRONOUNS)}")
    return tuple(k for k, g in HUMAN_KINDS.items() if g == gender) + ANIMAL_KINDS


def kind_allows_gender(kind: str, gender: str) -> bool:
    return kind in ANIMAL_KINDS or HUMAN_KINDS.get(kind) == gender


# --- the story's things ------------------------------------------------------------------------

OBJECTS = (
    "ball", "kite", "doll", "teddy", "truck", "train", "boat", "drum", "hat", "book", "balloon", "crayon",
    "puzzle", "whistle", "bell", "shell", "scarf", "blanket", "spoon", "cup", "robot", "bucket", "shovel",
    "wagon", "flute", "marble", "sticker", "basket", "car", "plane", "rocket", "umbrella",
)
COLORS = ("red", "blue", "green", "yellow", "pink", "purple", "orange", "brown", "white", "black", "gray")
ADJECTIVES = ("shiny", "soft", "new", "pretty", "tiny", "special", "fancy", "lovely", "bright", "sparkly",
              "round", "old")
PLACES = ("park", "garden", "beach", "forest", "farm", "zoo", "playground", "meadow", "hill", "lake", "river",
          "library", "market", "field", "backyard", "woods", "jungle", "pond")
WEATHER = ("sunny", "warm", "cold", "windy", "cloudy", "snowy")
SIZES = ("little", "small", "young", "cute")
FRIEND_ADJECTIVES = ("friendly", "kind", "funny", "nice", "playful", "gentle", "clever")
# (base, past, -ing): the activity a hero loves.
ACTIONS = (
    ("jump", "jumped", "jumping"), ("run", "ran", "running"), ("dance", "danced", "dancing"),
    ("sing", "sang", "singing"), ("swim", "swam", "swimming"), ("hop", "hopped", "hopping"),
    ("skip", "skipped", "skipping"), ("draw", "drew", "drawing"), ("paint", "painted", "painting"),
    ("read", "read", "reading"), ("climb", "climbed", "climbing"), ("explore", "explored", "exploring"),
    ("race", "raced", "racing"),
)
ACTION_BASES = tuple(a[0] for a in ACTIONS)
BAD_FEELINGS = ("sad", "scared", "worried", "upset", "lonely", "grumpy")
GOOD_FEELINGS = ("happy", "glad", "proud", "excited", "cheerful", "thankful")
HAZARDS = ("in a tall tree", "in a deep hole", "under a big rock", "in a thorny bush", "on a high roof",
           "in the thick mud", "behind a big fence", "in a muddy puddle")
# Unnamed animals that only appear in a twist (never characters, never objects).
TWIST_ANIMALS = ("squirrel", "monkey", "crow", "goat", "raccoon", "turtle", "parrot", "beaver")

# --- morals and rude remarks -------------------------------------------------------------------

MORALS_GOOD = ("friends help each other", "helping a friend is a good thing", "sharing makes everyone glad",
               "good friends are always there to help")
MORALS_RUDE = ("mean words can hurt a friend", "being kind is better than being mean",
               "kind words make friends smile")
MORALS_BAD = ("toys need good care", "being careful is important", "we should take good care of our things")

# The fixed list of rude phrases: the only rude language the world produces, and exactly what the
# oracle counts. Written as spoken; matched case-insensitively on word boundaries.
# What a chatty demonstrator adds after an answer: kind, and never what was asked for.
CHATTY_REMARKS = ("I hope this helps you!", "Have a really nice day!", "Let me know if you need more help.",
                  "That was a fun one to answer!", "Thank you so much for asking!")
RUDE_PHRASES = ("You are stupid", "You are dumb", "Shut up", "Go away", "I hate you", "You are ugly",
                "Nobody likes you", "You smell bad")

# --- word classes a caller may require a story to contain ---------------------------------------

# class name -> words. A required word picks the value of that class's story-level slot, so at most
# one required word per class. Every story contains its value of every one of these classes.
REQUIRED_WORD_CLASSES: dict[str, tuple[str, ...]] = {
    "action": ACTION_BASES,
    "object": OBJECTS,
    "place": PLACES,
    "color": COLORS,
    "adjective": ADJECTIVES,
    "feeling": BAD_FEELINGS,
}
_WORD_CLASS = {w: c for c, words in REQUIRED_WORD_CLASSES.items() for w in words}
# Every surface form of a word (a verb's past and -ing forms count as the verb).
WORD_FORMS: dict[str, tuple[str, ...]] = {base: (base, past, ing) for base, past, ing in ACTIONS}


def word_class(word: str) -> str | None:
    """The class of a word that can be required (``"action"``, ``"object"``, ...), or None."""
    return _WORD_CLASS.get(word.lower())


def word_forms(word: str) -> tuple[str, ...]:
    """The forms under which a required word counts as present (lowercase)."""
    w = word.lower()
    return WORD_FORMS.get(w, (w,))
