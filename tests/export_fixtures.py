"""Tiny seeded checkpoints shared by the export tests (tests/test_export*.py): a tokenizer trained on
a few hundred sentences, gpt2 and llama models with non-trivial norms and biases, a LoRA checkpoint."""

from __future__ import annotations

import random
from pathlib import Path

import torch

from tinygpt import lora
from tinygpt.checkpoint import save_checkpoint
from tinygpt.model import GPT, ModelConfig
from tinygpt.tokenizer import Tokenizer

WORDS = ("once upon a time there was a little cat named Lily who liked to play with her red ball in the park "
         "one day Tom the dog saw a big tree and said hello friend they were happy and sad what is 3 + 4").split()

TEXTS = [
    "Once upon a time there was a little cat named Lily.",
    "  leading and trailing spaces   ",
    "tabs\tand\r\nCRLF\nlines\n\n\n",
    "What is 12 + 30? It is 42.",
    "caf\u00e9, na\u00efve, \u65e5\u672c\u8a9e, \U0001F600 emoji",
    "a typed <|end|> and <|user|> are plain text",
    "",
]


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(4, 16))).capitalize() + rng.choice(".!?")
            for _ in range(n)]


def make_tokenizer() -> Tokenizer:
    return Tokenizer.train(corpus() + TEXTS, vocab_size=360, show_progress=False)


def tiny_config(arch: str, vocab_size: int, **kw) -> ModelConfig:
    base = dict(vocab_size=vocab_size, block_size=64, n_layer=2, n_head=4, d_model=32, arch=arch)
    if arch == "llama":
        base["n_kv_head"] = 2  # grouped KV heads take their own path in the mapping
    return ModelConfig(**{**base, **kw})


def seeded_model(cfg: ModelConfig, seed: int = 0) -> GPT:
    """A random model with noisy norms/biases and sharper logits (a swapped weight cannot hide)."""
    torch.manual_seed(seed)
    model = GPT(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name or name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))
            elif p.dim() == 2:
                p.mul_(4.0)  # std 0.08: greedy continuations that are not one token repeated
    return model


def trained_model(cfg: ModelConfig, tok: Tokenizer, steps: int = 60, seed: int = 0) -> GPT:
    """``seeded_model`` fitted for a few steps to the corpus: greedy continuations then vary (a random
    model repeats one token), so comparing them tests something. About a second on one core."""
    model = seeded_model(cfg, seed).train()
    ids = torch.tensor([i for t in corpus(200, seed=seed + 1) for i in tok.encode(t, add_bos=True, add_eos=True)])
    g = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        starts = torch.randint(0, len(ids) - cfg.block_size - 1, (8,), generator=g)
        x = torch.stack([ids[s:s + cfg.block_size] for s in starts])      # (8, T)
        y = torch.stack([ids[s + 1:s + cfg.block_size + 1] for s in starts])
        loss = torch.nn.functional.cross_entropy(model(x).flatten(0, 1), y.flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()


def save(path: Path, model: GPT, tok: Tokenizer, **meta) -> Path:
    return save_checkpoint(path, model=model, model_config=model.cfg, tokenizer_json=tok.to_str(),
                           meta={"stage": "pretrain", **meta})


def make_lora_checkpoint(root: Path, arch: str, tok: Tokenizer) -> tuple[Path, Path]:
    """(base checkpoint, LoRA checkpoint) as `tinygpt sft --lora-r` writes them: merged weights in
    model.safetensors, adapter/ relative to the base, trained chat-token rows."""
    base = seeded_model(tiny_config(arch, tok.vocab_size), seed=1)
    base_path = save(root / f"{arch}_base", base, tok)
    torch.manual_seed(2)
    wrapped = lora.wrap(seeded_model(tiny_config(arch, tok.vocab_size), seed=1), r=4, alpha=8.0,
                        train_token_ids=[tok.user_id, tok.assistant_id, tok.end_id])
    with torch.no_grad():  # a "trained" adapter: B away from zero, chat-token rows moved
        for name, p in wrapped.named_parameters():
            if "lora_B" in name:
                p.copy_(0.2 * torch.randn_like(p))
        emb = lora.inner_model(wrapped).tok_emb.weight
        emb[[tok.user_id, tok.assistant_id, tok.end_id]] += 0.3 * torch.randn(3, emb.shape[1])
    merged = lora.merged_copy(wrapped)
    ckpt = save_checkpoint(root / f"{arch}_lora", model=merged, model_config=merged.cfg, tokenizer_json=tok.to_str(),
                           meta={"stage": "sft", "init": str(base_path), "adapter": lora.ADAPTER_DIR})
    lora.save_adapter(wrapped, ckpt, base=base_path)
    return base_path, ckpt


def overfit_chats(model: GPT, tok: Tokenizer, conversations: list[list[dict]], steps: int = 150, seed: int = 0) -> GPT:
    """Fit ``model`` to these chats (loss on the assistant tokens, render_chat's mask): a model that
    answers some of them right, so an accuracy computed two ways is neither 0 nor 1 by accident."""
    rendered = [tok.render_chat(c) for c in conversations]
    T = max(len(ids) for ids, _ in rendered)
    x = torch.full((len(rendered), T), tok.pad_id)
    m = torch.zeros(len(rendered), T)
    for i, (ids, mask) in enumerate(rendered):
        x[i, :len(ids)], m[i, :len(mask)] = torch.tensor(ids), torch.tensor(mask, dtype=torch.float)
    torch.manual_seed(seed)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(steps):
        logits = model(x[:, :-1])                                              # (N, T-1, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x[:, 1:].flatten(), reduction="none")
        loss = (loss * m[:, 1:].flatten()).sum() / m[:, 1:].sum()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return model.eval()
