"""``tinygpt evaluate``: every checkpoint of a run, measured the same way, in one table.

Per checkpoint (its kind comes from ``tinygpt.json``: stage ``pretrain`` is a *base* model, any
other stage a *chat* model):

* validation perplexity on a token shard directory (``--data``);
* held-out Task 1 accuracy per family (``tasks/*_test.jsonl`` of the world), answered by
  :class:`tinygpt.eval.answerer.Answerer` (the one answerer, with each family's answer budget): chat
  models through the chat template, base models with ``--shots`` GPT-3-style demonstrations from the
  train split (:mod:`tinygpt.eval.fewshot`); greedy, graded by :func:`tinygpt.world.tasks.grade`;
* the rudeness rate of those answers, and corpus BLEU of the ``summary`` answers;
* pass@k (Codex's unbiased estimator) from ``--pass-n`` samples per item;
* sampled stories graded by the oracle (grammar, consistency, novelty against the world's
  pretraining corpus, rudeness): base models start from BOS, chat models are asked for a story;
* optionally the same stories graded by an LLM judge (``--judge-url``) with the TinyStories rubric;
* win rate of its greedy answers against ``--baseline``'s on the same items, judged by the
  noiseless simulated labeler (its utility) and by a reward model (``--reward``), ties half;

* greedy answers to ``--prompts`` (free-form instructions, side by side in the report);
* with ``--extraction-docs N``, memorisation (Carlini et al.): how often greedy decoding continues N training
  and N held-out documents of ``--data`` exactly, from their first 32 tokens;
* with ``--best-of 1 4 16``, the baseline's best-of-n rows (:mod:`tinygpt.eval.best_of_n`): of n sampled
  answers, the one the reward model (or, as a ceiling, the noiseless labeler) scores highest, compared
  with the baseline like every model;

and once per run, the 13-gram contamination of each evaluation set by the training files and the
attention maps of the base checkpoint (``figures/attention.png``). Writes ``eval.json`` (everything),
``eval.md`` (the tables) and ``answers/NAME.jsonl`` (every greedy answer with its grade) into ``--out``.
The run report (``tinygpt report``) renders eval.json; it loads no model.

    tinygpt evaluate --checkpoints base=runs/x/pretrain sft=runs/x/sft --world runs/x/world --out runs/x/eval
    tinygpt evaluate ... --baseline sft --reward runs/x/reward --prompts "What is 3 plus 4?"
"""

from __future__ import annotations

import json
import math
import random
import statistics
import time
from collections import defaultdict
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from tqdm.auto import tqdm

from tinygpt import runtime
from tinygpt.checkpoint import CheckpointError, load_meta, load_model, load_tokenizer, resolve_checkpoint
from tinygpt.config import opt
from tinygpt.data.shards import TokenDataset
from tinygpt.data.sources import iter_documents
from tinygpt.eval import contamination as contamination_mod
from tinygpt.eval.answerer import Answerer
from tinygpt.eval.attention import attention_summary
from tinygpt.eval.best_of_n import best_of_n, best_of_n_kl
from tinygpt.eval.fewshot import complete_prompts
from tinygpt.eval.metrics import bleu, mean_pass_at_k, perplexity, win_rate
from tinygpt.eval.stories import sample_stories, summarize
from tinygpt.eval.tasks import load_task_records
from tinygpt.world.labeler import Labeler
from tinygpt.world.oracle import NoveltyIndex, is_rude, story_scores
from tinygpt.world.stories import generate_story
from tinygpt.world.tasks import DEFAULT_LONG_ANSWER_TOKENS, grade

STORY_REQUEST = "Write a short story."


@dataclass
class EvaluateConfig:
    checkpoints: list[str] = opt([], "checkpoints to evaluate, each NAME=PATH or PATH "
                                     "(a run directory means its latest checkpoint)", required=True)
    world: str = opt("", "world directory written by `tinygpt world` (tasks/*_test.jsonl, pretrain.jsonl, ...)", required=True)
    data: str = opt("", "token shard directory (`tinygpt prepare`) for validation perplexity; '' skips it")
    out: str = opt("runs/eval", "directory for eval.json, eval.md and answers/")
    max_items: int = opt(0, "test items per task family (0 = all of them)")
    shots: int = opt(3, "demonstrations per question for base (pretrain) checkpoints: 0, 1 or k")
    max_new_tokens: int = opt(48, "most tokens per task answer")
    long_max_new_tokens: int = opt(DEFAULT_LONG_ANSWER_TOKENS, "most tokens per answer of the families whose answers "
                                   "are whole stories (write_story); 0 = as many as the context holds")
    n_stories: int = opt(50, "stories sampled per checkpoint for the oracle (0 = skip)")
    story_temperature: float = opt(0.7, "sampling temperature of those stories")
    max_story_tokens: int = opt(0, "most tokens per sampled story (0 = as many as the context holds)")
    pass_n: int = opt(10, "samples per task item for pass@k (0 = skip pass@k)")
    pass_k: list[int] = opt([1, 5], "k values of pass@k, comma-separated (each <= pass_n)")
    pass_items: int = opt(10, "task items per family sampled for pass@k")
    pass_temperature: float = opt(0.8, "sampling temperature for pass@k samples")
    baseline: str = opt("", "checkpoint the win rates compare against (usually the SFT model): a NAME of "
                            "--checkpoints or a path; '' skips win rates")
    win_temperature: float = opt(0.7, "temperature of the answers the win rates compare, sampled as a user of the model "
                                      "gets them (0 = the greedy task answers)")
    win_samples: int = opt(2, "answers sampled per test item and model for the win rates (with --win-temperature > 0)")
    reward: str = opt("", "reward model checkpoint, a second judge of the win rates; '' = labeler only")
    best_of: list[int] = opt([], "best-of-n rows for the baseline, e.g. 1 4 16: of n answers sampled at "
                                 "--win-temperature, the one the reward model (and, as a ceiling, the noiseless "
                                 "labeler) scores highest, compared with the baseline like every model; [] = off")
    contamination: bool = opt(True, "report the 13-gram overlap of each evaluation set with the training files")
    extraction_docs: int = opt(0, "training and held-out documents (of --data) per checkpoint for the extraction "
                                  "table: greedy continuations of their first 32 tokens, exact for 8 / 32 / 64 "
                                  "(tinygpt.eval.memorisation); 0 = off")
    prompts: list[str] = opt([], "free-form instructions every checkpoint answers greedily (the report's side-by-side "
                                 "table; chat models through the template, a base model continues the text)")
    attention: bool = opt(True, "draw the attention maps of the base (pretrain) checkpoint on a story of the world")
    attention_tokens: int = opt(40, "tokens of that story the attention maps show")
    judge_url: str = opt("", "OpenAI-compatible endpoint (e.g. https://api.openai.com/v1) to grade the stories; '' = off")
    judge_model: str = opt("", "model name sent to the judge endpoint")
    judge_key_env: str = opt("OPENAI_API_KEY", "environment variable that holds the judge's API key")
    batch_size: int = opt(16, "prompts decoded together")
    eval_batches: int = opt(50, "validation batches for perplexity (0 = the whole split)")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    dtype: str = opt("auto", "autocast dtype for perplexity: auto, float32 or bfloat16")
    seed: int = opt(0, "seed of demonstrations, samples and stories")
    progress: bool = opt(True, "show progress bars")


# --- inputs -------------------------------------------------------------------------------------------

def parse_checkpoints(specs: list[str]) -> dict[str, Path]:
    """``NAME=PATH`` or ``PATH`` (named after the run's stage directory, e.g. ``sft``) -> {name: checkpoint}."""
    named: dict[str, Path] = {}
    for spec in specs:
        name, sep, path = spec.partition("=")
        if not sep:
            name, path = "", spec
        ckpt = resolve_checkpoint(path)
        if not name:
            # runs/demo/sft/checkpoints/step_00000100 -> "sft"; a bare checkpoint directory -> its own name
            name = ckpt.parent.parent.name if ckpt.parent.name == "checkpoints" else ckpt.name
        if name in named:
            raise ValueError(f"two checkpoints named {name!r}; name them explicitly: NAME=PATH")
        named[name] = ckpt
    return named


def checkpoint_kind(ckpt: Path) -> str:
    """'base' for a pretraining checkpoint, 'chat' for anything trained on conversations."""
    stage = load_meta(ckpt).get("stage")
    if stage is None:
        raise CheckpointError(f"{ckpt}: tinygpt.json has no 'stage'; cannot tell a base model from a chat model")
    return "base" if stage == "pretrain" else "chat"


def load_world_tasks(world: Path, max_items: int) -> tuple[list[dict], list[dict]]:
    """(test records, train records) of every family in ``world/tasks``; at most ``max_items`` test items a family."""
    test_files = sorted((world / "tasks").glob("*_test.jsonl"))
    if not test_files:
        raise FileNotFoundError(f"{world / 'tasks'}: no *_test.jsonl; expected a world written by `tinygpt world`")
    test, train = [], []
    for path in test_files:
        records = load_task_records(path)
        test += records[:max_items] if max_items > 0 else records
        train_path = path.with_name(path.name.replace("_test.jsonl", "_train.jsonl"))
        if train_path.is_file():
            train += load_task_records(train_path)
    return test, train


# --- metrics of one checkpoint ----------------------------------------------------------------------------

def task_scores(records: list[dict], answers: list[str]) -> dict[str, Any]:
    """Accuracy overall and per family, answer rudeness, summary BLEU."""
    per_family: dict[str, list[float]] = defaultdict(list)
    for r, a in zip(records, answers):
        per_family[r["family"]].append(grade(r, a))
    scores = [s for ss in per_family.values() for s in ss]
    summaries = [(a, r["answer"]) for r, a in zip(records, answers) if r["family"] == "summary"]
    return {
        "accuracy": statistics.fmean(scores),
        "per_family": {f: statistics.fmean(s) for f, s in sorted(per_family.items())},
        "n": len(scores),
        "answer_rudeness": sum(is_rude(a) for a in answers) / len(answers),
        "summary_bleu": bleu([h for h, _ in summaries], [ref for _, ref in summaries]) if summaries else None,
    }


def pass_at_k_scores(answerer: Answerer, records: list[dict], cfg: EvaluateConfig) -> dict[str, Any]:
    """Mean pass@k per family (a sample counts as correct when its grade is 1) and over families."""
    by_family: dict[str, list[dict]] = defaultdict(list)
    for r in records:
        if len(by_family[r["family"]]) < cfg.pass_items:
            by_family[r["family"]].append(r)
    chosen = [r for rs in by_family.values() for r in rs]
    samples = answerer.sampled_answers(chosen, cfg.pass_n, cfg.pass_temperature)  # each family's answer budget
    correct: dict[str, list[list[bool]]] = defaultdict(list)
    for r, outs in zip(chosen, samples):
        correct[r["family"]].append([grade(r, s) >= 1.0 for s in outs])
    out: dict[str, Any] = {"n": cfg.pass_n, "items_per_family": cfg.pass_items, "per_family": {}}
    for k in cfg.pass_k:
        per_family = {f: mean_pass_at_k(c, k) for f, c in sorted(correct.items())}
        for f, v in per_family.items():
            out["per_family"].setdefault(f, {})[f"pass@{k}"] = v
        out[f"pass@{k}"] = statistics.fmean(per_family.values())
    return out


def story_metrics(answerer: Answerer, cfg: EvaluateConfig, novelty: NoveltyIndex | None) -> tuple[dict, list[str]]:
    """Oracle scores of ``n_stories`` sampled stories: from BOS (base) or asked for (chat)."""
    model, tok = answerer.model, answerer.tok
    max_new = min(cfg.max_story_tokens or model.cfg.block_size, model.cfg.block_size - 1)
    if answerer.kind == "base":
        sampled = sample_stories(model, tok, cfg.n_stories, temperature=cfg.story_temperature, seed=cfg.seed,
                                 max_new_tokens=max_new, batch_size=cfg.batch_size)
    else:
        (prompt,) = answerer.prompts([STORY_REQUEST])
        texts = complete_prompts(model, tok, [prompt], stop="end", n=cfg.n_stories, temperature=cfg.story_temperature,
                                 seed=cfg.seed, max_new_tokens=max_new, batch_size=cfg.batch_size)[0]
        sampled = [(t, None) for t in texts]  # the chat end token, not EOS, closes a chat answer
    rows = [{"text": text, **story_scores(text, None, novelty), "ends_with_eos": eos} for text, eos in sampled]
    summary = summarize(rows)
    if novelty is None:
        summary.pop("sentence_novelty"), summary.pop("ngram_novelty")
    return summary, [text for text, _ in sampled]


def sampled_scores(records: list[dict], samples: list[list[str]], temperature: float) -> dict[str, Any]:
    """Accuracy, rudeness and the labeler's mean utility of sampled answers (``samples[i]`` answer ``records[i]``)."""
    labeler = Labeler(noise=0.0)
    flat = [(r, a) for r, outs in zip(records, samples) for a in outs]
    return {"temperature": temperature, "n": len(samples[0]) if samples else 0,
            "accuracy": statistics.fmean(grade(r, a) for r, a in flat),
            "answer_rudeness": sum(is_rude(a) for _, a in flat) / len(flat),
            "utility": statistics.fmean(labeler.utility(r, a) for r, a in flat)}


def rm_scores(reward: tuple, records: list[dict], answers: list[str]) -> list[float | None]:
    """The reward model's score of each answer to its record's question (None where it does not fit)."""
    from tinygpt.reward_model import render_prompt_response, score

    rm, rm_tok, shift = reward
    seqs = [render_prompt_response(rm_tok, [{"role": "user", "content": r["instruction"]}], a)
            for r, a in zip(records, answers)]
    fits = [i for i, s in enumerate(seqs) if len(s) <= rm.cfg.block_size]
    got = score(rm, [seqs[i] for i in fits], shift=shift).tolist() if fits else []
    out: list[float | None] = [None] * len(seqs)
    for i, s in zip(fits, got):
        out[i] = s
    return out


def win_rates(cand: list[str], base: list[str], records: list[dict], reward: tuple | None) -> dict[str, Any]:
    """Candidate vs baseline answers, judged by the noiseless labeler and (optionally) by the reward model.

    ``records[i]`` is the question both ``cand[i]`` and ``base[i]`` answer (repeat a record for several samples)."""
    labeler = Labeler(noise=0.0)
    out: dict[str, Any] = {"labeler": win_rate([labeler.utility(r, a) for r, a in zip(records, cand)],
                                               [labeler.utility(r, b) for r, b in zip(records, base)])}
    if reward is not None:
        sa, sb = rm_scores(reward, records, cand), rm_scores(reward, records, base)
        pairs = [(a, b) for a, b in zip(sa, sb) if a is not None and b is not None]
        if pairs:
            out["reward_model"] = {**win_rate([a for a, _ in pairs], [b for _, b in pairs]),
                                   "skipped_too_long": len(records) - len(pairs)}
        else:
            out["reward_model"] = {"win_rate": None, "n": 0, "skipped_too_long": len(records)}
    return out


def best_of_n_rows(answerer: Answerer, records: list[dict], win_records: list[dict], baseline_answers: list[str],
                   reward: tuple | None, cfg: EvaluateConfig) -> dict[str, Any]:
    """The baseline's best-of-n for each n of ``--best-of``, picked by the noiseless labeler and by the
    reward model, each compared with the baseline's own sampled answers as the other rows are."""
    n_max = max(cfg.best_of)
    samples = answerer.sampled_answers(records, n_max, cfg.win_temperature)  # (items, n_max)
    labeler = Labeler(noise=0.0)
    judges = {"labeler": [[labeler.utility(r, a) for a in outs] for r, outs in zip(records, samples)]}
    if reward is not None:
        flat = rm_scores(reward, [r for r in records for _ in range(n_max)], [a for outs in samples for a in outs])
        flat = [s if s is not None else float("-inf") for s in flat]  # an answer the RM cannot read is never picked
        judges["reward model"] = [flat[i * n_max:(i + 1) * n_max] for i in range(len(records))]
    repeats = len(win_records) // len(records)
    rows = []
    for n in sorted(set(cfg.best_of)):
        for judge, scores in judges.items():
            chosen = [samples[i][j] for i, j in enumerate(best_of_n(scores, n))]
            compared = [a for a in chosen for _ in range(repeats)]  # in win_records order
            rows.append({"n": n, "picked_by": judge, "kl_bound": best_of_n_kl(n),
                         "accuracy": statistics.fmean(grade(r, a) for r, a in zip(records, chosen)),
                         "utility": statistics.fmean(labeler.utility(r, a) for r, a in zip(records, chosen)),
                         "answer_rudeness": sum(is_rude(a) for a in chosen) / len(chosen),
                         "win_rate": win_rates(compared, baseline_answers, win_records, reward)})
    return {"temperature": cfg.win_temperature, "samples": n_max, "rows": rows}


# --- writing ------------------------------------------------------------------------------------------

def _finite(value: Any) -> Any:
    """NaN/inf -> None, recursively, so eval.json is strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _cell(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def markdown_report(results: dict[str, dict[str, Any]], contamination: dict | None, cfg: EvaluateConfig) -> str:
    ks = [f"pass@{k}" for k in cfg.pass_k]
    head = ["model", "kind", "val ppl", "task acc", "answer rude", "summary BLEU", *ks, "story grammar",
            "story consistency", "story novelty", "story rude", "win (labeler)", "win (RM)", "judge (mean)"]
    lines = ["# Evaluation", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, r in results.items():
        tasks, stories, passk, wins = r.get("tasks", {}), r.get("stories", {}), r.get("pass_at_k", {}), r.get("win_rate", {})
        judge = r.get("judge", {}).get("means")
        cells = [name, r["kind"], _cell(r.get("perplexity", {}).get("perplexity"), 2), _cell(tasks.get("accuracy")),
                 _cell(tasks.get("answer_rudeness")), _cell(tasks.get("summary_bleu"), 1),
                 *[_cell(passk.get(k)) for k in ks], _cell(stories.get("grammar")), _cell(stories.get("consistency")),
                 _cell(stories.get("ngram_novelty")), _cell(stories.get("rudeness_rate")),
                 _cell(wins.get("labeler", {}).get("win_rate")), _cell(wins.get("reward_model", {}).get("win_rate")),
                 _cell(statistics.fmean(judge.values()) if judge else None, 2)]
        lines.append("| " + " | ".join(cells) + " |")
    families = sorted({f for r in results.values() for f in r.get("tasks", {}).get("per_family", {})})
    if families:
        lines += ["", "## Task accuracy per family (held-out split)", "",
                  "| model | " + " | ".join(families) + " |", "|---|" + "---|" * len(families)]
        for name, r in results.items():
            per = r.get("tasks", {}).get("per_family", {})
            lines.append(f"| {name} | " + " | ".join(_cell(per.get(f)) for f in families) + " |")
    if contamination is not None:
        lines += ["", "## Contamination (GPT-3 appendix C)", "", contamination_mod.markdown_table(contamination)]
    lines += ["", f"Base models are asked with {cfg.shots}-shot prompts; chat models through the chat template. "
              "Win rates count ties as half."]
    return "\n".join(lines) + "\n"


# --- main ---------------------------------------------------------------------------------------------

def main(cfg: EvaluateConfig) -> dict[str, Any]:
    # --- config and inputs
    if not cfg.checkpoints:
        raise ValueError("nothing to evaluate: give --checkpoints NAME=PATH[,NAME=PATH...]")
    if not cfg.world:
        raise ValueError("--world is required: the world directory whose held-out tasks are the benchmark")
    if cfg.pass_n > 0 and (not cfg.pass_k or any(k < 1 or k > cfg.pass_n for k in cfg.pass_k)):
        raise ValueError(f"every --pass-k must be in 1..pass_n={cfg.pass_n}, got {cfg.pass_k}")
    if cfg.shots < 0:
        raise ValueError(f"--shots must be >= 0, got {cfg.shots}")
    if cfg.win_temperature < 0 or (cfg.win_temperature > 0 and cfg.win_samples < 1):
        raise ValueError(f"--win-temperature must be >= 0 (got {cfg.win_temperature}) and --win-samples >= 1 "
                         f"(got {cfg.win_samples})")
    if cfg.best_of and (not cfg.baseline or cfg.win_temperature <= 0 or min(cfg.best_of) < 1):
        raise ValueError(f"--best-of {cfg.best_of} needs values >= 1, a --baseline to sample from and "
                         f"--win-temperature > 0 (got {cfg.win_temperature!r}, baseline {cfg.baseline!r})")
    if cfg.judge_url and not cfg.judge_model:
        raise ValueError("--judge-url needs --judge-model (the model name the endpoint serves)")
    world, out = Path(cfg.world), Path(cfg.out)
    checkpoints = parse_checkpoints(cfg.checkpoints)
    out.mkdir(parents=True, exist_ok=True)
    (out / "answers").mkdir(exist_ok=True)
    device = runtime.resolve_device(cfg.device)
    dtype = runtime.resolve_dtype(cfg.dtype, device)
    test_records, train_records = load_world_tasks(world, cfg.max_items)
    val = TokenDataset(cfg.data, "val") if cfg.data else None
    corpus = world / "pretrain.jsonl"
    novelty = NoveltyIndex(iter_documents([corpus])) if cfg.n_stories > 0 and corpus.is_file() else None
    judge = None
    if cfg.judge_url:
        from tinygpt.eval.judge import StoryJudge

        judge = StoryJudge(cfg.judge_url, cfg.judge_model, key_env=cfg.judge_key_env, cache=out / "judge_cache.jsonl")
    reward = None
    if cfg.reward:
        from tinygpt.reward_model import load_reward_model

        reward = load_reward_model(cfg.reward, device)

    def load(ckpt: Path) -> Answerer:
        model, _ = load_model(ckpt, device=device)
        model.eval()
        return Answerer(model, load_tokenizer(ckpt), checkpoint_kind(ckpt), train_records,
                        max_new_tokens=cfg.max_new_tokens, long_max_new_tokens=cfg.long_max_new_tokens,
                        shots=cfg.shots, batch_size=cfg.batch_size, seed=cfg.seed)

    sampled = cfg.win_temperature > 0
    # the win rates compare answers to the same questions: each test record once per sampled answer
    win_records = [r for r in test_records for _ in range(cfg.win_samples)] if sampled else test_records

    baseline_answers = None
    base_ckpt = None
    best_of = None
    if cfg.baseline:
        base_ckpt = checkpoints[cfg.baseline] if cfg.baseline in checkpoints else resolve_checkpoint(cfg.baseline)
        if base_ckpt not in checkpoints.values():
            base_answerer = load(base_ckpt)
            if sampled:
                grouped = base_answerer.sampled_answers(test_records, cfg.win_samples, cfg.win_temperature)
                baseline_answers = [a for outs in grouped for a in outs]
            else:
                baseline_answers = base_answerer.greedy(test_records)
            if cfg.best_of:
                best_of = {"checkpoint": str(base_ckpt), **best_of_n_rows(base_answerer, test_records, win_records,
                                                                          baseline_answers, reward, cfg)}
            del base_answerer

    # --- each checkpoint
    results: dict[str, dict[str, Any]] = {}
    attention: dict[str, Any] | None = None
    bar = tqdm(checkpoints.items(), desc="evaluate", unit="ckpt", disable=not cfg.progress)
    for name, ckpt in bar:
        started = time.time()
        answerer = load(ckpt)
        result: dict[str, Any] = {"checkpoint": str(ckpt), "kind": answerer.kind, "stage": load_meta(ckpt).get("stage"),
                                  "step": load_meta(ckpt).get("step")}
        if val is not None:
            bar.set_postfix_str(f"{name}: perplexity")
            if val.meta.get("tokenizer_sha256") not in (None, answerer.tok.fingerprint):
                raise ValueError(f"{cfg.data} was tokenized with another tokenizer than {ckpt}: "
                                 "perplexity would be meaningless (prepare the shards with this tokenizer)")
            result["perplexity"] = perplexity(answerer.model, val, batch_size=cfg.batch_size,
                                              max_batches=cfg.eval_batches or None, device=device, dtype=dtype,
                                              progress=cfg.progress)
        bar.set_postfix_str(f"{name}: tasks")
        answers = answerer.greedy(test_records)
        result["tasks"] = task_scores(test_records, answers)
        with open(out / "answers" / f"{name}.jsonl", "w") as f:
            for r, a in zip(test_records, answers):
                f.write(json.dumps({"family": r["family"], "index": r.get("index"), "instruction": r["instruction"],
                                    "gold": r["answer"], "answer": a, "score": grade(r, a)}) + "\n")
        if cfg.prompts:
            result["same_prompts"] = answerer.free(cfg.prompts)
        if cfg.attention and answerer.kind == "base" and attention is None:
            bar.set_postfix_str(f"{name}: attention maps")
            story = generate_story(random.Random(0), rude_share=0.0).text
            attention = {"checkpoint": str(ckpt), **attention_summary(answerer.model, answerer.tok, story,
                                                                     cfg.attention_tokens, out / "figures" / "attention.png")}
            attention["figure"] = str(Path(attention["figure"]).relative_to(out))
        if cfg.pass_n > 0:
            bar.set_postfix_str(f"{name}: pass@k")
            result["pass_at_k"] = pass_at_k_scores(answerer, test_records, cfg)
        if cfg.n_stories > 0:
            bar.set_postfix_str(f"{name}: stories")
            result["stories"], texts = story_metrics(answerer, cfg, novelty)
            if judge is not None:
                verdicts = judge.grade_stories(texts, progress=cfg.progress)
                result["judge"] = {k: verdicts[k] for k in ("model", "n", "unparsed", "means", "failures")}
        if sampled:
            bar.set_postfix_str(f"{name}: sampled answers")
            grouped = answerer.sampled_answers(test_records, cfg.win_samples, cfg.win_temperature)
            compared = [a for outs in grouped for a in outs]  # in win_records order
            result["sampled_answers"] = sampled_scores(test_records, grouped, cfg.win_temperature)
            with open(out / "answers" / f"{name}_sampled.jsonl", "w") as f:
                for r, a in zip(win_records, compared):
                    f.write(json.dumps({"family": r["family"], "index": r.get("index"), "answer": a}) + "\n")
        else:
            compared = answers
        if cfg.baseline:
            if baseline_answers is None and ckpt == base_ckpt:
                baseline_answers = compared
            if baseline_answers is not None:
                result["win_rate"] = win_rates(compared, baseline_answers, win_records, reward)
            if cfg.best_of and ckpt == base_ckpt:
                bar.set_postfix_str(f"{name}: best-of-{max(cfg.best_of)}")
                best_of = {"checkpoint": str(ckpt), "name": name,
                           **best_of_n_rows(answerer, test_records, win_records, baseline_answers, reward, cfg)}
        result["seconds"] = round(time.time() - started, 1)
        results[name] = result
        del answerer
    # a baseline listed after its candidates: their win rates are filled in now
    if cfg.baseline and baseline_answers is not None:
        for name, r in results.items():
            if "win_rate" not in r:
                file = out / "answers" / (f"{name}_sampled.jsonl" if sampled else f"{name}.jsonl")
                cand = [json.loads(line)["answer"] for line in open(file)]
                r["win_rate"] = win_rates(cand, baseline_answers, win_records, reward)

    # --- extraction (memorisation), every checkpoint on the same documents
    extraction = None
    if cfg.extraction_docs > 0 and cfg.data:
        from tinygpt.eval.memorisation import extraction_table

        try:
            extraction = extraction_table(checkpoints, cfg.data, n_docs=cfg.extraction_docs, prefix_tokens=32,
                                          continuation_tokens=(8, 32, 64), seed=cfg.seed, device=cfg.device,
                                          batch_size=cfg.batch_size)
        except ValueError as e:  # documents or contexts too short for the measurement: said, not a crash
            extraction = {"error": str(e)}

    # --- contamination, once per world
    report = None
    if cfg.contamination:
        report = contamination_mod.world_contamination(world, progress=cfg.progress)

    # --- write
    summary = {"config": asdict(cfg), "checkpoints": results, "contamination": report,
               "test_items": len(test_records), "attention": attention, "best_of_n": best_of,
               "extraction": extraction}
    (out / "eval.json").write_text(json.dumps(_finite(summary), indent=2) + "\n")
    (out / "eval.md").write_text(markdown_report(results, report, cfg))
    for name, r in results.items():
        print(f"evaluate: {name}: task accuracy {r['tasks']['accuracy']:.3f}"
              + (f", perplexity {r['perplexity']['perplexity']:.2f}" if "perplexity" in r else "")
              + (f", win rate vs baseline {r['win_rate']['labeler']['win_rate']:.3f}" if "win_rate" in r else ""))
    print(f"evaluate: {len(results)} checkpoint(s) on {len(test_records)} test items: {out / 'eval.json'}, "
          f"{out / 'eval.md'}, answers in {out / 'answers'}")
    return summary
