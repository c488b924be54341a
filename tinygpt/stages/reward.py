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

Uses: losses.pairwise_loss, rewards, optim, checkpoint, data.preferences. It does not know how the
rankings were made, nor about PPO.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from tinygpt import runtime
from tinygpt.checkpoint import (CheckpointError, capture_rng_state, latest_checkpoint, load_meta, load_model,
                                load_tokenizer_json, resume_training, save_training_checkpoint)
from tinygpt.config import opt, save_config, to_jsonable
from tinygpt.data.preferences import PreferenceDataset, held_out_preferences
from tinygpt.data.sources import DataError, iter_records, require_field
from tinygpt.losses import pairwise_loss, preference_accuracy
from tinygpt.runlog import MetricsWriter, plot_curves, read_metrics
from tinygpt.optim import lr_at, make_optimizer, set_lr
from tinygpt.reward_model import REWARD_SHIFT_KEY, LastTokenReward, score
from tinygpt.tokenizer import Tokenizer, validate_messages
from tinygpt.runtime import TrainingDiverged  # noqa: F401 (re-exported for callers)


@dataclass
class RewardConfig:
    init: str = opt("", "SFT checkpoint to start from (a run directory or checkpoint directory); a scalar head is added")
    rankings: str = opt("", "training preferences: rankings {prompt, completions, ranking} and/or pairs "
                            "{prompt, chosen, rejected} JSONL (from `tinygpt rank`, or a person's labels)")
    val_rankings: str = opt("", "held-out preferences in the same format (empty: no validation)")
    demonstrations: str = opt("", "SFT chats {\"messages\": [...]} JSONL: rewards are shifted so they average 0 "
                                  "(empty: no shift)")
    out: str = opt("runs/reward", "run directory: checkpoints/, metrics.jsonl, loss.png, resolved_config.json")
    skip_bad: bool = opt(False, "skip (and count) malformed records instead of stopping at the first one")
    # optimisation
    batch_size: int = opt(8, "prompts per micro-batch on each rank (each with all K-choose-2 pairs of its ranking)")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    max_steps: int = opt(0, "optimizer steps in the whole run; 0 = derive from --epochs")
    epochs: float = opt(1.0, "passes over the prompts when --max-steps is 0 (InstructGPT: 1; more overfits)")
    lr: float = opt(1e-4, "peak learning rate")
    min_lr: float = opt(1e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(10, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    # bookkeeping
    eval_every: int = opt(50, "steps between validation evaluations")
    eval_batch_size: int = opt(16, "prompts per validation batch")
    shift_samples: int = opt(512, "demonstrations scored to compute the reward shift (0 = all)")
    log_every: int = opt(10, "steps between metrics.jsonl records")
    save_every: int = opt(200, "steps between checkpoints (one is always written at the end)")
    keep_last: int = opt(2, "checkpoints kept in OUT/checkpoints")
    seed: int = opt(1337, "seed for the data order and the scalar head's initialisation")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    dtype: str = opt("auto", "autocast dtype: auto, float32 or bfloat16 (weights stay float32)")
    resume: bool = opt(False, "continue from OUT's latest checkpoint exactly; an error if there is none")
    stop_after: int = opt(0, "stop (with a checkpoint) after this many steps of this invocation; 0 = run to the end")
    progress: bool = opt(True, "show a progress bar")


def evaluate(reward_model: torch.nn.Module, data: PreferenceDataset, batch_size: int, device: torch.device,
             dtype: torch.dtype) -> dict[str, float]:
    """Validation loss (each prompt once), pair accuracy vs the labels, and vs the noise-free utility order."""
    was_training = reward_model.training
    reward_model.eval()
    loss_sum = acc_sum = 0.0
    n_prompts = n_pairs = 0
    oracle_hits, oracle_pairs = 0.0, 0
    with torch.inference_mode(), runtime.autocast(device, dtype):
        for batch in data.eval_batches(batch_size):
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
            oracle_hits += preference_accuracy(torch.where(u_c > u_r, r_c, r_r), torch.where(u_c > u_r, r_r, r_c))[strict].sum().item()
            oracle_pairs += int(strict.sum())
    reward_model.train(was_training)
    out = {"val_loss": loss_sum / n_prompts, "val_accuracy": acc_sum / n_pairs}
    if oracle_pairs:
        out["val_accuracy_vs_oracle"] = oracle_hits / oracle_pairs
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
    dist_info, device = runtime.init_distributed(cfg.device)
    dtype = runtime.resolve_dtype(cfg.dtype, device)
    out = Path(cfg.out)
    if not cfg.init:
        raise ValueError("--init is required: the SFT checkpoint the reward model starts from (e.g. runs/x/sft)")
    if not cfg.rankings:
        raise ValueError("--rankings is required: preference JSONL (e.g. runs/x/rank/rankings.jsonl from `tinygpt rank`)")
    if cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.max_steps < 0 or cfg.eval_batch_size < 1:
        raise ValueError("--batch-size, --grad-accum and --eval-batch-size must be >= 1; --max-steps >= 0")

    # --- model and tokenizer -----------------------------------------------------------------
    runtime.seed_everything(cfg.seed)  # the fresh scalar head's initialisation
    gpt, mcfg = load_model(cfg.init, device=device, config_overrides={"scalar_head": True})
    tokenizer = Tokenizer.from_str(load_tokenizer_json(cfg.init))
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise CheckpointError(f"{cfg.init}: tokenizer has {tokenizer.vocab_size} tokens, model {mcfg.vocab_size}")
    init_meta = load_meta(cfg.init)
    reward_model = LastTokenReward(gpt)

    # --- data ------------------------------------------------------------------------------
    train = PreferenceDataset(cfg.rankings, tokenizer, mcfg.block_size, skip_bad=cfg.skip_bad)
    val = (held_out_preferences(cfg.val_rankings, tokenizer, mcfg.block_size, skip_bad=cfg.skip_bad, stage="reward")
           if cfg.val_rankings else None)
    noise_ceiling = val.noise_ceiling() if val is not None else None
    demos, demos_too_long = (read_demonstrations(cfg.demonstrations, tokenizer, mcfg.block_size, cfg.shift_samples)
                             if cfg.demonstrations else ([], 0))
    per_step = cfg.batch_size * cfg.grad_accum * dist_info.world_size
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / per_step))
    optimizer = make_optimizer(gpt, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))

    # --- resume ----------------------------------------------------------------------------
    start_step = 0
    if cfg.resume:
        state = resume_training(out, gpt, optimizer, device=device, world_size=dist_info.world_size,
                                verbose=dist_info.is_main)
        start_step = int(state["step"])
    if dist_info.is_main:
        save_config(cfg, out / "resolved_config.json")

    train_model: torch.nn.Module = reward_model
    if dist_info.enabled:
        train_model = DDP(reward_model, device_ids=[device.index] if device.type == "cuda" else None)

    metrics = MetricsWriter(out, resume_step=start_step if cfg.resume else None, enabled=dist_info.is_main)
    if dist_info.is_main:
        s = train.stats
        print(f"reward: {gpt.num_params() / 1e6:.2f}M params; {len(train)} prompts, {s.pairs} pairs "
              f"({s.identical_pairs} identical and {s.too_long_pairs} too-long pairs dropped, {s.skipped_bad} bad); "
              f"{len(val) if val else 0} val prompts"
              + (f", labeler noise ceiling {noise_ceiling:.3f}" if noise_ceiling is not None else "")
              + f"; {max_steps} steps of {per_step} prompts; device {device}, {dist_info.world_size} rank(s)")
        if not cfg.resume:
            metrics.log({"step": 0, "data": s.as_dict(), "noise_ceiling": noise_ceiling})

    def reward_shift() -> float:
        return score(gpt, demos, device).mean().item() if demos else 0.0

    def save(step: int, extra: dict[str, Any]) -> Path | None:
        if not dist_info.is_main:
            return None
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": capture_rng_state(),
                 "data": {"seed": cfg.seed, "next_step": step}, "world_size": dist_info.world_size,
                 "config": to_jsonable(cfg)}
        meta = {"stage": "reward", "step": step, "init": str(cfg.init), "init_stage": init_meta.get("stage"),
                REWARD_SHIFT_KEY: reward_shift(), "shift_demonstrations": len(demos),
                "noise_ceiling": noise_ceiling, **extra}
        return save_training_checkpoint(out, step, keep_last=cfg.keep_last, model=gpt, model_config=mcfg,
                                        tokenizer_json=tokenizer.to_str(), trainer_state=state, meta=meta)

    def validate(step: int) -> dict[str, Any]:
        if val is None:
            return {}
        result = evaluate(reward_model, val, cfg.eval_batch_size, device, dtype)
        if noise_ceiling:
            result["val_accuracy_share_of_ceiling"] = result["val_accuracy"] / noise_ceiling
        metrics.log({"step": step, **result})
        return result

    # --- loop ------------------------------------------------------------------------------
    end_step = max_steps if cfg.stop_after <= 0 else min(max_steps, start_step + cfg.stop_after)
    bar = tqdm(total=max_steps, initial=start_step, desc="reward", unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and dist_info.is_main))
    last: dict[str, Any] = {}
    step = start_step
    t_last, steps_since, pairs_since = time.perf_counter(), 0, 0
    gpt.train()
    interrupted = False
    with runtime.GracefulStop() as stop:
        while step < end_step:
            lr = lr_at(step, max_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=max_steps)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), device=device)
            acc_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                batch = train.batch(step * cfg.grad_accum + micro, cfg.batch_size, seed=cfg.seed,
                                    rank=dist_info.rank, world_size=dist_info.world_size).to(device)
                sync = micro == cfg.grad_accum - 1 or not dist_info.enabled
                ctx = train_model.no_sync() if not sync else contextlib.nullcontext()
                with ctx, runtime.autocast(device, dtype):
                    rewards = train_model(batch.ids, batch.lengths)  # (N,)
                    # every micro-batch holds batch_size prompts, so the plain mean of their means is per prompt
                    loss = pairwise_loss(rewards[batch.chosen], rewards[batch.rejected], batch.group) / cfg.grad_accum
                loss.backward()
                loss_sum += loss.detach()
                acc_sum += preference_accuracy(rewards[batch.chosen], rewards[batch.rejected]).detach().mean() / cfg.grad_accum
                pairs_since += batch.num_pairs
            loss_value = runtime.all_reduce_mean(loss_sum).item()
            grad_norm = (torch.nn.utils.clip_grad_norm_(gpt.parameters(), cfg.grad_clip).item()
                         if cfg.grad_clip > 0 else float("nan"))
            if not math.isfinite(loss_value) or (cfg.grad_clip > 0 and not math.isfinite(grad_norm)):
                bar.close()
                raise TrainingDiverged(
                    f"reward step {step}: loss {loss_value}, grad norm {grad_norm}. No checkpoint was written for "
                    f"this step; the last good one is {latest_checkpoint(out)}. Try a lower --lr (now {cfg.lr}), "
                    f"more --warmup-steps, or --dtype float32.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_since += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == end_step:
                dt = time.perf_counter() - t_last
                pairs_per_s = pairs_since * dist_info.world_size / max(dt, 1e-9)
                t_last, steps_since, pairs_since = time.perf_counter(), 0, 0
                last = {"step": step, "loss": loss_value, "accuracy": runtime.all_reduce_mean(acc_sum).item(),
                        "lr": lr, "grad_norm": grad_norm, "pairs_per_s": round(pairs_per_s, 1),
                        "epoch": step * per_step / len(train)}
                metrics.log(last)
                bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{last['accuracy']:.2f}", lr=f"{lr:.2e}")
            if (step % cfg.eval_every == 0 or step == max_steps) and dist_info.is_main:
                result = validate(step)
                if result:
                    last.update(result)
                    bar.write(f"step {step}: train loss {loss_value:.4f}, val loss {result['val_loss']:.4f}, "
                              f"val accuracy {result['val_accuracy']:.3f}"
                              + (f" ({result['val_accuracy_share_of_ceiling']:.2f} of the noise ceiling "
                                 f"{noise_ceiling:.3f})" if noise_ceiling else ""))
            if step % cfg.save_every == 0 and step != end_step:
                save(step, {"loss": loss_value})
            stop_now = torch.tensor(float(stop.stop), device=device)
            if runtime.all_reduce_mean(stop_now).item() > 0:
                if dist_info.is_main:
                    bar.write(f"interrupted: saving step {step} (resume with --resume)")
                interrupted = True
                break
    bar.close()

    # --- save ------------------------------------------------------------------------------
    ckpt = save(step, {k: v for k, v in last.items() if k != "step"})
    shift = load_meta(ckpt).get(REWARD_SHIFT_KEY, 0.0) if ckpt else None
    metrics.close()
    if dist_info.is_main:
        recs = read_metrics(out / "metrics.jsonl")
        plot_curves(recs, ["loss", "val_loss"], out / "loss.png", title="reward model loss (pairwise)")
        plot_curves(recs, ["accuracy", "val_accuracy", "val_accuracy_vs_oracle"], out / "accuracy.png",
                    title="reward model pair accuracy" + (f" (noise ceiling {noise_ceiling:.3f})" if noise_ceiling else ""))
        print(f"reward: step {step}/{max_steps}, checkpoint {ckpt}, reward shift {shift:.4f} over {len(demos)} "
              f"demonstrations ({demos_too_long} too long)"
              + (f"; val accuracy {last['val_accuracy']:.3f}" if "val_accuracy" in last else "")
              + (f", noise ceiling {noise_ceiling:.3f}" if noise_ceiling is not None else ""))
    runtime.barrier()
    runtime.cleanup_distributed()
    return {"interrupted": interrupted, "step": step, "max_steps": max_steps, "checkpoint": str(ckpt) if ckpt else None, "reward_shift": shift,
            "noise_ceiling": noise_ceiling, "data": train.stats.as_dict(), **last}
