"""Chat datasets for SFT: read ``{"messages": [...]}`` records, render them, fit them to the context, batch them.

Reading: a JSONL or Parquet file (through :func:`sources.iter_records`, so errors say ``file:line``) or a
directory written by ``datasets`` ``save_to_disk`` with a ``messages`` column (errors say
``dir: row N``). Every conversation must validate (roles system/user/assistant, string contents)
and hold at least one assistant message (otherwise there is nothing to learn from it).

Rendering: :meth:`tinygpt.tokenizer.Tokenizer.render_chat`, the one template, gives ``(ids, mask)``
with mask 1 on assistant content and its ``<|end|>``.

Truncation policy, for a conversation longer than ``max_tokens`` (= block_size + 1: a sequence of
block_size + 1 tokens gives block_size inputs and block_size targets):
  1. messages after the last assistant message are dropped (they train nothing);
  2. whole exchanges (the user/other messages up to and including an assistant message) are dropped
     oldest first, while more than one exchange is left; leading system messages are always kept;
  3. if the system prompt plus the last exchange is still too long, the rendered sequence is cut
     from the right at ``max_tokens`` (the tail of the answer is lost), and counted as ``truncated``;
  4. if that cut leaves no assistant token to train on, the conversation is skipped and counted as
     ``skipped_no_target`` (with its location in ``first_skipped``): never dropped silently.
Dropped messages are counted in ``dropped_messages`` and conversations that lost any in ``shortened``.

Batching: each batch is padded on the right to its longest sequence (not packed). Padding keeps
one conversation per row, so attention never crosses conversations and the loss mask is simply
the conversation's own; the cost is compute spent on pad positions (reported as ``pad_fraction``).
Right padding needs no attention mask: a causal model never looks right, so real positions see
only real tokens, and pad positions have target mask 0. Inputs are ``ids[:-1]``, targets
``ids[1:]``, target mask ``mask[1:]`` (the target at t is ids[t+1], trained iff mask[t+1] = 1).
The batch at micro-step ``s`` is a pure function of ``(seed, s, rank, world_size)``: examples are
visited in a fresh permutation per epoch, and rank r takes rows ``[r*B, (r+1)*B)`` of the global
batch, as :meth:`tinygpt.data.shards.TokenDataset.batch` does; resuming needs only the step.

It knows nothing about models, losses or training loops.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from tinygpt.data.sources import DataError, ReadStats, iter_records, require_field
from tinygpt.tokenizer import Tokenizer, validate_messages
from tinygpt.data.sampling import epoch_indices

MAX_KEPT_SKIPS = 20


@dataclass
class ChatStats:
    """What reading and fitting a chat file did: nothing is changed without being counted here."""

    conversations: int = 0          # records read
    examples: int = 0               # kept for training
    shortened: int = 0              # conversations that lost whole messages at the front (or after the last answer)
    dropped_messages: int = 0       # messages removed by rules 1 and 2
    truncated: int = 0              # conversations cut from the right (rule 3)
    skipped_no_target: int = 0      # conversations left without an assistant token (rule 4)
    tokens: int = 0                 # tokens of the kept sequences
    target_tokens: int = 0          # of which trained on (mask 1, after the shift)
    skipped_bad: int = 0            # malformed records skipped with skip_bad=True
    first_skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}


# --- reading ---------------------------------------------------------------------------------------


def _check_conversation(record: Any, where: str) -> list[dict[str, Any]]:
    if not isinstance(record, dict):
        raise DataError(f"{where}: expected an object with field 'messages', got {type(record).__name__}")
    messages = require_field(record, "messages", (list, tuple), where)
    try:
        validate_messages(messages)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: field 'messages': {e}") from None
    if not any(m["role"] == "assistant" for m in messages):
        raise DataError(f"{where}: field 'messages' has no assistant message, so nothing to train on")
    return [{"role": m["role"], "content": m["content"]} for m in messages]


def iter_conversations(path: str | Path, *, skip_bad: bool = False,
                       stats: ChatStats | None = None) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Yield ``(where, messages)`` from a JSONL or Parquet file or a `datasets` directory with a ``messages``
    field or column (:func:`sources.iter_records`)."""
    path = Path(path)
    stats = stats if stats is not None else ChatStats()
    read = ReadStats()
    source = iter_records(path, skip_bad=skip_bad, stats=read)  # JSONL, Parquet or a `datasets` directory
    for where, record in source:
        stats.conversations += 1
        try:
            yield where, _check_conversation(record, where)
        except DataError as e:
            if not skip_bad:
                raise
            stats.skipped_bad += 1
            if len(stats.first_skipped) < MAX_KEPT_SKIPS:
                stats.first_skipped.append(str(e))
    if read.skipped:  # lines iter_records skipped (invalid JSON / UTF-8, not an object)
        stats.skipped_bad += read.skipped
        stats.first_skipped += read.first_errors[:max(0, MAX_KEPT_SKIPS - len(stats.first_skipped))]


# --- fitting one conversation into the context -------------------------------------------------------


@dataclass
class Fitted:
    ids: list[int]
    mask: list[int]
    dropped_messages: int = 0
    truncated: bool = False

    @property
    def has_target(self) -> bool:
        return any(self.mask[1:])  # the first token is never a target


def _exchanges(messages: list[dict[str, Any]]) -> tuple[list[dict], list[list[dict]], list[dict]]:
    """Split into (leading system messages, exchanges each ending in an assistant message, trailing rest)."""
    start = 0
    while start < len(messages) and messages[start]["role"] == "system":
        start += 1
    system, groups, current = messages[:start], [], []
    for m in messages[start:]:
        current.append(m)
        if m["role"] == "assistant":
            groups.append(current)
            current = []
    return system, groups, current


def fit_conversation(tokenizer: Tokenizer, messages: list[dict[str, Any]], max_tokens: int) -> Fitted:
    """Render ``messages`` into at most ``max_tokens`` tokens by the policy in the module docstring."""
    if max_tokens < 2:
        raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
    ids, mask = tokenizer.render_chat(messages)
    if len(ids) <= max_tokens:
        return Fitted(ids, mask)
    system, groups, trailing = _exchanges(messages)
    dropped = len(trailing)
    while True:
        kept = system + [m for g in groups for m in g]
        ids, mask = tokenizer.render_chat(kept)
        if len(ids) <= max_tokens or len(groups) <= 1:
            break
        dropped += len(groups[0])
        groups = groups[1:]
    truncated = len(ids) > max_tokens
    return Fitted(ids[:max_tokens], mask[:max_tokens], dropped_messages=dropped, truncated=truncated)


# --- the dataset -------------------------------------------------------------------------------------


def collate(examples: Sequence[tuple[Sequence[int], Sequence[int]]],
            pad_id: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Rendered ``(ids, mask)`` pairs -> inputs x (B, T), targets y (B, T), target mask m (B, T), T = longest - 1.

    x[b, t] = ids[t], y[b, t] = ids[t + 1], m[b, t] = mask[t + 1]; right padding has y = pad_id, m = 0."""
    if not examples:
        raise ValueError("collate: empty batch")
    T = max(len(ids) for ids, _ in examples) - 1
    if T < 1:
        raise ValueError("collate: every sequence needs at least 2 tokens")
    x = torch.full((len(examples), T), pad_id, dtype=torch.long)
    y = torch.full((len(examples), T), pad_id, dtype=torch.long)
    m = torch.zeros((len(examples), T), dtype=torch.long)
    for row, (ids, mask) in enumerate(examples):
        n = len(ids) - 1
        seq = torch.as_tensor(ids, dtype=torch.long)
        x[row, :n] = seq[:-1]
        y[row, :n] = seq[1:]
        m[row, :n] = torch.as_tensor(mask[1:], dtype=torch.long)
    return x, y, m


class ChatDataset:
    """Rendered, fitted conversations of one file, batched by :meth:`batch` (random) or :meth:`eval_batches`."""

    def __init__(self, path: str | Path, tokenizer: Tokenizer, max_tokens: int, *, skip_bad: bool = False):
        self.path = Path(path)
        self.pad_id = tokenizer.pad_id
        self.stats = ChatStats()
        self.examples: list[tuple[list[int], list[int]]] = []
        for where, messages in iter_conversations(self.path, skip_bad=skip_bad, stats=self.stats):
            fitted = fit_conversation(tokenizer, messages, max_tokens)
            if fitted.dropped_messages:
                self.stats.shortened += 1
                self.stats.dropped_messages += fitted.dropped_messages
            if fitted.truncated:
                self.stats.truncated += 1
            if not fitted.has_target:
                self.stats.skipped_no_target += 1
                if len(self.stats.first_skipped) < MAX_KEPT_SKIPS:
                    self.stats.first_skipped.append(
                        f"{where}: system prompt and last user turn fill the {max_tokens}-token context; "
                        "no assistant token left")
                continue
            self.examples.append((fitted.ids, fitted.mask))
            self.stats.tokens += len(fitted.ids)
            self.stats.target_tokens += sum(fitted.mask[1:])
        self.stats.examples = len(self.examples)
        if not self.examples:
            raise DataError(f"{self.path}: no usable conversation ({self.stats.as_dict()})")

    def __len__(self) -> int:
        return len(self.examples)

    def __repr__(self) -> str:
        return f"ChatDataset({str(self.path)!r}, examples={len(self)}, tokens={self.stats.tokens})"

    def indices(self, step: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> list[int]:
        """Example indices of this rank's rows of global batch ``step`` (see :func:`epoch_indices`)."""
        return epoch_indices(len(self.examples), step, batch_size, seed=seed, rank=rank, world_size=world_size)

    def batch(self, step: int, batch_size: int, *, seed: int = 0, rank: int = 0,
              world_size: int = 1) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, target mask) for this rank at micro-step ``step``; see :func:`collate`."""
        rows = self.indices(step, batch_size, seed=seed, rank=rank, world_size=world_size)
        return collate([self.examples[i] for i in rows], self.pad_id)

    def target_count(self, step: int, batch_size: int, *, seed: int = 0, world_size: int = 1) -> int:
        """Trained-on tokens in the whole global batch ``step`` (all ranks): SFT normalises the loss by it."""
        total = 0
        for rank in range(world_size):
            for i in self.indices(step, batch_size, seed=seed, rank=rank, world_size=world_size):
                total += sum(self.examples[i][1][1:])
        return total

    def eval_batches(self, batch_size: int,
                     max_batches: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """Every example once, in file order (the last batch may be smaller)."""
        for b, first in enumerate(range(0, len(self.examples), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield collate(self.examples[first:first + batch_size], self.pad_id)

    def pad_fraction(self, batch_size: int, steps: int = 50, seed: int = 0) -> float:
        """Share of input positions that are padding in the first ``steps`` batches (the cost of padding)."""
        pad = total = 0
        for s in range(steps):
            rows = self.indices(s, batch_size, seed=seed)
            lengths = [len(self.examples[i][0]) - 1 for i in rows]
            total += max(lengths) * len(lengths)
            pad += max(lengths) * len(lengths) - sum(lengths)
        return pad / max(total, 1)


def parse_meta(value: Any) -> Any:
    """A record's ``meta`` as a dict: `datasets` directories written by tinygpt store it as a JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    return value
