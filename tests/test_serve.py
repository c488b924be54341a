"""``tinygpt serve`` on the wire (raw HTTP with httpx against a live server on 127.0.0.1): the SSE bytes,
error envelopes for every bad request with no traceback in the log, keys compared in constant time,
body limits, /health while loading, a disconnect freeing its batch row at once, and the bind warning."""

import json
import logging
import subprocess
import sys
import threading
import time

import httpx
import pytest
from serve_support import live_server, tiny_checkpoint

from tinygpt.serve import ServeConfig
from tinygpt.serve.app import BackgroundServer, exposure_warning

MODEL = "tiny/sft"
CAT = [{"role": "user", "content": "Tell me about the cat."}]


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return tiny_checkpoint(tmp_path_factory.mktemp("serve"))


@pytest.fixture(scope="module")
def server(ckpt):
    srv = live_server(ckpt, max_batch=2, max_body_kb=8)
    yield srv
    srv.stop()


@pytest.fixture()
def http(server):
    with httpx.Client(base_url=server.url, timeout=30) as c:
        yield c


def sse_events(response) -> list[str]:
    """The data fields of a server-sent event stream, checking the framing (data: ... blank line)."""
    raw = response.read().decode()
    assert raw.endswith("\n\n")
    events = raw[:-2].split("\n\n")
    assert all(e.startswith("data: ") and "\n" not in e for e in events), raw
    return [e[len("data: "):] for e in events]


def test_stream_wire_format(http):
    body = {"model": MODEL, "messages": CAT, "max_tokens": 5, "temperature": 0, "stream": True,
            "stream_options": {"include_usage": True}}
    with http.stream("POST", "/v1/chat/completions", json=body) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        assert r.headers["cache-control"] == "no-cache"
        data = sse_events(r)
    assert data[-1] == "[DONE]"
    chunks = [json.loads(d) for d in data[:-1]]
    assert {c["object"] for c in chunks} == {"chat.completion.chunk"} and len({c["id"] for c in chunks}) == 1
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    finals = [c for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert len(finals) == 1 and finals[0]["choices"][0]["delta"] == {}
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 5
    assert all(c["usage"] is None for c in chunks[:-1])
    # without include_usage: no usage key at all, and still [DONE]
    with http.stream("POST", "/v1/chat/completions", json={**body, "stream_options": None}) as r:
        data = sse_events(r)
    assert data[-1] == "[DONE]" and all("usage" not in json.loads(d) for d in data[:-1])


BAD = [  # (body bytes, status, param or None, code)
    (b'{"model": "tiny/sft", "messages": [', 400, None, "invalid_json"),
    (b"not json at all", 400, None, "invalid_json"),
    (b"[1, 2, 3]", 400, None, "invalid_value"),
    (json.dumps({"messages": CAT}), 400, "model", "invalid_value"),
    (json.dumps({"model": MODEL, "messages": []}), 400, "messages", "invalid_value"),
    (json.dumps({"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}), 400, "messages.0.role", "invalid_value"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user"}]}), 400, "messages.0.content", "invalid_value"),
    (json.dumps({"model": MODEL, "messages": CAT, "temperature": -1}), 400, "temperature", "invalid_value"),
    (json.dumps({"model": MODEL, "messages": CAT, "temperature": "hot"}), 400, "temperature", "invalid_value"),
    (json.dumps({"model": MODEL, "messages": CAT, "top_p": 0}), 400, "top_p", "invalid_value"),
    (json.dumps({"model": MODEL, "messages": CAT, "n": 3}), 400, "n", "invalid_value"),
    (json.dumps({"model": MODEL, "messages": CAT, "n": 0}), 400, "n", "invalid_value"),
    (json.dumps({"model": MODEL, "messages": CAT, "max_tokens": 0}), 400, "max_tokens", "invalid_value"),
    (json.dumps({"model": MODEL, "messages": CAT, "max_tokens": 60}), 400, "max_tokens", "context_length_exceeded"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "cat " * 70}]}), 400, "messages",
     "context_length_exceeded"),
    (json.dumps({"model": MODEL, "messages": CAT, "stop": [""]}), 400, "stop", "invalid_value"),
    (json.dumps({"model": MODEL, "messages": CAT, "logprobs": True}), 400, "logprobs", "unsupported_parameter"),
    (json.dumps({"model": MODEL, "messages": CAT, "tools": [{"type": "function"}]}), 400, "tools", "unsupported_parameter"),
    (json.dumps({"model": MODEL, "messages": CAT, "seed": 2 ** 70}), 400, "seed", "invalid_value"),
    (json.dumps({"model": "gpt-4o", "messages": CAT}), 404, "model", "model_not_found"),
    (json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "x" * 9000}]}), 413, None, "request_too_large"),
]


@pytest.fixture()
def server_log(caplog):
    """Records from our logger and uvicorn's (which does not propagate to the root logger)."""
    caplog.set_level(logging.DEBUG, logger="tinygpt.serve")
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access")]
    for lg in loggers:
        lg.addHandler(caplog.handler)
    yield caplog
    for lg in loggers:
        lg.removeHandler(caplog.handler)


def test_bad_requests_get_the_error_envelope_and_no_traceback(http, server_log):
    caplog = server_log
    for body, status, param, code in BAD:
        r = http.post("/v1/chat/completions", content=body, headers={"content-type": "application/json"})
        assert r.status_code == status, (body, r.text)
        err = r.json()["error"]
        assert set(err) == {"message", "type", "param", "code"} and err["message"], err
        assert (err["param"], err["code"]) == (param, code), (body, err)
        assert "Traceback" not in r.text and 'File "' not in r.text
    for method, path, status in [("GET", "/v1/nope", 404), ("DELETE", "/v1/models", 405), ("GET", "/v1/models/gpt-4o", 404)]:
        r = http.request(method, path)
        assert r.status_code == status and set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "suffix": "x"})
    assert r.status_code == 400 and r.json()["error"]["param"] == "suffix"
    r = http.post("/v1/completions", json={"model": MODEL, "prompt": []})
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt"
    logged = "\n".join(rec.getMessage() + (rec.exc_text or "") for rec in caplog.records)
    assert "Traceback" not in logged and not any(rec.exc_info for rec in caplog.records)


def test_body_limit_applies_without_content_length(http):
    def chunks():  # chunked transfer: no Content-Length to trust
        for _ in range(20):
            yield b" " * 1024
    r = http.post("/v1/chat/completions", content=chunks(), headers={"content-type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["code"] == "request_too_large"


def test_api_key_is_required_and_compared(ckpt, monkeypatch):
    calls = []
    import hmac as real_hmac
    real = real_hmac.compare_digest
    monkeypatch.setattr("tinygpt.serve.app.hmac.compare_digest", lambda a, b: calls.append(1) or real(a, b))
    with live_server(ckpt, api_key="k3y") as srv, httpx.Client(base_url=srv.url) as c:
        for headers in [{}, {"Authorization": "k3y"}, {"Authorization": "Bearer"}, {"Authorization": "Bearer nope"},
                        {"Authorization": "Basic k3y"}]:
            r = c.get("/v1/models", headers=headers)
            assert r.status_code == 401 and r.headers["www-authenticate"] == "Bearer", headers
            assert r.json()["error"]["code"] == "invalid_api_key"
        # the key is checked before the body is read: a malformed body without a key is a 401, not a 400
        assert c.post("/v1/chat/completions", content=b"{oops").status_code == 401
        ok = c.get("/v1/models", headers={"Authorization": "Bearer k3y"})
        assert ok.status_code == 200 and ok.json()["data"][0]["id"] == MODEL
        assert c.get("/health").status_code == 200 and c.get("/").status_code == 200  # page and health stay open
    assert len(calls) == 2  # "Bearer nope" and the right key: both through hmac.compare_digest


def test_key_from_the_environment(ckpt, monkeypatch):
    monkeypatch.setenv("TINYGPT_API_KEY", "envkey")
    with live_server(ckpt) as srv, httpx.Client(base_url=srv.url) as c:
        assert c.get("/v1/models").status_code == 401
        assert c.get("/v1/models", headers={"Authorization": "Bearer envkey"}).status_code == 200


def test_health_is_503_while_loading_then_200(ckpt, monkeypatch):
    import tinygpt.serve.app as app_module
    gate = threading.Event()
    real_load = app_module.load_model
    monkeypatch.setattr(app_module, "load_model", lambda *a, **k: (gate.wait(30), real_load(*a, **k))[1])
    cfg = ServeConfig(checkpoint=str(ckpt), port=0, device="cpu", log_level="warning")
    srv = BackgroundServer(cfg)
    threading.Thread(target=srv.start, daemon=True).start()
    try:
        with httpx.Client(base_url=srv.url, timeout=10) as c:
            for _ in range(200):
                try:
                    r = c.get("/health")
                    break
                except httpx.ConnectError:
                    time.sleep(0.02)
            assert r.status_code == 503 and r.json()["status"] == "loading"
            r = c.post("/v1/chat/completions", json={"model": MODEL, "messages": CAT})
            assert r.status_code == 503 and r.json()["error"]["code"] == "model_not_ready" and r.headers["retry-after"]
            gate.set()
            for _ in range(200):
                if c.get("/health").status_code == 200:
                    break
                time.sleep(0.02)
            assert c.get("/health").json()["status"] == "ok"
    finally:
        gate.set()
        time.sleep(0.2)
        srv.stop()


def test_a_bad_checkpoint_is_a_clear_503_not_a_crash(tmp_path):
    cfg = ServeConfig(checkpoint=str(tmp_path / "missing"), port=0, device="cpu", log_level="critical")
    with pytest.raises(RuntimeError, match="cannot load"):
        BackgroundServer(cfg, ready_timeout=20).start()


def test_disconnect_mid_stream_frees_the_row_at_once(server):
    engine = server.state.engine
    real_step = engine._step
    engine._step = lambda: (time.sleep(0.1), real_step())[1]  # 0.1 s a token: 4 s for the whole answer
    try:
        # a raw completion: only EOS ends it, which the tiny model never learned, so it runs to max_tokens
        body = {"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40, "temperature": 0, "stream": True}
        for i in range(3):  # hang up after the first chunk, three times over
            with httpx.Client(base_url=server.url, timeout=30) as fresh, \
                    fresh.stream("POST", "/v1/completions", json=body) as r:  # its own connection: hung up below
                lines = r.iter_lines()  # kept referenced: a generator closed early closes the connection
                assert next(line for line in lines if line.startswith("data: {"))
                for _ in range(100):  # the first token is sent from the join, a moment before the row is listed
                    if engine.load()["active_rows"] == 1:
                        break
                    time.sleep(0.01)
                assert engine.load()["active_rows"] == 1, (i, engine.load())
            t0 = time.monotonic()
            while engine.load()["active_rows"] and time.monotonic() - t0 < 5:
                time.sleep(0.01)
            assert engine.load()["active_rows"] == 0, "the row outlived its client"
            assert time.monotonic() - t0 < 2.0  # a few token boundaries, not the rest of the 40-token answer
    finally:
        engine._step = real_step


def test_binding_beyond_loopback_warns_loudly(ckpt):
    assert exposure_warning(ServeConfig(checkpoint="x")) is None
    loud = exposure_warning(ServeConfig(checkpoint="x", host="0.0.0.0"))
    assert "WITHOUT an API key" in loud and "--api-key" in loud
    assert "plain HTTP" in exposure_warning(ServeConfig(checkpoint="x", host="0.0.0.0", api_key="k"))
    # and the command prints it before it binds: 192.0.2.1 (TEST-NET-1) is no address of this machine, so the
    # bind fails at once (nothing listens, nothing is sent) and the command must say so without a traceback
    out = subprocess.run([sys.executable, "-m", "tinygpt.cli", "serve", str(ckpt), "--host", "192.0.2.1", "--port", "0"],
                         capture_output=True, text=True, timeout=60)
    assert "WARNING: binding 192.0.2.1 WITHOUT an API key" in out.stderr
    assert out.returncode != 0 and "cannot bind 192.0.2.1:0" in out.stderr and "Traceback" not in out.stderr


def test_help_explains_the_options():
    out = subprocess.run([sys.executable, "-m", "tinygpt.cli", "serve", "--help"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0
    for flag in ["--host", "--port", "--api-key", "--max-batch", "--max-queue", "--max-body-kb", "TINYGPT_API_KEY"]:
        assert flag in out.stdout


def test_cli_refuses_a_missing_checkpoint_before_serving(tmp_path):
    for args in (["serve"], ["serve", str(tmp_path / "nope")]):
        out = subprocess.run([sys.executable, "-m", "tinygpt.cli", *args], capture_output=True, text=True, timeout=60)
        assert out.returncode != 0 and "Traceback" not in out.stderr
        assert "CHECKPOINT is required" in out.stderr or "checkpoint not found" in out.stderr


def test_watermark_and_int8_options(ckpt):
    """--watermark-key marks every answer (the detector finds its green tokens); --quantize int8 serves."""
    from tinygpt.tokenizer import Tokenizer
    from tinygpt.watermark import WatermarkDetector

    tok = Tokenizer.load(ckpt)
    detector = WatermarkDetector("serve-key", 0.25, vocab_size=tok.vocab_size, tokenizer=tok)
    fractions = {}
    for name, extra in (("plain", {}), ("marked", {"watermark_key": "serve-key", "watermark_delta": 8.0}),
                        ("int8", {"quantize": "int8"})):
        srv = live_server(ckpt, **extra)
        try:
            with httpx.Client(base_url=srv.url, timeout=60) as c:
                r = c.post("/v1/completions", json={"model": MODEL, "prompt": "Once upon a time", "max_tokens": 40,
                                                    "temperature": 1.0, "n": 4, "seed": 3})
            assert r.status_code == 200, r.text
            scores = [detector.score_text(ch["text"]) for ch in r.json()["choices"]]
            fractions[name] = sum(s["green"] for s in scores) / max(1, sum(s["scored"] for s in scores))
        finally:
            srv.stop()
    print(fractions)
    assert fractions["marked"] > 0.6 and fractions["plain"] < 0.45, fractions  # gamma 0.25: about 0.25 unmarked
