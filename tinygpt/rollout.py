"""PPO's rollouts as tensors: prompts with their answer budgets, sampled answers, the RM's scores, and the
per-token log-probs, entropies and values the update needs.

The pieces, in the order a PPO step uses them (``stages/ppo.py``):
- :func:`encode_prompts`: each prompt rendered by the one chat template, with its family's answer budget
  (``world.tasks.answer_budget``: whole stories get the long one); a prompt keeps its whole budget or is
  left out, so an answer never depends on the other prompts of its batch;
- :func:`sample_answers`: the policy's answers, grouped by budget (short answers do not wait for stories),
  each row with its own generator (``row_seeds``), so an answer is the same in any batch or on any rank;
- :class:`RewardScorer`: the reward model's score of each answer, read as the comparison data was;
- :class:`Batch` / :func:`make_batch`: prompts left-padded to one column, responses after it, so every
  response starts at the same column; :meth:`Batch.rows` cuts a minibatch after its longest answer;
- :func:`gather`: old log-probs, reference log-probs, entropies and values for the whole rollout;
- :func:`minibatches`: each PPO epoch's partition of the rollout, optionally grouped by length;
- :func:`oracle_grades`, :func:`oracle_means`, :func:`greedy_eval`: what the world's oracle says of the
  answers (logged beside the RM's score, never trained on).

It knows models, the tokenizer, sampling and the reward model; the math (KL, shaped reward, GAE, the
PPO losses) stays in ``losses``.
"""

from __future__ import annotations

from dataclasses import dataclass
from collections.abc import Callable
from typing import Any

import numpy as np
import torch
from torch import Tensor

from tinygpt import reward_model as rm
from tinygpt.data.prompts import Prompt
from tinygpt.generate import SamplingConfig, generate
from tinygpt.losses import token_entropy, token_logprobs
from tinygpt.model import GPT
from tinygpt.tokenizer import Tokenizer
from tinygpt.world.tasks import answer_budget


@dataclass
class RolloutPrompt:
    """A prompt ready to answer: its record (``prompt.messages``, ``prompt.meta``), ids and answer budget."""
    prompt: Prompt
    ids: list[int]
    budget: int


def encode_prompts(prompts: list[Prompt], tokenizer: Tokenizer, block_size: int, short: int, long: int,
                   source: str) -> list[RolloutPrompt]:
    """Render each prompt and give it its family's budget (``long`` for stories, else ``short``); leave out
    (and report) the prompts that leave no room for it, +1 for the ``<|end|>`` the RM's rendering adds."""
    kept = []
    for p in prompts:
        ids, _ = tokenizer.render_chat(p.messages, add_generation_prompt=True)
        budget = answer_budget(p.family, short, long)
        if len(ids) + budget + 1 <= block_size:
            kept.append(RolloutPrompt(p, ids, budget))
    if len(kept) < len(prompts):
        print(f"ppo: {len(prompts) - len(kept)} of {len(prompts)} prompts in {source} leave less than their "
              f"answer budget of block_size {block_size} ({short} tokens, {long} for a story, + 1) and are left out")
    if not kept:
        raise ValueError(f"{source}: no prompt leaves room for its answer in block_size {block_size}; "
                         "lower --max-new-tokens (or --long-max-new-tokens)")
    return kept


def derived_seed(*parts: int) -> int:
    """A 62-bit seed that is a pure function of ``parts`` (e.g. (seed, step, purpose, row))."""
    return int(np.random.default_rng(list(parts)).integers(2**62))


def sample_answers(policy: GPT, prompts: list[RolloutPrompt], temperature: float, stop_ids: set[int],
                   row_seeds: list[int] | None = None) -> list[list[int]]:
    """Each prompt's answer within its budget, the stop token it ended on kept (ending is an action too).

    Prompts of one budget are sampled together, so short answers do not wait for the stories; with
    ``row_seeds`` the grouping changes no answer.
    """
    answers: list[list[int]] = [[] for _ in prompts]
    for budget in sorted({p.budget for p in prompts}):
        group = [i for i, p in enumerate(prompts) if p.budget == budget]
        got = generate(policy, [prompts[i].ids for i in group],
                       SamplingConfig(temperature=temperature, max_new_tokens=budget),
                       should_stop=lambda new: new[-1] in stop_ids,
                       row_seeds=[row_seeds[i] for i in group] if row_seeds is not None else None)
        for i, answer in zip(group, got):
            answers[i] = answer
    return answers


def answer_body(response: list[int], stop_ids: set[int]) -> list[int]:
    """The answer's tokens without the stop token it ended on."""
    return response[:-1] if response and response[-1] in stop_ids else response


class RewardScorer:
    """The reward model's score (minus its shift) of each (prompt, answer), read as the comparison data
    was: the prompt and the answer's *text*, rendered by the reward model's own tokenizer."""

    def __init__(self, model: GPT, tokenizer: Tokenizer, shift: float, policy_tokenizer: Tokenizer,
                 stop_ids: set[int], batch_size: int):
        self.model, self.tokenizer, self.shift = model, tokenizer, shift
        self.same_tokenizer = tokenizer.fingerprint == policy_tokenizer.fingerprint
        self.stop_ids, self.batch_size = stop_ids, batch_size

    def sequence(self, prompt: RolloutPrompt, response: list[int], text: str) -> list[int]:
        ids = rm.render_prompt_response(self.tokenizer, prompt.prompt.messages, text)
        block = self.model.cfg.block_size
        if len(ids) <= block:
            return ids
        # Re-encoding sampled text can take more tokens than were sampled (a split the tokenizer would
        # not make, or bytes that are not UTF-8). The sampled ids themselves fit, by the answer budget.
        if self.same_tokenizer:
            return prompt.ids + answer_body(response, self.stop_ids) + [self.tokenizer.end_id]
        return ids[-block:]  # another tokenizer: the start of the prompt gives way

    def __call__(self, prompts: list[RolloutPrompt], responses: list[list[int]], texts: list[str],
                 device: torch.device) -> Tensor:
        """Scores (B,) float32 on ``device``."""
        sequences = [self.sequence(p, a, t) for p, a, t in zip(prompts, responses, texts)]
        with torch.no_grad():
            return rm.score(self.model, sequences, device, shift=self.shift,
                            batch_size=self.batch_size).float().clone().to(device)


@dataclass
class Batch:
    """Rollout answers laid out so every response starts at the same column.

    ``ids`` (B, L + R): each prompt left-padded to L, then its response, then right padding;
    ``attention_mask`` (B, L + R); ``responses`` (B, R) and ``mask`` (B, R) float, 1 on response tokens.
    The logits at columns L-1 .. L+R-2 predict the response tokens.
    """
    ids: Tensor
    attention_mask: Tensor
    responses: Tensor
    mask: Tensor
    prompt_len: int

    def rows(self, index: Tensor) -> "Batch":
        """The rows ``index``, cut after their longest response (a minibatch without a story stays short)."""
        width = max(1, int(self.mask[index].sum(1).max()))
        end = self.prompt_len + width
        return Batch(self.ids[index, :end], self.attention_mask[index, :end], self.responses[index, :width],
                     self.mask[index, :width], self.prompt_len)

    @property
    def width(self) -> int:
        """R, the response columns."""
        return self.responses.shape[1]


def make_batch(prompts: list[list[int]], responses: list[list[int]], pad_id: int, device: torch.device) -> Batch:
    B, L = len(prompts), max(len(p) for p in prompts)
    R = max(1, max(len(r) for r in responses))
    ids = torch.full((B, L + R), pad_id, dtype=torch.long)
    attn = torch.zeros(B, L + R, dtype=torch.long)
    resp = torch.full((B, R), pad_id, dtype=torch.long)
    mask = torch.zeros(B, R)
    for row, (p, r) in enumerate(zip(prompts, responses)):
        ids[row, L - len(p):L] = torch.tensor(p)
        ids[row, L:L + len(r)] = torch.tensor(r, dtype=torch.long)
        attn[row, L - len(p):L + len(r)] = 1
        resp[row, :len(r)] = torch.tensor(r, dtype=torch.long)
        mask[row, :len(r)] = 1.0
    return Batch(ids.to(device), attn.to(device), resp.to(device), mask.to(device), L)


def response_logits(model: GPT, batch: Batch, temperature: float) -> Tensor:
    """Next-token logits at the response positions, scaled by the sampling temperature: (B, R, V) float32."""
    logits = model(batch.ids, attention_mask=batch.attention_mask)  # (B, L + R, V)
    return logits[:, batch.prompt_len - 1:-1].float() / temperature  # (B, R, V)


def response_values(value_model: GPT, batch: Batch) -> Tensor:
    """V(state before each response token): (B, R) float32."""
    hidden = value_model(batch.ids, attention_mask=batch.attention_mask, return_hidden=True)  # (B, L + R, C)
    return value_model.scalar(hidden[:, batch.prompt_len - 1:-1]).float()  # (B, R)


@dataclass
class RolloutTensors:
    """Per response token of the whole rollout, (B, R) each, 0 off the mask."""
    logprobs: Tensor      # under the policy that sampled
    ref_logprobs: Tensor  # under the frozen SFT reference
    values: Tensor        # the value model's estimates
    entropies: Tensor     # of the policy's next-token distributions


def gather(policy: GPT, reference: GPT, value_model: GPT, batch: Batch, lengths: np.ndarray, chunk: int,
           temperature: float) -> RolloutTensors:
    """Evaluate the rollout without gradients, in chunks of ``chunk`` answers of similar length, each cut
    after its longest answer (:meth:`Batch.rows`). The models' train/eval modes are restored."""
    modes = [m.training for m in (policy, value_model)]
    policy.eval()
    value_model.eval()
    logprobs, ref_logprobs, values, entropies = (torch.zeros_like(batch.mask) for _ in range(4))
    by_length = np.argsort(-lengths, kind="stable")
    with torch.no_grad():
        for first in range(0, len(by_length), chunk):
            rows = torch.as_tensor(by_length[first:first + chunk], device=batch.mask.device)
            part = batch.rows(rows)
            cut = slice(0, part.width)
            logits = response_logits(policy, part, temperature)  # (b, r, V)
            logprobs[rows, cut] = token_logprobs(logits, part.responses)
            entropies[rows, cut] = token_entropy(logits)
            del logits
            ref_logprobs[rows, cut] = token_logprobs(response_logits(reference, part, temperature), part.responses)
            values[rows, cut] = response_values(value_model, part) * part.mask
    policy.train(modes[0])
    value_model.train(modes[1])
    return RolloutTensors(logprobs, ref_logprobs, values, entropies)


def minibatches(lengths: np.ndarray, size: int, rng: np.random.Generator, by_length: bool) -> list[np.ndarray]:
    """Row indices of each minibatch of one PPO epoch: a random partition of the rollout, or, ``by_length``,
    the rows sorted longest first (equal lengths in random order), cut into minibatches taken in random order.

    A minibatch is as wide as its longest answer (``Batch.rows``), so one story among short answers makes
    every minibatch it lands in cost several times more. Grouping by length is Hugging Face's
    ``group_by_length``; each epoch still visits every row once.
    """
    order = rng.permutation(len(lengths))
    if not by_length:
        return [order[i:i + size] for i in range(0, len(order), size)]
    order = order[np.argsort(-lengths[order], kind="stable")]
    chunks = [order[i:i + size] for i in range(0, len(order), size)]
    return [chunks[j] for j in rng.permutation(len(chunks))]


def oracle_grades(labeler: Any, prompts: list[RolloutPrompt], texts: list[str], families: set[str]) -> list[dict | None]:
    """The world oracle's grade of each answer whose prompt carries task meta of a known family, else None."""
    return [labeler.scores(p.prompt.meta, t) if labeler is not None and p.prompt.meta is not None
            and p.prompt.meta.get("family") in families else None for p, t in zip(prompts, texts)]


def oracle_means(graded: list[dict | None], device: torch.device,
                 reduce: Callable[[Tensor], Tensor] | None = None) -> dict[str, float]:
    """The oracle's mean helpfulness, utility and rudeness over the graded answers of every rank (the oracle
    grades only prompts that carry task metadata); empty when none was graded."""
    done = torch.tensor([[g["helpful"], g["utility"], float(g["harmless"] == 0)] for g in graded if g is not None],
                        dtype=torch.float32).reshape(-1, 3)
    sums, count = done.sum(0).to(device), torch.tensor(float(len(done)), device=device)
    if reduce is not None:
        sums, count = reduce(sums), reduce(count)
    if count <= 0:
        return {}
    helpful, utility, rude = (sums / count).tolist()
    return {"oracle_helpful": helpful, "oracle_utility": utility, "rude": rude}


def greedy_eval(policy: GPT, prompts: list[RolloutPrompt], scorer: RewardScorer, stop_ids: set[int],
                texts_of: Callable[[list[list[int]]], list[str]], labeler: Any, families: set[str],
                device: torch.device) -> dict[str, float]:
    """Greedy answers to held-out prompts: their mean RM score and length, and the oracle's grade."""
    responses = sample_answers(policy, prompts, 0.0, stop_ids)
    texts = texts_of(responses)
    result = {"eval_reward": float(scorer(prompts, responses, texts, device).mean()),
              "eval_response_len": float(np.mean([len(r) for r in responses]))}
    graded = [g for g in oracle_grades(labeler, prompts, texts, families) if g is not None]
    if graded:
        result["eval_oracle_helpful"] = float(np.mean([g["helpful"] for g in graded]))
        result["eval_oracle_utility"] = float(np.mean([g["utility"] for g in graded]))
        result["eval_rude"] = float(np.mean([g["harmless"] == 0 for g in graded]))
    return result
