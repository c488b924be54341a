"""The math of training, once: pure tensor functions, each tested against hand-worked values.

Every stage's loop calls these; no stage re-derives a loss, a log-prob or a mask. The module
knows nothing about models, tokenizers or data: tensors in, tensors out.

Language modelling (pretraining, SFT): lm_loss, token_logprobs, sequence_logprobs.
Alignment (reward model, DPO, PPO): pairwise_loss, dpo_loss, kl_penalty, shaped_rewards,
adaptive_kl_coef (and its stateful AdaptiveKLController), gae, whiten, ppo_losses,
explained_variance, entropy_from_logits, and the masked_mean they share.

Conventions: (B, T) per-token tensors come with a (B, T) ``mask`` that is 1 on the tokens that
count (response tokens) and 0 elsewhere (prompt, padding after EOS); means are over the tokens
that count in the whole batch (token-weighted), never NaN when nothing counts.
"""

from __future__ import annotations

from collections.abc import Callable

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


# --- alignment ------------------------------------------------------------------------------------


def masked_mean(x: torch.Tensor, mask: torch.Tensor | None = None,
                reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Mean of ``x`` over the positions where ``mask`` is 1 (all positions when None); 0 if none.

    ``reduce`` sums a tensor over the workers of a distributed run (``runtime.all_reduce_sum``):
    then the mean is over every worker's masked positions together, as if one process held them all.
    """
    if mask is None:
        mask = torch.ones_like(x)
        if reduce is None:
            return x.mean()
    mask = mask.to(x.dtype)
    if reduce is None:
        return (x * mask).sum() / mask.sum().clamp(min=1)
    total, count = reduce(torch.stack([(x * mask).sum(), mask.sum()]))
    return total / count.clamp(min=1)


def _group_weights(group: torch.Tensor) -> torch.Tensor:
    """Weights (P,) summing to 1 that give each group (prompt) the same total weight.

    group (P,) holds any integer id per pair; a group with n pairs gives each of them 1 / (n * G),
    G the number of distinct groups: the per-prompt average of InstructGPT's reward-model loss."""
    _, inverse, counts = torch.unique(group, return_inverse=True, return_counts=True)  # (G,), (P,), (G,)
    return 1.0 / (counts[inverse].float() * counts.numel())  # (P,)


def _pair_mean(per_pair: torch.Tensor, group: torch.Tensor | None) -> torch.Tensor:
    if per_pair.numel() == 0:
        raise ValueError("no pairs: a preference loss needs at least one (chosen, rejected) pair")
    if group is None:
        return per_pair.mean()
    if group.shape != per_pair.shape:
        raise ValueError(f"group must have one id per pair, shape {tuple(per_pair.shape)}, got {tuple(group.shape)}")
    return (per_pair * _group_weights(group).to(per_pair.device)).sum()


def pairwise_loss(chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor,
                  group: torch.Tensor | None = None) -> torch.Tensor:
    """Bradley-Terry reward-model loss: ``-mean log sigmoid(r_chosen - r_rejected)``, a scalar.

    InstructGPT (Ouyang et al. 2022, https://arxiv.org/abs/2203.02155, eq. 1):
    ``loss(theta) = -1 / C(K, 2) * E[log sigmoid(r(x, y_w) - r(x, y_l))]``: all K-choose-2 pairs
    of one prompt's ranking form one batch element, so each prompt counts once however many pairs
    it gives (treating the pairs as independent samples overfits, the paper reports).
    chosen_rewards, rejected_rewards (P,); ``group`` (P,) integer prompt ids: when given, the
    loss is the mean over prompts of the mean over that prompt's pairs; when None, the plain mean
    over pairs. Computed in float32 with ``logsigmoid`` (no overflow for large margins).
    """
    if chosen_rewards.shape != rejected_rewards.shape:
        raise ValueError(f"chosen and rejected rewards differ in shape: {tuple(chosen_rewards.shape)} "
                         f"vs {tuple(rejected_rewards.shape)}")
    margin = chosen_rewards.float() - rejected_rewards.float()  # (P,)
    return _pair_mean(-F.logsigmoid(margin), group)


def dpo_loss(policy_chosen_logps: torch.Tensor, policy_rejected_logps: torch.Tensor,
             ref_chosen_logps: torch.Tensor, ref_rejected_logps: torch.Tensor, beta: float,
             group: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization loss (Rafailov et al. 2023, https://arxiv.org/abs/2305.18290, eq. 7).

    ``L = -E log sigmoid(beta * [(log pi(y_w|x) - log pi_ref(y_w|x)) - (log pi(y_l|x) - log pi_ref(y_l|x))])``

    Inputs are sequence log-probs (P,) of the response tokens (``sequence_logprobs``) under the
    policy and the frozen reference. Returns ``(loss, chosen_rewards, rejected_rewards)``, the
    rewards being the implicit ones, ``beta * (log pi - log pi_ref)`` (P,), detached (for logging:
    accuracy is ``chosen > rejected``, the margin their difference). ``group`` as in
    :func:`pairwise_loss` (each prompt counts once).
    """
    if beta <= 0:
        raise ValueError(f"beta must be > 0, got {beta}")
    chosen_logratio = policy_chosen_logps.float() - ref_chosen_logps.float()        # (P,)
    rejected_logratio = policy_rejected_logps.float() - ref_rejected_logps.float()  # (P,)
    loss = _pair_mean(-F.logsigmoid(beta * (chosen_logratio - rejected_logratio)), group)
    return loss, (beta * chosen_logratio).detach(), (beta * rejected_logratio).detach()


def kl_penalty(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str = "k1") -> torch.Tensor:
    """Per-token estimate of KL(pi || pi_ref) from the sampled token's log-probs: (B, T), (B, T) -> (B, T).

    With ``log_ratio = logprobs - ref_logprobs`` (tokens sampled from pi), after J. Schulman,
    "Approximating KL divergence" (http://joschu.net/blog/kl-approx.html):
      * ``k1 = log_ratio``: unbiased, can be negative per token; InstructGPT's per-token penalty
        ``-beta * log(pi_RL / pi_SFT)`` (https://arxiv.org/abs/2203.02155, eq. 2);
      * ``k2 = log_ratio**2 / 2``: biased, low variance, >= 0;
      * ``k3 = (r - 1) - log r`` with ``r = pi_ref / pi = exp(-log_ratio)``: unbiased, >= 0,
        low variance.
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if kind == "k1":
        return log_ratio
    if kind == "k2":
        return 0.5 * log_ratio.pow(2)
    if kind == "k3":
        return torch.expm1(-log_ratio) + log_ratio  # (r - 1) - log r, r = exp(-log_ratio)
    raise ValueError(f"kl_penalty: kind must be k1, k2 or k3, got {kind!r}")


def shaped_rewards(scores: torch.Tensor, kl_tokens: torch.Tensor, mask: torch.Tensor,
                   kl_coef: float) -> torch.Tensor:
    """InstructGPT's per-token reward (https://arxiv.org/abs/2203.02155, eq. 2, after Ziegler et al. 2019):
    ``r_t = -kl_coef * KL_t`` on every response token, plus the reward model's score on the last one.

    scores (B,): the RM's score of each whole answer; kl_tokens (B, T): per-token KL estimates
    (:func:`kl_penalty`); mask (B, T): 1 on response tokens, each row's ones a prefix (right padding).
    Returns (B, T) float32, 0 where mask is 0. A row without response tokens gets its score nowhere
    (an empty answer is refused: there is no token to reward).
    """
    if kl_tokens.shape != mask.shape or scores.shape != kl_tokens.shape[:1]:
        raise ValueError(f"shaped_rewards: scores (B,), kl_tokens and mask (B, T), got {tuple(scores.shape)}, "
                         f"{tuple(kl_tokens.shape)}, {tuple(mask.shape)}")
    m = mask.float()
    lengths = m.sum(1).long()  # (B,)
    if bool((lengths == 0).any()):
        raise ValueError("shaped_rewards: an answer with no response token has no token to carry its score")
    rewards = -kl_coef * kl_tokens.float() * m  # (B, T)
    rows = torch.arange(len(scores), device=scores.device)
    rewards[rows, lengths - 1] += scores.float()
    return rewards


def adaptive_kl_coef(kl_coef: float, kl: float, target: float, n_answers: int, horizon: int) -> float:
    """Ziegler et al. (2019), section 2.2, a proportional controller of the KL coefficient beta:
    ``beta * (1 + clip(KL / KL_target - 1, -0.2, 0.2) * n / horizon)``, ``n`` the answers behind ``KL``."""
    if target <= 0 or horizon <= 0:
        raise ValueError(f"adaptive KL needs a target > 0 and a horizon > 0, got {target}, {horizon}")
    error = min(max(kl / target - 1.0, -0.2), 0.2)
    return kl_coef * (1.0 + error * n_answers / horizon)


class AdaptiveKLController:
    """The KL coefficient of a PPO run, with a checkpointable state: :func:`adaptive_kl_coef` after every
    rollout, or fixed when ``target`` is None."""

    def __init__(self, init: float, target: float | None, horizon: int):
        if init < 0:
            raise ValueError(f"kl_coef must be >= 0, got {init}")
        if target is not None and (target <= 0 or horizon <= 0):
            raise ValueError(f"adaptive KL needs kl_target > 0 and kl_horizon > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = float(init), target, horizon

    def update(self, kl: float, n_answers: int) -> None:
        if self.target is not None:
            self.value = adaptive_kl_coef(self.value, kl, self.target, n_answers, self.horizon)

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


def gae(rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float,
        lam: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized Advantage Estimation (Schulman et al. 2015, https://arxiv.org/abs/1506.02438).

    rewards, values, mask (B, T): per-token rewards (RLHF: -kl_coef * KL each token, plus the
    reward model's score on the last response token), value estimates, and 1 on response tokens.
    ``delta_t = r_t + gamma * V_{t+1} - V_t``, ``A_t = delta_t + gamma * lam * A_{t+1}``, where
    the next token's value and advantage count only if its mask is 1: after the last real token
    (and on padding after EOS) the episode has ended, so the bootstrap is 0. Returns
    ``(advantages, returns)`` (B, T), ``returns = advantages + values``, both 0 where mask is 0.
    No gradient flows (advantages are targets).
    """
    if not (rewards.shape == values.shape == mask.shape):
        raise ValueError(f"rewards, values and mask must share a shape, got {tuple(rewards.shape)}, "
                         f"{tuple(values.shape)}, {tuple(mask.shape)}")
    with torch.no_grad():
        rewards, values, m = rewards.float(), values.float(), mask.float()
        B, T = rewards.shape
        advantages = torch.zeros_like(rewards)  # (B, T)
        next_value = torch.zeros(B, device=rewards.device)
        next_adv = torch.zeros(B, device=rewards.device)
        next_mask = torch.zeros(B, device=rewards.device)
        for t in reversed(range(T)):
            delta = rewards[:, t] + gamma * next_value * next_mask - values[:, t]  # (B,)
            advantages[:, t] = delta + gamma * lam * next_adv * next_mask
            next_value, next_adv, next_mask = values[:, t], advantages[:, t], m[:, t]
        advantages = advantages * m
        returns = (advantages + values) * m
    return advantages, returns


def whiten(x: torch.Tensor, mask: torch.Tensor, shift_mean: bool = True, eps: float = 1e-8,
           reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Normalise ``x`` (B, T) to mean 0, variance 1 over the positions where mask is 1.

    Mean and (population) variance are over the masked positions of the whole batch; with
    ``reduce`` (see :func:`masked_mean`) over those of every worker's batch together. With
    ``shift_mean=False`` the mean is added back (only the scale changes: used for rewards, so
    their sign keeps its meaning). Positions where mask is 0 come out 0.
    """
    m = mask.to(x.dtype)
    mean = masked_mean(x, m, reduce)
    var = masked_mean((x - mean).pow(2), m, reduce)
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return out * m


def ppo_losses(logprobs: torch.Tensor, old_logprobs: torch.Tensor, advantages: torch.Tensor,
               values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
               clip_ratio: float = 0.2, value_clip: float = 0.2) -> dict[str, torch.Tensor]:
    """PPO's clipped surrogate and clipped value loss, token-level means over ``mask``.

    PPO (Schulman et al. 2017, https://arxiv.org/abs/1707.06347, eq. 7), as InstructGPT uses it
    on per-token log-probs (https://arxiv.org/abs/2203.02155, section 3.5):
      ``ratio = exp(logprobs - old_logprobs)``
      ``policy_loss = mean max(-A * ratio, -A * clip(ratio, 1 - clip_ratio, 1 + clip_ratio))``
      ``V_clipped = old_V + clip(V - old_V, -value_clip, value_clip)``
      ``value_loss = 0.5 * mean max((V - R)^2, (V_clipped - R)^2)``
    All inputs (B, T); ``advantages`` and ``returns`` are constants (no gradient is taken through
    them). Returns tensors: ``policy_loss`` and ``value_loss`` (with gradients), and, detached,
    ``clip_frac`` (share of tokens where the clipped branch is taken), ``value_clip_frac``,
    ``approx_kl`` (k3 estimate of KL(old || new), Schulman's blog), ``ratio`` (mean).
    """
    shapes = {tuple(t.shape) for t in (logprobs, old_logprobs, advantages, values, old_values, returns, mask)}
    if len(shapes) != 1:
        raise ValueError(f"ppo_losses: every input must share one (B, T) shape, got {sorted(shapes)}")
    m = mask.float()
    advantages, returns = advantages.detach().float(), returns.detach().float()
    old_logprobs, old_values = old_logprobs.detach().float(), old_values.detach().float()
    log_ratio = logprobs.float() - old_logprobs  # (B, T)
    ratio = torch.exp(log_ratio)
    pg_unclipped = -advantages * ratio
    pg_clipped = -advantages * torch.clamp(ratio, 1.0 - clip_ratio, 1.0 + clip_ratio)
    policy_loss = masked_mean(torch.maximum(pg_unclipped, pg_clipped), m)

    values = values.float()
    values_clipped = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    vf_unclipped = (values - returns).pow(2)
    vf_clipped = (values_clipped - returns).pow(2)
    value_loss = 0.5 * masked_mean(torch.maximum(vf_unclipped, vf_clipped), m)

    with torch.no_grad():
        clip_frac = masked_mean((pg_clipped > pg_unclipped).float(), m)
        value_clip_frac = masked_mean((vf_clipped > vf_unclipped).float(), m)
        approx_kl = masked_mean(torch.expm1(log_ratio) - log_ratio, m)  # (r - 1) - log r, r = pi / pi_old
        mean_ratio = masked_mean(ratio, m)
    return {"policy_loss": policy_loss, "value_loss": value_loss, "clip_frac": clip_frac,
            "value_clip_frac": value_clip_frac, "approx_kl": approx_kl, "ratio": mean_ratio}


def explained_variance(values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor,
                       reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> float:
    """``1 - Var(returns - values) / Var(returns)`` over masked tokens (of every worker with ``reduce``):
    1 is a perfect value function, <= 0 no better than a constant; NaN when the returns do not vary."""
    def var(x: torch.Tensor) -> torch.Tensor:
        return masked_mean((x - masked_mean(x, mask, reduce)) ** 2, mask, reduce)

    total = var(returns.float())
    return float(1.0 - var(returns.float() - values.float()) / total) if total > 0 else float("nan")


def token_entropy(logits: torch.Tensor) -> torch.Tensor:
    """Entropy (nats) of each next-token distribution: logits (B, T, V) -> (B, T), float32.

    ``H = logsumexp(z) - sum softmax(z) * z``.
    """
    z = logits.float()
    p = torch.softmax(z, dim=-1)  # (B, T, V)
    return torch.logsumexp(z, dim=-1) - (p * z).sum(-1)  # (B, T)


def entropy_from_logits(logits: torch.Tensor, mask: torch.Tensor | None = None,
                        reduce: Callable[[torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """Mean entropy (nats) of the next-token distributions: logits (B, T, V), mask (B, T) -> scalar.

    :func:`token_entropy` averaged over masked positions (of every worker, with ``reduce``: see
    :func:`masked_mean`).
    """
    return masked_mean(token_entropy(logits), mask, reduce)


def preference_accuracy(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """Per pair: 1 where the chosen answer scores higher, 1/2 on a tie, 0 otherwise: (N,), (N,) -> (N,).

    The held-out accuracy of a reward model (scores = rewards) and of DPO (scores = implicit rewards).
    """
    return (chosen_scores > rejected_scores).float() + 0.5 * (chosen_scores == rejected_scores).float()
