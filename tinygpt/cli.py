"""The ``tinygpt`` command: one sub-command per stage, each built from its config dataclass.

    tinygpt <command> [--config FILE.toml] [--field-name VALUE ...]

Flags come from the stage's dataclass fields (``batch_size`` -> ``--batch-size``) with their help
text and defaults, so ``tinygpt pretrain --help`` documents every knob. A TOML preset given with
``--config`` sets fields from its table named after the command (``[pretrain]``), or from its top
level if it has no such table; flags override it. Stage modules are imported only when their
command runs, so ``tinygpt --help`` is instant.

Under torchrun use the module form: ``torchrun --nproc_per_node=2 -m tinygpt.cli pretrain ...``.

Errors: a usage error (a required flag missing, a bad value) is argparse's one line and exit 2; an
error of the input (a missing file, a bad record, an unloadable checkpoint, a diverged run) is one
line ``tinygpt CMD: error: ...`` and exit 1. ``--debug`` (or ``TINYGPT_DEBUG=1``) shows the traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import os
import sys
from typing import Any

from tinygpt import __version__
from tinygpt.config import add_dataclass_args, missing_required, resolve

DEBUG_ENV = "TINYGPT_DEBUG"

# command words -> (module, config class, positional fields, one-line description)
COMMANDS: dict[tuple[str, ...], tuple[str, str, tuple[str, ...], str]] = {
    ("world", "make"): ("tinygpt.stages.world", "WorldConfig", (),
                        "generate the synthetic world: stories corpus, SFT chats, RL prompts, task splits"),
    ("tokenizer", "train"): ("tinygpt.stages.tokenizer", "TokenizerConfig", (),
                             "train a byte-level BPE tokenizer on text / JSONL / Parquet / datasets files"),
    ("prepare",): ("tinygpt.stages.prepare", "PrepareConfig", (),
                   "tokenize documents into packed train/val token shards"),
    ("pretrain",): ("tinygpt.stages.pretrain", "PretrainConfig", (),
                    "pretrain a Transformer on token shards (resumable, DDP under torchrun)"),
    ("sample",): ("tinygpt.stages.sample", "SampleConfig", ("checkpoint",),
                  "sample text from a checkpoint"),
    ("sft",): ("tinygpt.stages.sft", "SFTConfig", (),
               "instruction tuning on chat data (loss on assistant tokens; full or LoRA)"),
    ("rank",): ("tinygpt.stages.rank", "RankConfig", (),
                "sample K answers per prompt from a policy and rank them with the simulated labeler"),
    ("reward",): ("tinygpt.stages.reward", "RewardConfig", (),
                  "train a reward model (scalar head, Bradley-Terry loss) on rankings"),
    ("dpo",): ("tinygpt.stages.dpo", "DPOConfig", (),
               "direct preference optimisation against the frozen SFT reference"),
    ("ppo",): ("tinygpt.stages.ppo", "PPOConfig", (),
               "RLHF with PPO: KL penalty to the SFT policy, GAE, clipped losses; --ptx-coef for PPO-ptx"),
    ("evaluate",): ("tinygpt.stages.evaluate", "EvaluateConfig", (),
                    "score checkpoints: perplexity, held-out tasks, stories, pass@k, win rates, contamination"),
    ("report",): ("tinygpt.stages.report", "ReportConfig", ("run_dir",),
                  "redraw a run's report (report.md, report.html) from its stages' logs and eval.json"),
    ("chat",): ("tinygpt.chat", "ChatConfig", ("checkpoint",),
                "talk to a chat model in the terminal (streamed, multi-turn, /help for commands)"),
    ("serve",): ("tinygpt.serve", "ServeConfig", ("checkpoint",),
                 "serve a checkpoint: OpenAI-compatible API (/v1) with batched decoding, and a web chat page (/)"),
    ("watermark", "detect"): ("tinygpt.watermark", "DetectConfig", ("checkpoint",),
                              "test texts for the green-list watermark of `sample/chat/serve --watermark-key` (z, p-value)"),
    ("memorisation",): ("tinygpt.eval.memorisation", "MemorisationConfig", (),
                        "extraction: greedy continuations of training vs held-out documents, exact for 32 / 64 tokens"),
    ("scaling",): ("tinygpt.scaling", "ScalingConfig", (),
                   "predictable scaling: a ladder of small pretraining runs, L(C) = a C^b + c, a run 15x past it checked"),
    ("export", "hf"): ("tinygpt.export.hf", "ExportHFConfig", ("checkpoint",),
                       "write a checkpoint as a Hugging Face model directory (transformers, peft; no custom code)"),
    ("export", "gguf"): ("tinygpt.export.gguf", "ExportGGUFConfig", ("checkpoint",),
                         "write a checkpoint as one GGUF file for llama.cpp (f32, f16 or q8_0)"),
    ("export", "lm-eval"): ("tinygpt.export.lmeval", "ExportLMEvalConfig", (),
                            "write the world's held-out Task 1 split as an lm-evaluation-harness task"),
    ("export", "data"): ("tinygpt.export.data", "ExportDataConfig", (),
                         "write SFT chats, RL prompts and preference pairs in TRL's conversational schemas"),
    ("pipeline",): ("tinygpt.pipeline", "PipelineConfig", (),
                    "the main job: every stage in order on the built-in world, then the report (resumable)"),
}


def _top_help() -> str:
    lines = [f"tinygpt {__version__}: the ChatGPT recipe at laptop scale.", "", "commands:"]
    for words, (_, _, _, desc) in COMMANDS.items():
        lines.append(f"  {' '.join(words):<18} {desc}")
    lines += ["", "Run `tinygpt <command> --help` for a command's options and examples; add --debug (or set",
              f"{DEBUG_ENV}=1) to see the traceback of an error."]
    return "\n".join(lines)


def _match(argv: list[str]) -> tuple[tuple[str, ...], list[str]] | None:
    for words in sorted(COMMANDS, key=len, reverse=True):
        if tuple(argv[: len(words)]) == words:
            return words, argv[len(words):]
    return None


def examples(module: Any) -> str:
    """The command lines of a module's docstring (its indented ``tinygpt ...`` / ``torchrun ...`` lines)."""
    lines = [line for line in (module.__doc__ or "").splitlines()
             if line.startswith("    ") and line.strip().split(" ")[0] in ("tinygpt", "torchrun")]
    return "examples:\n" + "\n".join("  " + line.strip() for line in lines) if lines else ""


def build_parser(words: tuple[str, ...]) -> tuple[argparse.ArgumentParser, type]:
    module_name, class_name, positional, desc = COMMANDS[words]
    module = importlib.import_module(module_name)
    cls = getattr(module, class_name)
    parser = argparse.ArgumentParser(prog="tinygpt " + " ".join(words), description=desc, epilog=examples(module),
                                     formatter_class=argparse.RawDescriptionHelpFormatter, allow_abbrev=False)
    if "config" not in {f.name for f in dataclasses.fields(cls)}:  # a stage with its own notion of --config
        parser.add_argument("--config", metavar="FILE", default=None,
                            help="TOML preset: fields from its [%s] table (or top level); flags override it" % words[0])
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help=f"show the traceback of an error (also: {DEBUG_ENV}=1)")
    add_dataclass_args(parser, cls, positional)
    return parser, cls


def run(argv: list[str]) -> Any:
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(_top_help())
        return None
    if argv[0] == "--version":
        print(__version__)
        return None
    found = _match(argv)
    if found is None:
        group = [w for w in COMMANDS if w[0] == argv[0]]
        if group:
            verbs = ", ".join(" ".join(w) for w in group)
            sys.exit(f"tinygpt: '{argv[0]}' needs a verb: {verbs}")
        sys.exit(f"tinygpt: unknown command {argv[0]!r}\n\n{_top_help()}")
    words, rest = found
    parser, cls = build_parser(words)
    args = parser.parse_args(rest)
    try:
        cfg = resolve(cls, args, section=words[0])
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    missing = missing_required(cfg)
    if missing:
        flags = [f.upper() if f in COMMANDS[words][2] else "--" + f.replace("_", "-") for f in missing]
        fields = {f.name: f for f in dataclasses.fields(cls)}
        parser.error(f"{', '.join(flags)} {'is' if len(flags) == 1 else 'are'} required: "
                     + "; ".join(f"{flag}: {fields[f].metadata['help']}" for flag, f in zip(flags, missing)))
    module = importlib.import_module(COMMANDS[words][0])
    try:
        result = module.main(cfg)
    except KeyboardInterrupt:
        raise
    except Exception as e:  # an error of the input or the environment: one line, never a traceback
        if getattr(args, "debug", False) or os.environ.get(DEBUG_ENV, "") not in ("", "0"):
            raise
        sys.exit(f"tinygpt {' '.join(words)}: error: {_one_line(e)}\n(add --debug for the traceback)")
    if isinstance(result, dict) and result.get("interrupted"):
        sys.exit(130)  # saved and stopped on Ctrl-C / SIGTERM: the conventional "interrupted" status
    return result


def _one_line(error: BaseException) -> str:
    """The error's message (its type where it has none, or where the type says more: KeyError, ...)."""
    text = str(error).strip()
    if isinstance(error, ModuleNotFoundError):
        return f"{text}: this command needs an optional dependency (pyproject.toml says which extra has it)"
    if not text or not isinstance(error, (ValueError, OSError, RuntimeError)):
        text = f"{type(error).__name__}: {text}" if text else type(error).__name__
    return " ".join(text.split("\n")) if len(text) < 2000 else text[:2000] + " ..."


def main() -> None:
    try:
        run(sys.argv[1:])
    except KeyboardInterrupt:
        sys.exit(130)


if __name__ == "__main__":
    main()
