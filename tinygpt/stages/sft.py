"""Supervised fine-tuning (SFT): teach a pretrained model to answer in the chat template.

Reads top to bottom: config, data, model (full fine-tuning, or LoRA adapters through peft),
optimizer, (resume), loop, save, task evaluation. The loss is ``losses.lm_loss`` on assistant
tokens only (the mask from ``render_chat``), averaged over every trained-on token of the global
step: each micro-batch's mean is weighted by its share of the step's target tokens, so grad_accum
and DDP ranks give the same update as one big batch (a plain mean of micro-batch means would
overweight short answers). The batch at micro-step s is a pure function of (seed, s, rank,
world_size), so resuming needs only the step, and DDP ranks read their own rows.

    tinygpt sft --init runs/x/pretrain --data runs/x/world/sft_train.jsonl --out runs/x/sft
    tinygpt sft ... --lora-r 8 --merge-lora true        # adapters only; a merged plain copy in OUT/merged

Checkpoints (OUT/checkpoints/step_N) are plain checkpoints every later stage loads as usual. With
LoRA, ``model.safetensors`` holds the merged weights (base + (alpha/r) B A) and ``adapter/`` the
adapter in peft's format, relative to --init (see tinygpt.lora); resuming rebuilds init + adapter.

Uses: training (the skeleton), losses.lm_loss, checkpoint, data.conversations.ChatDataset, lora, eval.tasks. It does not know
about pretraining data, reward models or RL.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinygpt import lora, runtime, training
from tinygpt.checkpoint import publish_checkpoint, save_checkpoint, step_path
from tinygpt.config import opt
from tinygpt.data.conversations import ChatDataset
from tinygpt.eval.tasks import load_task_records, spread_limit, task_accuracy
from tinygpt.losses import lm_loss
from tinygpt.world.tasks import DEFAULT_LONG_ANSWER_TOKENS
from tinygpt.runtime import TrainingDiverged  # noqa: F401 (re-exported for callers)


@dataclass
class SFTConfig(training.FinetuneConfig):
    init: str = opt("", "checkpoint to start from (a pretraining run directory or checkpoint directory)", required=True)
    data: str = opt("", "chat data: {\"messages\": [...]} JSONL, or a `datasets` directory with a messages column", required=True)
    eval_data: str = opt("", "held-out chat data for the validation loss (empty: no validation loss)")
    out: str = opt("runs/sft", "run directory: checkpoints/, metrics.jsonl, loss.png, resolved_config.json")
    dropout: float | None = opt(None, "override the checkpoint's dropout for fine-tuning (None = keep)")
    # LoRA
    lora_r: int = opt(0, "LoRA rank; 0 = full fine-tuning (every weight trains)")
    lora_alpha: float = opt(16.0, "LoRA scale numerator: the update is (alpha / r) * B A")
    lora_dropout: float = opt(0.0, "dropout on the LoRA branch input")
    lora_chat_tokens: bool = opt(True, "with LoRA, also train the embedding rows of <|system|> <|user|> <|assistant|> "
                                       "<|end|>: a base model pretrained on plain text never saw them, and frozen "
                                       "they leave LoRA unable to learn the chat format")
    merge_lora: bool = opt(False, "after LoRA training, also write OUT/merged: the merged model alone (no adapter/, "
                                  "no trainer state), e.g. for export")
    # evaluation
    eval_batches: int = opt(20, "validation batches per evaluation")
    task_eval: str = opt("", "held-out task records (tasks/*_test.jsonl or sft_test.jsonl): greedy answers graded "
                             "by the world's oracle, accuracy per family, at every eval and at the end")
    task_eval_limit: int = opt(200, "grade at most this many records per task evaluation, taken in turn from each "
                                    "family (0 = all)")
    task_max_new_tokens: int = opt(48, "most tokens per answer in task evaluation (the default of `tinygpt evaluate`)")
    task_long_max_new_tokens: int = opt(DEFAULT_LONG_ANSWER_TOKENS, "most tokens per answer of the families whose "
                                        "answers are whole stories (write_story), as in `tinygpt evaluate`")
    # the shared fields (training.FinetuneConfig) with SFT's defaults
    batch_size: int = opt(16, "conversations per micro-batch on each rank (padded to the longest)")
    epochs: float = opt(2.0, "passes over the data when --max-steps is 0")
    lr: float = opt(3e-4, "peak learning rate (LoRA usually wants ~10x more than full fine-tuning)")
    min_lr: float = opt(3e-5, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(20, "linear warmup steps")
    eval_every: int = opt(50, "steps between validation-loss evaluations (and task evaluations)")
    seed: int = opt(1337, "seed for the data order, LoRA initialisation and dropout")


def _validation_loss(model: torch.nn.Module, val: ChatDataset, cfg: SFTConfig, device: torch.device,
                     dtype: torch.dtype) -> float:
    """Mean lm_loss over every assistant token of the validation set (token-weighted, not batch-weighted)."""
    model.eval()
    total, n = 0.0, 0
    with torch.inference_mode(), runtime.autocast(device, dtype):
        for x, y, m in val.eval_batches(cfg.batch_size, max_batches=cfg.eval_batches):
            x, y, m = x.to(device), y.to(device), m.to(device)
            count = int(m.sum())
            total += lm_loss(model(x), y, m).item() * count
            n += count
    model.train()
    return total / max(n, 1)


def main(cfg: SFTConfig) -> dict[str, Any]:
    # --- setup -----------------------------------------------------------------------------
    if not cfg.init:
        raise ValueError("--init is required: the checkpoint to fine-tune (e.g. runs/x/pretrain)")
    if not cfg.data:
        raise ValueError("--data is required: chat records {\"messages\": [...]} (e.g. runs/x/world/sft_train.jsonl)")
    if cfg.lora_r < 0:
        raise ValueError(f"--lora-r must be >= 0, got {cfg.lora_r}")
    if cfg.merge_lora and cfg.lora_r == 0:
        raise ValueError("--merge-lora needs LoRA (--lora-r > 0); full fine-tuning already writes a plain checkpoint")
    run = training.setup(cfg, "sft")
    device, dtype, dist_info = run.device, run.dtype, run.dist

    # --- model and tokenizer -----------------------------------------------------------------
    overrides = {"dropout": cfg.dropout} if cfg.dropout is not None else None
    model, mcfg, tokenizer, init_meta = training.load_init(run, cfg.init, overrides)
    if cfg.lora_r > 0:
        chat_ids = ([tokenizer.system_id, tokenizer.user_id, tokenizer.assistant_id, tokenizer.end_id]
                    if cfg.lora_chat_tokens else [])
        model = lora.wrap(model, r=cfg.lora_r, alpha=cfg.lora_alpha, dropout=cfg.lora_dropout, train_token_ids=chat_ids)
    gpt = lora.inner_model(model)  # the GPT whose forward we call (with the adapters when LoRA is on)

    # --- data ------------------------------------------------------------------------------
    max_tokens = mcfg.block_size + 1  # block_size inputs + the target of the last one
    train = ChatDataset(cfg.data, tokenizer, max_tokens, skip_bad=cfg.skip_bad)
    val = ChatDataset(cfg.eval_data, tokenizer, max_tokens, skip_bad=cfg.skip_bad) if cfg.eval_data else None
    task_records = load_task_records(cfg.task_eval) if cfg.task_eval else None
    if task_records is not None and cfg.task_eval_limit > 0:
        task_records = spread_limit(task_records, cfg.task_eval_limit)
    per_step, max_steps = training.epoch_steps(run, len(train))

    # --- optimizer, (resume) -----------------------------------------------------------------
    optimizer = training.make_optimizer(model, cfg)
    load_fn = (lambda m, ck: lora.load_adapter(m, ck, device=device)) if cfg.lora_r > 0 else None
    start_step, _ = training.resume(run, model, optimizer, load_fn=load_fn)
    metrics = training.start_log(run, start_step)
    train_model = training.wrap_ddp(gpt, run)

    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    if cfg.lora_r > 0 and getattr(gpt, "lora_token_ids", None):  # of the embedding, only those rows train
        trainable -= gpt.tok_emb.weight.numel() - len(gpt.lora_token_ids) * gpt.tok_emb.weight.shape[1]
    if run.is_main:
        mode = f"LoRA r={cfg.lora_r} alpha={cfg.lora_alpha}" if cfg.lora_r else "full fine-tuning"
        s = train.stats
        print(f"sft: {mode}, {trainable / 1e6:.3f}M of {gpt.num_params() / 1e6:.3f}M params train; "
              f"{len(train)} conversations ({s.target_tokens} target tokens of {s.tokens}), "
              f"{s.shortened} shortened, {s.truncated} truncated, {s.skipped_no_target} skipped, "
              f"{s.skipped_bad} bad; pad fraction {train.pad_fraction(cfg.batch_size):.2f}; "
              f"{max_steps} steps of {per_step} conversations; {run.describe()}")
        metrics.log({"step": start_step, "data": s.as_dict()} if not cfg.resume else {"step": start_step})

    def save(step: int, extra: dict[str, Any]) -> Path | None:
        meta = {"init": str(cfg.init), "init_stage": init_meta.get("stage"),
                "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha, "dropout": cfg.lora_dropout} if cfg.lora_r else None,
                **extra}
        if cfg.lora_r == 0:
            return training.save(run, step, model=gpt, model_config=mcfg, tokenizer_json=tokenizer.to_str(),
                                 optimizer=optimizer, meta=meta)
        if not run.is_main:
            return None
        # LoRA: the merged model + adapter/, complete before `latest` moves to it.
        path = save_checkpoint(step_path(run.out, step), model=lora.merged_copy(model), model_config=mcfg,
                               tokenizer_json=tokenizer.to_str(), trainer_state=training.trainer_state(run, step, optimizer),
                               meta={"stage": "sft", "step": step, **meta, "adapter": lora.ADAPTER_DIR})
        lora.save_adapter(model, path, base=cfg.init)
        return publish_checkpoint(run.out, path, keep_last=cfg.keep_last)

    def evaluate_tasks(step: int) -> dict[str, Any] | None:
        if task_records is None or not run.is_main:
            return None
        result = task_accuracy(gpt, tokenizer, task_records, max_new_tokens=cfg.task_max_new_tokens,
                               long_max_new_tokens=cfg.task_long_max_new_tokens, batch_size=max(cfg.batch_size, 16))
        metrics.log({"step": step, "task_accuracy": result["accuracy"],
                     **{f"task_accuracy/{f}": r["accuracy"] for f, r in result["per_family"].items()}})
        return result

    # --- loop ------------------------------------------------------------------------------
    loop = training.Loop(run, max_steps, start_step)
    last: dict[str, Any] = {}
    t_last, tokens_since = time.perf_counter(), 0
    gpt.train()
    for step in loop:
        lr = loop.set_lr(optimizer)
        micro_steps = [step * cfg.grad_accum + micro for micro in range(cfg.grad_accum)]
        step_targets = sum(train.target_count(s, cfg.batch_size, seed=cfg.seed, world_size=dist_info.world_size)
                           for s in micro_steps)
        loss_sum = torch.zeros((), device=device)
        for micro, micro_step in enumerate(micro_steps):
            x, y, m = train.batch(micro_step, cfg.batch_size, seed=cfg.seed, rank=dist_info.rank,
                                  world_size=dist_info.world_size)
            x, y, m = x.to(device, non_blocking=True), y.to(device, non_blocking=True), m.to(device, non_blocking=True)
            # weight of this micro-batch's mean: its target tokens / the global step's (x world: DDP averages ranks)
            weight = int(m.sum()) * dist_info.world_size / max(step_targets, 1)
            with training.sync_context(train_model, run, micro, cfg.grad_accum), runtime.autocast(device, dtype):
                loss = lm_loss(train_model(x), y, m) * weight
            loss.backward()
            loss_sum += loss.detach()
            tokens_since += x.numel()
        loss_value = runtime.all_reduce_mean(loss_sum).item()
        grad_norm = training.optimizer_step(run, optimizer, model.parameters(), loss_value, step)

        if loop.log_due(cfg.log_every):
            dt = time.perf_counter() - t_last
            tps = tokens_since * dist_info.world_size / max(dt, 1e-9)
            t_last, tokens_since = time.perf_counter(), 0
            last = {"step": loop.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": round(tps, 1), "epoch": loop.step * per_step / len(train)}
            metrics.log(last)
            loop.bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        if loop.eval_due(cfg.eval_every):
            if val is not None:
                val_loss = _validation_loss(gpt, val, cfg, device, dtype)
                last.update(val_loss=val_loss)
                metrics.log({"step": loop.step, "val_loss": val_loss})
                loop.write(f"step {loop.step}: train loss {loss_value:.4f}, val loss {val_loss:.4f}")
            tasks = evaluate_tasks(loop.step)
            if tasks is not None:
                last.update(task_accuracy=tasks["accuracy"])
                loop.write(f"step {loop.step}: task accuracy {tasks['accuracy']:.3f} " + ", ".join(
                    f"{f} {r['accuracy']:.2f}" for f, r in tasks["per_family"].items()))
        if loop.save_due(cfg.save_every):
            save(loop.step, {"loss": loss_value})

    # --- save ------------------------------------------------------------------------------
    step = loop.step
    ckpt = save(step, {k: v for k, v in last.items() if k != "step"})
    merged_path = None
    if cfg.merge_lora and step == max_steps and run.is_main:
        merged = lora.merged_copy(model)
        merged_path = save_checkpoint(run.out / "merged", model=merged, model_config=mcfg,
                                      tokenizer_json=tokenizer.to_str(),
                                      meta={"stage": "sft", "step": step, "merged_from": str(ckpt),
                                            "lora": {"r": cfg.lora_r, "alpha": cfg.lora_alpha}})
    plots = [(["loss", "val_loss"], "loss.png", "SFT loss (assistant tokens)")]
    if task_records is not None:
        plots.append((["task_accuracy"], "task_accuracy.png", "held-out task accuracy"))
    training.finish(run, metrics, plots)
    if run.is_main:
        print(f"sft: step {step}/{max_steps}, checkpoint {ckpt}" + (f", merged {merged_path}" if merged_path else ""))
    return {"interrupted": loop.interrupted, "step": step, "max_steps": max_steps,
            "checkpoint": str(ckpt) if ckpt else None, "merged": str(merged_path) if merged_path else None,
            "data": train.stats.as_dict(), **last}
