"""Greedy decoding throughput: tinygpt.generate vs Hugging Face `generate` (with its KV cache), same weights.

Prints new tokens/s for batch 1 and batch 16 (default shape: 4 layers, width 256, 4 heads, vocab 4096),
the ratio, and whether both produced the same tokens. Medians over --repeats runs after one warmup.

    python benchmarks/decode_throughput.py [--arch gpt2|llama] [--new-tokens 256] [--batches 1,16]
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from tinygpt.generate import SamplingConfig, generate
from tinygpt.model import GPT, ModelConfig, hf_config_dict, to_hf_state_dict


def hf_twin(model: GPT):
    import transformers

    cfg = model.cfg
    if cfg.arch == "gpt2":
        hf = transformers.GPT2LMHeadModel(transformers.GPT2Config(**hf_config_dict(cfg)))
    else:
        hf = transformers.LlamaForCausalLM(transformers.LlamaConfig(**hf_config_dict(cfg)))
    hf.load_state_dict(to_hf_state_dict(model), strict=False)
    return hf.eval()


def timed(fn, repeats: int) -> tuple[float, object]:
    fn()  # warmup
    times, out = [], None
    for _ in range(repeats):
        start = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times), out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", default="gpt2", choices=["gpt2", "llama"])
    ap.add_argument("--n-layer", type=int, default=4)
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--n-head", type=int, default=4)
    ap.add_argument("--vocab-size", type=int, default=4096)
    ap.add_argument("--prompt-len", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--batches", default="1,16", help="comma-separated batch sizes")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()

    torch.manual_seed(0)
    # context 256, stretched if prompt + new tokens need more positions (only the position table grows)
    block = max(256, args.prompt_len + args.new_tokens)
    cfg = ModelConfig(vocab_size=args.vocab_size, block_size=block, n_layer=args.n_layer, n_head=args.n_head,
                      d_model=args.d_model, arch=args.arch)
    model = GPT(cfg).eval()
    hf = hf_twin(model)
    sampling = SamplingConfig(temperature=0, max_new_tokens=args.new_tokens)
    print(f"decode: {args.arch} L{args.n_layer} d{args.d_model} H{args.n_head} V{args.vocab_size}, prompt "
          f"{args.prompt_len}, {args.new_tokens} new tokens greedy, torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, median of {args.repeats}")
    print(f"{'batch':>5} | {'tinygpt tok/s':>13} | {'HF generate tok/s':>17} | {'ratio':>5} | same tokens")
    for batch in (int(b) for b in args.batches.split(",")):
        prompts = torch.randint(0, args.vocab_size, (batch, args.prompt_len))
        ours_s, ours = timed(lambda: generate(model, prompts.tolist(), sampling), args.repeats)

        def run_hf():
            with torch.inference_mode():
                return hf.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=False,
                                   max_new_tokens=args.new_tokens, min_new_tokens=args.new_tokens,
                                   pad_token_id=0, eos_token_id=None)

        hf_s, theirs = timed(run_hf, args.repeats)
        same = theirs[:, args.prompt_len:].tolist() == ours
        ours_tps, hf_tps = batch * args.new_tokens / ours_s, batch * args.new_tokens / hf_s
        print(f"{batch:>5} | {ours_tps:>13,.0f} | {hf_tps:>17,.0f} | {ours_tps / hf_tps:>5.2f} | {same}")


if __name__ == "__main__":
    main()
