"""Attention maps recomputed beside the model reproduce the model's own attention output."""

import pytest
import torch

from tinygpt.eval.attention import (attention_maps, head_scores, interesting_heads, plot_attention,
                                    recompute_attention)
from tinygpt.model import GPT, ModelConfig


def _model(arch: str, **kw) -> GPT:
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=50, block_size=16, n_layer=2, n_head=4, d_model=32, arch=arch, **kw)
    model = GPT(cfg)
    with torch.no_grad():  # larger weights than the 0.02 init, so the attention is far from uniform
        for block in model.blocks:
            block.attn.qkv.weight.mul_(10)
    return model.eval()


@pytest.mark.parametrize("arch,kw", [("gpt2", {}), ("llama", {}), ("llama", {"n_kv_head": 2})],
                         ids=["gpt2", "llama", "llama-gqa"])
def test_weights_times_values_reproduce_the_attention_output(arch, kw):
    model = _model(arch, **kw)
    ids = torch.randint(0, 50, (12,))
    outputs = []  # the input of attn.proj: (1, T, C), heads side by side
    handles = [b.attn.proj.register_forward_pre_hook(lambda m, args: outputs.append(args[0].detach()))
               for b in model.blocks]
    weights, values = recompute_attention(model, ids)
    for h in handles:
        h.remove()
    L, H, T, hd = values.shape
    assert weights.shape == (2, 4, 12, 12) and (L, H, T, hd) == (2, 4, 12, 8)
    torch.testing.assert_close(weights.sum(-1), torch.ones(L, H, T))
    assert torch.all(weights.triu(1) == 0)  # causal: no weight on future keys
    assert weights.max() > 0.5  # not a trivially uniform map
    for layer in range(L):
        mine = (weights[layer] @ values[layer]).transpose(0, 1).reshape(T, H * hd)  # (T, C)
        torch.testing.assert_close(mine, outputs[layer][0], atol=1e-5, rtol=1e-5)


def test_rope_matters_for_llama():
    """Without rotary positions the recomputed output would differ: the RoPE path is exercised."""
    model = _model("llama")
    ids = torch.randint(0, 50, (10,))
    weights, _ = recompute_attention(model, ids)
    x = model.blocks[0].attn_norm(model.tok_emb(ids[None]))  # layer 0's input: llama adds no positions
    qkv = model.blocks[0].attn.qkv(x).view(1, 10, 12, 8).transpose(1, 2)
    q, k, _ = qkv.split([4, 4, 4], dim=1)
    plain = torch.softmax((q @ k.transpose(-2, -1) / 8 ** 0.5).masked_fill(
        ~torch.ones(10, 10, dtype=torch.bool).tril(), float("-inf")), -1)[0]
    assert not torch.allclose(plain, weights[0], atol=1e-3)


def test_model_state_is_left_alone():
    model = _model("gpt2")
    model.train()
    attention_maps(model, [1, 2, 3, 4])
    assert model.training  # put back in the mode it was in
    assert all(not b.attn._forward_pre_hooks for b in model.blocks)


def test_bad_input_is_refused():
    model = _model("gpt2")
    with pytest.raises(ValueError, match="one sequence"):
        attention_maps(model, torch.zeros(2, 3, dtype=torch.long))
    with pytest.raises(ValueError, match="context"):
        attention_maps(model, list(range(17)))
    with pytest.raises(ValueError, match="non-empty"):
        attention_maps(model, [])


def _one_hot_maps(T: int, targets: dict[tuple[int, int], callable]) -> torch.Tensor:
    """(1, 3, T, T) maps where head h puts all of query t's weight on key targets[h](t)."""
    maps = torch.zeros(1, 3, T, T)
    maps[:, :, :, 0] = 1.0  # default: everything on the first token
    for (layer, head), key_of in targets.items():
        maps[layer, head] = 0
        for t in range(T):
            maps[layer, head, t, key_of(t)] = 1.0
    return maps


def test_head_rules_on_hand_made_maps():
    """ids 5 7 9 5 7: head 0 looks at t-1, head 1 at the earlier copy of its own token, head 2 at
    token 0 (the previous token only for t = 1, the earlier copy only for t = 3); uniform maps score entropy 1."""
    ids = [5, 7, 9, 5, 7]
    first_copy = {3: 0, 4: 1}
    maps = _one_hot_maps(5, {(0, 0): lambda t: max(t - 1, 0), (0, 1): lambda t: first_copy.get(t, t)})
    s = head_scores(maps, ids)
    assert s["previous_token"][0].tolist() == pytest.approx([1.0, 0.0, 0.25])
    assert s["repeated_token"][0].tolist() == pytest.approx([0.0, 1.0, 0.5])
    assert s["entropy"][0].tolist() == pytest.approx([0.0, 0.0, 0.0], abs=1e-6)
    picks = {p["rule"]: (p["layer"], p["head"]) for p in interesting_heads(maps, ids)}
    assert picks["previous_token"] == (0, 0) and picks["repeated_token"] == (0, 1)

    uniform = torch.ones(5, 5).tril()
    uniform = (uniform / uniform.sum(-1, keepdim=True)).expand(1, 3, 5, 5)
    assert head_scores(uniform, ids)["entropy"][0].tolist() == pytest.approx([1.0, 1.0, 1.0])
    # no repeated token: that rule is skipped rather than picking a head on NaN scores
    rules = [p["rule"] for p in interesting_heads(maps, [1, 2, 3, 4, 6])]
    assert rules == ["previous_token", "most_focused"]


def test_plot_attention_writes_a_png(tmp_path):
    maps = attention_maps(_model("gpt2"), [1, 2, 3, 4, 5])
    out = plot_attention(maps, ["a", "b", "c", "d", "e"], [(0, 1), (1, 3), (1, 0)], tmp_path / "attn.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="outside"):
        plot_attention(maps, list("abcde"), [(2, 0)], tmp_path / "x.png")
    with pytest.raises(ValueError, match="labels"):
        plot_attention(maps, list("abc"), [(0, 0)], tmp_path / "x.png")
