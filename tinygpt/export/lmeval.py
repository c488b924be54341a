"""``tinygpt export lm-eval --world DIR --out TASKS``: the world's held-out Task 1 split as an
lm-evaluation-harness task, so any exported chat model is scored by ``lm_eval`` as by ``tinygpt evaluate``::

    tinygpt export hf runs/demo/ppo --out runs/demo/hf
    tinygpt export lm-eval --world runs/demo/world --out runs/demo/lm_eval_tasks
    lm_eval --model hf --model_args pretrained=runs/demo/hf,dtype=float32 --include_path runs/demo/lm_eval_tasks \\
        --tasks tinygpt_task1 --apply_chat_template --batch_size 16

Writes, under TASKS:

    tinygpt_task1.yaml              the group: item-weighted mean accuracy over the families
    tinygpt_task1_<family>.yaml     one generate_until task per family (its own answer budget)
    tinygpt_task1_utils.py          ``process_results``: the world's oracle grades the answer
                                    (tinygpt.world.tasks.grade, the grader ``tinygpt evaluate`` uses)
    data/<family>_test.jsonl        the test items: instruction, answer, meta (a JSON string)

What makes the numbers agree with ``tinygpt evaluate``'s greedy accuracy for a chat model: the
prompt is the instruction in the model's chat template (``--apply_chat_template`` renders exactly
``render_chat``'s ids), decoding is greedy and stops at ``<|end|>`` or EOS (the exported generation
config), the answer budget per family is evaluate's (``--max-new-tokens`` /
``--long-max-new-tokens`` through ``tasks.answer_budget``), and the grade is the same function.
Where a prompt plus its budget overflow the context, lm-eval cuts the prompt's start (and refuses a
budget as long as the context) while tinygpt shrinks the budget. With ``--checkpoint`` the export
reads the model's context and tokenizer and caps each family's budget at the room its longest prompt
leaves, so neither happens (tinygpt, batching by length, may give shorter prompts a little more room).
The world's test prompts fit the demo's 256-token context with the default budgets. Base models are
scored few-shot by ``tinygpt evaluate``; this task is for chat models.

It reads the world's files and writes text; it needs neither a model nor lm-eval itself.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinygpt.checkpoint import load_config, load_tokenizer
from tinygpt.config import opt
from tinygpt.data.sources import DataError, iter_records
from tinygpt.world.tasks import DEFAULT_LONG_ANSWER_TOKENS, answer_budget

GROUP = "tinygpt_task1"
UTILS = "tinygpt_task1_utils"
STOPS = ["<|end|>", "<|eos|>"]

UTILS_SOURCE = '''"""Written by `tinygpt export lm-eval`: the world's oracle grades each answer (tinygpt.world.tasks.grade)."""

import json

from tinygpt.world.tasks import grade


def process_results(doc, results):
    return {"acc": grade(json.loads(doc["meta"]), results[0])}
'''


@dataclass
class ExportLMEvalConfig:
    world: str = opt("", "world directory written by `tinygpt world make` (its tasks/*_test.jsonl)", required=True)
    out: str = opt("", "directory of task files to write; run with lm_eval --include_path OUT --tasks tinygpt_task1",
                   required=True)
    max_items: int = opt(0, "test items per family (0 = all): the first ones, as `tinygpt evaluate --max-items`")
    max_new_tokens: int = opt(48, "answer budget in tokens (as `tinygpt evaluate --max-new-tokens`)")
    long_max_new_tokens: int = opt(DEFAULT_LONG_ANSWER_TOKENS, "budget of the families whose answers are whole "
                                   "stories (as `tinygpt evaluate --long-max-new-tokens`)")
    checkpoint: str = opt("", "optional: the model to be evaluated; caps each budget at the room its context leaves")
    overwrite: bool = opt(False, "replace an existing output directory")


def _task_yaml(family: str, data_file: Path, max_gen_toks: int) -> str:
    q = json.dumps  # JSON strings are YAML strings
    return "\n".join([
        f"task: {GROUP}_{family}",
        "dataset_path: json",
        "dataset_kwargs:",
        "  data_files:",
        f"    test: {q(str(data_file.resolve()))}",
        "test_split: test",
        "output_type: generate_until",
        'doc_to_text: "{{instruction}}"',
        'doc_to_target: "{{answer}}"',
        f"process_results: !function {UTILS}.process_results",
        "metric_list:",
        "  - metric: acc",
        "    aggregation: mean",
        "    higher_is_better: true",
        "generation_kwargs:",
        f"  until: {q(STOPS)}",
        "  do_sample: false",
        "  temperature: 0.0",
        f"  max_gen_toks: {max_gen_toks}",
        "num_fewshot: 0",
        "metadata:",
        "  version: 1.0",
        "",
    ])


def _group_yaml(families: list[str]) -> str:
    return "\n".join([f"group: {GROUP}", "task:", *[f"  - {GROUP}_{f}" for f in families],
                      "aggregate_metric_list:", "  - metric: acc", "    aggregation: mean", "    weight_by_size: true",
                      "metadata:", "  version: 1.0", ""])


def export_lm_eval(world: str | Path, out: str | Path, *, max_items: int = 0, max_new_tokens: int = 48,
                   long_max_new_tokens: int = DEFAULT_LONG_ANSWER_TOKENS, checkpoint: str | Path | None = None,
                   overwrite: bool = False) -> dict[str, Any]:
    """Write the task directory; returns {family: items}, the budgets, and the paths."""
    world, out = Path(world), Path(out)
    test_files = sorted((world / "tasks").glob("*_test.jsonl"))
    if not test_files:
        raise FileNotFoundError(f"{world / 'tasks'}: no *_test.jsonl; expected a world written by `tinygpt world make`")
    if max_new_tokens < 1 or long_max_new_tokens < 1:
        raise ValueError("answer budgets must be >= 1 token")
    if out.exists():
        if not overwrite:
            raise FileExistsError(f"{out} exists; pass --overwrite to replace it")
        shutil.rmtree(out)
    block, tokenizer = None, None
    if checkpoint:
        block = load_config(checkpoint).block_size
        tokenizer = load_tokenizer(checkpoint)
    (out / "data").mkdir(parents=True)
    counts: dict[str, int] = {}
    budgets: dict[str, int] = {}
    for path in test_files:
        rows = []
        for where, record in iter_records(path):
            missing = [k for k in ("family", "instruction", "answer", "meta") if k not in record]
            if missing:
                raise DataError(f"{where}: task record without {missing} (expected family, index, instruction, answer, meta)")
            rows.append({"family": record["family"], "index": record.get("index"), "instruction": record["instruction"],
                         "answer": record["answer"], "meta": json.dumps(record["meta"], ensure_ascii=False)})
        rows = rows[:max_items] if max_items > 0 else rows
        if not rows:
            raise DataError(f"{path}: no task records")
        family = rows[0]["family"]
        data_file = out / "data" / f"{family}_test.jsonl"
        data_file.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
        budget = answer_budget(family, max_new_tokens, long_max_new_tokens)
        if block is not None:  # the room the longest prompt of the family leaves in the context
            longest = max(len(tokenizer.render_chat([{"role": "user", "content": r["instruction"]}],
                                                    add_generation_prompt=True)[0]) for r in rows)
            budget = max(1, min(budget, block - longest))
        budgets[family] = budget
        (out / f"{GROUP}_{family}.yaml").write_text(_task_yaml(family, data_file, budget))
        counts[family] = len(rows)
    (out / f"{GROUP}.yaml").write_text(_group_yaml(sorted(counts)))
    (out / f"{UTILS}.py").write_text(UTILS_SOURCE)
    return {"out": str(out), "group": GROUP, "families": counts, "items": sum(counts.values()), "budgets": budgets}


def main(cfg: ExportLMEvalConfig) -> dict[str, Any]:
    if not cfg.world or not cfg.out:
        raise ValueError("give --world and --out: tinygpt export lm-eval --world runs/demo/world --out runs/demo/lm_eval_tasks")
    summary = export_lm_eval(cfg.world, cfg.out, max_items=cfg.max_items, max_new_tokens=cfg.max_new_tokens,
                             long_max_new_tokens=cfg.long_max_new_tokens, checkpoint=cfg.checkpoint or None,
                             overwrite=cfg.overwrite)
    print(f"wrote lm-eval group {GROUP} ({summary['items']} items in {len(summary['families'])} families) to {cfg.out}; "
          f"answer budgets {summary['budgets']}")
    print(f"  run it: lm_eval --model hf --model_args pretrained=HF_DIR,dtype=float32 --include_path {cfg.out} "
          f"--tasks {GROUP} --apply_chat_template --batch_size 16")
    return summary
