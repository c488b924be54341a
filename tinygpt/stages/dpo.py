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

Uses: losses.dpo_loss and sequence_logprobs, optim, checkpoint, data.preferences. It does not know
how the preferences were made, nor about reward models or PPO.
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
from tinygpt.data.preferences import PreferenceBatch, PreferenceDataset, held_out_preferences
from tinygpt.losses import dpo_loss, preference_accuracy, sequence_logprobs
from tinygpt.runlog import MetricsWriter, plot_curves, read_metrics
from tinygpt.model import GPT
from tinygpt.optim import lr_at, make_optimizer, set_lr
from tinygpt.tokenizer import Tokenizer
from tinygpt.runtime import TrainingDiverged  # noqa: F401 (re-exported for callers)


@dataclass
class DPOConfig:
    init: str = opt("", "SFT checkpoint to start the policy from (a run directory or checkpoint directory)")
    ref: str = opt("", "frozen reference checkpoint (empty: the same as --init, as in the DPO paper)")
    pairs: str = opt("", "training preferences: pairs {prompt, chosen, rejected} and/or rankings "
                         "{prompt, completions, ranking} JSONL (e.g. from `tinygpt rank`)")
    val_pairs: str = opt("", "held-out preferences in the same format (empty: no validation)")
    out: str = opt("runs/dpo", "run directory: checkpoints/, metrics.jsonl, loss.png, resolved_config.json")
    beta: float = opt(0.1, "DPO beta: strength of the implicit KL constraint to the reference (higher = closer)")
    skip_bad: bool = opt(False, "skip (and count) malformed records instead of stopping at the first one")
    # optimisation
    batch_size: int = opt(8, "prompts per micro-batch on each rank (each with all its pairs)")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    max_steps: int = opt(0, "optimizer steps in the whole run; 0 = derive from --epochs")
    epochs: float = opt(1.0, "passes over the prompts when --max-steps is 0")
    lr: float = opt(5e-5, "peak learning rate")
    min_lr: float = opt(5e-6, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(10, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    # bookkeeping
    eval_every: int = opt(50, "steps between validation evaluations")
    eval_batch_size: int = opt(16, "prompts per validation batch")
    log_every: int = opt(10, "steps between metrics.jsonl records")
    save_every: int = opt(200, "steps between checkpoints (one is always written at the end)")
    keep_last: int = opt(2, "checkpoints kept in OUT/checkpoints")
    seed: int = opt(1337, "seed for the data order and dropout")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    dtype: str = opt("auto", "autocast dtype: auto, float32 or bfloat16 (weights stay float32)")
    resume: bool = opt(False, "continue from OUT's latest checkpoint exactly; an error if there is none")
    stop_after: int = opt(0, "stop (with a checkpoint) after this many steps of this invocation; 0 = run to the end")
    progress: bool = opt(True, "show a progress bar")


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
    dist_info, device = runtime.init_distributed(cfg.device)
    dtype = runtime.resolve_dtype(cfg.dtype, device)
    out = Path(cfg.out)
    if not cfg.init:
        raise ValueError("--init is required: the SFT checkpoint the policy starts from (e.g. runs/x/sft)")
    if not cfg.pairs:
        raise ValueError("--pairs is required: preference JSONL (e.g. runs/x/rank/pairs.jsonl from `tinygpt rank`)")
    if cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.max_steps < 0 or cfg.eval_batch_size < 1:
        raise ValueError("--batch-size, --grad-accum and --eval-batch-size must be >= 1; --max-steps >= 0")
    if cfg.beta <= 0:
        raise ValueError(f"--beta must be > 0, got {cfg.beta}")

    # --- models and tokenizer ------------------------------------------------------------------
    runtime.seed_everything(cfg.seed)
    policy, mcfg = load_model(cfg.init, device=device)
    reference, ref_cfg = load_model(cfg.ref or cfg.init, device=device)
    if ref_cfg.vocab_size != mcfg.vocab_size:
        raise CheckpointError(f"{cfg.ref}: reference vocabulary ({ref_cfg.vocab_size}) differs from the policy's "
                              f"({mcfg.vocab_size})")
    reference.eval().requires_grad_(False)
    tokenizer = Tokenizer.from_str(load_tokenizer_json(cfg.init))
    if tokenizer.vocab_size != mcfg.vocab_size:
        raise CheckpointError(f"{cfg.init}: tokenizer has {tokenizer.vocab_size} tokens, model {mcfg.vocab_size}")
    init_meta = load_meta(cfg.init)

    # --- data ------------------------------------------------------------------------------
    max_tokens = min(mcfg.block_size, ref_cfg.block_size) + 1  # block_size inputs + the last target
    train = PreferenceDataset(cfg.pairs, tokenizer, max_tokens, skip_bad=cfg.skip_bad)
    val = (held_out_preferences(cfg.val_pairs, tokenizer, max_tokens, skip_bad=cfg.skip_bad, stage="dpo")
           if cfg.val_pairs else None)
    per_step = cfg.batch_size * cfg.grad_accum * dist_info.world_size
    max_steps = cfg.max_steps or max(1, math.ceil(cfg.epochs * len(train) / per_step))
    optimizer = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))

    # --- resume ----------------------------------------------------------------------------
    start_step = 0
    if cfg.resume:
        state = resume_training(out, policy, optimizer, device=device, world_size=dist_info.world_size,
                                verbose=dist_info.is_main)
        start_step = int(state["step"])
    if dist_info.is_main:
        save_config(cfg, out / "resolved_config.json")

    train_model: torch.nn.Module = policy
    if dist_info.enabled:
        train_model = DDP(policy, device_ids=[device.index] if device.type == "cuda" else None)

    metrics = MetricsWriter(out, resume_step=start_step if cfg.resume else None, enabled=dist_info.is_main)
    if dist_info.is_main:
        s = train.stats
        print(f"dpo: beta {cfg.beta}, {policy.num_params() / 1e6:.2f}M params; {len(train)} prompts, {s.pairs} pairs "
              f"({s.identical_pairs} identical and {s.too_long_pairs} too-long pairs dropped, {s.skipped_bad} bad); "
              f"{len(val) if val else 0} val prompts; {max_steps} steps of {per_step} prompts; device {device}, "
              f"{dist_info.world_size} rank(s)")
        if not cfg.resume:
            metrics.log({"step": 0, "data": s.as_dict()})

    def save(step: int, extra: dict[str, Any]) -> Path | None:
        if not dist_info.is_main:
            return None
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": capture_rng_state(),
                 "data": {"seed": cfg.seed, "next_step": step}, "world_size": dist_info.world_size,
                 "config": to_jsonable(cfg)}
        meta = {"stage": "dpo", "step": step, "init": str(cfg.init), "ref": str(cfg.ref or cfg.init),
                "init_stage": init_meta.get("stage"), "beta": cfg.beta, **extra}
        return save_training_checkpoint(out, step, keep_last=cfg.keep_last, model=policy, model_config=mcfg,
                                        tokenizer_json=tokenizer.to_str(), trainer_state=state, meta=meta)

    # --- loop ------------------------------------------------------------------------------
    end_step = max_steps if cfg.stop_after <= 0 else min(max_steps, start_step + cfg.stop_after)
    bar = tqdm(total=max_steps, initial=start_step, desc="dpo", unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and dist_info.is_main))
    last: dict[str, Any] = {}
    step = start_step
    t_last, pairs_since = time.perf_counter(), 0
    policy.train()
    interrupted = False
    with runtime.GracefulStop() as stop:
        while step < end_step:
            lr = lr_at(step, max_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps, total_steps=max_steps)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), device=device)
            stat_sums: dict[str, torch.Tensor] = {}
            for micro in range(cfg.grad_accum):
                batch = train.batch(step * cfg.grad_accum + micro, cfg.batch_size, seed=cfg.seed,
                                    rank=dist_info.rank, world_size=dist_info.world_size).to(device)
                with torch.inference_mode(), runtime.autocast(device, dtype):
                    ref_logps = response_logprobs(reference, batch)  # (N,)
                ref_logps = ref_logps.clone()  # an ordinary tensor, usable in the autograd graph
                sync = micro == cfg.grad_accum - 1 or not dist_info.enabled
                ctx = train_model.no_sync() if not sync else contextlib.nullcontext()
                with ctx, runtime.autocast(device, dtype):
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
            grad_norm = (torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip).item()
                         if cfg.grad_clip > 0 else float("nan"))
            if not math.isfinite(loss_value) or (cfg.grad_clip > 0 and not math.isfinite(grad_norm)):
                bar.close()
                raise TrainingDiverged(
                    f"dpo step {step}: loss {loss_value}, grad norm {grad_norm}. No checkpoint was written for this "
                    f"step; the last good one is {latest_checkpoint(out)}. Try a lower --lr (now {cfg.lr}), more "
                    f"--warmup-steps, or --dtype float32.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == end_step:
                dt = time.perf_counter() - t_last
                pairs_per_s = pairs_since * dist_info.world_size / max(dt, 1e-9)
                t_last, pairs_since = time.perf_counter(), 0
                last = {"step": step, "loss": loss_value,
                        **{k: runtime.all_reduce_mean(v).item() for k, v in stat_sums.items()},
                        "lr": lr, "grad_norm": grad_norm, "pairs_per_s": round(pairs_per_s, 1),
                        "epoch": step * per_step / len(train)}
                metrics.log(last)
                bar.set_postfix(loss=f"{loss_value:.3f}", acc=f"{last['accuracy']:.2f}", margin=f"{last['margin']:.3f}")
            if (step % cfg.eval_every == 0 or step == max_steps) and val is not None and dist_info.is_main:
                result = evaluate(policy, reference, val, cfg.beta, cfg.eval_batch_size, device, dtype)
                metrics.log({"step": step, **result})
                last.update(result)
                bar.write(f"step {step}: train loss {loss_value:.4f}, val loss {result['val_loss']:.4f}, "
                          f"val accuracy {result['val_accuracy']:.3f}, val margin {result['val_margin']:.4f} "
                          f"(chosen {result['val_chosen_reward']:.4f}, rejected {result['val_rejected_reward']:.4f})")
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
    metrics.close()
    if dist_info.is_main:
        recs = read_metrics(out / "metrics.jsonl")
        plot_curves(recs, ["loss", "val_loss"], out / "loss.png", title=f"DPO loss (beta {cfg.beta})")
        plot_curves(recs, ["chosen_reward", "rejected_reward", "margin", "val_chosen_reward", "val_rejected_reward",
                           "val_margin"], out / "rewards.png", title="DPO implicit rewards")
        plot_curves(recs, ["accuracy", "val_accuracy"], out / "accuracy.png", title="DPO preference accuracy")
        print(f"dpo: step {step}/{max_steps}, checkpoint {ckpt}"
              + (f"; val accuracy {last['val_accuracy']:.3f}, margin {last['val_margin']:.4f}"
                 if "val_accuracy" in last else ""))
    runtime.barrier()
    runtime.cleanup_distributed()
    return {"interrupted": interrupted, "step": step, "max_steps": max_steps, "checkpoint": str(ckpt) if ckpt else None,
            "data": train.stats.as_dict(), **last}
