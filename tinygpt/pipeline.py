"""The main job, stage after stage, each in its own sub-directory of one run directory.

    tinygpt demo --out runs/demo            # what `make demo` runs

    runs/demo/world/       the synthetic world (`tinygpt world make`)
    runs/demo/tokenizer/   BPE trained on the world's stories (`tinygpt tokenizer train`)
    runs/demo/data/        packed token shards (`tinygpt prepare`)
    runs/demo/pretrain/    checkpoints, metrics.jsonl, loss.png (`tinygpt pretrain`)
    runs/demo/samples.md   stories sampled from the model, each graded by the world's oracle

A stage whose output is complete is skipped on a rerun and an interrupted pretraining resumes,
so a killed demo picks up where it stopped. This module calls the stages; the stages never
call each other. (The full recipe -- SFT, reward model, PPO, DPO, the report -- joins here as
those stages land.)
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from tinygpt.checkpoint import latest_checkpoint, load_meta
from tinygpt.config import opt, save_config


@dataclass
class DemoConfig:
    out: str = opt("runs/demo", "run directory; one sub-directory per stage")
    seed: int = opt(0, "seed for the world, the split and training")
    n_stories: int = opt(40000, "stories in the pretraining corpus")
    vocab_size: int = opt(2048, "BPE vocabulary size")
    model_size: str = opt("1m", "named model size (tinygpt.model.SIZES)")
    arch: str = opt("gpt2", "gpt2 or llama")
    block_size: int = opt(256, "context length")
    batch_size: int = opt(16, "sequences per step")
    max_steps: int = opt(1500, "pretraining steps")
    lr: float = opt(3e-3, "peak learning rate")
    eval_every: int = opt(250, "steps between validation evaluations")
    n_samples: int = opt(100, "stories sampled and graded at the end")
    temperature: float = opt(0.7, "sampling temperature for the graded stories")
    device: str = opt("auto", "auto, cpu, cuda or mps")
    dtype: str = opt("auto", "auto, float32 or bfloat16")


def _banner(i: int, n: int, name: str, t0: float) -> None:
    print(f"\n=== [{i}/{n}] {name}  (elapsed {time.perf_counter() - t0:.0f}s) ===", flush=True)


def main(cfg: DemoConfig) -> dict[str, Any]:
    from tinygpt.stages import prepare, pretrain, tokenizer, world

    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    save_config(cfg, out / "demo_config.json")
    t0 = time.perf_counter()
    n = 5

    # --- world ------------------------------------------------------------------------------
    _banner(1, n, "world", t0)
    world_dir = out / "world"
    if (world_dir / "world.json").exists():
        print(f"skip: {world_dir} is complete")
    else:
        world.main(world.WorldConfig(out=str(world_dir), seed=cfg.seed, n_stories=cfg.n_stories))
    corpus = str(world_dir / "pretrain.jsonl")

    # --- tokenizer --------------------------------------------------------------------------
    _banner(2, n, "tokenizer", t0)
    tok_dir = out / "tokenizer"
    if (tok_dir / "tokenizer.json").exists():
        print(f"skip: {tok_dir} is complete")
    else:
        tokenizer.main(tokenizer.TokenizerConfig(inputs=[corpus], out=str(tok_dir), vocab_size=cfg.vocab_size))

    # --- token shards -----------------------------------------------------------------------
    _banner(3, n, "prepare", t0)
    data_dir = out / "data"
    if (data_dir / "meta.json").exists():
        print(f"skip: {data_dir} is complete")
    else:
        prepare.main(prepare.PrepareConfig(inputs=[corpus], tokenizer=str(tok_dir), out=str(data_dir),
                                           seed=cfg.seed))

    # --- pretrain ---------------------------------------------------------------------------
    _banner(4, n, "pretrain", t0)
    pt_dir = out / "pretrain"
    ckpt = latest_checkpoint(pt_dir)
    done_step = load_meta(ckpt).get("step", 0) if ckpt else 0
    if done_step >= cfg.max_steps:
        print(f"skip: {ckpt} is complete (step {done_step})")
    else:
        result = pretrain.main(pretrain.PretrainConfig(
            data=str(data_dir), out=str(pt_dir), model_size=cfg.model_size, arch=cfg.arch,
            block_size=cfg.block_size, batch_size=cfg.batch_size, max_steps=cfg.max_steps, lr=cfg.lr,
            min_lr=cfg.lr / 10, eval_every=cfg.eval_every, save_every=cfg.eval_every, seed=cfg.seed,
            device=cfg.device, dtype=cfg.dtype, resume=ckpt is not None))
        if result["interrupted"]:
            print(f"demo interrupted at pretraining step {result['step']}: rerun the same command to resume")
            return {"interrupted": True, "step": result["step"]}

    # --- samples, graded by the oracle ------------------------------------------------------
    _banner(5, n, "samples", t0)
    from tinygpt.eval.stories import grade_samples, write_samples

    result = grade_samples(pt_dir, n_samples=cfg.n_samples, temperature=cfg.temperature, seed=cfg.seed,
                           device=cfg.device, corpus=corpus)
    write_samples(result, out / "samples.md")
    (out / "summary.json").write_text(json.dumps(result["summary"], indent=2) + "\n")
    print(result["table"])
    print(f"\ndemo finished in {time.perf_counter() - t0:.0f}s: see {out / 'samples.md'}, "
          f"{pt_dir / 'loss.png'}")
    return result["summary"]
