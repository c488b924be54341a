"""tinygpt.generate: greedy vs full forward, batching, EOS/stop handling, seeding, filters by hand."""

import math

import pytest
import torch

from tinygpt.generate import (SamplingConfig, generate, repetition_penalty_filter, sample_next, stop_strings, stream,
                              top_k_filter, top_p_filter)
from tinygpt.model import GPT, ModelConfig

INF = float("inf")


def tiny_model(arch: str = "gpt2", seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, block_size=48, n_layer=2, n_head=4, d_model=32, arch=arch,
                      n_kv_head=2 if arch == "llama" else None)
    model = GPT(cfg).eval()
    with torch.no_grad():  # sharpen the random model so greedy paths are not decided by float noise
        model.lm_head.weight.mul_(20)
    return model


def greedy(n: int) -> SamplingConfig:
    return SamplingConfig(temperature=0, max_new_tokens=n)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_greedy_equals_argmax_of_full_forward(arch):
    model = tiny_model(arch)
    prompt = [3, 14, 15, 9, 2]
    ids = list(prompt)
    with torch.no_grad():
        for _ in range(12):
            ids.append(int(model(torch.tensor([ids]))[0, -1].argmax()))
    assert generate(model, [prompt], greedy(12)) == [ids[len(prompt):]]


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_batch_of_different_lengths_equals_each_alone(arch):
    model = tiny_model(arch)
    prompts = [[5], [1, 2, 3, 4, 5, 6, 7], [9, 8, 7], [40, 41]]
    alone = [generate(model, [p], greedy(10))[0] for p in prompts]
    assert generate(model, prompts, greedy(10)) == alone


def test_eos_and_stop_sequences_end_a_row_and_are_not_included():
    model = tiny_model()
    prompts = [[1, 2, 3], [7, 7]]
    free = generate(model, prompts, greedy(10))
    eos = free[0][4]
    first = free[0].index(eos)
    out = generate(model, prompts, greedy(10), eos_id=eos)
    assert out[0] == free[0][:first]
    assert out[1] == free[1][:free[1].index(eos)] if eos in free[1] else free[1]
    stop = free[1][3:5]
    cut = next(i for i in range(len(free[1])) if free[1][i:i + 2] == stop)
    out = generate(model, prompts, greedy(10), stop_sequences=[stop, [63, 63, 63]])
    assert out[1] == free[1][:cut]


def test_should_stop_predicate_and_stop_strings():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.div_(20)
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=10, seed=3)  # seeded, so every call samples the same
    free = generate(model, [[1, 2, 3]], cfg)[0]
    assert len(set(free[:4])) == 4
    assert generate(model, [[1, 2, 3]], cfg, should_stop=lambda ids: len(ids) == 4) == [free[:4]]

    def decode(ids):  # token t decodes to two letters, so a stop string can start mid-token
        return "".join(chr(97 + t % 26) + chr(65 + t % 26) for t in ids)

    text = decode(free)
    target = text[5:8]  # starts in the middle of token 2, ends in token 3
    assert text.find(target) == 5
    stopper = stop_strings(decode, [target, "zzzz"])
    assert stopper.tokens_to_trim(free[:4]) == 2  # tokens 2 and 3 hold the string
    assert generate(model, [[1, 2, 3]], cfg, should_stop=stopper) == [free[:2]]
    assert list(stream(model, [1, 2, 3], cfg, should_stop=stopper)) == free[:2]


def test_stream_yields_what_generate_returns():
    model = tiny_model("llama")
    free = generate(model, [[4, 5]], greedy(12))[0]
    assert list(stream(model, [4, 5], greedy(12))) == free
    stop = free[6:9]
    cut = next(i for i in range(len(free)) if free[i:i + 3] == stop)
    got = stream(model, [4, 5], greedy(12), stop_sequences=[stop])
    assert list(got) == free[:cut]


def test_seeded_sampling_is_reproducible():
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.div_(20)  # a flat distribution, so different seeds give different samples
    cfg = SamplingConfig(temperature=1.0, top_k=20, top_p=0.95, max_new_tokens=20, seed=123)
    prompts = [[1, 2], [3, 4, 5]]
    a, b = generate(model, prompts, cfg), generate(model, prompts, cfg)
    other = generate(model, prompts, SamplingConfig(temperature=1.0, top_k=20, top_p=0.95, max_new_tokens=20, seed=7))
    assert a == b and a != other


def test_row_seeds_make_each_answer_independent_of_its_batch():
    """With one seed per row, a row samples the same answer alone, in another batch, or in another position."""
    model = tiny_model()
    with torch.no_grad():
        model.lm_head.weight.div_(20)  # a flat distribution
    cfg = SamplingConfig(temperature=1.0, max_new_tokens=12)
    prompts, seeds = [[1, 2], [3, 4, 5], [6]], [11, 12, 13]
    together = generate(model, prompts, cfg, row_seeds=seeds)
    assert [generate(model, [p], cfg, row_seeds=[s])[0] for p, s in zip(prompts, seeds)] == together
    assert generate(model, prompts[::-1], cfg, row_seeds=seeds[::-1]) == together[::-1]
    assert generate(model, prompts, cfg, row_seeds=[21, 22, 23]) != together
    with pytest.raises(ValueError, match="one seed per prompt"):
        generate(model, prompts, cfg, row_seeds=[1, 2])


def test_top_k_one_equals_greedy_and_training_mode_is_restored():
    model = tiny_model().train()
    sampled = generate(model, [[1, 2, 3]], SamplingConfig(temperature=1.5, top_k=1, max_new_tokens=8, seed=0))
    assert model.training
    assert sampled == generate(model.eval(), [[1, 2, 3]], greedy(8))


def test_bad_inputs_are_clear_errors():
    model = tiny_model()
    with pytest.raises(ValueError, match="exceeds the model's block_size"):
        generate(model, [[1] * 40], greedy(10))
    with pytest.raises(ValueError, match="at least one token"):
        generate(model, [[1], []], greedy(3))
    with pytest.raises(ValueError, match="top_p"):
        SamplingConfig(top_p=0)
    assert generate(model, [[1], [2, 3]], greedy(0)) == [[], []]


# --- filters, against hand-worked numbers ---

def test_top_k_filter_by_hand():
    logits = torch.tensor([[1.0, 4.0, 3.0, 2.0], [0.0, -1.0, 5.0, 5.0]])
    # k=2 keeps {4, 3} in row 0 and the two 5s in row 1
    expected = torch.tensor([[-INF, 4.0, 3.0, -INF], [-INF, -INF, 5.0, 5.0]])
    assert torch.equal(top_k_filter(logits, 2), expected)
    assert torch.equal(top_k_filter(logits, 0), logits)


def test_top_p_filter_by_hand():
    # probabilities 0.5, 0.25, 0.125, 0.125 (logits are their logs)
    logits = torch.log(torch.tensor([[0.125, 0.5, 0.125, 0.25]]))
    # p=0.6: 0.5 alone < 0.6, so the 0.25 token joins (0.75 >= 0.6); the 0.125s go
    assert torch.isinf(top_p_filter(logits, 0.6)).tolist() == [[True, False, True, False]]
    # p=0.5: the top token alone reaches 0.5
    assert torch.isinf(top_p_filter(logits, 0.5)).tolist() == [[True, False, True, True]]
    # p=0.1: the top token is always kept
    assert torch.isinf(top_p_filter(logits, 0.1)).tolist() == [[True, False, True, True]]
    assert torch.equal(top_p_filter(logits, 1.0), logits)


def test_repetition_penalty_by_hand():
    logits = torch.tensor([[2.0, -2.0, 3.0, -1.0]])
    seen = torch.tensor([[True, True, False, False]])
    # seen positive 2 -> 2/2 = 1; seen negative -2 -> -2*2 = -4; unseen unchanged
    assert torch.equal(repetition_penalty_filter(logits, seen, 2.0), torch.tensor([[1.0, -4.0, 3.0, -1.0]]))


def test_repetition_penalty_changes_greedy_choice():
    # logits 3.0 (seen) vs 2.0: penalty 2 makes the seen token 1.5, so the unseen one wins
    logits = torch.tensor([[3.0, 2.0, 0.0]])
    cfg = SamplingConfig(temperature=0, repetition_penalty=2.0)
    assert sample_next(logits, cfg, seen=torch.tensor([[True, False, False]])).tolist() == [1]


def test_temperature_sampling_follows_softmax():
    logits = torch.log(torch.tensor([[0.7, 0.2, 0.1]])).expand(4000, 3)
    gen = torch.Generator().manual_seed(0)
    draws = sample_next(logits, SamplingConfig(temperature=1.0), gen)
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert torch.allclose(freq, torch.tensor([0.7, 0.2, 0.1]), atol=0.03)
    # temperature 0.5 squares the odds: 0.49 : 0.04 : 0.01
    draws = sample_next(logits, SamplingConfig(temperature=0.5), gen)
    freq = torch.bincount(draws, minlength=3).float() / 4000
    assert math.isclose(freq[0].item(), 0.49 / 0.54, abs_tol=0.03)


def test_extreme_top_p_and_temperature_pick_the_top_token_instead_of_nan():
    """Found by schemathesis against the server: top_p 5e-324 dropped every token, temperature 1e-300
    overflowed to inf; both gave NaN probabilities and a crash."""
    from tinygpt.generate import SamplingConfig, sample_next, top_p_filter

    logits = torch.tensor([[0.5, 3.0, -1.0, 2.0]])
    assert torch.isfinite(top_p_filter(logits, 5e-324)).sum() == 1
    for cfg in (SamplingConfig(temperature=1.0, top_p=5e-324), SamplingConfig(temperature=1e-300),
                SamplingConfig(temperature=1e-300, top_p=5e-324, top_k=2)):
        assert sample_next(logits, cfg, torch.Generator().manual_seed(0)).tolist() == [1]
