"""The training skeleton every trainer shares: the common config fields, the run setup, the optimizer
step with its divergence check, the stop agreed across ranks, the checkpoint and the finish.

A trainer reads top to bottom, its own loop body in the middle (``stages/sft.py``)::

    run = training.setup(cfg, "sft")                      # ranks, device, dtype, seed, allocator
    ... model, data ...
    optimizer = training.make_optimizer(model, cfg)
    start_step, _ = training.resume(run, model, optimizer)  # 0 unless --resume
    metrics = training.start_log(run, start_step)          # resolved_config.json, metrics.jsonl
    loop = training.Loop(run, max_steps, start_step)
    for step in loop:                                      # the step being taken, 0-based
        lr = loop.set_lr(optimizer)
        ... forward, backward over micro-batches (training.sync_context) ...
        grad_norm = training.optimizer_step(run, optimizer, params, loss_value, step)
        if loop.log_due(cfg.log_every): ...                 # loop.step: the steps done, this one included
        if loop.save_due(cfg.save_every): save(loop.step)
    save(loop.step)
    training.finish(run, metrics, plots)

What every trainer gets from here, the same way:
- the stop check's tensor on the rank's own device (NCCL refuses a CPU tensor), through
  :func:`runtime.any_rank`, after every step: Ctrl-C or SIGTERM on any rank stops all of them;
- ``runtime.keep_freed_memory()`` (glibc keeps freed blocks, saving page faults every step);
- resume through the one :func:`checkpoint.resume_training` (weights, optimizer, every RNG);
- the trainer state every checkpoint carries (:func:`trainer_state`), so ``--resume`` is exact.

It knows checkpoints, the run log and the optimizer; it knows no architecture, data or loss.
"""

from __future__ import annotations

import contextlib
import math
import os
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from tinygpt import optim, runtime
from tinygpt.checkpoint import (capture_rng_state, latest_checkpoint, load_meta, load_model_and_tokenizer,
                                resume_training, save_training_checkpoint)
from tinygpt.config import opt, save_config, to_jsonable
from tinygpt.runlog import MetricsWriter, plot_curves, read_metrics
from tinygpt.runtime import TrainingDiverged


# --- the config fields every trainer shares -------------------------------------------------------


@dataclass
class RunConfig:
    """What every training run has (PPO's too): where it writes, its optimizer, its bookkeeping."""
    out: str = opt("runs/train", "run directory: checkpoints/, metrics.jsonl, plots, resolved_config.json")
    max_steps: int = opt(1000, "optimizer steps in the whole run (sets the learning-rate schedule)")
    lr: float = opt(1e-4, "peak learning rate")
    warmup_steps: int = opt(10, "linear warmup steps")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices (not on biases and norms)")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip the global gradient norm to this (0 = off)")
    eval_every: int = opt(50, "steps between evaluations")
    log_every: int = opt(10, "steps between metrics.jsonl records")
    save_every: int = opt(200, "steps between checkpoints (one is always written at the end)")
    keep_last: int = opt(2, "checkpoints kept in OUT/checkpoints")
    seed: int = opt(1337, "seed for initialisation, the data order, dropout and sampling")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    dtype: str = opt("auto", "autocast dtype: auto, float32 or bfloat16 (weights stay float32)")
    resume: bool = opt(False, "continue from OUT's latest checkpoint exactly; an error if there is none")
    overwrite: bool = opt(False, "start afresh in an OUT that already holds a run, deleting its checkpoints "
                                 "(without it, such an OUT is an error: --resume continues it)")
    stop_after: int = opt(0, "stop (with a checkpoint) after this many steps of this invocation; 0 = run to the end")
    progress: bool = opt(True, "show a progress bar")


@dataclass
class TrainConfig(RunConfig):
    """A trainer on batches of examples with a cosine schedule: pretraining, SFT, reward model, DPO."""
    batch_size: int = opt(16, "examples per micro-batch on each rank")
    grad_accum: int = opt(1, "micro-batches accumulated per optimizer step")
    min_lr: float = opt(1e-5, "learning rate at the end of the cosine decay")


@dataclass
class FinetuneConfig(TrainConfig):
    """A trainer that starts from a checkpoint and reads records from files: SFT, reward model, DPO."""
    init: str = opt("", "checkpoint to start from (a run directory or checkpoint directory)")
    max_steps: int = opt(0, "optimizer steps in the whole run; 0 = derive from --epochs")
    epochs: float = opt(1.0, "passes over the data when --max-steps is 0")
    skip_bad: bool = opt(False, "skip (and count) malformed records instead of stopping at the first one")


@dataclass
class PreferenceConfig(FinetuneConfig):
    """A trainer on preference pairs and rankings (``data.preferences``): the reward model, DPO."""
    batch_size: int = opt(8, "prompts per micro-batch on each rank (each with all the pairs of its ranking)")
    eval_batch_size: int = opt(16, "prompts per validation batch")
    lr: float = opt(1e-4, "peak learning rate")


def check_config(cfg: RunConfig) -> None:
    """The checks every trainer's numbers need; errors name the flag."""
    at_least_one = ["log_every", "eval_every", "save_every", "keep_last"]
    if isinstance(cfg, TrainConfig):
        at_least_one += ["batch_size", "grad_accum"]
    if isinstance(cfg, PreferenceConfig):
        at_least_one.append("eval_batch_size")
    for name in at_least_one:
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    for name in ("max_steps", "warmup_steps", "stop_after", "grad_clip", "weight_decay"):
        if getattr(cfg, name) < 0:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 0, got {getattr(cfg, name)}")
    if not cfg.lr > 0:
        raise ValueError(f"--lr must be > 0, got {cfg.lr}")


def epoch_steps(run: "Run", n_examples: int) -> tuple[int, int]:
    """``(examples per optimizer step over all ranks, steps in the run)``: ``--max-steps``, or the steps
    ``--epochs`` passes over ``n_examples`` take."""
    cfg = run.cfg
    per_step = cfg.batch_size * cfg.grad_accum * run.dist.world_size
    return per_step, cfg.max_steps or max(1, math.ceil(cfg.epochs * n_examples / per_step))


# --- the run ----------------------------------------------------------------------------------------


@dataclass
class Run:
    """Where one invocation of a trainer runs: its config, stage name, rank, device and compute dtype."""
    cfg: RunConfig
    stage: str
    dist: runtime.DistInfo
    device: torch.device
    dtype: torch.dtype

    @property
    def out(self) -> Path:
        return Path(self.cfg.out)

    @property
    def is_main(self) -> bool:
        return self.dist.is_main

    def describe(self) -> str:
        """``device cpu, compute float32, 1 rank(s)``: the tail of every trainer's first line."""
        return (f"device {self.device}, compute {str(self.dtype).replace('torch.', '')}, "
                f"{self.dist.world_size} rank(s)")


def setup(cfg: RunConfig, stage: str) -> Run:
    """Check the common fields, join the process group (under torchrun), pick the device and dtype, seed.

    A run directory that already holds checkpoints is never trained over silently: without ``--resume``
    it is an error, unless ``--overwrite`` asks to start afresh (its checkpoints are then deleted).
    """
    check_config(cfg)
    if cfg.resume and cfg.overwrite:
        raise ValueError("--resume and --overwrite contradict each other: continue the run, or start afresh")
    existing = latest_checkpoint(cfg.out)
    if existing is not None and not cfg.resume:
        if not cfg.overwrite:
            raise ValueError(f"{cfg.out} already holds a {stage} run (latest checkpoint {existing}): pass --resume "
                             "to continue it, --overwrite to start afresh, or another --out")
        if int(os.environ.get("RANK", 0)) == 0:
            shutil.rmtree(Path(cfg.out) / "checkpoints")
    dist_info, device = runtime.init_distributed(cfg.device)
    runtime.keep_freed_memory()
    dtype = runtime.resolve_dtype(cfg.dtype, device)
    runtime.seed_everything(cfg.seed)
    return Run(cfg, stage, dist_info, device, dtype)


def load_init(run: Run, path: str, config_overrides: dict[str, Any] | None = None):
    """``(model, model config, tokenizer, meta)`` of the checkpoint a trainer starts from, on the run's
    device; a tokenizer that does not match the model's vocabulary is an error naming the checkpoint."""
    model, mcfg, tokenizer = load_model_and_tokenizer(path, device=run.device, config_overrides=config_overrides)
    return model, mcfg, tokenizer, load_meta(path)


def make_optimizer(model: torch.nn.Module, cfg: RunConfig, lr: float | None = None) -> torch.optim.Optimizer:
    """AdamW with decay on matrices only (``optim.make_optimizer``), from the config's fields."""
    return optim.make_optimizer(model, lr=cfg.lr if lr is None else lr, weight_decay=cfg.weight_decay,
                                betas=(cfg.beta1, cfg.beta2))


def resume(run: Run, model: torch.nn.Module, optimizer: torch.optim.Optimizer, *,
           load_fn: Any = None) -> tuple[int, dict[str, Any] | None]:
    """``(step to continue from, trainer state)``: ``(0, None)`` unless ``--resume``, which restores the
    weights (through ``load_fn(model, ckpt)`` if given), the optimizer and every RNG exactly."""
    if not run.cfg.resume:
        return 0, None
    state = resume_training(run.out, model, optimizer, device=run.device, world_size=run.dist.world_size,
                            verbose=run.is_main, load_fn=load_fn)
    return int(state["step"]), state


def start_log(run: Run, start_step: int) -> MetricsWriter:
    """Write ``resolved_config.json`` and open ``metrics.jsonl`` (cut back to ``start_step`` on resume)."""
    if run.is_main:
        save_config(run.cfg, run.out / "resolved_config.json")
    return MetricsWriter(run.out, resume_step=start_step if run.cfg.resume else None, enabled=run.is_main)


def wrap_ddp(module: torch.nn.Module, run: Run) -> torch.nn.Module:
    """The module to call in training: DDP-wrapped under torchrun, else the module itself."""
    if not run.dist.enabled:
        return module
    return DDP(module, device_ids=[run.device.index] if run.device.type == "cuda" else None)


def sync_context(train_model: torch.nn.Module, run: Run, micro: int, grad_accum: int):
    """DDP's ``no_sync`` on every micro-batch but the last: gradients are all-reduced once per step."""
    if run.dist.enabled and micro < grad_accum - 1:
        return train_model.no_sync()
    return contextlib.nullcontext()


def optimizer_step(run: Run, optimizer: torch.optim.Optimizer, params: Sequence[torch.nn.Parameter] | Any,
                   loss_value: float, step: int, *, grad_clip: float | None = None) -> float:
    """Clip the gradient norm, refuse a NaN/inf loss or norm (nothing is written for that step), step,
    zero the gradients. Returns the norm before clipping (NaN when clipping is off)."""
    clip = run.cfg.grad_clip if grad_clip is None else grad_clip
    params = [p for p in params if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, clip).item() if clip > 0 else float("nan")
    if not math.isfinite(loss_value) or (clip > 0 and not math.isfinite(grad_norm)):
        raise TrainingDiverged(
            f"{run.stage} step {step}: loss {loss_value}, grad norm {grad_norm}. No checkpoint was written for "
            f"this step; the last good one is {latest_checkpoint(run.out)}. Try a lower --lr (now {run.cfg.lr}), "
            f"more --warmup-steps, or --dtype float32.")
    optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return grad_norm


def trainer_state(run: Run, step: int, optimizer: torch.optim.Optimizer | None, **extra: Any) -> dict[str, Any]:
    """What ``--resume`` needs beside the weights: the step, the optimizer, every RNG, the data position."""
    state = {"step": step, "rng": capture_rng_state(), "data": {"seed": run.cfg.seed, "next_step": step},
             "world_size": run.dist.world_size, "config": to_jsonable(run.cfg)}
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    return {**state, **extra}


def save(run: Run, step: int, *, model: torch.nn.Module, model_config: Any, tokenizer_json: str,
         optimizer: torch.optim.Optimizer, meta: dict[str, Any], **state_extra: Any) -> Path | None:
    """Rank 0 writes ``OUT/checkpoints/step_N`` atomically and moves ``latest`` to it; other ranks return None."""
    if not run.is_main:
        return None
    return save_training_checkpoint(run.out, step, keep_last=run.cfg.keep_last, model=model,
                                    model_config=model_config, tokenizer_json=tokenizer_json,
                                    trainer_state=trainer_state(run, step, optimizer, **state_extra),
                                    meta={"stage": run.stage, "step": step, **meta})


# --- the loop ---------------------------------------------------------------------------------------


class Loop:
    """The steps of one invocation: ``for step in loop`` gives each step's 0-based index.

    Inside the body ``loop.step`` already counts the step being taken (so logs and checkpoints name
    the steps done). Around each step: the progress bar, ``--stop-after``, and the graceful stop: the
    first Ctrl-C / SIGTERM on any rank ends the loop after the current step on every rank
    (``loop.interrupted``), and the caller saves as after the last step.
    """

    def __init__(self, run: Run, total_steps: int, start_step: int, *, unit: str = "step"):
        self.run, self.total, self.start = run, total_steps, start_step
        stop_after = run.cfg.stop_after
        self.end = total_steps if stop_after <= 0 else min(total_steps, start_step + stop_after)
        self.step = start_step
        self.interrupted = False
        self.bar = tqdm(total=total_steps, initial=start_step, desc=run.stage, unit=unit, dynamic_ncols=True,
                        disable=not (run.cfg.progress and run.is_main))

    def __iter__(self) -> Iterator[int]:
        try:
            with runtime.GracefulStop() as stop:
                while self.step < self.end:
                    self.step += 1
                    yield self.step - 1
                    self.bar.update(1)
                    if runtime.any_rank(stop.stop, self.run.device):
                        self.write(f"interrupted: saving step {self.step} (resume with --resume)")
                        self.interrupted = True
                        break
        finally:
            self.bar.close()

    def set_lr(self, optimizer: torch.optim.Optimizer, *, max_lr: float | None = None,
               min_lr: float | None = None) -> float:
        """Warmup then cosine decay to ``min_lr`` (``optim.lr_at``) at the step being taken; constant when
        ``min_lr == max_lr``. Defaults: the config's ``lr`` and ``min_lr`` (``lr`` if it has none)."""
        cfg = self.run.cfg
        max_lr = cfg.lr if max_lr is None else max_lr
        min_lr = getattr(cfg, "min_lr", max_lr) if min_lr is None else min_lr
        lr = optim.lr_at(self.step - 1, max_lr=max_lr, min_lr=min_lr, warmup_steps=cfg.warmup_steps,
                         total_steps=self.total)
        optim.set_lr(optimizer, lr)
        return lr

    def log_due(self, every: int) -> bool:
        """Log after every ``every`` steps and after this invocation's last."""
        return self.step % every == 0 or self.step == self.end

    def eval_due(self, every: int) -> bool:
        """Evaluate after every ``every`` steps and after the run's last."""
        return self.step % every == 0 or self.step == self.total

    def save_due(self, every: int) -> bool:
        """Checkpoint after every ``every`` steps; the last step's checkpoint is the caller's final save."""
        return self.step % every == 0 and self.step != self.end

    def write(self, message: str) -> None:
        """Print above the progress bar, on rank 0 only."""
        if self.run.is_main:
            self.bar.write(message)


def finish(run: Run, metrics: MetricsWriter, plots: Sequence[tuple[Sequence[str], str, str]] = ()) -> None:
    """Close the log, draw ``(keys, file name, title)`` curves from it, wait for every rank, leave the group."""
    metrics.close()
    if run.is_main and plots:
        records = read_metrics(run.out / "metrics.jsonl")
        for keys, name, title in plots:
            plot_curves(records, list(keys), run.out / name, title=title)
    runtime.barrier()
    runtime.cleanup_distributed()
