"""Pretraining: next-token prediction on packed token shards.

Reads top to bottom: config, data, model, optimizer, (resume), loop, save. The batch at step s is
a pure function of (seed, s), so resuming needs only the step, and under ``torchrun`` every rank
reads its own rows of the same global batch (DDP over 2 ranks == 1 process with twice the batch).

    tinygpt pretrain --data runs/x/data --out runs/x/pretrain --model-size 0.5m --max-steps 600
    torchrun --nproc_per_node=2 -m tinygpt.cli pretrain --data ... --out ...

Uses: training (the skeleton: setup, optimizer step, stop, save, resume), losses.lm_loss (the math),
data.shards.TokenDataset (batches). It does not know about the world, SFT or RL.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from tinygpt import runtime, training
from tinygpt.config import opt
from tinygpt.data.shards import TokenDataset
from tinygpt.losses import lm_loss
from tinygpt.model import GPT, model_config
from tinygpt.tokenizer import Tokenizer
from tinygpt.runtime import TrainingDiverged  # noqa: F401 (re-exported for callers)


@dataclass
class PretrainConfig(training.TrainConfig):
    data: str = opt("", "directory of token shards from `tinygpt prepare` (train.bin, val.bin, meta.json)", required=True)
    out: str = opt("runs/pretrain", "run directory: checkpoints/, metrics.jsonl, loss.png, resolved_config.json")
    tokenizer: str = opt("", "tokenizer.json to store in checkpoints (default: DATA/tokenizer.json)")
    # model
    model_size: str = opt("0.5m", "named size from tinygpt.model.SIZES (0.5m ... 110m)")
    arch: str = opt("gpt2", "gpt2 (learned positions, LayerNorm, GELU) or llama (RoPE, RMSNorm, SwiGLU)")
    block_size: int = opt(256, "context length in tokens")
    n_layer: int | None = opt(None, "override the size's number of layers")
    n_head: int | None = opt(None, "override the size's number of heads")
    d_model: int | None = opt(None, "override the size's width")
    dropout: float = opt(0.0, "dropout probability (0 for short runs on a lot of data)")
    compile: bool = opt(False, "torch.compile the model (pays off on GPUs and long runs)")
    eval_batches: int = opt(20, "validation batches per evaluation")
    # the shared fields (training.TrainConfig) with pretraining's defaults
    batch_size: int = opt(16, "sequences per micro-batch on each rank")
    max_steps: int = opt(1000, "optimizer steps in the whole run (sets the cosine schedule)")
    lr: float = opt(2e-3, "peak learning rate")
    min_lr: float = opt(2e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(50, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices (not on biases and norms)")
    eval_every: int = opt(100, "steps between validation-loss evaluations")
    seed: int = opt(1337, "seed for initialisation and for the data order")


def _evaluate(model: torch.nn.Module, val: TokenDataset, cfg: PretrainConfig, run: training.Run) -> float:
    """Mean next-token loss over the first ``eval_batches`` global batches of validation windows.

    A global batch is ``batch_size * world_size`` windows and each rank scores its own rows of it, so
    N ranks of B measure exactly what one process of N * B measures (as they train alike).
    """
    rank, world, device = run.dist.rank, run.dist.world_size, run.device
    model.eval()
    total, count = torch.zeros((), device=device), torch.zeros((), device=device)
    with torch.inference_mode(), runtime.autocast(device, run.dtype):
        for x, y in val.eval_batches(cfg.batch_size * world, cfg.block_size, max_batches=cfg.eval_batches):
            rows = slice(rank * cfg.batch_size, (rank + 1) * cfg.batch_size)
            x, y = x[rows].to(device), y[rows].to(device)
            if len(x):  # the last batch may leave a rank nothing
                total += lm_loss(model(x), y).float() * y.numel()
                count += y.numel()
    model.train()
    total, count = runtime.all_reduce_sum(total), runtime.all_reduce_sum(count)
    return float(total / count.clamp_min(1))


def main(cfg: PretrainConfig) -> dict[str, Any]:
    # --- setup -----------------------------------------------------------------------------
    if not cfg.data:
        raise ValueError("--data is required: a directory written by `tinygpt prepare`")
    if cfg.max_steps < 1:
        raise ValueError("--max-steps must be >= 1")
    run = training.setup(cfg, "pretrain")
    device, dtype, dist_info = run.device, run.dtype, run.dist

    # --- data ------------------------------------------------------------------------------
    train = TokenDataset(cfg.data, "train")
    val = TokenDataset(cfg.data, "val")
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.data) / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_path)

    # --- model, optimizer, (resume) ----------------------------------------------------------
    overrides = {k: v for k, v in dict(n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model).items()
                 if v is not None}
    mcfg = model_config(cfg.model_size, arch=cfg.arch, vocab_size=tokenizer.vocab_size,
                        block_size=cfg.block_size, dropout=cfg.dropout, **overrides)
    model = GPT(mcfg).to(device)
    optimizer = training.make_optimizer(model, cfg)
    start_step, _ = training.resume(run, model, optimizer)
    metrics = training.start_log(run, start_step)
    train_model = training.wrap_ddp(torch.compile(model) if cfg.compile else model, run)

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * dist_info.world_size
    if run.is_main:
        print(f"pretrain: {model.num_params() / 1e6:.2f}M params ({mcfg.arch}, L{mcfg.n_layer} d{mcfg.d_model} "
              f"H{mcfg.n_head}), {train.num_tokens / 1e6:.2f}M train tokens, {tokens_per_step} tokens/step, "
              f"{run.describe()}")

    def save(step: int, extra: dict[str, Any]) -> Path | None:
        return training.save(run, step, model=model, model_config=mcfg, tokenizer_json=tokenizer.to_str(),
                             optimizer=optimizer, meta=extra)

    # --- loop ------------------------------------------------------------------------------
    loop = training.Loop(run, cfg.max_steps, start_step)
    last: dict[str, Any] = {}
    t_last, steps_since = time.perf_counter(), 0
    model.train()
    for step in loop:
        lr = loop.set_lr(optimizer)
        loss_sum = torch.zeros((), device=device)
        for micro in range(cfg.grad_accum):
            x, y = train.batch(step * cfg.grad_accum + micro, cfg.batch_size, cfg.block_size, seed=cfg.seed,
                               rank=dist_info.rank, world_size=dist_info.world_size)
            x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
            with training.sync_context(train_model, run, micro, cfg.grad_accum), runtime.autocast(device, dtype):
                loss = lm_loss(train_model(x), y) / cfg.grad_accum
            loss.backward()
            loss_sum += loss.detach()
        loss_value = runtime.all_reduce_mean(loss_sum).item()
        grad_norm = training.optimizer_step(run, optimizer, model.parameters(), loss_value, step)
        steps_since += 1

        if loop.log_due(cfg.log_every):
            dt = time.perf_counter() - t_last
            tps = tokens_per_step * steps_since / max(dt, 1e-9)
            t_last, steps_since = time.perf_counter(), 0
            last = {"step": loop.step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                    "tokens_per_s": round(tps, 1), "tokens": loop.step * tokens_per_step}
            metrics.log(last)
            loop.bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
        if loop.eval_due(cfg.eval_every):
            val_loss = _evaluate(model, val, cfg, run)
            last.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
            metrics.log({"step": loop.step, "val_loss": val_loss, "val_ppl": last["val_ppl"]})
            loop.write(f"step {loop.step}: train loss {loss_value:.4f}, val loss {val_loss:.4f}, "
                       f"val ppl {last['val_ppl']:.2f}")
        if loop.save_due(cfg.save_every):
            save(loop.step, {"loss": loss_value})

    # --- save ------------------------------------------------------------------------------
    ckpt = save(loop.step, {k: v for k, v in last.items() if k != "step"})
    training.finish(run, metrics, [(["loss", "val_loss"], "loss.png", "pretraining loss")])
    if run.is_main:
        print(f"pretrain: step {loop.step}/{cfg.max_steps}, checkpoint {ckpt}")
    return {"step": loop.step, "checkpoint": str(ckpt) if ckpt else None, "interrupted": loop.interrupted, **last}
