"""``tinygpt sample CKPT --prompt ...``: text in, text out, around the token-level sampler.

Encodes the prompts with the checkpoint's own tokenizer, calls tinygpt.generate (which knows only
token ids), decodes, and cuts at stop strings. With ``--stream`` one prompt's tokens are printed
as they come. An empty prompt means "start a story": the sampler starts from BOS. A prompt plus
``--max-new-tokens`` past the model's context gets the room the context leaves, and is told so.
With ``--watermark-key`` the samples carry the green-list watermark of :mod:`tinygpt.watermark`
(``tinygpt watermark detect`` finds it).

    tinygpt sample runs/x/pretrain --prompt "Once upon a time" --temperature 0.7 --stream
    tinygpt sample runs/x/pretrain --prompt "" --num-samples 4 --seed 1
"""

from __future__ import annotations

import sys
from dataclasses import dataclass, replace

import torch

from tinygpt import quantize, runtime
from tinygpt.checkpoint import load_model, load_tokenizer
from tinygpt.config import opt
from tinygpt.generate import SamplingConfig, generate, stop_strings, stream
from tinygpt.watermark import DEFAULT_DELTA, DEFAULT_GAMMA, watermark_processor


@dataclass
class SampleConfig:
    checkpoint: str = opt("", "checkpoint directory, or a run directory (its latest checkpoint)", required=True)
    prompt: list[str] = opt([""], "prompt(s); '' starts a story from BOS")
    num_samples: int = opt(1, "samples per prompt")
    max_new_tokens: int = opt(200, "most tokens to generate per sample")
    temperature: float = opt(0.8, "softmax temperature; 0 = greedy")
    top_k: int = opt(0, "keep the k most likely tokens (0 = off)")
    top_p: float = opt(0.95, "nucleus sampling threshold (1 = off)")
    repetition_penalty: float = opt(1.0, "penalty on tokens already seen (1 = off)")
    stop: list[str] = opt([], "stop strings; the output is cut before them")
    seed: int = opt(0, "sampling seed (same seed, same text)")
    stream: bool = opt(False, "print tokens as they come (one prompt, one sample)")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    watermark_key: str = opt("", "secret key: watermark the samples (green list seeded by the previous token); '' = off")
    watermark_gamma: float = opt(DEFAULT_GAMMA, "watermark: share of the vocabulary on each green list")
    watermark_delta: float = opt(DEFAULT_DELTA, "watermark: bias added to green logits (larger: easier to detect, "
                                                "further from the model)")
    quantize: str = opt("none", quantize.HELP)


def main(cfg: SampleConfig) -> list[str]:
    if not cfg.checkpoint:
        raise ValueError("a checkpoint is required: tinygpt sample CKPT --prompt ...")
    device = runtime.resolve_device(cfg.device)
    model, _ = load_model(cfg.checkpoint, device=device)
    model = quantize.apply(model.eval(), cfg.quantize)
    tok = load_tokenizer(cfg.checkpoint)
    scfg = SamplingConfig(temperature=cfg.temperature, top_k=cfg.top_k, top_p=cfg.top_p,
                          repetition_penalty=cfg.repetition_penalty, max_new_tokens=cfg.max_new_tokens,
                          seed=cfg.seed)
    stopper = stop_strings(tok.decode, cfg.stop) if cfg.stop else None
    procs = [watermark_processor(cfg.watermark_key, cfg.watermark_gamma, cfg.watermark_delta,
                                 vocab_size=model.cfg.vocab_size)] if cfg.watermark_key else []
    prompts = [p for p in cfg.prompt for _ in range(cfg.num_samples)]
    ids = [tok.encode(p, add_bos=True) for p in prompts]
    room = model.cfg.block_size - max(len(i) for i in ids)
    if room < 1:
        raise ValueError(f"the prompt takes {max(len(i) for i in ids)} tokens, all of the model's context "
                         f"({model.cfg.block_size}): shorten it")
    if cfg.max_new_tokens > room:
        print(f"note: --max-new-tokens {cfg.max_new_tokens} does not fit the model's context of "
              f"{model.cfg.block_size} tokens after the prompt: sampling {room}", file=sys.stderr)
        scfg = replace(scfg, max_new_tokens=room)

    if cfg.stream:
        if len(ids) != 1:
            raise ValueError("--stream prints one sample: give one prompt and --num-samples 1")
        sys.stdout.write(prompts[0])
        new: list[int] = []
        shown = ""
        for t in stream(model, ids[0], scfg, eos_id=tok.eos_id, should_stop=stopper,
                        logits_processors=procs):
            new.append(t)
            text = tok.decode(new)
            if not text.endswith("\ufffd"):  # wait for the rest of a multi-byte character
                sys.stdout.write(text[len(shown):])
                sys.stdout.flush()
                shown = text
        sys.stdout.write("\n")
        return [prompts[0] + _cut(tok.decode(new), cfg.stop)]

    with torch.inference_mode():
        outs = generate(model, ids, scfg, eos_id=tok.eos_id, should_stop=stopper, logits_processors=procs)
    texts = [p + _cut(tok.decode(o), cfg.stop) for p, o in zip(prompts, outs)]
    for i, t in enumerate(texts):
        print(f"--- sample {i + 1} ---\n{t}")
    return texts


def _cut(text: str, stops: list[str]) -> str:
    cut = min((i for i in (text.find(s) for s in stops) if i >= 0), default=len(text))
    return text[:cut]
