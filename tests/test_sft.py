"""SFT: chat data (validation, truncation policy, batches), the stage (exact resume, grad-accum
equivalence, NaN stop, task evaluation) and task accuracy."""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinygpt.checkpoint import CheckpointError, resolve_checkpoint, save_checkpoint
from tinygpt.data.conversations import ChatDataset, collate, fit_conversation, iter_conversations
from tinygpt.data.sources import DataError
from tinygpt.eval import tasks as eval_tasks
from tinygpt.runlog import read_metrics
from tinygpt.model import GPT, ModelConfig
from tinygpt.stages import sft
from tinygpt.stages.sft import SFTConfig, TrainingDiverged
from tinygpt.tokenizer import Tokenizer

WORDS = ["apple", "ball", "cat", "dog", "egg", "fish", "girl", "hat"]


def make_chats(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    chats = []
    for i in range(n):
        w = rng.choice(WORDS)
        msgs = [{"role": "system", "content": "Be kind."}] if i % 3 == 0 else []
        msgs += [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]
        if i % 2:
            v = rng.choice(WORDS)
            msgs += [{"role": "user", "content": f"Now say {v}."}, {"role": "assistant", "content": v}]
        chats.append({"messages": msgs})
    return chats


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


@pytest.fixture(autouse=True)
def one_thread():
    """Tiny matrices: one thread is fastest, and keeps timings steady on a busy 2-core machine."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("sft")
    chats = make_chats(48)
    texts = [m["content"] for c in chats for m in c["messages"]] * 3 + ["Say", "Now say"]
    tok = Tokenizer.train(texts, vocab_size=300, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, d_model=32)
    save_checkpoint(root / "init", model=GPT(cfg), model_config=cfg, tokenizer_json=tok.to_str(),
                    meta={"stage": "pretrain", "step": 0})
    write_jsonl(root / "train.jsonl", chats)
    write_jsonl(root / "val.jsonl", make_chats(8, seed=1))
    tasks = [{"family": "arithmetic", "index": i, "instruction": f"What is {i} plus 1?", "answer": str(i + 1),
              "meta": {"family": "arithmetic", "gold": str(i + 1)}} for i in range(3)]
    write_jsonl(root / "tasks.jsonl", tasks)
    return {"root": root, "tok": tok, "init": root / "init"}


def _cfg(world, out, **kw) -> SFTConfig:
    base = dict(init=str(world["init"]), data=str(world["root"] / "train.jsonl"), out=str(out), batch_size=4,
                max_steps=8, warmup_steps=2, lr=3e-3, eval_every=100, log_every=1, save_every=100,
                device="cpu", dtype="float32", progress=False, seed=5)
    base.update(kw)
    return SFTConfig(**base)


def _losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_checkpoint(run) / "model.safetensors"))


# --- data ---------------------------------------------------------------------------------------------


def test_collate_shifts_targets_and_mask_and_pads_right():
    # <|bos|> <|user|> 10 <|end|> <|assistant|> 11 <|end|>: trained on 11 and the closing <|end|>
    ids, mask = [1, 4, 10, 6, 5, 11, 6], [0, 0, 0, 0, 0, 1, 1]
    short_ids, short_mask = [1, 5, 12, 6], [0, 0, 1, 1]
    x, y, m = collate([(ids, mask), (short_ids, short_mask)], pad_id=0)
    assert x.tolist() == [[1, 4, 10, 6, 5, 11], [1, 5, 12, 0, 0, 0]]
    assert y.tolist() == [[4, 10, 6, 5, 11, 6], [5, 12, 6, 0, 0, 0]]
    assert m.tolist() == [[0, 0, 0, 0, 1, 1], [0, 1, 1, 0, 0, 0]]


def test_render_matches_template_and_mask_covers_only_answers(world):
    tok = world["tok"]
    msgs = [{"role": "user", "content": "Say cat."}, {"role": "assistant", "content": "cat"}]
    fitted = fit_conversation(tok, msgs, max_tokens=100)
    ids, mask = tok.render_chat(msgs)
    assert (fitted.ids, fitted.mask) == (ids, mask)
    trained = [i for i, k in zip(ids, mask) if k]
    assert tok.decode(trained) == "cat<|end|>"


def test_truncation_drops_oldest_exchanges_keeps_system_then_cuts_right(world):
    tok = world["tok"]
    system = {"role": "system", "content": "Be kind."}
    ex = lambda w: [{"role": "user", "content": f"Say {w}."}, {"role": "assistant", "content": w}]  # noqa: E731
    msgs = [system] + ex("apple") + ex("ball") + ex("cat") + [{"role": "user", "content": "Say dog."}]
    last_only = tok.render_chat([system] + ex("cat"))[0]
    fitted = fit_conversation(tok, msgs, max_tokens=len(last_only))
    assert fitted.ids == last_only and not fitted.truncated
    assert fitted.dropped_messages == 1 + 4  # the unanswered user turn, then two whole exchanges
    # too small for even system + last exchange: cut from the right, the answer's start survives
    cut = fit_conversation(tok, msgs, max_tokens=len(last_only) - 1)
    assert cut.truncated and cut.ids == last_only[:-1] and cut.has_target
    # so small that no answer token is left: no target
    assert not fit_conversation(tok, msgs, max_tokens=6).has_target


def test_dataset_counts_truncation_and_skips(world, tmp_path):
    long = {"messages": [{"role": "user", "content": "Say " + " ".join(WORDS * 6)}, {"role": "assistant", "content": "ok"}]}
    path = write_jsonl(tmp_path / "c.jsonl", make_chats(4) + [long])
    ds = ChatDataset(path, world["tok"], max_tokens=20)
    assert ds.stats.conversations == 5 and ds.stats.skipped_no_target == 1 and len(ds) == 4
    assert "c.jsonl:5" in ds.stats.first_skipped[0]


@pytest.mark.parametrize("line,match", [
    ({"messages": [{"role": "robot", "content": "hi"}]}, r"bad\.jsonl:3: field 'messages': message 0: field 'role'"),
    ({"text": "hi"}, r"bad\.jsonl:3: missing field 'messages'"),
    ({"messages": [{"role": "user", "content": "hi"}]}, r"bad\.jsonl:3: .*no assistant message"),
    ({"messages": [{"role": "user", "content": 3}, {"role": "assistant", "content": "x"}]}, r"bad\.jsonl:3: .*content"),
])
def test_bad_records_name_file_and_line(world, tmp_path, line, match):
    path = write_jsonl(tmp_path / "bad.jsonl", make_chats(2) + [line])
    with pytest.raises(DataError, match=match):
        ChatDataset(path, world["tok"], max_tokens=40)
    ds = ChatDataset(path, world["tok"], max_tokens=40, skip_bad=True)
    assert len(ds) == 2 and ds.stats.skipped_bad == 1


def test_reads_a_datasets_directory(world, tmp_path):
    from datasets import Dataset

    chats = make_chats(5)
    Dataset.from_list(chats).save_to_disk(str(tmp_path / "ds"))
    got = [m for _, m in iter_conversations(tmp_path / "ds")]
    assert got == [c["messages"] for c in chats]


def test_batches_are_pure_rank_slices_and_epochs_cover_every_example(world):
    ds = ChatDataset(world["root"] / "train.jsonl", world["tok"], max_tokens=49)
    assert ds.indices(3, 8, seed=1) == ds.indices(3, 4, seed=1, rank=0, world_size=2) + \
        ds.indices(3, 4, seed=1, rank=1, world_size=2)
    x1, y1, m1 = ds.batch(5, 4, seed=2)
    x2, y2, m2 = ds.batch(5, 4, seed=2)
    assert torch.equal(x1, x2) and torch.equal(y1, y2) and torch.equal(m1, m2)
    epoch = [i for s in range(len(ds) // 8) for i in ds.indices(s, 8, seed=1)]
    assert sorted(epoch) == list(range(len(ds)))
    assert ds.target_count(3, 4, seed=1, world_size=2) == sum(sum(ds.examples[i][1][1:]) for i in ds.indices(3, 8, seed=1))


# --- the stage ----------------------------------------------------------------------------------------


def test_resume_is_bit_identical_and_metadata_says_sft(world, tmp_path):
    sft.main(_cfg(world, tmp_path / "straight"))
    sft.main(_cfg(world, tmp_path / "split", stop_after=3))
    assert resolve_checkpoint(tmp_path / "split").name == "step_00000003"
    sft.main(_cfg(world, tmp_path / "split", resume=True))
    straight, split = _losses(tmp_path / "straight"), _losses(tmp_path / "split")
    assert [s for s, _ in straight] == list(range(1, 9))
    assert straight == split
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert straight[-1][1] < straight[0][1]
    meta = json.loads((resolve_checkpoint(tmp_path / "straight") / "tinygpt.json").read_text())
    assert meta["stage"] == "sft" and meta["step"] == 8 and meta["lora"] is None
    assert (tmp_path / "straight" / "loss.png").is_file()


def test_grad_accum_equals_one_big_batch(world, tmp_path):
    """2 micro-batches of 4 == 1 batch of 8: same rows, and the loss is averaged over target tokens."""
    sft.main(_cfg(world, tmp_path / "accum", batch_size=4, grad_accum=2, max_steps=3))
    sft.main(_cfg(world, tmp_path / "big", batch_size=8, grad_accum=1, max_steps=3))
    for (sa, la), (sb, lb) in zip(_losses(tmp_path / "accum"), _losses(tmp_path / "big")):
        assert sa == sb and abs(la - lb) < 1e-5
    a, b = _weights(tmp_path / "accum"), _weights(tmp_path / "big")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


@pytest.mark.slow
def test_ddp_two_ranks_equal_one_process(world, tmp_path):
    """torchrun with 2 gloo ranks of 4 conversations == 1 process with batches of 8 (token-weighted loss)."""
    import os
    import subprocess
    import sys

    args = ["--init", str(world["init"]), "--data", str(world["root"] / "train.jsonl"), "--max-steps", "3",
            "--warmup-steps", "2", "--lr", "3e-3", "--eval-every", "100", "--log-every", "1", "--save-every", "100",
            "--device", "cpu", "--dtype", "float32", "--progress", "false", "--seed", "5"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29518",
           "-m", "tinygpt.cli", "sft", "--out", str(tmp_path / "ddp"), "--batch-size", "4", *args]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    sft.main(_cfg(world, tmp_path / "single", batch_size=8, max_steps=3))
    ddp, single = _losses(tmp_path / "ddp"), _losses(tmp_path / "single")
    assert [s for s, _ in ddp] == [s for s, _ in single] == [1, 2, 3]
    for (_, a), (_, b) in zip(ddp, single):
        assert abs(a - b) < 1e-5
    a, b = _weights(tmp_path / "ddp"), _weights(tmp_path / "single")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)


def test_epochs_set_max_steps_and_val_loss_is_logged(world, tmp_path):
    result = sft.main(_cfg(world, tmp_path / "ep", max_steps=0, epochs=1.0, batch_size=8,
                           eval_data=str(world["root"] / "val.jsonl"), eval_every=3))
    assert result["max_steps"] == 6  # 48 conversations / 8
    vals = [r for r in read_metrics(tmp_path / "ep" / "metrics.jsonl") if "val_loss" in r]
    assert [r["step"] for r in vals] == [3, 6]


def test_nan_loss_stops_without_writing_a_checkpoint(world, tmp_path, monkeypatch):
    real, calls = sft.lm_loss, {"n": 0}

    def poisoned(logits, targets, mask=None):
        calls["n"] += 1
        loss = real(logits, targets, mask)
        return loss * float("nan") if calls["n"] > 4 else loss

    monkeypatch.setattr(sft, "lm_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="step 4"):
        sft.main(_cfg(world, tmp_path / "nan", save_every=2))
    assert resolve_checkpoint(tmp_path / "nan").name == "step_00000004"


def test_resume_without_checkpoint_is_an_error(world, tmp_path):
    with pytest.raises(CheckpointError, match="no checkpoint"):
        sft.main(_cfg(world, tmp_path / "fresh", resume=True))


def test_task_eval_reports_accuracy_per_family(world, tmp_path):
    result = sft.main(_cfg(world, tmp_path / "te", max_steps=2, task_eval=str(world["root"] / "tasks.jsonl"),
                           task_max_new_tokens=4))
    assert result["task_accuracy"] == 0.0  # a 2-step model cannot add
    recs = [r for r in read_metrics(tmp_path / "te" / "metrics.jsonl") if "task_accuracy" in r]
    assert recs and "task_accuracy/arithmetic" in recs[-1]


# --- task accuracy --------------------------------------------------------------------------------------


def test_task_accuracy_grades_per_family_and_per_chat_turn(world, monkeypatch):
    records = [
        {"family": "arithmetic", "instruction": "What is 2 plus 2?", "meta": {"family": "arithmetic", "gold": "4"}},
        {"family": "arithmetic", "instruction": "What is 3 plus 2?", "meta": {"family": "arithmetic", "gold": "5"}},
        {"family": "reverse_words", "instruction": "Please reverse: a b",
         "meta": json.dumps({"family": "reverse_words", "gold": "b a"})},  # datasets dirs store meta as JSON text
        {"family": "chat:arithmetic_followup",
         "messages": [{"role": "user", "content": "What is 1 plus 1?"}, {"role": "assistant", "content": "2"},
                      {"role": "user", "content": "Now add 3."}, {"role": "assistant", "content": "5"}],
         "meta": {"turns": [{"family": "arithmetic", "gold": "2"}, {"family": "arithmetic", "gold": "5"}]}},
    ]
    seen = []

    def fake_complete(model, tokenizer, conversations, **kw):
        seen.extend(conversations)
        replies = {"What is 2 plus 2?": "4", "What is 3 plus 2?": "6", "Please reverse: a b": "b a",
                   "What is 1 plus 1?": "2", "Now add 3.": "5"}
        return [replies[c[-1]["content"]] for c in conversations]

    monkeypatch.setattr(eval_tasks, "complete", fake_complete)
    result = eval_tasks.task_accuracy(None, world["tok"], records)
    assert result["n"] == 5 and result["accuracy"] == pytest.approx(4 / 5)
    assert result["per_family"]["arithmetic"] == {"accuracy": 0.5, "n": 2}
    assert result["per_family"]["chat:arithmetic_followup"] == {"accuracy": 1.0, "n": 2}
    # the second chat turn is asked with the gold history before it
    assert seen[-1] == records[3]["messages"][:3]


def test_answer_stops_at_end_and_fits_the_context(world):
    torch.manual_seed(0)
    tok = world["tok"]
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16))
    model.lm_head = torch.nn.Linear(16, tok.vocab_size, bias=True)  # <|end|> always wins: every answer is empty
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[tok.end_id] = 10.0
    assert eval_tasks.answer(model, tok, ["Say cat.", "Say " + "dog " * 30]) == ["", ""]
    assert eval_tasks.complete(model, tok, [[{"role": "user", "content": "Say " + "dog " * 30}]]) == [None]
