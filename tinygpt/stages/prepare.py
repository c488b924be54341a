"""Stage `tinygpt prepare`: tokenize documents into packed train/val token shards.

A thin stage over :func:`tinygpt.data.shards.prepare_shards`: reads the config, writes
``train.bin``, ``val.bin``, ``meta.json`` and ``tokenizer.json`` into ``out``, and prints the
stats. It knows nothing about models.

    tinygpt prepare --inputs runs/w/pretrain.jsonl --tokenizer runs/tok --out runs/data
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinygpt.config import opt, save_config
from tinygpt.data.shards import prepare_shards


@dataclass
class PrepareConfig:
    inputs: list[str] = opt([], "files, directories or globs of documents (.txt, .jsonl, .parquet, datasets dirs)", required=True)
    tokenizer: str = opt("runs/tokenizer", "tokenizer.json, or a directory holding one (e.g. from `tinygpt tokenizer train`)")
    out: str = opt("runs/data", "output directory for train.bin, val.bin, meta.json, tokenizer.json")
    val_fraction: float = opt(0.05, "share of documents held out for validation (by a seeded hash of each document)")
    seed: int = opt(0, "seed of the train/val split")
    skip_bad: bool = opt(False, "skip and count bad documents instead of stopping at the first")
    num_workers: int = opt(0, "tokenizer threads (0 = all cores)")
    text_field: str = opt("text", "JSONL field / Parquet or datasets column holding the text")
    progress: bool = opt(True, "show a progress bar")


def main(cfg: PrepareConfig) -> dict[str, Any]:
    if not cfg.inputs:
        raise ValueError("inputs: give at least one file, directory or glob of documents")
    stats = prepare_shards(cfg.inputs, cfg.tokenizer, cfg.out, val_fraction=cfg.val_fraction, seed=cfg.seed,
                           skip_bad=cfg.skip_bad, num_workers=cfg.num_workers, text_field=cfg.text_field,
                           show_progress=cfg.progress)
    save_config(cfg, Path(cfg.out) / "prepare_config.json")
    total = stats["train_tokens"] + stats["val_tokens"]
    print(f"prepared {cfg.out}: train {stats['train_tokens']:,} tokens / {stats['train_docs']:,} docs, "
          f"val {stats['val_tokens']:,} tokens / {stats['val_docs']:,} docs ({stats['dtype']})")
    print(f"{total:,} tokens in {stats['seconds']}s ({stats['tokens_per_second']:,} tokens/s); "
          f"skipped {stats['skipped']} bad documents" + (f" {stats['skipped_by_reason']}" if stats["skipped"] else ""))
    for error in stats["first_errors"][:5]:
        print(f"  skipped: {error}")
    if stats["val_fallback"]:
        print("note: no document hashed into validation; the last training document was moved there")
    return stats
