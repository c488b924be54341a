"""``tinygpt serve``: an OpenAI-compatible HTTP server for a checkpoint, with batched decoding and a web chat page.

    tinygpt serve runs/demo/ppo                  # then open http://127.0.0.1:8000/
    tinygpt serve runs/demo/ppo --api-key s3cret --host 0.0.0.0 --port 8080

Endpoints: ``POST /v1/chat/completions``, ``POST /v1/completions``, ``GET /v1/models``, ``GET /health``
(503 while the model loads, 200 when ready), the page at ``/`` and the schema at ``/openapi.json``.
Point the ``openai`` client at ``http://127.0.0.1:8000/v1``.

The package is three layers that know less and less:
  * this module: the config (``tinygpt serve --help``) and :func:`main`, which loads nothing itself;
  * ``app.py``: HTTP (FastAPI): routes, the chat template (``render_chat``), server-sent events, keys and limits;
  * ``protocol.py``: OpenAI's request schemas, the error envelope, the text of a choice and its stop strings;
  * ``engine.py``: the continuous-batching decode loop on token ids.

FastAPI and uvicorn come with the ``serve`` extra (``pip install 'tinygpt[serve]'``); ``--help``
works without them.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

from tinygpt.config import opt

API_KEY_ENV = "TINYGPT_API_KEY"
LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass
class ServeConfig:
    checkpoint: str = opt("", "checkpoint to serve (a run directory such as runs/demo/ppo, or a checkpoint directory)",
                          required=True)
    host: str = opt("127.0.0.1", "address to bind; anything but loopback is reachable from the network (warned without a key)")
    port: int = opt(8000, "TCP port (0: any free port, printed at start)")
    api_key: str = opt("", f"require 'Authorization: Bearer KEY' on /v1/* (empty: ${API_KEY_ENV}, else no key)")
    model_name: str = opt("", "model id in /v1/models and responses (empty: the checkpoint path's last two parts)")
    max_batch: int = opt(16, "most sequences decoded together (also the largest n a request may ask for)")
    max_queue: int = opt(64, "most requests waiting for a free batch row; past it requests get 429 + Retry-After")
    max_body_kb: int = opt(1024, "largest request body in KiB (413 past it)")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    threads: int = opt(0, "torch CPU threads for the decode loop (0: torch's default)")
    quantize: str = opt("none", "none, or int8: int8 weights (tinygpt.quantize), 2.7x smaller; on the AVX2 test "
                                "host decoding was not faster than float32 (benchmarks/int8_decode.py)")
    watermark_key: str = opt("", "secret key: watermark every answer (tinygpt.watermark; detect with "
                                 "`tinygpt watermark detect`); '' = off")
    watermark_gamma: float = opt(0.25, "watermark: share of the vocabulary on each green list")
    watermark_delta: float = opt(2.0, "watermark: bias added to green logits")
    log_level: str = opt("info", "uvicorn log level: critical, error, warning, info, debug")

    def __post_init__(self) -> None:
        if self.max_batch < 1:
            raise ValueError(f"max_batch must be >= 1, got {self.max_batch}")
        if self.max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {self.max_queue}")
        if self.max_body_kb < 1:
            raise ValueError(f"max_body_kb must be >= 1, got {self.max_body_kb}")
        if not 0 <= self.port <= 65535:
            raise ValueError(f"port must be in 0..65535, got {self.port}")

    def key(self) -> str:
        return self.api_key or os.environ.get(API_KEY_ENV, "")


def main(cfg: ServeConfig) -> dict:
    """Run the server until Ctrl-C / SIGTERM."""
    if not cfg.checkpoint:
        raise ValueError("give a checkpoint, e.g. tinygpt serve runs/demo/ppo")
    from tinygpt.checkpoint import resolve_checkpoint

    resolve_checkpoint(cfg.checkpoint)  # a typo fails here (one line from the CLI), not as a server stuck at 503
    try:
        import uvicorn

        from tinygpt.serve.app import create_app, exposure_warning
    except ImportError as e:
        raise SystemExit(f"tinygpt serve needs the serve extra ({e.name} is missing): pip install 'tinygpt[serve]'") from None
    import socket
    import sys

    warning = exposure_warning(cfg)
    if warning:
        print(warning, file=sys.stderr, flush=True)
    app = create_app(cfg)
    family = socket.AF_INET6 if ":" in cfg.host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((cfg.host, cfg.port))
    except OSError as e:
        sock.close()
        raise OSError(f"cannot bind {cfg.host}:{cfg.port}: {e.strerror}") from None
    host, port = sock.getsockname()[:2]
    shown = f"[{host}]" if ":" in host else host
    print(f"tinygpt serve: {cfg.checkpoint} on http://{shown}:{port}/  (chat page at /, OpenAI API at /v1, "
          f"key {'required' if cfg.key() else 'not required'})", file=sys.stderr, flush=True)
    server = uvicorn.Server(uvicorn.Config(app, log_level=cfg.log_level, timeout_graceful_shutdown=5))
    server.run(sockets=[sock])
    return {"host": host, "port": port}
