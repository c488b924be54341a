"""Comparison data: sample K answers per prompt from the SFT policy and rank them with the simulated labeler.

InstructGPT's step 2 data: for each prompt, K in 4..9 completions are shown to a labeler, who ranks
them best first; the ranking gives K-choose-2 comparisons. Here the policy samples the K answers
(batched, ``tinygpt.generate`` on the prompt rendered by ``render_chat(add_generation_prompt=True)``,
stopping at ``<|end|>`` or EOS, after at most ``--max-new-tokens``, or ``--long-max-new-tokens`` for a
story: ``world.tasks.answer_budget``, the budgets PPO and evaluate use too); every answer is scored by the oracle first, then
``tinygpt.world.labeler.Labeler`` ranks them: the oracle's utility (near misses get partial credit)
plus Gumbel noise, with answers of (nearly) equal utility tied in one tier that makes no pair. The
noise is set, by default, so that two labelers would agree on 73% of the pairs actually compared
(``--labeler-agreement``; InstructGPT's labelers agreed on 72.6%), or fixed with ``--labeler-noise``.

Writes into OUT:
    rankings.jsonl, rankings_val.jsonl   {"prompt", "completions", "ranking", "utilities", "family", "index", "meta"}
    pairs.jsonl, pairs_val.jsonl         {"prompt", "chosen", "rejected", "family", "index"}: all K-choose-2 pairs
                                         of each ranking (tied and identical answers give no pair, and are counted)
    summary.json                         counts, mean oracle utility / helpfulness, tie shares, the noise used
                                         and the label accuracy and agreement it gives on these pairs
A seeded share of the prompts (``--val-fraction``) goes to the ``_val`` files only, so the reward
model's held-out accuracy is measured on prompts it never saw.

    tinygpt rank --policy runs/x/sft --prompts runs/x/world/rl_prompts.jsonl --out runs/x/rank --k 4

Uses: checkpoint, generate, tokenizer, world.labeler, data.prompts (the prompt reader PPO shares),
data.preferences.ranking_to_pairs.
It does not train anything.
"""

from __future__ import annotations

import itertools
import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from tqdm.auto import tqdm

from tinygpt import runtime
from tinygpt.checkpoint import load_model_and_tokenizer
from tinygpt.config import opt, save_config
from tinygpt.data.preferences import ranking_to_pairs
from tinygpt.data.prompts import read_prompts
from tinygpt.data.sources import DataError
from tinygpt.generate import SamplingConfig, generate
from tinygpt.world.export import write_jsonl
from tinygpt.world.labeler import (DEFAULT_TIE_MARGIN, Labeler, calibrate_noise, compared_gaps, expected_agreement,
                                   expected_label_accuracy, tier_positions)
from tinygpt.world.tasks import DEFAULT_LONG_ANSWER_TOKENS, answer_budget


@dataclass
class RankConfig:
    policy: str = opt("", "SFT checkpoint that samples the K answers (a run directory or checkpoint directory)", required=True)
    prompts: str = opt("", "prompts JSONL {\"prompt\": [messages] or text, \"meta\": {family, gold/spec, ...}} "
                           "(the world's rl_prompts.jsonl)", required=True)
    out: str = opt("runs/rank", "output directory: rankings.jsonl, pairs.jsonl, their _val twins, summary.json")
    k: int = opt(4, "completions sampled and ranked per prompt (InstructGPT: 4 to 9)")
    n_prompts: int = opt(0, "prompts to use, from the start of the file (0 = all)")
    val_fraction: float = opt(0.1, "share of the prompts held out into rankings_val.jsonl / pairs_val.jsonl")
    temperature: float = opt(1.0, "sampling temperature (diverse answers make informative comparisons)")
    top_p: float = opt(1.0, "nucleus sampling threshold (1 = off)")
    max_new_tokens: int = opt(64, "most tokens per answer")
    long_max_new_tokens: int = opt(DEFAULT_LONG_ANSWER_TOKENS, "most tokens per answer of the families whose answers "
                                   "are whole stories (write_story); 0 = --max-new-tokens")
    labeler_noise: float = opt(-1.0, "the simulated labeler's Gumbel noise on utilities (0 = the oracle's order; "
                                     "-1 = set it so two labelers would agree on --labeler-agreement of the pairs)")
    labeler_agreement: float = opt(0.73, "with --labeler-noise -1: the share of the compared pairs two independent "
                                         "labelers would order alike (InstructGPT: 72.6%)")
    tie_margin: float = opt(DEFAULT_TIE_MARGIN, "answers whose oracle utilities differ by at most this are tied: "
                                                "ranked together, no pair (-1 = never tie; every pair is ordered)")
    partial_credit: bool = opt(True, "the labeler gives near misses (a close number, half the words) partial credit; "
                                     "false = exact match only")
    seed: int = opt(1337, "seed for the sampling, the labeler and the validation split")
    batch_size: int = opt(64, "sequences sampled at once (prompts x K)")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    progress: bool = opt(True, "show a progress bar")


def val_mask(n: int, fraction: float, seed: int) -> np.ndarray:
    """A seeded boolean mask choosing round(n * fraction) of n prompts (at least 1 when fraction > 0 and n > 1)."""
    n_val = round(n * fraction)
    if fraction > 0 and n > 1:
        n_val = min(max(n_val, 1), n - 1)
    mask = np.zeros(n, dtype=bool)
    mask[np.random.default_rng([seed, 7]).permutation(n)[:n_val]] = True
    return mask


def main(cfg: RankConfig) -> dict[str, Any]:
    # --- setup -----------------------------------------------------------------------------
    if not cfg.policy:
        raise ValueError("--policy is required: the SFT checkpoint that samples answers (e.g. runs/x/sft)")
    if not cfg.prompts:
        raise ValueError("--prompts is required: e.g. runs/x/world/rl_prompts.jsonl")
    if not 2 <= cfg.k <= 16:
        raise ValueError(f"--k must be in 2..16 (InstructGPT used 4..9), got {cfg.k}")
    if not 0.0 <= cfg.val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {cfg.val_fraction}")
    if cfg.batch_size < 1 or cfg.n_prompts < 0:
        raise ValueError("--batch-size must be >= 1 and --n-prompts >= 0")
    device = runtime.resolve_device(cfg.device)
    out = Path(cfg.out)

    # --- model and data ------------------------------------------------------------------------
    model, mcfg, tokenizer = load_model_and_tokenizer(cfg.policy, device=device)
    model.eval()
    prompts = [(p.where, p.messages, p.meta, p.record)
               for p in read_prompts(cfg.prompts, cfg.n_prompts, require_meta=True)]
    rendered = [tokenizer.render_chat(p, add_generation_prompt=True)[0] for _, p, _, _ in prompts]
    long_budget = cfg.long_max_new_tokens or cfg.max_new_tokens
    if mcfg.block_size - cfg.max_new_tokens < 2:
        raise ValueError(f"--max-new-tokens {cfg.max_new_tokens} leaves no room for a prompt in block_size {mcfg.block_size}")
    budgets = [answer_budget(meta.get("family"), cfg.max_new_tokens, long_budget) for _, _, meta, _ in prompts]
    usable = [i for i, ids in enumerate(rendered) if len(ids) + budgets[i] <= mcfg.block_size]
    too_long = len(prompts) - len(usable)
    if not usable:
        raise DataError(f"{cfg.prompts}: no prompt leaves room for its answer in block_size {mcfg.block_size} "
                        f"({cfg.max_new_tokens} tokens, {long_budget} for a story)")
    save_config(cfg, out / "resolved_config.json")  # the inputs are read: now the run directory
    is_val = val_mask(len(usable), cfg.val_fraction, cfg.seed)
    tie_margin = cfg.tie_margin if cfg.tie_margin >= 0 else None
    grader = Labeler(0.0, tie_margin=tie_margin, partial_credit=cfg.partial_credit)  # the noise-free scores

    # --- sample and score ----------------------------------------------------------------------------
    prompts_per_batch = max(1, cfg.batch_size // cfg.k)
    sampled: list[tuple[int, list[str], list[dict[str, float]]]] = []  # (prompt, K completions, K scores)
    unfinished = 0
    bar = tqdm(total=len(usable), desc="rank", unit="prompt", dynamic_ncols=True, disable=not cfg.progress)
    # prompts with the same answer budget are batched together, so a story does not hold up short answers
    groups = [[i for i in usable if budgets[i] == budget] for budget in sorted({budgets[i] for i in usable})]
    chunks = [g[first:first + prompts_per_batch] for g in groups for first in range(0, len(g), prompts_per_batch)]
    for b, chunk in enumerate(chunks):
        budget = budgets[chunk[0]]
        sampling = SamplingConfig(temperature=cfg.temperature, top_p=cfg.top_p, max_new_tokens=budget,
                                  seed=cfg.seed * 100_003 + b)
        # K copies of each prompt, next to each other: rows [j*K, (j+1)*K) belong to prompt chunk[j]
        new_tokens = generate(model, [rendered[i] for i in chunk for _ in range(cfg.k)], sampling,
                              eos_id=tokenizer.eos_id, stop_sequences=[[tokenizer.end_id]])
        for j, i in enumerate(chunk):
            samples = new_tokens[j * cfg.k:(j + 1) * cfg.k]
            unfinished += sum(len(s) == budget for s in samples)
            completions = [tokenizer.decode(s, skip_special=True).strip() for s in samples]
            sampled.append((i, completions, [grader.scores(prompts[i][2], c) for c in completions]))
        bar.update(len(chunk))
    bar.close()
    sampled.sort(key=lambda entry: entry[0])  # back in the prompts' order, which the validation split follows

    # --- the labeler's noise, then the rankings ---------------------------------------------------
    gaps = [gap for _, completions, scores in sampled  # utility gaps of the pairs a labeler will order
            for gap in compared_gaps([s["utility"] for s in scores], completions, tie_margin)]
    noise = cfg.labeler_noise
    if noise < 0:  # calibrated on the comparisons actually made, as InstructGPT measured agreement
        noise = calibrate_noise(gaps, cfg.labeler_agreement)
    labeler = Labeler(noise, seed=cfg.seed, tie_margin=tie_margin, partial_credit=cfg.partial_credit)
    files: dict[str, list[dict]] = {"rankings": [], "rankings_val": [], "pairs": [], "pairs_val": []}
    utilities_all, helpful_all = [], []
    n_pairs = tied = identical = 0
    for n, (i, completions, scores) in enumerate(sampled):
        where, prompt, meta, record = prompts[i]
        utilities = [s["utility"] for s in scores]
        ranking = labeler.rank_utilities(utilities)
        utilities_all += utilities
        helpful_all += [s["helpful"] for s in scores]
        tier = tier_positions(ranking)
        for a, c in itertools.combinations(range(cfg.k), 2):
            tied += tier[a] == tier[c]
            identical += completions[a] == completions[c]
        split = "_val" if is_val[n] else ""
        extra = {k: record[k] for k in ("family", "index") if k in record}
        files["rankings" + split].append({"prompt": prompt, "completions": completions, "ranking": ranking,
                                          "utilities": utilities, **extra, "meta": meta})
        for chosen, rejected in ranking_to_pairs(ranking):
            if completions[chosen] == completions[rejected]:
                continue  # the same text: no preference to learn (counted in `identical`)
            files["pairs" + split].append({"prompt": prompt, "chosen": completions[chosen],
                                           "rejected": completions[rejected], **extra})
            n_pairs += 1

    # --- write -----------------------------------------------------------------------------------
    for name, records in files.items():
        write_jsonl(out / f"{name}.jsonl", records)
    all_pairs = len(usable) * math.comb(cfg.k, 2)
    summary = {
        "prompts": len(usable), "train_prompts": len(files["rankings"]), "val_prompts": len(files["rankings_val"]),
        "prompts_too_long": too_long, "k": cfg.k, "labeler_noise": noise,
        "labeler_agreement_expected": expected_agreement(gaps, noise) if gaps else None,
        "label_accuracy_expected": expected_label_accuracy(gaps, noise) if gaps else None,
        "pairs_written": n_pairs, "train_pairs": len(files["pairs"]), "val_pairs": len(files["pairs_val"]),
        "mean_utility": float(np.mean(utilities_all)), "mean_helpful": float(np.mean(helpful_all)),
        "tie_share": tied / all_pairs, "identical_share": identical / all_pairs,
        "unfinished_share": unfinished / (len(usable) * cfg.k),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    print(f"rank: {summary['prompts']} prompts x {cfg.k} samples ({summary['val_prompts']} held out, {too_long} too "
          f"long); mean oracle utility {summary['mean_utility']:.3f}, helpful {summary['mean_helpful']:.3f}; "
          f"{summary['tie_share']:.1%} of pairs tied (no pair written), {summary['identical_share']:.1%} identical texts; "
          f"{n_pairs} pairs written to {out}")
    return summary
