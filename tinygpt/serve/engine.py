"""Continuous batching: many requests share one decode loop on one ``GPT``.

A request (prompt ids, sampling settings, ``n`` choices) joins the running batch at a token boundary:
its prompt is prefilled alone (B=1), its first token is sampled at once (that is the time to first
token), its keys/values are copied into a free row of the batch cache, and from the next step on it
decodes together with every other row. A row leaves the batch the moment it is done (a stop token,
its token budget) or cancelled (its client went away, or the server matched a stop string), so a long
answer never holds up a short one and a slot is freed at once. Requests beyond ``max_batch`` rows wait
in a FIFO queue of at most ``max_queue`` requests; past that :meth:`Engine.submit` raises
:class:`QueueFull` (the server answers 429).

The batch cache (:class:`BatchCache`) has ``max_batch`` rows and ``cache_len`` positions. Every active
row *ends* at the same write position ``P``: a row of length ``l`` holds its tokens in ``[P - l, P)``
and the attention mask hides everything before. Positions are counted from the mask (as in
``GPT.forward``), so a row's tokens get the positions they would have alone. Active rows are kept
contiguous in ``[0, B)``: a leaving row is replaced by the last one. When ``P`` reaches ``cache_len``
every row is shifted left to drop the padding in front of the oldest; a new prompt longer than ``P``
shifts them right. Each row fits the model's context, so ``cache_len = 2 * block_size`` makes a shift
rare.

Per-request logits processors (``tinygpt.generate.LogitsProcessor``, e.g. a watermark) see their own
row's logits and ids before sampling.

This module works on token ids only: it knows nothing about text, tokenizers, chat templates or HTTP.
Events are delivered by calling the request's ``on_events`` from the engine thread; the caller hands
them on to wherever it waits (the server uses ``loop.call_soon_threadsafe``).
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from tinygpt.generate import LogitsProcessor, SamplingConfig, sample_next, top_k_filter
from tinygpt.model import GPT

log = logging.getLogger("tinygpt.serve")


class QueueFull(Exception):
    """The wait queue holds ``max_queue`` requests already: try again later."""


@dataclass
class Event:
    """One thing that happened to one choice: a sampled ``token``, or the end (``finish`` set)."""
    choice: int
    token: int | None = None        # the sampled token id (a stop token is reported too, with finish="stop")
    finish: str | None = None       # "stop" | "length" | "cancelled" | "error"
    error: str | None = None        # the message, when finish == "error"


@dataclass
class Request:
    prompt: list[int]                                     # prompt token ids (at least one)
    sampling: SamplingConfig                              # temperature, top_k, top_p, max_new_tokens, seed
    on_events: Callable[[list[Event]], None]              # called from the engine thread, once per step at most
    n: int = 1                                            # independent choices sampled from the one prompt
    stop_ids: frozenset[int] = frozenset()                # tokens that end a choice (reported, finish="stop")
    logits_processors: Sequence[LogitsProcessor] = ()     # per-request, applied to each of its rows
    # filled in by the engine
    cancelled: set[int] = field(default_factory=set)      # choices the caller no longer wants
    cancel_all: bool = False
    submitted_at: float = 0.0

    def cancel(self, choice: int | None = None) -> None:
        """Stop one choice (or all): its row leaves the batch at the next token boundary."""
        if choice is None:
            self.cancel_all = True
        else:
            self.cancelled.add(choice)

    def is_cancelled(self, choice: int) -> bool:
        return self.cancel_all or choice in self.cancelled


def sample_rows(logits: Tensor, cfg: SamplingConfig, generators: Sequence[torch.Generator], attempts: int = 4) -> Tensor:
    """Next tokens (B,) from logits (B, V): the distribution of ``generate.sample_next`` (temperature, top-k,
    nucleus), drawn without sorting the vocabulary, each row from its own generator.

    ``sample_next`` sorts every row for top-p and calls ``multinomial``: 2 ms at B=8 and 10 ms at B=32 for a
    2048-token vocabulary on this project's CPU, as much as the forward pass. Here a row draws from the
    whole distribution by the Gumbel-max trick (argmax of logits + Gumbel noise) and keeps the draw if it
    lies in the nucleus (the probability of the strictly likelier tokens is below p), else draws again:
    the kept draw follows the nucleus distribution renormalised, and a draw is kept with probability
    >= p. Rows still unlucky after ``attempts`` draws fall back to ``sample_next``. (Exactly tied
    probabilities at the nucleus edge are all kept here; ``sample_next`` keeps them in sort order.)
    """
    logits = logits.float()
    if cfg.temperature == 0:
        return logits.argmax(dim=-1)
    logits = top_k_filter(logits / cfg.temperature, cfg.top_k)  # (B, V)
    B, V = logits.shape

    def gumbel(rows: Sequence[int]) -> Tensor:
        u = torch.stack([torch.rand(V, generator=generators[r], device=logits.device) for r in rows])  # (b, V)
        return -torch.log(-torch.log(u.clamp_(min=1e-20, max=1.0 - 1e-7)))

    pending = list(range(B))
    tokens = (logits + gumbel(pending)).argmax(dim=-1)  # (B,) draws from the whole distribution
    if cfg.top_p >= 1.0:
        return tokens
    probs = logits.softmax(dim=-1)  # (B, V)
    for attempt in range(attempts):
        rows = torch.tensor(pending, device=logits.device)
        p_row = probs[rows]                                              # (b, V)
        p_tok = p_row.gather(1, tokens[rows][:, None])                   # (b, 1)
        mass_before = (p_row * (p_row > p_tok)).sum(dim=-1)              # (b,) mass of the likelier tokens
        pending = [r for r, ok in zip(pending, (mass_before < cfg.top_p).tolist()) if not ok]
        if not pending:
            return tokens
        if attempt < attempts - 1:
            rows = torch.tensor(pending, device=logits.device)
            tokens[rows] = (logits[rows] + gumbel(pending)).argmax(dim=-1)
    rows = torch.tensor(pending, device=logits.device)
    tokens[rows] = sample_next(logits[rows], SamplingConfig(temperature=1.0, top_p=cfg.top_p),
                               [generators[r] for r in pending])
    return tokens


def _emit(request: Request, events: list[Event]) -> None:
    """Hand events to the request's callback; a callback that fails cancels its request (never the batch)."""
    try:
        request.on_events(events)
    except Exception:
        log.warning("a request's event callback failed; cancelling it", exc_info=True)
        request.cancel()


class BatchCache:
    """Keys and values for up to ``max_batch`` rows that all end at position ``length``.

    Implements what ``GPT.forward`` asks of a cache (``length``, ``max_len``, ``update``) on the
    first ``rows`` rows of preallocated (n_layer, max_batch, n_kv_head, cache_len, head_dim) buffers.
    """

    def __init__(self, model: GPT, max_batch: int, cache_len: int):
        ref = model.tok_emb.weight
        cfg = model.cfg
        shape = (cfg.n_layer, max_batch, cfg.kv_heads, cache_len, cfg.head_dim)
        self.k = torch.zeros(shape, device=ref.device, dtype=ref.dtype)
        self.v = torch.zeros(shape, device=ref.device, dtype=ref.dtype)
        self.mask = torch.zeros(max_batch, cache_len, dtype=torch.long, device=ref.device)  # 1 = real token
        self.max_len = cache_len
        self.length = 0  # the write position P shared by every active row
        self.rows = 0    # active rows, always [0, rows)

    def update(self, layer: int, k: Tensor, v: Tensor) -> tuple[Tensor, Tensor]:
        """Write k, v (rows, n_kv_head, T, hd) at the write position; return all keys/values so far."""
        end = self.length + k.size(2)
        k_all, v_all = self.k[layer, :self.rows], self.v[layer, :self.rows]  # (rows, nkv, cache_len, hd)
        k_all[:, :, self.length:end] = k
        v_all[:, :, self.length:end] = v
        return k_all[:, :, :end], v_all[:, :, :end]                            # (rows, nkv, end, hd)

    def shift(self, delta: int) -> None:
        """Move every active row ``delta`` positions (negative: left) and the write position with it."""
        if delta == 0 or self.rows == 0:
            self.length += delta
            return
        B, P, new = self.rows, self.length, self.length + delta
        src, dst = (slice(-delta, P), slice(0, new)) if delta < 0 else (slice(0, P), slice(delta, new))
        for buf in (self.k, self.v):
            buf[:, :B, :, dst] = buf[:, :B, :, src].clone()
        self.mask[:B, dst] = self.mask[:B, src].clone()
        if delta > 0:
            self.mask[:B, :delta] = 0
        self.length = new

    def put(self, row: int, k: Tensor, v: Tensor) -> None:
        """Place a prefilled prompt's keys/values (n_layer, 1, nkv, L, hd) in ``row``, ending at P."""
        L, P = k.size(3), self.length
        self.k[:, row, :, P - L:P] = k[:, 0]
        self.v[:, row, :, P - L:P] = v[:, 0]
        self.mask[row, :P - L] = 0
        self.mask[row, P - L:P] = 1

    def move(self, src: int, dst: int) -> None:
        """Copy row ``src`` over row ``dst`` (filling the hole a leaving row makes)."""
        P = self.length
        self.k[:, dst, :, :P] = self.k[:, src, :, :P]
        self.v[:, dst, :, :P] = self.v[:, src, :, :P]
        self.mask[dst, :P] = self.mask[src, :P]


@dataclass
class _Row:
    request: Request
    choice: int
    generator: torch.Generator
    length: int                  # tokens in the cache for this row (prompt + all fed tokens)
    pending: int                 # the last sampled token, fed at the next step
    generated: list[int]         # every sampled token (for logits processors)


class Engine:
    """The decode loop, in one background thread. ``submit`` is safe to call from any thread."""

    def __init__(self, model: GPT, *, max_batch: int = 16, max_queue: int = 64, cache_len: int | None = None):
        if max_batch < 1 or max_queue < 0:
            raise ValueError(f"max_batch must be >= 1 and max_queue >= 0, got {max_batch}, {max_queue}")
        self.model = model.eval()
        self.block_size = model.cfg.block_size
        self.max_batch, self.max_queue = max_batch, max_queue
        cache_len = cache_len or 2 * self.block_size
        if cache_len < self.block_size:
            raise ValueError(f"cache_len ({cache_len}) must hold a whole context ({self.block_size})")
        self.device = model.tok_emb.weight.device
        self.cache = BatchCache(model, max_batch, cache_len)
        self._rows: list[_Row] = []
        self._waiting: deque[Request] = deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._thread: threading.Thread | None = None
        self.steps = 0             # decode steps run (a step advances every active row by one token)
        self.tokens = 0            # tokens sampled in all

    # --- the caller's side ---

    def start(self) -> Engine:
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="tinygpt-engine", daemon=True)
            self._thread.start()
        return self

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=30)
            self._thread = None

    def check(self, prompt_len: int, max_new_tokens: int, n: int) -> None:
        """Raise ValueError if a request of this shape can never run (the server turns it into a 400)."""
        if prompt_len < 1:
            raise ValueError("the prompt must hold at least one token")
        if prompt_len + max_new_tokens > self.block_size:
            raise ValueError(f"prompt ({prompt_len} tokens) + max_tokens ({max_new_tokens}) = "
                             f"{prompt_len + max_new_tokens} exceeds the model's context of {self.block_size} tokens")
        if not 1 <= n <= self.max_batch:
            raise ValueError(f"n must be between 1 and {self.max_batch} (the server's --max-batch), got {n}")

    def submit(self, request: Request) -> Request:
        """Queue a request; it joins the batch when ``n`` rows are free. Raises QueueFull or ValueError."""
        self.check(len(request.prompt), request.sampling.max_new_tokens, request.n)
        with self._cond:
            if self._stopping:
                raise RuntimeError("the engine is stopped")
            waiting = self._queued()
            if waiting >= self.max_queue:
                raise QueueFull(f"{waiting} requests are waiting already (the server's --max-queue)")
            request.submitted_at = time.perf_counter()
            self._waiting.append(request)
            self._cond.notify_all()
        return request

    def cancel(self, request: Request, choice: int | None = None) -> None:
        """Stop one choice of a request, or all of it. A waiting request leaves the queue now; a running
        row leaves the batch at the next token boundary. Its remaining choices end with finish="cancelled"."""
        request.cancel(choice)
        if choice is not None:
            return
        with self._cond:
            try:
                self._waiting.remove(request)
            except ValueError:
                return
        _emit(request, [Event(c, finish="cancelled") for c in range(request.n)])

    def _queued(self) -> int:
        """Requests that will still wait after the next token boundary (the ones free rows take do not count)."""
        free, waiting = self.max_batch - len(self._rows), 0
        for request in self._waiting:
            if waiting == 0 and request.n <= free:
                free -= request.n
            else:
                waiting += 1
        return waiting

    def load(self) -> dict[str, int]:
        """Active rows and waiting requests now (for /health, tests and the benchmark)."""
        with self._cond:
            return {"active_rows": len(self._rows), "waiting": self._queued(), "max_batch": self.max_batch,
                    "max_queue": self.max_queue}

    # --- the engine thread ---

    def _loop(self) -> None:
        with torch.inference_mode():
            while True:
                with self._cond:
                    while not self._stopping and not self._waiting and not self._rows:
                        self._cond.wait()
                    if self._stopping:
                        break
                    admitted = []
                    free = self.max_batch - len(self._rows)
                    while self._waiting and (self._waiting[0].cancel_all or self._waiting[0].n <= free):
                        request = self._waiting.popleft()
                        if not request.cancel_all:
                            free -= request.n
                        admitted.append(request)
                for request in admitted:
                    try:
                        self._join(request)
                    except Exception as e:  # its prefill or first sample failed: end this request, not the batch
                        log.exception("prefill failed for a %d-token prompt", len(request.prompt))
                        for i in reversed(range(len(self._rows))):
                            if self._rows[i].request is request:
                                self._remove(i)
                        _emit(request, [Event(c, finish="error", error=f"the model failed on this prompt "
                                              f"({type(e).__name__})") for c in range(request.n)])
                try:
                    self._drop_cancelled()
                    if self._rows:
                        self._step()
                except Exception as e:  # a failed forward pass (e.g. out of memory): fail the batch, keep serving
                    log.exception("decode step failed; ending the %d active row(s)", len(self._rows))
                    self._fail_all(f"the model failed while decoding ({type(e).__name__}); try again")
            self._fail_all("the server is shutting down")
            with self._cond:
                waiting, self._waiting = list(self._waiting), deque()
            for request in waiting:
                _emit(request, [Event(c, finish="error", error="the server is shutting down") for c in range(request.n)])

    def _sample(self, rows: list[_Row], logits: Tensor) -> list[int]:
        """Next token of each row from its logits (len(rows), V): its processors, then its own sampler."""
        for i, row in enumerate(rows):
            if row.request.logits_processors:
                row_logits = logits[i:i + 1]
                for proc in row.request.logits_processors:
                    row_logits = proc(row_logits, [row.request.prompt + row.generated])
                logits[i] = row_logits[0]
        out = [0] * len(rows)
        groups: dict[tuple, list[int]] = {}
        for i, row in enumerate(rows):
            s = row.request.sampling
            groups.setdefault((s.temperature, s.top_k, s.top_p), []).append(i)
        for idx in groups.values():
            cfg = rows[idx[0]].request.sampling
            tokens = sample_rows(logits[idx], cfg, [rows[i].generator for i in idx])  # (len(idx),)
            for i, tok in zip(idx, tokens.tolist()):
                out[i] = tok
        return out

    def _advance(self, rows: list[_Row], tokens: list[int]) -> list[bool]:
        """Record each row's new token, tell its request; True where the row is finished."""
        done, events = [], {}
        for row, tok in zip(rows, tokens):
            row.generated.append(tok)
            row.pending = tok
            finish = None
            if tok in row.request.stop_ids:
                finish = "stop"
            elif len(row.generated) >= row.request.sampling.max_new_tokens:
                finish = "length"
            events.setdefault(id(row.request), (row.request, []))[1].append(Event(row.choice, tok, finish))
            done.append(finish is not None)
        self.tokens += len(tokens)
        for request, evs in events.values():
            _emit(request, evs)
        return done

    def _join(self, request: Request) -> None:
        if request.cancel_all:
            _emit(request, [Event(c, finish="cancelled") for c in range(request.n)])
            return
        model, L, cache = self.model, len(request.prompt), self.cache
        if request.sampling.max_new_tokens == 0:
            _emit(request, [Event(c, finish="length") for c in range(request.n)])
            return
        alone = model.new_cache(1, L, dtype=cache.k.dtype)
        logits = model(torch.tensor([request.prompt], device=self.device), cache=alone)[:, -1]  # (1, V)
        seed = request.sampling.seed
        rows = []
        for c in range(request.n):
            g = torch.Generator(self.device).manual_seed(seed + c if seed is not None else secrets.randbits(63))
            rows.append(_Row(request, c, g, length=L, pending=-1, generated=[]))
        done = self._advance(rows, self._sample(rows, logits.expand(request.n, -1).clone()))
        for row, finished in zip(rows, done):
            if finished:
                continue
            if cache.rows == 0:
                cache.length = 0
            if cache.length < L:
                cache.shift(L - cache.length)
            cache.rows += 1
            cache.put(cache.rows - 1, alone.k[:, :, :, :L], alone.v[:, :, :, :L])
            self._rows.append(row)

    def _remove(self, i: int) -> None:
        last = len(self._rows) - 1
        if i != last:
            self.cache.move(last, i)
            self._rows[i] = self._rows[last]
        self._rows.pop()
        self.cache.rows -= 1

    def _drop_cancelled(self) -> None:
        i = 0
        while i < len(self._rows):
            row = self._rows[i]
            if row.request.is_cancelled(row.choice):
                self._remove(i)
                _emit(row.request, [Event(row.choice, finish="cancelled")])
            else:
                i += 1

    def _step(self) -> None:
        cache, rows = self.cache, self._rows
        if cache.length + 1 > cache.max_len:  # drop the padding in front of the oldest row
            cache.shift(max(r.length for r in rows) - cache.length)
        B, P = len(rows), cache.length
        tokens = torch.tensor([[r.pending] for r in rows], device=self.device)  # (B, 1)
        cache.mask[:B, P] = 1
        logits = self.model(tokens, attention_mask=cache.mask[:B, :P + 1], cache=cache)[:, -1]  # (B, V)
        for r in rows:
            r.length += 1
        self.steps += 1
        done = self._advance(rows, self._sample(rows, logits))
        for i in reversed(range(B)):  # reversed: _remove moves the last row into the hole
            if done[i]:
                self._remove(i)

    def _fail_all(self, message: str) -> None:
        rows, self._rows = self._rows, []
        self.cache.rows = 0
        for row in rows:
            _emit(row.request, [Event(row.choice, finish="error", error=message)])
