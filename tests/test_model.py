"""tinygpt.model: config round trip, sizes, init, KV cache vs full forward, padding, and parity with transformers."""

import math

import pytest
import torch

from tinygpt.model import GPT, SIZES, ModelConfig, hf_config_dict, model_config, to_hf_state_dict

ARCHS = ["gpt2", "llama"]


def tiny(arch: str, **kw) -> ModelConfig:
    base = dict(vocab_size=64, block_size=32, n_layer=2, n_head=4, d_model=32, arch=arch)
    if arch == "llama":
        base["n_kv_head"] = 2  # exercise grouped KV heads
    return ModelConfig(**{**base, **kw})


def seeded_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():  # non-trivial norms and biases, so a swapped weight cannot hide behind ones/zeros
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
    return model


# --- config ---

def test_config_round_trip_and_unknown_key():
    cfg = ModelConfig(arch="llama", n_kv_head=2, d_ff=100)
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ValueError, match="unknown ModelConfig field.*n_embd"):
        ModelConfig.from_dict({"n_embd": 128})


def test_config_rejects_bad_shapes():
    with pytest.raises(ValueError, match="arch"):
        ModelConfig(arch="bert")
    with pytest.raises(ValueError, match="divisible by n_head"):
        ModelConfig(d_model=100, n_head=3)
    with pytest.raises(ValueError, match="n_kv_head"):
        ModelConfig(arch="llama", n_head=4, n_kv_head=3)


def test_ff_hidden_rules():
    assert ModelConfig(d_model=256).ff_hidden == 1024
    # llama2.c: int(8 * d / 3) rounded up to a multiple of 32: 288 -> 768, 512 -> 1376, 768 -> 2048, 256 -> 704
    assert [ModelConfig(d_model=d, n_head=4, arch="llama").ff_hidden for d in (288, 512, 768, 256)] == [768, 1376, 2048, 704]


def test_model_config_unknown_size_names_valid_ones():
    with pytest.raises(ValueError, match="valid sizes: 260k, 0.5m"):
        model_config("7b")


# Exact counts (vocab 4096, tied) behind the comments on SIZES.
EXPECTED_PARAMS = {
    ("260k", "llama"): 508_608, ("0.5m", "gpt2"): 478_592, ("0.5m", "llama"): 475_712,
    ("1m", "gpt2"): 1_089_024, ("1m", "llama"): 1_058_016, ("3.5m", "gpt2"): 3_505_152, ("3.5m", "llama"): 3_443_136,
    ("4m", "gpt2"): 4_273_664, ("4m", "llama"): 4_262_144, ("15m", "gpt2"): 7_248_384, ("15m", "llama"): 7_155_360,
}


def test_size_param_counts_match_comments():
    assert {s for s, _ in EXPECTED_PARAMS} | {"42m", "110m"} == set(SIZES)
    for (size, arch), expected in EXPECTED_PARAMS.items():
        with torch.device("meta"):
            assert GPT(model_config(size, arch=arch)).num_params() == expected, (size, arch)


def test_param_count_by_hand():
    # gpt2, d=32, L=2, V=64, T=32, tied: wte 64*32 + wpe 32*32 + final LN 64
    # per block: ln 2*64 + qkv 32*96+96 + proj 32*32+32 + fc 32*128+128 + proj 128*32+32 = 12704
    model = GPT(tiny("gpt2"))
    assert model.num_params() == 2048 + 1024 + 64 + 2 * 12704
    assert model.num_params(non_embedding=True) == 64 + 2 * 12704
    # flops: 6 * (non-embedding + lm_head 64*32) + 12 * L * H * Q * T
    assert model.flops_per_token() == 6 * (64 + 2 * 12704 + 2048) + 12 * 2 * 4 * 8 * 32


def test_gpt2_init_scales_residual_projections():
    torch.manual_seed(0)
    model = GPT(ModelConfig(d_model=256, n_layer=8, n_head=4))
    assert model.blocks[0].attn.qkv.weight.std().item() == pytest.approx(0.02, rel=0.05)
    assert model.blocks[0].mlp.proj.weight.std().item() == pytest.approx(0.02 / math.sqrt(16), rel=0.05)
    assert model.blocks[0].attn.qkv.bias.abs().max().item() == 0.0
    assert model.lm_head.weight is model.tok_emb.weight


def test_untied_embeddings_and_scalar_head():
    model = GPT(tiny("gpt2", tie_embeddings=False, scalar_head=True))
    assert model.lm_head.weight is not model.tok_emb.weight
    hidden = model(torch.zeros(2, 5, dtype=torch.long), return_hidden=True)
    assert hidden.shape == (2, 5, 32) and model.scalar(hidden).shape == (2, 5)
    with pytest.raises(RuntimeError, match="no scalar head"):
        GPT(tiny("gpt2")).scalar(hidden)


# --- causality, cache, padding ---

@pytest.mark.parametrize("arch", ARCHS)
def test_causal_future_tokens_do_not_change_past_logits(arch):
    model = seeded_model(tiny(arch))
    idx = torch.randint(0, 64, (1, 10))
    changed = idx.clone()
    changed[0, 6:] = (changed[0, 6:] + 1) % 64
    with torch.no_grad():
        a, b = model(idx), model(changed)
    torch.testing.assert_close(a[:, :6], b[:, :6])
    assert not torch.allclose(a[:, 6:], b[:, 6:])


@pytest.mark.parametrize("arch", ARCHS)
def test_incremental_cache_equals_full_forward(arch):
    model = seeded_model(tiny(arch))
    idx = torch.randint(0, 64, (2, 12))
    with torch.no_grad():
        full = model(idx)
        cache = model.new_cache(2, 16)
        chunks = [model(idx[:, :5], cache=cache)]  # a prompt of 5, then a chunk of 3, then single tokens
        chunks.append(model(idx[:, 5:8], cache=cache))
        chunks += [model(idx[:, t:t + 1], cache=cache) for t in range(8, 12)]
    assert cache.length == 12
    torch.testing.assert_close(torch.cat(chunks, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_batch_matches_unpadded(arch):
    model = seeded_model(tiny(arch))
    short, long_ = torch.randint(0, 64, (1, 4)), torch.randint(0, 64, (1, 7))
    pad = 3
    idx = torch.cat([torch.cat([torch.zeros(1, pad, dtype=torch.long), short], 1), long_])  # (2, 7)
    mask = torch.ones(2, 7, dtype=torch.long)
    mask[0, :pad] = 0
    nxt = torch.randint(0, 64, (2, 3))
    with torch.no_grad():
        ref_short = model(torch.cat([short, nxt[:1]], 1))
        ref_long = model(torch.cat([long_, nxt[1:]], 1))
        full = model(torch.cat([idx, nxt], 1), attention_mask=torch.cat([mask, torch.ones(2, 3, dtype=torch.long)], 1))
        cache = model.new_cache(2, 10)
        steps = [model(idx, attention_mask=mask, cache=cache)]
        for t in range(3):
            mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
            steps.append(model(nxt[:, t:t + 1], attention_mask=mask, cache=cache))
    inc = torch.cat(steps, 1)
    assert torch.isfinite(full).all() and torch.isfinite(inc).all()  # pad rows must not produce NaN
    for out in (full, inc):
        torch.testing.assert_close(out[0, pad:], ref_short[0], atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(out[1], ref_long[0], atol=1e-5, rtol=1e-5)


def test_cache_overflow_and_bad_mask_are_clear_errors():
    model = GPT(tiny("gpt2"))
    cache = model.new_cache(1, 4)
    with pytest.raises(ValueError, match="KV cache holds 4"):
        model(torch.zeros(1, 5, dtype=torch.long), cache=cache)
    with pytest.raises(ValueError, match="attention_mask must be"):
        model(torch.zeros(1, 5, dtype=torch.long), attention_mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match="beyond block_size"):
        model(torch.zeros(1, 33, dtype=torch.long))


# --- parity with Hugging Face transformers (configs built locally, nothing downloaded) ---

def hf_model(model: GPT):
    transformers = pytest.importorskip("transformers")
    cfg = model.cfg
    if cfg.arch == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(cfg)))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(cfg)))
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(model), strict=False)
    assert not unexpected and not [k for k in missing if not k.endswith("attn.bias")], (missing, unexpected)
    return hf.eval()


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("tied", [True, False])
def test_logits_match_transformers(arch, tied):
    model = seeded_model(tiny(arch, tie_embeddings=tied))
    hf = hf_model(model)
    idx = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        torch.testing.assert_close(model(idx), hf(idx).logits, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("arch", ARCHS)
def test_left_padded_logits_match_transformers(arch):
    model = seeded_model(tiny(arch))
    hf = hf_model(model)
    idx = torch.randint(0, 64, (2, 9))
    mask = torch.ones(2, 9, dtype=torch.long)
    mask[0, :4] = 0
    pos = (mask.cumsum(-1) - 1).clamp(min=0)
    with torch.no_grad():
        ours = model(idx, attention_mask=mask)
        theirs = hf(idx, attention_mask=mask, position_ids=pos).logits
    torch.testing.assert_close(ours[0, 4:], theirs[0, 4:], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours[1], theirs[1], atol=1e-5, rtol=1e-5)
