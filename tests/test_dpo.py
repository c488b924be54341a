"""The `tinygpt dpo` stage on a tiny model and toy preference pairs."""

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinygpt.checkpoint import resolve_checkpoint, save_checkpoint
from tinygpt.data.preferences import PreferenceDataset
from tinygpt.runlog import read_metrics
from tinygpt.model import GPT, ModelConfig
from tinygpt.stages import dpo
from tinygpt.stages.dpo import DPOConfig, response_logprobs
from tinygpt.tokenizer import Tokenizer

ANSWER, RUDE = "The answer is {}.", "You are a silly fool!"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dpo")
    texts = [f"What is {a} plus {b}? {ANSWER.format(a + b)} {RUDE}" for a in range(10) for b in range(10)]
    tok = Tokenizer.train(texts, vocab_size=300, show_progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    save_checkpoint(root / "sft", model=GPT(cfg), model_config=cfg, tokenizer_json=tok.to_str(), meta={"stage": "sft"})

    def pair(a: int, b: int) -> dict:
        return {"prompt": [{"role": "user", "content": f"What is {a} plus {b}?"}],
                "chosen": ANSWER.format(a + b), "rejected": RUDE}

    train = [pair(a, b) for a in range(0, 10, 2) for b in range(0, 10, 3)]
    val = [pair(a, b) for a, b in [(1, 1), (3, 2), (5, 5), (7, 4)]]
    for name, records in (("pairs", train), ("val", val)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "tok": tok}


def _cfg(world, out, **kw) -> DPOConfig:
    root = world["root"]
    base = dict(init=str(root / "sft"), pairs=str(root / "pairs.jsonl"), val_pairs=str(root / "val.jsonl"),
                out=str(out), beta=0.1, batch_size=4, max_steps=6, lr=3e-3, min_lr=3e-4, warmup_steps=2,
                eval_every=3, log_every=1, save_every=100, device="cpu", dtype="float32", progress=False, seed=3)
    base.update(kw)
    return DPOConfig(**base)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_checkpoint(run) / "model.safetensors"))


def test_dpo_trains_every_parameter_and_prefers_the_chosen_answers(world, tmp_path):
    out = tmp_path / "dpo"
    result = dpo.main(_cfg(world, out, max_steps=10, eval_every=5))
    recs = [r for r in read_metrics(out / "metrics.jsonl") if "loss" in r]
    # step 1 is computed before any update: policy == reference, so every implicit reward is 0 and the loss log 2
    assert recs[0]["step"] == 1 and recs[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert recs[0]["chosen_reward"] == pytest.approx(0.0, abs=1e-6) and recs[0]["margin"] == pytest.approx(0.0, abs=1e-6)
    assert recs[-1]["loss"] < math.log(2) and recs[-1]["margin"] > 0
    assert result["val_accuracy"] > 0.5 and result["val_margin"] > 0  # chance 0.5, margin 0
    assert {"val_loss", "val_chosen_reward", "val_rejected_reward"} <= set(result)
    init, trained = load_file(str(world["root"] / "sft" / "model.safetensors")), _weights(out)
    for name, tensor in init.items():
        assert not torch.equal(tensor, trained[name]), f"{name} did not change"
    assert (out / "loss.png").is_file() and (out / "rewards.png").is_file()


def test_dpo_resume_is_bit_identical(world, tmp_path):
    dpo.main(_cfg(world, tmp_path / "straight", max_steps=4, eval_every=100))
    dpo.main(_cfg(world, tmp_path / "split", max_steps=4, eval_every=100, stop_after=2))
    dpo.main(_cfg(world, tmp_path / "split", max_steps=4, eval_every=100, resume=True))

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]

    assert losses(tmp_path / "straight") == losses(tmp_path / "split") and len(losses(tmp_path / "split")) == 4
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_response_logprobs_count_only_the_answer_and_its_end(world):
    """The sequence log-prob is the sum of log p over the assistant's tokens and <|end|>, worked token by token."""
    tok = world["tok"]
    data = PreferenceDataset(world["root"] / "val.jsonl", tok, max_tokens=49)
    batch = next(data.eval_batches(2))
    torch.manual_seed(2)
    model = GPT(ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=1, n_head=2, d_model=32)).eval()
    with torch.no_grad():
        got = response_logprobs(model, batch)
        for row in range(batch.ids.shape[0]):
            ids = batch.ids[row, :int(batch.lengths[row])].tolist()
            start = ids.index(tok.assistant_id) + 1  # first answer token
            logp = torch.log_softmax(model(torch.tensor([ids[:-1]]))[0], -1)  # (T-1, V)
            expected = sum(logp[t - 1, ids[t]].item() for t in range(start, len(ids)))
            assert got[row].item() == pytest.approx(expected, abs=1e-4)


def test_bad_config_is_explained(world, tmp_path):
    with pytest.raises(ValueError, match="--pairs is required"):
        dpo.main(DPOConfig(init=str(world["root"] / "sft"), out=str(tmp_path), device="cpu"))
    with pytest.raises(ValueError, match="--beta must be > 0"):
        dpo.main(_cfg(world, tmp_path / "b", beta=0.0))
