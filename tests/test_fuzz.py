"""A seeded slice of the malformed-input fuzz run (tests/fuzz_inputs.py): every reader a user's file reaches
refuses bad input with one line naming the file, never a traceback, a hang or half-written output."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from fuzz_inputs import KINDS, fuzz, table  # noqa: E402


@pytest.mark.parametrize("kind", KINDS)
def test_malformed_inputs_are_refused_cleanly(kind):
    result = fuzz(40, seed=KINDS.index(kind), timeout=20.0, kinds=(kind,))
    counts = result["counts"][kind]
    assert counts["refused"] > 0, table(result)  # the mutations do break things
    assert not result["failures"], "\n".join(f"{f['mutation']}: {f['outcome']}: {f['detail']}" for f in result["failures"])
