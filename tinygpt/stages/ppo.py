"""RLHF with PPO: maximise a reward model's score, held near the SFT policy by a per-token KL penalty.

InstructGPT (Ouyang et al. 2022, section 3.5) on top of Ziegler et al. (2019) "Fine-tuning language
models from human preferences". Each step (one *rollout*):

1. sample ``rollout_batch`` prompts and let the policy answer them (``tinygpt.generate``, each answer
   with its own generator seeded by (seed, step, row), so a resumed run samples the same answers, and
   so does a run split over more or fewer ranks), each within its family's budget
   (``--max-new-tokens``, or ``--long-max-new-tokens`` for a story: ``world.tasks.answer_budget``, the
   budgets `tinygpt rank` and `tinygpt evaluate` use, so the RM judges whole stories here too);
2. score each answer with the reward model (RM score minus its ``shift``), and compute every response
   token's log-probability under the policy, under the frozen SFT *reference*, and its value;
3. reward per token ``r_t = -kl_coef * KL_t``, plus the RM score at the last response token
   (``losses.kl_penalty``, ``losses.shaped_rewards``); advantages and returns by GAE (``losses.gae``),
   advantages whitened;
4. ``ppo_epochs`` passes of shuffled minibatches over the rollout: clipped policy loss and clipped
   value loss (``losses.ppo_losses``). PPO-ptx (``ptx_coef > 0``) adds ``ptx_coef * lm_loss`` on a
   pretraining batch to every policy update, InstructGPT's fix for the "alignment tax";
5. with ``adaptive_kl``, move ``kl_coef`` toward a target KL (Ziegler et al.'s proportional controller,
   ``losses.AdaptiveKLController``).

``main`` reads as those steps, each a call: rollout (``rollout.sample_answers``), score
(``rollout.RewardScorer``), gather log-probs and values (``rollout.gather``), shape, advantages, update
(:func:`ppo_update`), log. The tensors of a rollout live in ``tinygpt/rollout.py``, the math in ``losses``,
the run's plumbing (setup, resume, stop, save) in ``training``.

The value function is a **separate model**, initialised from the reward model (``value_init=reward``,
as InstructGPT does) or from the SFT model with a fresh scalar head (``value_init=sft``): the value loss
cannot pull on the policy's weights (no ``vf_coef``), the RM's features are a good start for predicting
return, and the policy checkpoint stays a plain language model (``docs/design.md`` says more).

A checkpoint (``OUT/checkpoints/step_N``) holds the policy as a normal model (so ``tinygpt sample``,
chat and evaluation load it as is) and, in ``trainer_state.pt``, the value model's weights, both
optimizers, the adaptive-KL state and every RNG: ``--resume`` continues exactly. The reference is not
copied: it is the ``--policy`` checkpoint, whose path and sha256 are recorded and checked on resume.

    tinygpt ppo --policy runs/x/sft --reward runs/x/reward --prompts runs/x/world/rl_prompts.jsonl --out runs/x/ppo
    tinygpt ppo ... --ptx-coef 1.0 --ptx-data runs/x/data        # PPO-ptx

Outputs: ``metrics.jsonl`` (reward, KL, kl_coef, entropy, clip fraction, approx-KL, value loss, explained
variance, response length, ptx loss, and the world oracle's grade of the same answers), ``reward.png``,
``kl.png``, and ``samples.jsonl`` (answers with their RM score and oracle grade, so reward hacking, the
RM score rising while the oracle's grade falls, can be read off).

Uses: training (the skeleton), rollout (sampling, scoring, the rollout's tensors), losses (all the math),
data.prompts (the prompt reader `tinygpt rank` shares), data.shards.TokenDataset (ptx batches),
world.labeler (the oracle's grade, for logging only). It does not know how the SFT or reward models
were trained.

Under ``torchrun`` each of the N ranks answers its ``rollout_batch`` rows of the step's global batch and
trains on them; gradients are averaged by ``runtime.average_gradients`` (the policy also samples, and two
models train per minibatch, so no DDP wrapper). Whitening, the KL of the adaptive coefficient and the
logged means cover all ranks (``reduce``), each minibatch's loss is weighted by its share of the global
minibatch's tokens: N ranks of B equal one process of N * B (``tests/test_ppo.py``). Rank 0 saves and logs.

    torchrun --nproc_per_node=2 -m tinygpt.cli ppo --policy ... --rollout-batch 16   # 32 answers a step
"""

from __future__ import annotations


from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tinygpt import reward_model as rm, rollout, runtime, training
from tinygpt.checkpoint import (WEIGHTS, CheckpointError, load_model, load_tokenizer, resolve_checkpoint,
                                sha256_file)
from tinygpt.config import opt
from tinygpt.data.prompts import read_prompts
from tinygpt.data.sampling import epoch_indices
from tinygpt.data.shards import TokenDataset
from tinygpt.losses import (AdaptiveKLController, explained_variance, gae, kl_penalty, lm_loss, masked_mean,
                            ppo_losses, shaped_rewards, token_logprobs, whiten)
from tinygpt.model import GPT, ModelConfig
from tinygpt.runlog import MetricsWriter
from tinygpt.tokenizer import Tokenizer
from tinygpt.world.labeler import Labeler
from tinygpt.world.tasks import DEFAULT_LONG_ANSWER_TOKENS, FAMILIES
from tinygpt.runtime import TrainingDiverged  # noqa: F401 (re-exported for callers)

VALUE_INITS = ("reward", "sft")


@dataclass
class PPOConfig(training.RunConfig):
    policy: str = opt("", "SFT checkpoint the policy starts from; it is also the frozen KL reference", required=True)
    reward: str = opt("", "reward-model checkpoint (from `tinygpt reward`)", required=True)
    prompts: str = opt("", "RL prompts, JSONL: {\"prompt\": [messages] or \"text\", ...} (the world's rl_prompts.jsonl)",
                       required=True)
    out: str = opt("runs/ppo", "run directory: checkpoints/, metrics.jsonl, samples.jsonl, reward.png, kl.png")
    value_init: str = opt("reward", "value model: 'reward' = a copy of the reward model (InstructGPT), "
                                    "'sft' = a copy of the SFT model with a fresh scalar head")
    # rollouts
    rollout_batch: int = opt(32, "prompts answered per rollout (one PPO step), per rank under torchrun")
    temperature: float = opt(1.0, "sampling temperature of the rollouts (> 0; log-probs use the same one)")
    max_new_tokens: int = opt(48, "longest answer sampled, in tokens")
    long_max_new_tokens: int = opt(DEFAULT_LONG_ANSWER_TOKENS, "longest answer sampled for prompts of the families "
                                   "whose answers are whole stories (write_story, from the prompt's 'family'); "
                                   "0 = --max-new-tokens")
    # PPO
    ppo_epochs: int = opt(4, "passes over each rollout batch")
    minibatch_size: int = opt(8, "answers per PPO minibatch (one optimizer step each), per rank under torchrun")
    group_by_length: bool = opt(True, "put answers of similar length in the same minibatch (the minibatches' order "
                                      "stays random): a story then widens one minibatch, not most of them")
    value_lr: float | None = opt(None, "value-model learning rate (None = --lr)")
    clip_ratio: float = opt(0.2, "PPO clip range of the probability ratio (epsilon)")
    value_clip: float = opt(0.2, "clip range of the value update around the rollout's values")
    gamma: float = opt(1.0, "discount per token")
    lam: float = opt(0.95, "GAE lambda")
    whiten_rewards: bool = opt(False, "scale the per-token rewards of each rollout to unit variance")
    # KL penalty to the SFT reference
    kl_coef: float = opt(0.05, "beta: weight of the per-token KL penalty to the SFT policy (the start value "
                               "with --adaptive-kl)")
    kl_estimator: str = opt("k1", "per-token KL estimate passed to losses.kl_penalty (k1, k2, k3, ...)")
    adaptive_kl: bool = opt(False, "adapt kl_coef toward --kl-target (Ziegler et al. 2019)")
    kl_target: float = opt(6.0, "target KL per answer, in nats, for --adaptive-kl")
    kl_horizon: int = opt(10000, "horizon of --adaptive-kl, in answers: each rollout moves kl_coef by at most "
                                 "0.2 * rollout_batch / horizon")
    # PPO-ptx
    ptx_coef: float = opt(0.0, "gamma of PPO-ptx: weight of the pretraining LM loss in every update (0 = plain PPO)")
    ptx_data: str = opt("", "token-shard directory (from `tinygpt prepare`) for the PPO-ptx batches")
    ptx_batch_size: int = opt(8, "pretraining sequences per PPO-ptx batch, per rank under torchrun")
    ptx_block_size: int = opt(0, "length of each PPO-ptx sequence (0 = the policy's block_size)")
    # logging and evaluation
    sample_every: int = opt(10, "rollouts between dumps of sample answers to samples.jsonl (0 = never)")
    sample_count: int = opt(4, "answers written per dump")
    oracle: bool = opt(True, "grade every answer with the world's oracle where the prompt carries task metadata "
                             "(logged next to the RM score; for watching reward hacking, never trained on)")
    eval_prompts: str = opt("", "held-out prompts (same format as --prompts) answered greedily at each evaluation")
    eval_limit: int = opt(64, "evaluate on at most this many prompts")
    score_batch_size: int = opt(32, "answers per reward-model forward pass")
    # the shared fields (training.RunConfig) with PPO's defaults
    max_steps: int = opt(200, "rollouts in the whole run")
    lr: float = opt(2e-5, "policy learning rate (constant after warmup)")
    warmup_steps: int = opt(5, "rollouts of linear learning-rate warmup")
    grad_clip: float = opt(1.0, "clip each model's gradient norm to this (0 = off)")
    eval_every: int = opt(50, "rollouts between evaluations on --eval-prompts")
    log_every: int = opt(1, "rollouts between metrics.jsonl records")
    save_every: int = opt(50, "rollouts between checkpoints (one is always written at the end)")
    seed: int = opt(1337, "seed for prompt order, sampling and minibatch order")
    stop_after: int = opt(0, "stop (with a checkpoint) after this many rollouts of this invocation; 0 = run to max_steps")


def _check_config(cfg: PPOConfig) -> None:
    for name in ("policy", "reward", "prompts"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required")
    if cfg.value_init not in VALUE_INITS:
        raise ValueError(f"--value-init must be one of {VALUE_INITS}, got {cfg.value_init!r}")
    for name in ("rollout_batch", "ppo_epochs", "minibatch_size", "max_steps", "max_new_tokens"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.temperature > 0:
        raise ValueError(f"--temperature must be > 0 for PPO (log-probs are taken at that temperature), "
                         f"got {cfg.temperature}")
    if cfg.ptx_coef < 0:
        raise ValueError(f"--ptx-coef must be >= 0, got {cfg.ptx_coef}")
    if cfg.ptx_coef > 0 and not cfg.ptx_data:
        raise ValueError("--ptx-coef > 0 needs --ptx-data (a token-shard directory from `tinygpt prepare`)")
    if not 0 < cfg.clip_ratio or not 0 < cfg.value_clip:
        raise ValueError("--clip-ratio and --value-clip must be > 0")


@dataclass
class Models:
    """The four models of InstructGPT's PPO: policy (trained), reference (frozen), reward (frozen), value (trained)."""
    policy: GPT
    policy_config: ModelConfig
    reference: GPT
    tokenizer: Tokenizer
    scorer: rollout.RewardScorer
    value: GPT
    value_config: ModelConfig
    reference_info: dict[str, str]
    reward_info: dict[str, str]


def load_models(cfg: PPOConfig, device: torch.device) -> Models:
    """Load the four models; dropout off (it would make the PPO ratio noisy and the reference stochastic)."""
    policy_ckpt = resolve_checkpoint(cfg.policy)
    if (policy_ckpt / "adapter").is_dir():
        raise CheckpointError(f"{policy_ckpt} holds a LoRA adapter; PPO needs a plain model: train SFT with "
                              "--merge-lora true and pass its OUT/merged directory as --policy")
    no_dropout = {"dropout": 0.0}
    policy, pcfg = load_model(policy_ckpt, device=device, config_overrides=no_dropout)
    reference, _ = load_model(policy_ckpt, device=device, config_overrides=no_dropout)
    reference.requires_grad_(False).eval()
    tokenizer = load_tokenizer(policy_ckpt)
    reward_ckpt = resolve_checkpoint(cfg.reward)
    reward_model, reward_tokenizer, reward_shift = rm.load_reward_model(reward_ckpt, device)
    reward_model.requires_grad_(False).eval()
    scorer = rollout.RewardScorer(reward_model, reward_tokenizer, reward_shift, tokenizer,
                                  {tokenizer.end_id, tokenizer.eos_id}, cfg.score_batch_size)
    if cfg.value_init == "reward":
        if reward_tokenizer.fingerprint != tokenizer.fingerprint:
            raise ValueError(f"--value-init reward: {reward_ckpt} uses another tokenizer than {policy_ckpt}; "
                             "the value model reads the policy's tokens. Use --value-init sft")
        value, vcfg = load_model(reward_ckpt, device=device, config_overrides={**no_dropout, "scalar_head": True})
        if vcfg.block_size < pcfg.block_size:
            raise ValueError(f"--value-init reward: the reward model's block_size {vcfg.block_size} is shorter "
                             f"than the policy's {pcfg.block_size}; use --value-init sft")
    else:
        value, vcfg = load_model(policy_ckpt, device=device, config_overrides={**no_dropout, "scalar_head": True})
    policy.train()
    value.train()
    return Models(policy, pcfg, reference, tokenizer, scorer, value, vcfg,
                  {"path": str(policy_ckpt), "sha256": sha256_file(policy_ckpt / WEIGHTS)},
                  {"path": str(reward_ckpt), "sha256": sha256_file(reward_ckpt / WEIGHTS)})


def ppo_update(cfg: PPOConfig, run: training.Run, step: int, models: Models, optimizers: tuple, batch: rollout.Batch,
               old: rollout.RolloutTensors, advantages: Tensor, returns: Tensor, lengths: np.ndarray,
               ptx: TokenDataset | None, ptx_block: int, reduce) -> dict[str, float]:
    """``ppo_epochs`` passes of shuffled minibatches over the rollout, one optimizer step of each model per
    minibatch; returns the losses' means over the updates (this rank's)."""
    policy, value_model = models.policy, models.value
    policy_opt, value_opt = optimizers
    rank, world = run.dist.rank, run.dist.world_size
    sums: dict[str, float] = {}
    n_updates = 0
    updates_per_epoch = math.ceil(len(lengths) / cfg.minibatch_size)
    for epoch in range(cfg.ppo_epochs):
        rng = np.random.default_rng([cfg.seed, step, epoch, 2, rank])  # this rank's rows
        for minibatch in rollout.minibatches(lengths, cfg.minibatch_size, rng, cfg.group_by_length):
            rows = torch.as_tensor(minibatch, device=run.device)
            mb = batch.rows(rows)
            cut = slice(0, mb.width)  # the rollout's tensors, cut like the minibatch
            # this rank's share of the global minibatch's tokens (x world: ranks are averaged)
            weight = 1.0
            if reduce is not None:
                tokens = mb.mask.sum()
                weight = tokens * world / reduce(tokens)
            with runtime.autocast(run.device, run.dtype):
                logprobs = token_logprobs(rollout.response_logits(policy, mb, cfg.temperature), mb.responses)
                values = rollout.response_values(value_model, mb)  # (b, R)
                losses = ppo_losses(logprobs, old.logprobs[rows, cut], advantages[rows, cut], values,
                                    old.values[rows, cut], returns[rows, cut], mb.mask, cfg.clip_ratio, cfg.value_clip)
                losses = {k: v * weight for k, v in losses.items()}  # all token means
                loss = losses["policy_loss"] + losses["value_loss"]  # separate models: no vf_coef
                if ptx is not None:
                    x, y = ptx.batch(step * cfg.ppo_epochs * updates_per_epoch + n_updates, cfg.ptx_batch_size,
                                     ptx_block, seed=cfg.seed, rank=rank, world_size=world)
                    ptx_loss = lm_loss(policy(x.to(run.device)), y.to(run.device))
                    loss = loss + cfg.ptx_coef * ptx_loss
                    losses = {**losses, "ptx_loss": ptx_loss}
            loss_value = float(runtime.all_reduce_mean(loss.detach()))  # every rank sees a NaN
            loss.backward()
            runtime.average_gradients(policy)
            runtime.average_gradients(value_model)
            training.optimizer_step(run, policy_opt, policy.parameters(), loss_value, step)
            training.optimizer_step(run, value_opt, value_model.parameters(), loss_value, step)
            for k, v in losses.items():
                sums[k] = sums.get(k, 0.0) + float(v.detach())
            n_updates += 1
    return {k: v / max(n_updates, 1) for k, v in sums.items()}


def main(cfg: PPOConfig) -> dict[str, Any]:
    # --- setup -----------------------------------------------------------------------------
    _check_config(cfg)
    run = training.setup(cfg, "ppo")
    device, dtype, rank, world = run.device, run.dtype, run.dist.rank, run.dist.world_size
    reduce = runtime.all_reduce_sum if run.dist.enabled else None  # global means over all ranks' answers

    def global_mean(x: Tensor, mask: Tensor | None = None) -> float:
        """Mean over every rank's rows (or masked tokens) together."""
        return float(masked_mean(x, mask, reduce))

    # --- models and data ---------------------------------------------------------------------
    models = load_models(cfg, device)
    policy, tokenizer = models.policy, models.tokenizer
    stop_ids = {tokenizer.end_id, tokenizer.eos_id}
    budgets = (models.policy_config.block_size, cfg.max_new_tokens, cfg.long_max_new_tokens or cfg.max_new_tokens)
    prompts = rollout.encode_prompts(read_prompts(cfg.prompts), tokenizer, *budgets, cfg.prompts)
    eval_prompts = (rollout.encode_prompts(read_prompts(cfg.eval_prompts), tokenizer, *budgets, cfg.eval_prompts)
                    [:cfg.eval_limit] if cfg.eval_prompts else [])
    ptx = TokenDataset(cfg.ptx_data, "train") if cfg.ptx_coef > 0 else None
    ptx_block = cfg.ptx_block_size or models.policy_config.block_size
    if ptx_block > models.policy_config.block_size:
        raise ValueError(f"--ptx-block-size {ptx_block} exceeds the policy's block_size "
                         f"{models.policy_config.block_size}")
    labeler = Labeler(noise=0.0) if cfg.oracle else None

    def texts_of(responses: list[list[int]]) -> list[str]:
        return [tokenizer.decode(rollout.answer_body(r, stop_ids)) for r in responses]

    # --- optimizers, adaptive KL, (resume) ----------------------------------------------------
    policy_opt = training.make_optimizer(policy, cfg)
    value_lr = cfg.value_lr if cfg.value_lr is not None else cfg.lr
    value_opt = training.make_optimizer(models.value, cfg, lr=value_lr)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon)
    start_step, state = training.resume(run, policy, policy_opt)
    if state is not None:
        if state["reference"]["sha256"] != models.reference_info["sha256"]:
            raise CheckpointError(f"--resume: the reference {models.reference_info['path']} has changed since this "
                                  f"run started (sha256 {models.reference_info['sha256'][:12]}, run recorded "
                                  f"{state['reference']['sha256'][:12]}); pass the original --policy")
        models.value.load_state_dict(state["value_model"])
        value_opt.load_state_dict(state["value_optimizer"])
        kl_ctl.load_state_dict(state["kl_controller"])
    metrics = training.start_log(run, start_step)
    samples = MetricsWriter(run.out, resume_step=start_step if cfg.resume else None, enabled=run.is_main,
                            name="samples.jsonl")
    if run.is_main:
        print(f"ppo: policy {policy.num_params() / 1e6:.2f}M params from {models.reference_info['path']}, value "
              f"model from {cfg.value_init} ({models.value.num_params() / 1e6:.2f}M), {len(prompts)} prompts, "
              f"{cfg.rollout_batch * world} answers/rollout, {run.describe()}"
              + (f", PPO-ptx coef {cfg.ptx_coef} on {cfg.ptx_data}" if ptx is not None else ""))

    def save(step: int, extra: dict[str, Any]) -> Path | None:
        """Rank 0 writes the checkpoint (every rank holds the same weights); the others wait for it."""
        path = training.save(run, step, model=policy, model_config=models.policy_config,
                             tokenizer_json=tokenizer.to_str(), optimizer=policy_opt,
                             meta={"reference": models.reference_info, "reward": models.reward_info, **extra},
                             value_optimizer=value_opt.state_dict(), value_model=models.value.state_dict(),
                             value_config=models.value_config.to_dict(), kl_controller=kl_ctl.state_dict(),
                             reference=models.reference_info, reward=models.reward_info)
        runtime.barrier()
        return path

    # --- loop: rollout -> score -> shape -> advantages -> update -> log ----------------------
    loop = training.Loop(run, cfg.max_steps, start_step, unit="rollout")
    last: dict[str, Any] = {}
    for step in loop:
        t0 = time.perf_counter()
        lr = loop.set_lr(policy_opt, min_lr=cfg.lr)
        loop.set_lr(value_opt, max_lr=value_lr, min_lr=value_lr)
        kl_coef = kl_ctl.value

        # rollout: this rank's rows of the step's global batch, each answer seeded by its global row
        records = [prompts[i] for i in epoch_indices(len(prompts), step, cfg.rollout_batch, seed=cfg.seed,
                                                     rank=rank, world_size=world)]
        global_rows = range(rank * cfg.rollout_batch, (rank + 1) * cfg.rollout_batch)
        with runtime.autocast(device, dtype):
            responses = rollout.sample_answers(policy, records, cfg.temperature, stop_ids,
                                               [rollout.derived_seed(cfg.seed, step, 1, g) for g in global_rows])
        texts = texts_of(responses)
        # score, and the log-probs and values the update starts from
        with runtime.autocast(device, dtype):
            scores = models.scorer(records, responses, texts, device)  # (B,)
        batch = rollout.make_batch([r.ids for r in records], responses, tokenizer.pad_id, device)
        mask = batch.mask  # (B, R)
        lengths = np.array([len(r) for r in responses])
        with runtime.autocast(device, dtype):
            old = rollout.gather(policy, models.reference, models.value, batch, lengths, cfg.minibatch_size,
                                 cfg.temperature)
        entropy = global_mean(old.entropies, mask)
        # shape: the RM's score minus the KL penalty, per token; then GAE
        with torch.no_grad():
            kl_tokens = kl_penalty(old.logprobs, old.ref_logprobs, kind=cfg.kl_estimator) * mask  # (B, R)
            token_rewards = shaped_rewards(scores, kl_tokens, mask, kl_coef)
            if cfg.whiten_rewards:
                token_rewards = whiten(token_rewards, mask, shift_mean=False, reduce=reduce)
            advantages, returns = gae(token_rewards, old.values, mask, cfg.gamma, cfg.lam)  # (B, R) each
            advantages = whiten(advantages, mask, reduce=reduce)
        kl_per_answer = kl_tokens.sum(1)  # (B,)
        # update
        losses = ppo_update(cfg, run, step, models, (policy_opt, value_opt), batch, old, advantages, returns,
                            lengths, ptx, ptx_block, reduce)
        mean_kl = global_mean(kl_per_answer)
        kl_ctl.update(mean_kl, len(records) * world)

        # log, samples, evaluation, checkpoint
        graded = rollout.oracle_grades(labeler, records, texts, FAMILIES)
        if loop.log_due(cfg.log_every):
            reward = global_mean(scores)
            ended = torch.tensor([bool(r) and r[-1] in stop_ids for r in responses], dtype=torch.float32)
            record: dict[str, Any] = {
                "step": loop.step, "reward": reward, "reward_std": math.sqrt(global_mean((scores - reward) ** 2)),
                "total_reward": global_mean(scores - kl_coef * kl_per_answer),  # before any whitening
                "kl": mean_kl, "kl_coef": kl_coef, "entropy": entropy,
                "kl_k3": global_mean((kl_penalty(old.logprobs, old.ref_logprobs, kind="k3") * mask).sum(1)),
                **{k: float(runtime.all_reduce_mean(torch.tensor(v, device=device))) for k, v in losses.items()},
                "explained_var": explained_variance(old.values, returns, mask, reduce),
                "value_mean": global_mean(old.values, mask),
                "response_len": global_mean(mask.sum(1)),
                "ended": global_mean(ended.to(device)),
                "lr": lr, "seconds": round(time.perf_counter() - t0, 3)}
            record.update(rollout.oracle_means(graded, device, reduce))
            metrics.log(record)
            last = record
            loop.bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{mean_kl:.3f}",
                                 len=f"{record['response_len']:.1f}")
        if cfg.sample_every > 0 and (loop.step % cfg.sample_every == 0 or loop.step == loop.end):
            for i in range(min(cfg.sample_count, len(records))):
                entry = {"step": loop.step, "prompt": records[i].prompt.messages, "response": texts[i],
                         "reward": float(scores[i]), "kl": float(kl_per_answer[i]), "length": len(responses[i]),
                         "ended": bool(responses[i]) and responses[i][-1] in stop_ids}
                if graded[i] is not None:
                    entry["oracle"] = graded[i]
                samples.log(entry)
        if eval_prompts and run.is_main and loop.eval_due(cfg.eval_every):
            with runtime.autocast(device, dtype):
                result = {"step": loop.step, **rollout.greedy_eval(policy, eval_prompts, models.scorer, stop_ids,
                                                                   texts_of, labeler, FAMILIES, device)}
            metrics.log(result)
            last.update({k: v for k, v in result.items() if k != "step"})
            loop.write(f"step {loop.step}: " + ", ".join(f"{k} {v:.3f}" for k, v in result.items() if k != "step"))
        if loop.save_due(cfg.save_every):
            save(loop.step, {"reward": last.get("reward"), "kl": last.get("kl")})

    # --- save ------------------------------------------------------------------------------
    ckpt = save(loop.step, {k: v for k, v in last.items() if k != "step"})
    samples.close()
    training.finish(run, metrics, [
        (["reward", "total_reward", "oracle_utility", "eval_reward"], "reward.png",
         "PPO reward (RM score) and the oracle's utility"),
        (["kl"], "kl.png", "KL(policy || SFT) per answer, nats")])
    if run.is_main:
        print(f"ppo: step {loop.step}/{cfg.max_steps}, checkpoint {ckpt}")
    return {"interrupted": loop.interrupted, "step": loop.step, "checkpoint": str(ckpt),
            **{k: v for k, v in last.items() if k != "step"}}

