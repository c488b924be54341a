"""Few-shot prompting of a base (pretrained, not chat) model on the world's task families, as in GPT-3.

A base model has never seen the chat template, so it is asked in plain text (Brown et al. 2020,
https://arxiv.org/abs/2005.14165, section 2): ``k`` demonstrations of the same family drawn from the
TRAIN split, then the test question, and the model's greedy continuation up to the first newline
(or EOS) is its answer::

    Q: What is 3 plus 4?
    A: 7

    Q: What is 8 plus 31?
    A:

With ``k = 0`` only the question is shown (zero-shot). When the prompt does not fit in the context,
demonstrations are dropped (the first ones first) until it does, as GPT-3 used "as many as fit";
how many were used is reported. A question that does not fit even alone gets the empty answer
(scored 0) and is counted in ``too_long``. Grading is :func:`tinygpt.world.tasks.grade`.

:func:`complete_prompts` (batched generation of ``n`` completions per prompt, cut at a newline or at
the chat end token) is shared with the evaluate stage for chat prompts and pass@k samples.

It knows nothing about checkpoints or stages: a model, a tokenizer and task records in.
"""

from __future__ import annotations

import random
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import torch

from tinygpt.generate import SamplingConfig, generate
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer
from tinygpt.world.tasks import ANSWER, QUESTION, grade, qa_block



def fewshot_text(instruction: str, demonstrations: Sequence[tuple[str, str]]) -> str:
    """The prompt text: demonstrations separated by blank lines, then the question and ``A:``."""
    blocks = [qa_block(q, a) for q, a in demonstrations]  # the format of the world's Q&A pages
    return "\n\n".join(blocks + [f"{QUESTION}{instruction}\n{ANSWER}"])


def fewshot_prompt_ids(tokenizer: Tokenizer, instruction: str, demonstrations: Sequence[tuple[str, str]],
                       budget: int) -> tuple[list[int] | None, int]:
    """(BOS + prompt ids within ``budget`` tokens, demonstrations used); None if the question alone does not fit."""
    demos = list(demonstrations)
    while True:
        ids = tokenizer.encode(fewshot_text(instruction, demos), add_bos=True)
        if len(ids) <= budget:
            return ids, len(demos)
        if not demos:
            return None, 0
        demos = demos[1:]


def pick_demonstrations(train_records: Sequence[dict[str, Any]], shots: int, rng: random.Random,
                        exclude: str | None = None) -> list[tuple[str, str]]:
    """``shots`` (instruction, answer) pairs drawn without replacement, never the excluded instruction."""
    pool = [r for r in train_records if r["instruction"] != exclude]
    if shots > len(pool):
        raise ValueError(f"{shots}-shot prompting needs {shots} train records, only {len(pool)} available")
    return [(r["instruction"], r["answer"]) for r in rng.sample(pool, shots)]


@torch.no_grad()
def complete_prompts(model: GPT, tokenizer: Tokenizer, prompts: Sequence[list[int] | None], *, stop: str,
                     n: int = 1, temperature: float = 0.0, seed: int = 0, max_new_tokens: int = 64,
                     batch_size: int = 16) -> list[list[str]]:
    """``n`` completions of each prompt (ids); ``stop="newline"`` cuts at the first newline (base models),
    ``stop="end"`` stops at the chat end token (chat models); both stop at EOS. A None prompt (too long)
    gets ``n`` empty completions. Prompts are batched by length; sampling is seeded per batch."""
    if stop not in ("newline", "end"):
        raise ValueError(f"stop must be 'newline' or 'end', got {stop!r}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    block = model.cfg.block_size
    out: list[list[str]] = [[""] * n for _ in prompts]
    jobs = sorted(((i, s) for i, p in enumerate(prompts) if p is not None for s in range(n)),
                  key=lambda job: len(prompts[job[0]]))  # type: ignore[arg-type]

    def newline_seen(new_ids: list[int]) -> bool:
        return "\n" in tokenizer.decode(new_ids[-4:])

    for first in range(0, len(jobs), batch_size):
        batch = jobs[first:first + batch_size]
        ids = [prompts[i] for i, _ in batch]
        room = block - max(len(p) for p in ids)  # type: ignore[arg-type]
        if room < 1:
            continue  # callers fit prompts to block_size - 1; nothing can be generated here
        cfg = SamplingConfig(temperature=temperature, max_new_tokens=min(max_new_tokens, room),
                             seed=seed + first if temperature > 0 else None)
        if stop == "newline":
            new = generate(model, ids, cfg, eos_id=tokenizer.eos_id, should_stop=newline_seen)  # type: ignore[arg-type]
        else:
            new = generate(model, ids, cfg, eos_id=tokenizer.eos_id, stop_sequences=[[tokenizer.end_id]])  # type: ignore[arg-type]
        for (i, s), tokens in zip(batch, new):
            text = tokenizer.decode(tokens, skip_special=True)
            out[i][s] = (text.split("\n", 1)[0] if stop == "newline" else text).strip()
    return out


def fewshot_prompts(tokenizer: Tokenizer, test_records: Sequence[dict[str, Any]],
                    train_records: Sequence[dict[str, Any]], shots: int, budget: int,
                    seed: int = 0) -> tuple[list[list[int] | None], list[int]]:
    """The prompt ids of each test record (demonstrations from its own family) and the shots each used."""
    if shots < 0:
        raise ValueError(f"shots must be >= 0, got {shots}")
    by_family: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in train_records:
        by_family[r["family"]].append(r)
    prompts, used = [], []
    for r in test_records:
        rng = random.Random(f"fewshot|{seed}|{r['family']}|{r.get('index')}")
        demos = pick_demonstrations(by_family[r["family"]], shots, rng, exclude=r["instruction"]) if shots else []
        ids, k = fewshot_prompt_ids(tokenizer, r["instruction"], demos, budget)
        prompts.append(ids)
        used.append(k)
    return prompts, used


def fewshot_answers(model: GPT, tokenizer: Tokenizer, test_records: Sequence[dict[str, Any]],
                    train_records: Sequence[dict[str, Any]], shots: int, *, max_new_tokens: int = 64,
                    batch_size: int = 16, seed: int = 0) -> tuple[list[str | None], list[int]]:
    """Greedy few-shot answers (None where the question does not fit) and the shots each prompt used."""
    prompts, used = fewshot_prompts(tokenizer, test_records, train_records, shots, model.cfg.block_size - 1, seed)
    completions = complete_prompts(model, tokenizer, prompts, stop="newline", max_new_tokens=max_new_tokens,
                                   batch_size=batch_size)
    return [c[0] if p is not None else None for p, c in zip(prompts, completions)], used


def fewshot_accuracy(model: GPT, tokenizer: Tokenizer, test_records: Sequence[dict[str, Any]],
                     train_records: Sequence[dict[str, Any]], shots: int, *, max_new_tokens: int = 64,
                     batch_size: int = 16, seed: int = 0, keep_examples: int = 3) -> dict[str, Any]:
    """Mean grade overall and per family (with the mean shots that fitted), as ``task_accuracy`` reports it."""
    test_records = list(test_records)
    if not test_records:
        raise ValueError("fewshot_accuracy: no test records")
    answers, used = fewshot_answers(model, tokenizer, test_records, train_records, shots,
                                    max_new_tokens=max_new_tokens, batch_size=batch_size, seed=seed)
    per_family: dict[str, list[float]] = defaultdict(list)
    shots_used: dict[str, list[int]] = defaultdict(list)
    examples: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for record, reply, k in zip(test_records, answers, used):
        family = record["family"]
        score = grade(record, reply) if reply is not None else 0.0
        per_family[family].append(score)
        shots_used[family].append(k)
        if len(examples[family]) < keep_examples:
            examples[family].append({"question": record["instruction"], "prediction": reply, "score": score})
    scores = [s for ss in per_family.values() for s in ss]
    return {
        "accuracy": sum(scores) / len(scores), "n": len(scores), "shots": shots,
        "too_long": sum(a is None for a in answers),
        "per_family": {f: {"accuracy": sum(s) / len(s), "n": len(s),
                           "mean_shots": sum(shots_used[f]) / len(shots_used[f])}
                       for f, s in sorted(per_family.items())},
        "examples": dict(examples),
    }
