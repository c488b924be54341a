"""Direct Preference Optimization: learn from preference pairs without a reward model or sampling.

Reads top to bottom: config, data, models (the policy, trained, and the frozen reference, both
starting from the SFT checkpoint), optimizer, (resume), loop, save. Each step takes
``--batch-size`` prompts with all their (chosen, rejected) pairs (``data.preferences``: the same
files the reward model trains on), computes each completion's sequence log-prob on its response
tokens only (``losses.sequence_logprobs`` with the mask from ``render_chat``: the assistant's
answer and its ``<|end|>``) under the policy and the reference, and minimises ``losses.dpo_loss``
(Rafailov et al. 2023), each prompt counting once. The batch at step s is a pure function of
(seed, s), so resuming needs only the step.

Reported on the held-out pairs during and after training: loss, preference accuracy (the implicit
reward ``beta * (log pi - log pi_ref)`` of the chosen answer above the rejected one's), the mean
implicit rewards of chosen and rejected answers, and their margin.

    tinygpt dpo --init runs/x/sft --pairs runs/x/rank/pairs.jsonl --val-pairs runs/x/rank/pairs_val.jsonl \\
        --out runs/x/dpo --beta 0.1

Uses: training (the skeleton), losses.dpo_loss and sequence_logprobs, data.preferences. It does not know
how the preferences were made, nor about reward models or PPO.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinygpt import runtime, training
from tinygpt.checkpoint import CheckpointError, load_model
from tinygpt.config import opt
from tinygpt.data.preferences import PreferenceBatch, PreferenceDataset, held_out_preferences
from tinygpt.losses import dpo_loss, preference_accuracy, sequence_logprobs
from tinygpt.model import GPT
from tinygpt.runtime import TrainingDiverged  # noqa: F401 (re-exported for callers)


@dataclass
class DPOConfig(training.PreferenceConfig):
    init: str = opt("", "SFT checkpoint to start the policy from (a run directory or checkpoint directory)", required=True)
    ref: str = opt("", "frozen reference checkpoint (empty: the same as --init, as in the DPO paper)")
    pairs: str = opt("", "training preferences: pairs {prompt, chosen, rejected} and/or rankings "
                         "{prompt, completions, ranking} JSONL (e.g. from `tinygpt rank`)", required=True)
    val_pairs: str = opt("", "held-out preferences in the same format (empty: no validation)")
    out: str = opt("runs/dpo", "run directory: checkpoints/, metrics.jsonl, loss.png, resolved_config.json")
    beta: float = opt(0.1, "DPO beta: strength of the implicit KL constraint to the reference (higher = closer)")
    # the shared fields (training.PreferenceConfig) with DPO's defaults
    batch_size: int = opt(8, "prompts per micro-batch on each rank (each with all its pairs)")
    epochs: float = opt(1.0, "passes over the prompts when --max-steps is 0")
    lr: float = opt(5e-5, "peak learning rate")
    min_lr: float = opt(5e-6, "learning rate at the end of the cosine decay")
    eval_every: int = opt(50, "steps between validation evaluations")
    seed: int = opt(1337, "seed for the data order and dropout")


def response_logprobs(model: torch.nn.Module, batch: PreferenceBatch) -> torch.Tensor:
    """Sum of log p(token) over each completion's response tokens: (N,) float32."""
    x, y, m = batch.inputs_targets()  # (N, T-1) each
    return sequence_logprobs(model(x), y, m)  # (N,)


def _pair_stats(chosen_r: torch.Tensor, rejected_r: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"accuracy": preference_accuracy(chosen_r, rejected_r).mean(),
            "chosen_reward": chosen_r.mean(), "rejected_reward": rejected_r.mean(),
            "margin": (chosen_r - rejected_r).mean()}


def evaluate(policy: GPT, reference: GPT, data: PreferenceDataset, beta: float, batch_size: int,
             device: torch.device, dtype: torch.dtype) -> dict[str, float]:
    """Validation loss (each prompt once) and pair statistics (each pair once) over the whole set."""
    was_training = policy.training
    policy.eval()
    loss_sum, n_prompts, n_pairs = 0.0, 0, 0
    sums: dict[str, float] = {}
    with torch.inference_mode(), runtime.autocast(device, dtype):
        for batch in data.eval_batches(batch_size):
            batch = batch.to(device)
            logps, ref_logps = response_logprobs(policy, batch), response_logprobs(reference, batch)
            loss, chosen_r, rejected_r = dpo_loss(logps[batch.chosen], logps[batch.rejected], ref_logps[batch.chosen],
                                                  ref_logps[batch.rejected], beta, batch.group)
            groups = int(batch.group.max()) + 1
            loss_sum += loss.item() * groups
            n_prompts += groups
            for k, v in _pair_stats(chosen_r, rejected_r).items():
                sums[k] = sums.get(k, 0.0) + v.item() * batch.num_pairs
            n_pairs += batch.num_pairs
    policy.train(was_training)
    return {"val_loss": loss_sum / n_prompts, **{f"val_{k}": v / n_pairs for k, v in sums.items()}}


def main(cfg: DPOConfig) -> dict[str, Any]:
    # --- setup -----------------------------------------------------------------------------
    if not cfg.init:
        raise ValueError("--init is required: the SFT checkpoint the policy starts from (e.g. runs/x/sft)")
    if not cfg.pairs:
        raise ValueError("--pairs is required: preference JSONL (e.g. runs/x/rank/pairs.jsonl from `tinygpt rank`)")
    if cfg.beta <= 0:
        raise ValueError(f"--beta must be > 0, got {cfg.beta}")
    run = training.setup(cfg, "dpo")
    device, dtype, dist_info = run.device, run.dtype, run.dist

    # --- models and tokenizer ------------------------------------------------------------------
    policy, mcfg, tokenizer, init_meta = training.load_init(run, cfg.init)
    reference, ref_cfg = load_model(cfg.ref or cfg.init, device=device)
    if ref_cfg.vocab_size != mcfg.vocab_size:
        raise CheckpointError(f"{cfg.ref}: reference vocabulary ({ref_cfg.vocab_size}) differs from the policy's "
                              f"({mcfg.vocab_size})")
    reference.eval().requires_grad_(False)

    # --- data ------------------------------------------------------------------------------
    max_tokens = min(mcfg.block_size, ref_cfg.block_size) + 1  # block_size inputs + the last target
    train = PreferenceDataset(cfg.pairs, tokenizer, max_tokens, skip_bad=cfg.skip_bad)
    val = (held_out_preferences(cfg.val_pairs, tokenizer, max_tokens, skip_bad=cfg.skip_bad, stage="dpo")
           if cfg.val_pairs else None)
    per_step, max_steps = training.epoch_steps(run, len(train))

    # --- optimizer, (resume) -----------------------------------------------------------------
    optimizer = training.make_optimizer(policy, cfg)
    start_step, _ = training.resume(run, policy, optimizer)
    metrics = training.start_log(run, start_step)
    train_model = training.wrap_ddp(policy, run)
    if run.is_main:
        s = train.stats
        print(f"dpo: beta {cfg.beta}, {policy.num_params() / 1e6:.2f}M params; {len(train)} prompts, {s.pairs} pairs "
              f"({s.identical_pairs} identical and {s.too_long_pairs} too-long pairs dropped, {s.skipped_bad} bad); "
              f"{len(val) if val else 0} val prompts; {max_steps} steps of {per_step} prompts; {run.describe()}")
        if not cfg.resume:
            metrics.log({"step": 0, "data": s.as_dict()})

    def save(step: int, extra: dict[str, Any]) -> Path | None:
        meta = {"init": str(cfg.init), "ref": str(cfg.ref or cfg.init), "init_stage": init_meta.get("stage"),
                "beta": cfg.beta, **extra}
        return training.save(run, step, model=policy, model_config=mcfg, tokenizer_json=tokenizer.to_str(),
                             optimizer=optimizer, meta=meta)

    # --- loop ------------------------------------------------------------------------------
    loop = training.Loop(run, max_steps, start_step)
    last: dict[str, Any] = {}
    t_last, pairs_since = time.perf_counter(), 0
    policy.train()
    for step in loop:
        lr = loop.set_lr(optimizer)
        loss_sum = torch.zeros((), device=device)
        stat_sums: dict[str, torch.Tensor] = {}
        for micro in range(cfg.grad_accum):
            batch = train.batch(step * cfg.grad_accum + micro, cfg.batch_size, seed=cfg.seed,
                                rank=dist_info.rank, world_size=dist_info.world_size).to(device)
            with torch.inference_mode(), runtime.autocast(device, dtype):
                ref_logps = response_logprobs(reference, batch)  # (N,)
            ref_logps = ref_logps.clone()  # an ordinary tensor, usable in the autograd graph
            with training.sync_context(train_model, run, micro, cfg.grad_accum), runtime.autocast(device, dtype):
                logps = response_logprobs(train_model, batch)  # (N,)
                loss, chosen_r, rejected_r = dpo_loss(logps[batch.chosen], logps[batch.rejected],
                                                      ref_logps[batch.chosen], ref_logps[batch.rejected],
                                                      cfg.beta, batch.group)
                loss = loss / cfg.grad_accum  # every micro-batch holds batch_size prompts
            loss.backward()
            loss_sum += loss.detach()
            for k, v in _pair_stats(chosen_r, rejected_r).items():
                stat_sums[k] = stat_sums.get(k, 0.0) + v / cfg.grad_accum
            pairs_since += batch.num_pairs
        loss_value = runtime.all_reduce_mean(loss_sum).item()
        grad_norm = training.optimizer_step(run, optimizer, policy.parameters(), loss_value, step)

        if loop.log_due(cfg.log_every):
            dt = time.perf_counter() - t_last
            pairs_per_s = pairs_since * dist_info.world_size / max(dt, 1e-9)
            t_last, pairs_since = time.perf_counter(), 0
            last = {"step": loop.step, "loss": loss_value,
                    **{k: runtime.all_reduce_mean(v).item() for k, v in stat_sums.items()},
                    "lr": lr, "grad_norm": grad_norm, "pairs_per_s": round(pairs_per_s, 1),
                    "epoch": loop.step * per_step / len(train)}
            metrics.log(last)
            loop.bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{last['accuracy']:.2f}", margin=f"{last['margin']:.3f}")
        if loop.eval_due(cfg.eval_every) and val is not None and run.is_main:
            result = evaluate(policy, reference, val, cfg.beta, cfg.eval_batch_size, device, dtype)
            metrics.log({"step": loop.step, **result})
            last.update(result)
            loop.write(f"step {loop.step}: train loss {loss_value:.4f}, val loss {result['val_loss']:.4f}, "
                       f"val accuracy {result['val_accuracy']:.3f}, val margin {result['val_margin']:.4f} "
                       f"(chosen {result['val_chosen_reward']:.4f}, rejected {result['val_rejected_reward']:.4f})")
        if loop.save_due(cfg.save_every):
            save(loop.step, {"loss": loss_value})

    # --- save ------------------------------------------------------------------------------
    step = loop.step
    ckpt = save(step, {k: v for k, v in last.items() if k != "step"})
    training.finish(run, metrics, [
        (["loss", "val_loss"], "loss.png", f"DPO loss (beta {cfg.beta})"),
        (["chosen_reward", "rejected_reward", "margin", "val_chosen_reward", "val_rejected_reward", "val_margin"],
         "rewards.png", "DPO implicit rewards"),
        (["accuracy", "val_accuracy"], "accuracy.png", "DPO preference accuracy")])
    if run.is_main:
        print(f"dpo: step {step}/{max_steps}, checkpoint {ckpt}"
              + (f"; val accuracy {last['val_accuracy']:.3f}, margin {last['val_margin']:.4f}"
                 if "val_accuracy" in last else ""))
    return {"interrupted": loop.interrupted, "step": step, "max_steps": max_steps,
            "checkpoint": str(ckpt) if ckpt else None, "data": train.stats.as_dict(), **last}
