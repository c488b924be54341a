"""The run report from tiny fake stage directories, a hand-written eval result and tiny checkpoints."""

import json
import random
from html.parser import HTMLParser

import pytest
import torch

from tinygpt.checkpoint import load_model, save_checkpoint
from tinygpt.eval.answerer import Answerer
from tinygpt.eval.attention import attention_summary
from tinygpt.eval.report import build_report, read_table, score_rows
from tinygpt.model import GPT, ModelConfig
from tinygpt.tokenizer import Tokenizer
from tinygpt.world.stories import generate_story

STAGES = ("pretrain", "sft", "reward", "ppo", "ppo_ptx")  # no DPO: it must be noted, not crash


def _write_metrics(path, records):
    path.mkdir(parents=True, exist_ok=True)
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))


def _row(ckpt, stage, acc, ppl, rude, win=None):
    r = {"checkpoint": str(ckpt), "kind": "base" if stage == "pretrain" else "chat", "stage": stage,
         "tasks": {"accuracy": acc, "per_family": {"arithmetic": acc, "summary": acc / 2}, "answer_rudeness": 0.0},
         "stories": {"grammar": 0.9, "consistency": 0.8, "rudeness_rate": rude},
         "perplexity": {"perplexity": ppl}}
    if win is not None:
        r["win_rate"] = {"labeler": {"win_rate": win}, "reward_model": {"win_rate": win + 0.1}}
    return r


def fake_eval(run, ptx_ppl=10.3, ppo_acc=0.40):
    """What evaluate's main returns, by hand: base, SFT (the baseline), PPO, PPO-ptx."""
    ckpt = {s: run / s / "checkpoints" / "step_00000010" for s in STAGES}
    return {"config": {"baseline": str(run / "sft")}, "test_items": 30,
            "checkpoints": {"base": _row(ckpt["pretrain"], "pretrain", 0.05, 9.0, 0.05),
                            "sft": _row(ckpt["sft"], "sft", 0.30, 10.0, 0.04, win=0.5),
                            "ppo": _row(ckpt["ppo"], "ppo", ppo_acc, 14.0, 0.0, win=0.7),
                            "ppo_ptx": _row(ckpt["ppo_ptx"], "ppo", 0.35, ptx_ppl, 0.0, win=0.6)},
            "contamination": {"ngram": 13, "training_files": ["pretrain.jsonl"],
                              "sets": {"tasks/arithmetic_test.jsonl": {"n": 30, "dirty": 0, "dirty_share": 0.0,
                                                                       "too_short": 30}}}}


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    run = tmp_path_factory.mktemp("report") / "demo"
    rng = random.Random(0)
    texts = [generate_story(rng, rude_share=0.0).text for _ in range(60)]
    tok = Tokenizer.train(texts, vocab_size=320, show_progress=False)
    _write_metrics(run / "pretrain", [{"step": s, "loss": 5 - s / 10} for s in range(1, 11)]
                   + [{"step": 10, "val_loss": 4.2, "val_ppl": 66.7}])
    _write_metrics(run / "sft", [{"step": 0, "data": {"n": 3}}, {"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.5}])
    _write_metrics(run / "reward", [{"step": 5, "accuracy": 0.6}, {"step": 10, "val_accuracy": 0.7}])
    _write_metrics(run / "ppo", [{"step": 1, "reward": 0.1, "kl": 0.0}, {"step": 2, "reward": 0.4, "kl": 0.25},
                                 {"step": 2, "eval_reward": 0.5}])
    _write_metrics(run / "ppo_ptx", [{"step": 1, "reward": 0.1, "kl": 0.0}, {"step": 2, "reward": 0.3, "kl": 0.125}])
    ckpts = {}
    for name, stage, seed in (("base", "pretrain", 0), ("sft", "sft", 1)):
        torch.manual_seed(seed)
        cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=64, n_layer=2, n_head=2, d_model=32)
        ckpts[name] = str(save_checkpoint(run / stage / "checkpoints" / "step_00000010", model=GPT(cfg),
                                          model_config=cfg, tokenizer_json=tok.to_str(),
                                          meta={"stage": stage, "step": 10}))
    return run, ckpts


def _table(md: str, first_header: str = "model") -> list[list[str]]:
    """Rows of the first Markdown table whose header starts with ``first_header``."""
    lines = md.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(f"| {first_header} |"))
    rows = []
    for line in lines[start + 2:]:
        if not line.startswith("|"):
            break
        rows.append([c.strip() for c in line.strip("|").split(" | ")])
    return rows


def evaluated(run_dir, ckpts, prompts, eval_dir, attention_text=None, answers=None):
    """fake_eval plus what `tinygpt evaluate --prompts --attention` adds: each checkpoint's answers to
    ``prompts`` (``answers`` instead of the model's, if given) and the base model's attention maps."""
    result = fake_eval(run_dir)
    tok = Tokenizer.load(ckpts["base"])
    for name, ckpt in ckpts.items():
        model, _ = load_model(ckpt)
        kind = "base" if name == "base" else "chat"
        free = Answerer(model, tok, kind, max_new_tokens=8, long_max_new_tokens=8).free(prompts)
        if answers is not None:
            free["answers"] = [answers for _ in prompts]
        result["checkpoints"].setdefault(name, {})["same_prompts"] = free
    base, _ = load_model(ckpts["base"])
    text = attention_text if attention_text is not None else generate_story(random.Random(0), rude_share=0.0).text
    result["attention"] = {"checkpoint": ckpts["base"],
                           **attention_summary(base, tok, text, 40, eval_dir / "figures" / "attention.png")}
    result["attention"]["figure"] = "figures/attention.png"
    return result


@pytest.fixture(scope="module")
def built(run, tmp_path_factory):
    run_dir, ckpts = run
    stages = {s: str(run_dir / s) for s in STAGES}
    eval_dir = run_dir / "eval"
    result = evaluated(run_dir, ckpts, ["What is two plus three?", "Write a short story."], eval_dir)
    out = build_report(run_dir, stages=stages, eval_result=result, eval_dir=eval_dir)
    return out, out["md"].read_text(), out["html"].read_text()


def test_scores_table_has_one_row_per_stage_in_pipeline_order(built):
    out, md, _ = built
    rows = _table(md)
    assert [r[0] for r in rows] == ["base", "SFT", "PPO", "PPO-ptx"]
    header = md.splitlines()[[i for i, line in enumerate(md.splitlines()) if line.startswith("| model |")][0]]
    assert "win vs SFT (labeler)" in header and "KL to SFT (nats)" in header
    by = {r[0]: r for r in rows}
    assert by["SFT"][1] == "0.300" and by["PPO"][2] == "0.700" and by["PPO"][3] == "0.800"
    assert by["PPO"][4] == "0.500"      # PPO's eval_reward, preferred over its rollout reward
    assert by["PPO-ptx"][4] == "0.300"  # no eval_reward logged: its last rollout reward
    assert by["PPO"][-1] == "0.250" and by["PPO-ptx"][-1] == "0.125" and by["SFT"][-1] == "-"
    assert "DPO: not run in this pipeline" in md


def test_curves_are_written_and_referenced_relatively(built):
    out, md, _ = built
    for name in ("pretrain_loss", "sft_loss", "reward_accuracy", "ppo_reward", "ppo_kl", "ppo_ptx_kl"):
        png = out["md"].parent / "figures" / f"{name}.png"
        assert png.read_bytes()[:4] == b"\x89PNG"
        assert f"](figures/{name}.png)" in md
    assert "SFT: nothing logged for task_accuracy." in md  # an SFT run without task evaluation


def test_reading_sentences(built):
    _, md, _ = built
    assert "The most accurate model on the held-out tasks is PPO (0.400)." in md
    assert "SFT raised held-out task accuracy compared with base: 0.300 to" not in md  # base 0.05 -> 0.30
    assert "SFT raised held-out task accuracy compared with base: 0.050 to 0.300 (+0.250)." in md
    assert "PPO lowered the rudeness rate of sampled stories compared with SFT: 0.040 to 0.000." in md
    assert "PPO-ptx held validation perplexity within 5% of SFT's: 10.30 against 10.00 (+3.0%)." in md
    assert "PPO without the pretraining mix: 14.00 (+40.0%)." in md
    assert "PPO's answers beat SFT's in 70% of the labeler's comparisons (reward model: 80%)." in md


@pytest.mark.parametrize("ptx_ppl,ppo_acc,expect", [
    (10.3, 0.40, ["PPO-ptx held validation perplexity", "PPO raised held-out task accuracy"]),
    (10.6, 0.20, ["PPO-ptx did not hold validation perplexity within 5% of SFT's: 10.60 against 10.00 (+6.0%).",
                  "PPO lowered held-out task accuracy compared with SFT: 0.300 to 0.200 (-0.100)."]),
    (9.0, 0.302, ["PPO-ptx brought validation perplexity below SFT's: 9.00 against 10.00 (-10.0%).",
                  "PPO kept held-out task accuracy"]),
])
def test_reading_follows_the_numbers(run, ptx_ppl, ppo_acc, expect):
    run_dir, _ = run
    stages = {s: str(run_dir / s) for s in STAGES}
    sentences = " ".join(read_table(score_rows(fake_eval(run_dir, ptx_ppl, ppo_acc), stages), "SFT"))
    for e in expect:
        assert e in sentences


def test_unknown_perplexity_is_said_not_guessed(run):
    run_dir, _ = run
    result = fake_eval(run_dir)
    del result["checkpoints"]["sft"]["perplexity"]
    stages = {s: str(run_dir / s) for s in STAGES}
    sentences = read_table(score_rows(result, stages), "SFT")
    assert any("cannot be told: no perplexity for SFT" in s for s in sentences)


def test_same_prompts_contamination_and_attention(built):
    out, md, _ = built
    assert md.count("### Prompt") == 2
    answers = _table(md[md.index("### Prompt 1"):])
    assert [r[0] for r in answers] == ["base", "sft"]
    assert answers[0][1] == "base: plain-text continuation" and answers[1][1] == "chat template"
    assert _table(md, "evaluation set") == [["tasks/arithmetic_test.jsonl", "30", "0", "0.000", "30"]]
    assert (out["md"].parent / "figures" / "attention.png").is_file()
    assert "| previous_token |" in md and "| most_focused |" in md


class _Tags(HTMLParser):
    """Every real tag of a page with its attributes (escaped text is data, not tags)."""

    def __init__(self, page: str):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.feed(page)

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))


def test_html_is_self_contained(built):
    _, _, page = built
    tags = _Tags(page).tags
    refs = [a[k] for _, a in tags for k in ("src", "href") if k in a]
    assert refs and all(r.startswith("data:image/png;base64,") for r in refs)
    assert len(refs) == sum(t == "img" for t, _ in tags) == 8  # 7 curves + the attention maps
    assert not {t for t, _ in tags} & {"script", "link", "iframe", "object"}
    assert "@import" not in page and "url(" not in page


def test_model_text_is_escaped(run, tmp_path):
    run_dir, ckpts = run
    evil = '<script>alert("x")</script> & <img src=http://example.com/a.png>'
    result = evaluated(run_dir, ckpts, [evil], tmp_path / "eval", attention_text="Sam met Sam. <script>", answers=evil)
    result["checkpoints"] = {name: {"same_prompts": r["same_prompts"]} for name, r in result["checkpoints"].items()
                             if "same_prompts" in r}  # no scores: only the model's text and the attention maps
    result.pop("contamination")
    out = build_report(run_dir, stages={}, eval_result=result, eval_dir=tmp_path / "eval", out_dir=tmp_path)
    page, md = out["html"].read_text(), out["md"].read_text()
    for text in (page, md):
        assert "<script" not in text and "example.com/a.png>" not in text
        assert "&lt;script&gt;" in text
    tags = _Tags(page).tags
    assert [t for t, _ in tags].count("img") == 1  # only the attention figure, none from the model's text
    assert all(a.get("src", "data:").startswith("data:") for _, a in tags)


def test_missing_parts_become_notes(tmp_path):
    out = build_report(tmp_path / "empty", stages={"pretrain": str(tmp_path / "nowhere")}, eval_result={})
    md = out["md"].read_text()
    assert out["md"].parent == tmp_path / "empty" / "report"
    assert "No evaluation results were given" in md
    assert "base: no metrics.jsonl in" in md
    assert "No prompts were answered in this evaluation" in md
    assert "No base (pretraining) checkpoint was evaluated" in md
    assert "Contamination" in md and "Not measured" in md
    assert out["html"].read_text().startswith("<!DOCTYPE html>")


def test_report_command_redraws_from_eval_json(run, tmp_path):
    from tinygpt.stages.report import ReportConfig, main

    run_dir, ckpts = run
    eval_dir = tmp_path / "eval"
    (eval_dir).mkdir()
    (eval_dir / "eval.json").write_text(json.dumps(evaluated(run_dir, ckpts, ["hi"], eval_dir)))
    paths = main(ReportConfig(run_dir=str(run_dir), eval_dir=str(eval_dir), out=str(tmp_path / "r")))
    md = (tmp_path / "r" / "report.md").read_text()
    assert paths["md"] == str(tmp_path / "r" / "report.md") and "### Prompt 1" in md
    assert "| SFT |" in md  # the scores table, from eval.json
    assert (tmp_path / "r" / "figures" / "attention.png").is_file()
    with pytest.raises(FileNotFoundError, match="eval.json not found"):
        main(ReportConfig(run_dir=str(tmp_path / "r")))


def test_kl_to_sft_is_never_negative_when_ppo_logged_k3(tmp_path):
    """k1's sample mean can fall below 0 when the policy barely moved; the table shows k3, which cannot."""
    _write_metrics(tmp_path / "ppo_ptx", [{"step": 2, "reward": 0.3, "kl": -0.001, "kl_k3": 0.0004}])
    _write_metrics(tmp_path / "ppo", [{"step": 2, "reward": 0.3, "kl": 0.2}])  # an older run: k1 only
    result = fake_eval(tmp_path)
    rows = {r.name: r for r in score_rows(result, {"ppo": str(tmp_path / "ppo"), "ppo_ptx": str(tmp_path / "ppo_ptx")})}
    assert rows["ppo_ptx"].scores["kl"] == 0.0004 and rows["ppo"].scores["kl"] == 0.2


def test_win_intervals_and_best_of_n_tables(tmp_path):
    result = fake_eval(tmp_path)
    result["checkpoints"]["ppo"]["win_rate"]["labeler"] = {"win_rate": 0.7, "wins": 6, "losses": 2, "ties": 2, "n": 10,
                                                           "ci95": [0.45, 0.95], "decided_win_rate": 0.75,
                                                           "decided_ci95": [0.41, 0.93]}
    result["best_of_n"] = {"temperature": 0.7, "samples": 4, "rows": [
        {"n": 4, "picked_by": "reward model", "kl_bound": 0.636, "accuracy": 0.4, "utility": 0.61, "answer_rudeness": 0.0,
         "win_rate": {"labeler": {"win_rate": 0.58, "ci95": [0.5, 0.66]}, "reward_model": {"win_rate": 0.8}}}]}
    md = build_report(tmp_path, stages={}, eval_result=result)["md"].read_text()
    wins = _table(md[md.index("with 95% intervals"):])
    assert ["PPO", "labeler", "0.700", "[0.450, 0.950]", "0.750", "[0.410, 0.930]", "6 / 2 / 2"] in wins
    assert _table(md[md.index("## Best-of-n"):], "n") == [
        ["4", "reward model", "0.636", "0.580", "[0.500, 0.660]", "0.800", "0.610", "0.400", "0.000"]]


def test_extraction_table_is_rendered_from_eval_json(tmp_path):
    result = fake_eval(tmp_path)
    counts = {"n": 4, "exact": {"8": 0.5, "32": 0.25, "64": 0.0}, "mean_matched": 9.5, "median_matched": 8}
    result["extraction"] = {"prefix_tokens": 32, "continuation_tokens": [8, 32, 64], "n_docs": {"train": 4, "heldout": 4},
                            "models": {"base": {"train": counts, "heldout": {**counts, "exact": {"8": 0.0, "32": 0.0,
                                                                                                   "64": 0.0}}}}}
    md = build_report(tmp_path, stages={}, eval_result=result)["md"].read_text()
    assert _table(md[md.index("## Memorisation"):]) == [["base", "0.500", "0.250", "0.000", "0.000", "0.000", "0.000",
                                                        "9.5", "9.5"]]
    result["extraction"] = {"error": "no document is long enough"}
    md = build_report(tmp_path, stages={}, eval_result=result)["md"].read_text()
    assert "Not measured: no document is long enough" in md


def test_reward_model_section_leads_with_the_noise_free_order(tmp_path):
    _write_metrics(tmp_path / "reward", [{"step": 0, "noise_ceiling": 0.85},
                                         {"step": 10, "val_loss": 0.6, "val_accuracy": 0.7,
                                          "val_accuracy_share_of_ceiling": 0.82, "val_accuracy_vs_oracle": 0.8,
                                          "val_accuracy_vs_oracle_ci95": [0.7, 0.88], "val_oracle_pairs": 50,
                                          "val_accuracy_vs_oracle_per_family": {
                                              "arithmetic": {"accuracy": 0.9, "ci95": [0.7, 0.97], "pairs": 20}}}])
    md = build_report(tmp_path, stages={"reward": str(tmp_path / "reward")}, eval_result={})["md"].read_text()
    section = md[md.index("## The reward model"):]
    assert _table(section, "accuracy")[0] == ["against the noise-free order (the oracle's utility)", "0.800",
                                              "[0.700, 0.880]", "50"]
    assert "share of the labels' noise ceiling (0.850)" in section
    assert _table(section, "family") == [["arithmetic", "0.900", "[0.700, 0.970]", "20"]]
