"""The HTTP side of ``tinygpt serve``: OpenAI's chat and completions API on FastAPI, over the engine.

Owns: the routes, turning messages into prompt ids with the one chat template (``Tokenizer.render_chat``:
text inside a message is plain text, so no message can forge a turn), the context policy, server-sent events
in OpenAI's chunk format, API keys, body limits, the loading state, and the chat page at ``/``. The schemas,
the error envelope and the text of a choice are in ``protocol.py``.

Policies a client can rely on:
  * ``finish_reason`` is ``stop`` when the model ended its turn (``<|end|>`` or EOS) or a ``stop`` string
    matched (the string is not returned), and ``length`` when ``max_tokens`` ran out.
  * No ``max_tokens``: the answer may use the rest of the context. Prompt + ``max_tokens`` past the
    context is a 400 (``context_length_exceeded``); nothing is truncated silently.
  * ``usage.completion_tokens`` counts every token the model sampled for the choices, the closing
    ``<|end|>`` included; ``prompt_tokens`` counts the rendered prompt once, whatever ``n``.
  * Errors are ``{"error": {"message", "type", "param", "code"}}``: 400 bad request, 401 key, 404 unknown
    model or path, 413 body too large, 429 queue full (with ``Retry-After``), 503 still loading.
    Unexpected failures are logged here and answered with a 500 that holds no traceback.

It knows nothing about training; decoding is the engine's.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import secrets
import threading
import time
from collections.abc import AsyncIterator
from importlib import resources
from pathlib import Path

import torch
from fastapi import FastAPI, Request as HTTPRequest
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from tinygpt import quantize, runtime
from tinygpt.checkpoint import load_model, load_tokenizer
from tinygpt.generate import SamplingConfig
from tinygpt.serve import LOOPBACK, ServeConfig
from tinygpt.serve.engine import Engine, Event, QueueFull, Request
from tinygpt.serve.protocol import (ERRORS, MAX_STOP, MIN_TEMPERATURE, MIN_TOP_P, RETRY_AFTER_S, APIError,
                                    ChatCompletionRequest, ChoiceText, CompletionRequest, SamplingParams, error_body,
                                    error_response, penalties)
from tinygpt.tokenizer import Tokenizer
from tinygpt.watermark import watermark_processor

log = logging.getLogger("tinygpt.serve")


# --- the server's state ---

class Mailbox:
    """Engine thread -> event loop: events for many requests, handed over with one wake-up of the loop per
    batch (not one per request per token: at 32 streams that was 32 self-pipe writes a step)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.lock = threading.Lock()
        self.pending: list[tuple[asyncio.Queue, list]] = []

    def sender(self, queue: asyncio.Queue):
        def send(events: list) -> None:  # called from the engine thread
            with self.lock:
                first = not self.pending
                self.pending.append((queue, events))
            if first:
                self.loop.call_soon_threadsafe(self.flush)
        return send

    def flush(self) -> None:  # on the event loop
        with self.lock:
            pending, self.pending = self.pending, []
        for queue, events in pending:
            queue.put_nowait(events)


class State:
    """What the routes share: config, and once loaded, the model's tokenizer and the engine."""

    def __init__(self, cfg: ServeConfig):
        self.cfg = cfg
        self.key = cfg.key()
        self.model_id = cfg.model_name or "/".join(Path(cfg.checkpoint).parts[-2:]) or "tinygpt"
        self.tokenizer: Tokenizer | None = None
        self.engine: Engine | None = None
        self.watermark = None  # a logits processor every request gets (--watermark-key)
        self.block_size = 0
        self.load_error: str | None = None
        self.created = int(time.time())
        self._mailbox: Mailbox | None = None

    def mailbox(self, loop: asyncio.AbstractEventLoop) -> Mailbox:
        if self._mailbox is None or self._mailbox.loop is not loop:
            self._mailbox = Mailbox(loop)
        return self._mailbox

    def load(self) -> None:
        try:
            if self.cfg.threads:
                torch.set_num_threads(self.cfg.threads)
            device = runtime.resolve_device(self.cfg.device)
            model, _ = load_model(self.cfg.checkpoint, device=device)
            model = quantize.apply(model.eval(), self.cfg.quantize)
            if self.cfg.watermark_key:
                self.watermark = watermark_processor(self.cfg.watermark_key, self.cfg.watermark_gamma,
                                                     self.cfg.watermark_delta, vocab_size=model.cfg.vocab_size)
            self.tokenizer = load_tokenizer(self.cfg.checkpoint)
            self.block_size = model.cfg.block_size
            self.engine = Engine(model, max_batch=self.cfg.max_batch, max_queue=self.cfg.max_queue).start()
            log.info("tinygpt serve: %s ready (%.2fM params, %d-token context, batch %d, queue %d)", self.model_id,
                     model.num_params() / 1e6, self.block_size, self.cfg.max_batch, self.cfg.max_queue)
        except Exception as e:  # shown by /health and every API call; the process stays up to say so
            self.load_error = f"cannot load {self.cfg.checkpoint}: {e}"
            log.error("%s", self.load_error)

    @property
    def ready(self) -> bool:
        return self.engine is not None


def exposure_warning(cfg: ServeConfig) -> str | None:
    """The loud warning for a server reachable from the network, or None on loopback."""
    if cfg.host in LOOPBACK:
        return None
    bar = "!" * 78
    if not cfg.key():
        return (f"{bar}\n!! WARNING: binding {cfg.host} WITHOUT an API key: anyone who can reach this machine can use\n"
                f"!! the model. Set --api-key or $TINYGPT_API_KEY, or bind 127.0.0.1.\n{bar}")
    return (f"{bar}\n!! NOTE: binding {cfg.host}: reachable from the network. The API key travels in plain HTTP;\n"
            f"!! put a TLS proxy in front for anything but a trusted network.\n{bar}")


# --- the guard: body limit, keys, loading (an ASGI middleware, so it runs before any parsing) ---

class Guard:
    def __init__(self, app, state: State):
        self.app, self.state = app, state
        self.limit = state.cfg.max_body_kb * 1024

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        path = scope["path"]
        if path.startswith("/v1/") or path == "/v1":
            problem = self.check_key(scope) or self.check_ready()
            if problem is not None:
                return await error_response(problem)(scope, receive, send)
        if scope["method"] in ("POST", "PUT", "PATCH"):
            body, too_big = b"", False
            declared = dict(scope["headers"]).get(b"content-length")
            if declared is not None and declared.isdigit() and int(declared) > self.limit:
                too_big = True
            while not too_big:
                message = await receive()
                if message["type"] == "http.disconnect":
                    return
                body += message.get("body", b"")
                too_big = len(body) > self.limit
                if not message.get("more_body"):
                    break
            if too_big:
                e = APIError(413, f"request body over {self.state.cfg.max_body_kb} KiB (the server's --max-body-kb)",
                             code="request_too_large")
                return await error_response(e)(scope, receive, send)
            replayed = False

            async def replay():
                nonlocal replayed
                if not replayed:
                    replayed = True
                    return {"type": "http.request", "body": body, "more_body": False}
                return await receive()

            return await self.app(scope, replay, send)
        return await self.app(scope, receive, send)

    def check_key(self, scope) -> APIError | None:
        if not self.state.key:
            return None
        header = dict(scope["headers"]).get(b"authorization", b"")
        scheme, _, given = header.partition(b" ")
        headers = {"WWW-Authenticate": "Bearer"}
        if scheme.lower() != b"bearer" or not given.strip():
            return APIError(401, "missing API key: send the header 'Authorization: Bearer YOUR_KEY'",
                            type="authentication_error", code="invalid_api_key", headers=headers)
        if not hmac.compare_digest(given.strip(), self.state.key.encode()):  # constant time
            return APIError(401, "invalid API key", type="authentication_error", code="invalid_api_key",
                            headers=headers)
        return None

    def check_ready(self) -> APIError | None:
        if self.state.ready:
            return None
        message = self.state.load_error or "the model is still loading: retry shortly (GET /health says when)"
        return APIError(503, message, type="server_error", code="model_not_ready", headers={"Retry-After": "1"})


# --- the app ---

def create_app(cfg: ServeConfig, *, load_in_background: bool = True) -> FastAPI:
    state = State(cfg)

    async def lifespan(app: FastAPI):
        if load_in_background:
            threading.Thread(target=state.load, name="tinygpt-load", daemon=True).start()
        else:
            state.load()
        yield
        if state.engine is not None:
            state.engine.stop()

    app = FastAPI(title="tinygpt", version="1", lifespan=lifespan, docs_url=None, redoc_url=None,
                  description="OpenAI-compatible chat and completions for a tinygpt checkpoint.")
    app.state.tinygpt = state

    @app.exception_handler(APIError)
    async def on_api_error(request, e: APIError):
        return error_response(e)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request, e: RequestValidationError):
        errors = e.errors()
        first = errors[0] if errors else {"loc": (), "msg": "invalid request", "type": ""}
        loc = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error_response(APIError(400, f"malformed JSON: {first.get('ctx', {}).get('error', first['msg'])}",
                                           code="invalid_json"))
        param = ".".join(loc) or None
        message = f"{param}: {first['msg']}" if param else f"request body: {first['msg']}"
        if len(errors) > 1:
            message += f" (and {len(errors) - 1} more problem(s))"
        return error_response(APIError(400, message, param=param, code="invalid_value"))

    @app.exception_handler(StarletteHTTPException)
    async def on_http(request, e: StarletteHTTPException):
        codes = {404: "not_found", 405: "method_not_allowed"}
        return error_response(APIError(e.status_code, str(e.detail), code=codes.get(e.status_code),
                                       headers=getattr(e, "headers", None)))

    @app.exception_handler(Exception)
    async def on_unexpected(request, e: Exception):
        log.exception("unexpected error on %s %s", request.method, request.url.path)
        return error_response(APIError(500, "internal server error (logged on the server)", type="server_error"))

    @app.get("/health", responses={503: {"description": "still loading, or the checkpoint failed to load"}})
    async def health():
        if not state.ready:
            status = "error" if state.load_error else "loading"
            return JSONResponse({"status": status, "error": state.load_error}, status_code=503)
        return {"status": "ok", "model": state.model_id, **state.engine.load()}

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def page():
        return HTMLResponse(resources.files("tinygpt.serve").joinpath("static/chat.html").read_text(encoding="utf-8"))

    @app.get("/v1/models", responses=ERRORS)
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}", responses=ERRORS)
    async def model(model_id: str):
        check_model(model_id)
        return model_card()

    def model_card() -> dict:
        return {"id": state.model_id, "object": "model", "created": state.created, "owned_by": "tinygpt",
                "context_length": state.block_size}

    def check_model(model_id: str) -> None:
        if model_id != state.model_id:
            raise APIError(404, f"model {model_id!r} does not exist; this server serves {state.model_id!r}",
                           param="model", code="model_not_found")

    @app.post("/v1/chat/completions", responses=ERRORS)
    async def chat_completions(body: ChatCompletionRequest, request: HTTPRequest):
        check_model(body.model)
        if body.tools:
            raise APIError(400, "tools are not supported by this server", param="tools", code="unsupported_parameter")
        messages = []
        for i, m in enumerate(body.messages):
            content = m.content if isinstance(m.content, str) else "".join(p.text for p in m.content)
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        prompt, _ = state.tokenizer.render_chat(messages, add_generation_prompt=True)
        max_tokens = body.max_completion_tokens or body.max_tokens
        stop_ids = frozenset({state.tokenizer.end_id, state.tokenizer.eos_id})
        return await complete(body, request, [prompt], max_tokens, stop_ids, chat=True)

    @app.post("/v1/completions", responses=ERRORS)
    async def completions(body: CompletionRequest, request: HTTPRequest):
        check_model(body.model)
        for name, value, ok in [("logprobs", body.logprobs, body.logprobs is None), ("suffix", body.suffix, body.suffix is None),
                                ("best_of", body.best_of, body.best_of in (None, body.n))]:
            if not ok:
                raise APIError(400, f"{name}={value!r} is not supported by this server", param=name,
                               code="unsupported_parameter")
        texts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if not texts:
            raise APIError(400, "prompt: give a text or a non-empty list of texts", param="prompt", code="invalid_value")
        prompts = [state.tokenizer.encode(t, add_bos=True) for t in texts]
        return await complete(body, request, prompts, body.max_tokens, frozenset({state.tokenizer.eos_id}),
                              chat=False, texts=texts)

    # --- one request through the engine ---

    def check_common(body: SamplingParams) -> list[str]:
        if body.logprobs:
            raise APIError(400, "logprobs are not supported by this server", param="logprobs", code="unsupported_parameter")
        if body.logit_bias:
            raise APIError(400, "logit_bias is not supported by this server", param="logit_bias",
                           code="unsupported_parameter")
        if body.n > cfg.max_batch:
            raise APIError(400, f"n must be at most {cfg.max_batch} (the server's --max-batch), got {body.n}",
                           param="n", code="invalid_value")
        stops = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if len(stops) > MAX_STOP or any(not s for s in stops):
            raise APIError(400, f"stop: at most {MAX_STOP} non-empty strings", param="stop", code="invalid_value")
        return stops

    async def complete(body: SamplingParams, http: HTTPRequest, prompts: list[list[int]], max_tokens: int | None,
                       stop_ids: frozenset[int], *, chat: bool, texts: list[str] | None = None):
        stops = check_common(body)
        block = state.block_size
        for p in prompts:
            if len(p) >= block:
                raise APIError(400, f"the prompt takes {len(p)} tokens; the model's context holds {block}, and at least "
                                    "one must be left for the answer: shorten the conversation",
                               param="messages" if chat else "prompt", code="context_length_exceeded")
            if max_tokens is not None and len(p) + max_tokens > block:
                raise APIError(400, f"prompt ({len(p)} tokens) + max_tokens ({max_tokens}) = {len(p) + max_tokens} "
                                    f"exceeds the model's context of {block} tokens: lower max_tokens or shorten "
                                    "the prompt", param="max_tokens", code="context_length_exceeded")
        queue: asyncio.Queue[list[Event]] = asyncio.Queue()
        deliver = state.mailbox(asyncio.get_running_loop()).sender(queue)

        processors = []
        requests = []
        for i, p in enumerate(prompts):
            if body.presence_penalty or body.frequency_penalty:
                processors = [penalties(body.presence_penalty, body.frequency_penalty, len(p))]
            seed = None if body.seed is None else body.seed + i * body.n
            sampling = SamplingConfig(temperature=body.temperature if body.temperature >= MIN_TEMPERATURE else 0.0,
                                      top_p=max(body.top_p, MIN_TOP_P),
                                      max_new_tokens=max_tokens if max_tokens is not None else block - len(p),
                                      seed=None if seed is None else seed % 2 ** 64)
            watermark = [state.watermark] if state.watermark is not None else []
            requests.append(Request(prompt=p, sampling=sampling, on_events=_tagged(deliver, i), n=body.n,
                                    stop_ids=stop_ids, logits_processors=list(processors) + watermark))
        submitted = []
        try:
            for r in requests:
                submitted.append(state.engine.submit(r))
        except QueueFull as e:
            for r in submitted:
                state.engine.cancel(r)
            raise APIError(429, f"the server is busy: {e}; retry in {RETRY_AFTER_S} s", type="rate_limit_error",
                           code="rate_limit_exceeded", headers={"Retry-After": str(RETRY_AFTER_S)}) from None
        except ValueError as e:
            for r in submitted:
                state.engine.cancel(r)
            raise APIError(400, str(e), code="invalid_value") from None

        run = Run(state, body, requests, prompts, queue, stops, chat=chat, texts=texts)
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(run.sse(http, include_usage), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        return await run.whole(http)

    def openapi() -> dict:  # the schema names the one model this server serves
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            schema = get_openapi(title=app.title, version=app.version, description=app.description, routes=app.routes)
            for name in ("ChatCompletionRequest", "CompletionRequest"):
                schema["components"]["schemas"][name]["properties"]["model"]["enum"] = [state.model_id]
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi
    app.add_middleware(Guard, state=state)
    return app


def _tagged(deliver, prompt_index: int):
    return lambda events: deliver([(prompt_index, e) for e in events])


DISCONNECTED = object()  # put in a request's queue when its client has gone


class Run:
    """One HTTP request's choices in flight: turns engine events into OpenAI chunks or one response."""

    def __init__(self, state: State, body: SamplingParams, requests: list[Request], prompts: list[list[int]],
                 queue: asyncio.Queue, stops: list[str], *, chat: bool, texts: list[str] | None):
        self.state, self.body, self.requests, self.queue, self.chat = state, body, requests, queue, chat
        self.n = body.n
        self.texts = [ChoiceText(state.tokenizer, stops) for _ in range(len(requests) * self.n)]
        self.finish: list[str | None] = [None] * len(self.texts)
        self.completion_tokens = 0
        self.prompt_tokens = sum(len(p) for p in prompts)
        self.prompt_texts = texts
        self.id = ("chatcmpl-" if chat else "cmpl-") + secrets.token_hex(12)
        self.created = int(time.time())
        self.error: str | None = None

    def cancel(self) -> None:
        for r in self.requests:
            self.state.engine.cancel(r)

    def done(self) -> bool:
        return all(f is not None for f in self.finish)

    async def events(self, http: HTTPRequest) -> AsyncIterator[list[tuple[int, str, str | None]]]:
        """Batches of (choice index, new text, finish reason or None) until every choice has finished.

        Everything the engine delivered since the last batch is merged: one entry per choice, its text
        pieces joined (a client that reads slower than the model gets fewer, longer deltas)."""
        watcher = asyncio.ensure_future(self._watch(http))  # one task for the request, not a timeout per token
        try:
            while not self.done():
                batches = [await self.queue.get()]
                if batches[0] is DISCONNECTED:
                    return
                while not self.queue.empty():
                    batches.append(self.queue.get_nowait())
                merged: dict[int, list] = {}
                for batch in batches:
                    if batch is DISCONNECTED:
                        return
                    for prompt_index, e in batch:
                        self._apply(prompt_index, e, merged)
                if merged:
                    yield [(index, text, finish) for index, (text, finish) in merged.items()]
        finally:
            watcher.cancel()

    async def _watch(self, http: HTTPRequest) -> None:
        """Tell events() when the client has gone (a stream also learns it from a failed send)."""
        while not await http.is_disconnected():
            await asyncio.sleep(1.0)
        self.queue.put_nowait(DISCONNECTED)

    def _apply(self, prompt_index: int, e: Event, merged: dict[int, list]) -> None:
        index = prompt_index * self.n + e.choice
        if self.finish[index] is not None:
            return
        text = self.texts[index]
        delta, finish = "", None
        if e.token is not None:
            self.completion_tokens += 1
            if e.finish != "stop":  # a stop token is counted, never shown
                delta = text.add(e.token)
            if text.stopped:
                finish = "stop"
                self.state.engine.cancel(self.requests[prompt_index], e.choice)
        if e.finish in ("stop", "length") and finish is None:
            finish = e.finish
            delta += text.finish()
        elif e.finish == "error":
            self.error = e.error
            finish = "error"
        elif e.finish == "cancelled" and finish is None:
            finish = "stop"  # only the server cancels a choice it still reads: a stop string matched
        if finish is not None:
            self.finish[index] = finish
        if delta or finish is not None:
            entry = merged.setdefault(index, ["", None])
            entry[0] += delta
            entry[1] = finish

    def usage(self) -> dict:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}

    def head(self, obj: str) -> dict:
        return {"id": self.id, "object": obj, "created": self.created, "model": self.state.model_id,
                "system_fingerprint": None}

    async def whole(self, http: HTTPRequest) -> JSONResponse:
        parts = [""] * len(self.texts)
        try:
            async for batch in self.events(http):
                for index, delta, _ in batch:
                    parts[index] += delta
        finally:
            if not self.done():
                self.cancel()
        if self.error:
            raise APIError(500, self.error, type="server_error")
        if not self.done():  # the client went away: nobody reads this
            return JSONResponse(error_body("client disconnected", "invalid_request_error"), status_code=499)
        if self.chat:
            choices = [{"index": i, "message": {"role": "assistant", "content": parts[i], "refusal": None},
                        "logprobs": None, "finish_reason": self.finish[i]} for i in range(len(parts))]
            return JSONResponse({**self.head("chat.completion"), "choices": choices, "usage": self.usage()})
        echo = getattr(self.body, "echo", False)
        choices = [{"index": i, "text": (self.prompt_texts[i // self.n] if echo else "") + parts[i], "logprobs": None,
                    "finish_reason": self.finish[i]} for i in range(len(parts))]
        return JSONResponse({**self.head("text_completion"), "choices": choices, "usage": self.usage()})

    async def sse(self, http: HTTPRequest, include_usage: bool) -> AsyncIterator[str]:
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        extra = {"usage": None} if include_usage else {}

        def chunk(choices: list[dict]) -> str:
            return "data: " + json.dumps({**self.head(obj), "choices": choices, **extra}) + "\n\n"

        try:
            if self.chat:
                yield chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                              "finish_reason": None} for i in range(len(self.texts))])
            elif getattr(self.body, "echo", False):
                yield chunk([{"index": i, "text": self.prompt_texts[i // self.n], "logprobs": None,
                              "finish_reason": None} for i in range(len(self.texts))])
            async for batch in self.events(http):
                for index, delta, finish in batch:  # one choice a chunk; the finish in a chunk of its own
                    if delta:
                        yield chunk([{"index": index, "delta": {"content": delta}, "logprobs": None,
                                      "finish_reason": None}] if self.chat else
                                    [{"index": index, "text": delta, "logprobs": None, "finish_reason": None}])
                    if finish is not None and finish != "error":
                        yield chunk([{"index": index, "delta": {}, "logprobs": None, "finish_reason": finish}]
                                    if self.chat else
                                    [{"index": index, "text": "", "logprobs": None, "finish_reason": finish}])
            if self.error:
                yield "data: " + json.dumps(error_body(self.error, "server_error")) + "\n\n"
            elif include_usage and self.done():
                yield "data: " + json.dumps({**self.head(obj), "choices": [], "usage": self.usage()}) + "\n\n"
            if self.done():
                yield "data: [DONE]\n\n"
        finally:
            if not self.done():  # the client went away mid-stream: free its rows now
                self.cancel()


class BackgroundServer:
    """``tinygpt serve`` in a thread of this process (notebooks, tests): ``with BackgroundServer(cfg) as s: s.url``.

    Binds ``cfg.host`` (127.0.0.1 by default) on ``cfg.port`` (0: a free port) and returns once /health
    says the model is ready (or raises with the load error)."""

    def __init__(self, cfg: ServeConfig, *, ready_timeout: float = 60.0):
        import socket

        import uvicorn

        self.cfg, self.app = cfg, create_app(cfg)
        self.sock = socket.socket(socket.AF_INET6 if ":" in cfg.host else socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.sock.bind((cfg.host, cfg.port))
        host, self.port = self.sock.getsockname()[:2]
        self.url = f"http://{'[' + host + ']' if ':' in host else host}:{self.port}"
        self.server = uvicorn.Server(uvicorn.Config(self.app, log_level=cfg.log_level, timeout_graceful_shutdown=2))
        self.ready_timeout = ready_timeout
        self.thread: threading.Thread | None = None

    @property
    def state(self) -> State:
        return self.app.state.tinygpt

    def start(self) -> BackgroundServer:
        if self.thread is not None:
            return self
        self.thread = threading.Thread(target=self.server.run, kwargs={"sockets": [self.sock]}, daemon=True,
                                       name="tinygpt-uvicorn")
        self.thread.start()
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.state.load_error:
                self.stop()
                raise RuntimeError(self.state.load_error)
            if self.server.started and self.state.ready:
                return self
            time.sleep(0.02)
        self.stop()
        raise TimeoutError(f"the server was not ready within {self.ready_timeout} s")

    def stop(self) -> None:
        self.server.should_exit = True
        if self.thread is not None:
            self.thread.join(timeout=10)
            self.thread = None
        self.sock.close()

    def __enter__(self) -> BackgroundServer:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()
