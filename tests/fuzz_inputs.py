"""Malformed inputs against every reader a user's file reaches: no traceback, no hang, nothing half-written.

    python tests/fuzz_inputs.py --cases 10000          # the long run; prints the table
    python tests/fuzz_inputs.py --cases 500 --seed 3   # another slice

(``tests/test_fuzz.py`` runs a seeded slice of a few hundred in ``make test``.)

Each case takes a valid seed file of one kind (documents, SFT chats, rankings, preference pairs, RL
prompts, task records, a checkpoint directory), applies one seeded mutation (truncation, byte flips,
invalid UTF-8, a deleted field, a field of the wrong type, a huge line, deep nesting, an empty or
binary file, wrong Parquet columns; for checkpoints a truncated or lying safetensors header, a bad
``config.json``, a missing or corrupt ``tokenizer.json``, a ``latest`` pointing to nothing, NaN or
integer weights) and hands it to the reader the commands use, with and without ``skip_bad``:

- ``accepted``: the reader took it (a mutation can leave a valid file: a flipped byte in a string);
- ``refused``: a clean error: ``DataError``/``CheckpointError``/``ValueError``/``FileNotFoundError``
  whose one-line message names the file (what ``tinygpt CMD`` prints as ``error: ...``);
- ``traceback``: any other exception, or a refusal that does not name the file;
- ``hang``: more than ``--timeout`` seconds;
- ``partial``: ``prepare`` failed but left the output directory changed.
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import signal
import sys
import tempfile
import time
import traceback
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any, Callable

KINDS = ("documents", "chats", "rankings", "pairs", "prompts", "tasks", "checkpoint", "prepare")
CLEAN = (ValueError, FileNotFoundError, RuntimeError)  # DataError is a ValueError, CheckpointError a RuntimeError


class Hang(Exception):
    pass


# --- valid seed files ---------------------------------------------------------------------------------


def seed_records(kind: str, rng: random.Random) -> list[dict[str, Any]]:
    words = ["the", "cat", "sat", "on", "a", "mat", "Tom", "ran", "home", "sun"]

    def text(n: int = 6) -> str:
        return " ".join(rng.choice(words) for _ in range(n))

    if kind in ("documents", "prepare"):
        return [{"text": text(12)} for _ in range(8)]
    if kind == "chats":
        return [{"messages": [{"role": "user", "content": text()}, {"role": "assistant", "content": text()}]}
                for _ in range(6)]
    if kind == "rankings":
        return [{"prompt": text(), "completions": [text(3), text(4), text(5)], "ranking": [2, [0, 1]],
                 "utilities": [0.5, 0.5, 1.0]} for _ in range(6)]
    if kind == "pairs":
        return [{"prompt": [{"role": "user", "content": text()}], "chosen": text(3), "rejected": text(4)}
                for _ in range(6)]
    if kind == "prompts":
        return [{"prompt": text(), "family": "arithmetic", "meta": {"family": "arithmetic", "gold": "4"}}
                for _ in range(6)]
    if kind == "tasks":
        return [{"family": "arithmetic", "index": i, "instruction": "What is 2 plus 2?", "answer": "4",
                 "meta": {"family": "arithmetic", "gold": "4"}} for i in range(6)]
    raise ValueError(kind)


# --- mutations of a JSONL file --------------------------------------------------------------------------

def _wrong_value(rng: random.Random) -> Any:
    return rng.choice([None, 7, -1.5, True, [], {}, [1, 2], {"a": 1}, "", "x" * 50, [{"role": "bot"}]])


def _mutate_records(records: list[dict], rng: random.Random) -> tuple[str, list[dict]]:
    records = json.loads(json.dumps(records))
    r = records[rng.randrange(len(records))]
    key = rng.choice(sorted(r))
    how = rng.choice(["delete field", "wrong type", "wrong nested type", "rename field", "empty list"])
    if how == "delete field":
        del r[key]
    elif how == "wrong type":
        r[key] = _wrong_value(rng)
    elif how == "wrong nested type" and isinstance(r[key], (list, dict)) and r[key]:
        inner = r[key]
        if isinstance(inner, list):
            inner[rng.randrange(len(inner))] = _wrong_value(rng)
        else:
            inner[rng.choice(sorted(inner))] = _wrong_value(rng)
    elif how == "rename field":
        r[key + "_x"] = r.pop(key)
    else:
        r[key] = []
    return how, records


def _mutate_bytes(data: bytes, rng: random.Random) -> tuple[str, bytes]:
    how = rng.choice(["truncate", "byte flips", "invalid UTF-8", "huge line", "deep nesting", "empty file",
                      "binary file", "not an object", "NUL bytes", "duplicate lines"])
    if how == "truncate":
        return how, data[:rng.randrange(max(1, len(data)))]
    if how == "byte flips":
        b = bytearray(data)
        for _ in range(rng.randint(1, 8)):
            b[rng.randrange(len(b))] = rng.randrange(256)
        return how, bytes(b)
    if how == "invalid UTF-8":
        at = rng.randrange(len(data))
        return how, data[:at] + b"\xff\xfe\xc3" + data[at:]
    if how == "huge line":
        return how, data + json.dumps({"text": "x " * 300_000}).encode() + b"\n"
    if how == "deep nesting":
        depth = rng.choice([100, 2000, 100_000])
        return how, b"[" * depth + b"]" * depth + b"\n" + data
    if how == "empty file":
        return how, b""
    if how == "binary file":
        return how, bytes(rng.randrange(256) for _ in range(rng.randint(1, 4096)))
    if how == "not an object":
        return how, b'[1, 2, 3]\n"text"\n42\n' + data
    if how == "NUL bytes":
        at = rng.randrange(len(data))
        return how, data[:at] + b"\x00" * 8 + data[at:]
    lines = data.splitlines(keepends=True)
    return how, b"".join(lines + lines)


def make_case(kind: str, rng: random.Random, root: Path) -> tuple[str, Path]:
    """Write one malformed input of ``kind`` under ``root``; return (mutation, path)."""
    if kind == "checkpoint":
        return mutate_checkpoint(rng, root)
    records = seed_records(kind, rng)
    fmt = rng.choice(["jsonl"] * 4 + ["parquet"])
    if rng.random() < 0.5:
        how, records = _mutate_records(records, rng)
        data = "".join(json.dumps(r) + "\n" for r in records).encode()
    else:
        how, data = _mutate_bytes("".join(json.dumps(r) + "\n" for r in records).encode(), rng)
    if fmt == "parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        path = root / "input.parquet"
        if how in ("wrong type", "wrong nested type", "delete field", "rename field", "empty list"):
            try:
                pq.write_table(pa.Table.from_pylist(records), path)  # mixed types may not make a table
                return f"parquet: {how}", path
            except Exception:
                pass
        path.write_bytes(data)  # bytes that claim to be Parquet
        return f"parquet: {how}", path
    path = root / "input.jsonl"
    path.write_bytes(data)
    return how, path


# --- checkpoints ----------------------------------------------------------------------------------------

_CKPT: Path | None = None


def _good_checkpoint(root: Path) -> Path:
    global _CKPT
    if _CKPT is None or not _CKPT.exists():
        import torch

        from tinygpt.checkpoint import save_training_checkpoint
        from tinygpt.model import GPT, ModelConfig
        from tinygpt.tokenizer import Tokenizer

        tok = Tokenizer.train(["the cat sat on the mat"] * 4, vocab_size=270, show_progress=False)
        torch.manual_seed(0)
        cfg = ModelConfig(vocab_size=tok.vocab_size, block_size=16, n_layer=1, n_head=2, d_model=16)
        _CKPT = Path(tempfile.mkdtemp(prefix="fuzz-ckpt-")) / "run"
        save_training_checkpoint(_CKPT, 1, model=GPT(cfg), model_config=cfg, tokenizer_json=tok.to_str(),
                                 meta={"stage": "sft", "step": 1}, trainer_state={"step": 1})
    return _CKPT


def mutate_checkpoint(rng: random.Random, root: Path) -> tuple[str, Path]:
    run = root / "run"
    shutil.copytree(_good_checkpoint(root), run)
    ckpt = run / "checkpoints" / "step_00000001"
    weights, config, tok = ckpt / "model.safetensors", ckpt / "config.json", ckpt / "tokenizer.json"
    how = rng.choice(["truncated weights", "weights byte flips", "huge header size", "bad config value",
                      "config not JSON", "config wrong shape", "missing tokenizer", "corrupt tokenizer",
                      "latest to nothing", "NaN weights", "integer weights", "missing weights", "empty weights"])
    if how == "truncated weights":
        data = weights.read_bytes()
        weights.write_bytes(data[:rng.randrange(len(data))])
    elif how == "weights byte flips":
        b = bytearray(weights.read_bytes())
        for _ in range(rng.randint(1, 16)):
            b[rng.randrange(min(len(b), 400))] = rng.randrange(256)  # mostly the header
        weights.write_bytes(bytes(b))
    elif how == "huge header size":
        data = weights.read_bytes()
        weights.write_bytes((2**62).to_bytes(8, "little") + data[8:])
    elif how == "bad config value":
        c = json.loads(config.read_text())
        c[rng.choice(["vocab_size", "block_size", "n_layer", "n_head", "d_model", "arch", "dropout"])] = rng.choice(
            [2.5, -1, 0, 10**12, "big", None, [], 10**7])
        config.write_text(json.dumps(c))
    elif how == "config not JSON":
        config.write_bytes(rng.choice([b"", b"{", b"\xff\xfe", b"[]", b'"x"']))
    elif how == "config wrong shape":
        c = json.loads(config.read_text())
        c["d_model"] = 32
        config.write_text(json.dumps(c))
    elif how == "missing tokenizer":
        tok.unlink()
    elif how == "corrupt tokenizer":
        tok.write_bytes(rng.choice([b"", b"{}", b"{\"model\": 1}", b"\xff" * 10, tok.read_bytes()[:50]]))
    elif how == "latest to nothing":
        (run / "checkpoints" / "latest").write_text("step_00000099\n")
    elif how in ("NaN weights", "integer weights"):
        from safetensors.torch import load_file, save_file
        import torch

        state = load_file(str(weights))
        name = rng.choice(sorted(state))
        if how == "NaN weights":
            state[name] = state[name].clone().fill_(float("nan"))
        else:
            state[name] = state[name].to(torch.int64)
        save_file(state, str(weights))
    elif how == "missing weights":
        weights.unlink()
    else:
        weights.write_bytes(b"")
    return how, run


# --- the readers ----------------------------------------------------------------------------------------

_TOKENIZER = None


def _tokenizer():
    global _TOKENIZER
    if _TOKENIZER is None:
        from tinygpt.tokenizer import Tokenizer

        _TOKENIZER = Tokenizer.train(["the cat sat on the mat Tom ran home sun"] * 4, vocab_size=300,
                                     show_progress=False)
    return _TOKENIZER


def reader(kind: str, skip_bad: bool) -> Callable[[Path, Path], Any]:
    """The function a command calls on a user's file of ``kind``."""
    def documents(path: Path, out: Path) -> Any:
        from tinygpt.data.sources import iter_documents

        return sum(1 for _ in iter_documents([path], skip_bad=skip_bad))

    def chats(path: Path, out: Path) -> Any:
        from tinygpt.data.conversations import ChatDataset

        return len(ChatDataset(path, _tokenizer(), 64, skip_bad=skip_bad))

    def preferences(path: Path, out: Path) -> Any:
        from tinygpt.data.preferences import PreferenceDataset

        return len(PreferenceDataset(path, _tokenizer(), 64, skip_bad=skip_bad))

    def prompts(path: Path, out: Path) -> Any:
        from tinygpt.data.prompts import read_prompts

        return len(read_prompts(str(path), require_meta=skip_bad))

    def tasks(path: Path, out: Path) -> Any:
        from tinygpt.eval.tasks import load_task_records

        return len(load_task_records(path))

    def checkpoint(path: Path, out: Path) -> Any:
        from tinygpt.checkpoint import load_model, load_tokenizer

        model, _ = load_model(path)
        load_tokenizer(path)
        return model.num_params()

    def prepare(path: Path, out: Path) -> Any:
        from tinygpt.data.shards import prepare_shards

        return prepare_shards([path], _tokenizer(), out, val_fraction=0.2, skip_bad=skip_bad, show_progress=False)

    return {"documents": documents, "chats": chats, "rankings": preferences, "pairs": preferences,
            "prompts": prompts, "tasks": tasks, "checkpoint": checkpoint, "prepare": prepare}[kind]


def _snapshot(directory: Path) -> dict[str, bytes]:
    return {str(p.relative_to(directory)): p.read_bytes() for p in sorted(directory.rglob("*")) if p.is_file()}


def run_case(kind: str, rng: random.Random, root: Path, timeout: float) -> tuple[str, str, str]:
    """(outcome, mutation, detail) of one case."""
    case_dir = root / "case"
    if case_dir.exists():
        shutil.rmtree(case_dir)
    case_dir.mkdir(parents=True)
    how, path = make_case(kind, rng, case_dir)
    skip_bad = rng.random() < 0.5
    out = case_dir / "out"
    before = None
    if kind == "prepare":  # a good earlier run in the output directory must survive a failed one
        good = case_dir / "good.jsonl"
        good.write_text("".join(json.dumps(r) + "\n" for r in seed_records("documents", rng)))
        reader("prepare", False)(good, out)
        before = _snapshot(out)
    signal.signal(signal.SIGALRM, lambda *_: (_ for _ in ()).throw(Hang()))
    signal.setitimer(signal.ITIMER_REAL, timeout)
    try:
        reader(kind, skip_bad)(path, out)
        outcome, detail = "accepted", ""
    except Hang:
        outcome, detail = "hang", f"over {timeout}s"
    except Exception as e:  # noqa: BLE001 - classifying every exception is the point
        name, text = type(e).__name__, str(e)
        named = str(path) in text or path.name in text or str(case_dir) in text
        if isinstance(e, CLEAN) and named and "\n" not in text.strip():
            outcome, detail = "refused", ""
        else:
            outcome = "traceback"
            detail = f"{name}: {text[:300]}\n" + "".join(traceback.format_exception(e)[-3:])
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    if kind == "prepare" and outcome != "accepted" and before is not None and _snapshot(out) != before:
        outcome, detail = "partial", "the earlier shards in the output directory changed"
    return outcome, how, detail


def fuzz(cases: int, seed: int = 0, timeout: float = 10.0, kinds: tuple[str, ...] = KINDS,
         verbose: bool = False) -> dict[str, Any]:
    """Run ``cases`` cases (kinds in turn); return counts per kind and outcome, and the failures."""
    rng = random.Random(seed)
    counts: dict[str, Counter] = defaultdict(Counter)
    failures: list[dict[str, str]] = []
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="tinygpt-fuzz-") as tmp:
        root = Path(tmp)
        for i in range(cases):
            kind = kinds[i % len(kinds)]
            outcome, how, detail = run_case(kind, random.Random(rng.getrandbits(64)), root, timeout)
            counts[kind][outcome] += 1
            if outcome in ("traceback", "hang", "partial"):
                failures.append({"kind": kind, "mutation": how, "outcome": outcome, "detail": detail})
                if verbose:
                    print(f"[{kind} / {how}] {outcome}: {detail}", file=sys.stderr)
    return {"cases": cases, "seconds": round(time.perf_counter() - started, 1), "counts": counts,
            "failures": failures}


def table(result: dict[str, Any]) -> str:
    outcomes = ("accepted", "refused", "traceback", "hang", "partial")
    lines = ["| input | cases | " + " | ".join(outcomes) + " |", "|---|---|" + "---|" * len(outcomes)]
    total: Counter = Counter()
    for kind, c in result["counts"].items():
        total.update(c)
        lines.append(f"| {kind} | {sum(c.values())} | " + " | ".join(str(c[o]) for o in outcomes) + " |")
    lines.append(f"| all | {sum(total.values())} | " + " | ".join(str(total[o]) for o in outcomes) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=10_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=10.0, help="seconds before a case counts as a hang")
    parser.add_argument("--verbose", action="store_true", help="print each failure as it happens")
    args = parser.parse_args()
    result = fuzz(args.cases, args.seed, args.timeout, verbose=args.verbose)
    print(table(result))
    print(f"\n{result['cases']} cases in {result['seconds']} s; {len(result['failures'])} failures")
    for f in result["failures"][:20]:
        print(f"- [{f['kind']} / {f['mutation']}] {f['outcome']}: {f['detail'].splitlines()[0] if f['detail'] else ''}")
    sys.exit(1 if result["failures"] else 0)


if __name__ == "__main__":
    main()
