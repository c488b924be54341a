"""`tinygpt export gguf`: the file written with the `gguf` package, read back by `gguf` and run by stock
llama.cpp (llama-cpp-python, built from source by `make test`): same token ids, same logits at f32,
same greedy continuation at f32, agreement reported at q8_0, the chat template and its ids."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from export_fixtures import TEXTS, make_tokenizer, save, seeded_model, tiny_config, trained_model
from tinygpt import cli
from tinygpt.export.gguf import GGUF_CHAT_TEMPLATE, TYPES, export_gguf, rope_pairs
from tinygpt.generate import SamplingConfig, generate
from tinygpt.model import apply_rope, rope_tables

gguf = pytest.importorskip("gguf")

ARCHS = ["llama", "gpt2"]
# llama.cpp at f32 against tinygpt at fp32: llama's graph is fp32 throughout (with an f32 KV cache);
# ggml's GELU (gpt2) goes through a half-precision lookup table (GGML_GELU_FP16 in ggml-cpu/vec.h)
F32_LOGIT_TOLERANCE = {"llama": 1e-4, "gpt2": 5e-3}
N_NEW = 40


def llama_cpp_or_skip():
    return pytest.importorskip(
        "llama_cpp", reason="llama-cpp-python is not installed here; `make test` builds it from source once "
                            "(Makefile target .venv/.installed-llama-cpp, cached under ~/.cache/tinygpt/wheels)")


@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


@pytest.fixture(scope="module")
def checkpoints(tok, tmp_path_factory):
    root = tmp_path_factory.mktemp("export_gguf")
    out = {}
    for arch in ARCHS:
        model = trained_model(tiny_config(arch, tok.vocab_size), tok)
        out[arch] = (model, save(root / arch, model, tok), root)
    return out


def open_llama(path):
    llama_cpp = llama_cpp_or_skip()
    # f32 KV cache (type 0 = GGML_TYPE_F32; the default is f16) so f32 is compared with f32
    return llama_cpp.Llama(str(path), n_ctx=64, n_threads=1, logits_all=True, verbose=False, type_k=0, type_v=0)


def greedy_llama(llm, prompt: list[int], n: int) -> list[int]:
    out = []
    for token in llm.generate(prompt, top_k=1, top_p=1.0, temp=0.0, repeat_penalty=1.0, reset=True):
        out.append(token)
        if len(out) == n:
            return out
    return out


def test_rope_pairs_turns_rotate_half_into_adjacent_pairs():
    """RoPE in rotate-half order on q = W x (tinygpt, HF) equals RoPE on adjacent pairs (llama.cpp's
    "normal" mode) on q' = rope_pairs(W) x, up to the same permutation of each head's dims for q and k,
    so every attention score q.k is unchanged."""
    torch.manual_seed(0)
    n_head, hd, d, T = 2, 8, 16, 5
    w, x = torch.randn(n_head * hd, d), torch.randn(T, d)
    cos, sin = rope_tables(hd, T, 10000.0)                                  # (T, hd)
    halves = apply_rope((x @ w.T).view(T, n_head, hd).transpose(0, 1), cos, sin)  # (h, T, hd)
    q = (x @ rope_pairs(w, n_head).T).view(T, n_head, hd).transpose(0, 1)  # (h, T, hd)
    c, s = cos[:, : hd // 2], sin[:, : hd // 2]                             # (T, hd/2): one angle per pair
    even, odd = q[..., 0::2], q[..., 1::2]
    pairs = torch.stack([even * c - odd * s, even * s + odd * c], dim=-1).flatten(-2)  # (h, T, hd)
    permuted = halves.reshape(n_head, T, 2, hd // 2).transpose(-1, -2).reshape(n_head, T, hd)
    torch.testing.assert_close(pairs, permuted)
    assert not torch.allclose(pairs, halves)  # the permutation is not the identity


@pytest.mark.parametrize("arch", ARCHS)
def test_gguf_metadata_and_tensors(checkpoints, tok, arch):
    model, ckpt, root = checkpoints[arch]
    summary = export_gguf(ckpt, root / f"{arch}.f32.gguf")
    reader = gguf.GGUFReader(str(root / f"{arch}.f32.gguf"))

    def field(key):
        f = reader.fields[key]
        return f.contents()

    assert field("general.architecture") == arch
    assert field(f"{arch}.context_length") == model.cfg.block_size and field(f"{arch}.block_count") == model.cfg.n_layer
    assert field(f"{arch}.attention.head_count_kv") == model.cfg.kv_heads
    assert field("tokenizer.ggml.model") == "gpt2" and field("tokenizer.ggml.pre") == "gpt-2"
    tokens = field("tokenizer.ggml.tokens")
    assert len(tokens) == tok.vocab_size and tokens[:7] == ["<|pad|>", "<|bos|>", "<|eos|>", "<|system|>", "<|user|>",
                                                            "<|assistant|>", "<|end|>"]
    assert field("tokenizer.ggml.token_type")[:8] == [3] * 7 + [1]  # CONTROL, then NORMAL
    assert (field("tokenizer.ggml.bos_token_id"), field("tokenizer.ggml.eos_token_id"),
            field("tokenizer.ggml.eot_token_id")) == (tok.bos_id, tok.eos_id, tok.end_id)
    assert field("tokenizer.chat_template") == GGUF_CHAT_TEMPLATE
    names = {t.name for t in reader.tensors}
    assert "token_embd.weight" in names and "output.weight" not in names  # tied: llama.cpp reuses token_embd
    assert summary["tensor_types"] == {"float32": len(names)}


def test_q8_0_and_f16_types(checkpoints, tok):
    _, ckpt, root = checkpoints["llama"]
    sizes = {}
    for kind in TYPES:
        summary = export_gguf(ckpt, root / f"types.{kind}.gguf", kind=kind)
        sizes[kind] = summary["bytes"]
        reader = gguf.GGUFReader(str(root / f"types.{kind}.gguf"))
        by_name = {t.name: t.tensor_type.name for t in reader.tensors}
        assert by_name["blk.0.attn_norm.weight"] == "F32"  # norms stay f32 in every type
        assert by_name["blk.0.attn_q.weight"] == {"f32": "F32", "f16": "F16", "q8_0": "Q8_0"}[kind]
    assert sizes["q8_0"] < sizes["f16"] < sizes["f32"]


@pytest.mark.parametrize("arch", ARCHS)
def test_llama_cpp_same_ids_logits_and_greedy_tokens(checkpoints, tok, arch):
    model, ckpt, root = checkpoints[arch]
    export_gguf(ckpt, root / f"{arch}.run.f32.gguf")
    export_gguf(ckpt, root / f"{arch}.run.q8_0.gguf", kind="q8_0")
    prompts = [tok.encode("Once upon a time", add_bos=True), tok.encode("The dog saw a big", add_bos=True)]
    mine = generate(model, prompts, SamplingConfig(temperature=0.0, max_new_tokens=N_NEW))
    report = []
    for kind in ("f32", "q8_0"):
        llm = open_llama(root / f"{arch}.run.{kind}.gguf")
        try:
            for text in TEXTS + ["Once upon a time there was a little cat named Lily who liked to play."]:
                assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
                assert llm.tokenize(text.encode(), add_bos=True, special=False) == tok.encode(text, add_bos=True)
                assert llm.detokenize(tok.encode(text)).decode() == text
            llm.reset()
            llm.eval(prompts[0])
            with torch.no_grad():
                ours = model(torch.tensor([prompts[0]]))[0].numpy()  # (T, V)
            diff = float(np.abs(np.asarray(llm.scores[: len(prompts[0])]) - ours).max())
            theirs = [greedy_llama(llm, p, N_NEW) for p in prompts]
        finally:
            llm.close()
        same = sum(a == b for t, m in zip(theirs, mine) for a, b in zip(t, m))
        prefix = [next((i for i, (a, b) in enumerate(zip(t, m)) if a != b), len(m)) for t, m in zip(theirs, mine)]
        report.append(f"{arch} {kind}: max |logit diff| {diff:.2e}; greedy tokens equal {same}/{2 * N_NEW} "
                      f"(identical prefixes {prefix})")
        if kind == "f32":
            assert diff < F32_LOGIT_TOLERANCE[arch]
            assert theirs == mine
        else:
            assert diff < 0.5  # 8-bit weights: close logits, agreement reported
    assert all(len(set(m)) >= 5 for m in mine)  # varied continuations: the comparison tests something
    print("\n" + "\n".join(report))


def test_llama_cpp_chat_template_renders_render_chat_ids(checkpoints, tok):
    llama_cpp = llama_cpp_or_skip()
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter

    model, ckpt, root = checkpoints["llama"]
    export_gguf(ckpt, root / "chat.gguf")
    llm = open_llama(root / "chat.gguf")
    try:
        template = llm.metadata["tokenizer.chat_template"]
        messages = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 3 + 4?"},
                    {"role": "assistant", "content": "7"}, {"role": "user", "content": "Tell me a story."}]
        formatter = Jinja2ChatFormatter(template, eos_token="<|eos|>", bos_token="<|bos|>")
        prompt = formatter(messages=messages).prompt
        ids, _ = tok.render_chat(messages, add_generation_prompt=True)
        assert llm.tokenize(prompt.encode(), add_bos=False, special=True) == ids
        # a whole chat turn through llama.cpp's chat API (the metadata template, greedy, stop at <|end|>/EOS)
        reply = llm.create_chat_completion(messages=messages, temperature=0.0, top_k=1, max_tokens=20,
                                           repeat_penalty=1.0)["choices"][0]["message"]["content"]
    finally:
        llm.close()
    mine = generate(model, [ids], SamplingConfig(temperature=0.0, max_new_tokens=20), eos_id=tok.eos_id,
                    stop_sequences=[[tok.end_id]])[0]
    assert reply == tok.decode(mine, skip_special=True)
    assert llama_cpp is not None


def test_refusals_and_cli(checkpoints, tok, tmp_path, capsys):
    reward = seeded_model(tiny_config("gpt2", tok.vocab_size, scalar_head=True))
    with pytest.raises(ValueError, match="scalar head"):
        export_gguf(save(tmp_path / "rm", reward, tok), tmp_path / "rm.gguf")
    assert not list(tmp_path.glob("*.gguf")) and not list(tmp_path.glob(".rm.gguf.tmp-*"))
    _, ckpt, _ = checkpoints["gpt2"]
    with pytest.raises(ValueError, match="--type must be one of f32, f16, q8_0"):
        export_gguf(ckpt, tmp_path / "x.gguf", kind="q4_0")
    with pytest.raises(SystemExit):
        cli.run(["export", "gguf", "--help"])
    assert "llama.cpp" in capsys.readouterr().out
    summary = cli.run(["export", "gguf", str(ckpt), "--out", str(tmp_path / "m.gguf"), "--type", "q8_0"])
    assert summary["architecture"] == "gpt2" and summary["tensor_types"]["Q8_0"] > 0
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_gguf(ckpt, tmp_path / "m.gguf")
