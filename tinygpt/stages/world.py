"""Stage ``tinygpt world``: generate the synthetic world's datasets into a directory.

Reads nothing; writes pretraining stories, the Task 1 split of every task family, SFT chats, RL
prompts and ``world.json`` (see :mod:`tinygpt.world.export` for the files and their formats).

    tinygpt world make --out runs/w --n-stories 40000
    tinygpt world make --out runs/w --families arithmetic summary --formats jsonl
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from tinygpt.config import opt, save_config
from tinygpt.world.export import FORMATS, QA_FAMILIES, export_world
from tinygpt.world.split import Split, parse_residues
from tinygpt.world.tasks import FAMILIES


@dataclass
class WorldConfig:
    out: Path = opt(Path("runs/world"), "directory to write the world's datasets into")
    seed: int = opt(0, "seed for everything generated: same seed, same bytes")
    n_stories: int = opt(20000, "pretraining corpus size in stories (20000 ~ a few minutes of pretraining on 2 CPU cores)")
    rude_share: float = opt(0.05, "share of pretraining stories that are rude on purpose")
    n_items: int = opt(100, "task items per family (Task 1: 100, indices 1..n_items)")
    modulus: int = opt(10, "split rule: item i is a test item iff i % modulus is in test_residues")
    test_residues: list[int] = opt([1, 3, 7], "residues that make an item a test item")
    noise: float = opt(0.1, "per-word chance of a spelling mistake or swapped words in noisy train instructions")
    n_sft_chats: int = opt(2000, "SFT training chats (every train item single-turn in turn, plus multi-turn chats)")
    multi_turn_share: float = opt(0.25, "share of SFT training chats that are multi-turn")
    sft_rude_share: float = opt(0.0, "share of SFT training chats written by a rude demonstrator: one answer ends "
                                     "with a rude remark, so SFT learns some rudeness that RLHF must remove")
    sft_chatty_share: float = opt(0.0, "share of SFT training chats written by a chatty demonstrator: one answer goes "
                                       "on after the answer (\"I hope this helps you!\"), which the labeler "
                                       "dislikes and task grading counts wrong")
    n_qa_pages: int = opt(0, "question-and-answer pages among the pretraining stories, as the web has them: "
                             "2-4 train-split questions each, in the few-shot prompts' Q:/A: format")
    qa_wrong_share: float = opt(0.3, "share of the Q&A pages' answers that are wrong (plausibly: a near number, "
                                     "another name)")
    qa_rude_share: float = opt(0.2, "share of the Q&A pages' answers that end with a rude remark")
    qa_families: list[str] = opt(list(QA_FAMILIES), "task families the Q&A pages ask about (the web's questions, "
                                                     "not an assistant's)")
    n_rl_prompts: int = opt(1000, "RL prompts drawn in turn from the train items")
    families: list[str] = opt(list(FAMILIES), "task families to include")
    formats: list[str] = opt(["jsonl", "datasets"], f"output formats, from {', '.join(FORMATS)}")
    progress: bool = opt(True, "show a progress bar while generating the corpus")

    def __post_init__(self) -> None:
        # lists, as every other stage's list options; a comma-separated string ("a,b", or one such item
        # on the command line) is split, so `--families arithmetic,summary` and TOML strings still work
        for name in ("qa_families", "families", "formats"):
            value = getattr(self, name)
            items = [value] if isinstance(value, str) else list(value)
            setattr(self, name, [part.strip() for item in items for part in str(item).split(",") if part.strip()])
        self.test_residues = list(parse_residues(self.test_residues))


def main(cfg: WorldConfig) -> dict:
    split = Split(n=cfg.n_items, modulus=cfg.modulus, test_residues=parse_residues(cfg.test_residues))
    summary = export_world(
        cfg.out, seed=cfg.seed, n_stories=cfg.n_stories, rude_share=cfg.rude_share, split=split,
        noise=cfg.noise, n_sft_chats=cfg.n_sft_chats, n_rl_prompts=cfg.n_rl_prompts,
        multi_turn_share=cfg.multi_turn_share, sft_rude_share=cfg.sft_rude_share,
        sft_chatty_share=cfg.sft_chatty_share, n_qa_pages=cfg.n_qa_pages,
        qa_wrong_share=cfg.qa_wrong_share, qa_rude_share=cfg.qa_rude_share,
        qa_families=cfg.qa_families, formats=cfg.formats, families=cfg.families, progress=cfg.progress)
    save_config(cfg, Path(cfg.out) / "config.json")
    counts = summary["counts"]
    print(f"world written to {cfg.out}: {counts['pretrain']} pretraining documents ({summary['qa_pages']} of them "
          f"Q&A pages), {counts['sft_train']} SFT train chats, "
          f"{counts['sft_test']} SFT test chats, {counts['rl_prompts']} RL prompts; "
          f"dedupe dropped {summary['dedupe_dropped']}")
    return summary
