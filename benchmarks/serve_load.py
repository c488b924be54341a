"""Load on `tinygpt serve`: concurrent streaming chat clients, batched decoding vs one request at a time.

Starts the real server (`python -m tinygpt.cli serve`, a subprocess on 127.0.0.1) on a demo-sized model
(llama 1m: 6 layers, width 96, vocab 2048, context 256, as configs/demo.toml trains; random weights unless
--checkpoint names a trained one) and drives it with 1, 8 and 32 concurrent clients, each streaming
--requests chat completions of --max-tokens tokens back to back (stream_options.include_usage, so tokens are
the server's own count). The same clients run against the same server started with --max-batch 1: one
request decoded at a time, the rest waiting in its queue. Then an overload run: a small batch and queue,
a burst of clients at once, every 429 retried after its Retry-After, until all are answered.

Prints, per (server, clients): aggregate tokens/s (all clients' tokens / wall time), time to first token
p50/p99 (request sent -> first content chunk), per-stream tokens/s, and requests answered / refused (429) /
lost. Medians over --repeats runs of each row. Nothing here asserts a time.

    python benchmarks/serve_load.py [--clients 1,8,32] [--requests 2] [--max-tokens 64] [--repeats 3]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import torch

from tinygpt.checkpoint import save_checkpoint
from tinygpt.model import GPT, model_config
from tinygpt.tokenizer import Tokenizer
from tinygpt.world.stories import generate_story

PROMPTS = ["Tell me a story about a cat who finds a red ball.", "Write a short story about a dog and a boat.",
           "Tell me a story about Lily and the big tree.", "What happened when Tom went to the park?"]


def demo_checkpoint(root: Path) -> Path:
    """The demo's model shape with random weights and a BPE trained on the world's stories."""
    rng = random.Random(0)
    tok = Tokenizer.train([generate_story(rng).text for _ in range(3000)], vocab_size=2048, show_progress=False)
    torch.manual_seed(0)
    cfg = model_config("1m", arch="llama", vocab_size=tok.vocab_size, block_size=256)
    path = root / "demo" / "ppo"
    save_checkpoint(path, model=GPT(cfg), model_config=cfg, tokenizer_json=tok.to_str(), meta={"stage": "bench"})
    return path


class Server:
    """`tinygpt serve` in a subprocess on 127.0.0.1 with a free port."""

    def __init__(self, checkpoint: Path, **flags):
        args = [sys.executable, "-m", "tinygpt.cli", "serve", str(checkpoint), "--port", "0", "--log-level", "warning"]
        for k, v in flags.items():
            args += ["--" + k.replace("_", "-"), str(v)]
        self.proc = subprocess.Popen(args, stderr=subprocess.PIPE, text=True)
        line = ""
        while "http://" not in line:
            line = self.proc.stderr.readline()
            if not line and self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}")
        self.url = re.search(r"http://[^/\s]+", line).group(0)
        deadline = time.time() + 120
        while time.time() < deadline:
            try:
                if httpx.get(self.url + "/health").status_code == 200:
                    self.model = httpx.get(self.url + "/v1/models").json()["data"][0]["id"]
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError("the server never became ready")

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except subprocess.TimeoutExpired:
            self.proc.kill()


async def one_request(client: httpx.AsyncClient, server: Server, prompt: str, max_tokens: int, seed: int) -> dict:
    """One streamed chat completion: status, time to first content token, tokens, seconds."""
    body = {"model": server.model, "messages": [{"role": "user", "content": prompt}], "max_tokens": max_tokens,
            "temperature": 0.7, "top_p": 0.9, "seed": seed, "stream": True, "stream_options": {"include_usage": True}}
    start = time.perf_counter()
    ttft, tokens, done = None, 0, False
    async with client.stream("POST", server.url + "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            await r.aread()
            return {"status": r.status_code, "retry_after": r.headers.get("retry-after")}
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                done = True
                break
            chunk = json.loads(data)
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if ttft is None and chunk["choices"] and chunk["choices"][0]["delta"].get("content"):
                ttft = time.perf_counter() - start
    seconds = time.perf_counter() - start
    return {"status": 200 if done else -1, "ttft": ttft if ttft is not None else seconds, "tokens": tokens,
            "seconds": seconds}


async def load(server: Server, clients: int, requests: int, max_tokens: int, *, retry: bool = False) -> dict:
    """`clients` concurrent clients, each sending `requests` requests back to back; 429s retried if `retry`."""
    results: list[dict] = []
    refused = 0
    limits = httpx.Limits(max_connections=clients + 8, max_keepalive_connections=clients + 8)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def run_client(c: int):
            nonlocal refused
            for i in range(requests):
                while True:
                    res = await one_request(client, server, PROMPTS[(c + i) % len(PROMPTS)], max_tokens, c * 1000 + i)
                    if res["status"] == 429:
                        refused += 1
                        if retry:
                            await asyncio.sleep(float(res["retry_after"] or 1))
                            continue
                    results.append(res)
                    break

        start = time.perf_counter()
        await asyncio.gather(*(run_client(c) for c in range(clients)))
        wall = time.perf_counter() - start
    ok = [r for r in results if r["status"] == 200]
    ttfts = sorted(r["ttft"] for r in ok)
    return {"wall": wall, "tokens": sum(r["tokens"] for r in ok), "answered": len(ok), "refused": refused,
            "lost": clients * requests - len(ok) - (0 if retry else refused),
            "ttft_p50": percentile(ttfts, 50), "ttft_p99": percentile(ttfts, 99),
            "stream_tps": statistics.median(r["tokens"] / r["seconds"] for r in ok) if ok else 0.0}


def percentile(sorted_values: list[float], q: float) -> float:
    if not sorted_values:
        return float("nan")
    k = (len(sorted_values) - 1) * q / 100
    lo, hi = int(k), min(int(k) + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (k - lo)


def median_of(runs: list[dict]) -> dict:
    out = {k: statistics.median(r[k] for r in runs) for k in ("ttft_p50", "ttft_p99", "stream_tps")}
    out["tps"] = statistics.median(r["tokens"] / r["wall"] for r in runs)
    out["tps_runs"] = [r["tokens"] / r["wall"] for r in runs]
    for k in ("answered", "refused", "lost", "tokens"):
        out[k] = sum(r[k] for r in runs)
    return out


def host() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        model = re.search(r"Model name:\s*(.+)", info).group(1).strip()
    except Exception:
        model = "unknown CPU"
    load1 = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    return f"{model}, {os.cpu_count()} CPUs, torch {torch.__version__}, load average {load1:.1f} at start"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="", help="serve this checkpoint instead of a random demo-shaped one")
    ap.add_argument("--clients", default="1,8,32", help="comma-separated concurrent clients")
    ap.add_argument("--requests", type=int, default=2, help="requests per client, back to back")
    ap.add_argument("--max-tokens", type=int, default=64, help="max_tokens of every request")
    ap.add_argument("--repeats", type=int, default=3, help="runs of each row (medians reported)")
    ap.add_argument("--max-batch", type=int, default=32, help="the batched server's --max-batch")
    ap.add_argument("--threads", type=int, default=1,
                    help="the servers' --threads; 1 because 2 threads on a shared 2-core machine measured 20x slower")
    ap.add_argument("--overload-clients", type=int, default=48, help="clients in the overload burst")
    args = ap.parse_args()
    clients = [int(c) for c in args.clients.split(",")]

    with tempfile.TemporaryDirectory() as tmp:
        ckpt = Path(args.checkpoint) if args.checkpoint else demo_checkpoint(Path(tmp))
        print(f"host: {host()}")
        print(f"model: {ckpt}; {args.requests} streamed chat requests per client, max_tokens={args.max_tokens}, "
              f"temperature 0.7, top_p 0.9; medians of {args.repeats} runs\n")
        # Both servers stay up; each repeat runs every row once, alternating one-at-a-time and batched, so a
        # change in the machine's load between rows hits both sides alike (an idle server uses no CPU).
        base_label, batch_label = "one at a time (--max-batch 1)", f"batched (--max-batch {args.max_batch})"
        servers = {}
        try:
            for label, batch in [(base_label, 1), (batch_label, args.max_batch)]:
                servers[label] = Server(ckpt, max_batch=batch, max_queue=max(clients) * 2, threads=args.threads)
                asyncio.run(load(servers[label], 2, 1, 8))  # warm up
            runs: dict[tuple[str, int], list[dict]] = {}
            for _ in range(args.repeats):
                for c in clients:
                    for label in (base_label, batch_label):
                        runs.setdefault((label, c), []).append(asyncio.run(load(servers[label], c, args.requests,
                                                                                args.max_tokens)))
        finally:
            for server in servers.values():
                server.stop()
        rows = {key: median_of(r) for key, r in runs.items()}

        print("| server | clients | tokens/s (aggregate) | TTFT p50 | TTFT p99 | tokens/s per stream | "
              "answered / 429 / lost |")
        print("|---|---:|---:|---:|---:|---:|---|")
        for label in (base_label, batch_label):
            for c in clients:
                r = rows[(label, c)]
                print(f"| {label} | {c} | {r['tps']:,.0f} | {r['ttft_p50'] * 1000:,.0f} ms | "
                      f"{r['ttft_p99'] * 1000:,.0f} ms | {r['stream_tps']:,.0f} | {r['answered']} / {r['refused']} / "
                      f"{r['lost']} |")
        print()
        for c in clients:
            ratios = [b["tokens"] / b["wall"] / (a["tokens"] / a["wall"])
                      for a, b in zip(runs[(base_label, c)], runs[(batch_label, c)])]
            print(f"{c} clients: batched / one-at-a-time aggregate tokens/s = "
                  f"{rows[(batch_label, c)]['tps'] / rows[(base_label, c)]['tps']:.2f}x (ratio of medians); "
                  f"per repeat {', '.join(f'{x:.2f}x' for x in ratios)} (median {statistics.median(ratios):.2f}x)")

        # --- overload: a small batch and queue, a burst of clients, 429s retried after Retry-After ---
        print(f"\noverload: --max-batch 4 --max-queue 8, {args.overload_clients} clients at once, 1 request each, "
              "each 429 retried after its Retry-After")
        server = Server(ckpt, max_batch=4, max_queue=8, threads=args.threads)
        try:
            burst = asyncio.run(load(server, args.overload_clients, 1, args.max_tokens, retry=True))
            after = asyncio.run(load(server, 1, 1, args.max_tokens))
        finally:
            server.stop()
        print(f"| burst | answered {burst['answered']} of {args.overload_clients} | 429 responses {burst['refused']} "
              f"| lost {burst['lost']} | wall {burst['wall']:.1f} s | {burst['tokens'] / burst['wall']:,.0f} tokens/s |")
        print(f"| after the burst | answered {after['answered']} of 1 | 429 responses {after['refused']} | "
              f"TTFT {after['ttft_p50'] * 1000:,.0f} ms | {after['stream_tps']:,.0f} tokens/s |")


if __name__ == "__main__":
    main()
