"""Sample stories from a checkpoint and grade each with the world's oracle.

The TinyStories evaluation, made exact: instead of asking GPT-4, every sample is parsed against
the world's grammar, checked for consistency (cast, kinds, pronouns, one object, one place, plot
order, a proper ending), counted for rude phrases, and compared with the training corpus for
novelty. A story "ends properly" when the model itself emitted EOS after a closing sentence
(not when it ran out of tokens).

Knows checkpoints, the sampler and the oracle; nothing about stages.
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any, Iterable

import torch

from tinygpt import runtime
from tinygpt.checkpoint import load_meta, load_model, load_tokenizer, resolve_checkpoint
from tinygpt.data.sources import iter_documents
from tinygpt.generate import SamplingConfig, generate
from tinygpt.tokenizer import Tokenizer
from tinygpt.world.oracle import NoveltyIndex, story_scores

COLUMNS = ("grammar", "consistency", "consistent", "rudeness_rate", "sentence_novelty", "ngram_novelty",
           "ends_with_eos")


def sample_stories(model: torch.nn.Module, tok: Tokenizer, n: int, *, temperature: float, seed: int,
                   max_new_tokens: int, batch_size: int = 50) -> list[tuple[str, bool]]:
    """``n`` stories from BOS: (text, stopped_on_eos) each."""
    out: list[tuple[str, bool]] = []
    for start in range(0, n, batch_size):
        k = min(batch_size, n - start)
        cfg = SamplingConfig(temperature=temperature, top_p=1.0, max_new_tokens=max_new_tokens, seed=seed + start)
        with torch.inference_mode():
            new = generate(model, [[tok.bos_id]] * k, cfg, eos_id=tok.eos_id)
        out += [(tok.decode(ids).strip(), len(ids) < max_new_tokens) for ids in new]
    return out


def summarize(rows: list[dict[str, Any]]) -> dict[str, float]:
    """Means over samples; rudeness as the share of samples with any rude phrase."""
    def mean(key: str) -> float:
        vals = [float(r[key]) for r in rows if r.get(key) is not None]
        return round(statistics.fmean(vals), 4) if vals else float("nan")

    return {"n": len(rows), "grammar": mean("grammar"), "consistency": mean("consistency"),
            "consistent": mean("consistent"), "rudeness_rate": round(sum(r["rudeness"] > 0 for r in rows)
                                                                     / max(len(rows), 1), 4),
            "sentence_novelty": mean("sentence_novelty"), "ngram_novelty": mean("ngram_novelty"),
            "ends_with_eos": mean("ends_with_eos"), "ends_properly": mean("ends_properly")}


def markdown_table(summaries: dict[str, dict[str, float]]) -> str:
    cols = ("grammar", "consistency", "consistent", "rudeness_rate", "sentence_novelty", "ngram_novelty",
            "ends_with_eos", "ends_properly")
    lines = ["| model | n | " + " | ".join(cols) + " |", "|---|---|" + "---|" * len(cols)]
    for name, s in summaries.items():
        lines.append(f"| {name} | {s['n']} | " + " | ".join(f"{s[c]:.3f}" for c in cols) + " |")
    return "\n".join(lines)


def grade_samples(checkpoint: str | Path, *, n_samples: int = 100, temperature: float = 0.7, seed: int = 0,
                  device: str = "auto", corpus: str | Path | Iterable[str] | None = None,
                  max_new_tokens: int | None = None) -> dict[str, Any]:
    """Sample ``n_samples`` stories from a checkpoint and grade them; returns samples, summary, table."""
    ckpt = resolve_checkpoint(checkpoint)
    dev = runtime.resolve_device(device)
    model, mcfg = load_model(ckpt, device=dev)
    model.eval()
    tok = load_tokenizer(ckpt)
    max_new = max_new_tokens or mcfg.block_size - 1
    index = None
    if corpus is not None:
        docs = iter_documents([corpus]) if isinstance(corpus, (str, Path)) else corpus
        index = NoveltyIndex(docs)
    rows = []
    for text, eos in sample_stories(model, tok, n_samples, temperature=temperature, seed=seed,
                                    max_new_tokens=max_new):
        scores = story_scores(text, None, index)
        rows.append({"text": text, **scores, "ends_with_eos": eos})
    summary = summarize(rows)
    summary.update(checkpoint=str(ckpt), step=load_meta(ckpt).get("step"), temperature=temperature)
    return {"samples": rows, "summary": summary, "table": markdown_table({ckpt.parent.parent.name or "model": summary})}


def write_samples(result: dict[str, Any], path: str | Path) -> None:
    """A readable markdown file: the summary table, then every sample with its scores."""
    lines = ["# Sampled stories, graded by the oracle", "", result["table"], ""]
    for i, r in enumerate(result["samples"], 1):
        flags = (f"grammar {r['grammar']:.2f}, consistency {r['consistency']:.2f}, rude {r['rudeness']}, "
                 f"EOS {'yes' if r['ends_with_eos'] else 'no'}")
        lines += [f"## {i} ({flags})", "", r["text"], ""]
    Path(path).write_text("\n".join(lines))
