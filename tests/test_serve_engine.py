"""The continuous-batching engine on token ids: a request's tokens do not depend on who shares the batch
(greedy answers equal ``generate`` alone, also when requests join mid-way and the cache shifts),
seeded sampling is reproducible, rows leave when done or cancelled, and the queue is bounded."""

import threading
import time

import pytest
import torch

from tinygpt.generate import SamplingConfig, generate
from tinygpt.model import GPT, ModelConfig
from tinygpt.serve.engine import BatchCache, Engine, Event, QueueFull, Request


@pytest.fixture(scope="module", params=["gpt2", "llama"])
def model(request):
    torch.manual_seed(0)
    kw = dict(n_kv_head=1) if request.param == "llama" else {}
    return GPT(ModelConfig(vocab_size=64, block_size=32, n_layer=2, n_head=2, d_model=32, arch=request.param, **kw)).eval()


class Collector:
    """on_events for a request: collects tokens per choice, sets ``done`` when every choice finished."""

    def __init__(self, n=1, on_token=None):
        self.tokens = [[] for _ in range(n)]
        self.finish = [None] * n
        self.done = threading.Event()
        self.on_token = on_token

    def __call__(self, events: list[Event]):
        for e in events:
            if e.token is not None:
                self.tokens[e.choice].append(e.token)
                if self.on_token:
                    self.on_token(e)
            if e.finish is not None:
                self.finish[e.choice] = e.finish
        if all(f is not None for f in self.finish):
            self.done.set()


def run(engine, prompt, max_new, *, n=1, seed=None, temperature=0.0, stop_ids=frozenset()):
    c = Collector(n)
    req = Request(prompt=prompt, sampling=SamplingConfig(temperature=temperature, max_new_tokens=max_new, seed=seed),
                  on_events=c, n=n, stop_ids=stop_ids)
    engine.submit(req)
    return req, c


PROMPTS = [[1, 5, 9], [2, 3, 4, 5, 6, 7, 8, 9, 10, 11], [7], [3, 3, 3, 3, 3], [12, 40, 2, 8]]


def test_greedy_tokens_equal_generate_alone_while_requests_join_and_leave(model, monkeypatch):
    shifts = []
    real_shift = BatchCache.shift
    monkeypatch.setattr(BatchCache, "shift", lambda self, d: (shifts.append(d), real_shift(self, d))[1])
    engine = Engine(model, max_batch=4, max_queue=8, cache_len=32).start()  # cache = context: forces shifts
    try:
        budgets = [20, 6, 25, 12, 18]
        collectors = []

        def submit(i):  # request i+1 joins once request i has 5 tokens: always mid-way through a batch
            def on_token(e, i=i):
                if len(collectors[i].tokens[0]) == 5 and i + 1 < len(PROMPTS):
                    submit(i + 1)
            collectors.append(Collector(1, on_token=on_token))
            engine.submit(Request(prompt=PROMPTS[i], sampling=SamplingConfig(temperature=0.0, max_new_tokens=budgets[i]),
                                  on_events=collectors[i]))

        submit(0)
        deadline = time.time() + 20
        while len(collectors) < len(PROMPTS) and time.time() < deadline:
            time.sleep(0.01)
        for c in collectors:
            assert c.done.wait(20)
        for p, m, c in zip(PROMPTS, budgets, collectors):
            alone = generate(model, [p], SamplingConfig(temperature=0.0, max_new_tokens=m))[0]
            assert c.tokens[0] == alone and c.finish == ["length"]
        assert any(d < 0 for d in shifts) and any(d > 0 for d in shifts)  # both kinds of shift happened
        assert engine.load()["active_rows"] == 0
    finally:
        engine.stop()


def test_stop_token_ends_a_row_and_is_reported(model):
    alone = generate(model, [PROMPTS[0]], SamplingConfig(temperature=0.0, max_new_tokens=10))[0]
    stop = alone[3]
    engine = Engine(model, max_batch=2).start()
    try:
        _, c = run(engine, PROMPTS[0], 10, stop_ids=frozenset({stop}))
        assert c.done.wait(20)
        cut = alone.index(stop)
        assert c.tokens[0] == alone[:cut + 1] and c.finish == ["stop"]
    finally:
        engine.stop()


def test_seeded_choices_reproduce_and_differ(model):
    engine = Engine(model, max_batch=8).start()
    try:
        _, a = run(engine, PROMPTS[1], 12, n=3, seed=7, temperature=1.0)
        _, b = run(engine, PROMPTS[1], 12, n=3, seed=7, temperature=1.0)
        assert a.done.wait(20) and b.done.wait(20)
        assert a.tokens == b.tokens                       # same seed, same answers, whoever shares the batch
        assert len({tuple(t) for t in a.tokens}) > 1      # the n choices are independent draws
    finally:
        engine.stop()


def test_cancel_frees_the_row_at_once(model):
    engine = Engine(model, max_batch=1, max_queue=4).start()
    try:
        started = threading.Event()
        c = Collector(1, on_token=lambda e: started.set())
        long_req = Request(prompt=[1, 2], sampling=SamplingConfig(temperature=0.0, max_new_tokens=29), on_events=c)
        engine.submit(long_req)
        assert started.wait(20)
        engine.cancel(long_req)
        assert c.done.wait(20) and c.finish == ["cancelled"] and len(c.tokens[0]) < 29
        _, short = run(engine, [4], 3)  # the one slot is free again
        assert short.done.wait(20) and short.finish == ["length"]
    finally:
        engine.stop()


def test_queue_is_bounded_and_a_waiting_request_can_leave_it(model):
    engine = Engine(model, max_batch=1, max_queue=2)  # not started: nothing leaves the queue
    reqs = [run(engine, [1], 4)[0] for _ in range(3)]  # one takes the free row at the next boundary, two wait
    assert engine.load()["waiting"] == 2
    with pytest.raises(QueueFull):
        run(engine, [1], 4)
    engine.cancel(reqs[1])
    assert engine.load()["waiting"] == 1
    run(engine, [1], 4)  # room again
    with pytest.raises(ValueError, match="exceeds the model's context"):
        run(engine, [1] * 30, 3)
    with pytest.raises(ValueError, match="n must be"):
        run(engine, [1], 3, n=2)


def test_a_failing_prompt_ends_only_its_request(model, monkeypatch, caplog):
    engine = Engine(model, max_batch=4).start()
    try:
        started = threading.Event()
        long_c = Collector(1, on_token=lambda e: started.set())
        engine.submit(Request(prompt=[1, 2], sampling=SamplingConfig(temperature=0.0, max_new_tokens=25), on_events=long_c))
        assert started.wait(20)

        def broken(logits, ids):
            raise RuntimeError("boom")
        bad = Collector(2)
        engine.submit(Request(prompt=[3], sampling=SamplingConfig(max_new_tokens=5), on_events=bad, n=2,
                              logits_processors=[broken]))
        assert bad.done.wait(20) and bad.finish == ["error", "error"]
        assert long_c.done.wait(20) and long_c.finish == ["length"] and len(long_c.tokens[0]) == 25
    finally:
        engine.stop()


@pytest.mark.parametrize("temperature,top_k,top_p", [(1.0, 0, 1.0), (0.7, 0, 0.9), (1.3, 0, 0.5), (1.0, 3, 0.95),
                                                     (1.0, 0, 0.05)])
def test_sample_rows_draws_the_nucleus_distribution_of_sample_next(temperature, top_k, top_p):
    """Frequencies of 40,000 draws against the exact distribution sample_next samples from
    (softmax of top_p_filter(top_k_filter(logits / T))); tokens outside the nucleus never appear."""
    from tinygpt.generate import top_k_filter, top_p_filter
    from tinygpt.serve.engine import sample_rows
    logits = torch.tensor([2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, -3.0])
    cfg = SamplingConfig(temperature=temperature, top_k=top_k, top_p=top_p)
    exact = top_p_filter(top_k_filter(logits[None] / temperature, top_k), top_p).softmax(-1)[0]
    gens = [torch.Generator().manual_seed(i) for i in range(4000)]
    draws = torch.cat([sample_rows(logits.expand(4000, -1), cfg, gens) for _ in range(10)])
    freq = torch.bincount(draws, minlength=8).float() / draws.numel()
    assert (freq[exact == 0] == 0).all()
    assert (freq - exact).abs().sum() / 2 < 0.015, (freq, exact)  # total variation distance


def test_sample_rows_is_reproducible_per_row():
    from tinygpt.serve.engine import sample_rows
    logits = torch.randn(3, 50)
    cfg = SamplingConfig(temperature=0.9, top_p=0.8)
    a = sample_rows(logits, cfg, [torch.Generator().manual_seed(s) for s in (1, 2, 3)])
    b = sample_rows(logits[1:], cfg, [torch.Generator().manual_seed(s) for s in (2, 3)])  # without row 0
    assert a[1:].tolist() == b.tolist()
