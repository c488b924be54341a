"""Shared by the tests/test_serve*.py files: a tiny chat checkpoint on disk and a live server on 127.0.0.1."""

from pathlib import Path

import torch

from tinygpt.checkpoint import save_checkpoint
from tinygpt.model import GPT, ModelConfig
from tinygpt.serve import ServeConfig
from tinygpt.serve.app import BackgroundServer
from tinygpt.tokenizer import Tokenizer

TEXTS = ["Once upon a time there was a little cat.", "The dog ran to the park and played with a ball.",
         "What is two plus three? Five.", "Hello! How are you today? I am fine, thank you.",
         "The sun was warm and the sky was blue. Tom and Lily were happy."] * 4


CHATS = [("Hello!", "Hi! I am fine."), ("Tell me about the cat.", "The cat sat in the sun."),
         ("What is two plus three?", "Five."), ("Where did the dog go?", "The dog ran to the park.")]


def tiny_checkpoint(root: Path, block_size: int = 64, train_steps: int = 60) -> Path:
    """A 2-layer model with a real BPE tokenizer, trained for a moment on four short chats so that it
    ends some turns with <|end|> (finish_reason "stop") and others run to max_tokens ("length")."""
    tok = Tokenizer.train(TEXTS + [t for c in CHATS for t in c], vocab_size=320, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=block_size, n_layer=2, n_head=2, d_model=32)
    model = GPT(cfg)
    rows = [tok.render_chat([{"role": "user", "content": q}, {"role": "assistant", "content": a}]) for q, a in CHATS]
    width = max(len(ids) for ids, _ in rows)
    ids = torch.tensor([i + [0] * (width - len(i)) for i, _ in rows])                  # (4, width)
    mask = torch.tensor([m + [0] * (width - len(m)) for _, m in rows], dtype=torch.bool)
    targets = ids[:, 1:].masked_fill(~mask[:, 1:], -100)                                # loss on the answers only
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(train_steps):
        logits = model(ids[:, :-1])                                                     # (4, width-1, V)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=-100)
        opt.zero_grad()
        loss.backward()
        opt.step()
    path = root / "tiny" / "sft"
    save_checkpoint(path, model=model.eval(), model_config=cfg, tokenizer_json=tok.to_str(), meta={"stage": "sft"})
    return path


def live_server(ckpt: Path, **overrides) -> BackgroundServer:
    cfg = ServeConfig(**{"checkpoint": str(ckpt), "port": 0, "device": "cpu", "log_level": "warning", **overrides})
    return BackgroundServer(cfg).start()
