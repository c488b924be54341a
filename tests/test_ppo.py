"""The PPO stage on tiny models: parameters move, a toy reward is learned, PPO-ptx, exact resume.

The tokenizer has no merges (the 7 special tokens + 256 bytes), so a response decodes and
re-encodes to the same ids and a reward on one byte is a reward on one token.
"""

import json
import random
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tinygpt import reward_model as rm
from tinygpt.checkpoint import load_model, load_trainer_state, resolve_checkpoint, save_checkpoint
from tinygpt.data.shards import prepare_shards
from tinygpt.runlog import read_metrics
from tinygpt.model import GPT, ModelConfig
from tinygpt.stages import ppo
from tinygpt.data.sampling import epoch_indices
from tinygpt.losses import AdaptiveKLController
from tinygpt.rollout import minibatches
from tinygpt.stages.ppo import PPOConfig
from tinygpt.tokenizer import Tokenizer

PROMPTS = ["hi", "hello", "hey there", "good day", "tell me a tale", "what is two and two?", "be kind", "sing"]


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny matmuls gain nothing from threads, and on a shared 2-core machine OpenMP spinning made
    these tests ~8x slower (36 s vs 4.5 s for the toy-reward test)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("ppo_world")
    tok = Tokenizer.train(["a small corpus"], vocab_size=263, show_progress=False)  # bytes only, no merges
    assert tok.vocab_size == 263
    torch.manual_seed(0)
    mcfg = ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, d_model=32)
    save_checkpoint(root / "sft", model=GPT(mcfg), model_config=mcfg, tokenizer_json=tok.to_str(),
                    meta={"stage": "sft"})
    rcfg = ModelConfig(**{**mcfg.to_dict(), "scalar_head": True})
    save_checkpoint(root / "reward", model=GPT(rcfg), model_config=rcfg, tokenizer_json=tok.to_str(),
                    meta={"stage": "reward", "reward_shift": 0.25})
    with open(root / "prompts.jsonl", "w") as f:
        for i, text in enumerate(PROMPTS):
            record = {"prompt": [{"role": "user", "content": text}], "family": "arithmetic", "index": i,
                      "meta": {"family": "arithmetic", "gold": "4"}}
            f.write(json.dumps(record) + "\n")
    rng = random.Random(0)
    docs = [" ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat", "and", "ran"]) for _ in range(30))
            for _ in range(60)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    prepare_shards([root / "corpus.jsonl"], tok, root / "shards", val_fraction=0.1, seed=0, show_progress=False)
    return {"root": root, "sft": root / "sft", "reward": root / "reward", "prompts": root / "prompts.jsonl",
            "shards": root / "shards"}


def _cfg(world, out, **kw) -> PPOConfig:
    base = dict(policy=str(world["sft"]), reward=str(world["reward"]), prompts=str(world["prompts"]), out=str(out),
                rollout_batch=8, minibatch_size=4, ppo_epochs=2, max_new_tokens=6, max_steps=2, lr=1e-3,
                warmup_steps=0, kl_coef=0.05, sample_every=1, sample_count=2, save_every=100, device="cpu",
                dtype="float32", progress=False, seed=5)
    base.update(kw)
    return PPOConfig(**base)


def _policy_weights(run: Path) -> dict[str, torch.Tensor]:
    return load_file(str(resolve_checkpoint(run) / "model.safetensors"))


def test_every_policy_parameter_changes_after_one_step(world, tmp_path):
    result = ppo.main(_cfg(world, tmp_path / "run", max_steps=1))
    before, _ = load_model(world["sft"])
    after, _ = load_model(tmp_path / "run")
    for (name, p0), (_, p1) in zip(before.named_parameters(), after.named_parameters()):
        assert not torch.equal(p0, p1), f"{name} did not change"
    rec = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r][-1]
    for key in ("reward", "total_reward", "kl", "kl_coef", "entropy", "clip_frac", "approx_kl", "value_loss",
                "policy_loss", "explained_var", "response_len", "oracle_helpful", "oracle_utility"):
        assert key in rec, key
    assert rec["kl_coef"] == 0.05 and 1 <= rec["response_len"] <= 6
    assert "ptx_loss" not in rec
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and {"prompt", "response", "reward", "kl", "oracle"} <= set(samples[0])
    meta = json.loads((resolve_checkpoint(tmp_path / "run") / "tinygpt.json").read_text())
    assert meta["stage"] == "ppo" and meta["reference"]["path"] == str(resolve_checkpoint(world["sft"]))
    assert len(meta["reference"]["sha256"]) == 64
    assert (tmp_path / "run" / "reward.png").exists() and (tmp_path / "run" / "kl.png").exists()
    assert result["step"] == 1


def test_first_step_is_on_policy_and_rm_scores_have_the_shift_removed(world, tmp_path, monkeypatch):
    """Before the first update the policy is the reference (KL 0) and the old log-probs are its own."""
    seen = []
    real_score = rm.score

    def spy(model, sequences, device=None, shift=0.0, batch_size=32):
        out = real_score(model, sequences, device, shift=shift, batch_size=batch_size)
        seen.append((shift, out + shift, real_score(model, sequences, device)))
        return out

    monkeypatch.setattr(rm, "score", spy)
    ppo.main(_cfg(world, tmp_path / "run", max_steps=1, ppo_epochs=1, minibatch_size=8))
    rec = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r][-1]
    assert rec["kl"] == pytest.approx(0.0, abs=1e-6)
    assert rec["approx_kl"] == pytest.approx(0.0, abs=1e-6)  # one minibatch = the whole rollout: ratio 1
    assert rec["clip_frac"] == 0.0
    shift, unshifted, raw = seen[0]
    assert shift == 0.25 and torch.allclose(unshifted, raw)
    assert rec["reward"] == pytest.approx(float(raw.mean()) - 0.25, abs=1e-5)


def test_policy_learns_a_toy_reward_while_kl_stays_finite(world, tmp_path, monkeypatch):
    """The "reward model" counts the byte 'x' in the answer: p('x' as the first answer token) must rise."""
    tok = Tokenizer.load(world["sft"])
    x_id = tok.encode("x")[0]

    def count_x(model, sequences, device=None, shift=0.0, batch_size=32):
        answers = [s[len(s) - 1 - s[::-1].index(tok.assistant_id) + 1:] for s in sequences]
        return torch.tensor([float(a.count(x_id)) for a in answers])

    def p_x(model) -> float:
        ids, _ = tok.render_chat([{"role": "user", "content": "hi"}], add_generation_prompt=True)
        with torch.no_grad():
            return float(model(torch.tensor([ids]))[0, -1].softmax(-1)[x_id])

    monkeypatch.setattr(rm, "score", count_x)
    cfg = _cfg(world, tmp_path / "run", max_steps=30, rollout_batch=16, minibatch_size=8, ppo_epochs=2, lr=3e-3,
               kl_coef=0.01, sample_every=0, oracle=False)
    ppo.main(cfg)
    before, _ = load_model(world["sft"])
    after, _ = load_model(tmp_path / "run")
    p0, p1 = p_x(before), p_x(after)
    recs = [r for r in read_metrics(tmp_path / "run" / "metrics.jsonl") if "reward" in r]
    print(f"p(x) {p0:.4f} -> {p1:.4f}; reward {sum(r['reward'] for r in recs[:5]) / 5:.2f} -> "
          f"{sum(r['reward'] for r in recs[-5:]) / 5:.2f}; kl {recs[-1]['kl']:.3f}")
    assert p1 > 10 * p0, (p0, p1)
    early = sum(r["reward"] for r in recs[:5]) / 5
    late = sum(r["reward"] for r in recs[-5:]) / 5
    assert late > early + 0.5, (early, late)
    assert all(r["kl"] is not None and abs(r["kl"]) < 1e3 for r in recs)  # None: NaN/inf in the log


def test_story_prompts_get_the_long_answer_budget(world, tmp_path):
    """Answers to write_story prompts may run to --long-max-new-tokens, the others stop at --max-new-tokens
    (a random policy rarely ends, so answers run to their budget); minibatches mix both lengths."""
    prompts = tmp_path / "mixed.jsonl"
    with open(prompts, "w") as f:
        for i, text in enumerate(PROMPTS):
            family = "write_story" if i % 2 else "arithmetic"
            f.write(json.dumps({"prompt": text, "family": family, "meta": {"family": family, "gold": "4"}}) + "\n")
    ppo.main(_cfg(world, tmp_path / "run", prompts=str(prompts), max_new_tokens=3, long_max_new_tokens=12,
                  sample_count=8, oracle=False))
    family = {text: ("write_story" if i % 2 else "arithmetic") for i, text in enumerate(PROMPTS)}
    lengths: dict[str, list[int]] = {"write_story": [], "arithmetic": []}
    for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines():
        entry = json.loads(line)
        lengths[family[entry["prompt"][-1]["content"]]].append(entry["length"])
    assert lengths["arithmetic"] and max(lengths["arithmetic"]) <= 3
    assert lengths["write_story"] and max(lengths["write_story"]) > 3 and max(lengths["write_story"]) <= 12


def test_answers_that_fill_the_context_are_still_scored(world, tmp_path):
    """An answer that fills the context exactly: the random byte-level policy samples bytes that are not
    UTF-8, whose decoded text re-encodes longer than what was sampled; the RM reads the sampled ids."""
    text = "what is two and two?"
    tok = Tokenizer.load(world["sft"])
    prompt_len = len(tok.render_chat([{"role": "user", "content": text}], add_generation_prompt=True)[0])
    budget = 48 - prompt_len - 1  # block_size 48; 1 for the RM's closing <|end|>
    prompts = tmp_path / "long.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": text, "family": "arithmetic"}) + "\n" for _ in range(8)))
    ppo.main(_cfg(world, tmp_path / "run", prompts=str(prompts), max_new_tokens=budget, max_steps=1, sample_count=8,
                  oracle=False))
    lengths = [json.loads(line)["length"] for line in (tmp_path / "run" / "samples.jsonl").read_text().splitlines()]
    assert max(lengths) == budget


def test_ptx_adds_the_pretraining_loss(world, tmp_path):
    ppo.main(_cfg(world, tmp_path / "plain", max_steps=1))
    ppo.main(_cfg(world, tmp_path / "ptx", max_steps=1, ptx_coef=1.0, ptx_data=str(world["shards"]),
                  ptx_batch_size=2, ptx_block_size=16))
    rec = [r for r in read_metrics(tmp_path / "ptx" / "metrics.jsonl") if "reward" in r][-1]
    assert rec["ptx_loss"] > 0 and rec["ptx_loss"] == pytest.approx(rec["ptx_loss"])  # finite
    # ln(263) ~ 5.57: a random tiny model's LM loss on text sits near it
    assert 3.0 < rec["ptx_loss"] < 8.0
    plain, mixed = _policy_weights(tmp_path / "plain"), _policy_weights(tmp_path / "ptx")
    assert any(not torch.equal(plain[k], mixed[k]) for k in plain)
    with pytest.raises(ValueError, match="ptx-data"):
        ppo.main(_cfg(world, tmp_path / "bad", ptx_coef=1.0))


def test_resume_is_exact(world, tmp_path):
    kw = dict(max_steps=4, adaptive_kl=True, kl_target=0.5, kl_horizon=20, ptx_coef=0.5,
              ptx_data=str(world["shards"]), ptx_batch_size=2, ptx_block_size=16, value_init="sft")
    ppo.main(_cfg(world, tmp_path / "straight", **kw))
    ppo.main(_cfg(world, tmp_path / "split", stop_after=2, **kw))
    assert resolve_checkpoint(tmp_path / "split").name == "step_00000002"
    ppo.main(_cfg(world, tmp_path / "split", resume=True, **kw))

    def logged(run):
        keys = ("step", "reward", "kl", "kl_coef", "policy_loss", "value_loss", "ptx_loss", "entropy")
        return [tuple(r[k] for k in keys) for r in read_metrics(run / "metrics.jsonl") if "reward" in r]

    straight, split = logged(tmp_path / "straight"), logged(tmp_path / "split")
    assert [s[0] for s in straight] == [1, 2, 3, 4]
    assert straight == split
    assert len({s[3] for s in straight}) > 1  # the adaptive coefficient moved, and resumed exactly
    a, b = _policy_weights(tmp_path / "straight"), _policy_weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    va = load_trainer_state(tmp_path / "straight")["value_model"]
    vb = load_trainer_state(tmp_path / "split")["value_model"]
    assert all(torch.equal(va[k], vb[k]) for k in va)
    samples = [json.loads(x)["step"] for x in (tmp_path / "split" / "samples.jsonl").read_text().splitlines()]
    assert samples == [1, 1, 2, 2, 3, 3, 4, 4]


@pytest.mark.slow
def test_torchrun_two_ranks_equal_one_process(world, tmp_path):
    """2 gloo ranks answering 4 prompts each == 1 process answering 8, PPO-ptx and adaptive KL included.

    One minibatch per rollout, so the union of the ranks' minibatches is the single process's one. What
    this checks: each rank takes its rows of the global batch and samples them with their global rows'
    seeds; rewards and advantages are whitened over all ranks; the loss is token-weighted and gradients
    averaged; the KL controller and the logs see global means; ptx batches are slices of one global batch.
    """
    import os
    import subprocess
    import sys

    # a policy that ends an answer with probability ~0.2 a token, so answers differ in length and the
    # ranks' minibatches in token count: GPT-2 arch, its final LayerNorm's bias points at <|end|>'s row
    tok = Tokenizer.load(world["sft"])
    torch.manual_seed(1)
    mcfg = ModelConfig(vocab_size=tok.vocab_size, block_size=48, n_layer=2, n_head=2, d_model=32, arch="gpt2")
    model = GPT(mcfg)
    with torch.no_grad():
        bias = torch.randn(mcfg.d_model)
        model.final_norm.weight.mul_(0.2)
        model.final_norm.bias.copy_(bias)
        model.tok_emb.weight[tok.end_id] = 4.0 * bias / bias.pow(2).sum()
    save_checkpoint(tmp_path / "sft", model=model, model_config=mcfg, tokenizer_json=tok.to_str(),
                    meta={"stage": "sft"})

    kw = dict(policy=str(tmp_path / "sft"), max_steps=2, ppo_epochs=1, adaptive_kl=True, kl_target=0.5,
              kl_horizon=20, whiten_rewards=True, ptx_coef=0.5, ptx_data=str(world["shards"]), ptx_block_size=16)
    args = [f"--{k.replace('_', '-')}={str(v).lower() if isinstance(v, bool) else v}"
            for k, v in {**_cfg(world, tmp_path / "ddp", **kw).__dict__, "rollout_batch": 4, "minibatch_size": 4,
                         "ptx_batch_size": 1}.items() if v != "" and v is not None]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_port=29519",
           "-m", "tinygpt.cli", "ppo", *args]
    done = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    ppo.main(_cfg(world, tmp_path / "single", rollout_batch=8, minibatch_size=8, ptx_batch_size=2, **kw))

    keys = ("reward", "reward_std", "kl", "kl_coef", "total_reward", "entropy", "policy_loss", "value_loss",
            "ptx_loss", "clip_frac", "approx_kl", "explained_var", "value_mean", "response_len", "oracle_utility")

    def logged(run):
        return [r for r in read_metrics(run / "metrics.jsonl") if "reward" in r]

    ddp, single = logged(tmp_path / "ddp"), logged(tmp_path / "single")
    assert [r["step"] for r in ddp] == [r["step"] for r in single] == [1, 2]
    for a, b in zip(ddp, single):
        for k in keys:
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-5), k
    assert ddp[1]["kl_coef"] != ddp[0]["kl_coef"]  # the controller moved, on the global KL
    assert all(1.5 < r["response_len"] < 5.5 for r in ddp)  # answers of several lengths: the weights matter
    a, b = _policy_weights(tmp_path / "ddp"), _policy_weights(tmp_path / "single")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-5, rtol=1e-4)
    va = load_trainer_state(tmp_path / "ddp")["value_model"]
    vb = load_trainer_state(tmp_path / "single")["value_model"]
    for k in va:
        torch.testing.assert_close(va[k], vb[k], atol=1e-5, rtol=1e-4)
    # rank 0 alone writes the samples: its first rows are the single process's first rows
    first = [json.loads(x) for x in (tmp_path / "ddp" / "samples.jsonl").read_text().splitlines()]
    other = [json.loads(x) for x in (tmp_path / "single" / "samples.jsonl").read_text().splitlines()]
    assert [(x["step"], x["response"]) for x in first] == [(x["step"], x["response"]) for x in other]


def test_resume_refuses_a_changed_reference(world, tmp_path):
    ppo.main(_cfg(world, tmp_path / "run", max_steps=2, stop_after=1))
    other = tmp_path / "other_sft"
    model, mcfg = load_model(world["sft"])
    with torch.no_grad():
        model.final_norm.weight.add_(1.0)
    save_checkpoint(other, model=model, model_config=mcfg, tokenizer_json=Tokenizer.load(world["sft"]).to_str(),
                    meta={"stage": "sft"})
    with pytest.raises(Exception, match="reference"):
        ppo.main(_cfg(world, tmp_path / "run", max_steps=2, resume=True, policy=str(other)))


def test_adaptive_kl_controller_hand_worked():
    """beta *= 1 + clip(KL / target - 1, -0.2, 0.2) * n / horizon, target 6, horizon 100, n = 10."""
    c = AdaptiveKLController(0.1, 6.0, 100)
    c.update(12.0, 10)  # error 1 -> clipped 0.2: 0.1 * 1.02
    assert c.value == pytest.approx(0.102)
    c = AdaptiveKLController(0.1, 6.0, 100)
    c.update(6.6, 10)  # error 0.1: 0.1 * 1.01
    assert c.value == pytest.approx(0.101)
    c.update(0.0, 10)  # error -1 -> clipped -0.2: 0.101 * 0.98
    assert c.value == pytest.approx(0.09898)
    fixed = AdaptiveKLController(0.1, None, 100)
    fixed.update(100.0, 10)
    assert fixed.value == 0.1


def test_prompt_order_visits_every_prompt_once_per_pass():
    seen = [i for step in range(3) for i in epoch_indices(12, step, 4, seed=1)]
    assert sorted(seen) == list(range(12))
    assert epoch_indices(12, 5, 4, seed=1) == epoch_indices(12, 5, 4, seed=1)


def test_minibatches_cover_every_row_once_and_group_by_length():
    import numpy as np

    lengths = np.array([3, 40, 2, 3, 38, 5, 1, 3, 2, 4])
    for by_length in (False, True):
        batches = minibatches(lengths, 4, np.random.default_rng(0), by_length)
        assert sorted(np.concatenate(batches).tolist()) == list(range(10))
        assert [len(b) for b in sorted(batches, key=len, reverse=True)] == [4, 4, 2]
    grouped = minibatches(lengths, 4, np.random.default_rng(0), True)
    widest = [b for b in grouped if 1 in b][0]
    assert 4 in widest and sorted(lengths[widest].tolist()) == [4, 5, 38, 40]  # the two long answers together
    orders = {tuple(tuple(b) for b in minibatches(lengths, 4, np.random.default_rng(seed), True))
              for seed in range(20)}
    assert len(orders) > 1  # the order of the minibatches (and ties) stays random
