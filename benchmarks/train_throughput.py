"""Training throughput and MFU: tinygpt vs Hugging Face transformers of the same shape and weights.

Measures, in the same run, a fp32 matmul peak (GFLOP/s), then for each arch (tinygpt gpt2 vs
GPT2LMHeadModel, tinygpt llama vs LlamaForCausalLM) and precision (fp32, bf16 autocast) the median
time of a forward + cross-entropy + backward + AdamW step after warmup. Prints tokens/s, MFU
(flops_per_token * tokens/s / measured peak, PaLM's 6N + 12LHQT count) and the tinygpt / HF ratio.

    python benchmarks/train_throughput.py [--archs gpt2,llama] [--batch 16] [--steps 10] [--warmup 3]
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import statistics
import time

import torch
import torch.nn.functional as F

from tinygpt.model import GPT, ModelConfig, hf_config_dict, to_hf_state_dict
from tinygpt.runtime import keep_freed_memory


def matmul_peak_gflops(n: int = 2048, repeats: int = 10) -> float:
    """fp32 GEMM throughput (GFLOP/s) on an n x n x n product: the peak MFU is measured against."""
    a, b = torch.randn(n, n), torch.randn(n, n)
    for _ in range(3):
        a @ b
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        a @ b
        times.append(time.perf_counter() - start)
    return 2 * n**3 / min(times) / 1e9  # the best run: a peak, not a typical value


def build(impl: str, cfg: ModelConfig, reference: GPT) -> torch.nn.Module:
    if impl == "tinygpt":
        return reference
    import transformers

    if cfg.arch == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(cfg)))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(cfg)))
    hf.load_state_dict(to_hf_state_dict(reference), strict=False)
    return hf


def make_optimizer(model: torch.nn.Module) -> torch.optim.Optimizer:
    try:  # the fused CPU kernel (torch >= 2.4); fall back to the multi-tensor one
        return torch.optim.AdamW(model.parameters(), lr=1e-4, fused=True)
    except (RuntimeError, TypeError):
        return torch.optim.AdamW(model.parameters(), lr=1e-4, foreach=True)


def step_times(model, impl: str, dtype: str, batch: int, seq: int, vocab: int, warmup: int, steps: int,
               hf_loss: str) -> list[float]:
    model.train()
    opt = make_optimizer(model)
    gen = torch.Generator().manual_seed(0)
    data = torch.randint(0, vocab, (batch, seq + 1), generator=gen)
    inputs, targets = data[:, :-1], data[:, 1:]
    autocast = torch.autocast("cpu", dtype=torch.bfloat16) if dtype == "bf16" else contextlib.nullcontext()
    times = []
    for i in range(warmup + steps):
        start = time.perf_counter()
        with autocast:
            if impl == "hf" and hf_loss == "native":  # HF's own path: labels shifted inside (T - 1 predictions)
                loss = model(input_ids=inputs, labels=inputs, use_cache=False).loss
            else:
                logits = model(inputs) if impl == "tinygpt" else model(input_ids=inputs, use_cache=False).logits
                loss = F.cross_entropy(logits.float().view(-1, vocab), targets.reshape(-1))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        if i >= warmup:
            times.append(time.perf_counter() - start)
    return times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--archs", default="gpt2,llama")
    ap.add_argument("--dtypes", default="fp32,bf16")
    ap.add_argument("--impls", default="tinygpt,hf")
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--block-size", type=int, default=256)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--threads", type=int, default=0, help="torch.set_num_threads (0 = torch's default)")
    ap.add_argument("--hf-loss", default="shared", choices=["shared", "native"],
                    help="shared: the same F.cross_entropy on logits for both; native: HF's labels= loss "
                         "(T - 1 predictions per row, slightly less work for HF)")
    ap.add_argument("--glibc-default", action="store_true", help="leave glibc's malloc settings alone")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    kept = False if args.glibc_default else keep_freed_memory()

    # other processes share this machine: the peak is the best of several measurements spread over the run
    peak = matmul_peak_gflops()
    tokens = args.batch * args.block_size
    rows = []  # (arch, dtype, impl, seconds per step, flops per token)
    for arch in args.archs.split(","):
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=args.vocab_size, block_size=args.block_size, n_layer=args.n_layer,
                          n_head=args.n_head, d_model=args.d_model, arch=arch)
        flops = GPT(cfg).flops_per_token(args.block_size)
        for dtype in args.dtypes.split(","):
            for impl in args.impls.split(","):
                torch.manual_seed(0)
                model = build(impl, cfg, GPT(cfg))
                seconds = statistics.median(step_times(model, impl, dtype, args.batch, args.block_size,
                                                       args.vocab_size, args.warmup, args.steps, args.hf_loss))
                rows.append((arch, dtype, impl, seconds, flops))
                print(f"  measured {arch} {dtype} {impl}: {tokens / seconds:,.0f} tokens/s", file=sys.stderr, flush=True)
            peak = max(peak, matmul_peak_gflops())

    print(f"train: L{args.n_layer} d{args.d_model} H{args.n_head} T{args.block_size} V{args.vocab_size} "
          f"B{args.batch}, AdamW, median of {args.steps} steps after {args.warmup} warmup; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads; fp32 matmul peak {peak:,.0f} GFLOP/s; HF loss {args.hf_loss}; "
          f"glibc keeps freed memory: {kept}")
    print(f"{'arch':<6} {'dtype':<5} | {'impl':<8} | {'ms/step':>8} | {'tokens/s':>9} | {'MFU':>6} | tinygpt / HF")
    speed = {(a, d, i): tokens / sec for a, d, i, sec, _ in rows}
    for arch, dtype, impl, seconds, flops in rows:
        ratio = speed.get((arch, dtype, "hf"))
        ratio = f"{speed[(arch, dtype, impl)] / ratio:.2f}x" if impl == "tinygpt" and ratio else ""
        print(f"{arch:<6} {dtype:<5} | {impl:<8} | {seconds * 1e3:>8.0f} | {tokens / seconds:>9,.0f} | "
              f"{flops * tokens / seconds / 1e9 / peak:>6.1%} | {ratio}")

if __name__ == "__main__":
    main()
