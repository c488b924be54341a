"""The reward model: scoring (reward_model.py) and the `tinygpt reward` stage on a tiny model and toy preferences."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinygpt.checkpoint import CheckpointError, load_meta, resolve_checkpoint, save_checkpoint
from tinygpt.runlog import read_metrics
from tinygpt.model import GPT, ModelConfig
from tinygpt.reward_model import load_reward_model, render_prompt_response, score
from tinygpt.stages import reward
from tinygpt.stages.reward import RewardConfig, TrainingDiverged
from tinygpt.tokenizer import Tokenizer

ANSWER, UNSURE, RUDE = "The answer is {}.", "I do not know.", "You are a silly fool!"


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict:
    """A tiny tokenizer, a random 'SFT' checkpoint, toy rankings (correct > unsure > rude) and demonstrations."""
    root = tmp_path_factory.mktemp("reward")
    texts = [f"What is {a} plus {b}? {ANSWER.format(a + b)} {UNSURE} {RUDE}" for a in range(10) for b in range(10)]
    tok = Tokenizer.train(texts, vocab_size=300, show_progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, d_model=32)
    torch.manual_seed(0)
    save_checkpoint(root / "sft", model=GPT(cfg), model_config=cfg, tokenizer_json=tok.to_str(), meta={"stage": "sft"})

    def ranking(a: int, b: int, order=(0, 1, 2)) -> dict:
        return {"prompt": f"What is {a} plus {b}?", "completions": [ANSWER.format(a + b), UNSURE, RUDE],
                "ranking": list(order), "utilities": [2.5, 1.5, 0.5]}

    train = [ranking(a, b) for a in range(0, 10, 2) for b in range(0, 10, 3)]  # 20 prompts, 60 pairs
    # held out: 6 other prompts; one labeler mistake (unsure ranked over the answer): noise ceiling 17/18
    val = [ranking(a, b) for a, b in [(1, 1), (3, 2), (5, 5), (7, 4), (9, 8)]] + [ranking(1, 8, order=(1, 0, 2))]
    demos = [{"messages": [{"role": "user", "content": f"What is {a} plus {a}?"},
                           {"role": "assistant", "content": ANSWER.format(2 * a)}]} for a in range(8)]
    for name, records in (("rankings", train), ("val", val), ("demos", demos)):
        (root / f"{name}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return {"root": root, "tok": tok}


def _cfg(world, out, **kw) -> RewardConfig:
    root = world["root"]
    base = dict(init=str(root / "sft"), rankings=str(root / "rankings.jsonl"), val_rankings=str(root / "val.jsonl"),
                demonstrations=str(root / "demos.jsonl"), out=str(out), batch_size=4, max_steps=6, lr=3e-3,
                min_lr=3e-4, warmup_steps=2, eval_every=3, log_every=1, save_every=100, device="cpu",
                dtype="float32", progress=False, seed=3)
    base.update(kw)
    return RewardConfig(**base)


def _weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_checkpoint(run) / "model.safetensors"))


def test_reward_model_learns_toy_preferences_and_is_shifted(world, tmp_path):
    out = tmp_path / "rm"
    result = reward.main(_cfg(world, out, max_steps=12, eval_every=6))
    assert result["noise_ceiling"] == pytest.approx(17 / 18)
    assert result["val_accuracy"] > 0.8  # chance is 0.5
    assert result["val_accuracy_vs_oracle"] > 0.8
    low, high = result["val_accuracy_vs_oracle_ci95"]  # the headline's 95% interval, and per family
    assert low <= result["val_accuracy_vs_oracle"] <= high and high - low > 0
    per_family = result["val_accuracy_vs_oracle_per_family"]
    assert sum(f["pairs"] for f in per_family.values()) == result["val_oracle_pairs"]
    assert result["val_accuracy_share_of_ceiling"] == pytest.approx(result["val_accuracy"] / (17 / 18))
    # every weight tensor moved, and the scalar head is saved
    init = load_file(str(world["root"] / "sft" / "model.safetensors"))
    trained = _weights(out)
    assert "scalar_head.weight" in trained and "scalar_head.weight" not in init
    for name, tensor in init.items():
        assert not torch.equal(tensor, trained[name]), f"{name} did not change"
    # the shift makes the demonstrations average 0
    model, tok, shift = load_reward_model(str(out))
    assert shift == load_meta(out)["reward_shift"] == result["reward_shift"]
    demos = [tok.render_chat(json.loads(line)["messages"])[0]
             for line in (world["root"] / "demos.jsonl").read_text().splitlines()]
    assert abs(score(model, demos, shift=shift).mean().item()) < 1e-4
    recs = read_metrics(out / "metrics.jsonl")
    assert [r["step"] for r in recs if "val_accuracy" in r] == [6, 12]
    assert (out / "loss.png").is_file() and (out / "accuracy.png").is_file()


def test_reward_resume_is_bit_identical(world, tmp_path):
    reward.main(_cfg(world, tmp_path / "straight"))
    reward.main(_cfg(world, tmp_path / "split", stop_after=2))
    assert resolve_checkpoint(tmp_path / "split").name == "step_00000002"
    reward.main(_cfg(world, tmp_path / "split", resume=True))

    def losses(run):
        return [(r["step"], r["loss"]) for r in read_metrics(run / "metrics.jsonl") if "loss" in r]

    assert [s for s, _ in losses(tmp_path / "straight")] == [1, 2, 3, 4, 5, 6]
    assert losses(tmp_path / "straight") == losses(tmp_path / "split")
    a, b = _weights(tmp_path / "straight"), _weights(tmp_path / "split")
    for k in a:
        assert torch.equal(a[k], b[k]), k


def test_nan_loss_stops_without_a_checkpoint(world, tmp_path, monkeypatch):
    real, calls = reward.pairwise_loss, {"n": 0}

    def poisoned(chosen, rejected, group=None):
        calls["n"] += 1
        loss = real(chosen, rejected, group)
        return loss * float("nan") if calls["n"] == 3 else loss

    monkeypatch.setattr(reward, "pairwise_loss", poisoned)
    with pytest.raises(TrainingDiverged, match="reward step 2"):
        reward.main(_cfg(world, tmp_path / "nan", save_every=1))
    assert resolve_checkpoint(tmp_path / "nan").name == "step_00000002"


def test_score_reads_the_last_token_and_ignores_padding(world, tmp_path):
    """A batch of different lengths scores each sequence exactly as alone; the score is the head at the last token."""
    tok = world["tok"]
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, d_model=32, scalar_head=True)
    torch.manual_seed(1)
    model = GPT(cfg)
    seqs = [render_prompt_response(tok, "What is 1 plus 2?", text) for text in (ANSWER.format(3), "3", RUDE + " " + UNSURE)]
    assert len({len(s) for s in seqs}) == 3
    batched = score(model, seqs, shift=0.25)
    alone = torch.cat([score(model, [s], shift=0.25) for s in seqs])
    assert torch.allclose(batched, alone, atol=1e-5)
    with torch.no_grad():
        by_hand = model.scalar(model(torch.tensor([seqs[0]]), return_hidden=True))[0, -1] - 0.25
    assert batched[0].item() == pytest.approx(by_hand.item(), abs=1e-5)
    with pytest.raises(ValueError, match="longer than the reward model's block_size"):
        score(model, [[1] * 49])


def test_render_prompt_response_is_the_chat_template(world):
    tok = world["tok"]
    msgs = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "What is 1 plus 2?"}]
    ids = render_prompt_response(tok, msgs, "3")
    assert ids == tok.render_chat(msgs + [{"role": "assistant", "content": "3"}])[0]
    assert ids[-1] == tok.end_id
    assert render_prompt_response(tok, "hi", "3") == render_prompt_response(tok, [{"role": "user", "content": "hi"}], "3")


def test_load_reward_model_refuses_a_checkpoint_without_a_head(world):
    with pytest.raises(CheckpointError, match="not a reward model"):
        load_reward_model(str(world["root"] / "sft"))


def test_bad_config_is_explained(world, tmp_path):
    with pytest.raises(ValueError, match="--rankings is required"):
        reward.main(RewardConfig(init=str(world["root"] / "sft"), out=str(tmp_path), device="cpu"))
    with pytest.raises(CheckpointError, match="no checkpoint"):
        reward.main(_cfg(world, tmp_path / "fresh", resume=True))
