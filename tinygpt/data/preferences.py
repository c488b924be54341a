"""Preference data for the reward model and DPO: rankings and pairs, read, rendered and batched by prompt.

Formats (JSONL, one object a line; the TRL conventions):
  * rankings ``{"prompt", "completions": [str, ...], "ranking": [int or [int, ...], ...]}``: ``ranking``
    lists completion indices best first (distinct, at least 2; completions it leaves out are unranked
    and unused); a list inside it holds completions the labeler tied, which make no pair with each
    other: ``[2, [0, 3], 1]``. A person's labels are read the same way. Optional ``"utilities"`` (the oracle's
    noise-free score of each completion, written by ``tinygpt rank``) lets the reward stage report
    the labeler's noise ceiling; other fields (``family``, ``index``, ``meta``) are kept in ``info``.
  * pairs ``{"prompt", "chosen", "rejected"}``: ``chosen`` / ``rejected`` are the response text, or
    TRL's conversational form, a list of messages ending in the assistant's.
  ``prompt`` is a list of chat messages (``{"role", "content"}``) or a plain string (one user message).
  A file may mix both kinds; errors name ``file:line`` and the field (:func:`sources.iter_records`).

Grouping: InstructGPT puts all K-choose-2 pairs of one prompt's ranking into ONE batch element, so
each prompt counts once in the loss and each completion is scored once (K forward passes, not
K(K-1)). A :class:`PreferenceGroup` is that element: one prompt, its distinct completions and its
(chosen, rejected) index pairs. Pairs records are grouped by prompt the same way, so a pairs file
written from rankings trains exactly like the rankings.

Dropped, always counted in :class:`PreferenceStats` (never silently): pairs whose two texts are
identical (they carry no preference and no gradient), completions whose rendered conversation is
longer than ``max_tokens`` (with their pairs), and prompts left without any pair.

Batching: :meth:`PreferenceDataset.batch` gives the batch of micro-step ``s`` as a pure function of
``(seed, s, rank, world_size)`` (a fresh permutation of the prompts each epoch, rank r taking rows
``[r*B, (r+1)*B)`` of the global batch, like ``ChatDataset``), so a run resumes from its step alone.

It knows nothing about models, losses or training loops.
"""

from __future__ import annotations

import itertools
import json
import math
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
class PreferenceGroup:
    """One prompt with its distinct completions and the (chosen, rejected) index pairs among them."""

    where: str                              # file:line of the (first) record
    prompt: list[dict[str, Any]]            # chat messages before the answer
    completions: list[str]                  # distinct response texts
    pairs: list[tuple[int, int]]            # (chosen, rejected) indices into completions
    utilities: list[float] | None = None    # the oracle's noise-free utility per completion, when known
    info: dict[str, Any] = field(default_factory=dict)  # family, index, meta, ... passed through


@dataclass
class PreferenceStats:
    records: int = 0                 # lines read
    rankings: int = 0                # of which rankings
    pair_records: int = 0            # of which pairs
    prompts: int = 0                 # groups kept
    pairs: int = 0                   # pairs kept
    identical_pairs: int = 0         # dropped: chosen text == rejected text
    too_long_completions: int = 0    # dropped: rendered conversation longer than max_tokens
    too_long_pairs: int = 0          # pairs dropped with them
    prompts_without_pairs: int = 0   # dropped: nothing left to compare
    skipped_bad: int = 0             # malformed records skipped with skip_bad=True
    first_skipped: list[str] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {k: (list(v) if isinstance(v, list) else v) for k, v in self.__dict__.items()}

    def _skip(self, message: str) -> None:
        if len(self.first_skipped) < MAX_KEPT_SKIPS:
            self.first_skipped.append(message)


# --- reading ---------------------------------------------------------------------------------------


def parse_prompt(value: Any, where: str) -> list[dict[str, Any]]:
    """A record's ``prompt`` as chat messages: a string becomes one user message."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    if not isinstance(value, list) or not value:
        raise DataError(f"{where}: field 'prompt' must be a string or a non-empty list of chat messages, "
                        f"got {type(value).__name__ if not isinstance(value, list) else 'an empty list'}")
    try:
        validate_messages(value)
    except (TypeError, ValueError) as e:
        raise DataError(f"{where}: field 'prompt': {e}") from None
    return [{"role": m["role"], "content": m["content"]} for m in value]


def parse_response(value: Any, name: str, where: str) -> str:
    """A response as text: a string, or TRL's conversational form (messages ending in the assistant's)."""
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value:
        try:
            validate_messages(value)
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: field {name!r}: {e}") from None
        if value[-1]["role"] == "assistant":
            return value[-1]["content"]
    raise DataError(f"{where}: field {name!r} must be the response text (a string) or a list of messages "
                    f"ending with the assistant's, got {type(value).__name__}")


def ranking_tiers(ranking: Sequence[int | Sequence[int]]) -> list[list[int]]:
    """A best-first ranking as tiers: ``[2, [0, 3], 1]`` -> ``[[2], [0, 3], [1]]`` (a list holds tied completions)."""
    return [[entry] if isinstance(entry, int) else list(entry) for entry in ranking]


def ranking_to_pairs(ranking: Sequence[int | Sequence[int]]) -> list[tuple[int, int]]:
    """Every (chosen, rejected) pair of a best-first ranking, all K-choose-2 of them less the ties.

    ``[2, 0, 1]`` -> (2,0), (2,1), (0,1); ``[2, [0, 1]]`` -> (2,0), (2,1): tied completions make no pair.
    """
    tiers = ranking_tiers(ranking)
    return [(a, b) for i, j in itertools.combinations(range(len(tiers)), 2) for a in tiers[i] for b in tiers[j]]


def _check_ranking(record: dict[str, Any], where: str) -> tuple[list[str], list, list[float] | None]:
    completions = require_field(record, "completions", list, where)
    for i, c in enumerate(completions):
        if not isinstance(c, str):
            raise DataError(f"{where}: field 'completions' item {i} must be a string, got {type(c).__name__}")
    ranking = require_field(record, "ranking", list, where)
    flat = []
    for entry in ranking:
        members = entry if isinstance(entry, list) else [entry]
        if isinstance(entry, list) and len(entry) < 2:
            raise DataError(f"{where}: field 'ranking': a tie must list at least 2 completions, got {entry}")
        for r in members:
            if not isinstance(r, int) or isinstance(r, bool) or not 0 <= r < len(completions):
                raise DataError(f"{where}: field 'ranking' must hold completion indices in [0, {len(completions)}) "
                                f"(or lists of tied ones), got {r!r}")
            flat.append(r)
    if len(flat) < 2:
        raise DataError(f"{where}: field 'ranking' must rank at least 2 completions, got {ranking}")
    if len(set(flat)) != len(flat):
        raise DataError(f"{where}: field 'ranking' repeats an index: {ranking}")
    utilities = record.get("utilities")
    if utilities is not None:
        if (not isinstance(utilities, list) or len(utilities) != len(completions)
                or not all(isinstance(u, (int, float)) and not isinstance(u, bool) for u in utilities)):
            raise DataError(f"{where}: field 'utilities' must be a list of {len(completions)} numbers, one per completion")
        utilities = [float(u) for u in utilities]
    return completions, ranking, utilities


def read_preference_groups(path: str | Path, *, skip_bad: bool = False,
                           stats: PreferenceStats | None = None) -> list[PreferenceGroup]:
    """Every prompt of a rankings and/or pairs JSONL file as a :class:`PreferenceGroup`, in file order."""
    stats = stats if stats is not None else PreferenceStats()
    read = ReadStats()
    groups: dict[str, PreferenceGroup] = {}
    index_of: dict[str, dict[str, int]] = {}  # prompt key -> completion text -> index

    def intern(key: str, text: str, utility: float | None) -> int:
        table, group = index_of[key], groups[key]
        if text not in table:
            table[text] = len(group.completions)
            group.completions.append(text)
            if group.utilities is not None:
                group.utilities.append(utility if utility is not None else math.nan)
        return table[text]

    for where, record in iter_records(path, skip_bad=skip_bad, stats=read):
        stats.records += 1
        try:
            prompt = parse_prompt(require_field(record, "prompt", (str, list), where), where)
            if "ranking" in record:
                completions, ranking, utilities = _check_ranking(record, where)
                texts = [(completions[a], completions[b], utilities and utilities[a], utilities and utilities[b])
                         for a, b in ranking_to_pairs(ranking)]
                stats.rankings += 1
            elif "chosen" in record or "rejected" in record:
                chosen = parse_response(require_field(record, "chosen", (str, list), where), "chosen", where)
                rejected = parse_response(require_field(record, "rejected", (str, list), where), "rejected", where)
                utilities = None
                texts = [(chosen, rejected, None, None)]
                stats.pair_records += 1
            else:
                raise DataError(f"{where}: neither a ranking ({{\"prompt\", \"completions\", \"ranking\"}}) nor a pair "
                                f"({{\"prompt\", \"chosen\", \"rejected\"}}); fields present: {sorted(record)}")
        except DataError as e:
            if not skip_bad:
                raise
            stats.skipped_bad += 1
            stats._skip(str(e))
            continue
        key = json.dumps(prompt, sort_keys=True, ensure_ascii=False)
        if key not in groups:
            info = {k: v for k, v in record.items() if k not in ("prompt", "completions", "ranking", "utilities",
                                                                 "chosen", "rejected")}
            groups[key] = PreferenceGroup(where, prompt, [], [], [] if utilities is not None else None, info)
            index_of[key] = {}
        elif groups[key].utilities is not None and utilities is None:
            groups[key].utilities = None  # mixed knowledge: drop it rather than guess
        for chosen, rejected, u_chosen, u_rejected in texts:
            if chosen == rejected:
                stats.identical_pairs += 1
                continue
            pair = (intern(key, chosen, u_chosen), intern(key, rejected, u_rejected))
            groups[key].pairs.append(pair)
    stats.skipped_bad += read.skipped
    for message in read.first_errors:
        stats._skip(message)
    return list(groups.values())


# --- rendering and batching ------------------------------------------------------------------------


@dataclass
class PreferenceBatch:
    """The completions of B prompts, and the pairs among them.

    ids, mask (N, T) right-padded with pad id / 0 (mask: 1 on the response tokens and its ``<|end|>``,
    from ``render_chat``); lengths (N,); chosen, rejected (P,) row indices into ids; group (P,) the
    prompt (0..B-1) of each pair; utilities (N,) float, NaN where unknown.
    """

    ids: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    chosen: torch.Tensor
    rejected: torch.Tensor
    group: torch.Tensor
    utilities: torch.Tensor

    def to(self, device: torch.device | str) -> "PreferenceBatch":
        return PreferenceBatch(*(t.to(device, non_blocking=True) for t in
                                 (self.ids, self.mask, self.lengths, self.chosen, self.rejected, self.group,
                                  self.utilities)))

    def inputs_targets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(x, y, target mask), each (N, T-1): x = ids[:-1], y = ids[1:], mask of the targets = mask[1:]."""
        return self.ids[:, :-1], self.ids[:, 1:], self.mask[:, 1:]

    @property
    def num_pairs(self) -> int:
        return int(self.chosen.numel())


@dataclass
class _Rendered:
    sequences: list[tuple[list[int], list[int]]]  # (ids, mask) per completion
    pairs: list[tuple[int, int]]
    utilities: list[float] | None


def collate_groups(groups: Sequence[_Rendered], pad_id: int) -> PreferenceBatch:
    rows: list[tuple[list[int], list[int]]] = []
    chosen, rejected, group_of, utilities = [], [], [], []
    for g, rendered in enumerate(groups):
        offset = len(rows)
        rows.extend(rendered.sequences)
        utilities.extend(rendered.utilities if rendered.utilities is not None else [math.nan] * len(rendered.sequences))
        for a, b in rendered.pairs:
            chosen.append(offset + a)
            rejected.append(offset + b)
            group_of.append(g)
    T = max(len(ids) for ids, _ in rows)
    ids = torch.full((len(rows), T), pad_id, dtype=torch.long)  # (N, T)
    mask = torch.zeros((len(rows), T), dtype=torch.long)        # (N, T)
    for row, (seq, seq_mask) in enumerate(rows):
        ids[row, :len(seq)] = torch.as_tensor(seq, dtype=torch.long)
        mask[row, :len(seq)] = torch.as_tensor(seq_mask, dtype=torch.long)
    lengths = torch.tensor([len(seq) for seq, _ in rows], dtype=torch.long)
    as_long = lambda xs: torch.tensor(xs, dtype=torch.long)  # noqa: E731
    return PreferenceBatch(ids, mask, lengths, as_long(chosen), as_long(rejected), as_long(group_of),
                           torch.tensor(utilities, dtype=torch.float32))


class NoPairsError(DataError):
    """A preference file that reads fine but leaves no pair to learn from: every prompt's answers tied,
    identical or too long."""


def held_out_preferences(path: str | Path, tokenizer: Tokenizer, max_tokens: int, *, skip_bad: bool = False,
                         stage: str = "") -> PreferenceDataset | None:
    """The held-out preferences for validation; None (and a warning) when the file has no usable pair.

    A small held-out split can come out with every answer tied (a weak policy's samples often are);
    training then goes on without validation instead of failing. Unreadable data is still an error.
    """
    try:
        return PreferenceDataset(path, tokenizer, max_tokens, skip_bad=skip_bad)
    except NoPairsError as err:
        print(f"{stage + ': ' if stage else ''}warning: no validation, {err}")
        return None


class PreferenceDataset:
    """Preference groups of one file, rendered through the chat template and batched by prompt.

    ``max_tokens``: the longest rendered conversation kept (reward model: block_size, since it reads
    every token; DPO: block_size + 1, since inputs and targets are shifted by one).
    """

    def __init__(self, path: str | Path, tokenizer: Tokenizer, max_tokens: int, *, skip_bad: bool = False):
        if max_tokens < 2:
            raise ValueError(f"max_tokens must be >= 2, got {max_tokens}")
        self.path = Path(path)
        self.pad_id = tokenizer.pad_id
        self.stats = PreferenceStats()
        self.groups: list[PreferenceGroup] = []
        self.rendered: list[_Rendered] = []
        for group in read_preference_groups(self.path, skip_bad=skip_bad, stats=self.stats):
            sequences = [tokenizer.render_chat(group.prompt + [{"role": "assistant", "content": c}])
                         for c in group.completions]
            fits = [len(ids) <= max_tokens for ids, _ in sequences]
            self.stats.too_long_completions += fits.count(False)
            pairs = [(a, b) for a, b in group.pairs if fits[a] and fits[b]]
            self.stats.too_long_pairs += len(group.pairs) - len(pairs)
            if not pairs:
                self.stats.prompts_without_pairs += 1
                self.stats._skip(f"{group.where}: no pair left (identical texts, or longer than {max_tokens} tokens)")
                continue
            used = sorted({i for pair in pairs for i in pair})  # keep only completions some pair uses
            new_index = {old: new for new, old in enumerate(used)}
            utilities = [group.utilities[i] for i in used] if group.utilities is not None else None
            self.groups.append(group)
            self.rendered.append(_Rendered([sequences[i] for i in used],
                                           [(new_index[a], new_index[b]) for a, b in pairs], utilities))
        self.stats.prompts = len(self.rendered)
        self.stats.pairs = sum(len(r.pairs) for r in self.rendered)
        if not self.rendered:
            raise NoPairsError(f"{self.path}: no usable preference pair ({self.stats.as_dict()})")

    def __len__(self) -> int:
        return len(self.rendered)

    def __repr__(self) -> str:
        return f"PreferenceDataset({str(self.path)!r}, prompts={len(self)}, pairs={self.stats.pairs})"

    @property
    def num_pairs(self) -> int:
        return self.stats.pairs

    def indices(self, step: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> list[int]:
        """Prompt indices of this rank's rows of global batch ``step`` (see :func:`epoch_indices`)."""
        return epoch_indices(len(self.rendered), step, batch_size, seed=seed, rank=rank, world_size=world_size)

    def batch(self, step: int, batch_size: int, *, seed: int = 0, rank: int = 0, world_size: int = 1) -> PreferenceBatch:
        """``batch_size`` prompts (all their pairs) for this rank at micro-step ``step``."""
        rows = self.indices(step, batch_size, seed=seed, rank=rank, world_size=world_size)
        return collate_groups([self.rendered[i] for i in rows], self.pad_id)

    def eval_batches(self, batch_size: int, max_batches: int | None = None) -> Iterator[PreferenceBatch]:
        """Every prompt once, in file order (the last batch may be smaller)."""
        for b, first in enumerate(range(0, len(self.rendered), batch_size)):
            if max_batches is not None and b >= max_batches:
                return
            yield collate_groups(self.rendered[first:first + batch_size], self.pad_id)

    def noise_ceiling(self) -> float | None:
        """Accuracy of the labels against the noise-free utility order on these pairs (ties count 1/2).

        This is the accuracy of the best possible reward model (the oracle's utility itself) on
        these noisy labels: what the labeler's noise allows. None if any prompt lacks utilities."""
        if any(r.utilities is None for r in self.rendered):
            return None
        agree = [1.0 if u[a] > u[b] else 0.5 if u[a] == u[b] else 0.0
                 for r in self.rendered for u in [r.utilities] for a, b in r.pairs]
        return sum(agree) / len(agree)
