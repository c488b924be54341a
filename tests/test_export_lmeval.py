"""`tinygpt export lm-eval`: the task files lm-evaluation-harness reads, and lm_eval on an exported model
agreeing item by item with tinygpt's own greedy answers and grades (as `tinygpt evaluate` computes them)."""

from __future__ import annotations

import json
import os

import pytest
import yaml

from export_fixtures import overfit_chats, save, seeded_model, tiny_config
from tinygpt import cli
from tinygpt.export.hf import export_hf
from tinygpt.export.lmeval import GROUP, export_lm_eval
from tinygpt.generate import SamplingConfig, generate
from tinygpt.tokenizer import Tokenizer
from tinygpt.world.export import export_world
from tinygpt.world.tasks import answer_budget, grade

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
ITEMS = 2  # per family


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lmeval_world")
    export_world(root, n_stories=20, n_sft_chats=10, n_rl_prompts=10, formats=["jsonl"], progress=False)
    return root


def test_task_files(world, tmp_path):
    summary = export_lm_eval(world, tmp_path / "tasks", max_items=ITEMS)
    families = sorted(summary["families"])
    assert summary["items"] == ITEMS * len(families) and "write_story" in families
    group = yaml.safe_load((tmp_path / "tasks" / f"{GROUP}.yaml").read_text())
    assert group["task"] == [f"{GROUP}_{f}" for f in families] and group["aggregate_metric_list"][0]["weight_by_size"]
    text = (tmp_path / "tasks" / f"{GROUP}_write_story.yaml").read_text()
    assert "max_gen_toks: 176" in text and "process_results: !function tinygpt_task1_utils.process_results" in text
    rows = [json.loads(line) for line in (tmp_path / "tasks" / "data" / "arithmetic_test.jsonl").read_text().splitlines()]
    assert [r["index"] % 10 in (1, 3, 7) for r in rows] == [True] * ITEMS  # the held-out split
    # the grader lm-eval calls: the gold answer scores 1, a wrong one 0
    import importlib.util

    spec = importlib.util.spec_from_file_location("u", tmp_path / "tasks" / "tinygpt_task1_utils.py")
    utils = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(utils)
    assert utils.process_results(rows[0], [rows[0]["answer"]]) == {"acc": 1.0}
    assert utils.process_results(rows[0], ["no idea"]) == {"acc": 0.0}
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_lm_eval(world, tmp_path / "tasks")
    with pytest.raises(FileNotFoundError, match="no \\*_test.jsonl"):
        export_lm_eval(tmp_path, tmp_path / "other")
    done = cli.run(["export", "lm-eval", "--world", str(world), "--out", str(tmp_path / "cli"), "--max-items", "1"])
    assert done["items"] == len(families)
    # --checkpoint: budgets capped at the room a 128-token context leaves (lm-eval refuses max_gen_toks >= context)
    tok = Tokenizer.train([r["instruction"] for r in rows] * 3, vocab_size=300, show_progress=False)
    ckpt = save(tmp_path / "ckpt", seeded_model(tiny_config("gpt2", tok.vocab_size, block_size=128)), tok)
    capped = export_lm_eval(world, tmp_path / "capped", max_items=ITEMS, checkpoint=ckpt)["budgets"]
    assert summary["budgets"]["write_story"] == 176 and 1 <= capped["write_story"] < 128
    assert all(capped[f] <= summary["budgets"][f] for f in families)


@pytest.mark.slow
def test_lm_eval_agrees_with_tinygpt_greedy_accuracy(world, tmp_path):
    lm_eval = pytest.importorskip("lm_eval", reason="lm-eval is not installed (pip install lm-eval)")
    from lm_eval.tasks import TaskManager

    export_lm_eval(world, tmp_path / "tasks", max_items=ITEMS)
    records = [json.loads(line) for f in sorted((tmp_path / "tasks" / "data").glob("*.jsonl"))
               for line in f.read_text().splitlines()]
    texts = [json.loads(line)["text"] for line in (world / "pretrain.jsonl").read_text().splitlines()]
    tok = Tokenizer.train(texts + [r["instruction"] + " " + r["answer"] for r in records], vocab_size=600,
                          show_progress=False)
    chats = [[{"role": "user", "content": r["instruction"]}, {"role": "assistant", "content": r["answer"]}]
             for r in records]
    model = overfit_chats(seeded_model(tiny_config("llama", tok.vocab_size, block_size=512)), tok, chats, steps=100)
    export_hf(save(tmp_path / "ckpt", model, tok), tmp_path / "hf")

    # tinygpt: evaluate's greedy chat answers (render_chat, stop at <|end|>/EOS, the family's budget)
    ours = {}
    for r in records:
        prompt, _ = tok.render_chat([{"role": "user", "content": r["instruction"]}], add_generation_prompt=True)
        budget = min(answer_budget(r["family"], 48, 176), model.cfg.block_size - len(prompt))
        out = generate(model, [prompt], SamplingConfig(temperature=0.0, max_new_tokens=budget), eos_id=tok.eos_id,
                       stop_sequences=[[tok.end_id]])[0]
        reply = tok.decode(out, skip_special=True)
        ours[(r["family"], r["index"])] = (reply, grade(json.loads(r["meta"]), reply))
    accuracy = sum(score for _, score in ours.values()) / len(ours)

    results = lm_eval.simple_evaluate(model="hf", model_args={"pretrained": str(tmp_path / "hf"), "dtype": "float32"},
                                      tasks=[GROUP], task_manager=TaskManager(include_path=str(tmp_path / "tasks")),
                                      apply_chat_template=True, log_samples=True, batch_size=4, device="cpu")
    same = 0
    for family_task, samples in results["samples"].items():
        for s in samples:
            reply, score = ours[(s["doc"]["family"], s["doc"]["index"])]
            assert s["acc"] == score
            same += s["filtered_resps"][0] == reply
    theirs = results["results"][GROUP]["acc,none"]
    print(f"\nheld-out Task 1 accuracy on {len(ours)} items: tinygpt greedy {accuracy:.4f}, lm_eval {theirs:.4f}; "
          f"identical answers {same}/{len(ours)}")
    assert theirs == pytest.approx(accuracy, abs=1e-9) and same == len(ours)
    assert 0 < accuracy < 1  # the model answers some right, so agreement is not 0 == 0
