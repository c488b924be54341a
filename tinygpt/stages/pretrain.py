"""Pretraining: next-token prediction on packed token shards.

Reads top to bottom: config, data, model, optimizer, (resume), loop, save. The batch at step s is
a pure function of (seed, s), so resuming needs only the step, and under ``torchrun`` every rank
reads its own rows of the same global batch (DDP over 2 ranks == 1 process with twice the batch).

    tinygpt pretrain --data runs/x/data --out runs/x/pretrain --model-size 0.5m --max-steps 600
    torchrun --nproc_per_node=2 -m tinygpt.cli pretrain --data ... --out ...

Uses: losses.lm_loss (the math), optim (AdamW groups, schedule), checkpoint (atomic save, exact
resume), data.shards.TokenDataset (batches). It does not know about the world, SFT or RL.
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
from tinygpt.checkpoint import (capture_rng_state, latest_checkpoint, resume_training, save_training_checkpoint)
from tinygpt.config import opt, save_config, to_jsonable
from tinygpt.data.shards import TokenDataset
from tinygpt.losses import lm_loss
from tinygpt.runlog import MetricsWriter, plot_curves, read_metrics
from tinygpt.model import GPT, model_config
from tinygpt.optim import lr_at, make_optimizer, set_lr
from tinygpt.tokenizer import Tokenizer
from tinygpt.runtime import TrainingDiverged  # noqa: F401 (re-exported for callers)


@dataclass
class PretrainConfig:
    data: str = opt("", "directory of token shards from `tinygpt prepare` (train.bin, val.bin, meta.json)")
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
    # optimisation
    batch_size: int = opt(16, "sequences per micro-batch on each rank")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    max_steps: int = opt(1000, "optimizer steps in the whole run (sets the cosine schedule)")
    lr: float = opt(2e-3, "peak learning rate")
    min_lr: float = opt(2e-4, "learning rate at the end of the cosine decay")
    warmup_steps: int = opt(50, "linear warmup steps")
    weight_decay: float = opt(0.1, "AdamW weight decay on matrices (not on biases and norms)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    # bookkeeping
    eval_every: int = opt(100, "steps between validation-loss evaluations")
    eval_batches: int = opt(20, "validation batches per evaluation")
    log_every: int = opt(10, "steps between metrics.jsonl records")
    save_every: int = opt(200, "steps between checkpoints (one is always written at the end)")
    keep_last: int = opt(2, "checkpoints kept in OUT/checkpoints")
    seed: int = opt(1337, "seed for initialisation and for the data order")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    dtype: str = opt("auto", "autocast dtype: auto, float32 or bfloat16 (weights stay float32)")
    compile: bool = opt(False, "torch.compile the model (pays off on GPUs and long runs)")
    resume: bool = opt(False, "continue from OUT's latest checkpoint exactly; an error if there is none")
    stop_after: int = opt(0, "stop (with a checkpoint) after this many steps of this invocation; 0 = run to max_steps")
    progress: bool = opt(True, "show a progress bar")


def _evaluate(model: torch.nn.Module, val: TokenDataset, cfg: PretrainConfig, device: torch.device,
              dtype: torch.dtype) -> float:
    model.eval()
    total, n = 0.0, 0
    with torch.inference_mode(), runtime.autocast(device, dtype):
        for x, y in val.eval_batches(cfg.batch_size, cfg.block_size, max_batches=cfg.eval_batches):
            x, y = x.to(device), y.to(device)
            total += lm_loss(model(x), y).item()
            n += 1
    model.train()
    return total / max(n, 1)


def main(cfg: PretrainConfig) -> dict[str, Any]:
    # --- setup -----------------------------------------------------------------------------
    dist_info, device = runtime.init_distributed(cfg.device)
    runtime.keep_freed_memory()
    dtype = runtime.resolve_dtype(cfg.dtype, device)
    out = Path(cfg.out)
    if not cfg.data:
        raise ValueError("--data is required: a directory written by `tinygpt prepare`")
    if cfg.grad_accum < 1 or cfg.batch_size < 1 or cfg.max_steps < 1:
        raise ValueError("--batch-size, --grad-accum and --max-steps must be >= 1")

    # --- data ------------------------------------------------------------------------------
    train = TokenDataset(cfg.data, "train")
    val = TokenDataset(cfg.data, "val")
    tok_path = Path(cfg.tokenizer) if cfg.tokenizer else Path(cfg.data) / "tokenizer.json"
    tokenizer = Tokenizer.load(tok_path)

    # --- model -----------------------------------------------------------------------------
    runtime.seed_everything(cfg.seed)
    overrides = {k: v for k, v in dict(n_layer=cfg.n_layer, n_head=cfg.n_head, d_model=cfg.d_model).items()
                 if v is not None}
    mcfg = model_config(cfg.model_size, arch=cfg.arch, vocab_size=tokenizer.vocab_size,
                        block_size=cfg.block_size, dropout=cfg.dropout, **overrides)
    model = GPT(mcfg).to(device)
    optimizer = make_optimizer(model, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=(cfg.beta1, cfg.beta2))

    # --- resume ----------------------------------------------------------------------------
    start_step = 0
    if cfg.resume:
        state = resume_training(out, model, optimizer, device=device, world_size=dist_info.world_size,
                                verbose=dist_info.is_main)
        start_step = int(state["step"])
    if dist_info.is_main:
        save_config(cfg, out / "resolved_config.json")

    train_model: torch.nn.Module = model
    if cfg.compile:
        train_model = torch.compile(model)
    if dist_info.enabled:
        train_model = DDP(train_model, device_ids=[device.index] if device.type == "cuda" else None)

    tokens_per_step = cfg.batch_size * cfg.block_size * cfg.grad_accum * dist_info.world_size
    metrics = MetricsWriter(out, resume_step=start_step if cfg.resume else None, enabled=dist_info.is_main)
    if dist_info.is_main:
        print(f"pretrain: {model.num_params() / 1e6:.2f}M params ({mcfg.arch}, L{mcfg.n_layer} d{mcfg.d_model} "
              f"H{mcfg.n_head}), {train.num_tokens / 1e6:.2f}M train tokens, {tokens_per_step} tokens/step, "
              f"device {device}, compute {str(dtype).replace('torch.', '')}, {dist_info.world_size} rank(s)")

    def save(step: int, extra: dict[str, Any]) -> Path | None:
        if not dist_info.is_main:
            return None
        state = {"step": step, "optimizer": optimizer.state_dict(), "rng": capture_rng_state(),
                 "data": {"seed": cfg.seed, "next_step": step}, "world_size": dist_info.world_size,
                 "config": to_jsonable(cfg)}
        return save_training_checkpoint(out, step, keep_last=cfg.keep_last, model=model, model_config=mcfg,
                                        tokenizer_json=tokenizer.to_str(), trainer_state=state,
                                        meta={"stage": "pretrain", "step": step, **extra})

    # --- loop ------------------------------------------------------------------------------
    end_step = cfg.max_steps if cfg.stop_after <= 0 else min(cfg.max_steps, start_step + cfg.stop_after)
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="pretrain", unit="step", dynamic_ncols=True,
               disable=not (cfg.progress and dist_info.is_main))
    last: dict[str, Any] = {}
    step = start_step
    interrupted = False
    t_last, steps_since = time.perf_counter(), 0
    model.train()
    with runtime.GracefulStop() as stop:
        while step < end_step:
            lr = lr_at(step, max_lr=cfg.lr, min_lr=cfg.min_lr, warmup_steps=cfg.warmup_steps,
                       total_steps=cfg.max_steps)
            set_lr(optimizer, lr)
            loss_sum = torch.zeros((), device=device)
            for micro in range(cfg.grad_accum):
                x, y = train.batch(step * cfg.grad_accum + micro, cfg.batch_size, cfg.block_size, seed=cfg.seed,
                                   rank=dist_info.rank, world_size=dist_info.world_size)
                x, y = x.to(device, non_blocking=True), y.to(device, non_blocking=True)
                sync = micro == cfg.grad_accum - 1 or not dist_info.enabled
                ctx = train_model.no_sync() if not sync else contextlib.nullcontext()
                with ctx, runtime.autocast(device, dtype):
                    loss = lm_loss(train_model(x), y) / cfg.grad_accum
                loss.backward()
                loss_sum += loss.detach()
            loss_value = runtime.all_reduce_mean(loss_sum).item()
            grad_norm = (torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip).item()
                         if cfg.grad_clip > 0 else float("nan"))
            if not math.isfinite(loss_value) or (cfg.grad_clip > 0 and not math.isfinite(grad_norm)):
                bar.close()
                raise TrainingDiverged(
                    f"pretrain step {step}: loss {loss_value}, grad norm {grad_norm}. No checkpoint was written "
                    f"for this step; the last good one is {latest_checkpoint(out)}. Try a lower --lr "
                    f"(now {cfg.lr}), more --warmup-steps, or --dtype float32.")
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
            step += 1
            steps_since += 1
            bar.update(1)

            if step % cfg.log_every == 0 or step == end_step:
                dt = time.perf_counter() - t_last
                tps = tokens_per_step * steps_since / max(dt, 1e-9)
                t_last, steps_since = time.perf_counter(), 0
                last = {"step": step, "loss": loss_value, "lr": lr, "grad_norm": grad_norm,
                        "tokens_per_s": round(tps, 1), "tokens": step * tokens_per_step}
                metrics.log(last)
                bar.set_postfix(loss=f"{loss_value:.3f}", lr=f"{lr:.2e}", tok_s=f"{tps:,.0f}")
            if step % cfg.eval_every == 0 or step == cfg.max_steps:
                val_loss = _evaluate(model, val, cfg, device, dtype)
                last.update(val_loss=val_loss, val_ppl=math.exp(min(val_loss, 50)))
                metrics.log({"step": step, "val_loss": val_loss, "val_ppl": last["val_ppl"]})
                if dist_info.is_main:
                    bar.write(f"step {step}: train loss {loss_value:.4f}, val loss {val_loss:.4f}, "
                              f"val ppl {last['val_ppl']:.2f}")
            if step % cfg.save_every == 0 and step != end_step:
                save(step, {"loss": loss_value})
            stop_now = torch.tensor(float(stop.stop))
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
        plot_curves(recs, ["loss", "val_loss"], out / "loss.png", title="pretraining loss")
        print(f"pretrain: step {step}/{cfg.max_steps}, checkpoint {ckpt}")
    runtime.barrier()
    runtime.cleanup_distributed()
    return {"step": step, "checkpoint": str(ckpt) if ckpt else None, "interrupted": interrupted, **last}

