"""RLHF with PPO: maximise a reward model's score, held near the SFT policy by a per-token KL penalty.

InstructGPT (Ouyang et al. 2022, section 3.5) on top of Ziegler et al. (2019) "Fine-tuning language
models from human preferences". Each step (one *rollout*):

1. sample ``rollout_batch`` prompts and let the policy answer them (``tinygpt.generate``, each answer
   with its own generator seeded by (seed, step, row), so a resumed run samples the same answers, and
   so does a run split over more or fewer ranks), each within its family's budget
   (``--max-new-tokens``, or ``--long-max-new-tokens`` for a story: ``world.tasks.answer_budget``, the
   budgets `tinygpt rank` and `tinygpt evaluate` use, so the RM judges whole stories here too);
2. score each answer with the reward model (RM score minus its ``shift``), and compute every response
   token's log-probability under the policy, under the frozen SFT *reference*, and its value;
3. reward per token ``r_t = -kl_coef * KL_t``, plus the RM score at the last response token
   (``losses.kl_penalty``); advantages and returns by GAE (``losses.gae``), advantages whitened;
4. ``ppo_epochs`` passes of shuffled minibatches over the rollout: clipped policy loss and clipped
   value loss (``losses.ppo_losses``). PPO-ptx (``ptx_coef > 0``) adds ``ptx_coef * lm_loss`` on a
   pretraining batch to every policy update, InstructGPT's fix for the "alignment tax";
5. with ``adaptive_kl``, move ``kl_coef`` toward a target KL (Ziegler et al.'s proportional controller).

The value function is a **separate model**, initialised from the reward model (``value_init=reward``,
as InstructGPT does) or from the SFT model with a fresh scalar head (``value_init=sft``). Separate
rather than a scalar head on the policy because (a) the value and policy losses then cannot pull on
the same weights, so there is no ``vf_coef`` to tune and a badly fitted value early on cannot damage
the language model; (b) the RM already knows what a good answer is, so its features are a far better
start for predicting return than the policy's; (c) the policy checkpoint stays a plain language model
that every later stage loads unchanged. The price is one more forward/backward per minibatch, which
at tinygpt's sizes is small next to sampling.

A checkpoint (``OUT/checkpoints/step_N``) holds the policy as a normal model (so ``tinygpt sample``,
chat and evaluation load it as is) and, in ``trainer_state.pt``, the value model's weights, both
optimizers, the adaptive-KL state and every RNG: ``--resume`` continues exactly. The reference is not
copied: it is the ``--policy`` checkpoint, whose path and sha256 are recorded and checked on resume.

    tinygpt ppo --policy runs/x/sft --reward runs/x/reward --prompts runs/x/world/rl_prompts.jsonl --out runs/x/ppo
    tinygpt ppo ... --ptx-coef 1.0 --ptx-data runs/x/data        # PPO-ptx

Outputs: ``metrics.jsonl`` (reward, KL, kl_coef, entropy, clip fraction, approx-KL, value loss, explained
variance, response length, ptx loss, and the world oracle's grade of the same answers), ``reward.png``,
``kl.png``, and ``samples.jsonl`` (answers with their RM score and oracle grade, so reward hacking, the
RM score rising while the oracle's grade falls, can be read off).

Uses: losses (all the math), rewards (loading and scoring the RM), generate, checkpoint, optim,
data.shards.TokenDataset (ptx batches), world.labeler (the oracle's grade, for logging only). It does
not know how the SFT or reward models were trained.

Under ``torchrun`` each of the N ranks answers ``rollout_batch`` prompts, rows ``rank * rollout_batch``
onward of the step's global batch of ``N * rollout_batch``, and trains on them; gradients are averaged
over ranks (``runtime.average_gradients``, DDP's all-reduce done by hand, because the policy also samples
and two models train per minibatch). Everything a single process would compute over the whole rollout
is computed over all ranks together: reward and advantage whitening, the KL that drives the adaptive
coefficient, the logged means; each minibatch's loss is weighted by its share of the global minibatch's
response tokens. So N ranks of ``rollout_batch`` B equal one process of ``N * B`` when each rollout is one
minibatch (``tests/test_ppo.py``); with several minibatches, each rank shuffles its own rows and the
k-th global minibatch is the union of the ranks' k-th ones. Rank 0 writes the checkpoints and logs.

    torchrun --nproc_per_node=2 -m tinygpt.cli ppo --policy ... --rollout-batch 16   # 32 answers a step
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor
from tqdm.auto import tqdm

from tinygpt import reward_model as rm, runtime
from tinygpt.checkpoint import (WEIGHTS, CheckpointError, capture_rng_state, latest_checkpoint, load_model,
                                load_tokenizer_json, load_trainer_state, load_weights, resolve_checkpoint,
                                restore_rng_state, save_training_checkpoint)
from tinygpt.config import opt, save_config, to_jsonable
from tinygpt.data.shards import TokenDataset
from tinygpt.generate import SamplingConfig, generate
from tinygpt.losses import (gae, kl_penalty, lm_loss, masked_mean, ppo_losses, token_entropy, token_logprobs,
                            whiten)
from tinygpt.runlog import MetricsWriter, plot_curves, read_metrics
from tinygpt.model import GPT
from tinygpt.optim import lr_at, make_optimizer, set_lr
from tinygpt.tokenizer import Tokenizer, validate_messages
from tinygpt.world.labeler import Labeler
from tinygpt.world.tasks import DEFAULT_LONG_ANSWER_TOKENS, FAMILIES, answer_budget
from tinygpt.runtime import TrainingDiverged  # noqa: F401 (re-exported for callers)

VALUE_INITS = ("reward", "sft")


@dataclass
class PPOConfig:
    policy: str = opt("", "SFT checkpoint the policy starts from; it is also the frozen KL reference")
    reward: str = opt("", "reward-model checkpoint (from `tinygpt reward`)")
    prompts: str = opt("", "RL prompts, JSONL: {\"prompt\": [messages] or \"text\", ...} (the world's rl_prompts.jsonl)")
    out: str = opt("runs/ppo", "run directory: checkpoints/, metrics.jsonl, samples.jsonl, reward.png, kl.png")
    value_init: str = opt("reward", "value model: 'reward' = a copy of the reward model (InstructGPT), "
                                    "'sft' = a copy of the SFT model with a fresh scalar head")
    # rollouts
    rollout_batch: int = opt(32, "prompts answered per rollout (one PPO step), per rank under torchrun")
    temperature: float = opt(1.0, "sampling temperature of the rollouts (> 0; log-probs use the same one)")
    max_new_tokens: int = opt(48, "longest answer sampled, in tokens")
    long_max_new_tokens: int = opt(DEFAULT_LONG_ANSWER_TOKENS, "longest answer sampled for prompts of the families "
                                   "whose answers are whole stories (write_story, from the prompt's 'family'); "
                                   "0 = --max-new-tokens")
    # PPO
    ppo_epochs: int = opt(4, "passes over each rollout batch")
    minibatch_size: int = opt(8, "answers per PPO minibatch (one optimizer step each), per rank under torchrun")
    group_by_length: bool = opt(True, "put answers of similar length in the same minibatch (the minibatches' order "
                                      "stays random): a story then widens one minibatch, not most of them")
    lr: float = opt(2e-5, "policy learning rate (constant after warmup)")
    value_lr: float | None = opt(None, "value-model learning rate (None = --lr)")
    warmup_steps: int = opt(5, "rollouts of linear learning-rate warmup")
    weight_decay: float = opt(0.0, "AdamW weight decay on matrices")
    beta1: float = opt(0.9, "AdamW beta1")
    beta2: float = opt(0.95, "AdamW beta2")
    grad_clip: float = opt(1.0, "clip each model's gradient norm to this (0 = off)")
    clip_ratio: float = opt(0.2, "PPO clip range of the probability ratio (epsilon)")
    value_clip: float = opt(0.2, "clip range of the value update around the rollout's values")
    gamma: float = opt(1.0, "discount per token")
    lam: float = opt(0.95, "GAE lambda")
    whiten_rewards: bool = opt(False, "scale the per-token rewards of each rollout to unit variance")
    # KL penalty to the SFT reference
    kl_coef: float = opt(0.05, "beta: weight of the per-token KL penalty to the SFT policy (the start value "
                               "with --adaptive-kl)")
    kl_estimator: str = opt("k1", "per-token KL estimate passed to losses.kl_penalty (k1, k2, k3, ...)")
    adaptive_kl: bool = opt(False, "adapt kl_coef toward --kl-target (Ziegler et al. 2019)")
    kl_target: float = opt(6.0, "target KL per answer, in nats, for --adaptive-kl")
    kl_horizon: int = opt(10000, "horizon of --adaptive-kl, in answers: each rollout moves kl_coef by at most 0.2 * rollout_batch / horizon")
    # PPO-ptx
    ptx_coef: float = opt(0.0, "gamma of PPO-ptx: weight of the pretraining LM loss in every update (0 = plain PPO)")
    ptx_data: str = opt("", "token-shard directory (from `tinygpt prepare`) for the PPO-ptx batches")
    ptx_batch_size: int = opt(8, "pretraining sequences per PPO-ptx batch, per rank under torchrun")
    ptx_block_size: int = opt(0, "length of each PPO-ptx sequence (0 = the policy's block_size)")
    # bookkeeping
    max_steps: int = opt(200, "rollouts in the whole run")
    log_every: int = opt(1, "rollouts between metrics.jsonl records")
    sample_every: int = opt(10, "rollouts between dumps of sample answers to samples.jsonl (0 = never)")
    sample_count: int = opt(4, "answers written per dump")
    oracle: bool = opt(True, "grade every answer with the world's oracle where the prompt carries task metadata "
                             "(logged next to the RM score; for watching reward hacking, never trained on)")
    eval_prompts: str = opt("", "held-out prompts (same format as --prompts) answered greedily at each evaluation")
    eval_every: int = opt(50, "rollouts between evaluations on --eval-prompts")
    eval_limit: int = opt(64, "evaluate on at most this many prompts")
    score_batch_size: int = opt(32, "answers per reward-model forward pass")
    save_every: int = opt(50, "rollouts between checkpoints (one is always written at the end)")
    keep_last: int = opt(2, "checkpoints kept in OUT/checkpoints")
    seed: int = opt(1337, "seed for prompt order, sampling and minibatch order")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    dtype: str = opt("auto", "autocast dtype: auto, float32 or bfloat16 (weights stay float32)")
    resume: bool = opt(False, "continue from OUT's latest checkpoint exactly; an error if there is none")
    stop_after: int = opt(0, "stop (with a checkpoint) after this many rollouts of this invocation; 0 = run to max_steps")
    progress: bool = opt(True, "show a progress bar")


# --- the adaptive KL coefficient ------------------------------------------------------------


class AdaptiveKLController:
    """Ziegler et al. (2019), section 2.2: ``beta *= 1 + clip(KL / KL_target - 1, -0.2, 0.2) * n / horizon``,
    where ``n`` is the number of answers behind the measured KL. With ``target=None`` beta stays fixed."""

    def __init__(self, init: float, target: float | None, horizon: int):
        if init < 0:
            raise ValueError(f"kl_coef must be >= 0, got {init}")
        if target is not None and (target <= 0 or horizon <= 0):
            raise ValueError(f"adaptive KL needs kl_target > 0 and kl_horizon > 0, got {target}, {horizon}")
        self.value, self.target, self.horizon = float(init), target, horizon

    def update(self, kl: float, n_answers: int) -> None:
        if self.target is None:
            return
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.value *= 1.0 + error * n_answers / self.horizon

    def state_dict(self) -> dict[str, float]:
        return {"value": self.value}

    def load_state_dict(self, state: dict[str, float]) -> None:
        self.value = float(state["value"])


# --- data ---------------------------------------------------------------------------------------


def load_prompts(path: str | Path) -> list[dict[str, Any]]:
    """Read prompt records: ``{"prompt": [messages] | "text", ...}``; a string becomes one user turn.

    Every other field (``family``, ``index``, ``meta``) is kept. Errors name the file and line.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompts file not found: {path}")
    records = []
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from None
            if not isinstance(record, dict) or "prompt" not in record:
                raise ValueError(f"{path}:{lineno}: expected an object with a 'prompt' field "
                                 "(a list of chat messages, or a string)")
            prompt = record["prompt"]
            if isinstance(prompt, str):
                prompt = [{"role": "user", "content": prompt}]
            try:
                validate_messages(prompt)
            except (TypeError, ValueError) as e:
                raise ValueError(f"{path}:{lineno}: field 'prompt': {e}") from None
            if not prompt or prompt[-1]["role"] == "assistant":
                raise ValueError(f"{path}:{lineno}: field 'prompt' must end with a user (or system) turn, "
                                 "the one the policy answers")
            records.append({**record, "prompt": prompt})
    if not records:
        raise ValueError(f"{path}: holds no prompts")
    return records


def _encode_prompts(records: list[dict], tokenizer: Tokenizer, block_size: int, short: int, long: int,
                    source: str) -> list[dict]:
    """Render each prompt with the chat template and give it its answer budget, ``tasks.answer_budget`` of
    its family (``long`` for stories, else ``short``); drop (and report) the prompts that leave no room for it.

    A prompt keeps its whole budget or is dropped, never cut to what it leaves: an answer then does not
    depend on the other prompts of its batch (or rank).
    """
    kept = []
    for record in records:
        ids, _ = tokenizer.render_chat(record["prompt"], add_generation_prompt=True)
        budget = answer_budget(record.get("family") or (record.get("meta") or {}).get("family"), short, long)
        if len(ids) + budget + 1 <= block_size:  # +1: the RM's rendering closes the turn
            kept.append({**record, "ids": ids, "budget": budget})
    if len(kept) < len(records):
        print(f"ppo: {len(records) - len(kept)} of {len(records)} prompts in {source} leave less than their "
              f"answer budget of block_size {block_size} ({short} tokens, {long} for a story, + 1) and are left out")
    if not kept:
        raise ValueError(f"{source}: no prompt leaves room for its answer in block_size {block_size}; "
                         "lower --max-new-tokens (or --long-max-new-tokens)")
    return kept


def _prompt_indices(step: int, rollout_batch: int, n_prompts: int, seed: int) -> list[int]:
    """Prompts of rollout ``step``: a fresh permutation every pass over the set, a pure function of (seed, step)."""
    permutations: dict[int, np.ndarray] = {}
    out = []
    for g in range(step * rollout_batch, (step + 1) * rollout_batch):
        epoch, pos = divmod(g, n_prompts)
        if epoch not in permutations:
            permutations[epoch] = np.random.default_rng([seed, epoch]).permutation(n_prompts)
        out.append(int(permutations[epoch][pos]))
    return out


def _minibatches(lengths: np.ndarray, size: int, rng: np.random.Generator, by_length: bool) -> list[np.ndarray]:
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


def _derived_seed(*parts: int) -> int:
    return int(np.random.default_rng(list(parts)).integers(2**62))


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- forward passes over (prompt, response) batches ----------------------------------------------


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


def _explained_variance(values: Tensor, returns: Tensor, mask: Tensor, reduce=None) -> float:
    """1 - Var(returns - values) / Var(returns) over response tokens (1 = perfect, <= 0 = no better than a constant);
    over every rank's tokens with ``reduce`` (see ``losses.masked_mean``)."""
    def var(x: Tensor) -> Tensor:
        return masked_mean((x - masked_mean(x, mask, reduce)) ** 2, mask, reduce)

    total = var(returns)
    return float(1.0 - var(returns - values) / total) if total > 0 else float("nan")


def _truncate_records(path: Path, last_step: int | None) -> None:
    """Keep only the records of steps <= last_step (None: start the file afresh)."""
    if last_step is None or not path.exists():
        path.write_text("")
        return
    kept = [line for line in path.read_text().splitlines() if line.strip() and _step_of(line) <= last_step]
    path.write_text("".join(line + "\n" for line in kept))


def _step_of(line: str) -> int:
    try:
        return int(json.loads(line).get("step", 0))
    except (json.JSONDecodeError, AttributeError, TypeError, ValueError):
        return 1 << 62  # a torn line from a crash: dropped


def _check_config(cfg: PPOConfig) -> None:
    for name in ("policy", "reward", "prompts"):
        if not getattr(cfg, name):
            raise ValueError(f"--{name} is required")
    if cfg.value_init not in VALUE_INITS:
        raise ValueError(f"--value-init must be one of {VALUE_INITS}, got {cfg.value_init!r}")
    for name in ("rollout_batch", "ppo_epochs", "minibatch_size", "max_steps", "max_new_tokens", "log_every"):
        if getattr(cfg, name) < 1:
            raise ValueError(f"--{name.replace('_', '-')} must be >= 1, got {getattr(cfg, name)}")
    if not cfg.temperature > 0:
        raise ValueError(f"--temperature must be > 0 for PPO (log-probs are taken at that temperature), "
                         f"got {cfg.temperature}")
    if cfg.ptx_coef < 0:
        raise ValueError(f"--ptx-coef must be >= 0, got {cfg.ptx_coef}")
    if cfg.ptx_coef > 0 and not cfg.ptx_data:
        raise ValueError("--ptx-coef > 0 needs --ptx-data (a token-shard directory from `tinygpt prepare`)")
    if not 0 < cfg.clip_ratio or not 0 < cfg.value_clip:
        raise ValueError("--clip-ratio and --value-clip must be > 0")


# --- the stage ----------------------------------------------------------------------------------


def main(cfg: PPOConfig) -> dict[str, Any]:
    # --- setup -----------------------------------------------------------------------------
    _check_config(cfg)
    dist_info, device = runtime.init_distributed(cfg.device)
    rank, world = dist_info.rank, dist_info.world_size
    reduce = runtime.all_reduce_sum if dist_info.enabled else None  # global means over all ranks' answers
    dtype = runtime.resolve_dtype(cfg.dtype, device)
    out = Path(cfg.out)
    runtime.seed_everything(cfg.seed)

    # --- models: policy (trained), reference (frozen), reward (frozen), value (trained) ------
    policy_ckpt = resolve_checkpoint(cfg.policy)
    if (policy_ckpt / "adapter").is_dir():
        raise CheckpointError(f"{policy_ckpt} holds a LoRA adapter; PPO needs a plain model: train SFT with "
                              "--merge-lora true and pass its OUT/merged directory as --policy")
    no_dropout = {"dropout": 0.0}  # dropout would make the PPO ratio noisy and the reference stochastic
    policy, pcfg = load_model(policy_ckpt, device=device, config_overrides=no_dropout)
    reference, _ = load_model(policy_ckpt, device=device, config_overrides=no_dropout)
    reference.requires_grad_(False).eval()
    tokenizer = Tokenizer.from_str(load_tokenizer_json(policy_ckpt))
    reference_info = {"path": str(policy_ckpt), "sha256": _sha256(policy_ckpt / WEIGHTS)}
    reward_ckpt = resolve_checkpoint(cfg.reward)
    reward_info = {"path": str(reward_ckpt), "sha256": _sha256(reward_ckpt / WEIGHTS)}
    reward_model, reward_tokenizer, reward_shift = rm.load_reward_model(reward_ckpt, device)
    reward_model.requires_grad_(False).eval()

    if cfg.value_init == "reward":
        if Tokenizer.from_str(load_tokenizer_json(reward_ckpt)).fingerprint != tokenizer.fingerprint:
            raise ValueError(f"--value-init reward: {reward_ckpt} uses another tokenizer than {policy_ckpt}; "
                             "the value model reads the policy's tokens. Use --value-init sft")
        value_model, vcfg = load_model(reward_ckpt, device=device,
                                       config_overrides={**no_dropout, "scalar_head": True})
        if vcfg.block_size < pcfg.block_size:
            raise ValueError(f"--value-init reward: the reward model's block_size {vcfg.block_size} is shorter "
                             f"than the policy's {pcfg.block_size}; use --value-init sft")
    else:
        value_model, vcfg = load_model(policy_ckpt, device=device, config_overrides={**no_dropout, "scalar_head": True})
    policy.train()
    value_model.train()

    # --- data ------------------------------------------------------------------------------
    budgets = (pcfg.block_size, cfg.max_new_tokens, cfg.long_max_new_tokens or cfg.max_new_tokens)
    prompts = _encode_prompts(load_prompts(cfg.prompts), tokenizer, *budgets, cfg.prompts)
    eval_prompts = (_encode_prompts(load_prompts(cfg.eval_prompts), tokenizer, *budgets, cfg.eval_prompts)
                    [:cfg.eval_limit] if cfg.eval_prompts else [])
    ptx = TokenDataset(cfg.ptx_data, "train") if cfg.ptx_coef > 0 else None
    ptx_block = cfg.ptx_block_size or pcfg.block_size
    if ptx_block > pcfg.block_size:
        raise ValueError(f"--ptx-block-size {ptx_block} exceeds the policy's block_size {pcfg.block_size}")
    stop_ids = {tokenizer.end_id, tokenizer.eos_id}
    labeler = Labeler(noise=0.0) if cfg.oracle else None

    def gradeable(record: dict) -> bool:
        meta = record.get("meta")
        return labeler is not None and isinstance(meta, dict) and meta.get("family") in FAMILIES

    # --- optimizers, adaptive KL, (resume) ----------------------------------------------------
    betas = (cfg.beta1, cfg.beta2)
    policy_opt = make_optimizer(policy, lr=cfg.lr, weight_decay=cfg.weight_decay, betas=betas)
    value_lr = cfg.value_lr if cfg.value_lr is not None else cfg.lr
    value_opt = make_optimizer(value_model, lr=value_lr, weight_decay=cfg.weight_decay, betas=betas)
    kl_ctl = AdaptiveKLController(cfg.kl_coef, cfg.kl_target if cfg.adaptive_kl else None, cfg.kl_horizon)

    start_step = 0
    if cfg.resume:
        ckpt = latest_checkpoint(out)
        if ckpt is None:
            raise CheckpointError(f"--resume: no checkpoint in {out / 'checkpoints'}; run without --resume")
        state = load_trainer_state(ckpt)
        if state["reference"]["sha256"] != reference_info["sha256"]:
            raise CheckpointError(f"--resume: the reference {policy_ckpt} has changed since this run started "
                                  f"(sha256 {reference_info['sha256'][:12]}, run recorded "
                                  f"{state['reference']['sha256'][:12]}); pass the original --policy")
        load_weights(policy, ckpt, device=device)
        value_model.load_state_dict(state["value_model"])
        policy_opt.load_state_dict(state["policy_optimizer"])
        value_opt.load_state_dict(state["value_optimizer"])
        kl_ctl.load_state_dict(state["kl_controller"])
        restore_rng_state(state["rng"])
        start_step = int(state["step"])
    metrics = MetricsWriter(out, resume_step=start_step if cfg.resume else None, enabled=dist_info.is_main)
    samples_path = out / "samples.jsonl"
    if dist_info.is_main:
        save_config(cfg, out / "resolved_config.json")
        _truncate_records(samples_path, start_step if cfg.resume else None)
        print(f"ppo: policy {policy.num_params() / 1e6:.2f}M params from {policy_ckpt}, value model from "
              f"{cfg.value_init} ({value_model.num_params() / 1e6:.2f}M), {len(prompts)} prompts, "
              f"{cfg.rollout_batch * world} answers/rollout ({world} rank(s)), device {device}, "
              f"compute {str(dtype).replace('torch.', '')}"
              + (f", PPO-ptx coef {cfg.ptx_coef} on {cfg.ptx_data}" if ptx is not None else ""))

    def save(step: int, extra: dict[str, Any]) -> Path | None:
        """Rank 0 writes the checkpoint (every rank holds the same weights); the others wait for it."""
        if not dist_info.is_main:
            runtime.barrier()
            return None
        state = {"step": step, "policy_optimizer": policy_opt.state_dict(),
                 "value_optimizer": value_opt.state_dict(), "value_model": value_model.state_dict(),
                 "value_config": vcfg.to_dict(), "kl_controller": kl_ctl.state_dict(), "rng": capture_rng_state(),
                 "reference": reference_info, "reward": reward_info, "config": to_jsonable(cfg)}
        path = save_training_checkpoint(out, step, keep_last=cfg.keep_last, model=policy, model_config=pcfg,
                                        tokenizer_json=tokenizer.to_str(), trainer_state=state,
                                        meta={"stage": "ppo", "step": step, "reference": reference_info,
                                              "reward": reward_info, **extra})
        runtime.barrier()
        return path

    def sample_answers(records: list[dict], temperature: float, row_seeds: list[int] | None = None) -> list[list[int]]:
        """Each record's answer within its budget; records of one budget are sampled together, so the
        short answers do not wait for the stories (with ``row_seeds`` the grouping changes no answer)."""
        answers: list[list[int]] = [[] for _ in records]
        for budget in sorted({r["budget"] for r in records}):
            group = [i for i, r in enumerate(records) if r["budget"] == budget]
            # the stop token stays in the answer (a plain predicate trims nothing): ending is an action too
            got = generate(policy, [records[i]["ids"] for i in group],
                           SamplingConfig(temperature=temperature, max_new_tokens=budget),
                           should_stop=lambda new: new[-1] in stop_ids,
                           row_seeds=[row_seeds[i] for i in group] if row_seeds is not None else None)
            for i, answer in zip(group, got):
                answers[i] = answer
        return answers

    def answer_body(response: list[int]) -> list[int]:
        """The answer's tokens without the stop token it ended on."""
        return response[:-1] if response and response[-1] in stop_ids else response

    def answer_text(response: list[int]) -> str:
        return tokenizer.decode(answer_body(response))

    same_tokenizer = reward_tokenizer.fingerprint == tokenizer.fingerprint
    reward_block = reward_model.cfg.block_size

    def rm_sequence(record: dict, response: list[int], text: str) -> list[int]:
        """What the RM reads: the prompt and the answer's text, rendered as in the comparison data."""
        ids = rm.render_prompt_response(reward_tokenizer, record["prompt"], text)
        if len(ids) <= reward_block:
            return ids
        # Re-encoding sampled text can take more tokens than were sampled (a split the tokenizer would
        # not make, or bytes that are not UTF-8). The sampled ids themselves fit, by the answer budget.
        if same_tokenizer:
            return record["ids"] + answer_body(response) + [reward_tokenizer.end_id]
        return ids[-reward_block:]  # another tokenizer: the start of the prompt gives way

    def rm_scores(records: list[dict], responses: list[list[int]], texts: list[str]) -> Tensor:
        sequences = [rm_sequence(r, a, t) for r, a, t in zip(records, responses, texts)]
        with torch.no_grad(), runtime.autocast(device, dtype):
            return rm.score(reward_model, sequences, device, shift=reward_shift,
                                 batch_size=cfg.score_batch_size).float().clone().to(device)  # (B,)

    def oracle_scores(records: list[dict], texts: list[str]) -> list[dict | None]:
        return [labeler.scores(r["meta"], t) if gradeable(r) else None for r, t in zip(records, texts)]

    def evaluate(step: int) -> dict[str, Any]:
        responses = sample_answers(eval_prompts, temperature=0.0)
        texts = [answer_text(r) for r in responses]
        scores = rm_scores(eval_prompts, responses, texts)
        record: dict[str, Any] = {"step": step, "eval_reward": float(scores.mean()),
                                  "eval_response_len": float(np.mean([len(r) for r in responses]))}
        graded = [g for g in oracle_scores(eval_prompts, texts) if g is not None]
        if graded:
            record["eval_oracle_helpful"] = float(np.mean([g["helpful"] for g in graded]))
            record["eval_oracle_utility"] = float(np.mean([g["utility"] for g in graded]))
            record["eval_rude"] = float(np.mean([g["harmless"] == 0 for g in graded]))
        return record

    # --- loop ------------------------------------------------------------------------------
    end_step = cfg.max_steps if cfg.stop_after <= 0 else min(cfg.max_steps, start_step + cfg.stop_after)
    bar = tqdm(total=cfg.max_steps, initial=start_step, desc="ppo", unit="rollout", dynamic_ncols=True,
               disable=not (cfg.progress and dist_info.is_main))

    def global_mean(x: Tensor, mask: Tensor | None = None) -> float:
        """Mean over every rank's rows (or masked tokens) together."""
        return float(masked_mean(x, mask, reduce))
    last: dict[str, Any] = {}
    step = start_step
    samples_file = open(samples_path, "a", encoding="utf-8") if dist_info.is_main else None
    try:
        interrupted = False
        with runtime.GracefulStop() as stop:
            while step < end_step:
                t0 = time.perf_counter()
                lr = lr_at(step, max_lr=cfg.lr, min_lr=cfg.lr, warmup_steps=cfg.warmup_steps, total_steps=cfg.max_steps)
                set_lr(policy_opt, lr)
                set_lr(value_opt, lr_at(step, max_lr=value_lr, min_lr=value_lr, warmup_steps=cfg.warmup_steps,
                                        total_steps=cfg.max_steps))
                kl_coef = kl_ctl.value

                # --- rollout: sample, score, evaluate log-probs and values ---------------------
                # this rank's rows of the step's global batch; each answer's sampling seed is its global row's
                global_rows = range(rank * cfg.rollout_batch, (rank + 1) * cfg.rollout_batch)
                indices = _prompt_indices(step, cfg.rollout_batch * world, len(prompts), cfg.seed)
                records = [prompts[indices[g]] for g in global_rows]
                row_seeds = [_derived_seed(cfg.seed, step, 1, g) for g in global_rows]
                with runtime.autocast(device, dtype):
                    responses = sample_answers(records, cfg.temperature, row_seeds)
                texts = [answer_text(r) for r in responses]
                scores = rm_scores(records, responses, texts)  # (B,)
                batch = make_batch([r["ids"] for r in records], responses, tokenizer.pad_id, device)
                mask = batch.mask  # (B, R)
                lengths = np.array([len(r) for r in responses])
                old_logprobs, ref_logprobs, old_values, entropies = (torch.zeros_like(mask) for _ in range(4))  # (B, R)
                policy.eval()
                value_model.eval()
                # in chunks of answers of similar length, each cut after its longest answer (Batch.rows)
                by_length = np.argsort(-lengths, kind="stable")
                with torch.no_grad(), runtime.autocast(device, dtype):
                    for first in range(0, len(by_length), cfg.minibatch_size):
                        rows = torch.as_tensor(by_length[first:first + cfg.minibatch_size], device=device)
                        part = batch.rows(rows)
                        cut = slice(0, part.width)
                        logits = response_logits(policy, part, cfg.temperature)  # (b, r, V)
                        old_logprobs[rows, cut] = token_logprobs(logits, part.responses)
                        entropies[rows, cut] = token_entropy(logits)
                        del logits
                        ref_logprobs[rows, cut] = token_logprobs(response_logits(reference, part, cfg.temperature),
                                                                 part.responses)
                        old_values[rows, cut] = response_values(value_model, part) * part.mask
                    entropy = global_mean(entropies, mask)
                policy.train()
                value_model.train()
                with torch.no_grad():
                    kl_tokens = kl_penalty(old_logprobs, ref_logprobs, kind=cfg.kl_estimator) * mask  # (B, R)
                    token_rewards = -kl_coef * kl_tokens  # (B, R)
                    last_token = mask.sum(1).long() - 1  # (B,) index of each answer's last token
                    token_rewards[torch.arange(len(records), device=device), last_token] += scores
                    if cfg.whiten_rewards:
                        token_rewards = whiten(token_rewards, mask, shift_mean=False, reduce=reduce)
                    advantages, returns = gae(token_rewards, old_values, mask, cfg.gamma, cfg.lam)  # (B, R) each
                    advantages = whiten(advantages, mask, reduce=reduce)
                kl_per_answer = kl_tokens.sum(1)  # (B,)

                # --- PPO epochs over shuffled minibatches ----------------------------------
                sums: dict[str, float] = {}
                n_updates = 0
                n = len(records)
                for epoch in range(cfg.ppo_epochs):
                    rng = np.random.default_rng([cfg.seed, step, epoch, 2, rank])  # this rank's rows
                    for minibatch in _minibatches(lengths, cfg.minibatch_size, rng, cfg.group_by_length):
                        rows = torch.as_tensor(minibatch, device=device)
                        mb = batch.rows(rows)
                        # this rank's share of the global minibatch's tokens (x world: ranks are averaged)
                        weight = 1.0
                        if reduce is not None:
                            tokens = mb.mask.sum()
                            weight = tokens * world / reduce(tokens)
                        with runtime.autocast(device, dtype):
                            logprobs = token_logprobs(response_logits(policy, mb, cfg.temperature), mb.responses)
                            values = response_values(value_model, mb)  # (b, R)
                            cut = slice(0, mb.width)  # the rollout's tensors, cut like the minibatch
                            losses = ppo_losses(logprobs, old_logprobs[rows, cut], advantages[rows, cut], values,
                                                old_values[rows, cut], returns[rows, cut], mb.mask, cfg.clip_ratio,
                                                cfg.value_clip)
                            losses = {k: v * weight for k, v in losses.items()}  # all token means
                            loss = losses["policy_loss"] + losses["value_loss"]  # separate models: no vf_coef
                            if ptx is not None:
                                x, y = ptx.batch(step * cfg.ppo_epochs * math.ceil(n / cfg.minibatch_size) + n_updates,
                                                 cfg.ptx_batch_size, ptx_block, seed=cfg.seed, rank=rank,
                                                 world_size=world)
                                ptx_loss = lm_loss(policy(x.to(device)), y.to(device))
                                loss = loss + cfg.ptx_coef * ptx_loss
                                losses = {**losses, "ptx_loss": ptx_loss}
                        loss_value = float(runtime.all_reduce_mean(loss.detach()))  # every rank sees a NaN
                        if not math.isfinite(loss_value):
                            raise TrainingDiverged(
                                f"ppo step {step}: loss {loss_value} ({ {k: float(v.detach()) for k, v in losses.items()} }). "
                                f"No checkpoint was written for this step; the last good one is "
                                f"{latest_checkpoint(out)}. Try a lower --lr (now {cfg.lr}), a larger --kl-coef, "
                                f"or --dtype float32.")
                        loss.backward()
                        runtime.average_gradients(policy)
                        runtime.average_gradients(value_model)
                        if cfg.grad_clip > 0:
                            torch.nn.utils.clip_grad_norm_(policy.parameters(), cfg.grad_clip)
                            torch.nn.utils.clip_grad_norm_(value_model.parameters(), cfg.grad_clip)
                        policy_opt.step()
                        value_opt.step()
                        policy_opt.zero_grad(set_to_none=True)
                        value_opt.zero_grad(set_to_none=True)
                        for k, v in losses.items():
                            sums[k] = sums.get(k, 0.0) + float(v.detach())
                        n_updates += 1

                mean_kl = global_mean(kl_per_answer)
                kl_ctl.update(mean_kl, n * world)
                step += 1
                bar.update(1)

                # --- logs, samples, evaluation, checkpoint --------------------------------------
                graded = oracle_scores(records, texts) if labeler is not None else []
                if step % cfg.log_every == 0 or step == end_step:
                    reward = global_mean(scores)
                    ended = torch.tensor([bool(r) and r[-1] in stop_ids for r in responses], dtype=torch.float32)
                    record: dict[str, Any] = {
                        "step": step, "reward": reward, "reward_std": math.sqrt(global_mean((scores - reward) ** 2)),
                        "total_reward": global_mean(scores - kl_coef * kl_per_answer),  # before any whitening
                        "kl": mean_kl, "kl_coef": kl_coef, "entropy": entropy,
                        **{k: float(runtime.all_reduce_mean(torch.tensor(v / max(n_updates, 1), device=device)))
                           for k, v in sums.items()},
                        "explained_var": _explained_variance(old_values, returns, mask, reduce),
                        "value_mean": global_mean(old_values, mask),
                        "response_len": global_mean(mask.sum(1)),
                        "ended": global_mean(ended.to(device)),
                        "lr": lr, "seconds": round(time.perf_counter() - t0, 3)}
                    # the oracle grades only prompts that carry task metadata: a mean over the graded ones
                    done = torch.tensor([[g["helpful"], g["utility"], float(g["harmless"] == 0)]
                                         for g in graded if g is not None], dtype=torch.float32).reshape(-1, 3)
                    sums_graded = done.sum(0).to(device)  # (3,)
                    count = torch.tensor(float(len(done)), device=device)
                    if reduce is not None:
                        sums_graded, count = reduce(sums_graded), reduce(count)
                    if count > 0:
                        helpful, utility, rude = (sums_graded / count).tolist()
                        record.update({"oracle_helpful": helpful, "oracle_utility": utility, "rude": rude})
                    metrics.log(record)
                    last = record
                    bar.set_postfix(reward=f"{record['reward']:.3f}", kl=f"{mean_kl:.3f}",
                                    len=f"{record['response_len']:.1f}")
                if samples_file is not None and cfg.sample_every > 0 and (step % cfg.sample_every == 0
                                                                         or step == end_step):
                    for i in range(min(cfg.sample_count, n)):
                        entry = {"step": step, "prompt": records[i]["prompt"], "response": texts[i],
                                 "reward": float(scores[i]), "kl": float(kl_per_answer[i]),
                                 "length": len(responses[i]),
                                 "ended": bool(responses[i]) and responses[i][-1] in stop_ids}
                        if graded and graded[i] is not None:
                            entry["oracle"] = graded[i]
                        samples_file.write(json.dumps(entry, ensure_ascii=False) + "\n")
                    samples_file.flush()
                if eval_prompts and dist_info.is_main and (step % cfg.eval_every == 0 or step == cfg.max_steps):
                    result = evaluate(step)
                    metrics.log(result)
                    last.update({k: v for k, v in result.items() if k != "step"})
                    bar.write("step {}: ".format(step) + ", ".join(f"{k} {v:.3f}" for k, v in result.items()
                                                                  if k != "step"))
                if step % cfg.save_every == 0 and step != end_step:
                    save(step, {"reward": last.get("reward"), "kl": last.get("kl")})
                if runtime.all_reduce_mean(torch.tensor(float(stop.stop), device=device)).item() > 0:
                    if dist_info.is_main:
                        bar.write(f"interrupted: saving step {step} (resume with --resume)")
                    interrupted = True
                    break
    finally:
        if samples_file is not None:
            samples_file.close()
        bar.close()

    # --- save ------------------------------------------------------------------------------
    ckpt = save(step, {k: v for k, v in last.items() if k != "step"})
    metrics.close()
    if dist_info.is_main:
        recs = read_metrics(out / "metrics.jsonl")
        plot_curves(recs, ["reward", "total_reward", "oracle_utility", "eval_reward"], out / "reward.png",
                    title="PPO reward (RM score) and the oracle's utility")
        plot_curves(recs, ["kl"], out / "kl.png", title="KL(policy || SFT) per answer, nats")
        print(f"ppo: step {step}/{cfg.max_steps}, checkpoint {ckpt}")
    runtime.cleanup_distributed()
    return {"interrupted": interrupted, "step": step, "checkpoint": str(ckpt), **{k: v for k, v in last.items() if k != "step"}}
