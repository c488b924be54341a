"""The run report: every stage's scores in one table, read aloud, with curves, answers and attention maps.

:func:`build_report` writes ``report.md`` (images beside it under ``figures/``, referenced by
relative path) and ``report.html`` (one self-contained file: images inlined as base64 data URIs,
an inline style sheet, no external asset, every piece of model or user text passed through
``html.escape``). Sections:

1. **Scores**: InstructGPT's figure 1 in miniature: one row per evaluated policy (base, SFT, PPO,
   PPO-ptx, DPO, in pipeline order), columns held-out task accuracy, win rate against the evaluation
   baseline (simulated labeler, reward model), the PPO reward and KL from the stage's own
   ``metrics.jsonl``, story grammar, consistency and rudeness, answer rudeness, validation perplexity.
2. **Reading**: sentences computed from that table (what raised accuracy, what lowered rudeness,
   whether PPO-ptx kept perplexity within 5% of SFT's): no number in them is written by hand.
3. **Curves**: pretraining/SFT loss, reward-model accuracy, PPO reward and KL, DPO loss, each drawn
   with :func:`tinygpt.runlog.plot_curves` from the stage's ``metrics.jsonl``.
4. **Same prompts, every model**: the greedy answers `tinygpt evaluate --prompts` stored (chat
   template for chat checkpoints, a plain-text continuation for a base model).
5. **Contamination**: the 13-gram overlap table of ``eval.json``.
6. **Attention**: the heads of the base model `tinygpt evaluate` picked and drew on a story of the world.

It is a pure renderer: it reads what the stages (``metrics.jsonl``) and ``tinygpt evaluate``
(``eval.json`` and its figures) wrote, loads no model and generates nothing, so ``tinygpt report RUN_DIR``
redraws a report in seconds. A missing part (a stage not run, no perplexity) becomes a note in the
report, never a crash. It imports no stage.
"""

from __future__ import annotations

import base64
import html
import math
import shutil
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tinygpt.runlog import plot_curves, read_metrics

STAGE_LABELS = {"pretrain": "base", "base": "base", "sft": "SFT", "sft_lora": "SFT (LoRA)", "reward": "reward model",
                "ppo": "PPO",
                "ppo_ptx": "PPO-ptx", "dpo": "DPO"}
POLICY_STAGES = ("pretrain", "sft", "ppo", "ppo_ptx", "dpo")  # the rows InstructGPT's figure 1 compares
PTX_PERPLEXITY_TOLERANCE = 0.05  # PPO-ptx "holds" perplexity when at most 5% above SFT's
CHANGE_EPS = 0.005  # smaller changes of a share (accuracy, rudeness) read as "kept"

# stage kind -> curves: (file suffix, metric keys, title)
CURVES: dict[str, list[tuple[str, list[str], str]]] = {
    "pretrain": [("loss", ["loss", "val_loss"], "pretraining loss")],
    "sft": [("loss", ["loss", "val_loss"], "SFT loss (assistant tokens)"),
            ("task_accuracy", ["task_accuracy"], "SFT held-out task accuracy")],
    "reward": [("accuracy", ["accuracy", "val_accuracy"], "reward model pair accuracy")],
    "ppo": [("reward", ["reward", "eval_reward"], "PPO reward (reward-model score)"),
            ("kl", ["kl"], "PPO KL(policy || SFT) per answer, nats")],
    "dpo": [("loss", ["loss", "val_loss"], "DPO loss"), ("accuracy", ["accuracy", "val_accuracy"], "DPO accuracy")],
}


# --- the document: blocks rendered twice, as Markdown and as HTML ---------------------------------------

@dataclass
class Heading:
    level: int
    text: str


@dataclass
class Paragraph:
    text: str


@dataclass
class Bullets:
    items: list[str]


@dataclass
class Table:
    header: list[str]
    rows: list[list[str]]


@dataclass
class Figure:
    path: Path  # a PNG file inside the report directory
    caption: str


@dataclass
class Preformatted:
    text: str  # model text shown verbatim


Block = Heading | Paragraph | Bullets | Table | Figure | Preformatted


def _md_text(text: str) -> str:
    """Text safe inside Markdown: no raw HTML reaches a renderer."""
    return html.escape(text, quote=False)


def _md_cell(text: str) -> str:
    return _md_text(text).replace("|", "\\|").replace("\n", " ")


def render_markdown(blocks: Sequence[Block], out_dir: Path) -> str:
    lines: list[str] = []
    for b in blocks:
        if isinstance(b, Heading):
            lines += ["#" * b.level + " " + _md_text(b.text), ""]
        elif isinstance(b, Paragraph):
            lines += [_md_text(b.text), ""]
        elif isinstance(b, Bullets):
            lines += [f"- {_md_text(item)}" for item in b.items] + [""]
        elif isinstance(b, Table):
            lines += ["| " + " | ".join(map(_md_cell, b.header)) + " |", "|" + "---|" * len(b.header)]
            lines += ["| " + " | ".join(map(_md_cell, row)) + " |" for row in b.rows] + [""]
        elif isinstance(b, Figure):
            alt = _md_text(b.caption).replace("[", "(").replace("]", ")")
            lines += [f"![{alt}]({b.path.relative_to(out_dir).as_posix()})", ""]
        elif isinstance(b, Preformatted):
            lines += ["> " + line for line in _md_text(b.text or "(empty)").splitlines() or [""]] + [""]
    return "\n".join(lines).rstrip() + "\n"


STYLE = """
body { font-family: system-ui, sans-serif; max-width: 1100px; margin: 2em auto; padding: 0 1em; color: #222; }
table { border-collapse: collapse; margin: 0.5em 0 1.2em; font-size: 0.9em; }
th, td { border: 1px solid #ccc; padding: 0.3em 0.6em; text-align: left; vertical-align: top; }
th { background: #f2f2f2; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
figure { margin: 1em 0; }
figure img { max-width: 100%; border: 1px solid #eee; }
figcaption { font-size: 0.85em; color: #555; }
pre { white-space: pre-wrap; background: #f7f7f7; padding: 0.6em; border-radius: 4px; }
"""


def _is_number(cell: str) -> bool:
    try:
        float(cell.rstrip("%"))
        return True
    except ValueError:
        return False


def render_html(blocks: Sequence[Block], title: str) -> str:
    e = html.escape
    parts = ["<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">', f"<title>{e(title)}</title>",
             f"<style>{STYLE}</style></head><body>"]
    for b in blocks:
        if isinstance(b, Heading):
            parts.append(f"<h{b.level}>{e(b.text)}</h{b.level}>")
        elif isinstance(b, Paragraph):
            parts.append(f"<p>{e(b.text)}</p>")
        elif isinstance(b, Bullets):
            parts.append("<ul>" + "".join(f"<li>{e(i)}</li>" for i in b.items) + "</ul>")
        elif isinstance(b, Table):
            head = "".join(f"<th>{e(h)}</th>" for h in b.header)
            body = "".join("<tr>" + "".join(f'<td class="num">{e(c)}</td>' if _is_number(c) else f"<td>{e(c)}</td>"
                                            for c in row) + "</tr>" for row in b.rows)
            parts.append(f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>")
        elif isinstance(b, Figure):
            data = base64.b64encode(b.path.read_bytes()).decode("ascii")
            parts.append(f'<figure><img alt="{e(b.caption)}" src="data:image/png;base64,{data}">'
                         f"<figcaption>{e(b.caption)}</figcaption></figure>")
        elif isinstance(b, Preformatted):
            parts.append(f"<pre>{e(b.text or '(empty)')}</pre>")
    parts.append("</body></html>")
    return "\n".join(parts) + "\n"


# --- the scores table ---------------------------------------------------------------------------------

def stage_kind(name: str) -> str | None:
    """'pretrain', 'sft', 'reward', 'ppo' or 'dpo' for a stage name such as 'ppo_ptx'; None if unknown."""
    name = name.lower()
    if name == "base":
        return "pretrain"
    if name in CURVES:
        return name
    return next((kind for kind in CURVES if name.startswith(kind)), None)


def stage_label(name: str) -> str:
    return STAGE_LABELS.get(name.lower(), name)


def _last(records: list[dict[str, Any]], key: str) -> float | None:
    """The last logged value of ``key`` (None if never logged)."""
    for r in reversed(records):
        value = r.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            return float(value)
    return None


def _get(d: Any, *keys: str) -> float | None:
    for k in keys:
        if not isinstance(d, dict):
            return None
        d = d.get(k)
    return float(d) if isinstance(d, (int, float)) and not isinstance(d, bool) and math.isfinite(d) else None


def _first(*values: float | None) -> float | None:
    return next((v for v in values if v is not None), None)


def _inside(path: str | Path, parent: str | Path) -> bool:
    p, q = Path(path).resolve(), Path(parent).resolve()
    return p == q or q in p.parents


@dataclass
class Row:
    """One evaluated model: its eval.json name, the stage it came from, and its scores (None = unknown)."""
    name: str
    stage: str | None
    scores: dict[str, float | None] = field(default_factory=dict)

    @property
    def label(self) -> str:
        return stage_label(self.stage or self.name)

    @property
    def kind(self) -> str | None:
        return stage_kind(self.stage or self.name)


COLUMNS = [  # (score key, column header, digits)
    ("accuracy", "task accuracy", 3),
    ("win_labeler", "win vs {baseline} (labeler)", 3),
    ("win_rm", "win vs {baseline} (RM)", 3),
    ("reward", "mean reward (RM)", 3),
    ("grammar", "story grammar", 3),
    ("consistency", "story consistency", 3),
    ("story_rudeness", "story rudeness", 3),
    ("answer_rudeness", "answer rudeness", 3),
    ("perplexity", "val perplexity", 2),
    ("kl", "KL to SFT (nats)", 3),
]


def _stage_of(name: str, result: dict[str, Any], stages: dict[str, str]) -> str | None:
    """The stage directory an evaluated checkpoint belongs to: by name, else by its path, else None."""
    if name in stages:
        return name
    ckpt = result.get("checkpoint")
    if ckpt:
        for stage, stage_dir in stages.items():
            if _inside(ckpt, stage_dir):
                return stage
    return None


def score_rows(eval_result: dict[str, Any], stages: dict[str, str]) -> list[Row]:
    """One row per evaluated checkpoint, in pipeline (``stages``) order, unmatched ones last."""
    rows = []
    for name, r in (eval_result.get("checkpoints") or {}).items():
        stage = _stage_of(name, r, stages)
        records: list[dict[str, Any]] = []
        if stage is not None and (Path(stages[stage]) / "metrics.jsonl").is_file():
            records = read_metrics(Path(stages[stage]) / "metrics.jsonl")
        # PPO logs the RM score of greedy answers to held-out prompts (eval_reward), and of its rollouts (reward)
        reward = _last(records, "eval_reward")
        if reward is None and stage_kind(stage or "") == "ppo":
            reward = _last(records, "reward")
        scores = {
            "accuracy": _get(r, "tasks", "accuracy"),
            "win_labeler": _get(r, "win_rate", "labeler", "win_rate"),
            "win_rm": _get(r, "win_rate", "reward_model", "win_rate"),
            "reward": reward,
            "grammar": _get(r, "stories", "grammar"),
            "consistency": _get(r, "stories", "consistency"),
            "story_rudeness": _get(r, "stories", "rudeness_rate"),
            # sampled answers show the rudeness a user meets; greedy ones hide a minority habit
            "answer_rudeness": _first(_get(r, "sampled_answers", "answer_rudeness"), _get(r, "tasks", "answer_rudeness")),
            "perplexity": _get(r, "perplexity", "perplexity"),
            # k3 (never negative, unbiased) where PPO logged it; the k1 mean it trains on can come out
            # below 0 when the policy barely moved (PPO-ptx showed -0.001)
            "kl": _first(_last(records, "kl_k3"), _last(records, "kl")),
        }
        if stage is None and r.get("stage") == "pretrain":
            stage = "pretrain"
        rows.append(Row(name=name, stage=stage, scores=scores))
    order = {s: i for i, s in enumerate(stages)}
    return sorted(rows, key=lambda row: order.get(row.stage or "", len(order)))  # stable: eval order otherwise


def _get_list(d: Any, *keys: str) -> list | None:
    for k in keys:
        if not isinstance(d, dict) or k not in d:
            return None
        d = d[k]
    return d if isinstance(d, list) else None


def _interval(ci: list | None) -> str:
    return "-" if not ci else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def win_cells(w: dict[str, Any]) -> list[str]:
    """A win-rate result as cells: rate, its interval, decided share, its interval, W / L / T."""
    counts = "-" if "wins" not in w else f"{w['wins']} / {w['losses']} / {w['ties']}"
    return [_cell(w.get("win_rate"), 3), _interval(w.get("ci95")), _cell(w.get("decided_win_rate"), 3),
            _interval(w.get("decided_ci95")), counts]


def _cell(value: float | None, digits: int) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def baseline_label(eval_result: dict[str, Any], rows: list[Row]) -> str:
    """What the win rates compare against: the label of the row evaluate used as --baseline."""
    baseline = (eval_result.get("config") or {}).get("baseline")
    if not baseline:
        return "baseline"
    for row in rows:
        ckpt = (eval_result.get("checkpoints") or {}).get(row.name, {}).get("checkpoint")
        if ckpt and (_inside(ckpt, baseline) or _inside(baseline, ckpt)):
            return row.label
    return "baseline"


def scores_table(rows: list[Row], baseline: str) -> Table:
    header = ["model"] + [title.format(baseline=baseline) for _, title, _ in COLUMNS]
    labels = [row.label for row in rows]
    return Table(header, [[row.label if labels.count(row.label) == 1 else f"{row.label} ({row.name})"]
                          + [_cell(row.scores.get(key), digits) for key, _, digits in COLUMNS] for row in rows])


# --- reading the table --------------------------------------------------------------------------------

def _reference(row: Row, by_kind: dict[str, Row]) -> Row | None:
    """What a row is compared with: SFT for RL/DPO policies, the base model for SFT."""
    if row.kind in ("ppo", "dpo"):
        return by_kind.get("sft")
    if row.kind == "sft":
        return by_kind.get("pretrain")
    return None


def _change(verb_up: str, verb_down: str, old: float, new: float) -> str:
    if abs(new - old) < CHANGE_EPS:
        return "kept"
    return verb_up if new > old else verb_down


def read_table(rows: list[Row], baseline: str = "SFT") -> list[str]:
    """Sentences computed from the scores: accuracy, rudeness, win rates, PPO-ptx perplexity."""
    by_kind: dict[str, Row] = {}
    for row in rows:
        by_kind.setdefault(row.kind or "", row)
    by_stage = {row.stage: row for row in rows if row.stage}
    out: list[str] = []

    scored = [r for r in rows if r.scores.get("accuracy") is not None]
    if scored:
        best = max(scored, key=lambda r: r.scores["accuracy"])  # type: ignore[arg-type, return-value]
        out.append(f"The most accurate model on the held-out tasks is {best.label} "
                   f"({best.scores['accuracy']:.3f}).")
    for row in rows:
        ref = _reference(row, by_kind)
        if ref is None or ref is row:
            continue
        a, b = ref.scores.get("accuracy"), row.scores.get("accuracy")
        if a is not None and b is not None:
            out.append(f"{row.label} {_change('raised', 'lowered', a, b)} held-out task accuracy compared with "
                       f"{ref.label}: {a:.3f} to {b:.3f} ({b - a:+.3f}).")
        for key, what in (("story_rudeness", "the rudeness rate of sampled stories"),
                          ("answer_rudeness", "the rudeness rate of its task answers")):
            a, b = ref.scores.get(key), row.scores.get(key)
            if a is not None and b is not None:
                out.append(f"{row.label} {_change('raised', 'lowered', a, b)} {what} compared with {ref.label}: "
                           f"{a:.3f} to {b:.3f}.")
        win, win_rm = row.scores.get("win_labeler"), row.scores.get("win_rm")
        if win is not None and row.label != baseline:
            rm = f" (reward model: {win_rm:.0%})" if win_rm is not None else ""
            out.append(f"{row.label}'s answers beat {baseline}'s in {win:.0%} of the labeler's comparisons{rm}.")

    sft, ptx, ppo = by_kind.get("sft"), by_stage.get("ppo_ptx"), by_stage.get("ppo")
    if ptx is not None:
        p_sft = sft.scores.get("perplexity") if sft else None
        p_ptx = ptx.scores.get("perplexity")
        if p_sft is None or p_ptx is None:
            missing = " and ".join(n for n, v in (("SFT", p_sft), ("PPO-ptx", p_ptx)) if v is None)
            out.append(f"Whether PPO-ptx held validation perplexity within {PTX_PERPLEXITY_TOLERANCE:.0%} of SFT "
                       f"cannot be told: no perplexity for {missing} (evaluate runs it when given --data).")
        else:
            rise = p_ptx / p_sft - 1
            if rise < -PTX_PERPLEXITY_TOLERANCE:
                verdict = "brought validation perplexity below SFT's"
            elif rise <= PTX_PERPLEXITY_TOLERANCE:
                verdict = f"held validation perplexity within {PTX_PERPLEXITY_TOLERANCE:.0%} of SFT's"
            else:
                verdict = f"did not hold validation perplexity within {PTX_PERPLEXITY_TOLERANCE:.0%} of SFT's"
            line = f"PPO-ptx {verdict}: {p_ptx:.2f} against {p_sft:.2f} ({rise:+.1%})."
            p_ppo = ppo.scores.get("perplexity") if ppo else None
            if p_ppo is not None:
                line += f" PPO without the pretraining mix: {p_ppo:.2f} ({p_ppo / p_sft - 1:+.1%})."
            out.append(line)
    return out


# --- curves -------------------------------------------------------------------------------------------

def curve_figures(stages: dict[str, str], fig_dir: Path) -> tuple[list[Figure], list[str]]:
    """PNG curves of every stage's metrics.jsonl, and notes for what could not be drawn."""
    figures, notes = [], []
    for stage, stage_dir in stages.items():
        path = Path(stage_dir) / "metrics.jsonl"
        if not path.is_file():
            notes.append(f"{stage_label(stage)}: no metrics.jsonl in {stage_dir}.")
            continue
        records = read_metrics(path)
        curves = CURVES.get(stage_kind(stage) or "", [("loss", ["loss", "val_loss"], f"{stage} loss")])
        for suffix, keys, title in curves:
            png = plot_curves(records, keys, fig_dir / f"{stage}_{suffix}.png",
                              title=f"{title} ({stage})" if stage_kind(stage) != stage else title)
            if png is None:
                notes.append(f"{stage_label(stage)}: nothing logged for {', '.join(keys)}.")
            else:
                figures.append(Figure(png, f"{stage_label(stage)}: {title}"))
    return figures, notes


def reward_model_section(metrics: Path) -> list[Block]:
    """The reward model's held-out accuracy: against the noise-free order (the headline), against the
    noisy labels, and its share of the labels' noise ceiling, from the reward stage's last evaluation."""
    records = [r for r in read_metrics(metrics) if "val_accuracy" in r] if metrics.is_file() else []
    if not records:
        return []
    last = records[-1]
    ceiling = next((r["noise_ceiling"] for r in read_metrics(metrics) if r.get("noise_ceiling") is not None), None)
    rows = [["against the noise-free order (the oracle's utility)", _cell(_get(last, "val_accuracy_vs_oracle"), 3),
             _interval(_get_list(last, "val_accuracy_vs_oracle_ci95")), str(last.get("val_oracle_pairs", "-"))],
            ["against the noisy held-out labels", _cell(_get(last, "val_accuracy"), 3), "-", "-"],
            ["share of the labels' noise ceiling" + (f" ({ceiling:.3f})" if ceiling else ""),
             _cell(_get(last, "val_accuracy_share_of_ceiling"), 3), "-", "-"]]
    blocks: list[Block] = [Heading(2, "The reward model"),
                           Paragraph(f"Held-out preference pairs at step {last.get('step')}. The labels are noisy "
                                     "(a simulated labeler at InstructGPT's agreement); the oracle's order is "
                                     "what a reward model should learn, so it is the headline."),
                           Table(["accuracy", "value", "95% interval", "pairs"], rows)]
    per_family = last.get("val_accuracy_vs_oracle_per_family") or {}
    if per_family:
        blocks.append(Table(["family", "accuracy vs the noise-free order", "95% interval", "pairs"],
                            [[f, _cell(_get(v, "accuracy"), 3), _interval(v.get("ci95")), str(v.get("pairs", "-"))]
                             for f, v in per_family.items()]))
    return blocks


# --- the same prompts, every model --------------------------------------------------------------------

def same_prompts(eval_result: dict[str, Any]) -> tuple[list[Block], list[str]]:
    """Per prompt, a table of every checkpoint's greedy answer, from eval.json's ``same_prompts``."""
    results = eval_result.get("checkpoints") or {}
    answers = {name: r["same_prompts"] for name, r in results.items() if r.get("same_prompts")}
    notes = [f"{name}: answered no prompts in this evaluation." for name, r in results.items()
             if not r.get("same_prompts")]
    prompts = next(iter(answers.values()))["prompts"] if answers else []
    blocks: list[Block] = []
    for i, prompt in enumerate(prompts):
        blocks += [Heading(3, f"Prompt {i + 1}"), Preformatted(prompt),
                   Table(["model", "asked through", "greedy answer"],
                         [[name, a["how"], a["answers"][i] or "(empty)"] for name, a in answers.items()
                          if i < len(a["answers"])])]
    return blocks, notes


# --- attention ----------------------------------------------------------------------------------------

def attention_section(attention: dict[str, Any], eval_dir: Path, fig_dir: Path, run_dir: Path) -> list[Block]:
    """The base model's attention maps as `tinygpt evaluate` drew them (its figure copied beside the report)."""
    src = eval_dir / attention["figure"]
    if not src.is_file():
        return [Paragraph(f"The attention figure {src} is missing: rerun `tinygpt evaluate`.")]
    png = fig_dir / "attention.png"
    if src.resolve() != png.resolve():
        shutil.copyfile(src, png)
    where = Path(attention.get("checkpoint", "?"))
    if _inside(where, run_dir):
        where = where.resolve().relative_to(run_dir.resolve())
    picks = attention.get("picks") or []
    return [Paragraph(f"The base model ({where}) reading the first {attention.get('tokens', '?')} tokens of "
                      "this story; rows are queries, columns the keys they attend to. Heads picked by rule:"),
            Preformatted(attention.get("text", "")),
            Table(["rule", "layer", "head", "score", "how it is picked"],
                  [[p["rule"], str(p["layer"]), str(p["head"]), f"{p['score']:.3f}", p["why"]] for p in picks]),
            Figure(png, "attention weights of the picked heads")]


def extraction_section(result: dict[str, Any]) -> list[Block]:
    """The extraction rates `tinygpt evaluate --extraction-docs` measured (eval/memorisation.py)."""
    lengths = [str(L) for L in result["continuation_tokens"]]
    rows = []
    for name, m in result["models"].items():
        # JSON makes the lengths strings; in memory they are ints
        train, held = ({str(k): v for k, v in m[s]["exact"].items()} for s in ("train", "heldout"))
        rows.append([name, *[_cell(_get(train, L), 3) for L in lengths], *[_cell(_get(held, L), 3) for L in lengths],
                     _cell(_get(m, "train", "mean_matched"), 1), _cell(_get(m, "heldout", "mean_matched"), 1)])
    n = result["n_docs"]
    return [Paragraph(f"Each model is prompted with BOS and the first {result['prefix_tokens']} tokens of "
                      f"{n['train']} training and {n['heldout']} held-out stories and decodes greedily; 'exact L' is "
                      "the share whose first L new tokens are the story's own. The held-out rate is the floor the "
                      "world's templates allow; a training rate above it is memorisation."),
            Table(["model", *[f"train exact {L}" for L in lengths], *[f"held-out exact {L}" for L in lengths],
                   "train mean matched", "held-out mean matched"], rows)]


def discover_stages(run_dir: str | Path) -> dict[str, str]:
    """The stage directories a pipeline run holds, in pipeline order."""
    run_dir = Path(run_dir)
    return {name: str(run_dir / name) for name in ("pretrain", "sft", "sft_lora", "reward", "ppo", "ppo_ptx", "dpo")
            if (run_dir / name).is_dir()}


# --- the report ---------------------------------------------------------------------------------------

def build_report(run_dir: str | Path, *, stages: dict[str, str], eval_result: dict[str, Any] | None,
                 eval_dir: str | Path | None = None, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Write ``report.md`` and ``report.html`` (default ``run_dir/report``); return their paths.

    ``stages``: stage name -> stage run directory, in pipeline order (pretrain, sft, reward, ppo,
    ppo_ptx, dpo; any subset). ``eval_result``: what ``tinygpt evaluate`` wrote (eval.json) in
    ``eval_dir`` (default ``run_dir/eval``), whose figures it references. It renders; it loads no model.
    """
    run_dir = Path(run_dir)
    eval_dir = Path(eval_dir) if eval_dir is not None else run_dir / "eval"
    out = Path(out_dir) if out_dir is not None else run_dir / "report"
    fig_dir = out / "figures"
    fig_dir.mkdir(parents=True, exist_ok=True)
    stages = {name: str(path) for name, path in stages.items()}
    eval_result = eval_result or {}
    title = f"tinygpt report: {run_dir.name or run_dir}"
    blocks: list[Block] = [Heading(1, title)]

    # --- scores and their reading
    rows = score_rows(eval_result, stages)
    baseline = baseline_label(eval_result, rows)
    blocks.append(Heading(2, "Every stage, measured the same way"))
    notes = []
    evaluated = {row.stage for row in rows}
    for stage in POLICY_STAGES:
        if stage not in stages and stage not in evaluated:
            notes.append(f"{stage_label(stage)}: not run in this pipeline, so it has no row.")
    for stage in stages:
        if stage_kind(stage) != "reward" and stage not in evaluated:
            notes.append(f"{stage_label(stage)}: run, but not in the evaluation results, so it has no row.")
    if rows:
        test_items = eval_result.get("test_items")
        blocks.append(Paragraph(
            "Held-out task accuracy on the world's test split" + (f" ({test_items} items)" if test_items else "")
            + f"; win rates against {baseline}'s answers on the same items (ties count half), judged by the "
            "noiseless simulated labeler and by the reward model, and answer rudeness, on answers sampled as "
            "`tinygpt evaluate --win-temperature` says (greedy answers where it is 0); mean reward and KL are the "
            "last values the "
            "PPO stage logged (the reward of greedy answers to held-out prompts when it evaluated them); "
            "story scores from the oracle; '-' = not measured."))
        blocks.append(scores_table(rows, baseline))
    else:
        blocks.append(Paragraph("No evaluation results were given: run `tinygpt evaluate` to fill this table."))
    if notes:
        blocks.append(Bullets(notes))
    reading = read_table(rows, baseline)
    if reading:
        blocks += [Heading(2, "Reading the table"), Bullets(reading)]
    families = sorted({f for r in (eval_result.get("checkpoints") or {}).values()
                       for f in (r.get("tasks") or {}).get("per_family", {})})
    if families:
        per = {row.name: (eval_result["checkpoints"][row.name].get("tasks") or {}).get("per_family", {})
               for row in rows}
        blocks += [Heading(3, "Task accuracy per family"),
                   Table(["model", *families], [[row.label, *[_cell(_get(per[row.name], f), 3) for f in families]]
                                                for row in rows])]
    wins = [(row.label, ((eval_result.get("checkpoints") or {}).get(row.name) or {}).get("win_rate") or {})
            for row in rows]
    if any(w for _, w in wins):
        blocks += [Heading(3, f"Win rates against {baseline}, with 95% intervals"),
                   Paragraph("Ties count half; the decided share leaves ties out. Several answers to one question "
                             "are not independent, so the intervals are a little too narrow."),
                   Table(["model", "judge", "win rate", "95% interval", "decided share", "95% interval", "W / L / T"],
                         [[label, judge, *win_cells(w[key])] for label, w in wins
                          for key, judge in (("labeler", "labeler"), ("reward_model", "reward model")) if w.get(key)])]
    best_of = eval_result.get("best_of_n")
    if best_of and best_of.get("rows"):
        blocks += [Heading(2, "Best-of-n: what the reward model can tell apart"),
                   Paragraph(f"Of n answers the baseline sampled at temperature {best_of.get('temperature')}, the one "
                             "the reward model (or, as the ceiling any judge could reach with these samples, the "
                             "noiseless labeler) scores highest; compared with the baseline's answers like every "
                             "model. KL is the best-of-n bound log n - (n - 1)/n."),
                   Table(["n", "picked by", "KL (nats)", "labeler win", "95% interval", "RM win", "utility",
                          "task accuracy", "answer rudeness"],
                         [[str(r["n"]), r["picked_by"], _cell(r.get("kl_bound"), 3),
                           _cell(_get(r, "win_rate", "labeler", "win_rate"), 3),
                           _interval(_get_list(r, "win_rate", "labeler", "ci95")),
                           _cell(_get(r, "win_rate", "reward_model", "win_rate"), 3), _cell(r.get("utility"), 3),
                           _cell(r.get("accuracy"), 3), _cell(r.get("answer_rudeness"), 3)]
                          for r in best_of["rows"]])]

    # --- the reward model
    if "reward" in stages:
        blocks += reward_model_section(Path(stages["reward"]) / "metrics.jsonl")

    # --- curves
    blocks.append(Heading(2, "Training curves"))
    figures, curve_notes = curve_figures(stages, fig_dir)
    blocks += figures or [Paragraph("No stage wrote a metrics.jsonl.")]
    if curve_notes:
        blocks.append(Bullets(curve_notes))

    # --- the same prompts
    blocks.append(Heading(2, "The same prompts, answered by every model"))
    answer_blocks, answer_notes = same_prompts(eval_result)
    if answer_blocks:
        blocks.append(Paragraph("Greedy decoding (`tinygpt evaluate --prompts`); chat models through the chat "
                                "template, a base model continues the prompt as plain text."))
        blocks += answer_blocks + ([Bullets(answer_notes)] if answer_notes else [])
    else:
        blocks.append(Paragraph("No prompts were answered in this evaluation (`tinygpt evaluate --prompts`)."))

    # --- memorisation
    extraction = eval_result.get("extraction")
    if extraction:
        blocks.append(Heading(2, "Memorisation: are training stories extracted?"))
        if extraction.get("error"):
            blocks.append(Paragraph(f"Not measured: {extraction['error']}"))
        else:
            blocks += extraction_section(extraction)

    # --- contamination
    blocks.append(Heading(2, "Contamination (GPT-3 appendix C)"))
    contamination = eval_result.get("contamination")
    if contamination and contamination.get("sets"):
        n = contamination.get("ngram", 13)
        blocks.append(Paragraph(f"An evaluation example is dirty when any of its {n}-grams occurs in a training file ("
                                + ", ".join(contamination.get("training_files", [])) + ")."))
        blocks.append(Table(["evaluation set", "n", f"dirty ({n}-gram)", "dirty share", "too short"],
                            [[name, str(s["n"]), str(s["dirty"]), f"{s['dirty_share']:.3f}", str(s["too_short"])]
                             for name, s in contamination["sets"].items()]))
    else:
        blocks.append(Paragraph("Not measured in this evaluation."))

    # --- attention
    blocks.append(Heading(2, "Attention maps of the base model"))
    if eval_result.get("attention"):
        blocks += attention_section(eval_result["attention"], eval_dir, fig_dir, run_dir)
    else:
        blocks.append(Paragraph("No base (pretraining) checkpoint was evaluated with `--attention`, so no "
                                "attention maps."))

    # --- write
    md_path, html_path = out / "report.md", out / "report.html"
    md_path.write_text(render_markdown(blocks, out), encoding="utf-8")
    html_path.write_text(render_html(blocks, title), encoding="utf-8")
    return {"md": md_path, "html": html_path}
