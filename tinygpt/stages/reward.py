"""Reward model: the SFT transformer plus a scalar head, trained on ranked completions (InstructGPT step 2).

Reads top to bottom: config, data, model, optimizer, (resume), loop, save. The model is the SFT
checkpoint with a fresh ``scalar_head`` (``load_model(init, config_overrides={"scalar_head": True})``);
the reward of a conversation is the head on its last token (``reward_model.LastTokenReward``). The loss
is ``losses.pairwise_loss`` (Bradley-Terry) over all K-choose-2 pairs of each prompt, each prompt
counting once (InstructGPT eq. 1): a batch is ``--batch-size`` prompts with every pair of each, and
each completion is scored once. The batch at step s is a pure function of (seed, s), so resuming
needs only the step.

Reported on the held-out rankings, during and after training: pair accuracy against the labels
(ties count 1/2), loss, and, when the rankings carry the oracle's utilities (``tinygpt rank`` writes
them), the labeler's noise ceiling (how often the noisy labels agree with the noise-free utility
order: the best accuracy any reward model can reach on these labels) and the reward model's own
accuracy against that noise-free order. ``val_accuracy / noise_ceiling`` is the share of what the
noise allows.

At every save the rewards are shifted so the SFT demonstrations (``--demonstrations``) score 0 on
average; the shift is stored as ``reward_shift`` in the checkpoint's ``tinygpt.json`` and
``reward_model.load_reward_model`` / ``reward_model.score`` apply it.

    tinygpt reward --init runs/x/sft --rankings runs/x/rank/rankings.jsonl \\
        --val-rankings runs/x/rank/rankings_val.jsonl --demonstrations runs/x/world/sft_train.jsonl --out runs/x/reward

Uses: training (the skeleton), losses.pairwise_loss, reward_model, data.preferences. It does not know how the
rankings were made, nor about PPO.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinygpt import runtime, training
from tinygpt.checkpoint import load_meta
from tinygpt.config import opt
from tinygpt.data.preferences import PreferenceDataset, held_out_preferences
from tinygpt.data.sources import DataError, iter_records, require_field
from tinygpt.eval.metrics import wilson_interval
from tinygpt.losses import pairwise_loss, preference_accuracy
from tinygpt.reward_model import REWARD_SHIFT_KEY, LastTokenReward, score
from tinygpt.tokenizer import Tokenizer, validate_messages
from tinygpt.runtime import TrainingDiverged  # noqa: F401 (re-exported for callers)


@dataclass
class RewardConfig(training.PreferenceConfig):
    init: str = opt("", "SFT checkpoint to start from (a run directory or checkpoint directory); a scalar head is added",
                    required=True)
    rankings: str = opt("", "training preferences: rankings {prompt, completions, ranking} and/or pairs "
                            "{prompt, chosen, rejected} JSONL (from `tinygpt rank`, or a person's labels)", required=True)
    val_rankings: str = opt("", "held-out preferences in the same format (empty: no validation)")
    demonstrations: str = opt("", "SFT chats {\"messages\": [...]} JSONL: rewards are shifted so they average 0 "
                                  "(empty: no shift)")
    out: str = opt("runs/reward", "run directory: checkpoints/, metrics.jsonl, loss.png, resolved_config.json")
    shift_samples: int = opt(512, "demonstrations scored to compute the reward shift (0 = all)")
    # the shared fields (training.PreferenceConfig) with the reward model's defaults
    epochs: float = opt(1.0, "passes over the prompts when --max-steps is 0 (InstructGPT: 1; more overfits)")
    eval_every: int = opt(50, "steps between validation evaluations")
    seed: int = opt(1337, "seed for the data order and the scalar head's initialisation")


def evaluate(reward_model: torch.nn.Module, data: PreferenceDataset, batch_size: int, device: torch.device,
             dtype: torch.dtype) -> dict[str, Any]:
    """Validation loss (each prompt once), pair accuracy vs the labels, and vs the noise-free utility order:
    the headline (InstructGPT's labels are noisy; the oracle's order is what a reward model should learn),
    with its 95% interval and per family (the ``family`` of the rankings)."""
    was_training = reward_model.training
    reward_model.eval()
    loss_sum = acc_sum = 0.0
    n_prompts = n_pairs = 0
    oracle_scores: list[float] = []
    by_family: dict[str, list[float]] = {}
    with torch.inference_mode(), runtime.autocast(device, dtype):
        for b, batch in enumerate(data.eval_batches(batch_size)):
            families = [str(g.info.get("family", "-")) for g in data.groups[b * batch_size:(b + 1) * batch_size]]
            batch = batch.to(device)
            rewards = reward_model(batch.ids, batch.lengths)  # (N,)
            r_c, r_r = rewards[batch.chosen], rewards[batch.rejected]  # (P,)
            groups = int(batch.group.max()) + 1
            loss_sum += pairwise_loss(r_c, r_r, batch.group).item() * groups
            n_prompts += groups
            acc_sum += preference_accuracy(r_c, r_r).sum().item()
            n_pairs += batch.num_pairs
            u_c, u_r = batch.utilities[batch.chosen], batch.utilities[batch.rejected]
            strict = torch.isfinite(u_c) & torch.isfinite(u_r) & (u_c != u_r)
            right = preference_accuracy(torch.where(u_c > u_r, r_c, r_r), torch.where(u_c > u_r, r_r, r_c))
            for score, group in zip(right[strict].tolist(), batch.group[strict].tolist()):
                oracle_scores.append(score)
                by_family.setdefault(families[group], []).append(score)
    reward_model.train(was_training)
    out: dict[str, Any] = {"val_loss": loss_sum / n_prompts, "val_accuracy": acc_sum / n_pairs}
    if oracle_scores:
        out["val_accuracy_vs_oracle"] = sum(oracle_scores) / len(oracle_scores)
        out["val_accuracy_vs_oracle_ci95"] = wilson_interval(sum(oracle_scores), len(oracle_scores))
        out["val_oracle_pairs"] = len(oracle_scores)
        out["val_accuracy_vs_oracle_per_family"] = {
            f: {"accuracy": sum(s) / len(s), "ci95": wilson_interval(sum(s), len(s)), "pairs": len(s)}
            for f, s in sorted(by_family.items())}
    return out


def read_demonstrations(path: str, tokenizer: Tokenizer, block_size: int, limit: int) -> tuple[list[list[int]], int]:
    """Rendered SFT chats ending with an assistant turn (later turns dropped), at most ``block_size`` tokens.

    Returns (sequences, number skipped as too long)."""
    sequences, too_long = [], 0
    for where, record in iter_records(path):
        messages = require_field(record, "messages", list, where)
        try:
            validate_messages(messages)
        except (TypeError, ValueError) as e:
            raise DataError(f"{where}: field 'messages': {e}") from None
        last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=None)
        if last is None:
            raise DataError(f"{where}: field 'messages' has no assistant message to score")
        ids, _ = tokenizer.render_chat(messages[:last + 1])
        if len(ids) > block_size:
            too_long += 1
            continue
        sequences.append(ids)
        if limit and len(sequences) >= limit:
            break
    if not sequences:
        raise DataError(f"{path}: no demonstration fits in {block_size} tokens ({too_long} too long)")
    return sequences, too_long


def main(cfg: RewardConfig) -> dict[str, Any]:
    # --- setup -----------------------------------------------------------------------------
    if not cfg.init:
        raise ValueError("--init is required: the SFT checkpoint the reward model starts from (e.g. runs/x/sft)")
    if not cfg.rankings:
        raise ValueError("--rankings is required: preference JSONL (e.g. runs/x/rank/rankings.jsonl from `tinygpt rank`)")
    run = training.setup(cfg, "reward")  # seeds the fresh scalar head's initialisation
    device, dtype, dist_info = run.device, run.dtype, run.dist

    # --- model and tokenizer -----------------------------------------------------------------
    gpt, mcfg, tokenizer, init_meta = training.load_init(run, cfg.init, {"scalar_head": True})
    reward_model = LastTokenReward(gpt)

    # --- data ------------------------------------------------------------------------------
    train = PreferenceDataset(cfg.rankings, tokenizer, mcfg.block_size, skip_bad=cfg.skip_bad)
    val = (held_out_preferences(cfg.val_rankings, tokenizer, mcfg.block_size, skip_bad=cfg.skip_bad, stage="reward")
           if cfg.val_rankings else None)
    noise_ceiling = val.noise_ceiling() if val is not None else None
    demos, demos_too_long = (read_demonstrations(cfg.demonstrations, tokenizer, mcfg.block_size, cfg.shift_samples)
                             if cfg.demonstrations else ([], 0))
    per_step, max_steps = training.epoch_steps(run, len(train))

    # --- optimizer, (resume) -----------------------------------------------------------------
    optimizer = training.make_optimizer(gpt, cfg)
    start_step, _ = training.resume(run, gpt, optimizer)
    metrics = training.start_log(run, start_step)
    train_model = training.wrap_ddp(reward_model, run)
    if run.is_main:
        s = train.stats
        print(f"reward: {gpt.num_params() / 1e6:.2f}M params; {len(train)} prompts, {s.pairs} pairs "
              f"({s.identical_pairs} identical and {s.too_long_pairs} too-long pairs dropped, {s.skipped_bad} bad); "
              f"{len(val) if val else 0} val prompts"
              + (f", labeler noise ceiling {noise_ceiling:.3f}" if noise_ceiling is not None else "")
              + f"; {max_steps} steps of {per_step} prompts; {run.describe()}")
        if not cfg.resume:
            metrics.log({"step": 0, "data": s.as_dict(), "noise_ceiling": noise_ceiling})

    def reward_shift() -> float:
        return score(gpt, demos, device).mean().item() if demos else 0.0

    def save(step: int, extra: dict[str, Any]) -> Path | None:
        if not run.is_main:
            return None
        meta = {"init": str(cfg.init), "init_stage": init_meta.get("stage"), REWARD_SHIFT_KEY: reward_shift(),
                "shift_demonstrations": len(demos), "noise_ceiling": noise_ceiling, **extra}
        return training.save(run, step, model=gpt, model_config=mcfg, tokenizer_json=tokenizer.to_str(),
                             optimizer=optimizer, meta=meta)

    def validate(step: int) -> dict[str, Any]:
        if val is None:
            return {}
        result = evaluate(reward_model, val, cfg.eval_batch_size, device, dtype)
        if noise_ceiling:
            result["val_accuracy_share_of_ceiling"] = result["val_accuracy"] / noise_ceiling
        metrics.log({"step": step, **result})
        return result

    # --- loop ------------------------------------------------------------------------------
    loop = training.Loop(run, max_steps, start_step)
    last: dict[str, Any] = {}
    t_last, pairs_since = time.perf_counter(), 0
    gpt.train()
    for step in loop:
        lr = loop.set_lr(optimizer)
        loss_sum = torch.zeros((), device=device)
        acc_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            batch = train.batch(step * cfg.grad_accum + micro, cfg.batch_size, seed=cfg.seed,
                                rank=dist_info.rank, world_size=dist_info.world_size).to(device)
            with training.sync_context(train_model, run, micro, cfg.grad_accum), runtime.autocast(device, dtype):
                rewards = train_model(batch.ids, batch.lengths)  # (N,)
                # every micro-batch holds batch_size prompts, so the plain mean of their means is per prompt
                loss = pairwise_loss(rewards[batch.chosen], rewards[batch.rejected], batch.group) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
            acc_sum += preference_accuracy(rewards[batch.chosen], rewards[batch.rejected]).detach().mean() / cfg.grad_accum
            pairs_since += batch.num_pairs
        loss_value = runtime.all_reduce_mean(loss_sum).item()
        grad_norm = training.optimizer_step(run, optimizer, gpt.parameters(), loss_value, step)

        if loop.log_due(cfg.log_every):
            dt = time.perf_counter() - t_last
            pairs_per_s = pairs_since * dist_info.world_size / max(dt, 1e-9)
            t_last, pairs_since = time.perf_counter(), 0
            last = {"step": loop.step, "loss": loss_value, "accuracy": runtime.all_reduce_mean(acc_sum).item(),
                    "lr": lr, "grad_norm": grad_norm, "pairs_per_s": round(pairs_per_s, 1),
                    "epoch": loop.step * per_step / len(train)}
            metrics.log(last)
            loop.bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{last['accuracy']:.2f}", lr=f"{lr:.2e}")
        if loop.eval_due(cfg.eval_every) and run.is_main:
            result = validate(loop.step)
            if result:
                last.update(result)
                loop.write(f"step {loop.step}: train loss {loss_value:.4f}, val loss {result['val_loss']:.4f}, "
                           f"val accuracy {result['val_accuracy']:.3f}"
                           + (f" ({result['val_accuracy_share_of_ceiling']:.2f} of the noise ceiling "
                              f"{noise_ceiling:.3f})" if noise_ceiling else ""))
        if loop.save_due(cfg.save_every):
            save(loop.step, {"loss": loss_value})

    # --- save ------------------------------------------------------------------------------
    step = loop.step
    ckpt = save(step, {k: v for k, v in last.items() if k != "step"})
    shift = load_meta(ckpt).get(REWARD_SHIFT_KEY, 0.0) if ckpt else None
    training.finish(run, metrics, [
        (["loss", "val_loss"], "loss.png", "reward model loss (pairwise)"),
        (["accuracy", "val_accuracy", "val_accuracy_vs_oracle"], "accuracy.png",
         "reward model pair accuracy" + (f" (noise ceiling {noise_ceiling:.3f})" if noise_ceiling else ""))])
    if run.is_main:
        print(f"reward: step {step}/{max_steps}, checkpoint {ckpt}, reward shift {shift:.4f} over {len(demos)} "
              f"demonstrations ({demos_too_long} too long)"
              + (f"; vs the noise-free order {last['val_accuracy_vs_oracle']:.3f} (95% interval "
                 f"{last['val_accuracy_vs_oracle_ci95'][0]:.3f}-{last['val_accuracy_vs_oracle_ci95'][1]:.3f}, "
                 f"{last['val_oracle_pairs']} pairs)" if "val_accuracy_vs_oracle" in last else "")
              + (f"; val accuracy {last['val_accuracy']:.3f}" if "val_accuracy" in last else "")
              + (f", noise ceiling {noise_ceiling:.3f}" if noise_ceiling is not None else ""))
    return {"interrupted": loop.interrupted, "step": step, "max_steps": max_steps,
            "checkpoint": str(ckpt) if ckpt else None, "reward_shift": shift, "noise_ceiling": noise_ceiling,
            "data": train.stats.as_dict(), **last}
