"""Optimizer and learning-rate schedule: AdamW with decay / no-decay groups, warmup + cosine.

Knows nothing about data or stages; it sees parameters and step numbers.
"""

from __future__ import annotations

import math

import torch
from torch import nn


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Weight decay on matrices (linear and embedding weights), none on biases, norms and gains.

    The GPT-2/nanoGPT rule: every parameter with 2 or more dimensions decays; 1-D ones do not.
    Parameters that do not require grad (a frozen base under LoRA) are left out; a parameter marked
    ``no_weight_decay`` (an embedding of which LoRA trains a few rows) never decays.
    """
    decay, no_decay = [], []
    for p in model.parameters():
        if not p.requires_grad:
            continue
        (decay if p.dim() >= 2 and not getattr(p, "no_weight_decay", False) else no_decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def make_optimizer(model: nn.Module, *, lr: float, weight_decay: float = 0.1,
                   betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8) -> torch.optim.AdamW:
    """AdamW over :func:`param_groups`, with the multi-tensor (`foreach`) kernels."""
    return torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=betas, eps=eps, foreach=True)


def lr_at(step: int, *, max_lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup from 0 over ``warmup_steps``, then cosine decay to ``min_lr`` at ``total_steps``.

    A pure function of the step, so a resumed run needs no scheduler state.
    step 0 -> max_lr / warmup (never exactly 0, so the first step moves), step >= total -> min_lr.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return max_lr * (step + 1) / warmup_steps
    if step >= total_steps:
        return min_lr
    span = max(1, total_steps - warmup_steps)
    progress = (step - warmup_steps) / span  # in [0, 1)
    return min_lr + 0.5 * (1.0 + math.cos(math.pi * progress)) * (max_lr - min_lr)


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    for group in optimizer.param_groups:
        group["lr"] = lr
