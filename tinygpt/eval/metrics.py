"""Evaluation metrics: pass@k, perplexity, corpus BLEU and win rate.

* :func:`pass_at_k`: the unbiased estimator of Chen et al. 2021 (Codex, https://arxiv.org/abs/2107.03374):
  with ``n`` samples of which ``c`` are correct, ``1 - C(n - c, k) / C(n, k)``, computed as the
  numerically stable product ``1 - prod_{i = n-c+1}^{n} (1 - k / i)``.
* :func:`perplexity`: mean next-token cross-entropy over a token split's non-overlapping windows
  (weighted by tokens), and its exponential.
* :func:`bleu`: corpus BLEU with ``sacrebleu`` (its default 13a tokenizer, one reference per hypothesis).
* :func:`win_rate`: the share of comparisons a candidate wins against a baseline, ties counted half,
  from any per-item scores (labeler utilities, reward-model scores), with the W/L/T counts, a 95%
  interval, and the share of the decided comparisons won (Wilson interval, :func:`wilson_interval`).

It knows no checkpoints, files or stages: numbers, strings, a model and a dataset in.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from tinygpt import runtime
from tinygpt.data.shards import TokenDataset
from tinygpt.losses import lm_loss


def pass_at_k(n: int, c: int, k: int) -> float:
    """Probability that at least one of ``k`` samples drawn without replacement from ``n`` (``c`` correct)
    is correct: ``1 - C(n-c, k) / C(n, k)``, as the product form of the Codex paper (no huge binomials)."""
    for name, value in (("n", n), ("c", c), ("k", k)):
        if not isinstance(value, (int, np.integer)) or isinstance(value, bool):
            raise TypeError(f"pass_at_k: {name} must be an int, got {value!r}")
    if n < 1 or k < 1:
        raise ValueError(f"pass_at_k: need n >= 1 and k >= 1, got n={n}, k={k}")
    if not 0 <= c <= n:
        raise ValueError(f"pass_at_k: need 0 <= c <= n, got c={c}, n={n}")
    if k > n:
        raise ValueError(f"pass_at_k: k={k} exceeds the number of samples n={n}")
    if n - c < k:  # every draw of k samples contains a correct one
        return 1.0
    return float(1.0 - np.prod(1.0 - k / np.arange(n - c + 1, n + 1)))


def mean_pass_at_k(samples_correct: Sequence[Sequence[bool]], k: int) -> float:
    """Mean of :func:`pass_at_k` over problems, each given as its samples' correctness."""
    if not samples_correct:
        raise ValueError("mean_pass_at_k: no problems")
    return float(np.mean([pass_at_k(len(s), int(sum(map(bool, s))), k) for s in samples_correct]))


@torch.no_grad()
def perplexity(model: torch.nn.Module, dataset: TokenDataset, *, block_size: int | None = None,
               batch_size: int = 16, max_batches: int | None = None, device: str | torch.device = "cpu",
               dtype: torch.dtype = torch.float32, progress: bool = False) -> dict[str, Any]:
    """Validation loss (nats per token, token-weighted) over non-overlapping windows, and its exp.

    ``block_size`` defaults to the model's context. Returns ``{"loss", "perplexity", "tokens"}``.
    """
    from tqdm.auto import tqdm

    block = block_size or model.cfg.block_size
    if block > model.cfg.block_size:
        raise ValueError(f"perplexity: block_size {block} exceeds the model's context {model.cfg.block_size}")
    device = torch.device(device)
    was_training = model.training
    model.eval()
    total_nats, total_tokens = 0.0, 0
    n_windows = dataset.num_windows(block)
    n_batches = math.ceil(n_windows / batch_size)
    if max_batches is not None:
        n_batches = min(n_batches, max_batches)
    try:
        with runtime.autocast(device, dtype):
            batches = dataset.eval_batches(batch_size, block, max_batches=max_batches)
            for x, y in tqdm(batches, total=n_batches, desc="perplexity", unit="batch", disable=not progress,
                             leave=False):
                x, y = x.to(device), y.to(device)  # (B, T) each
                tokens = y.numel()
                total_nats += lm_loss(model(x), y).item() * tokens
                total_tokens += tokens
    finally:
        model.train(was_training)
    if total_tokens == 0:
        raise ValueError(f"perplexity: {dataset.path} gave no windows of {block} tokens")
    loss = total_nats / total_tokens
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": total_tokens}


def bleu(hypotheses: Sequence[str], references: Sequence[str]) -> float:
    """Corpus BLEU (0-100) of hypotheses against one reference each, with sacrebleu's defaults."""
    try:
        import sacrebleu
    except ImportError:
        raise ImportError("bleu needs sacrebleu: pip install 'tinygpt[eval]' (or pip install sacrebleu)") from None
    hypotheses, references = list(hypotheses), list(references)
    if len(hypotheses) != len(references):
        raise ValueError(f"bleu: {len(hypotheses)} hypotheses but {len(references)} references")
    if not hypotheses:
        raise ValueError("bleu: no hypotheses")
    for what, texts in (("hypothesis", hypotheses), ("reference", references)):
        for i, t in enumerate(texts):
            if not isinstance(t, str):
                raise TypeError(f"bleu: {what} {i} is {type(t).__name__}, expected str")
    return float(sacrebleu.corpus_bleu(hypotheses, [references]).score)


def win_rate(candidate_scores: Sequence[float], baseline_scores: Sequence[float], *,
             tie_tolerance: float = 0.0) -> dict[str, float]:
    """Pairwise comparison item by item: a win when the candidate's score beats the baseline's by more
    than ``tie_tolerance``, a tie within it (counted half). Returns win_rate, wins, ties, losses, n."""
    cand, base = list(map(float, candidate_scores)), list(map(float, baseline_scores))
    if len(cand) != len(base):
        raise ValueError(f"win_rate: {len(cand)} candidate scores but {len(base)} baseline scores")
    if not cand:
        raise ValueError("win_rate: no comparisons")
    if tie_tolerance < 0:
        raise ValueError(f"win_rate: tie_tolerance must be >= 0, got {tie_tolerance}")
    if not all(math.isfinite(s) for s in cand + base):
        raise ValueError("win_rate: scores must be finite numbers")
    wins = sum(c - b > tie_tolerance for c, b in zip(cand, base))
    losses = sum(b - c > tie_tolerance for c, b in zip(cand, base))
    ties = len(cand) - wins - losses
    n = len(cand)
    rate = (wins + 0.5 * ties) / n
    # 95% intervals: the tie-half rate is a mean of per-comparison scores in {0, 1/2, 1} (normal
    # approximation, its sample variance); the decided-only share is binomial (Wilson). Several answers
    # to one question are not independent, so with repeated items both are a little too narrow.
    var = (wins * (1 - rate) ** 2 + ties * (0.5 - rate) ** 2 + losses * rate ** 2) / max(n - 1, 1)
    half = Z95 * math.sqrt(var / n)
    decided = wins + losses
    return {"win_rate": rate, "wins": wins, "ties": ties, "losses": losses, "n": n,
            "ci95": [max(0.0, rate - half), min(1.0, rate + half)],
            "decided_win_rate": wins / decided if decided else None,
            "decided_ci95": wilson_interval(wins, decided) if decided else None}


Z95 = 1.959963984540054


def wilson_interval(successes: float, n: int, z: float = Z95) -> list[float]:
    """Wilson's score interval for a binomial share (95% by default): better than the normal
    approximation near 0 and 1 and for small ``n``. ``successes`` may count a tie as 1/2."""
    if n < 1 or not 0 <= successes <= n:
        raise ValueError(f"wilson_interval: need 0 <= successes <= n and n >= 1, got {successes}, {n}")
    p = successes / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return [max(0.0, centre - half), min(1.0, centre + half)]
