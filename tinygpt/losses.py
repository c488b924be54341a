"""The math of training, once: pure tensor functions, each tested against hand-worked values.

Every stage's loop calls these; no stage re-derives a loss, a log-prob or a mask. The module
knows nothing about models, tokenizers or data: tensors in, tensors out.

This file holds the language-modelling pieces used by pretraining and SFT. The alignment
losses (pairwise_loss, dpo_loss, ppo_losses, gae, kl_penalty) join it with the RLHF stages.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def lm_loss(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Mean next-token cross-entropy over the positions that count.

    logits (B, T, V), targets (B, T) int64, mask (B, T) with 1 where the target is trained on
    (None: every position). Targets equal to -100 are ignored too. Computed in float32 whatever
    the logits' dtype, so bf16 autocast does not lose precision in the softmax.
    Returns a scalar; if no position counts, 0 (with a gradient path), never NaN.
    """
    B, T, V = logits.shape
    flat_logits = logits.reshape(B * T, V).float()  # (B*T, V)
    flat_targets = targets.reshape(B * T)
    if mask is not None:
        flat_targets = flat_targets.masked_fill(mask.reshape(B * T) == 0, -100)
    n = (flat_targets != -100).sum()
    total = F.cross_entropy(flat_logits, flat_targets, ignore_index=-100, reduction="sum")
    return total / n.clamp(min=1)


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(target_t | prefix) for every position: logits (B, T, V), targets (B, T) -> (B, T), float32."""
    logp = torch.log_softmax(logits.float(), dim=-1)  # (B, T, V)
    return logp.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # (B, T)


def sequence_logprobs(logits: torch.Tensor, targets: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Sum of log p(target_t) over masked positions: (B, T, V), (B, T), (B, T) -> (B,)."""
    return (token_logprobs(logits, targets) * mask.float()).sum(-1)
