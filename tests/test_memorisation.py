"""Memorisation / extraction: documents split from packed shards and matched prefixes by hand; a tiny
model trained to memorise four documents continues them exactly and does not continue unseen ones;
`extraction_table` and `tinygpt memorisation` on a shard directory."""

import json
import random

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tinygpt.checkpoint import save_checkpoint
from tinygpt.cli import run
from tinygpt.eval.memorisation import (extraction_counts, extraction_table, matched_prefix, pick_documents,
                                       split_documents)
from tinygpt.model import GPT, ModelConfig

BOS, EOS, V = 1, 2, 64


def test_split_documents_by_hand():
    tokens = np.array([1, 5, 6, 2, 1, 7, 2, 1, 8], dtype=np.uint16)
    assert split_documents(tokens, BOS, EOS) == [[1, 5, 6], [1, 7], [1, 8]]  # the last lost its EOS: kept as is


def test_matched_prefix_by_hand():
    assert matched_prefix([3, 4, 5], [3, 4, 9]) == 2
    assert matched_prefix([3, 4, 5], [3, 4, 5]) == 3
    assert matched_prefix([7], [3]) == 0
    assert matched_prefix([], [3]) == 0


def docs(n: int, seed: int, length: int = 30) -> list[list[int]]:
    rng = random.Random(seed)
    return [[BOS] + [rng.randrange(3, V) for _ in range(length)] for _ in range(n)]


@pytest.fixture(scope="module")
def memorised():
    """A tiny model trained until it reproduces four random documents."""
    torch.manual_seed(0)
    model = GPT(ModelConfig(vocab_size=V, block_size=48, n_layer=2, n_head=2, d_model=48))
    train = docs(4, seed=1)
    x = torch.tensor([d + [EOS] for d in train])  # (4, 32)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    for _ in range(120):
        loss = F.cross_entropy(model(x[:, :-1]).flatten(0, 1), x[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < 0.05
    return model.eval(), train


def test_memorised_documents_are_extracted_and_unseen_ones_are_not(memorised):
    model, train = memorised
    got = extraction_counts(model, train, prefix_tokens=8, continuation_tokens=(8, 16), batch_size=3)
    assert got["n"] == 4 and got["exact"] == {8: 1.0, 16: 1.0} and got["mean_matched"] == 16
    unseen = extraction_counts(model, docs(6, seed=2), prefix_tokens=8, continuation_tokens=(8, 16))
    assert unseen["exact"][8] == 0.0 and unseen["mean_matched"] < 2  # 1/61 per token by chance
    with pytest.raises(ValueError, match="fewer than 1 \\+ 8 \\+ 16 = 25"):
        extraction_counts(model, [[BOS, 3, 4]], prefix_tokens=8, continuation_tokens=(8, 16))


def write_shards(root, train, val):
    root.mkdir()
    for split, ds in (("train", train), ("val", val)):
        np.array([t for d in ds for t in d + [EOS]], dtype=np.uint16).tofile(root / f"{split}.bin")
    meta = {"dtype": "uint16", "vocab_size": V, "bos_id": BOS, "eos_id": EOS,
            "train_tokens": sum(len(d) + 1 for d in train), "val_tokens": sum(len(d) + 1 for d in val)}
    (root / "meta.json").write_text(json.dumps(meta))


def test_extraction_table_and_command_on_a_shard_directory(memorised, tmp_path, capsys):
    model, train = memorised
    held = docs(4, seed=3)
    write_shards(tmp_path / "data", train + [[BOS, 5, 6]], held)  # a short document is left out
    assert sorted(pick_documents(tmp_path / "data", "train", n=10, min_tokens=24)) == sorted(train)
    cfg = model.cfg
    save_checkpoint(tmp_path / "mem", model=model, model_config=cfg, tokenizer_json="{}", meta={"stage": "test"})
    result = extraction_table({"mem": tmp_path / "mem"}, tmp_path / "data", prefix_tokens=8,
                              continuation_tokens=(8, 16), device="cpu")
    m = result["models"]["mem"]
    assert result["n_docs"] == {"train": 4, "heldout": 4}
    assert m["train"]["exact"][16] == 1.0 and m["heldout"]["exact"][8] == 0.0
    assert "| mem | 1.000 | 1.000 | 0.000 | 0.000 | +1.000 | +1.000 |" in result["table"]
    capsys.readouterr()
    out = run(["memorisation", "--checkpoints", f"base={tmp_path / 'mem'}", "--data", str(tmp_path / "data"),
               "--prefix-tokens", "8", "--continuation-tokens", "8", "16", "--device", "cpu",
               "--out", str(tmp_path / "r.json")])
    assert "| base | 1.000" in capsys.readouterr().out
    assert json.loads((tmp_path / "r.json").read_text())["models"]["base"]["train"]["exact"]["16"] == 1.0
    assert out["models"]["base"]["heldout"]["exact"][16] == 0.0
    with pytest.raises(ValueError, match="no training document has the 50 tokens"):
        extraction_table({"mem": tmp_path / "mem"}, tmp_path / "data", prefix_tokens=30, continuation_tokens=(20,))
