"""The Task 1 split: which item indices are train and which are test, and the text-level dedupe.

The reference notes define Task 1 as 100 items (x_i, y_i), i = 1..100, with

    D_train = {(x_i, y_i) : i % 10 not in {1, 3, 7}}   (70 items)
    D_test  = {(x_i, y_i) : i % 10     in {1, 3, 7}}   (30 items)

:class:`Split` generalises that rule (``n``, ``modulus``, ``test_residues``) and is applied to every
task family. Because items are rendered from (family, index), two different indices can render the
same instruction text ("What is 3 plus 4?"); :func:`drop_test_overlap` removes every training item
whose normalized instruction equals a test one and counts what it dropped, so a test instruction can
never reach a training file.

This module knows nothing about task families, stories or files: it deals in integers and strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable, Iterable, Sequence, TypeVar

T = TypeVar("T")

_NON_ALNUM = re.compile(r"[^a-z0-9]+")


def normalize_instruction(text: str) -> str:
    """Case-, punctuation- and whitespace-insensitive key: ``"What is 3 + 4 ?"`` -> ``"what is 3 4"``."""
    return " ".join(_NON_ALNUM.sub(" ", text.lower()).split())


def parse_residues(value: str | Sequence[int]) -> tuple[int, ...]:
    """``"1,3,7"`` or ``[1, 3, 7]`` -> ``(1, 3, 7)`` (sorted, unique)."""
    if isinstance(value, str):
        parts = [p.strip() for p in value.split(",") if p.strip()]
        try:
            residues = [int(p) for p in parts]
        except ValueError:
            raise ValueError(f"test_residues: expected comma-separated integers like '1,3,7', got {value!r}") from None
    else:
        residues = [int(r) for r in value]
    return tuple(sorted(set(residues)))


@dataclass(frozen=True)
class Split:
    """Items ``1..n``; item ``i`` is a test item iff ``i % modulus in test_residues``."""

    n: int = 100
    modulus: int = 10
    test_residues: tuple[int, ...] = (1, 3, 7)

    def __post_init__(self) -> None:
        if self.n < 1:
            raise ValueError(f"Split.n must be >= 1, got {self.n}")
        if self.modulus < 2:
            raise ValueError(f"Split.modulus must be >= 2, got {self.modulus}")
        residues = parse_residues(self.test_residues)
        bad = [r for r in residues if not 0 <= r < self.modulus]
        if bad:
            raise ValueError(f"Split.test_residues {bad} are not in 0..{self.modulus - 1}")
        if not residues:
            raise ValueError("Split.test_residues is empty: there would be no test set")
        if len(residues) == self.modulus:
            raise ValueError("Split.test_residues covers every residue: there would be no training set")
        object.__setattr__(self, "test_residues", residues)

    def _check(self, index: int) -> None:
        if not 1 <= index <= self.n:
            raise ValueError(f"item index {index} is outside 1..{self.n}")

    def is_test(self, index: int) -> bool:
        self._check(index)
        return index % self.modulus in self.test_residues

    def is_train(self, index: int) -> bool:
        return not self.is_test(index)

    def train_indices(self) -> list[int]:
        return [i for i in range(1, self.n + 1) if i % self.modulus not in self.test_residues]

    def test_indices(self) -> list[int]:
        return [i for i in range(1, self.n + 1) if i % self.modulus in self.test_residues]

    def to_dict(self) -> dict:
        return {"n": self.n, "modulus": self.modulus, "test_residues": list(self.test_residues),
                "n_train": len(self.train_indices()), "n_test": len(self.test_indices())}


def drop_test_overlap(train: Iterable[T], test_texts: Iterable[str],
                      texts_of: Callable[[T], Iterable[str]]) -> tuple[list[T], int]:
    """Keep the training records none of whose texts (``texts_of(record)``) equals a test text.

    Texts are compared after :func:`normalize_instruction`. Returns (kept records, number dropped).
    """
    test_keys = {normalize_instruction(t) for t in test_texts}
    kept: list[T] = []
    dropped = 0
    for record in train:
        if any(normalize_instruction(t) in test_keys for t in texts_of(record)):
            dropped += 1
        else:
            kept.append(record)
    return kept, dropped
