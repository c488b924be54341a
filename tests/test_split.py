"""The Task 1 split rule (reference notes 002: i = 1..100, test iff i % 10 in {1, 3, 7}) and the dedupe."""

import pytest

from tinygpt.world.split import Split, drop_test_overlap, normalize_instruction, parse_residues


def test_task1_split_is_70_30_with_the_given_residues():
    split = Split()
    train, test = split.train_indices(), split.test_indices()
    assert (len(train), len(test)) == (70, 30)
    assert sorted(train + test) == list(range(1, 101))
    # Hand-worked: the first test items are 1, 3, 7, 11, 13, 17, ..., the last 91, 93, 97.
    assert test[:6] == [1, 3, 7, 11, 13, 17] and test[-3:] == [91, 93, 97]
    assert train[:7] == [2, 4, 5, 6, 8, 9, 10] and 100 in train
    assert all(i % 10 in {1, 3, 7} for i in test) and all(i % 10 not in {1, 3, 7} for i in train)
    assert split.is_test(21) and not split.is_test(20) and split.is_train(100)


def test_generalised_split_and_validation():
    split = Split(n=20, modulus=4, test_residues=parse_residues("0"))
    assert split.test_indices() == [4, 8, 12, 16, 20]
    assert split.to_dict()["n_train"] == 15
    assert parse_residues("7, 3,1,3") == (1, 3, 7)
    with pytest.raises(ValueError, match="outside"):
        Split().is_test(101)
    with pytest.raises(ValueError, match="not in 0..9"):
        Split(test_residues=(10,))
    with pytest.raises(ValueError, match="no training set"):
        Split(modulus=2, test_residues=(0, 1))
    with pytest.raises(ValueError, match="comma-separated"):
        parse_residues("1;3")


def test_dedupe_drops_train_items_whose_normalized_text_is_a_test_text():
    assert normalize_instruction("  What is 3 + 4 ?") == normalize_instruction("what is 3 4")
    train = [{"i": 2, "t": "What is 3 plus 4?"}, {"i": 4, "t": "what IS 3 plus 4"}, {"i": 5, "t": "What is 4 plus 3?"}]
    kept, dropped = drop_test_overlap(train, ["What is 3 plus 4?"], lambda r: [r["t"]])
    assert dropped == 2 and [r["i"] for r in kept] == [5]
