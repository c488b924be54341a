"""One answerer for every place a checkpoint answers held-out questions: `tinygpt evaluate` (task
accuracy, pass@k, win rates, the report's side-by-side prompts) and, through the same budgets,
SFT's in-training accuracy (:func:`tinygpt.eval.tasks.task_accuracy`).

A checkpoint answers in its own format: a chat model through the one chat template, a base
(pretraining) model with GPT-3-style few-shot demonstrations (:mod:`tinygpt.eval.fewshot`) or, for a
free-form prompt, as a plain-text continuation. Every answer gets its family's budget
(``world.tasks.answer_budget``: whole stories the long one), the budgets rank and PPO sample with; a
free-form prompt has no family, so it gets the long budget and ends where the model ends it.

It knows models, tokenizers and records; it knows no stage.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from tinygpt.eval.fewshot import complete_prompts, fewshot_answers, fewshot_prompts
from tinygpt.eval.tasks import answer
from tinygpt.generate import SamplingConfig, generate
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer
from tinygpt.world.tasks import DEFAULT_LONG_ANSWER_TOKENS, answer_budget


@torch.no_grad()
def continue_text(model: GPT, tokenizer: Tokenizer, prompts: Sequence[str], max_new_tokens: int) -> list[str]:
    """Greedy plain-text continuations (a base model has no chat template); '' where a prompt fills the context."""
    out = []
    for prompt in prompts:
        ids = tokenizer.encode(prompt, add_bos=True)
        room = model.cfg.block_size - len(ids)
        if room < 1:
            out.append("")
            continue
        cfg = SamplingConfig(temperature=0.0, max_new_tokens=min(max_new_tokens, room))
        new = generate(model, [ids], cfg, eos_id=tokenizer.eos_id)[0]
        out.append(tokenizer.decode(new, skip_special=True))
    return out


class Answerer:
    """Greedy answers and sampled completions of one checkpoint, in its own format (``kind`` chat or base)."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, kind: str, train_records: Sequence[dict] = (), *,
                 max_new_tokens: int = 48, long_max_new_tokens: int = DEFAULT_LONG_ANSWER_TOKENS, shots: int = 3,
                 batch_size: int = 16, seed: int = 0):
        if kind not in ("chat", "base"):
            raise ValueError(f"kind must be 'chat' or 'base', got {kind!r}")
        self.model, self.tok, self.kind, self.train = model, tokenizer, kind, list(train_records)
        self.max_new_tokens = max_new_tokens
        self.long_max_new_tokens = long_max_new_tokens or model.cfg.block_size  # 0: as many as the context holds
        self.shots, self.batch_size, self.seed = shots, batch_size, seed

    def budget(self, family: str | None) -> int:
        """Most tokens of an answer to a question of ``family`` (None: a free-form prompt, the long budget)."""
        if family is None:
            return self.long_max_new_tokens
        return answer_budget(family, self.max_new_tokens, self.long_max_new_tokens)

    def _by_family(self, records: list[dict]) -> Iterator[tuple[list[int], int]]:
        """(row indices, answer token budget) per family."""
        by_family: dict[str, list[int]] = defaultdict(list)
        for i, r in enumerate(records):
            by_family[r["family"]].append(i)
        for family, rows in by_family.items():
            yield rows, self.budget(family)

    def greedy(self, records: list[dict]) -> list[str]:
        """One greedy answer per task record ('' where the question does not fit the context)."""
        answers: list[str] = [""] * len(records)
        for rows, max_new in self._by_family(records):
            subset = [records[i] for i in rows]
            if self.kind == "chat":
                got: list[str | None] = list(answer(self.model, self.tok, [r["instruction"] for r in subset],
                                                    max_new, batch_size=self.batch_size))
            else:
                got, _ = fewshot_answers(self.model, self.tok, subset, self.train, self.shots,
                                         max_new_tokens=max_new, batch_size=self.batch_size, seed=self.seed)
            for i, a in zip(rows, got):
                answers[i] = a or ""
        return answers

    def free(self, instructions: Sequence[str]) -> dict[str, Any]:
        """Greedy answers to free-form instructions: ``{"how", "prompts", "answers"}`` (the report's table)."""
        budget = self.budget(None)
        if self.kind == "base":
            return {"how": "base: plain-text continuation", "prompts": list(instructions),
                    "answers": continue_text(self.model, self.tok, instructions, budget)}
        return {"how": "chat template", "prompts": list(instructions),
                "answers": answer(self.model, self.tok, list(instructions), budget, batch_size=self.batch_size)}

    def sampled_answers(self, records: list[dict], n: int, temperature: float) -> list[list[str]]:
        """``n`` sampled answers per record, with the same token budgets as :meth:`greedy` ('' where it does not fit)."""
        answers: list[list[str]] = [[""] * n for _ in records]
        for rows, max_new in self._by_family(records):
            got = self.sample([records[i] for i in rows], n, temperature, max_new)
            for i, outs in zip(rows, got):
                answers[i] = [a or "" for a in outs]
        return answers

    def prompts(self, instructions: list[str], records: list[dict] | None = None) -> list[list[int] | None]:
        """The prompt ids of each question in this checkpoint's format (None where it does not fit)."""
        budget = self.model.cfg.block_size - 1
        if self.kind == "base":
            assert records is not None
            return fewshot_prompts(self.tok, records, self.train, self.shots, budget, self.seed)[0]
        prompts = []
        for text in instructions:
            ids, _ = self.tok.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)
            prompts.append(ids if len(ids) <= budget else None)
        return prompts

    def sample(self, records: list[dict], n: int, temperature: float, max_new_tokens: int) -> list[list[str]]:
        """``n`` sampled completions of each record's question, at most ``max_new_tokens`` each."""
        prompts = self.prompts([r["instruction"] for r in records], records)
        return complete_prompts(self.model, self.tok, prompts, stop="newline" if self.kind == "base" else "end",
                                n=n, temperature=temperature, seed=self.seed, max_new_tokens=max_new_tokens,
                                batch_size=self.batch_size)
