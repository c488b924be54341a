"""Stage `tinygpt tokenizer train`: train the byte-level BPE on user or world documents.

Reads documents (text, JSONL, Parquet, `datasets` directories: see tinygpt.data.sources), trains
a :class:`tinygpt.tokenizer.Tokenizer`, saves ``tokenizer.json`` plus the files `transformers`
loads into ``out``, and prints a summary (vocabulary, compression in characters per token).
It knows nothing about shards or models.

    tinygpt tokenizer train --inputs runs/w/pretrain.jsonl --out runs/tok --vocab-size 2048
    tinygpt tokenizer train --inputs my_corpus/*.parquet --text-field body --out runs/tok
"""

from __future__ import annotations

import itertools
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinygpt.config import opt, to_jsonable
from tinygpt.data.sources import ReadStats, iter_documents
from tinygpt.tokenizer import Tokenizer

COMPRESSION_SAMPLE_DOCS = 1000


@dataclass
class TokenizerConfig:
    inputs: list[str] = opt([], "files, directories or globs of documents (.txt, .jsonl, .parquet, datasets dirs)", required=True)
    out: str = opt("runs/tokenizer", "output directory for tokenizer.json and the transformers files")
    vocab_size: int = opt(4096, "vocabulary size: 7 special + 256 byte tokens + merges")
    min_frequency: int = opt(2, "a pair must occur this often to be merged")
    max_docs: int = opt(200_000, "read at most this many documents for training (0 = all)")
    skip_bad: bool = opt(False, "skip and count bad documents instead of stopping at the first")
    text_field: str = opt("text", "JSONL field / Parquet or datasets column holding the text")
    progress: bool = opt(True, "show the training progress bar of `tokenizers`")


def main(cfg: TokenizerConfig) -> dict[str, Any]:
    # --- config ---
    if not cfg.inputs:
        raise ValueError("inputs: give at least one file, directory or glob of documents")
    if cfg.max_docs < 0:
        raise ValueError(f"max_docs must be >= 0 (0 = all), got {cfg.max_docs}")
    out = Path(cfg.out)

    # --- data: stream documents, keep a small sample to measure compression ---
    read_stats = ReadStats()
    documents = iter_documents(cfg.inputs, text_field=cfg.text_field, skip_bad=cfg.skip_bad, stats=read_stats)
    if cfg.max_docs:
        documents = itertools.islice(documents, cfg.max_docs)
    sample: list[str] = []

    def keep_sample(docs):
        for doc in docs:
            if len(sample) < COMPRESSION_SAMPLE_DOCS:
                sample.append(doc)
            yield doc

    # --- train ---
    started = time.perf_counter()
    tokenizer = Tokenizer.train(keep_sample(documents), vocab_size=cfg.vocab_size, min_frequency=cfg.min_frequency,
                                show_progress=cfg.progress)
    seconds = time.perf_counter() - started
    if read_stats.documents == 0:
        raise ValueError(f"no documents read from {cfg.inputs} (skipped {read_stats.skipped} bad ones)")

    # --- save and summarize ---
    tokenizer.save(out)
    sample_tokens = sum(map(len, tokenizer.encode_batch(sample)))
    summary = {
        "out": str(out),
        "vocab_size": tokenizer.vocab_size,
        "requested_vocab_size": cfg.vocab_size,
        "documents": read_stats.documents,
        "skipped": read_stats.skipped,
        "skipped_by_reason": dict(read_stats.skipped_by_reason),
        "chars_per_token": round(sum(map(len, sample)) / max(sample_tokens, 1), 3),
        "bytes_per_token": round(sum(len(s.encode("utf-8", "replace")) for s in sample) / max(sample_tokens, 1), 3),
        "compression_sample_docs": len(sample),
        "seconds": round(seconds, 2),
        "tokenizer_sha256": tokenizer.fingerprint,
        "sources": read_stats.files,
    }
    (out / "tokenizer_training.json").write_text(json.dumps({"config": to_jsonable(cfg), "summary": summary}, indent=2) + "\n")
    print(f"tokenizer: vocab {tokenizer.vocab_size} (asked {cfg.vocab_size}) from {read_stats.documents} documents "
          f"in {seconds:.1f}s; skipped {read_stats.skipped} bad")
    print(f"compression on {len(sample)} documents: {summary['chars_per_token']} chars/token, "
          f"{summary['bytes_per_token']} bytes/token")
    for error in read_stats.first_errors[:5]:
        print(f"  skipped: {error}")
    print(f"saved {out / 'tokenizer.json'} (+ tokenizer_config.json, special_tokens_map.json)")
    return summary
