"""int8 (tinygpt.quantize: torch's dynamic int8 Linear, torchao's int8 weights) against fp32 in one run:
greedy decode tokens/s and perplexity.

Without --checkpoint it trains the model it measures first (world stories, a fresh BPE, --train-steps
AdamW steps), so perplexity means something; with one it measures that checkpoint. Perplexity is on
held-out world stories (another seed) for the fp32 model and its int8 copy; decode is greedy from
16-token story prompts, medians of --repeats runs after one warmup, the variants interleaved so
load on the machine hits them alike.

    python benchmarks/int8_decode.py [--checkpoint runs/demo/pretrain] [--arch llama] [--batches 1,16]
"""

from __future__ import annotations

import argparse
import copy
import math
import platform
import random
import statistics
import subprocess
import time

import torch
import torch.nn.functional as F

from tinygpt import quantize
from tinygpt.checkpoint import load_model, load_tokenizer
from tinygpt.generate import SamplingConfig, generate
from tinygpt.model import GPT, ModelConfig
from tinygpt.tokenizer import Tokenizer
from tinygpt.world.stories import generate_story


def host() -> str:
    try:
        info = subprocess.run(["lscpu"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in info.splitlines() if ":" in line)
    name = fields.get("Model name", "?").strip()
    flags = fields.get("Flags", "").split()
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx_vnni", "amx_int8") if f in flags]
    return f"{name}, {fields.get('CPU(s)', '?').strip()} CPUs ({', '.join(isa) or 'no AVX2'})"


def stories(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [generate_story(rng).text for _ in range(n)]


def train(args) -> tuple[GPT, Tokenizer]:
    texts = stories(3000, seed=0)
    tok = Tokenizer.train(texts, vocab_size=args.vocab_size, show_progress=False)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=256, n_layer=args.n_layer, n_head=args.n_head,
                      d_model=args.d_model, arch=args.arch)
    torch.manual_seed(0)
    model = GPT(cfg)
    ids = torch.tensor([i for t in texts for i in tok.encode(t, add_bos=True, add_eos=True)])
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    start = time.perf_counter()
    for step in range(args.train_steps):
        lr = 3e-3 * min(1.0, (step + 1) / 20) * 0.5 * (1 + math.cos(math.pi * step / args.train_steps))
        for group in opt.param_groups:
            group["lr"] = lr
        starts = torch.randint(0, len(ids) - 129, (16,), generator=g)
        x = torch.stack([ids[s:s + 128] for s in starts])           # (16, 128)
        y = torch.stack([ids[s + 1:s + 129] for s in starts])
        loss = F.cross_entropy(model(x).flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    print(f"trained {model.num_params() / 1e6:.2f}M params for {args.train_steps} steps in "
          f"{time.perf_counter() - start:.0f} s (last loss {loss.item():.3f})")
    return model.eval(), tok


@torch.inference_mode()
def perplexity(model: GPT, rows: torch.Tensor) -> float:
    total, count = 0.0, 0
    for batch in rows.split(8):
        logits = model(batch[:, :-1])
        total += F.cross_entropy(logits.flatten(0, 1), batch[:, 1:].flatten(), reduction="sum").item()
        count += batch[:, 1:].numel()
    return math.exp(total / count)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--checkpoint", default="", help="measure this checkpoint (default: train one first)")
    ap.add_argument("--arch", default="llama", choices=["gpt2", "llama"])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--train-steps", type=int, default=120)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0: torch's default)")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    if args.checkpoint:
        model, _ = load_model(args.checkpoint)
        model.eval()
        tok = load_tokenizer(args.checkpoint)
    else:
        model, tok = train(args)
    variants = {"fp32": model, "int8 torch": quantize.quantize_int8(copy.deepcopy(model), backend="torch"),
                "int8 torchao": quantize.quantize_int8(copy.deepcopy(model), backend="torchao")}
    cfg = model.cfg

    held_out = torch.tensor([i for t in stories(400, seed=12345) for i in tok.encode(t, add_bos=True, add_eos=True)])
    T = min(cfg.block_size, 256)
    rows = held_out[: (len(held_out) // T) * T].view(-1, T)[:64]  # (<=64, T)
    ppl = {name: perplexity(m, rows) for name, m in variants.items()}

    import torchao

    print(f"host: {host()}; torch {torch.__version__}, torchao {torchao.__version__}, {torch.get_num_threads()} threads")
    print(f"model: {cfg.arch} L{cfg.n_layer} d{cfg.d_model} H{cfg.n_head} V{cfg.vocab_size}, "
          f"{model.num_params() / 1e6:.2f}M params")
    print(f"\n{'variant':<13} | {'weights MB':>10} | {'perplexity':>10} | {'vs fp32':>7}")
    print(f"{'-' * 13}-|{'-' * 11}:|{'-' * 11}:|{'-' * 8}:")
    for name, m in variants.items():
        print(f"{name:<13} | {quantize.weight_bytes(m) / 1e6:>10.1f} | {ppl[name]:>10.4f} | {ppl[name] / ppl['fp32']:>7.4f}")
    print(f"(perplexity on {rows.numel():,} held-out story tokens; the float embedding is kept for the lookup)")
    print(f"\ndecode: greedy, 16-token prompts, {args.new_tokens} new tokens, median of {args.repeats} (tokens/s)")
    names = list(variants)
    print(f"{'batch':>5} | " + " | ".join(f"{n:>12}" for n in names) + " | " +
          " | ".join(f"{n + '/fp32':>17}" for n in names[1:]) + " | same greedy tokens as fp32")
    print(f"{'-' * 5}:|" + "|".join(f"{'-' * 13}:" for _ in names) + "|" + "|".join(f"{'-' * 18}:" for _ in names[1:])
          + "|" + "-" * 27)
    sampling = SamplingConfig(temperature=0.0, max_new_tokens=args.new_tokens)
    texts = stories(64, seed=777)
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = [tok.encode(texts[i % len(texts)], add_bos=True)[:16] for i in range(batch)]
        times: dict[str, list[float]] = {n: [] for n in names}
        outs: dict[str, list[list[int]]] = {}
        with torch.inference_mode():
            for m in variants.values():
                generate(m, prompts, sampling)  # warmup
            for _ in range(args.repeats):
                for n, m in variants.items():
                    start = time.perf_counter()
                    outs[n] = generate(m, prompts, sampling)
                    times[n].append(time.perf_counter() - start)
        tps = {n: batch * args.new_tokens / statistics.median(t) for n, t in times.items()}
        same = [sum(a == b for r, q in zip(outs["fp32"], outs[n]) for a, b in zip(r, q)) /
                max(1, sum(len(r) for r in outs["fp32"])) for n in names[1:]]
        print(f"{batch:>5} | " + " | ".join(f"{tps[n]:>12,.0f}" for n in names) + " | " +
              " | ".join(f"{tps[n] / tps['fp32']:>16.2f}x" for n in names[1:]) + " | " +
              ", ".join(f"{x:.0%}" for x in same))


if __name__ == "__main__":
    main()
