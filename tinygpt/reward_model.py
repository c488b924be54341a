"""Reward-model scoring: a transformer with a scalar head, read on the last token of a conversation.

A reward model is a GPT checkpoint built with ``scalar_head=True``. The reward of a conversation is
the head's output at its LAST token (the ``<|end|>`` closing the assistant's answer, since the
sequence is rendered by :func:`render_prompt_response` through the one chat template), minus the
``reward_shift`` stored in the checkpoint's ``tinygpt.json``: the reward stage sets that shift so
the SFT demonstrations score 0 on average (InstructGPT normalises its RM the same way).

Sequences are right-padded into a batch: a causal model never looks right, so the real tokens see
only real tokens and no attention mask is needed; the last real token of row b is at ``length_b - 1``.

The reward stage trains through :class:`LastTokenReward` (differentiable, DDP-wrappable); PPO and
evaluation call :func:`load_reward_model` and :func:`score`. This module knows the model, the
checkpoint and the tokenizer; it knows nothing about stages, data files or losses.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from tinygpt.checkpoint import CheckpointError, load_config, load_meta, load_model_and_tokenizer
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer

REWARD_SHIFT_KEY = "reward_shift"


class LastTokenReward(nn.Module):
    """``(ids (B, T) right-padded, lengths (B,)) -> rewards (B,)``: the scalar head on each row's last real token."""

    def __init__(self, gpt: GPT):
        super().__init__()
        if gpt.scalar_head is None:
            raise ValueError("LastTokenReward needs a GPT with a scalar head (ModelConfig(scalar_head=True))")
        self.gpt = gpt

    def forward(self, ids: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
        hidden = self.gpt(ids, return_hidden=True)  # (B, T, C)
        per_position = self.gpt.scalar(hidden)  # (B, T)
        last = (lengths.to(ids.device) - 1).clamp(min=0)  # (B,)
        return per_position.float().gather(1, last[:, None]).squeeze(1)  # (B,)


def pad_right(sequences: Sequence[Sequence[int]], pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> (ids (N, T_max) right-padded with ``pad_id``, lengths (N,))."""
    if not sequences or any(len(s) == 0 for s in sequences):
        raise ValueError("pad_right needs at least one sequence, and every sequence at least one token")
    lengths = torch.tensor([len(s) for s in sequences], dtype=torch.long)
    ids = torch.full((len(sequences), int(lengths.max())), pad_id, dtype=torch.long)  # (N, T_max)
    for row, seq in enumerate(sequences):
        ids[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
    return ids, lengths


def load_reward_model(path: str, device: str | torch.device = "cpu") -> tuple[GPT, Tokenizer, float]:
    """``(model, tokenizer, shift)`` from a reward checkpoint (a run directory or a checkpoint directory).

    The checkpoint must have been saved with a scalar head (by ``tinygpt reward``): loading an SFT
    checkpoint here would give a randomly initialised head, so it is an error. ``shift`` is the
    checkpoint meta's ``reward_shift`` (0 when absent). The model is in eval mode.
    """
    if not load_config(path).scalar_head:
        raise CheckpointError(f"{path}: not a reward model (its config.json has scalar_head=false); "
                              "train one with `tinygpt reward --init SFT_CHECKPOINT ...`")
    model, cfg, tokenizer = load_model_and_tokenizer(path, device=device)
    shift = float(load_meta(path).get(REWARD_SHIFT_KEY, 0.0) or 0.0)
    model.eval()
    return model, tokenizer, shift


def score(model: GPT, sequences: Sequence[Sequence[int]], device: str | torch.device | None = None,
          shift: float = 0.0, batch_size: int = 32) -> torch.Tensor:
    """Rewards (N,) float32 on the CPU: the scalar head on the last token of each sequence, minus ``shift``.

    ``sequences`` are full rendered conversations (e.g. from :func:`render_prompt_response`), each at
    most ``block_size`` tokens. Scored in batches of ``batch_size`` under ``inference_mode``; the
    model's train/eval mode is restored afterwards.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    device = torch.device(device) if device is not None else model.tok_emb.weight.device
    too_long = [i for i, s in enumerate(sequences) if len(s) > model.cfg.block_size]
    if too_long:
        raise ValueError(f"sequence(s) {too_long[:5]} are longer than the reward model's block_size "
                         f"({model.cfg.block_size}); the reward reads the last token, so they cannot be cut")
    if len(sequences) == 0:
        return torch.zeros(0)
    head = LastTokenReward(model)
    was_training = model.training
    model.eval()
    out = []
    try:
        with torch.inference_mode():
            for first in range(0, len(sequences), batch_size):
                ids, lengths = pad_right(sequences[first:first + batch_size])
                out.append(head(ids.to(device), lengths.to(device)).float().cpu())  # (b,)
    finally:
        model.train(was_training)
    return torch.cat(out) - shift  # (N,)


def render_prompt_response(tokenizer: Tokenizer, prompt_messages: Sequence[dict[str, Any]] | str,
                           response_text: str) -> list[int]:
    """The token ids of the prompt's chat plus the assistant's ``response_text`` and its ``<|end|>``.

    ``prompt_messages`` is a list of chat messages (system/user/assistant turns so far) or a plain
    string (taken as one user message). Rendered with :meth:`Tokenizer.render_chat`, the one template.
    """
    if isinstance(prompt_messages, str):
        prompt_messages = [{"role": "user", "content": prompt_messages}]
    if not isinstance(response_text, str):
        raise TypeError(f"response_text must be a str, got {type(response_text).__name__}")
    ids, _ = tokenizer.render_chat(list(prompt_messages) + [{"role": "assistant", "content": response_text}])
    return ids
