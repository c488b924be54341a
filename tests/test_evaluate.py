"""`tinygpt evaluate` on a tiny world with tiny random checkpoints (one base, one chat), and few-shot
prompting: prompt layout, demonstrations from the train split, dropping demonstrations to fit, cutting at
the first newline, grading."""

import json
import random

import pytest
import torch

from tinygpt.checkpoint import save_checkpoint
from tinygpt.data.shards import prepare_shards
from tinygpt.eval import fewshot
from tinygpt.eval.fewshot import fewshot_accuracy, fewshot_prompt_ids, fewshot_text, pick_demonstrations
from tinygpt.model import GPT, ModelConfig
from tinygpt.stages import evaluate
from tinygpt.stages.evaluate import EvaluateConfig, parse_checkpoints
from tinygpt.tokenizer import Tokenizer
from tinygpt.world.export import export_world
from tinygpt.world.split import Split

FAMILIES = ["arithmetic", "reverse_words", "summary"]


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("evaluate")
    world = root / "world"
    export_world(world, n_stories=120, n_sft_chats=30, n_rl_prompts=5, formats=("jsonl",), split=Split(n=20),
                 families=FAMILIES, progress=False)
    texts = [json.loads(line)["text"] for line in (world / "pretrain.jsonl").read_text().splitlines()]
    for path in sorted((world / "tasks").glob("*.jsonl")):
        for line in path.read_text().splitlines():
            r = json.loads(line)
            texts += [r["instruction"], r["answer"]]
    tok = Tokenizer.train(texts, vocab_size=400, show_progress=False)
    prepare_shards([world / "pretrain.jsonl"], tok, root / "data", val_fraction=0.2, seed=0, show_progress=False)
    ckpts = {}
    for name, stage, seed in (("base", "pretrain", 0), ("chat", "sft", 1)):
        torch.manual_seed(seed)
        mcfg = ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2, d_model=32)
        ckpts[name] = save_checkpoint(root / name, model=GPT(mcfg), model_config=mcfg, tokenizer_json=tok.to_str(),
                                      meta={"stage": stage, "step": 10})
    return root, world, ckpts, tok


def _cfg(root, world, ckpts, **kw):
    base = dict(checkpoints=[f"base={ckpts['base']}", f"chat={ckpts['chat']}"], world=str(world),
                data=str(root / "data"), out=str(root / "out"), max_items=3, shots=1, max_new_tokens=6,
                n_stories=4, max_story_tokens=40, pass_n=3, pass_k=[1, 2], pass_items=2, baseline=str(ckpts["chat"]),
                eval_batches=2, device="cpu", dtype="float32", progress=False)
    base.update(kw)
    return EvaluateConfig(**base)


def test_evaluate_writes_one_row_per_checkpoint(setup):
    root, world, ckpts, tok = setup
    summary = evaluate.main(_cfg(root, world, ckpts))
    out = root / "out"
    saved = json.loads((out / "eval.json").read_text())
    assert saved["test_items"] == 3 * len(FAMILIES)
    results = saved["checkpoints"]
    assert list(results) == ["base", "chat"]
    assert results["base"]["kind"] == "base" and results["chat"]["kind"] == "chat"
    for name, r in results.items():
        assert 1.0 < r["perplexity"]["perplexity"] < 2 * tok.vocab_size  # a random model is near uniform
        assert set(r["tasks"]["per_family"]) == set(FAMILIES)
        assert 0.0 <= r["tasks"]["accuracy"] <= 1.0 and 0.0 <= r["tasks"]["answer_rudeness"] <= 1.0
        assert r["tasks"]["summary_bleu"] is not None
        assert 0.0 <= r["pass_at_k"]["pass@1"] <= r["pass_at_k"]["pass@2"] <= 1.0
        assert r["stories"]["n"] == 4 and 0.0 <= r["stories"]["grammar"] <= 1.0
        assert "ngram_novelty" in r["stories"]
        answers = (out / "answers" / f"{name}.jsonl").read_text().splitlines()
        assert len(answers) == 3 * len(FAMILIES)
    # win rates compare 2 answers sampled per item; the baseline against itself (same seed): every one a tie
    labeler = results["chat"]["win_rate"]["labeler"]
    assert {k: labeler[k] for k in ("win_rate", "wins", "ties", "losses", "n")} == {
        "win_rate": 0.5, "wins": 0, "ties": 18, "losses": 0, "n": 18}
    assert labeler["ci95"] == [0.5, 0.5] and labeler["decided_win_rate"] is None  # all ties: nothing decided
    assert results["base"]["win_rate"]["labeler"]["n"] == 18
    for name, r in results.items():
        s = r["sampled_answers"]
        assert s["temperature"] == 0.7 and s["n"] == 2 and 0.0 <= s["answer_rudeness"] <= 1.0
        assert 0.0 <= s["accuracy"] <= 1.0 and 0.0 <= s["utility"] <= 2.5
        assert len((out / "answers" / f"{name}_sampled.jsonl").read_text().splitlines()) == 18
    # the baseline may be named by its --checkpoints NAME instead of its path
    greedy = evaluate.main(_cfg(root, world, ckpts, out=str(root / "greedy"), win_temperature=0.0, n_stories=0,
                                pass_n=0, contamination=False, baseline="chat"))["checkpoints"]
    labeler = greedy["chat"]["win_rate"]["labeler"]
    assert {k: labeler[k] for k in ("win_rate", "wins", "ties", "losses", "n")} == {
        "win_rate": 0.5, "wins": 0, "ties": 9, "losses": 0, "n": 9}
    assert "sampled_answers" not in greedy["chat"]
    assert set(saved["contamination"]["sets"]) == {f"tasks/{f}_test" for f in FAMILIES} | {"sft_test"}
    table = (out / "eval.md").read_text()
    assert "| base | base |" in table and "| chat | chat |" in table and "Contamination" in table
    assert summary["checkpoints"]["chat"]["tasks"] == results["chat"]["tasks"]


def test_evaluate_is_deterministic_and_skips_what_is_off(setup):
    root, world, ckpts, _ = setup
    kw = dict(checkpoints=[str(ckpts["chat"])], data="", n_stories=0, pass_n=0, baseline="", contamination=False)
    first = evaluate.main(_cfg(root, world, ckpts, out=str(root / "a"), **kw))
    second = evaluate.main(_cfg(root, world, ckpts, out=str(root / "b"), **kw))
    (r1,), (r2,) = first["checkpoints"].values(), second["checkpoints"].values()
    assert r1["tasks"] == r2["tasks"]
    assert not {"perplexity", "stories", "pass_at_k", "win_rate"} & set(r1)
    assert first["contamination"] is None


def test_bad_configs_are_refused(setup, tmp_path):
    root, world, ckpts, _ = setup
    with pytest.raises(ValueError, match="pass-k"):
        evaluate.main(_cfg(root, world, ckpts, pass_n=2, pass_k=[5]))
    with pytest.raises(ValueError, match="checkpoints"):
        evaluate.main(_cfg(root, world, ckpts, checkpoints=[]))
    with pytest.raises(ValueError, match="win-samples"):
        evaluate.main(_cfg(root, world, ckpts, win_samples=0))
    with pytest.raises(ValueError, match="two checkpoints named"):
        parse_checkpoints([f"x={ckpts['base']}", f"x={ckpts['chat']}"])
    assert set(parse_checkpoints([str(ckpts["base"])])) == {"base"}
    with pytest.raises(ValueError, match="another tokenizer"):
        other = Tokenizer.train(["completely different text"] * 50, vocab_size=300, show_progress=False)
        corpus = tmp_path / "c.jsonl"
        corpus.write_text("".join(json.dumps({"text": f"doc {i} " * 30}) + "\n" for i in range(50)))
        prepare_shards([corpus], other, tmp_path / "data", val_fraction=0.5, seed=0, show_progress=False)
        evaluate.main(_cfg(root, world, ckpts, data=str(tmp_path / "data"), out=str(tmp_path / "o"), n_stories=0,
                           pass_n=0, baseline="", contamination=False))


# --- few-shot ---------------------------------------------------------------------------------------------

TRAIN = [{"family": "arithmetic", "index": i, "instruction": f"What is {i} plus 1?", "answer": str(i + 1),
          "meta": {"family": "arithmetic", "gold": str(i + 1)}} for i in range(10)]
TEST = [{"family": "arithmetic", "index": 100 + i, "instruction": f"What is {i} plus 2?", "answer": str(i + 2),
         "meta": {"family": "arithmetic", "gold": str(i + 2)}} for i in range(4)]


def test_fewshot_text_layout():
    text = fewshot_text("What is 8 plus 31?", [("What is 3 plus 4?", "7"), ("Tell\na story", "Once.\nThe end.")])
    assert text == ("Q: What is 3 plus 4?\nA: 7\n\nQ: Tell\na story\nA: Once. The end.\n\n"
                    "Q: What is 8 plus 31?\nA:")
    assert fewshot_text("Hi?", []) == "Q: Hi?\nA:"


def test_demonstrations_come_from_train_and_are_dropped_to_fit(setup):
    *_, tok = setup
    demos = pick_demonstrations(TRAIN, 3, random.Random(0), exclude=TRAIN[0]["instruction"])
    assert len(demos) == 3 and all(q != TRAIN[0]["instruction"] for q, _ in demos)
    with pytest.raises(ValueError, match="needs 20 train records"):
        pick_demonstrations(TRAIN, 20, random.Random(0))
    full, k = fewshot_prompt_ids(tok, "What is 8 plus 31?", demos, budget=10_000)
    assert k == 3 and full[0] == tok.bos_id
    one_demo = len(tok.encode(fewshot_text("What is 8 plus 31?", demos[2:]), add_bos=True))
    ids, k = fewshot_prompt_ids(tok, "What is 8 plus 31?", demos, budget=one_demo)
    assert k == 1 and len(ids) == one_demo  # the first demonstrations went
    assert fewshot_prompt_ids(tok, "What is 8 plus 31?", demos, budget=3) == (None, 0)


def test_fewshot_accuracy_cuts_at_the_first_newline(setup, monkeypatch):
    *_, tok = setup
    mcfg = ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=1, n_head=2, d_model=32)
    replies = iter(["2\nQ: What", " 5\n\n", "4", " nine"])  # right, wrong, right (EOS), wrong

    def canned(model, prompts, cfg, **kwargs):
        assert cfg.temperature == 0.0
        text = [tok.decode(p) for p in prompts]
        assert all(t.count("Q: ") == 3 and t.endswith("plus 2?\nA:") for t in text)  # 2 demonstrations + question
        return [tok.encode(next(replies)) for _ in prompts]

    monkeypatch.setattr(fewshot, "generate", canned)
    result = fewshot_accuracy(GPT(mcfg), tok, TEST, TRAIN, shots=2, batch_size=1)
    assert result["accuracy"] == 0.5 and result["n"] == 4 and result["too_long"] == 0
    assert result["per_family"]["arithmetic"] == {"accuracy": 0.5, "n": 4, "mean_shots": 2.0}
    assert [e["prediction"] for e in result["examples"]["arithmetic"]] == ["2", "5", "4"]


def test_spread_limit_takes_every_family_in_turn():
    from tinygpt.eval.tasks import spread_limit
    records = [{"family": f, "i": i} for f in ("a", "b", "c") for i in range(5)]
    picked = spread_limit(records, 7)
    assert [(r["family"], r["i"]) for r in picked] == [("a", 0), ("b", 0), ("c", 0), ("a", 1), ("b", 1), ("c", 1),
                                                       ("a", 2)]
    assert spread_limit(records, 0) == records and spread_limit(records, 99) == records
    assert len(spread_limit(records[:6], 6)) == 6  # a short family runs out; the others fill in
    assert [r["family"] for r in spread_limit(records[:6] + records[10:], 8)] == ["a", "b", "c", "a", "c", "a", "c", "a"]


def test_every_checkpoint_answers_the_same_prompts_and_the_base_model_draws_attention(setup, tmp_path, monkeypatch):
    """What the report shows beside the scores comes from evaluate: it loads no model itself."""
    from tinygpt.eval import answerer

    budgets = []
    for fn in ("answer", "continue_text"):
        real = getattr(answerer, fn)
        monkeypatch.setattr(answerer, fn, lambda m, t, p, n, _real=real, **kw: budgets.append(n) or _real(m, t, p, n, **kw))
    root, world, ckpts, tok = setup
    prompts = ["What is 3 plus 4?", "Write a short story about a cat named Tom."]
    summary = evaluate.main(_cfg(root, world, ckpts, out=str(tmp_path / "out"), prompts=prompts, pass_n=0,
                                 n_stories=0, baseline="", data="", contamination=False, long_max_new_tokens=12))
    results = summary["checkpoints"]
    assert results["base"]["same_prompts"]["how"] == "base: plain-text continuation"
    assert results["chat"]["same_prompts"]["how"] == "chat template"
    for r in results.values():
        assert r["same_prompts"]["prompts"] == prompts and len(r["same_prompts"]["answers"]) == 2
    # a free-form prompt has no family: the long budget (12 here); task answers got their family's
    assert sorted(budgets) == [6, 6, 6, 12, 12]  # the chat model's 3 task families; the free prompts, both models
    attention = summary["attention"]
    assert attention["checkpoint"] == str(ckpts["base"]) and attention["tokens"] == 40
    assert (tmp_path / "out" / attention["figure"]).is_file()
    assert {p["rule"] for p in attention["picks"]} <= {"previous_token", "repeated_token", "most_focused"}
    off = evaluate.main(_cfg(root, world, ckpts, out=str(tmp_path / "off"), pass_n=0, n_stories=0, baseline="",
                             data="", contamination=False, attention=False))
    assert off["attention"] is None and "same_prompts" not in off["checkpoints"]["chat"]



def test_best_of_n_rows_for_the_baseline(setup, tmp_path):
    """Best-of-1 is the baseline's own first sample; picking by the noiseless labeler can only raise utility."""
    root, world, ckpts, tok = setup
    summary = evaluate.main(_cfg(root, world, ckpts, out=str(tmp_path / "out"), checkpoints=[f"chat={ckpts['chat']}"],
                                 baseline="chat", best_of=[1, 4], pass_n=0, n_stories=0, data="", contamination=False,
                                 attention=False))
    bon = summary["best_of_n"]
    assert bon["name"] == "chat" and bon["samples"] == 4
    rows = {(r["n"], r["picked_by"]): r for r in bon["rows"]}
    assert set(rows) == {(1, "labeler"), (4, "labeler")}  # no --reward: the labeler alone
    assert rows[(1, "labeler")]["kl_bound"] == 0.0 and rows[(4, "labeler")]["kl_bound"] > 0.6
    assert rows[(4, "labeler")]["utility"] >= rows[(1, "labeler")]["utility"]
    for r in rows.values():
        assert 0.0 <= r["win_rate"]["labeler"]["win_rate"] <= 1.0 and r["win_rate"]["labeler"]["n"] == 18
    with pytest.raises(ValueError, match="--best-of"):
        evaluate.main(_cfg(root, world, ckpts, out=str(tmp_path / "bad"), best_of=[4], baseline=""))


def test_extraction_table_of_every_checkpoint(setup, tmp_path):
    root, world, ckpts, tok = setup
    summary = evaluate.main(_cfg(root, world, ckpts, out=str(tmp_path / "out"), extraction_docs=3, pass_n=0,
                                 n_stories=0, baseline="", contamination=False, attention=False))
    ext = summary["extraction"]
    assert "error" not in ext, ext
    assert set(ext["models"]) == {"base", "chat"} and ext["continuation_tokens"] == [8, 32, 64]
    for m in ext["models"].values():
        for split in ("train", "heldout"):
            assert set(m[split]["exact"]) == {8, 32, 64} and all(0 <= v <= 1 for v in m[split]["exact"].values())
    saved = json.loads((tmp_path / "out" / "eval.json").read_text())["extraction"]
    assert saved["models"]["base"]["train"]["exact"]["8"] == ext["models"]["base"]["train"]["exact"][8]
