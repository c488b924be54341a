"""``tinygpt export data --world DIR [--rank DIR] --out DIR``: the world's and the ranker's files in TRL's
conversational schemas, the formats the next tools (TRL, OpenRLHF, verl) read::

    sft_train.jsonl, sft_test.jsonl          {"messages": [{"role", "content"}, ...]}            (SFT)
    prompts.jsonl                            {"prompt": [messages, ending with the user's]}         (PPO, GRPO, RLOO)
    preferences.jsonl, preferences_val.jsonl {"prompt": [messages],
                                              "chosen": [{"role": "assistant", "content"}],
                                              "rejected": [{"role": "assistant", "content"}]}     (reward model, DPO)

tinygpt's own files carry more (family, index, the oracle's meta) and ``tinygpt rank`` writes the
answers of a pair as plain strings after a conversational prompt, a mix TRL does not accept (its
``apply_chat_template`` needs ``chosen``/``rejected`` as messages when ``prompt`` is messages). Here
every record keeps only the schema's fields. Each record is checked (roles, contents) and an error
names the file and line. ``datasets.load_dataset("json", data_files=...)`` reads every file.

It reads files written by ``tinygpt world make`` and ``tinygpt rank`` (or yours in their formats),
and knows nothing about models.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from tinygpt.config import opt
from tinygpt.data.preferences import parse_prompt, parse_response
from tinygpt.data.sources import DataError, iter_records
from tinygpt.tokenizer import validate_messages


@dataclass
class ExportDataConfig:
    world: str = opt("", "world directory written by `tinygpt world make` (sft_train/sft_test/rl_prompts.jsonl)",
                     required=True)
    rank: str = opt("", "directory written by `tinygpt rank` (pairs.jsonl, pairs_val.jsonl); empty: no preferences")
    out: str = opt("", "output directory for the TRL-schema JSONL files", required=True)
    overwrite: bool = opt(False, "replace files that exist in the output directory")


def _write(path: Path, records: Iterable[dict], overwrite: bool) -> int:
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; pass --overwrite to replace it")
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    n = 0
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")
                n += 1
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return n


def chat_records(path: Path) -> Iterable[dict]:
    for where, record in iter_records(path):
        if "messages" not in record:
            raise DataError(f"{where}: no field 'messages' (a chat record: {{\"messages\": [{{\"role\", \"content\"}}]}})")
        try:
            validate_messages(record["messages"])
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: field 'messages': {e}") from None
        yield {"messages": [{"role": m["role"], "content": m["content"]} for m in record["messages"]]}


def prompt_records(path: Path) -> Iterable[dict]:
    for where, record in iter_records(path):
        if "prompt" not in record:
            raise DataError(f"{where}: no field 'prompt'")
        prompt = parse_prompt(record["prompt"], where)
        if prompt[-1]["role"] != "user":
            raise DataError(f"{where}: field 'prompt' must end with the user's message, ends with {prompt[-1]['role']!r}")
        yield {"prompt": prompt}


def preference_records(path: Path) -> Iterable[dict]:
    for where, record in iter_records(path):
        missing = [k for k in ("prompt", "chosen", "rejected") if k not in record]
        if missing:
            raise DataError(f"{where}: missing field(s) {missing} (a pair: prompt, chosen, rejected)")
        yield {"prompt": parse_prompt(record["prompt"], where),
               "chosen": [{"role": "assistant", "content": parse_response(record["chosen"], "chosen", where)}],
               "rejected": [{"role": "assistant", "content": parse_response(record["rejected"], "rejected", where)}]}


def export_data(world: str | Path, out: str | Path, *, rank: str | Path | None = None,
                overwrite: bool = False) -> dict[str, int]:
    """Write the TRL-schema files; returns {file name: records}."""
    world, out = Path(world), Path(out)
    jobs: list[tuple[str, Path, Any]] = [("sft_train.jsonl", world / "sft_train.jsonl", chat_records),
                                         ("sft_test.jsonl", world / "sft_test.jsonl", chat_records),
                                         ("prompts.jsonl", world / "rl_prompts.jsonl", prompt_records)]
    if rank:
        rank = Path(rank)
        jobs += [("preferences.jsonl", rank / "pairs.jsonl", preference_records),
                 ("preferences_val.jsonl", rank / "pairs_val.jsonl", preference_records)]
    missing = [str(src) for _, src, _ in jobs if not src.is_file()]
    if missing:
        raise FileNotFoundError(f"missing input file(s): {', '.join(missing)} (written by `tinygpt world make`"
                                f"{' and `tinygpt rank`' if rank else ''})")
    out.mkdir(parents=True, exist_ok=True)
    return {name: _write(out / name, convert(src), overwrite) for name, src, convert in jobs}


def main(cfg: ExportDataConfig) -> dict[str, int]:
    if not cfg.world or not cfg.out:
        raise ValueError("give --world and --out: tinygpt export data --world runs/demo/world --rank runs/demo/rank "
                         "--out runs/demo/trl_data")
    counts = export_data(cfg.world, cfg.out, rank=cfg.rank or None, overwrite=cfg.overwrite)
    for name, n in counts.items():
        print(f"wrote {Path(cfg.out) / name}: {n} records")
    print("  load them: datasets.load_dataset('json', data_files=...) ; TRL's SFT/DPO/RewardTrainer/GRPO read these schemas")
    return counts
