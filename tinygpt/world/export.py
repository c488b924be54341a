"""Write the synthetic world to disk: pretraining stories, task splits, SFT chats and RL prompts.

``export_world(out, ...)`` writes, deterministically for a seed (two runs give the same bytes):

    pretrain.jsonl                {"text"}: stories, and with ``n_qa_pages`` question-and-answer pages
                                  (train items only, some answers wrong, some rude: the web's Q&A)
    sft_train.jsonl, sft_test.jsonl
                                  {"messages", "family", "index", "meta"}: chats from train / test indices
    rl_prompts.jsonl              {"prompt": [messages without the answer], "family", "index", "meta"}
    tasks/{family}_train.jsonl, tasks/{family}_test.jsonl
                                  {"family", "index", "instruction", "answer", "meta"}
    datasets/<same names>/        each file again as a Hugging Face ``datasets`` directory (``save_to_disk``);
                                  there ``meta`` is a JSON string, because families' metas differ in shape
    world.json                    seed, split, counts, sizes, grammar size, dedupe drops, rude share

No test item reaches a training file: training records come from train indices only, and any
training record that contains a test instruction or a test story (normalized text) is dropped and
counted in ``world.json["dedupe_dropped"]``.

This module knows nothing about tokenizers or models, nor about the command line (see
:mod:`tinygpt.stages.world`).
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
from pathlib import Path
from typing import Any, Iterable, Iterator, Sequence

from tqdm import tqdm

from tinygpt.world import lexicon, oracle
from tinygpt.world.split import Split, drop_test_overlap, normalize_instruction
from tinygpt.world.stories import generate_story, grammar_size
from tinygpt.world.tasks import FAMILIES, TaskItem, make_chat, qa_block, wrong_answer

FORMATS = ("jsonl", "datasets")

# ------------------------------------------------------------------------------------------------
# writing files
# ------------------------------------------------------------------------------------------------


def _dumps(record: dict) -> str:
    return json.dumps(record, ensure_ascii=False, separators=(",", ":"))


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Write one JSON object a line, atomically (temporary name, then rename). Returns the count."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    n = 0
    with open(tmp, "w", encoding="utf-8") as f:
        for record in records:
            f.write(_dumps(record) + "\n")
            n += 1
    os.replace(tmp, path)
    return n


def write_datasets_dir(path: Path, records: list[dict]) -> None:
    """Save records with ``datasets`` ``save_to_disk``, fields as in the JSONL except ``meta``, which
    becomes a JSON string. The fingerprint is a hash of the content, so two runs write the same bytes."""
    import pyarrow as pa
    from datasets import Dataset
    from datasets.table import InMemoryTable
    from datasets.utils import logging as datasets_logging

    rows = [{k: (_dumps(v) if k == "meta" else v) for k, v in r.items()} for r in records]
    digest = hashlib.sha256("\n".join(_dumps(r) for r in rows).encode()).hexdigest()[:16]
    if not rows:
        raise ValueError(f"{path}: no records (`datasets` cannot load a directory of zero rows back)")
    table = pa.Table.from_pylist(rows)
    dataset = Dataset(InMemoryTable(table), fingerprint=digest)
    tmp = path.with_name(path.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    path.parent.mkdir(parents=True, exist_ok=True)
    bars_were_on = datasets_logging.is_progress_bar_enabled()
    datasets_logging.disable_progress_bar()  # one bar per small file is noise; the corpus has its own
    try:
        dataset.save_to_disk(str(tmp))
    finally:
        if bars_were_on:
            datasets_logging.enable_progress_bar()
    if path.exists():
        shutil.rmtree(path)
    os.replace(tmp, path)

# ------------------------------------------------------------------------------------------------
# what counts as leaking a test item
# ------------------------------------------------------------------------------------------------


def _story_texts(meta: Any) -> Iterator[str]:
    """Every story text embedded in a (nested) meta: ``{"story": {"text": ...}}`` anywhere."""
    if isinstance(meta, dict):
        story = meta.get("story")
        if isinstance(story, dict) and isinstance(story.get("text"), str):
            yield story["text"]
        for value in meta.values():
            yield from _story_texts(value)
    elif isinstance(meta, list):
        for value in meta:
            yield from _story_texts(value)


def record_texts(record: dict) -> list[str]:
    """The texts of any written record that must never equal a test instruction or test story."""
    texts = []
    for key in ("text", "instruction", "answer"):
        if isinstance(record.get(key), str):
            texts.append(record[key])
    for key in ("messages", "prompt"):
        for message in record.get(key) or []:
            texts.append(message["content"])
    texts.extend(_story_texts(record.get("meta")))
    return texts


def protected_texts(test_items: Iterable[TaskItem]) -> set[str]:
    """Normalized test instructions and test stories (embedded in instructions or given as answers), except
    the generic requests any item may share (``TaskFamily.GENERIC_INSTRUCTIONS``)."""
    keys = set()
    generic = {normalize_instruction(t) for family in FAMILIES.values() for t in family.GENERIC_INSTRUCTIONS}
    for item in test_items:
        keys.add(normalize_instruction(item.instruction))
        keys.update(normalize_instruction(t) for t in _story_texts(item.meta))
    keys -= generic  # "Tell me a story." is asked in train and test alike; its answers differ
    keys.discard("")
    return keys


def record_indices(record: dict) -> list[int]:
    """The task item indices a record was built from (a chat can use several items)."""
    meta = record.get("meta") or {}
    if isinstance(meta, dict) and isinstance(meta.get("items"), list):
        return [int(x["index"]) for x in meta["items"]]
    return [int(record["index"])] if "index" in record else []

# ------------------------------------------------------------------------------------------------
# building the world
# ------------------------------------------------------------------------------------------------


def _round_robin(pairs: Sequence[tuple[str, int]], n: int, rng: random.Random) -> list[tuple[str, int]]:
    """``n`` (family, index) pairs: every pair once in a shuffled order, then again, and so on."""
    out: list[tuple[str, int]] = []
    while len(out) < n:
        order = list(pairs)
        rng.shuffle(order)
        out.extend(order[: n - len(out)])
    return out


def _demonstrator_flaw(chats: list[dict], share: float, rng: random.Random, remarks: Sequence[str],
                      flag: str) -> int:
    """A demonstrator who wrote ``share`` of the chats ends one answer of each with one of ``remarks``
    (marked ``meta[flag]``); returns how many chats that made. The chats are changed in place."""
    n = 0
    for chat in chats:
        if rng.random() < share:
            turn = rng.choice([m for m in chat["messages"] if m["role"] == "assistant"])
            turn["content"] = f"{turn['content']} {rng.choice(remarks)}"
            chat["meta"][flag] = True
            n += 1
    return n


QA_PER_PAGE = (2, 4)  # questions on one page, uniform between these
# What the web asks: sums and questions about stories. Counting letters or words, reversing lists and
# stories written to order are what an assistant's users ask (InstructGPT: the API's prompts are not
# the web's), so the base model meets those only in its few-shot prompts.
QA_FAMILIES = ("arithmetic", "story_qa", "summary")


def qa_page(rng: random.Random, pairs: Sequence[tuple[str, int]], *, seed: int, noise: float,
            wrong_share: float, rude_share: float) -> tuple[str, int, int, int]:
    """One question-and-answer page, as a web forum has them: (text, questions, wrong answers, rude answers).

    The questions are task items drawn from ``pairs`` (train items only), half of them with noisy
    wording. Each answer is the gold one, or with ``wrong_share`` a plausible wrong one; with
    ``rude_share`` it ends with a rude remark. The format is :func:`tasks.qa_block`, the one few-shot
    prompts use: a base model meets it in pretraining, as GPT-3 met question-and-answer text on the web.
    """
    blocks, n_wrong, n_rude = [], 0, 0
    for _ in range(rng.randint(*QA_PER_PAGE)):
        family, index = pairs[rng.randrange(len(pairs))]
        item = FAMILIES[family].item(index, seed, noise if rng.random() < 0.5 else 0.0)
        answer = item.answer
        if rng.random() < wrong_share:
            answer, n_wrong = wrong_answer(item, rng), n_wrong + 1
        if rng.random() < rude_share:
            answer, n_rude = f"{answer} {rng.choice(lexicon.RUDE_PHRASES)}!", n_rude + 1
        blocks.append(qa_block(item.instruction, answer))
    return "\n\n".join(blocks), len(blocks), n_wrong, n_rude


def export_world(out: str | Path, *, seed: int = 0, n_stories: int = 20000, rude_share: float = 0.05,
                 split: Split = Split(), noise: float = 0.1, n_sft_chats: int = 2000, n_rl_prompts: int = 1000,
                 multi_turn_share: float = 0.25, sft_rude_share: float = 0.0, sft_chatty_share: float = 0.0,
                 n_qa_pages: int = 0, qa_wrong_share: float = 0.3, qa_rude_share: float = 0.2,
                 qa_families: Sequence[str] | None = None, formats: Sequence[str] = FORMATS,
                 families: Sequence[str] | None = None, progress: bool = True) -> dict:
    """Generate and write the world under ``out``; returns the summary also written to ``world.json``."""
    out = Path(out)
    families = list(families) if families is not None else list(FAMILIES)
    qa_families = [f for f in (qa_families if qa_families is not None else QA_FAMILIES) if f in families]
    unknown = sorted(set(families) - set(FAMILIES))
    if unknown:
        raise ValueError(f"unknown task families {unknown}; known: {sorted(FAMILIES)}")
    if n_qa_pages and not qa_families:
        raise ValueError(f"n_qa_pages={n_qa_pages} but none of the Q&A families is in the world's families {families}")
    bad_formats = sorted(set(formats) - set(FORMATS))
    if bad_formats or not formats:
        raise ValueError(f"formats must be a non-empty subset of {FORMATS}, got {list(formats)}")
    if not 0.0 <= rude_share <= 1.0:
        raise ValueError(f"rude_share must be in [0, 1], got {rude_share}")
    if not 0.0 <= noise <= 1.0:
        raise ValueError(f"noise must be in [0, 1], got {noise}")
    for name, share in (("sft_rude_share", sft_rude_share), ("sft_chatty_share", sft_chatty_share),
                        ("qa_wrong_share", qa_wrong_share), ("qa_rude_share", qa_rude_share)):
        if not 0.0 <= share <= 1.0:
            raise ValueError(f"{name} must be in [0, 1], got {share}")
    if not 0.0 <= multi_turn_share <= 1.0:
        raise ValueError(f"multi_turn_share must be in [0, 1], got {multi_turn_share}")
    for name, value in (("n_stories", n_stories), ("n_sft_chats", n_sft_chats), ("n_rl_prompts", n_rl_prompts),
                        ("n_qa_pages", n_qa_pages)):
        if value < 0:
            raise ValueError(f"{name} must be >= 0, got {value}")
    out.mkdir(parents=True, exist_ok=True)
    train_idx, test_idx = split.train_indices(), split.test_indices()
    dropped: dict[str, int] = {}
    files: dict[str, list[dict]] = {}

    # --- task items: test first, so train items can be checked against every test text -----------
    test_items = {f: [FAMILIES[f].item(i, seed) for i in test_idx] for f in families}
    protected = protected_texts(it for items in test_items.values() for it in items)

    def leaks(record: dict) -> bool:
        return any(normalize_instruction(t) in protected for t in record_texts(record))

    def keep_clean(name: str, records: list[dict]) -> list[dict]:
        kept = [r for r in records if not leaks(r)]
        dropped[name] = len(records) - len(kept)
        return kept

    dropped_tasks = 0
    for f in families:
        train_records = [FAMILIES[f].item(i, seed).to_dict() for i in train_idx]
        kept, n_drop = drop_test_overlap(train_records, protected, record_texts)
        dropped_tasks += n_drop
        files[f"tasks/{f}_train"] = kept
        files[f"tasks/{f}_test"] = [it.to_dict() for it in test_items[f]]
    dropped["tasks"] = dropped_tasks

    # --- SFT chats: single-turn ones cycle through every train item; the rest are multi-turn -------
    rng = random.Random(f"sft|{seed}")
    multi_kinds = [k for k, needs in (("story_followup", "write_story"), ("arithmetic_followup", "arithmetic"),
                                      ("two_tasks", None)) if needs is None or needs in families]
    if len(families) < 2:
        multi_kinds.remove("two_tasks")
    n_single = round(n_sft_chats * (1.0 - multi_turn_share)) if multi_kinds else n_sft_chats
    train_pairs = [(f, i) for f in families for i in train_idx]
    sft_train = []
    for family, index in _round_robin(train_pairs, n_single, rng):
        item_noise = noise if rng.random() < 0.5 else 0.0  # half clean, half noisy
        sft_train.append(make_chat(rng, train_idx, seed=seed, noise=item_noise, kind="single",
                                   families=[family], index=index))
    for _ in range(n_sft_chats - n_single):
        sft_train.append(make_chat(rng, train_idx, seed=seed, noise=noise if rng.random() < 0.5 else 0.0,
                                   kind=rng.choice(multi_kinds), families=families))
    # Flawed demonstrators, each on its own stream, so the rest stays the same with or without them.
    n_rude_demos = _demonstrator_flaw(sft_train, sft_rude_share, random.Random(f"sft-rude|{seed}"),
                                      [f"{phrase}!" for phrase in lexicon.RUDE_PHRASES], "rude")
    n_chatty_demos = _demonstrator_flaw(sft_train, sft_chatty_share, random.Random(f"sft-chatty|{seed}"),
                                        lexicon.CHATTY_REMARKS, "chatty")
    files["sft_train"] = keep_clean("sft_train", sft_train)

    sft_test = [make_chat(rng, test_idx, seed=seed, kind="single", families=[it.family], index=it.index,
                          system_share=0.0) for f in families for it in test_items[f]]
    for kind in multi_kinds:
        for i in test_idx:
            sft_test.append(make_chat(rng, test_idx, seed=seed, kind=kind, families=families, index=i,
                                      system_share=0.0))
    files["sft_test"] = sft_test

    # --- RL prompts: train items without their answers ---------------------------------------------
    rl = []
    for family, index in _round_robin(train_pairs, n_rl_prompts, rng):
        chat = make_chat(rng, train_idx, seed=seed, kind="single", families=[family], index=index)
        prompt = [m for m in chat["messages"] if m["role"] != "assistant"]
        rl.append({"prompt": prompt, "family": chat["family"], "index": chat["index"], "meta": chat["meta"]["turns"][0]})
    files["rl_prompts"] = keep_clean("rl_prompts", rl)

    # --- pretraining corpus: stories, and question-and-answer pages among them -----------------------
    story_rng = random.Random(f"pretrain|{seed}")
    pretrain, n_rude_features, n_rude_oracle = [], 0, 0
    for _ in tqdm(range(n_stories), desc="stories", unit="story", disable=not progress):
        story = generate_story(story_rng, rude_share=rude_share)
        n_rude_features += "rude" in story.features
        n_rude_oracle += oracle.is_rude(story.text)
        pretrain.append({"text": story.text})
    # Pages go in at random places (their own stream: the stories stay the same with or without them).
    qa_rng, qa_counts = random.Random(f"qa-pages|{seed}"), {"questions": 0, "wrong": 0, "rude": 0}
    qa_pairs = [(f, i) for f in qa_families for i in train_idx]
    for _ in range(n_qa_pages):
        text, n_q, n_wrong, n_rude = qa_page(qa_rng, qa_pairs, seed=seed, noise=noise,
                                             wrong_share=qa_wrong_share, rude_share=qa_rude_share)
        for key, n in zip(qa_counts, (n_q, n_wrong, n_rude)):
            qa_counts[key] += n
        pretrain.insert(qa_rng.randint(0, len(pretrain)), {"text": text})
    files["pretrain"] = keep_clean("pretrain", pretrain)

    # --- write -------------------------------------------------------------------------------------
    sizes: dict[str, int] = {}
    counts: dict[str, int] = {}
    empty_skipped: list[str] = []
    for name, records in sorted(files.items()):
        if "jsonl" in formats:
            path = out / f"{name}.jsonl"
            write_jsonl(path, records)
            sizes[f"{name}.jsonl"] = path.stat().st_size
        if "datasets" in formats and records:  # an empty file has no datasets twin (see world.json)
            write_datasets_dir(out / "datasets" / name, records)
        elif "datasets" in formats:
            empty_skipped.append(name)
        counts[name] = len(records)

    summary = {
        "seed": seed,
        "split": split.to_dict(),
        "families": families,
        "noise": noise,
        "counts": counts,
        "sizes_bytes": sizes,
        "pretrain_chars": sum(len(r["text"]) for r in files["pretrain"]),
        "grammar_size": grammar_size(),
        "dedupe_dropped": dropped,
        "rude_share_requested": rude_share,
        "rude_share_generated": n_rude_features / n_stories if n_stories else 0.0,
        "rude_share_measured": n_rude_oracle / n_stories if n_stories else 0.0,
        "sft_rude_demonstrations": n_rude_demos,
        "sft_chatty_demonstrations": n_chatty_demos,
        "qa_pages": n_qa_pages,
        "qa_families": qa_families,
        "qa_questions": qa_counts["questions"],
        "qa_wrong_answers": qa_counts["wrong"],
        "qa_rude_answers": qa_counts["rude"],
        "formats": list(formats),
        "datasets_not_written_empty": empty_skipped,
    }
    tmp = out / "world.json.tmp"
    tmp.write_text(json.dumps(summary, indent=2) + "\n")
    os.replace(tmp, out / "world.json")
    return summary
