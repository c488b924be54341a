"""Sampling from a ``GPT`` on token ids: batching, KV cache, temperature / top-k / top-p, repetition penalty,
EOS, stop token sequences, stop predicates (stop strings), logits processors and streaming.

Prompts of different lengths are left-padded into one batch with an attention mask; positions count real
tokens only, so a prompt gives the same tokens alone or in a batch. The filters are small pure functions
on a (B, V) logits tensor.

This module works on token ids only: it knows nothing about text, tokenizers or chat templates. Stop
*strings* come in through ``stop_strings(decode_fn, strings)``, which wraps whatever ``decode_fn`` the
caller gives it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from tinygpt.config import opt
from tinygpt.model import GPT

# A logits processor sees the next-token logits (B, V) and each row's ids so far (prompt + new), returns logits.
LogitsProcessor = Callable[[Tensor, list[list[int]]], Tensor]


@dataclass
class SamplingConfig:
    temperature: float = opt(1.0, "softmax temperature; 0 = greedy (argmax, deterministic)")
    top_k: int = opt(0, "keep only the k most likely tokens (0 = off)")
    top_p: float = opt(1.0, "nucleus sampling: keep the smallest set of tokens whose probability reaches p (1 = off)")
    repetition_penalty: float = opt(1.0, "CTRL penalty on tokens already in the prompt or output (1 = off, >1 discourages)")
    max_new_tokens: int = opt(128, "most tokens to generate per prompt")
    seed: int | None = opt(None, "seed of the sampling generator (None = torch's global RNG)")

    def __post_init__(self) -> None:
        if not self.temperature >= 0:  # written so that NaN fails too
            raise ValueError(f"temperature must be a number >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")
        if not self.repetition_penalty > 0:
            raise ValueError(f"repetition_penalty must be a number > 0, got {self.repetition_penalty}")
        if self.max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be >= 0, got {self.max_new_tokens}")


# --- pure logits filters, (B, V) -> (B, V) ---

def top_k_filter(logits: Tensor, k: int) -> Tensor:
    """Set every logit below the k-th largest of its row to -inf (ties with the k-th survive)."""
    if k <= 0 or k >= logits.size(-1):
        return logits
    kth = torch.topk(logits, k, dim=-1).values[..., -1:]  # (B, 1)
    return logits.masked_fill(logits < kth, float("-inf"))


def top_p_filter(logits: Tensor, p: float) -> Tensor:
    """Keep the smallest set of most likely tokens whose total probability reaches p (at least one token)."""
    if p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)  # (B, V)
    probs = sorted_logits.softmax(dim=-1)
    mass_before = probs.cumsum(dim=-1) - probs  # probability of the strictly more likely tokens
    drop_sorted = mass_before >= p               # the token that crosses p is kept
    drop_sorted[..., 0] = False                  # and the most likely one always (p as small as 5e-324 kept none)
    drop = drop_sorted.scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def repetition_penalty_filter(logits: Tensor, seen: Tensor, penalty: float) -> Tensor:
    """CTRL (Keskar et al. 2019): for tokens already seen (bool (B, V)), divide positive logits by
    ``penalty`` and multiply negative ones by it."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def sample_next(logits: Tensor, cfg: SamplingConfig, generator: torch.Generator | Sequence[torch.Generator] | None = None,
                seen: Tensor | None = None) -> Tensor:
    """Next-token logits (B, V) -> token ids (B,).

    ``generator`` is one generator for the batch, or one per row: then each row draws from its own
    stream, so its sample does not depend on which other rows share the batch."""
    logits = logits.float()
    if seen is not None:
        logits = repetition_penalty_filter(logits, seen, cfg.repetition_penalty)
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    # shifted so the best logit is 0: a temperature as small as 1e-300 then sends the others to -inf, not inf/NaN
    # (and at least float32's smallest normal number: 1e-300 itself is 0 in float32)
    scaled = (logits - logits.amax(dim=-1, keepdim=True)) / max(cfg.temperature, torch.finfo(torch.float32).tiny)
    probs = top_p_filter(top_k_filter(scaled, cfg.top_k), cfg.top_p).softmax(dim=-1)  # (B, V)
    if generator is None or isinstance(generator, torch.Generator):
        return torch.multinomial(probs, 1, generator=generator).squeeze(-1)  # (B,)
    if len(generator) != probs.shape[0]:
        raise ValueError(f"one generator per row: got {len(generator)} for {probs.shape[0]} rows")
    return torch.cat([torch.multinomial(row, 1, generator=g) for row, g in zip(probs, generator)])  # (B,)


# --- stop strings: a should_stop predicate built from the caller's decode function ---

class StopStrings:
    """``should_stop`` for :func:`generate`: true once the decoded new tokens contain one of ``strings``.

    ``tokens_to_trim(new_ids)`` says how many trailing tokens to drop so that no part of the stop string
    is left. Text before the stop string inside the same token goes too; a caller that needs the exact
    text cuts the decoded string at the stop string instead.
    """

    def __init__(self, decode: Callable[[list[int]], str], strings: Sequence[str]):
        if isinstance(strings, str) or not all(isinstance(s, str) and s for s in strings):
            raise ValueError(f"stop strings must be a sequence of non-empty strings, got {strings!r}")
        self.decode, self.strings = decode, tuple(strings)
        # every token is at least one byte, so a stop string spans at most len(its bytes) tokens
        self.max_trim = max((len(s.encode()) for s in self.strings), default=0)

    def __call__(self, new_ids: list[int]) -> bool:
        # the string ends in the newest token (earlier steps found nothing), so a short tail suffices
        tail = self.decode(new_ids[-(self.max_trim + 1):])
        return any(s in tail for s in self.strings)

    def tokens_to_trim(self, new_ids: list[int]) -> int:
        text = self.decode(new_ids)
        start = min((i for i in (text.find(s) for s in self.strings) if i >= 0), default=len(text))
        keep = len(new_ids)
        while keep > 0 and len(self.decode(new_ids[:keep])) > start:
            keep -= 1
        return len(new_ids) - keep


def stop_strings(decode_fn: Callable[[list[int]], str], strings: Sequence[str]) -> StopStrings:
    """A ``should_stop`` predicate that stops at any of ``strings`` and trims it (see :class:`StopStrings`)."""
    return StopStrings(decode_fn, strings)


# --- decoding ---

def _decode_steps(model: GPT, prompts: list[list[int]], cfg: SamplingConfig, eos_id: int | None,
                  stop_sequences: Sequence[Sequence[int]], should_stop: Callable[[list[int]], bool] | None,
                  logits_processors: Sequence[LogitsProcessor],
                  row_seeds: Sequence[int] | None = None) -> Iterator[list[list[int]]]:
    """Yield every row's new tokens after each step; a finished row is final (stop tokens trimmed)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generate needs at least one prompt, and every prompt at least one token")
    stops = [list(s) for s in stop_sequences]
    if any(len(s) == 0 for s in stops):
        raise ValueError("stop sequences must be non-empty")
    B, device = len(prompts), model.tok_emb.weight.device
    longest = max(len(p) for p in prompts)
    total = longest + cfg.max_new_tokens
    if total > model.cfg.block_size:
        raise ValueError(f"longest prompt ({longest}) + max_new_tokens ({cfg.max_new_tokens}) = {total} "
                         f"exceeds the model's block_size ({model.cfg.block_size}); shorten the prompt")
    outputs: list[list[int]] = [[] for _ in range(B)]
    if cfg.max_new_tokens == 0:
        yield outputs
        return

    # left-pad the prompts into (B, longest); the mask covers the new tokens too
    idx = torch.zeros(B, longest, dtype=torch.long)
    mask = torch.ones(B, total, dtype=torch.long)
    for row, p in enumerate(prompts):
        idx[row, longest - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[row, :longest - len(p)] = 0
    idx, mask = idx.to(device), mask.to(device)
    padded = any(len(p) != longest for p in prompts)
    generator: torch.Generator | list[torch.Generator] | None = None
    if row_seeds is not None:
        if len(row_seeds) != B:
            raise ValueError(f"row_seeds: one seed per prompt, got {len(row_seeds)} for {B} prompts")
        generator = [torch.Generator(device).manual_seed(int(s)) for s in row_seeds]
    elif cfg.seed is not None:
        generator = torch.Generator(device).manual_seed(cfg.seed)
    seen = None
    if cfg.repetition_penalty != 1.0:
        seen = torch.zeros(B, model.cfg.vocab_size, dtype=torch.bool, device=device)
        for row, p in enumerate(prompts):
            seen[row, p] = True

    was_training = model.training
    model.eval()
    cache = model.new_cache(B, total)
    finished = [False] * B
    try:
        with torch.inference_mode():
            logits = model(idx, attention_mask=mask[:, :longest] if padded else None, cache=cache)[:, -1]  # (B, V)
        for step in range(cfg.max_new_tokens):
            with torch.inference_mode():
                for proc in logits_processors:
                    logits = proc(logits, [p + o for p, o in zip(prompts, outputs)])
                next_ids = sample_next(logits, cfg, generator, seen)  # (B,)
            for row, tok in enumerate(next_ids.tolist()):
                if finished[row]:
                    continue
                if tok == eos_id:
                    finished[row] = True
                    continue
                out = outputs[row]
                out.append(tok)
                trim = next((len(s) for s in stops if out[-len(s):] == s), None)
                if trim is None and should_stop is not None and should_stop(out):
                    trim = should_stop.tokens_to_trim(out) if hasattr(should_stop, "tokens_to_trim") else 0
                if trim is not None:
                    del out[len(out) - trim:]
                    finished[row] = True
            yield outputs
            if all(finished) or step == cfg.max_new_tokens - 1:
                return
            with torch.inference_mode():
                if seen is not None:
                    seen[torch.arange(B, device=device), next_ids] = True
                step_mask = mask[:, :longest + step + 1] if padded else None
                logits = model(next_ids[:, None], attention_mask=step_mask, cache=cache)[:, -1]  # (B, V)
    finally:
        model.train(was_training)


def generate(model: GPT, prompts: list[list[int]], cfg: SamplingConfig, *, eos_id: int | None = None,
             stop_sequences: Sequence[Sequence[int]] = (), should_stop: Callable[[list[int]], bool] | None = None,
             logits_processors: Sequence[LogitsProcessor] = (), row_seeds: Sequence[int] | None = None) -> list[list[int]]:
    """Sample up to ``cfg.max_new_tokens`` after each prompt; return only the new tokens of each.

    ``row_seeds`` (one per prompt, overriding ``cfg.seed``) gives every row its own generator: a row's
    answer then depends only on its prompt and its seed, not on the batch it was sampled in. PPO uses
    it so that a rollout is the same in one process and split over ``torchrun`` ranks.

    A row stops at ``eos_id`` (not included), at any of ``stop_sequences`` (not included), or when
    ``should_stop(new_ids)`` is true; if ``should_stop`` has a ``tokens_to_trim(new_ids) -> int`` method
    (as :func:`stop_strings` gives) that many trailing tokens are dropped.
    """
    outputs: list[list[int]] = []
    for outputs in _decode_steps(model, prompts, cfg, eos_id, stop_sequences, should_stop, logits_processors,
                                 row_seeds):
        pass
    return [list(o) for o in outputs]


def stream(model: GPT, prompt: list[int], cfg: SamplingConfig, *, eos_id: int | None = None,
           stop_sequences: Sequence[Sequence[int]] = (), should_stop: Callable[[list[int]], bool] | None = None,
           logits_processors: Sequence[LogitsProcessor] = ()) -> Iterator[int]:
    """Yield the new tokens of one prompt as they come; the same tokens :func:`generate` returns.

    Tokens that could still turn out to be part of a stop sequence or stop string are held back
    until that is decided, so nothing yielded is ever taken back.
    """
    holdback = max([len(s) for s in stop_sequences] + [getattr(should_stop, "max_trim", 0), 1]) - 1
    emitted, out = 0, []
    for outputs in _decode_steps(model, [prompt], cfg, eos_id, stop_sequences, should_stop, logits_processors):
        out = outputs[0]
        ready = len(out) - holdback
        while emitted < ready:
            yield out[emitted]
            emitted += 1
    yield from out[emitted:]
