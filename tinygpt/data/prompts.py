"""Prompt records for sampling stages (`tinygpt rank`, `tinygpt ppo`): read once, the same way for both.

A record is ``{"prompt": [messages] | "text", "meta": {...}, "family": ..., ...}``: the conversation the
policy answers (a string becomes one user turn; it must end with the user's or system's turn), and,
where the record carries one, the task's grading meta (``family`` and ``gold`` or ``spec``), which the
world's labeler grades answers with. A ``meta`` stored as a JSON string (how `datasets` directories
keep nested objects) is parsed; a ``family`` beside ``meta`` is merged into it. Every error names the
file and line (:class:`tinygpt.data.sources.DataError`).

It knows nothing about models or tokenizers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from tinygpt.data.preferences import parse_prompt
from tinygpt.data.sources import DataError, iter_records


@dataclass
class Prompt:
    where: str                      # "file:line"
    messages: list[dict[str, Any]]  # ends with the turn the policy answers
    meta: dict[str, Any] | None     # the grading meta (with "family"), None when the record carries none
    record: dict[str, Any]          # the record as read, every other field kept

    @property
    def family(self) -> str | None:
        return (self.meta or {}).get("family") or self.record.get("family")


def task_meta(record: dict[str, Any], where: str) -> dict[str, Any] | None:
    """The record's grading meta, holding the task's ``family``; None when it has neither ``meta`` nor a family.

    A ``meta`` string must be JSON; a ``meta`` without a family takes the record's ``family``.
    """
    meta = record.get("meta")
    if isinstance(meta, str):
        try:
            meta = json.loads(meta)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field 'meta' is a string but not JSON") from None
    if meta is None:
        return None
    if not isinstance(meta, dict):
        raise DataError(f"{where}: field 'meta' must be an object with the task's 'family' (and 'gold' or "
                        f"'spec'), got {type(meta).__name__}")
    if "family" not in meta and "family" in record:
        meta = {"family": record["family"], **meta}
    return meta if "family" in meta else None


def read_prompts(path: str, limit: int = 0, *, require_meta: bool = False) -> list[Prompt]:
    """Every prompt of a JSONL file, at most ``limit`` (0 = all); with ``require_meta`` a record the
    labeler cannot grade (no meta with a family) is an error naming its line."""
    out = []
    for where, record in iter_records(path):
        if "prompt" not in record:
            raise DataError(f"{where}: missing field 'prompt' (fields present: {sorted(record)})")
        messages = parse_prompt(record["prompt"], where)
        if messages[-1]["role"] == "assistant":
            raise DataError(f"{where}: field 'prompt' ends with an assistant message; it must end with the "
                            "user's turn, the one the policy answers")
        meta = task_meta(record, where)
        if meta is None and require_meta:
            raise DataError(f"{where}: field 'meta' must be an object with the task's 'family' (and 'gold' or "
                            f"'spec'), so the labeler can grade answers; got {type(record.get('meta')).__name__}")
        out.append(Prompt(where, messages, meta, record))
        if limit and len(out) >= limit:
            break
    if not out:
        raise DataError(f"{path}: no prompts")
    return out
