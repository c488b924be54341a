"""Task accuracy: greedy answers to the world's held-out instructions, graded by the world's oracle.

``answer`` renders each instruction through the one chat template (``render_chat`` with
``add_generation_prompt=True``), decodes greedily in batches with :func:`tinygpt.generate.generate`,
and stops at ``<|end|>`` or EOS. ``task_accuracy`` grades with :func:`tinygpt.world.tasks.grade`
(exact match for exact families, consistency x grammar for ``write_story``) and reports the mean
score overall and per family.

Records it accepts (as ``tinygpt world`` writes them, JSONL or `datasets` directories):
  * task records ``{"family", "index", "instruction", "answer", "meta"}`` (``tasks/*_test.jsonl``):
    one single-turn question each;
  * chat records ``{"messages", "family", "index", "meta": {"turns": [...]}}`` (``sft_test.jsonl``):
    every assistant turn is asked with the *gold* history before it and graded with its own
    ``meta["turns"][k]``; it counts under the record's ``family`` (``arithmetic``, ``chat:two_tasks``...).
A prompt longer than the context cannot be asked: its oldest exchanges are dropped as in SFT, and
if even the last question does not fit, the answer is empty (scored 0) and counted in ``too_long``.

It knows nothing about training; it needs a model, a tokenizer and records.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from tinygpt.data.conversations import parse_meta
from tinygpt.data.sources import DataError, iter_records
from tinygpt.generate import SamplingConfig, generate
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer
from tinygpt.world.tasks import DEFAULT_LONG_ANSWER_TOKENS, answer_budget, grade


def _prompt_ids(tokenizer: Tokenizer, messages: list[dict[str, Any]], budget: int) -> list[int] | None:
    """render_chat(add_generation_prompt) fitted into ``budget`` tokens by dropping oldest exchanges
    (leading system messages kept); None if the last user turn alone does not fit."""
    start = 0
    while start < len(messages) and messages[start]["role"] == "system":
        start += 1
    system, rest = messages[:start], list(messages[start:])
    while True:
        ids, _ = tokenizer.render_chat(system + rest, add_generation_prompt=True)
        if len(ids) <= budget:
            return ids
        cut = next((i + 1 for i, m in enumerate(rest) if m["role"] == "assistant"), None)
        if cut is None or cut >= len(rest):
            return None
        rest = rest[cut:]


@torch.no_grad()
def complete(model: GPT, tokenizer: Tokenizer, conversations: Sequence[list[dict[str, Any]]], *,
             max_new_tokens: int | Sequence[int] = 64, batch_size: int = 16) -> list[str | None]:
    """Greedy assistant replies to each conversation (its last message is the user's); None where
    even the last user turn does not fit in the context with room for one new token.

    ``max_new_tokens`` is one budget for all, or one per conversation (``answer_budget`` of its
    family): conversations of one budget are decoded together, shortest prompts first.
    """
    block = model.cfg.block_size
    budgets = ([max_new_tokens] * len(conversations) if isinstance(max_new_tokens, int) else list(max_new_tokens))
    if len(budgets) != len(conversations):
        raise ValueError(f"complete: {len(budgets)} budgets for {len(conversations)} conversations")
    prompts = [_prompt_ids(tokenizer, list(c), block - 1) for c in conversations]
    replies: list[str | None] = [None] * len(prompts)
    for budget in sorted(set(budgets)):
        order = sorted((i for i, p in enumerate(prompts) if p is not None and budgets[i] == budget),
                       key=lambda i: len(prompts[i]))
        for first in range(0, len(order), batch_size):
            rows = order[first:first + batch_size]
            batch = [prompts[i] for i in rows]
            room = block - max(len(p) for p in batch)
            cfg = SamplingConfig(temperature=0.0, max_new_tokens=min(budget, room))
            outputs = generate(model, batch, cfg, eos_id=tokenizer.eos_id, stop_sequences=[[tokenizer.end_id]])
            for i, out in zip(rows, outputs):
                replies[i] = tokenizer.decode(out, skip_special=True)
    return replies


def answer(model: GPT, tokenizer: Tokenizer, instructions: Sequence[str], max_new_tokens: int | Sequence[int] = 64,
           *, system: str | None = None, batch_size: int = 16) -> list[str]:
    """Greedy answers to single-turn instructions ("" where the instruction does not fit the context);
    ``max_new_tokens`` one budget, or one per instruction."""
    head = [{"role": "system", "content": system}] if system else []
    convs = [head + [{"role": "user", "content": text}] for text in instructions]
    return [r if r is not None else "" for r in complete(model, tokenizer, convs, max_new_tokens=max_new_tokens,
                                                          batch_size=batch_size)]


def load_task_records(path: str | Path) -> list[dict[str, Any]]:
    """Task or chat records from a JSONL file or a `datasets` directory (``meta`` parsed if it is a JSON string)."""
    path = Path(path)
    rows = list(iter_records(path))  # JSONL, Parquet or a `datasets` directory
    records = []
    for where, record in rows:
        record = {**record, "meta": parse_meta(record.get("meta"))}
        _questions(record, where)  # validate now, so a bad line fails before any generation
        records.append(record)
    if not records:
        raise DataError(f"{path}: no records")
    return records


def spread_limit(records: list[dict[str, Any]], limit: int) -> list[dict[str, Any]]:
    """At most ``limit`` records (0 = all), taken in turn from each ``family`` so every family is graded.

    Files list one family after another; their first ``limit`` lines would often be a single family.
    Within a family the file order is kept."""
    if limit <= 0 or limit >= len(records):
        return records
    by_family: dict[str, list[dict[str, Any]]] = {}
    for r in records:
        by_family.setdefault(str(r.get("family", "")), []).append(r)
    queues = [iter(group) for group in by_family.values()]
    picked: list[dict[str, Any]] = []
    while len(picked) < limit:
        for q in queues:
            r = next(q, None)
            if r is not None and len(picked) < limit:
                picked.append(r)
    return picked


def _questions(record: dict[str, Any], where: str = "record") -> list[tuple[list[dict[str, Any]], dict[str, Any]]]:
    """(conversation ending with a user turn, grading meta) for each question a record asks."""
    meta = record.get("meta")
    if not isinstance(meta, dict):
        raise DataError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    if "messages" in record:
        messages = record["messages"]
        turns = meta.get("turns")
        answers = [k for k, m in enumerate(messages) if isinstance(m, dict) and m.get("role") == "assistant"]
        if not isinstance(turns, list) or len(turns) != len(answers):
            raise DataError(f"{where}: a chat record needs meta.turns with one grading meta per assistant turn "
                            f"({len(answers)} assistant turns, meta.turns = {turns!r:.80})")
        return [(list(messages[:k]), turn) for k, turn in zip(answers, turns)]
    if "instruction" in record:
        if not isinstance(record["instruction"], str):
            raise DataError(f"{where}: field 'instruction' must be a string")
        return [([{"role": "user", "content": record["instruction"]}], meta)]
    raise DataError(f"{where}: expected a task record (field 'instruction') or a chat record (field 'messages'); "
                    f"fields present: {sorted(record)}")


def task_accuracy(model: GPT, tokenizer: Tokenizer, records: Iterable[dict[str, Any]], *,
                  max_new_tokens: int = 64, long_max_new_tokens: int = DEFAULT_LONG_ANSWER_TOKENS,
                  batch_size: int = 16, keep_examples: int = 3) -> dict[str, Any]:
    """Mean grade overall and per family, with counts and a few (question, prediction, score) examples.

    Each answer gets its family's budget (``world.tasks.answer_budget``: ``long_max_new_tokens`` for a
    story, ``max_new_tokens`` otherwise), as in `tinygpt evaluate`, rank and PPO.
    """
    questions, families = [], []
    for n, record in enumerate(records):
        record = {**record, "meta": parse_meta(record.get("meta"))}
        for conv, meta in _questions(record, f"record {n}"):
            questions.append((conv, meta))
            families.append(str(record.get("family") or meta.get("family")))
    if not questions:
        raise ValueError("task_accuracy: no records to grade")
    budgets = [answer_budget(meta.get("family") or family, max_new_tokens, long_max_new_tokens)
               for (_, meta), family in zip(questions, families)]
    replies = complete(model, tokenizer, [c for c, _ in questions], max_new_tokens=budgets, batch_size=batch_size)
    per_family: dict[str, list[float]] = defaultdict(list)
    examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    too_long = 0
    for (conv, meta), family, reply in zip(questions, families, replies):
        if reply is None:
            too_long += 1
        score = grade(meta, reply) if reply is not None else 0.0
        per_family[family].append(score)
        if len(examples[family]) < keep_examples:
            examples[family].append({"question": conv[-1]["content"], "prediction": reply, "score": score})
    scores = [s for ss in per_family.values() for s in ss]
    return {
        "accuracy": sum(scores) / len(scores),
        "n": len(scores),
        "too_long": too_long,
        "per_family": {f: {"accuracy": sum(s) / len(s), "n": len(s)} for f, s in sorted(per_family.items())},
        "examples": dict(examples),
    }
