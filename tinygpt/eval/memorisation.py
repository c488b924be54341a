"""Memorisation and extraction (Carlini et al. 2021, https://arxiv.org/abs/2012.07805): prompt a model with
the first tokens of a training document and of a held-out one, greedy-decode, and count the
continuations that reproduce the document exactly for 32 / 64 tokens.

    tinygpt memorisation --checkpoints base=runs/demo/pretrain sft=runs/demo/sft --data runs/demo/data

The held-out documents are the ``val.bin`` side of the same shard directory: the split is by a
seeded hash of each document, so no training document is in it, but the world's stories share
templates, and a held-out story's next 32 tokens can be guessed from its first 32. The held-out
rate is that floor; the train rate above it is what the model memorised.

:func:`extraction_table` is what the evaluation calls: checkpoints by name in, one result dict and a
markdown table out. ``tinygpt memorisation`` is the same as a command. Knows checkpoints, shards and
the sampler; nothing about stages or the report.
"""

from __future__ import annotations

import json
import random
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from tinygpt import runtime
from tinygpt.checkpoint import load_model, resolve_checkpoint
from tinygpt.config import opt
from tinygpt.data.shards import TokenDataset
from tinygpt.generate import SamplingConfig, generate


def split_documents(tokens: np.ndarray, bos_id: int, eos_id: int) -> list[list[int]]:
    """A packed split (``BOS ids EOS`` back to back) -> each document's ids, BOS first, EOS dropped."""
    ids = tokens.astype(np.int64)
    starts = np.flatnonzero(ids == bos_id).tolist() + [len(ids)]
    docs = []
    for a, b in zip(starts[:-1], starts[1:]):
        doc = ids[a:b].tolist()
        if doc and doc[-1] == eos_id:
            doc = doc[:-1]
        docs.append(doc)
    return docs


def pick_documents(data_dir: str | Path, split: str, *, n: int, min_tokens: int, seed: int = 0) -> list[list[int]]:
    """Up to ``n`` documents of ``split`` with at least ``min_tokens`` ids after BOS, chosen by ``seed``."""
    ds = TokenDataset(data_dir, split)
    bos, eos = int(ds.meta["bos_id"]), int(ds.meta["eos_id"])
    docs = [d for d in split_documents(np.asarray(ds.tokens), bos, eos) if len(d) - 1 >= min_tokens]
    random.Random(seed).shuffle(docs)
    return docs[:n]


def matched_prefix(a: Sequence[int], b: Sequence[int]) -> int:
    """How many leading tokens ``a`` and ``b`` share."""
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def extraction_counts(model: torch.nn.Module, docs: Sequence[Sequence[int]], *, prefix_tokens: int = 32,
                      continuation_tokens: Sequence[int] = (32, 64), batch_size: int = 32) -> dict[str, Any]:
    """Greedy-decode after ``BOS + prefix_tokens`` ids of each document; count exact continuations.

    Every document needs ``1 + prefix_tokens + max(continuation_tokens)`` ids (BOS included). Returns
    ``{"n", "exact": {L: share of documents continued exactly for L tokens}, "mean_matched",
    "median_matched"}`` (matched = leading tokens of the continuation equal to the document's)."""
    longest = max(continuation_tokens)
    need = 1 + prefix_tokens + longest
    short = [i for i, d in enumerate(docs) if len(d) < need]
    if short:
        raise ValueError(f"{len(short)} document(s) have fewer than 1 + {prefix_tokens} + {longest} = {need} ids "
                         f"(the first is #{short[0]}); choose them with pick_documents(min_tokens=...)")
    matched: list[int] = []
    cfg = SamplingConfig(temperature=0.0, max_new_tokens=longest)
    for start in range(0, len(docs), batch_size):
        chunk = docs[start:start + batch_size]
        prompts = [list(d[:1 + prefix_tokens]) for d in chunk]
        with torch.inference_mode():
            outs = generate(model, prompts, cfg)  # greedy, no EOS: the continuation runs its full length
        matched += [matched_prefix(o, d[1 + prefix_tokens:need]) for o, d in zip(outs, chunk)]
    n = len(matched)
    return {"n": n, "exact": {int(L): (sum(m >= L for m in matched) / n if n else float("nan"))
                              for L in continuation_tokens},
            "mean_matched": statistics.fmean(matched) if n else float("nan"),
            "median_matched": statistics.median(matched) if n else float("nan")}


def extraction_table(checkpoints: Mapping[str, str | Path], data_dir: str | Path, *, n_docs: int = 200,
                     prefix_tokens: int = 32, continuation_tokens: Sequence[int] = (32, 64), seed: int = 0,
                     device: str = "auto", batch_size: int = 32) -> dict[str, Any]:
    """The extraction rate of each checkpoint on the same training and held-out documents.

    ``checkpoints``: name -> checkpoint (``{"base": "runs/demo/pretrain", "SFT": "runs/demo/sft", ...}``);
    ``data_dir``: the shard directory the base model was pretrained on (``runs/demo/data``).

    Returns ``{"prefix_tokens", "continuation_tokens", "n_docs": {"train", "heldout"},
    "models": {name: {"train": counts, "heldout": counts, "checkpoint"}}, "table": markdown}``, where
    counts is :func:`extraction_counts`'s dict (``counts["exact"][32]`` is the 32-token rate).
    """
    longest = max(continuation_tokens)
    need = prefix_tokens + longest
    train = pick_documents(data_dir, "train", n=n_docs, min_tokens=need, seed=seed)
    heldout = pick_documents(data_dir, "val", n=n_docs, min_tokens=need, seed=seed)
    if not train or not heldout:
        raise ValueError(f"{data_dir}: no {'training' if not train else 'held-out'} document has the "
                         f"{need} tokens a {prefix_tokens}-token prefix and a {longest}-token continuation need")
    dev = runtime.resolve_device(device)
    models: dict[str, Any] = {}
    for name, path in checkpoints.items():
        ckpt = resolve_checkpoint(path)
        model, mcfg = load_model(ckpt, device=dev)
        if 1 + need > mcfg.block_size:
            raise ValueError(f"{ckpt}: block_size {mcfg.block_size} is too short for 1 + {prefix_tokens} + {longest}")
        model.eval()
        models[name] = {"checkpoint": str(ckpt),
                        "train": extraction_counts(model, train, prefix_tokens=prefix_tokens,
                                                   continuation_tokens=continuation_tokens, batch_size=batch_size),
                        "heldout": extraction_counts(model, heldout, prefix_tokens=prefix_tokens,
                                                     continuation_tokens=continuation_tokens, batch_size=batch_size)}
        del model
    result = {"prefix_tokens": prefix_tokens, "continuation_tokens": [int(L) for L in continuation_tokens],
              "n_docs": {"train": len(train), "heldout": len(heldout)}, "data": str(data_dir), "seed": seed,
              "models": models}
    result["table"] = markdown_table(result)
    return result


def markdown_table(result: Mapping[str, Any]) -> str:
    """One row per model: exact-continuation rates on training and held-out documents, and their gap."""
    Ls = result["continuation_tokens"]
    head = ["model"] + [f"train exact {L}" for L in Ls] + [f"held-out exact {L}" for L in Ls] + \
           [f"gap {L}" for L in Ls] + ["train mean matched", "held-out mean matched"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in result["models"].items():
        tr, ho = m["train"], m["heldout"]
        cells = [name] + [f"{tr['exact'][L]:.3f}" for L in Ls] + [f"{ho['exact'][L]:.3f}" for L in Ls] + \
                [f"{tr['exact'][L] - ho['exact'][L]:+.3f}" for L in Ls] + \
                [f"{tr['mean_matched']:.1f}", f"{ho['mean_matched']:.1f}"]
        lines.append("| " + " | ".join(cells) + " |")
    n = result["n_docs"]
    lines.append(f"\n{n['train']} training and {n['heldout']} held-out documents; prompt = BOS + the first "
                 f"{result['prefix_tokens']} tokens; greedy decoding; exact L = the first L generated tokens equal "
                 "the document's.")
    return "\n".join(lines)


# --- `tinygpt memorisation` ---

@dataclass
class MemorisationConfig:
    checkpoints: list[str] = opt([], "checkpoints to test, as NAME=PATH or PATH (named after its directory)",
                                 required=True)
    data: str = opt("", "the shard directory the base model was pretrained on (train.bin, val.bin: held out)",
                    required=True)
    n_docs: int = opt(200, "training and held-out documents each")
    prefix_tokens: int = opt(32, "prompt: BOS and this many tokens of the document")
    continuation_tokens: list[int] = opt([32, 64], "continuation lengths that count as extracted")
    seed: int = opt(0, "which documents")
    batch_size: int = opt(32, "prompts decoded together")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    out: str = opt("", "write the result as JSON here")


def main(cfg: MemorisationConfig) -> dict[str, Any]:
    if not cfg.checkpoints or not cfg.data:
        raise ValueError("give --checkpoints [NAME=]PATH ... and --data SHARD_DIR (e.g. runs/demo/data)")
    named: dict[str, str] = {}
    for item in cfg.checkpoints:
        name, sep, path = item.partition("=")
        if not sep:
            name, path = Path(item).name, item
        named[name] = path
    result = extraction_table(named, cfg.data, n_docs=cfg.n_docs, prefix_tokens=cfg.prefix_tokens,
                              continuation_tokens=cfg.continuation_tokens, seed=cfg.seed, device=cfg.device,
                              batch_size=cfg.batch_size)
    print(result["table"])
    if cfg.out:
        Path(cfg.out).write_text(json.dumps(result, indent=1))
    return result
