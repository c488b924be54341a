"""A watermark for language models (Kirchenbauer et al. 2023, https://arxiv.org/abs/2301.10226) and its detector.

    tinygpt sample runs/x/pretrain --num-samples 4 --watermark-key SECRET --watermark-delta 2
    tinygpt watermark detect runs/x/pretrain --key SECRET --text "Once upon a time, ..."
    tinygpt watermark detect runs/x/pretrain --key SECRET --file samples.jsonl --field text --out scores.jsonl

Sampling side: before each token, a keyed hash of the *previous* token seeds a permutation of the
vocabulary; its first ``gamma * V`` tokens are the green list, and ``delta`` is added to their logits.
:func:`watermark_processor` builds that as a logits processor for :func:`tinygpt.generate.generate`
(``sample``, ``chat`` and the server use it).

Detection side: anyone with the key and the vocabulary size (not the model) recounts the green
tokens. With T tokens scored and g of them green, under "not watermarked" g ~ Binomial(T, gamma), so

    z = (g - gamma T) / sqrt(T gamma (1 - gamma)),      p = P(N(0, 1) > z) = erfc(z / sqrt 2) / 2.

As the reference implementation does by default, a repeated (previous token, token) pair is scored
once: T is the number of distinct bigrams and g the number of green ones, so text that repeats
itself cannot pile up green hits it did not earn.

The key is a secret string; the green list is ``blake2b(previous token id, key=key)`` seeding
``torch.randperm`` on the CPU, so it is the same on every device. The green list holds
``round(gamma * V)`` tokens and the z-score uses that exact fraction.

This module knows token ids, a tokenizer for ``detect`` on text, and checkpoints only to find the
tokenizer and vocabulary size. It knows nothing about models or sampling loops.
"""

from __future__ import annotations

import hashlib
import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from tinygpt.checkpoint import load_config, load_tokenizer
from tinygpt.config import opt
from tinygpt.tokenizer import Tokenizer

DEFAULT_GAMMA = 0.25
DEFAULT_DELTA = 2.0
DEFAULT_Z_THRESHOLD = 4.0  # the paper's: a false-positive rate of 3.2e-5 per text under the normal tail


# --- the green list: pure functions of (key, previous token, vocabulary size, gamma) ---

def _check(gamma: float, vocab_size: int) -> int:
    if not 0.0 < gamma < 1.0:
        raise ValueError(f"watermark gamma (the green share of the vocabulary) must be in (0, 1), got {gamma}")
    if vocab_size < 2:
        raise ValueError(f"watermark needs a vocabulary of at least 2 tokens, got {vocab_size}")
    n_green = round(gamma * vocab_size)
    if not 0 < n_green < vocab_size:
        raise ValueError(f"gamma {gamma} of {vocab_size} tokens leaves an empty green or red list")
    return n_green


def green_seed(key: str, prev_token: int) -> int:
    """The keyed hash: a 63-bit seed from the secret ``key`` and the previous token id."""
    key_bytes = key.encode()
    if not key_bytes:
        raise ValueError("a watermark key must be a non-empty string")
    if len(key_bytes) > 64:  # blake2b's key limit
        key_bytes = hashlib.blake2b(key_bytes, digest_size=64).digest()
    digest = hashlib.blake2b(int(prev_token).to_bytes(8, "little", signed=True), key=key_bytes, digest_size=8).digest()
    return int.from_bytes(digest, "little") & ((1 << 63) - 1)


def green_list(key: str, prev_token: int, vocab_size: int, gamma: float) -> Tensor:
    """Bool (V,): the tokens that are green after ``prev_token`` (``round(gamma * V)`` of them)."""
    n_green = _check(gamma, vocab_size)
    gen = torch.Generator(device="cpu").manual_seed(green_seed(key, prev_token))
    perm = torch.randperm(vocab_size, generator=gen)  # (V,)
    mask = torch.zeros(vocab_size, dtype=torch.bool)
    mask[perm[:n_green]] = True
    return mask


class GreenLists:
    """Green lists of one (key, gamma, vocabulary), cached per previous token."""

    def __init__(self, key: str, gamma: float, vocab_size: int):
        self.n_green = _check(gamma, vocab_size)
        green_seed(key, 0)  # validates the key now rather than at the first token
        self.key, self.gamma, self.vocab_size = key, gamma, vocab_size
        self.fraction = self.n_green / vocab_size  # the exact green share, what the z-score uses
        self._cache: dict[int, Tensor] = {}
        self._sets: dict[int, frozenset[int]] = {}  # the same lists as sets: is_green is called per token

    def mask(self, prev_token: int) -> Tensor:
        m = self._cache.get(prev_token)
        if m is None:
            m = self._cache[prev_token] = green_list(self.key, prev_token, self.vocab_size, self.gamma)
        return m

    def is_green(self, prev_token: int, token: int) -> bool:
        green = self._sets.get(prev_token)
        if green is None:
            green = self._sets[prev_token] = frozenset(self.mask(prev_token).nonzero().flatten().tolist())
        return token in green


# --- sampling: the logits processor ---

class WatermarkProcessor:
    """``(logits (B, V), ids so far) -> logits``: adds ``delta`` to the green list seeded by each row's last id."""

    def __init__(self, key: str, gamma: float = DEFAULT_GAMMA, delta: float = DEFAULT_DELTA, *, vocab_size: int):
        if delta < 0:
            raise ValueError(f"watermark delta (the bias on green logits) must be >= 0, got {delta}")
        self.green = GreenLists(key, gamma, vocab_size)
        self.delta = float(delta)

    def __call__(self, logits: Tensor, ids: list[list[int]]) -> Tensor:
        if logits.size(-1) != self.green.vocab_size:
            raise ValueError(f"watermark built for a {self.green.vocab_size}-token vocabulary, "
                             f"got logits over {logits.size(-1)}")
        masks = torch.stack([self.green.mask(row[-1]) for row in ids]).to(logits.device)  # (B, V)
        return logits + self.delta * masks.to(logits.dtype)


def watermark_processor(key: str, gamma: float = DEFAULT_GAMMA, delta: float = DEFAULT_DELTA, *,
                        vocab_size: int) -> WatermarkProcessor:
    """The watermark as a logits processor for ``generate(..., logits_processors=[...])``.

    ``vocab_size`` is the model's (``model.cfg.vocab_size``, the width of its logits); the detector
    must use the same one, with the same ``key`` and ``gamma``."""
    return WatermarkProcessor(key, gamma, delta, vocab_size=vocab_size)


# --- detection: pure statistics ---

def z_score(green: int, scored: int, gamma: float) -> float:
    """z = (g - gamma T) / sqrt(T gamma (1 - gamma)) for g green tokens out of T scored."""
    if scored <= 0:
        raise ValueError("no tokens to score: the z-score needs at least one")
    if not 0 <= green <= scored:
        raise ValueError(f"green count {green} must be between 0 and the {scored} tokens scored")
    return (green - gamma * scored) / math.sqrt(scored * gamma * (1 - gamma))


def p_value(z: float) -> float:
    """One-sided p-value of z under the standard normal: P(Z > z)."""
    return 0.5 * math.erfc(z / math.sqrt(2))


def binomial_p_value(green: int, scored: int, gamma: float) -> float:
    """The exact one-sided p-value P(Binomial(T, gamma) >= g): the normal tail of :func:`p_value` is too
    thin for short texts (at T = 50 and z >= 4 the exact rate is 1.2e-4, not 3.2e-5)."""
    if not 0 <= green <= scored:
        raise ValueError(f"green count {green} must be between 0 and the {scored} tokens scored")
    log_terms = [math.lgamma(scored + 1) - math.lgamma(i + 1) - math.lgamma(scored - i + 1)
                 + i * math.log(gamma) + (scored - i) * math.log1p(-gamma) for i in range(green, scored + 1)]
    top = max(log_terms)
    return min(1.0, math.exp(top) * sum(math.exp(t - top) for t in log_terms))


def count_green(ids: list[int], green: GreenLists, *, ignore_repeated_ngrams: bool = True) -> tuple[int, int]:
    """(green count g, tokens scored T) over the bigrams (ids[i-1], ids[i]); the first id is context only.

    With ``ignore_repeated_ngrams`` each distinct bigram counts once (the reference's default)."""
    bigrams = list(zip(ids[:-1], ids[1:]))
    if ignore_repeated_ngrams:
        bigrams = list(dict.fromkeys(bigrams))  # distinct, in order of first appearance
    g = sum(green.is_green(prev, tok) for prev, tok in bigrams)
    return g, len(bigrams)


class WatermarkDetector:
    """Scores token ids (or text, with a tokenizer) for one (key, gamma, vocabulary)."""

    def __init__(self, key: str, gamma: float = DEFAULT_GAMMA, *, vocab_size: int,
                 z_threshold: float = DEFAULT_Z_THRESHOLD, ignore_repeated_ngrams: bool = True,
                 tokenizer: Tokenizer | None = None):
        self.green = GreenLists(key, gamma, vocab_size)
        self.z_threshold, self.ignore_repeated_ngrams, self.tokenizer = z_threshold, ignore_repeated_ngrams, tokenizer

    def score_ids(self, ids: list[int]) -> dict[str, Any]:
        """green, scored (T), green_fraction, z, p_value (normal tail), binomial_p_value (exact) and
        watermarked (z >= threshold)."""
        g, t = count_green(list(ids), self.green, ignore_repeated_ngrams=self.ignore_repeated_ngrams)
        if t == 0:
            return {"green": 0, "scored": 0, "green_fraction": float("nan"), "z": float("nan"),
                    "p_value": float("nan"), "binomial_p_value": float("nan"), "watermarked": False}
        z = z_score(g, t, self.green.fraction)
        return {"green": g, "scored": t, "green_fraction": g / t, "z": z, "p_value": p_value(z),
                "binomial_p_value": binomial_p_value(g, t, self.green.fraction), "watermarked": z >= self.z_threshold}

    def score_text(self, text: str) -> dict[str, Any]:
        if self.tokenizer is None:
            raise ValueError("score_text needs the tokenizer the text was sampled with")
        return self.score_ids(self.tokenizer.encode(text, add_bos=False))


# --- `tinygpt watermark detect` ---

@dataclass
class DetectConfig:
    checkpoint: str = opt("", "checkpoint whose tokenizer and vocabulary size the text was sampled with (the "
                              "weights are not read)", required=True)
    text: list[str] = opt([], "text(s) to test")
    file: str = opt("", "a JSONL file to test, one text per line (see --field); '-' reads stdin")
    field: str = opt("text", "the JSONL field holding the text")
    key: str = opt("", "the secret watermark key used when sampling (--watermark-key)", required=True)
    gamma: float = opt(DEFAULT_GAMMA, "green share of the vocabulary used when sampling (--watermark-gamma)")
    z_threshold: float = opt(DEFAULT_Z_THRESHOLD, "flag a text as watermarked when z >= this "
                                                  "(4.0: a false-positive rate of 3.2e-5; 3.09: 1e-3)")
    ignore_repeated_ngrams: bool = opt(True, "score each distinct (previous token, token) pair once, as the "
                                             "reference implementation does")
    out: str = opt("", "write one JSON result per text to this JSONL file")


def _read_jsonl(path: str, field: str) -> list[str]:
    lines = sys.stdin.read().splitlines() if path == "-" else Path(path).read_text().splitlines()
    texts = []
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{n}: not JSON ({e.msg})") from None
        if not isinstance(row, dict) or not isinstance(row.get(field), str):
            raise ValueError(f"{path}:{n}: expected an object with a string field {field!r} (choose it with --field)")
        texts.append(row[field])
    return texts


def main(cfg: DetectConfig) -> list[dict[str, Any]]:
    if not cfg.checkpoint:
        raise ValueError("a checkpoint is required (for its tokenizer): tinygpt watermark detect CKPT --key K --text ...")
    if not cfg.key:
        raise ValueError("--key is required: the secret the text was sampled with (tinygpt sample --watermark-key)")
    if bool(cfg.text) == bool(cfg.file):
        raise ValueError("give either --text ... or --file FILE.jsonl")
    texts = list(cfg.text) if cfg.text else _read_jsonl(cfg.file, cfg.field)
    tok = load_tokenizer(cfg.checkpoint)
    det = WatermarkDetector(cfg.key, cfg.gamma, vocab_size=load_config(cfg.checkpoint).vocab_size,
                            z_threshold=cfg.z_threshold, ignore_repeated_ngrams=cfg.ignore_repeated_ngrams,
                            tokenizer=tok)
    results = [det.score_text(t) for t in texts]
    print(f"| # | tokens scored | green | green share | z | p-value | exact p | watermarked (z >= {cfg.z_threshold}) |")
    print("|---|---|---|---|---|---|---|---|")
    for i, r in enumerate(results, 1):
        print(f"| {i} | {r['scored']} | {r['green']} | {r['green_fraction']:.3f} | {r['z']:.2f} | "
              f"{r['p_value']:.2e} | {r['binomial_p_value']:.2e} | {'yes' if r['watermarked'] else 'no'} |")
    flagged = sum(r["watermarked"] for r in results)
    print(f"{flagged} of {len(results)} text(s) watermarked (key given, gamma {cfg.gamma})")
    if cfg.out:
        Path(cfg.out).write_text("".join(json.dumps(r) + "\n" for r in results))
    return results
