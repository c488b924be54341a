"""Kill -9 a training run at random moments; each time, --resume must continue it bit-exactly.

    python tests/kill_resume.py --trials 20            # pretrain and SFT, 20 kills each; prints the count
    python tests/kill_resume.py --stages sft --trials 5

A tiny world is made once; a reference run trains straight to the end. Each trial starts the same
run in a fresh directory (a checkpoint every step, so kills land in saves as often as in steps),
sends SIGKILL after a random delay, then reruns it with ``--resume`` (or from scratch when the kill
came before the first checkpoint) until it finishes. The trial holds when the final weights equal
the reference run's to the bit. ``tests/test_kill_resume.py`` (slow) runs one trial a stage.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

STEPS = 12


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tinygpt.cli", *args, "--device", "cpu", "--dtype", "float32", "--progress", "false"]


def make_inputs(root: Path) -> dict[str, Path]:
    """A small corpus with its shards and tokenizer, an initial checkpoint and SFT chats."""
    import torch

    from tinygpt.checkpoint import save_checkpoint
    from tinygpt.data.shards import prepare_shards
    from tinygpt.model import GPT, ModelConfig
    from tinygpt.tokenizer import Tokenizer

    rng = random.Random(0)
    words = ["the", "cat", "sat", "on", "a", "mat", "and", "ran", "home", "Tom", "saw", "sun"]
    docs = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(200)]
    (root / "corpus.jsonl").write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    tok = Tokenizer.train(docs, vocab_size=300, show_progress=False)
    prepare_shards([root / "corpus.jsonl"], tok, root / "data", val_fraction=0.1, seed=0, show_progress=False)
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=32, n_layer=2, n_head=2, d_model=32)
    save_checkpoint(root / "init", model=GPT(cfg), model_config=cfg, tokenizer_json=tok.to_str(), meta={"stage": "init"})
    chats = [{"messages": [{"role": "user", "content": " ".join(rng.choice(words) for _ in range(5))},
                          {"role": "assistant", "content": " ".join(rng.choice(words) for _ in range(6))}]}
             for _ in range(120)]
    (root / "chats.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    return {"data": root / "data", "init": root / "init", "chats": root / "chats.jsonl"}


def command(stage: str, inputs: dict[str, Path], out: Path) -> list[str]:
    common = ["--out", str(out), "--max-steps", str(STEPS), "--save-every", "1", "--keep-last", "2",
              "--log-every", "1", "--eval-every", "4", "--seed", "3"]
    if stage == "pretrain":
        return _cli("pretrain", "--data", str(inputs["data"]), "--model-size", "0.5m", "--n-layer", "2",
                    "--d-model", "32", "--n-head", "2", "--block-size", "32", "--batch-size", "4", "--eval-batches", "2",
                    *common)
    return _cli("sft", "--init", str(inputs["init"]), "--data", str(inputs["chats"]), "--batch-size", "4",
                "--dropout", "0.1", *common)  # dropout: the resumed RNG state matters


def weights(run: Path) -> bytes:
    from tinygpt.checkpoint import WEIGHTS, resolve_checkpoint

    return (resolve_checkpoint(run) / WEIGHTS).read_bytes()


def trial(stage: str, inputs: dict[str, Path], root: Path, reference: bytes, rng: random.Random,
          run_seconds: float) -> tuple[bool, str]:
    from tinygpt.checkpoint import latest_checkpoint

    out = root / f"{stage}-trial"
    if out.exists():
        shutil.rmtree(out)
    proc = subprocess.Popen(command(stage, inputs, out), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    delay = rng.uniform(0.3, run_seconds)
    try:
        proc.wait(timeout=delay)
        when = "finished before the kill"
    except subprocess.TimeoutExpired:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        when = f"killed after {delay:.2f}s"
    for _ in range(3):  # resume until it finishes (one resume suffices unless it is killed again)
        resume = latest_checkpoint(out) is not None
        done = subprocess.run(command(stage, inputs, out) + (["--resume"] if resume else ["--overwrite"]),
                              capture_output=True, text=True)
        if done.returncode != 0:
            return False, f"{when}; resume failed: {done.stderr.strip().splitlines()[-1:]}"
        if json.loads((latest_checkpoint(out) / "tinygpt.json").read_text())["step"] == STEPS:
            break
    same = weights(out) == reference
    return same, f"{when}; final weights {'equal' if same else 'DIFFER from'} the reference"


def main(argv: list[str] | None = None) -> dict[str, tuple[int, int]]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--trials", type=int, default=20)
    parser.add_argument("--stages", nargs="+", default=["pretrain", "sft"], choices=["pretrain", "sft"])
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    rng = random.Random(args.seed)
    counts: dict[str, tuple[int, int]] = {}
    with tempfile.TemporaryDirectory(prefix="tinygpt-kill-") as tmp:
        root = Path(tmp)
        inputs = make_inputs(root)
        for stage in args.stages:
            started = time.perf_counter()
            subprocess.run(command(stage, inputs, root / f"{stage}-reference"), check=True, capture_output=True)
            run_seconds = time.perf_counter() - started
            reference = weights(root / f"{stage}-reference")
            held = 0
            for i in range(args.trials):
                ok, what = trial(stage, inputs, root, reference, rng, run_seconds)
                held += ok
                print(f"{stage} trial {i + 1}: {'held' if ok else 'FAILED'} ({what})", flush=True)
            counts[stage] = (held, args.trials)
    print("\n| stage | kills | resumed bit-exactly |\n|---|---|---|")
    for stage, (held, n) in counts.items():
        print(f"| {stage} | {n} | {held} |")
    return counts


if __name__ == "__main__":
    result = main()
    sys.exit(0 if all(h == n for h, n in result.values()) else 1)
