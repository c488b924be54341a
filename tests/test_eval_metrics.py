"""pass@k against hand-worked values and the combinatorial formula; perplexity of a uniform model;
BLEU against a hand-worked corpus score; win rate with ties counted half."""

import math
from fractions import Fraction

import pytest

from tinygpt.data.shards import TokenDataset, prepare_shards
from tinygpt.eval.metrics import bleu, mean_pass_at_k, pass_at_k, perplexity, wilson_interval, win_rate
from tinygpt.model import GPT, ModelConfig
from tinygpt.tokenizer import Tokenizer


def naive_pass_at_k(n, c, k):
    return 1 - Fraction(math.comb(n - c, k), math.comb(n, k))


def test_pass_at_k_hand_worked():
    # n=5, c=1, k=1: one correct sample in five -> 1/5
    assert pass_at_k(5, 1, 1) == pytest.approx(0.2)
    # n=5, c=2, k=2: 1 - C(3,2)/C(5,2) = 1 - 3/10
    assert pass_at_k(5, 2, 2) == pytest.approx(0.7)
    # n=10, c=3, k=5: 1 - C(7,5)/C(10,5) = 1 - 21/252 = 11/12
    assert pass_at_k(10, 3, 5) == pytest.approx(11 / 12)
    assert pass_at_k(4, 3, 2) == 1.0  # fewer wrong samples than k: every draw holds a correct one
    assert pass_at_k(7, 0, 3) == 0.0
    assert pass_at_k(7, 7, 1) == 1.0


def test_pass_at_k_matches_the_combinatorial_formula():
    for n in range(1, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                assert pass_at_k(n, c, k) == pytest.approx(float(naive_pass_at_k(n, c, k)), abs=1e-12), (n, c, k)
    # large n: binomials of 10^58 and up, still exact to float precision
    assert pass_at_k(200, 13, 100) == pytest.approx(float(naive_pass_at_k(200, 13, 100)), rel=1e-12)


def test_pass_at_k_rejects_bad_input():
    for args in [(5, 6, 1), (5, -1, 1), (5, 2, 6), (0, 0, 1), (5, 2, 0)]:
        with pytest.raises(ValueError):
            pass_at_k(*args)
    with pytest.raises(TypeError):
        pass_at_k(5.0, 2, 1)


def test_mean_pass_at_k():
    # problem 1: 1 of 2 correct (pass@1 = 1/2); problem 2: 2 of 2 (1.0) -> mean 3/4
    assert mean_pass_at_k([[True, False], [True, True]], 1) == pytest.approx(0.75)


def test_bleu_hand_worked():
    assert bleu(["the cat sat on the mat"], ["the cat sat on the mat"]) == pytest.approx(100.0)
    # "a b c d" vs "a b c e": precisions 3/4, 2/3, 1/2 and 0/1, which sacrebleu's default 'exp'
    # smoothing turns into 1/(2 * 1); brevity penalty 1 -> 100 * (3/4 * 2/3 * 1/2 * 1/2) ** (1/4)
    assert bleu(["a b c d"], ["a b c e"]) == pytest.approx(100 * 0.125 ** 0.25, abs=1e-6)
    with pytest.raises(ValueError, match="2 hypotheses but 1"):
        bleu(["a", "b"], ["a"])


def test_win_rate_intervals_hand_worked():
    """3 wins, 1 tie, 0 losses: rate 3.5/4 = 0.875; scores 1,1,1,0.5 have sample variance
    (3 * 0.125^2 + 0.375^2) / 3 = 0.0625, so the half-width is 1.96 * sqrt(0.0625 / 4) = 0.245."""
    r = win_rate([2, 2, 2, 1], [1, 1, 1, 1])
    assert r["win_rate"] == 0.875
    assert r["ci95"] == pytest.approx([0.875 - 0.244996, 1.0], abs=1e-5)  # clipped at 1
    assert r["decided_win_rate"] == 1.0
    # Wilson for 3 of 3: centre (1 + 1.92/3) / (1 + 3.84/3), half 1.96 * sqrt(3.84 / 36) / (1 + 3.84/3)
    z2 = 1.959963984540054 ** 2
    centre, half = (1 + z2 / 6) / (1 + z2 / 3), 1.959963984540054 * math.sqrt(z2 / 36) / (1 + z2 / 3)
    assert r["decided_ci95"] == pytest.approx([centre - half, 1.0])
    assert wilson_interval(5, 10) == pytest.approx([0.236593, 0.763407], abs=1e-6)  # the textbook value


def test_win_rate_counts_ties_half():
    r = win_rate([1.0, 2.0, 3.0, 0.0], [1.0, 1.0, 4.0, 0.0])
    assert (r["wins"], r["ties"], r["losses"], r["n"]) == (1, 2, 1, 4)
    assert r["win_rate"] == pytest.approx((1 + 0.5 * 2) / 4)
    assert win_rate([0.5], [0.45], tie_tolerance=0.1)["ties"] == 1
    with pytest.raises(ValueError):
        win_rate([1.0], [])


def test_perplexity_of_a_uniform_model_is_the_vocabulary_size(tmp_path):
    docs = [f"story number {i} is about a cat and a dog." for i in range(200)]
    corpus = tmp_path / "c.jsonl"
    corpus.write_text("".join('{"text": "%s"}\n' % d for d in docs))
    tok = Tokenizer.train(docs, vocab_size=280, show_progress=False)
    prepare_shards([corpus], tok, tmp_path / "data", val_fraction=0.2, seed=0, show_progress=False)
    val = TokenDataset(tmp_path / "data", "val")
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16))
    for p in model.parameters():
        p.data.zero_()  # every logit 0: p(token) = 1/V everywhere
    r = perplexity(model, val, batch_size=4)
    assert r["loss"] == pytest.approx(math.log(tok.vocab_size), rel=1e-5)
    assert r["perplexity"] == pytest.approx(tok.vocab_size, rel=1e-4)
    assert r["tokens"] == val.num_windows(16) * 16
    assert perplexity(model, val, batch_size=2, max_batches=1)["tokens"] == 32
    with pytest.raises(ValueError, match="exceeds the model's context"):
        perplexity(model, val, block_size=32)
