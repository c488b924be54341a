"""LoRA through peft: what it wraps, that training touches only adapters, peft-format save/load,
merge == base + adapter, exact resume; and full fine-tuning changing every parameter."""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinygpt import lora, runtime
from tinygpt.checkpoint import load_model, resolve_checkpoint, save_checkpoint
from tinygpt.runlog import read_metrics
from tinygpt.model import GPT, ModelConfig
from tinygpt.stages import sft
from tinygpt.stages.sft import SFTConfig
from tinygpt.tokenizer import Tokenizer

WORDS = ["red", "blue", "green", "sun", "moon", "tree"]


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and keeps timings steady on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lora")
    rng = random.Random(0)
    chats = []
    for _ in range(32):
        w = rng.choice(WORDS)
        chats.append({"messages": [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]})
    (root / "train.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    tok = Tokenizer.train([m["content"] for c in chats for m in c["messages"]] * 3, vocab_size=290,
                          show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, d_model=32)
    save_checkpoint(root / "init", model=GPT(cfg), model_config=cfg, tokenizer_json=tok.to_str(),
                    meta={"stage": "pretrain"})
    return {"root": root, "init": root / "init", "cfg": cfg}


def _cfg(world, out, **kw) -> SFTConfig:
    base = dict(init=str(world["init"]), data=str(world["root"] / "train.jsonl"), out=str(out), batch_size=4,
                max_steps=5, warmup_steps=1, lr=1e-2, eval_every=100, log_every=1, save_every=100, device="cpu",
                dtype="float32", progress=False, seed=7, lora_r=4, lora_alpha=8.0)
    base.update(kw)
    return SFTConfig(**base)


def test_wrap_targets_every_projection_and_nothing_else(world):
    cfg = world["cfg"]
    model = lora.wrap(GPT(cfg), r=4, alpha=8)
    wrapped = sorted(name.removeprefix("base_model.model.") for name, m in model.named_modules()
                     if hasattr(m, "lora_A") and name.startswith("base_model.model."))
    expected = sorted(f"blocks.{i}.{p}" for i in range(cfg.n_layer)
                      for p in ("attn.qkv", "attn.proj", "mlp.fc", "mlp.proj"))
    assert wrapped == expected
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert all(".lora_A." in n or ".lora_B." in n for n in trainable)
    d, h = cfg.d_model, cfg.ff_hidden
    per_layer = 4 * (d + 3 * d) + 4 * (d + d) + 4 * (d + h) + 4 * (h + d)  # r * (d_in + d_out) per projection
    assert sum(trainable.values()) == cfg.n_layer * per_layer
    x = torch.randint(0, cfg.vocab_size, (2, 8))
    base = GPT(cfg)
    base.load_state_dict(lora.base_model_copy(model).state_dict())
    torch.testing.assert_close(model(x), base(x), atol=0, rtol=0)  # B = 0: training starts at the base model


def test_lora_sft_changes_only_adapters_and_merge_matches(world, tmp_path):
    result = sft.main(_cfg(world, tmp_path / "run", merge_lora=True))
    ckpt = resolve_checkpoint(tmp_path / "run")
    # adapters in peft's format, pointing at their base; every adapter matrix moved from its initial value
    adapter_cfg = json.loads((ckpt / "adapter" / "adapter_config.json").read_text())
    assert adapter_cfg["r"] == 4 and adapter_cfg["base_model_name_or_path"] == str(world["init"])
    saved = load_file(str(ckpt / "adapter" / "adapter_model.safetensors"))
    runtime.seed_everything(7)  # replay main's initialisation: same seed, same RNG draws
    initial = lora.adapter_state(lora.wrap(load_model(world["init"])[0], r=4, alpha=8.0))
    assert saved.keys() == initial.keys() and len(saved) == 2 * 4 * world["cfg"].n_layer
    for k in saved:
        assert not torch.equal(saved[k], initial[k]), k
    assert json.loads((ckpt / "tinygpt.json").read_text())["lora"] == {"r": 4, "alpha": 8.0, "dropout": 0.0}

    # model.safetensors is the merged model: W + (alpha / r) B A on the projections, the chat tokens'
    # embedding rows (tied to the lm_head) as trained, and every other tensor and row (norms, biases, the
    # other tokens) bit-equal to the base: only the adapters and those rows trained
    init_w, ckpt_w = load_file(str(world["init"] / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert init_w.keys() == ckpt_w.keys()
    rows = load_file(str(ckpt / "adapter" / "token_rows.safetensors"))
    chat = [3, 4, 5, 6]  # <|system|> <|user|> <|assistant|> <|end|>
    assert rows["ids"].tolist() == chat
    for k in init_w:
        module = k.removesuffix(".weight")
        a_key = f"base_model.model.{module}.lora_A.weight"
        if a_key in saved:
            delta = (8.0 / 4) * saved[f"base_model.model.{module}.lora_B.weight"] @ saved[a_key]
            torch.testing.assert_close(ckpt_w[k], init_w[k] + delta, atol=1e-6, rtol=0)
            assert not torch.equal(ckpt_w[k], init_w[k]), k
        elif k in ("tok_emb.weight", "lm_head.weight"):
            other = [i for i in range(init_w[k].shape[0]) if i not in chat]
            assert torch.equal(init_w[k][other], ckpt_w[k][other]), k
            assert torch.equal(ckpt_w[k][chat], rows["rows"]), k
            assert not torch.equal(init_w[k][chat[1:]], ckpt_w[k][chat[1:]]), k  # <|system|> may be unused
        else:
            assert torch.equal(init_w[k], ckpt_w[k]), k

    # merged logits == base + adapter logits (peft), for the checkpoint, merge() and OUT/merged
    x = torch.randint(0, world["cfg"].vocab_size, (3, 12))
    with torch.no_grad():
        peft_model = lora.load_adapter_model(tmp_path / "run")
        with_adapter = peft_model(x)
        for plain in (load_model(ckpt)[0], load_model(result["merged"])[0], lora.merge(peft_model)):
            torch.testing.assert_close(plain(x), with_adapter, atol=1e-5, rtol=0)
    assert not (Path(result["merged"]) / "adapter").exists()


def test_lora_resume_is_exact(world, tmp_path):
    sft.main(_cfg(world, tmp_path / "straight", lora_dropout=0.1))
    sft.main(_cfg(world, tmp_path / "split", lora_dropout=0.1, stop_after=2))
    sft.main(_cfg(world, tmp_path / "split", lora_dropout=0.1, resume=True))
    losses = [[(r["step"], r["loss"]) for r in read_metrics(Path(p) / "metrics.jsonl") if "loss" in r]
              for p in (tmp_path / "straight", tmp_path / "split")]
    assert losses[0] == losses[1] and len(losses[0]) == 5
    for name in ("adapter_model.safetensors", "token_rows.safetensors"):
        a, b = (load_file(str(resolve_checkpoint(p) / "adapter" / name)) for p in (tmp_path / "straight", tmp_path / "split"))
        for k in a:
            assert torch.equal(a[k], b[k]), (name, k)


def test_weight_decay_leaves_the_frozen_embedding_rows_alone(world, tmp_path):
    """The embedding trains only its chat rows; weight decay must not shrink the others."""
    sft.main(_cfg(world, tmp_path / "wd", weight_decay=0.5))
    def embedding(path):  # the tied tensor is stored once, under one of its two names
        weights = load_file(str(path / "model.safetensors"))
        return weights["tok_emb.weight"] if "tok_emb.weight" in weights else weights["lm_head.weight"]

    init_w, ckpt_w = embedding(world["init"]), embedding(resolve_checkpoint(tmp_path / "wd"))
    assert torch.equal(init_w[7:], ckpt_w[7:]) and torch.equal(init_w[:3], ckpt_w[:3])
    sft.main(_cfg(world, tmp_path / "off", lora_chat_tokens=False))  # the old behaviour: every row frozen
    assert not (resolve_checkpoint(tmp_path / "off") / "adapter" / "token_rows.safetensors").exists()
    off_w = embedding(resolve_checkpoint(tmp_path / "off"))
    assert torch.equal(init_w, off_w)


def test_full_fine_tuning_changes_every_parameter(world, tmp_path):
    sft.main(_cfg(world, tmp_path / "full", lora_r=0, lr=3e-3))
    ckpt = resolve_checkpoint(tmp_path / "full")
    assert not (ckpt / "adapter").exists()
    init_w, ckpt_w = load_file(str(world["init"] / "model.safetensors")), load_file(str(ckpt / "model.safetensors"))
    assert init_w.keys() == ckpt_w.keys()
    for k in init_w:
        assert not torch.equal(init_w[k], ckpt_w[k]), f"{k} did not change"


def test_bad_lora_settings_are_refused(world, tmp_path):
    with pytest.raises(ValueError, match="rank"):
        lora.wrap(GPT(world["cfg"]), r=0, alpha=8)
    with pytest.raises(ValueError, match="merge-lora needs LoRA"):
        sft.main(_cfg(world, tmp_path / "x", lora_r=0, merge_lora=True))
