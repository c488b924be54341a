"""Kill -9 mid-run, then --resume: the run ends with the same weights as one never killed (tests/kill_resume.py
runs 20 kills a stage; this runs one)."""

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
import kill_resume  # noqa: E402


@pytest.mark.slow
def test_a_killed_pretrain_and_sft_resume_bit_exactly():
    counts = kill_resume.main(["--trials", "1", "--seed", "5"])
    assert counts == {"pretrain": (1, 1), "sft": (1, 1)}
