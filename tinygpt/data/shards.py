"""Packed token shards: documents -> ``train.bin`` / ``val.bin`` -> (x, y) batches.

This module owns the on-disk pretraining format and its reader:

  out_dir/train.bin   every training document as BOS ids EOS, back to back (the BOS makes an
                      unconditional sample start the way every training document does, and is
                      the same first token every chat rendered by render_chat starts with)
  out_dir/val.bin     the same for validation documents
  out_dir/meta.json   dtype, token and document counts, skipped counts, tokenizer sha256, sources
  out_dir/tokenizer.json  the tokenizer that made the ids

Ids are ``np.uint16`` when the vocabulary fits (<= 65536 ids), else ``np.uint32``. The
train/val split is by document and deterministic: a document goes to validation when
``blake2b(seed, document)`` falls below ``val_fraction``; identical documents therefore always
land on the same side (no exact-duplicate leakage into validation), and the split does not
depend on file order, batching or thread count. Files are written under temporary names and
renamed; ``meta.json`` is written last and removed first, so a directory with a ``meta.json``
is always complete.

:class:`TokenDataset` reads a split through ``np.memmap``. ``batch(step, ...)`` is a pure
function of ``(seed, step)``: the global batch of ``batch_size * world_size`` random windows is
drawn from a generator seeded by ``(seed, step)`` and rank ``r`` takes rows
``[r * batch_size, (r + 1) * batch_size)``, so 2 DDP ranks see exactly the batch that 1 process
with twice the batch size sees, and resuming at step k needs only k.

It knows nothing about models, optimizers or devices: batches are CPU int64 tensors.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import time
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from tinygpt.data.sampling import check_batch_position
from tinygpt.data.sources import DataError, ReadStats, iter_documents
from tinygpt.tokenizer import TOKENIZER_FILE, Tokenizer

META_FILE = "meta.json"
SPLITS = ("train", "val")
SHARD_FORMAT = "tinygpt-token-shards/1"


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned dtype holding ids 0..vocab_size-1 (uint16 or uint32)."""
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


def is_validation(document: str, seed: int, val_fraction: float) -> bool:
    """The split rule: a hash of (seed, document) mapped to [0, 1), compared with val_fraction."""
    if val_fraction <= 0.0:
        return False
    digest = hashlib.blake2b(document.encode("utf-8", "surrogatepass"), digest_size=8,
                             key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") / 2**64 < val_fraction


# --- writing -------------------------------------------------------------------------------------


def prepare_shards(
    paths: str | Path | Iterable[str | Path],
    tokenizer: Tokenizer | str | Path,
    out_dir: str | Path,
    *,
    val_fraction: float = 0.05,
    seed: int = 0,
    skip_bad: bool = False,
    num_workers: int = 0,
    text_field: str = "text",
    batch_documents: int = 1024,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Tokenize every document of ``paths`` into ``out_dir/{train,val}.bin`` + ``meta.json``.

    ``num_workers`` is the number of tokenizer threads (0: all cores). `tokenizers` sizes its
    Rust thread pool once per process, from ``RAYON_NUM_THREADS``, which this sets when unset,
    so it takes effect when nothing was encoded in parallel before (the CLI case). Output is
    identical for any value. Returns the stats written to ``meta.json``.

    If ``val_fraction > 0`` but the hash sends no document to validation (a tiny corpus), the
    last training document is moved to validation so that ``val.bin`` is never empty; the
    stats say so (``val_fallback``)."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0 (0 = all cores), got {num_workers}")
    if num_workers > 0:
        os.environ.setdefault("RAYON_NUM_THREADS", str(num_workers))
    if not isinstance(tokenizer, Tokenizer):
        tokenizer = Tokenizer.load(tokenizer)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.vocab_size)

    started = time.perf_counter()
    read_stats = ReadStats()
    documents = iter_documents(paths, text_field=text_field, skip_bad=skip_bad, stats=read_stats)
    tmp = {split: out_dir / f"{split}.bin.tmp" for split in SPLITS}
    tokens = {split: 0 for split in SPLITS}
    docs = {split: 0 for split in SPLITS}
    last_train_doc: np.ndarray | None = None
    progress = tqdm(desc="tokenizing", unit="doc", disable=not show_progress)
    try:
        with open(tmp["train"], "wb") as train_file, open(tmp["val"], "wb") as val_file:
            files = {"train": train_file, "val": val_file}
            while batch := list(itertools.islice(documents, batch_documents)):
                encoded = tokenizer.encode_batch(batch, add_bos=True, add_eos=True)  # parallel in Rust
                to_val = [is_validation(doc, seed, val_fraction) for doc in batch]
                for split in SPLITS:
                    chosen = [ids for ids, val in zip(encoded, to_val) if val == (split == "val")]
                    if not chosen:
                        continue
                    count = sum(map(len, chosen))
                    flat = np.fromiter(itertools.chain.from_iterable(chosen), dtype=dtype, count=count)  # (count,)
                    flat.tofile(files[split])
                    tokens[split] += count
                    docs[split] += len(chosen)
                    if split == "train":
                        last_train_doc = np.asarray(chosen[-1], dtype=dtype)
                progress.update(len(batch))
                progress.set_postfix(tokens=tokens["train"] + tokens["val"], skipped=read_stats.skipped)
            val_fallback = val_fraction > 0 and docs["val"] == 0 and docs["train"] >= 2
            if val_fallback:  # move the last training document to validation
                assert last_train_doc is not None
                tokens["train"] -= len(last_train_doc)
                docs["train"] -= 1
                train_file.truncate(tokens["train"] * dtype.itemsize)
                last_train_doc.tofile(val_file)
                tokens["val"] += len(last_train_doc)
                docs["val"] += 1
        progress.close()
        if docs["train"] + docs["val"] == 0:
            raise DataError(f"no documents read from {read_stats.files} (skipped {read_stats.skipped} bad ones)")
        seconds = time.perf_counter() - started
        meta = {
            "format": SHARD_FORMAT,
            "dtype": dtype.name,
            "vocab_size": tokenizer.vocab_size,
            "bos_id": tokenizer.bos_id,
            "eos_id": tokenizer.eos_id,
            "tokenizer_sha256": tokenizer.fingerprint,
            "train_tokens": tokens["train"],
            "val_tokens": tokens["val"],
            "train_docs": docs["train"],
            "val_docs": docs["val"],
            "skipped": read_stats.skipped,
            "skipped_by_reason": dict(read_stats.skipped_by_reason),
            "first_errors": read_stats.first_errors,
            "val_fraction": val_fraction,
            "val_fallback": val_fallback,
            "seed": seed,
            "split_rule": "blake2b(key=str(seed), document) / 2**64 < val_fraction",
            "text_field": text_field,
            "sources": read_stats.files,
            "seconds": round(seconds, 3),
            "tokens_per_second": round((tokens["train"] + tokens["val"]) / max(seconds, 1e-9)),
        }
        # everything is read: only now is a good directory from an earlier run replaced. Without
        # meta.json the directory counts as incomplete, so a kill during the swap is never mistaken
        # for finished shards; a bad input (the usual failure) leaves the earlier shards untouched.
        (out_dir / META_FILE).unlink(missing_ok=True)
        for split in SPLITS:
            tmp[split].replace(out_dir / f"{split}.bin")
        tokenizer.save(out_dir / TOKENIZER_FILE)  # the shards carry the tokenizer that made them
        meta_tmp = out_dir / (META_FILE + ".tmp")
        meta_tmp.write_text(json.dumps(meta, indent=2) + "\n")
        meta_tmp.replace(out_dir / META_FILE)
        return meta
    finally:
        progress.close()
        for path in tmp.values():
            path.unlink(missing_ok=True)


# --- reading -------------------------------------------------------------------------------------


class TokenDataset:
    """One split of a prepared shard directory, memory-mapped."""

    def __init__(self, path_or_dir: str | Path, split: str = "train"):
        path = Path(path_or_dir)
        if path.suffix == ".bin":
            directory, split = path.parent, path.stem
        else:
            directory = path
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        meta_path = directory / META_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(
                f"{meta_path} not found: {directory} is not a complete shard directory "
                f"(write one with `tinygpt prepare` / prepare_shards)"
            )
        self.meta: dict[str, Any] = json.loads(meta_path.read_text())
        self.path = directory / f"{split}.bin"
        self.split = split
        if not self.path.is_file():
            raise FileNotFoundError(f"{self.path} not found (meta.json is there: the directory was modified by hand?)")
        self.dtype = np.dtype(self.meta["dtype"])
        expected = self.meta[f"{split}_tokens"]
        actual = self.path.stat().st_size // self.dtype.itemsize
        if actual != expected:
            raise ValueError(f"{self.path}: holds {actual} tokens but meta.json says {expected} (stale or truncated)")
        # np.memmap refuses empty files; an empty split still loads, and fails when batched.
        self.tokens = np.memmap(self.path, dtype=self.dtype, mode="r") if actual else np.zeros(0, self.dtype)

    @property
    def num_tokens(self) -> int:
        return int(self.tokens.shape[0])

    def __len__(self) -> int:
        return self.num_tokens

    def __repr__(self) -> str:
        return f"TokenDataset({str(self.path)!r}, tokens={self.num_tokens}, dtype={self.dtype.name})"

    def _check_window(self, block_size: int) -> None:
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if self.num_tokens < block_size + 1:
            raise ValueError(
                f"{self.path}: {self.num_tokens} tokens, too few for one window of block_size + 1 = {block_size + 1} "
                f"(add data, lower block_size, or raise val_fraction for the val split)"
            )

    def num_windows(self, block_size: int) -> int:
        """Non-overlapping (x, y) windows of length block_size (what eval_batches walks)."""
        return max(self.num_tokens - 1, 0) // block_size

    def _windows(self, starts: np.ndarray, block_size: int) -> tuple[torch.Tensor, torch.Tensor]:
        index = starts[:, None] + np.arange(block_size + 1)  # (B, T+1)
        window = torch.from_numpy(self.tokens[index].astype(np.int64))  # (B, T+1)
        return window[:, :-1].contiguous(), window[:, 1:].contiguous()  # (B, T), (B, T)

    def batch(
        self, step: int, batch_size: int, block_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Random windows ``(x, y)``, each (batch_size, block_size) int64, ``y`` = ``x`` shifted by one.

        A pure function of ``(seed, step)`` and the data: this rank's slice of the global batch."""
        self._check_window(block_size)
        check_batch_position(step, batch_size, seed=seed, rank=rank, world_size=world_size)
        rng = np.random.default_rng([seed, step])
        starts = rng.integers(0, self.num_tokens - block_size, size=batch_size * world_size)  # (B * world,)
        return self._windows(starts[rank * batch_size:(rank + 1) * batch_size], block_size)

    def eval_batches(
        self, batch_size: int, block_size: int, max_batches: int | None = None
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """Sequential, non-overlapping windows covering the split once (the last batch may be smaller)."""
        self._check_window(block_size)
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        starts = np.arange(self.num_windows(block_size)) * block_size  # (num_windows,)
        for i, first in enumerate(range(0, len(starts), batch_size)):
            if max_batches is not None and i >= max_batches:
                return
            yield self._windows(starts[first:first + batch_size], block_size)
