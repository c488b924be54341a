"""int8 inference (tinygpt.quantize: torch's dynamic int8 Linear, or torchao's int8 weights): every Linear
int8, logits and perplexity close to fp32, `tinygpt sample` / `chat` with --quantize int8, clear errors."""

from __future__ import annotations

import io
import math

import pytest
import torch
import torch.nn.functional as F

from export_fixtures import corpus, make_tokenizer, save, tiny_config, trained_model
from tinygpt import cli, quantize
from tinygpt.chat import ChatConfig
from tinygpt.chat import main as chat_main
from tinygpt.generate import SamplingConfig, generate



@pytest.fixture(scope="module")
def tok():
    return make_tokenizer()


def perplexity(model, ids: torch.Tensor) -> float:
    with torch.inference_mode():
        logits = model(ids[:, :-1])
        return math.exp(F.cross_entropy(logits.flatten(0, 1), ids[:, 1:].flatten()).item())


@pytest.mark.parametrize("arch,backend", [("llama", "torch"), ("gpt2", "torch"), ("llama", "torchao")])
def test_int8_weights_close_logits_and_perplexity(tok, arch, backend):
    if backend == "torchao":
        pytest.importorskip("torchao", reason="torchao is not installed (pip install 'tinygpt[int8]')")
    fp32 = trained_model(tiny_config(arch, tok.vocab_size), tok, steps=80)
    int8 = trained_model(tiny_config(arch, tok.vocab_size), tok, steps=80)
    fp32_bytes = quantize.weight_bytes(int8)
    quantize.quantize_int8(int8, backend=backend)
    if backend == "torch":
        dynamic = torch.ao.nn.quantized.dynamic.Linear
        assert not [n for n, m in int8.named_modules() if type(m) is torch.nn.Linear]  # every Linear is int8
        assert isinstance(int8.lm_head, dynamic) and isinstance(int8.blocks[0].attn.qkv, dynamic)
    else:
        linears = [m for m in int8.modules() if isinstance(m, torch.nn.Linear)]
        assert linears and all(type(m.weight).__name__ == "Int8Tensor" for m in linears)
    assert int8.tok_emb.weight.dtype == torch.float32  # the lookup stays float, untied from the int8 head
    assert quantize.weight_bytes(int8) < fp32_bytes
    held_out = torch.tensor([i for t in corpus(40, seed=99) for i in tok.encode(t, add_bos=True, add_eos=True)])
    ids = held_out[: (len(held_out) // 64) * 64].view(-1, 64)[:8]  # (8, 64)
    p32, p8 = perplexity(fp32, ids), perplexity(int8, ids)
    with torch.inference_mode():
        diff = (fp32(ids) - int8(ids)).abs().max().item()
    prompts = [tok.encode("Once upon a time", add_bos=True), tok.encode("The dog saw a big", add_bos=True)]
    a = generate(fp32, prompts, SamplingConfig(temperature=0.0, max_new_tokens=30))
    b = generate(int8, prompts, SamplingConfig(temperature=0.0, max_new_tokens=30))
    prefix = [next((i for i, (x, y) in enumerate(zip(r, s)) if x != y), len(r)) for r, s in zip(a, b)]
    print(f"\n{arch} {backend}: weights {fp32_bytes / 1e3:.0f} kB -> {quantize.weight_bytes(int8) / 1e3:.0f} kB; "
          f"perplexity fp32 {p32:.3f} int8 {p8:.3f} ({p8 / p32 - 1:+.2%}); max |logit diff| {diff:.3f}; "
          f"identical greedy prefixes {prefix} of 30")
    assert abs(p8 / p32 - 1) < 0.03  # the quality measure; one flipped argmax changes every later token
    assert diff < 2.0  # int8 activations (torch backend) move logits more than int8 weights alone


def test_reward_model_head_stays_float(tok):
    model = trained_model(tiny_config("llama", tok.vocab_size, scalar_head=True), tok, steps=1)
    quantize.quantize_int8(model)
    assert type(model.scalar_head) is torch.nn.Linear and model.scalar_head.weight.dtype == torch.float32


def test_bad_mode_is_refused():
    with pytest.raises(ValueError, match="--quantize must be one of none, int8"):
        quantize.apply(torch.nn.Linear(2, 2), "int4")
    with pytest.raises(ValueError, match="backend must be one of torch, torchao"):
        quantize.quantize_int8(torch.nn.Linear(2, 2), backend="onnx")


def test_sample_and_chat_with_quantize_int8(tok, tmp_path, capsys):
    ckpt = save(tmp_path / "ckpt", trained_model(tiny_config("llama", tok.vocab_size), tok), tok)
    fp32 = cli.run(["sample", str(ckpt), "--prompt", "Once upon a time", "--temperature", "0", "--max-new-tokens", "12",
                    "--device", "cpu"])
    int8 = cli.run(["sample", str(ckpt), "--prompt", "Once upon a time", "--temperature", "0", "--max-new-tokens", "12",
                    "--device", "cpu", "--quantize", "int8"])
    assert int8[0].startswith("Once upon a time") and len(int8[0]) > len("Once upon a time")
    print(f"\nfp32: {fp32[0]!r}\nint8: {int8[0]!r}")
    out = io.StringIO()
    result = chat_main(ChatConfig(checkpoint=str(ckpt), temperature=0.0, max_new_tokens=8, device="cpu", quantize="int8"),
                       stdin=io.StringIO("hello\n/exit\n"), stdout=out)
    assert result["turns"] == 1 and "bot> " in out.getvalue()
    with pytest.raises(SystemExit):
        cli.run(["sample", "--help"])
    assert "--quantize" in capsys.readouterr().out
